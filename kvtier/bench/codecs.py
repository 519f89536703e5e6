"""``kvtier bench codecs``: every codec on real KV of the embedded model (SmolLM2-135M).

The KV is the model's prefill over the shipped long document (chat header + document, a whole number of
256-token chunks), stored as bfloat16, the model's dtype. The model itself computes in float32 on CPU
(its bf16 CPU path is several times slower) with that bf16 KV upcast, so every codec, ``raw`` included,
is compared on the same bf16 KV and differences come from the codec only.

Per codec: compression ratio vs bf16 (payload + params), encode and decode MB/s of bf16 KV on one core
(``torch.set_num_threads(1)``; median of ``repeat`` runs over all chunks), reconstruction error, and
quality with the decoded KV against the uncompressed KV: perplexity of the document's next
``continuation`` tokens, top-1 next-token agreement over those positions, and greedy-answer agreement
on the questions whose answer lies inside the context. Writes ``results/bench_codecs.json`` and ``.png``.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any

import typer

from kvtier.extras import require

log = logging.getLogger(__name__)

DEFAULT_CODECS = ("raw", "lz4", "zstd", "int8", "fp8", "kivi", "cachegen", "cachegen-ans", "cachegen[a=0.3]",
                  "cachegen[delta=off]", "cachegen[G=16]")


@dataclass
class Workload:
    """Real KV plus everything needed to score a decoded copy of it."""

    model: Any
    spec: Any
    kv: Any  # canonical [L, 2, T, H, D] bfloat16
    continuation: Any  # [1, n] token ids following the context
    suffixes: list[list[int]]
    questions: list[str]
    expected: list[str]  # the answers, each verbatim in the context
    stop_ids: set[int]
    tokenizer: Any


def codec_for(label: str) -> Any:
    """A registered codec by name, or a variant: ``zstd[shuffle=off]``, ``lz4[shuffle=off]``,
    ``cachegen[G=16,delta=off,entropy=ans,a=0.4/0.5/0.6]`` (anchor_every, delta, entropy, alpha groups)."""
    from kvtier.codec.base import get_codec
    from kvtier.codec.cachegen import CacheGenCodec

    if label.startswith(("zstd[", "lz4[")) and label.endswith("]"):  # zstd[shuffle=off]
        from kvtier.codec.lossless import Lz4Codec, ZstdCodec

        base, _, option = label[:-1].partition("[")
        if option not in ("shuffle=off", "shuffle=on"):
            raise typer.BadParameter(f"unknown option in {label!r}; expected shuffle=on|off")
        shuffle = option == "shuffle=on"
        return ZstdCodec(shuffle=shuffle) if base == "zstd" else Lz4Codec(shuffle=shuffle)
    if label.startswith("cachegen[") and label.endswith("]"):
        options: dict[str, Any] = {}
        for item in label[len("cachegen[") : -1].split(","):
            key, value = item.split("=")
            if key == "G":
                options["anchor_every"] = int(value)
            elif key == "delta":
                options["delta"] = value not in ("0", "off", "false")
            elif key == "entropy":
                options["entropy"] = value
            elif key == "a":
                options["alpha_k"] = options["alpha_v"] = tuple(float(v) for v in value.split("/"))
            else:
                raise typer.BadParameter(f"unknown cachegen option {key!r} in {label!r}")
        return CacheGenCodec(**options)
    return get_codec(label)


def load_workload(context_tokens: int, continuation: int, questions: int) -> Workload:
    """Prefill the embedded model over the document; keep the bf16 KV and the scoring inputs."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    require("transformers", "hf")  # the model benchmarks need the hf extra next to bench
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, DynamicCache

    from kvtier.data import load_document, load_questions
    from kvtier.demo import build_prompts
    from kvtier.integrations.hf import kv_spec_for
    from kvtier.models import ensure_embedded_model

    model_dir = ensure_embedded_model()
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    document = load_document()
    qa = load_questions()
    prefix, _ = build_prompts(tokenizer, document, [], context_tokens, 256)
    doc_ids = list(tokenizer(document, add_special_tokens=False)["input_ids"])
    context_text = tokenizer.decode(prefix)
    inside = [q for q in qa if q["answer"] in context_text][:questions]
    _, suffixes = build_prompts(tokenizer, document, [q["question"] for q in inside], context_tokens, 256)
    # the document tokens that follow the context (the prefix holds header + doc[:keep] + "\n\n")
    keep = _kept(prefix, doc_ids)
    cont = torch.tensor([doc_ids[keep : keep + continuation]])
    with torch.inference_mode():
        cache = DynamicCache(config=model.config)
        model(input_ids=torch.tensor([prefix]), cache=cache, use_cache=True, logits_to_keep=1)
    layers: list[Any] = list(cache.layers)
    kv = torch.stack([torch.stack([layer.keys[0].transpose(0, 1), layer.values[0].transpose(0, 1)])
                      for layer in layers]).to(torch.bfloat16).contiguous()
    spec = dataclasses.replace(kv_spec_for(model, 256), dtype="bfloat16")
    stop = {tokenizer.eos_token_id, tokenizer.convert_tokens_to_ids("<|im_end|>")}
    return Workload(model, spec, kv, cont, suffixes, [q["question"] for q in inside],
                    [q["answer"] for q in inside], {int(s) for s in stop if s is not None}, tokenizer)


def _kept(prefix: list[int], doc_ids: list[int]) -> int:
    """How many document tokens the prefix holds (it ends with them, then a 2-token-or-less separator)."""
    for tail in range(0, 4):
        end = len(prefix) - tail
        for keep in range(min(len(doc_ids), end), 0, -1):
            if prefix[end - 1] == doc_ids[keep - 1] and prefix[end - keep : end] == doc_ids[:keep]:
                return keep
    raise ValueError("the context does not contain a document prefix")


def _cache(model: Any, kv: Any) -> Any:
    import torch
    from transformers import DynamicCache

    data = [(kv[i, 0].transpose(0, 1)[None].to(torch.float32), kv[i, 1].transpose(0, 1)[None].to(torch.float32))
            for i in range(kv.shape[0])]
    return DynamicCache(ddp_cache_data=data, config=model.config)


def score(work: Workload, kv: Any) -> dict[str, Any]:
    """Continuation logits (for perplexity/top-1) and greedy answers with ``kv`` as the cached context."""
    import torch

    T = kv.shape[2]
    with torch.inference_mode():
        n = work.continuation.shape[1]
        pos = torch.arange(T, T + n)[None]
        logits = work.model(input_ids=work.continuation, cache=_cache(work.model, kv), use_cache=True,
                            position_ids=pos).logits[0].float()
        answers = []
        for suffix in work.suffixes:
            cache = _cache(work.model, kv)
            ids = torch.tensor([suffix])
            pos = torch.arange(T, T + len(suffix))[None]
            out = work.model(input_ids=ids, cache=cache, use_cache=True, position_ids=pos, logits_to_keep=1)
            tokens = [int(out.logits[0, -1].argmax())]
            while len(tokens) < 16 and tokens[-1] not in work.stop_ids:
                at = T + len(suffix) + len(tokens) - 1
                out = work.model(input_ids=torch.tensor([[tokens[-1]]]), cache=cache, use_cache=True,
                                 position_ids=torch.tensor([[at]]), logits_to_keep=1)
                tokens.append(int(out.logits[0, -1].argmax()))
            answers.append(tokens)
    logp = torch.log_softmax(logits[:-1], -1)
    nll = float(-logp.gather(1, work.continuation[0, 1:, None]).mean())
    return {"nll": nll, "argmax": logits.argmax(-1), "answers": answers}


def correct(work: Workload, answers: list[list[int]]) -> float:
    """Fraction of greedy answers that contain the expected answer (case-insensitive)."""
    if not answers:
        return float("nan")
    texts = [work.tokenizer.decode(a, skip_special_tokens=True).lower() for a in answers]
    return sum(e.lower() in t for e, t in zip(work.expected, texts)) / len(texts)


def measure_codec(work: Workload, label: str, repeat: int) -> tuple[dict[str, Any], Any]:
    """Size and single-core speed of ``label`` over all chunks; returns (row, decoded KV)."""
    import msgspec
    import torch

    from kvtier.bench.common import time_runs

    codec = codec_for(label)
    spec = work.spec
    C = spec.chunk_tokens
    chunks = [work.kv[:, :, s : s + C].contiguous() for s in range(0, work.kv.shape[2], C)]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        encoded = [codec.encode(c, spec) for c in chunks]
        outs = [torch.empty_like(c) for c in chunks]
        enc = time_runs(lambda: [codec.encode(c, spec) for c in chunks], repeat=repeat, warmup=0)
        dec = time_runs(lambda: [codec.decode(memoryview(p), prm, spec, o)
                                 for (p, prm), o in zip(encoded, outs)], repeat=repeat, warmup=1)
    finally:
        torch.set_num_threads(threads)
    raw_bytes = sum(c.numel() * 2 for c in chunks)  # bf16
    stored = sum(memoryview(p).nbytes + len(msgspec.msgpack.encode(prm)) for p, prm in encoded)
    decoded = torch.cat(outs, 2)
    err = (decoded.float() - work.kv.float())
    row = {
        "codec": label,
        "lossless": bool(getattr(codec, "lossless", False)),
        "ratio": raw_bytes / stored,
        "bits_per_value": 8 * stored / (raw_bytes / 2),
        "encode_MBps": raw_bytes / enc.median / 1e6,
        "decode_MBps": raw_bytes / dec.median / 1e6,
        "decode_MBps_best": raw_bytes / dec.min / 1e6,
        "encode_runs_s": enc.runs,
        "decode_runs_s": dec.runs,
        "max_abs_err": float(err.abs().max()),
        "rel_rms_err": float(err.square().mean().sqrt() / work.kv.float().square().mean().sqrt()),
        "bit_exact": bool(torch.equal(decoded.view(torch.int16), work.kv.view(torch.int16))),
    }
    return row, decoded


def run_codecs_bench(codecs: tuple[str, ...] = DEFAULT_CODECS, context_tokens: int = 4096,
                     continuation: int = 512, questions: int = 10, repeat: int = 3,
                     out_dir: Path | str = "results", progress: bool = True) -> dict[str, Any]:
    """Run the benchmark; write ``<out_dir>/bench_codecs.json`` and ``.png``; return the record."""
    from rich.progress import Progress

    from kvtier.bench.common import write_results

    with Progress(disable=not progress, transient=True) as bar:
        task = bar.add_task("prefill", total=len(codecs) + 1)
        work = load_workload(context_tokens, continuation, questions)
        base = score(work, work.kv)
        bar.advance(task)
        rows = []
        for label in codecs:
            bar.update(task, description=label)
            row, decoded = measure_codec(work, label, repeat)
            got = score(work, decoded) if not row["bit_exact"] else base
            row["ppl"] = math.exp(got["nll"])
            row["ppl_increase_pct"] = 100 * (math.exp(got["nll"] - base["nll"]) - 1)
            row["top1_agreement"] = float((got["argmax"] == base["argmax"]).float().mean())
            same = [a == b for a, b in zip(got["answers"], base["answers"])]
            row["greedy_agreement"] = sum(same) / len(same) if same else float("nan")
            row["answers_correct"] = correct(work, got["answers"])
            row["answers"] = [work.tokenizer.decode(a, skip_special_tokens=True) for a in got["answers"]]
            rows.append(row)
            bar.advance(task)
    record = {
        "model": "SmolLM2-135M-Instruct",
        "kv": {"tokens": int(work.kv.shape[2]), "dtype": "bfloat16", "chunks": int(work.kv.shape[2]) // 256,
               "bytes_bf16": int(work.kv.numel() * 2)},
        "continuation_tokens": int(work.continuation.shape[1]),
        "questions": work.questions,
        "baseline_ppl": math.exp(base["nll"]),
        "baseline_answers_correct": correct(work, base["answers"]),
        "goals": {"cachegen_ratio_min": 3.5, "cachegen_ppl_increase_max_pct": 2.0,
                  "cachegen_decode_MBps_min": 100.0},
        "rows": rows,
    }
    out = Path(out_dir)
    write_results("bench_codecs", record, out)
    plot(rows, out / "bench_codecs.png")
    return record


def plot(rows: list[dict[str, Any]], path: Path) -> Path:
    """Three panels: ratio, decode MB/s (one core), perplexity increase."""
    from kvtier.bench.common import pyplot

    plt = pyplot()

    labels = [r["codec"] for r in rows]
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    panels = (("ratio", "ratio vs bf16 (higher is better)", 3.5),
              ("decode_MBps", "decode MB/s of bf16, 1 core", 100.0),
              ("ppl_increase_pct", "perplexity increase % (lower is better)", 2.0))
    for ax, (key, title, goal) in zip(axes, panels):
        ax.bar(labels, [r[key] for r in rows], color=["tab:orange" if "cachegen" in lbl else "tab:blue"
                                                       for lbl in labels])
        ax.axhline(goal, color="red", linestyle="--", linewidth=1, label=f"cachegen goal {goal:g}")
        ax.set_title(title)
        if key == "decode_MBps":
            ax.set_yscale("log")
        elif key == "ppl_increase_pct":
            ax.set_yscale("symlog", linthresh=1.0)
        ax.tick_params(axis="x", rotation=45)
        ax.legend(fontsize=8)
    fig.suptitle("kvtier codecs on SmolLM2-135M KV (bf16)")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def register(app: typer.Typer) -> None:
    @app.command("codecs")
    def codecs_cmd(
        codecs: Annotated[str, typer.Option(help="Comma-separated codecs (variants: cachegen[G=16,a=0.4]).")]
        = ",".join(DEFAULT_CODECS),
        context: Annotated[int, typer.Option(help="Context tokens (whole 256-token chunks).")] = 4096,
        continuation: Annotated[int, typer.Option(help="Tokens after the context scored for ppl/top-1.")] = 512,
        questions: Annotated[int, typer.Option(help="Greedy-answer questions (answered inside the context).")] = 10,
        repeat: Annotated[int, typer.Option(min=1, help="Timed runs per codec (median reported).")] = 3,
        out: Annotated[Path, typer.Option(help="Output folder.")] = Path("results"),
    ) -> None:
        """Compression ratio, single-core speed and quality of every codec on real SmolLM2 KV."""
        from kvtier.bench.common import show_table

        labels = tuple(c.strip() for c in codecs.split(",") if c.strip())
        record = run_codecs_bench(labels, context, continuation, questions, repeat, out)
        show_table(f"codecs on {record['kv']['tokens']} tokens of SmolLM2 KV (bf16), "
                   f"baseline ppl {record['baseline_ppl']:.3f}",
                   ["codec", "ratio", "bits/val", "enc MB/s", "dec MB/s", "ppl +%", "top-1", "greedy same",
                    "answers ok", "max err"],
                   [[r["codec"], f"{r['ratio']:.2f}", f"{r['bits_per_value']:.2f}",
                     "view" if r["codec"] == "raw" else f"{r['encode_MBps']:.0f}", f"{r['decode_MBps']:.0f}",
                     f"{r['ppl_increase_pct']:+.2f}", f"{r['top1_agreement']:.3f}", f"{r['greedy_agreement']:.2f}",
                     f"{r['answers_correct']:.2f}", f"{r['max_abs_err']:.3g}"] for r in record["rows"]], width=132)
        print(f"{len(record['questions'])} questions; greedy same = 16-token answer identical to the "
              f"uncompressed KV's; answers ok = contains the expected answer "
              f"(uncompressed: {record['baseline_answers_correct']:.2f})")
        print(f"wrote {out / 'bench_codecs.json'} and {out / 'bench_codecs.png'}")
