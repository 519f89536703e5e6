"""``kvtier demo``: long-document question answering on the embedded model, with and without kvtier.

Every prompt is ``chat header + document + question + assistant header``; the document comes first so
all questions share it as a prefix. The first kvtier run fills the cache, later ones reuse the document.
The document is cut at token level so the shared prefix is a whole number of chunks (a prefix that ends
inside a chunk could not be reused for that chunk). Greedy output with kvtier must be token-identical to
the output without it; the demo reports PASS/FAIL for that and exits non-zero on FAIL.
"""

from __future__ import annotations

import logging
import os
import shutil
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import typer

log = logging.getLogger(__name__)

_MARK = "\x00DOCUMENT\x00"
_INTRO = "Read the document below, then answer the question that follows it in a few words.\n\n"


# CPU feature flags (Linux /proc/cpuinfo names) of native bf16 matrix units, where bf16 pays off.
BF16_MATRIX_FLAGS = ("amx_bf16",)
# native bf16 dot products only. Measured on an AMD EPYC with avx512_bf16 (2 threads, 3K tokens): bf16
# prefill 1.3x faster than float32, but greedy output already changes between a full prefill and a
# prefill split at the last token, with no cache involved (1-token and batched bf16 kernels round
# differently); float32 gave identical output both ways. The demo checks identical output, so float32.
BF16_DOT_FLAGS = ("avx512_bf16", "bf16")


def cpu_flags() -> set[str]:
    """Return this CPU's feature flags: /proc/cpuinfo where readable, else torch's own CPU probes."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        text = ""
    flags: set[str] = set()
    for line in text.splitlines():
        name, _, value = line.partition(":")
        if name.strip() in ("flags", "Features"):
            flags.update(value.split())
    if flags:
        return flags
    import torch

    probes = {"avx512_bf16": "_is_avx512_bf16_supported", "amx_bf16": "_is_amx_tile_supported"}
    return {flag for flag, fn in probes.items() if getattr(torch.cpu, fn, lambda: False)()}


def choose_dtype(requested: str, flags: Iterable[str]) -> tuple[str, str]:
    """Return ``(dtype, reason)`` for the model. ``requested`` is ``auto``, ``bfloat16`` or ``float32``;
    anything but ``auto`` is returned as is. ``auto`` picks bfloat16 only when ``flags`` show a bf16
    matrix unit (AMX); float32 otherwise: without native bf16 it is several times faster, and with bf16
    dot products only (AVX512-BF16) it is a little slower but keeps greedy output independent of how
    the prompt is split (see :data:`BF16_DOT_FLAGS`)."""
    if requested != "auto":
        return requested, "set by --dtype"
    flags = set(flags)
    if matrix := sorted(flags & set(BF16_MATRIX_FLAGS)):
        return "bfloat16", f"CPU has a bf16 matrix unit ({', '.join(matrix)})"
    if dot := sorted(flags & set(BF16_DOT_FLAGS)):
        return "float32", (f"CPU has bf16 dot products only ({', '.join(dot)}): bf16 is barely faster there and its "
                           "rounding makes greedy output depend on how the prompt is split")
    return "float32", "CPU lacks native bf16 (AVX512-BF16 / AMX): float32 is several times faster"


def build_prompts(tokenizer: Any, document: str, questions: list[str], context_tokens: int,
                  chunk_tokens: int) -> tuple[list[int], list[list[int]]]:
    """Return (shared prefix ids, per-question suffix ids). ``len(prefix)`` is a positive multiple of
    ``chunk_tokens`` no larger than ``max(context_tokens, chunk_tokens)``."""
    chat = tokenizer.apply_chat_template([{"role": "user", "content": _MARK}], tokenize=False,
                                         add_generation_prompt=True)
    head, tail = chat.split(_MARK)

    def ids(text: str) -> list[int]:
        return list(tokenizer(text, add_special_tokens=False)["input_ids"])

    head_ids, sep_ids, doc_ids = ids(head + _INTRO), ids("\n\n"), ids(document)
    total = max(chunk_tokens, context_tokens // chunk_tokens * chunk_tokens)
    keep = total - len(head_ids) - len(sep_ids)
    if keep <= 0 or keep > len(doc_ids):
        raise ValueError(f"context of {total} tokens does not fit: document has {len(doc_ids)} tokens")
    prefix = head_ids + doc_ids[:keep] + sep_ids
    suffixes = [ids(f"Question: {q}{tail}") for q in questions]
    return prefix, suffixes


def run_demo(context_tokens: int = 3072, questions: int = 4, dtype: str = "auto",
             max_new_tokens: int = 24, out_dir: Path | str = "results", *, progress: bool = True,
             model_dir: Path | None = None, disk_dir: Path | None = None) -> dict[str, Any]:
    """Run the demo; write ``<out_dir>/demo.json`` and ``demo.png``; return the JSON record.

    The record holds ``passed`` (all answers token-identical) and one row per question. With
    ``disk_dir`` (emptied first) the engine also writes every chunk to a disk tier there; the last row
    then asks question 1 again from a fresh engine (empty CPU tier, as after a restart), so its prefix
    comes from disk; its no-cache side is question 1's (the same prompt through the same model, greedy:
    the same tokens), not computed twice. ``dtype`` goes through :func:`choose_dtype`; the record names
    the choice and why.
    """
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from kvtier.extras import require

    transformers = require("transformers", "demo")  # the demo extra: transformers + matplotlib
    import torch
    from rich.progress import Progress

    from kvtier.bench.common import bar_plot, write_results
    from kvtier.config import load_config
    from kvtier.data import load_document, load_questions
    from kvtier.engine import CacheEngine
    from kvtier.integrations.hf import GenerationResult, HFCachedLM, kv_spec_for
    from kvtier.models import EMBEDDED_MODEL_ID, ensure_embedded_model
    from kvtier.tensors import dtype_from_name

    dtype, dtype_reason = choose_dtype(dtype, cpu_flags())
    log.info("model dtype %s: %s", dtype, dtype_reason)
    folder = model_dir or ensure_embedded_model()
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(folder))
    model = transformers.AutoModelForCausalLM.from_pretrained(str(folder), dtype=dtype_from_name(dtype))
    qa = load_questions()[:questions]
    chunk = load_config().chunk_tokens
    prefix, suffixes = build_prompts(tokenizer, load_document(), [q["question"] for q in qa],
                                     context_tokens, chunk)
    spec = kv_spec_for(model, chunk)
    need = (len(prefix) + sum(len(s) + max_new_tokens for s in suffixes)) // chunk + 2 * len(qa) + 2
    overrides: dict[str, Any] = {"cpu": {"capacity": need * spec.chunk_bytes}}
    if disk_dir is not None:
        shutil.rmtree(disk_dir, ignore_errors=True)
        overrides["disk"] = {"enabled": True, "path": str(disk_dir), "capacity": 4 * need * spec.chunk_bytes}
    config = load_config(overrides=overrides)
    engine = CacheEngine(spec, EMBEDDED_MODEL_ID, config)
    lm = HFCachedLM(model, tokenizer, engine)
    lm.generate(prefix[:64], 2, use_kvtier=False)  # warm up kernels so question 1 is timed fairly

    rows: list[dict[str, Any]] = []
    runs = [(i, "cpu") for i in range(len(qa))]
    if disk_dir is not None:
        runs.append((0, "disk after restart"))
    stats: dict[str, Any] = {}
    baselines: dict[int, GenerationResult] = {}  # per question: the answer without a cache
    with Progress(disable=not progress, transient=True) as bar:
        task = bar.add_task("answering", total=len(qa) + len(runs))
        for i, source in runs:
            q, suffix = qa[i], suffixes[i]
            if source != "cpu":  # a fresh engine: nothing in CPU memory, everything on disk
                stats["before_restart"] = engine.stats()
                engine.close()
                engine = CacheEngine(spec, EMBEDDED_MODEL_ID, config)
                lm = HFCachedLM(model, tokenizer, engine)
            prompt = prefix + suffix
            if i not in baselines:
                baselines[i] = lm.generate(prompt, max_new_tokens, use_kvtier=False)
                bar.advance(task)
            base = baselines[i]
            cached = lm.generate(prompt, max_new_tokens, use_kvtier=True)
            bar.advance(task)
            answer = str(tokenizer.decode(cached.tokens, skip_special_tokens=True)).strip()
            rows.append({
                "question": q["question"],
                "source": source,
                "expected": q["answer"],
                "prompt_tokens": len(prompt),
                "ttft_nocache_s": base.ttft_s,
                "nocache_reused": source != "cpu",  # the no-cache side of the restart row is question 1's
                "ttft_kvtier_s": cached.ttft_s,
                "hit_tokens": cached.hit_tokens,
                "speedup": base.ttft_s / cached.ttft_s,
                "answer_nocache": str(tokenizer.decode(base.tokens, skip_special_tokens=True)).strip(),
                "answer_kvtier": answer,
                "identical": base.tokens == cached.tokens,
                "mentions_expected": q["answer"].lower().rstrip(".") in answer.lower(),
            })
    stats["final"] = engine.stats()
    engine.close()
    record: dict[str, Any] = {
        "model": EMBEDDED_MODEL_ID,
        "dtype": dtype,
        "dtype_reason": dtype_reason,
        "context_tokens": len(prefix),
        "chunk_tokens": chunk,
        "max_new_tokens": max_new_tokens,
        "threads": torch.get_num_threads(),
        "passed": all(r["identical"] for r in rows),
        "questions": rows,
        "kvtier_stats": stats,
    }
    write_results("demo", record, out_dir)
    labels = [f"Q{i + 1}" for i in range(len(qa))] + (["Q1 (disk)"] if disk_dir is not None else [])
    bar_plot(Path(out_dir) / "demo.png", f"TTFT, {len(prefix)}-token document ({dtype})", labels,
             {"no cache": [r["ttft_nocache_s"] for r in rows], "kvtier": [r["ttft_kvtier_s"] for r in rows]},
             "seconds")
    return record


def answer_table(record: dict[str, Any], width: int = 100) -> Any:
    """Return a rich Table of ``record`` with one line per question, no wider than ``width`` columns
    (at least 80): an answer is cut to its first line and to the room left, ending in "…" when cut
    (the full text stays in the JSON)."""
    from rich.table import Table

    table = Table(title=f"kvtier demo: {record['context_tokens']}-token document, {record['dtype']}, TTFT in s",
                  caption="KV from: cpu = kvtier's CPU tier; disk = a fresh engine (as after a restart)")
    for name in ("#", "KV from", "no cache", "kvtier", "hit", "speedup", "same", "answer (kvtier)"):
        table.add_column(name, no_wrap=True)
    room = max(16, width - 63)  # what the other columns, paddings and borders leave
    for i, r in enumerate(record["questions"], 1):
        answer = r["answer_kvtier"].strip().split("\n")[0]
        if len(answer) > room or "\n" in r["answer_kvtier"].strip():
            answer = answer[: room - 1].rstrip() + "…"
        table.add_row(str(i), r["source"].split()[0], f"{r['ttft_nocache_s']:.2f}", f"{r['ttft_kvtier_s']:.2f}",
                      str(r["hit_tokens"]), f"{r['speedup']:.1f}×", "yes" if r["identical"] else "[red]NO[/red]",
                      answer)
    return table


def register(app: typer.Typer) -> None:
    @app.command("demo")
    def demo(
        context_tokens: int = typer.Option(3072, help="Document tokens in the shared prefix (rounded down to chunks)."),
        questions: int = typer.Option(4, min=1, help="Number of questions to ask."),
        dtype: str = typer.Option("auto", help="Model dtype: auto (bfloat16 only on CPUs with native bf16), "
                                  "bfloat16 or float32."),
        max_new_tokens: int = typer.Option(24, min=1, help="Greedy tokens generated per answer."),
        out: str = typer.Option("results", help="Directory for demo.json and demo.png."),
        threads: int = typer.Option(0, min=0, help="torch CPU threads (0 = torch default)."),
        disk: bool = typer.Option(True, "--disk/--no-disk",
                                  help="Also write chunks to a disk tier and finish with a restart that hits it."),
    ) -> None:
        """Long-document QA on the embedded model: TTFT without and with kvtier, identical answers."""
        from rich.console import Console

        if dtype not in ("auto", "bfloat16", "float32"):
            raise typer.BadParameter(f"dtype must be auto, bfloat16 or float32, not {dtype!r}", param_hint="--dtype")
        if threads:
            import torch

            torch.set_num_threads(threads)
        console = Console()
        from kvtier.models import cache_root

        chosen, reason = choose_dtype(dtype, cpu_flags())
        console.print(f"model dtype {chosen}: {reason}")
        record = run_demo(context_tokens, questions, dtype, max_new_tokens, out,
                          disk_dir=cache_root() / "demo-disk" if disk else None)
        console.print(answer_table(record, console.width))
        verdict = "[green]PASS[/green]" if record["passed"] else "[red]FAIL[/red]"
        console.print(f"{verdict}: outputs with and without kvtier are "
                      f"{'token-identical' if record['passed'] else 'NOT identical'}; "
                      f"results in {Path(out) / 'demo.json'} and {Path(out) / 'demo.png'}")
        if not record["passed"]:
            raise typer.Exit(1)
