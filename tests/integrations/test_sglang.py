"""kvtier as SGLang's HiCache storage, on a real SGLang server (CPU test setup, see docs/sglang.md).

Three server starts (about 45 s each on 2 cores) share one prompt of 1,100 tokens (68 pages of
16 tokens, stored as two objects of 32 pages, SmolLM2's "auto" size, and a tail object of 4) and a
second prompt that shares its first 12 pages, i.e. only part of its first object:

1. SGLang without the hierarchical cache: the reference greedy texts.
2. SGLang + kvtier (disk tier in a temp dir): a cold request (kvtier miss), then ``/flush_cache`` (SGLang
   keeps nothing of its own) and the same request again: a kvtier hit, reported by SGLang's own
   ``cached_tokens_details`` and, through the backend's ``get_stats()``, by SGLang's ``/metrics``. Then
   the second prompt: its 12 shared pages come from kvtier (the verified leading part of the first
   object, found through the page index).
3. After server 2 exited, one stored object gets a flipped byte; a fresh server on the same disk
   tier hits every page before the damaged object and recomputes from there.

All three texts must be identical. Needs the SGLang test venv: ``scripts/install-sglang.sh``.
"""

from __future__ import annotations

import json
import time
import urllib.request
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("sglang")

from kvtier.integrations.sglang.cli import (
    flush_cache,
    generate,
    running_server,
    sglang_server_command,
)
from kvtier.integrations.sglang.pages import PageKeys, auto_pages_per_object, namespace_model
from kvtier.keys import Namespace
from kvtier.layout import KVSpec
from kvtier.models import EMBEDDED_MODEL_ID, ensure_embedded_model
from kvtier.procs import free_port

pytestmark = pytest.mark.slow

PAGE = 16
PROMPT_TOKENS = 1100
NEW_TOKENS = 24
DAMAGED_PAGE = 40  # in the second object [32, 64): a restarted server hits the 32 pages before it
PAGES_PER_OBJECT = 32  # auto for SmolLM2-135M's 360 KiB pages
SHARED_PAGES = 12  # the second prompt's pages in common with the first: inside the first object


def _storage_tokens(reply: dict[str, Any]) -> int:
    details = reply["meta_info"].get("cached_tokens_details") or {}
    return int(details.get("storage", 0))


def _disk_files(disk: Path) -> list[Path]:
    return [p for p in disk.glob("??/*.kvt")]


def _wait_stored(disk: Path, objects: int, timeout_s: float = 60.0) -> None:
    """SGLang backs pages up to storage on its own thread after the request: wait for the files."""
    deadline = time.monotonic() + timeout_s
    while len(_disk_files(disk)) < objects and time.monotonic() < deadline:
        time.sleep(0.5)
    assert len(_disk_files(disk)) >= objects, f"only {len(_disk_files(disk))} of {objects} objects were stored"


@pytest.fixture(scope="module")
def prompt() -> list[int]:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(ensure_embedded_model()))
    text = (Path(__file__).parents[2] / "kvtier" / "data" / "longdoc.txt").read_text()
    ids = list(tokenizer(text)["input_ids"][:PROMPT_TOKENS])
    assert len(ids) == PROMPT_TOKENS
    return ids


@pytest.fixture(scope="module")
def second_prompt(prompt: list[int]) -> list[int]:
    """Shares the first prompt's first SHARED_PAGES pages, then goes its own way."""
    return prompt[: SHARED_PAGES * PAGE] + prompt[300:]


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("sglang")
    (root / "kvtier.yaml").write_text(f"disk:\n  enabled: true\n  path: {root / 'disk'}\n  fsync: false\n")
    return root


def _command(workdir: Path, kvtier: bool) -> list[str]:
    return sglang_server_command(port=free_port(), config=str(workdir / "kvtier.yaml"), kvtier=kvtier,
                                 prefetch_threshold=PAGE, cpu_test_rig=True, extra_args=["--enable-metrics"])


@pytest.fixture(scope="module")
def baselines(prompt: list[int], second_prompt: list[int], workdir: Path) -> list[str]:
    with running_server(_command(workdir, kvtier=False), workdir / "baseline.log") as url:
        return [str(generate(url, p, NEW_TOKENS)["text"]) for p in (prompt, second_prompt)]


@pytest.fixture(scope="module")
def baseline(baselines: list[str]) -> str:
    return baselines[0]


def _metric(url: str, name: str) -> float:
    """Sum of every sample of ``name`` on SGLang's ``/metrics`` (all label sets)."""
    with urllib.request.urlopen(f"{url}/metrics", timeout=30) as reply:
        text = reply.read().decode()
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line.startswith(name + "{") or line.startswith(name + " "))


def _wait_metric_above(url: str, name: str, floor: float, timeout_s: float = 30.0) -> float:
    """SGLang drains ``get_stats()`` on its scheduler loop, after the request: poll until it rose."""
    deadline = time.monotonic() + timeout_s
    value = _metric(url, name)
    while value <= floor and time.monotonic() < deadline:
        time.sleep(0.5)
        value = _metric(url, name)
    return value


@pytest.fixture(scope="module")
def first_server(prompt: list[int], second_prompt: list[int], workdir: Path) -> dict[str, Any]:
    with running_server(_command(workdir, kvtier=True), workdir / "server1.log") as url:
        miss = generate(url, prompt, NEW_TOKENS)
        _wait_stored(workdir / "disk", -(-(PROMPT_TOKENS // PAGE) // PAGES_PER_OBJECT))
        backups = _wait_metric_above(url, "sglang:backup_pgs_sum", 0)
        flush_cache(url)
        reads_before = _metric(url, "sglang:prefetch_pgs_sum")
        hit = generate(url, prompt, NEW_TOKENS)
        reads_after = _wait_metric_above(url, "sglang:prefetch_pgs_sum", reads_before)
        flush_cache(url)
        partial = generate(url, second_prompt, NEW_TOKENS)
    metrics = {"backup_pages": backups, "prefetch_pages_before": reads_before, "prefetch_pages_after": reads_after}
    return {"miss": miss, "hit": hit, "partial": partial, "metrics": metrics}


def _object_file(prompt: list[int], disk: Path, page: int) -> Path:
    """The disk file of the object holding page ``page`` of ``prompt``, with SGLang's own page hashes."""
    from sglang.srt.mem_cache.utils import get_hash_str

    config = json.loads((ensure_embedded_model() / "config.json").read_text())
    spec = KVSpec(config["num_hidden_layers"], config["num_key_value_heads"], config["head_dim"], "bfloat16", PAGE)
    keys = PageKeys(Namespace(namespace_model(EMBEDDED_MODEL_ID), spec))
    assert auto_pages_per_object(spec.chunk_bytes) == PAGES_PER_OBJECT
    start = page - page % PAGES_PER_OBJECT
    hashes = get_hash_str(prompt[: (start + PAGES_PER_OBJECT) * PAGE], None, page_size=PAGE)
    key = keys.record(hashes[start:]).key.hex()
    return disk / key[:2] / f"{key}.kvt"


def test_greedy_text_identical_on_kvtier_miss_and_hit(baseline: str, first_server: dict[str, Any]) -> None:
    miss, hit = first_server["miss"], first_server["hit"]
    assert _storage_tokens(miss) == 0
    assert miss["text"] == baseline
    assert hit["text"] == baseline
    # SGLang's own report: after /flush_cache, the prefix came from the storage backend (kvtier)
    details = hit["meta_info"]["cached_tokens_details"]
    assert details["storage_backend"] == "KvtierStorage"
    assert details["device"] == 0 and details["host"] == 0
    assert _storage_tokens(hit) == PAGE * (PROMPT_TOKENS // PAGE)


def test_a_prompt_sharing_part_of_an_object_hits_the_shared_pages(
    baselines: list[str], first_server: dict[str, Any]
) -> None:
    partial = first_server["partial"]
    assert partial["text"] == baselines[1]
    assert _storage_tokens(partial) == SHARED_PAGES * PAGE


def test_kvtier_io_shows_in_sglangs_own_metrics(first_server: dict[str, Any]) -> None:
    """get_stats() feeds SGLang's sglang:backup_pgs / sglang:prefetch_pgs histograms (--enable-metrics)."""
    metrics = first_server["metrics"]
    assert metrics["backup_pages"] >= PROMPT_TOKENS // PAGE  # every page of the cold request was written
    assert metrics["prefetch_pages_before"] == 0
    assert metrics["prefetch_pages_after"] == PROMPT_TOKENS // PAGE  # the hit read them all from kvtier


def test_restarted_server_hits_kvtier_and_a_damaged_page_is_a_miss(
    prompt: list[int], workdir: Path, baseline: str, first_server: dict[str, Any]
) -> None:
    damaged = _object_file(prompt, workdir / "disk", DAMAGED_PAGE)
    data = bytearray(damaged.read_bytes())
    data[-7] ^= 0xFF  # one payload byte: the header still parses, the checksum does not match
    damaged.write_bytes(bytes(data))
    with running_server(_command(workdir, kvtier=True), workdir / "server2.log") as url:
        reply = generate(url, prompt, NEW_TOKENS)
    assert reply["text"] == baseline
    # every page before the damaged object
    assert _storage_tokens(reply) == PAGE * (DAMAGED_PAGE - DAMAGED_PAGE % PAGES_PER_OBJECT)
    assert list((workdir / "disk" / "quarantine").glob(f"{damaged.stem}.*"))
