"""The package's shape, enforced: imports run downward only, and the control plane never loads torch.

Layers, lowest first (docs/architecture.md explains each). A module may import its own layer and any
lower one. Imports under ``if TYPE_CHECKING:`` are annotations, not dependencies, and are ignored;
imports inside functions count (a lazy import is still a dependency).
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent / "kvtier"

LAYERS: list[tuple[str, set[str]]] = [
    ("foundation", {"errors", "net", "config", "config_cli", "metrics", "data", "queues", "procs", "extras", "compat",
                    "backoff", "batching", "nice"}),
    ("keys/layout", {"layout", "keys", "record", "frame_auth"}),
    ("codec/wire", {"wire", "codec", "tensors", "memory", "frames"}),
    ("storage", {"storage"}),
    ("engine", {"engine", "server", "namespace_probe"}),
    ("services", {"cluster", "router", "blend", "events"}),
    ("integrations", {"integrations", "models"}),
    ("entry points", {"bench", "demo", "cli", "__init__"}),
]

# Upward imports that exist today, each with its reason. The test fails when one disappears, so the
# list only shrinks.
KNOWN_EXCEPTIONS: dict[tuple[str, str], str] = {
    # KVSpec.torch_dtype imports the tensor helpers lazily; only tensor-moving code calls it
    ("kvtier.layout", "kvtier.tensors"): "lazy KVSpec.torch_dtype",
}


def _layer_of(module: str) -> int:
    part = module.split(".")[1] if "." in module else "__init__"
    for index, (_name, members) in enumerate(LAYERS):
        if part in members:
            return index
    raise AssertionError(f"module {module} is in no layer: add its package to LAYERS")


def _type_checking_nodes(tree: ast.AST) -> set[int]:
    skip: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            for child in node.body:
                skip.update(id(n) for n in ast.walk(child))
    return skip


def _imports() -> list[tuple[str, str]]:
    """``(importer, imported)`` for every runtime import of a kvtier module inside kvtier."""
    edges = []
    for path in sorted(ROOT.rglob("*.py")):
        parts = path.relative_to(ROOT.parent).with_suffix("").parts
        module = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        tree = ast.parse(path.read_text())
        skip = _type_checking_nodes(tree)
        for node in ast.walk(tree):
            if id(node) in skip:
                continue
            if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                if node.module == "kvtier":
                    edges += [(module, f"kvtier.{alias.name}") for alias in node.names]
                elif node.module.startswith("kvtier."):
                    edges.append((module, node.module))
            elif isinstance(node, ast.Import):
                edges += [(module, a.name) for a in node.names if a.name.startswith("kvtier.")]
    return edges


def test_imports_run_downward() -> None:
    upward = {(a, b) for a, b in _imports() if _layer_of(a) < _layer_of(b)}
    unexpected = sorted(upward - set(KNOWN_EXCEPTIONS))
    assert not unexpected, "imports that run upward (see docs/architecture.md):\n" + "\n".join(
        f"  {a} ({LAYERS[_layer_of(a)][0]}) -> {b} ({LAYERS[_layer_of(b)][0]})" for a, b in unexpected)
    stale = sorted(set(KNOWN_EXCEPTIONS) - upward)
    assert not stale, f"exceptions no longer needed, remove them from KNOWN_EXCEPTIONS: {stale}"


def test_the_contract_sees_a_violation() -> None:
    """The checker itself: an engine-level import of an integration would be reported."""
    assert _layer_of("kvtier.engine") < _layer_of("kvtier.integrations.vllm")
    assert _layer_of("kvtier.storage.cpu") < _layer_of("kvtier.server.app")
    assert ("kvtier.keys", "kvtier.layout") in _imports()


@pytest.mark.parametrize("module", ["kvtier.cluster.controller", "kvtier.router.app", "kvtier.server.app",
                                    "kvtier.wire", "kvtier.record", "kvtier.keys"])
def test_control_plane_does_not_load_torch(module: str) -> None:
    code = f"import sys, {module}; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    assert out.stdout.strip() == "False", f"importing {module} loaded torch"
