"""Nothing in the package deserializes with pickle/marshal/shelve; pickle is imported in one module only,
kvtier/events/hashing.py, which *serializes* local token ids to reproduce vLLM's block hashes."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2] / "kvtier"
LOADERS = {"loads", "load", "Unpickler"}
UNSAFE_MODULES = {"pickle", "cPickle", "_pickle", "marshal", "shelve", "dill", "cloudpickle"}
PICKLE_ALLOWED = {"kvtier/events/hashing.py"}


def _modules() -> list[tuple[str, ast.Module]]:
    return [(str(p.relative_to(ROOT.parent)), ast.parse(p.read_text(), str(p))) for p in sorted(ROOT.rglob("*.py"))]


def test_no_module_calls_an_unpickling_loader() -> None:
    found = []
    for name, tree in _modules():
        for node in ast.walk(tree):
            if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name)
                    and node.value.id in UNSAFE_MODULES and node.attr in LOADERS):
                found.append(f"{name}:{node.lineno} {node.value.id}.{node.attr}")
            if isinstance(node, ast.ImportFrom) and node.module in UNSAFE_MODULES:
                found += [f"{name}:{node.lineno} from {node.module} import {a.name}"
                          for a in node.names if a.name in LOADERS or a.name == "*"]
    assert not found, found


def test_pickle_is_imported_only_where_it_serializes_for_vllm_hashes() -> None:
    importers = set()
    for name, tree in _modules():
        for node in ast.walk(tree):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                     else [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            if any(n.split(".")[0] in UNSAFE_MODULES for n in names):
                importers.add(name)
    assert importers == PICKLE_ALLOWED
