"""``kvtier bench blend``: CacheBlend vs full prefill vs naive KV concatenation on multi-document QA.

Data: kvtier/data/blend_passages.json (invented passages of ~360-410 tokens, questions whose answer sits
in one passage). Prompt ``i`` holds the gold passage plus 3-7 distractors (4-8 passages), in an order
drawn from a generator seeded by ``seed`` and the question id, so every run builds the same prompts:

    PREFIX (chat header + instruction) | doc | SEP | doc | ... | SEP | question + assistant header

Every passage is cached once beforehand (computed right after the prefix, the RAG setting: documents
are known before the questions). Then, per prompt, three ways to the first token:

- ``full``: the model's own forward over the whole prompt (the ceiling for quality, the baseline for time);
- ``naive``: cached KV of every passage re-rotated to its place, only separators and question computed
  (``recompute_ratio=0``, ``check_layer=0``);
- ``blend``: CacheBlend (``recompute_ratio``, ``check_layer``; more with ``--ratios``).

Quality: first-token agreement with ``full``; KL(full || method) of the next-token distribution, at the
first token and averaged over the steps of the ``full`` answer fed back teacher-forced, with the share
of those steps where the method's top token is ``full``'s ("tf agree"); exact match and token F1 of the
method's own greedy answer vs the ``full`` answer and vs the gold answer ("gold acc" = the normalised
gold answer occurs in the normalised answer; the model answers in sentences). TTFT: wall
time from token ids to first-token logits (cache retrieval, re-rotation and compute included), the min
of ``repeat`` interleaved runs per prompt; min/median/max over prompts.
"""

from __future__ import annotations

import json
import logging
import random
import re
import statistics
import string
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

import typer

from kvtier.extras import require

log = logging.getLogger(__name__)

PREFIX = (
    "<|im_start|>system\nYou are a helpful assistant. Answer the question using the documents.<|im_end|>\n"
    "<|im_start|>user\nRead the documents, then answer the question in a few words.\n\n"
)
QUERY = "Question: {question}<|im_end|>\n<|im_start|>assistant\n"


@dataclass(frozen=True)
class Item:
    """One QA prompt: its question, gold answer and passages in prompt order."""

    qid: str
    question: str
    answer: str
    gold: str  # id of the passage holding the answer
    docs: tuple[str, ...]  # passage texts, in prompt order


def load_passages() -> dict[str, Any]:
    """The shipped data set (``kvtier/data/blend_passages.json``)."""
    text = resources.files("kvtier").joinpath("data/blend_passages.json").read_text(encoding="utf-8")
    data: dict[str, Any] = json.loads(text)
    return data


def doc_text(passage: dict[str, str]) -> str:
    return f"Document: {passage['title']}\n{passage['text']}"


def build_items(data: dict[str, Any], count: int | None = None, seed: int = 0,
                min_docs: int = 4, max_docs: int = 8) -> list[Item]:
    """Deterministic prompts: per question, the gold passage plus distractors, shuffled."""
    passages = {p["id"]: p for p in data["passages"]}
    items = []
    for q in data["questions"][:count]:
        rng = random.Random(f"{seed}:{q['id']}")
        others = sorted(pid for pid in passages if pid != q["passage"])
        ids = [q["passage"], *rng.sample(others, rng.randint(min_docs, max_docs) - 1)]
        rng.shuffle(ids)
        items.append(Item(q["id"], q["question"], q["answer"], q["passage"],
                          tuple(doc_text(passages[i]) for i in ids)))
    return items


# ---- answer metrics (SQuAD-style normalisation) -----------------------------------------------------
def normalize(text: str) -> str:
    text = text.lower().replace(",", "")  # "6,412" == "6412"
    text = "".join(ch for ch in text if ch not in set(string.punctuation) or ch == ".")
    text = re.sub(r"\.(?!\d)", " ", text)  # keep decimal points only
    text = re.sub(r"\b(a|an|the)\b", " ", text)
    return " ".join(text.split())


def exact_match(pred: str, ref: str) -> float:
    return float(normalize(pred) == normalize(ref))


def f1(pred: str, ref: str) -> float:
    p, r = normalize(pred).split(), normalize(ref).split()
    if not p or not r:
        return float(p == r)
    common = sum((Counter(p) & Counter(r)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(p), common / len(r)
    return 2 * precision * recall / (precision + recall)


def contains(pred: str, gold: str) -> float:
    return float(f" {normalize(gold)} " in f" {normalize(pred)} ")


def kl_divergence(ref_logits: Any, logits: Any) -> float:
    """KL(softmax(ref) || softmax(logits)) in nats."""
    import torch

    ref = torch.log_softmax(ref_logits.double(), -1)
    other = torch.log_softmax(logits.double(), -1)
    return float(torch.sum(ref.exp() * (ref - other)))


# ---- the run -----------------------------------------------------------------------------------------
def run(count: int | None = 24, ratio: float = 0.15, check_layer: int = 1, extra_ratios: tuple[float, ...] = (),
        max_new_tokens: int = 24, repeat: int = 1, seed: int = 0, dtype: str = "float32",
        progress: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Run the benchmark; return the JSON-ready result (see the module doc)."""
    require("transformers", "hf")  # the model benchmarks need the hf extra next to bench
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, DynamicCache

    from kvtier.blend import BlendEngine, kv_spec
    from kvtier.config import BlendConfig, load_config
    from kvtier.engine import CacheEngine
    from kvtier.models import EMBEDDED_MODEL_ID, ensure_embedded_model

    folder = ensure_embedded_model()
    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=getattr(torch, dtype)).eval()
    data = load_passages()
    items = build_items(data, count, seed)
    cfg = load_config(overrides={"cpu": {"capacity": "1GiB"}})
    cache = CacheEngine(kv_spec(model, cfg.chunk_tokens), f"{EMBEDDED_MODEL_ID}/{dtype}", cfg)
    configs = {"naive": BlendConfig(recompute_ratio=0.0, check_layer=0),
               "blend": BlendConfig(recompute_ratio=ratio, check_layer=check_layer)}
    for r in extra_ratios:
        configs[f"blend@{r:g}"] = BlendConfig(recompute_ratio=r, check_layer=check_layer)
    engines = {name: BlendEngine(model, tokenizer, cache, c) for name, c in configs.items()}
    some = next(iter(engines.values()))
    stop = {int(tokenizer.eos_token_id)}

    start = time.perf_counter()
    computed = some.cache_segments([doc_text(p) for p in data["passages"]], PREFIX)
    warm_s = time.perf_counter() - start

    def clone(cache_obj: Any) -> Any:
        return DynamicCache(ddp_cache_data=[(layer.keys, layer.values) for layer in cache_obj.layers],
                            config=model.config)

    def greedy(cache_obj: Any, logits: Any, n: int) -> list[int]:
        """Greedy answer ids (decoding extends ``cache_obj``)."""
        with torch.inference_mode():
            return some.stack.decode(cache_obj, logits, n, max_new_tokens, stop)

    def text(ids: list[int]) -> str:
        return str(tokenizer.decode([t for t in ids if t not in stop])).strip()

    def forced(cache_obj: Any, logits: Any, n: int, ids: list[int]) -> Any:
        """Next-token logits ``[len(ids), vocab]`` along ``ids`` fed teacher-forced after the prompt."""
        if len(ids) < 2:
            return logits.reshape(1, -1)
        with torch.inference_mode():
            out = model(input_ids=torch.tensor([ids[:-1]]), position_ids=torch.arange(n, n + len(ids) - 1)[None],
                        cache=clone(cache_obj), use_cache=True)
        return torch.cat([logits.reshape(1, -1), out.logits[0].float()])

    methods = ["full", *engines]
    rows: list[dict[str, Any]] = []
    for index, item in enumerate(items):
        plan = some.plan(list(item.docs), QUERY.format(question=item.question), PREFIX)
        tokens = torch.tensor(plan.tokens)
        times: dict[str, list[float]] = {m: [] for m in methods}
        outputs: dict[str, Any] = {}
        for rep in range(repeat + (1 if index == 0 else 0)):  # the very first run warms up
            for m in methods:
                t0 = time.perf_counter()
                if m == "full":
                    with torch.inference_mode():
                        outputs[m] = some.stack.prefill(tokens)
                else:
                    result = engines[m].prefill_plan(plan)
                    outputs[m] = (result.cache, result.logits, result.stats)
                elapsed = time.perf_counter() - t0
                if not (index == 0 and rep == 0):
                    times[m].append(elapsed)
        ref_logits = outputs["full"][1]
        full_ids = greedy(clone(outputs["full"][0]), ref_logits, plan.num_tokens)
        full_answer = text(full_ids)
        ref_steps = forced(outputs["full"][0], ref_logits, plan.num_tokens, full_ids)
        row: dict[str, Any] = {"qid": item.qid, "tokens": plan.num_tokens, "docs": len(item.docs),
                               "gold": item.answer, "methods": {}}
        for m in methods:
            cache_obj, logits = outputs[m][0], outputs[m][1]
            steps = ref_steps if m == "full" else forced(cache_obj, logits, plan.num_tokens, full_ids)
            said = full_answer if m == "full" else text(greedy(cache_obj, logits, plan.num_tokens))
            entry = {
                "ttft_s": min(times[m]),
                "answer": said,
                "first_token_agree": float(int(logits.argmax()) == int(ref_logits.argmax())),
                "kl": kl_divergence(ref_logits, logits),
                "kl_answer": statistics.fmean(kl_divergence(r, o) for r, o in zip(ref_steps, steps)),
                "tf_agree": float((steps.argmax(-1) == torch.tensor(full_ids)).float().mean()),
                "em_vs_full": exact_match(said, full_answer),
                "f1_vs_full": f1(said, full_answer),
                "em_gold": exact_match(said, item.answer),
                "f1_gold": f1(said, item.answer),
                "acc_gold": contains(said, item.answer),
            }
            if m != "full":
                stats = outputs[m][2]
                entry["recomputed_fraction"] = (stats.recomputed + stats.fresh) / stats.tokens
            row["methods"][m] = entry
        rows.append(row)
        if progress:
            progress(f"{item.qid}: {plan.num_tokens} tokens, " + ", ".join(
                f"{m} {row['methods'][m]['ttft_s']:.2f}s" for m in methods))
    summary = summarize(rows, methods)
    return {
        "model": EMBEDDED_MODEL_ID, "dtype": dtype, "questions": len(items), "seed": seed, "repeat": repeat,
        "max_new_tokens": max_new_tokens, "configs": {k: c.model_dump() for k, c in configs.items()},
        "segment_warmup": {"seconds": warm_s, "tokens_computed": computed},
        "summary": summary, "rows": rows,
    }


def summarize(rows: list[dict[str, Any]], methods: list[str]) -> dict[str, Any]:
    """Per-method aggregates: TTFT min/median/max, speedup over full, quality means in points (0-100)."""
    out: dict[str, Any] = {}
    for m in methods:
        vals = [r["methods"][m] for r in rows]
        ttft = [v["ttft_s"] for v in vals]
        speedups = [r["methods"]["full"]["ttft_s"] / r["methods"][m]["ttft_s"] for r in rows]
        out[m] = {
            "ttft_min_s": min(ttft), "ttft_median_s": statistics.median(ttft), "ttft_max_s": max(ttft),
            "speedup_median": statistics.median(speedups), "speedup_min": min(speedups),
            "speedup_max": max(speedups),
            "kl_mean": statistics.fmean(v["kl"] for v in vals),
            "kl_median": statistics.median(v["kl"] for v in vals),
            "kl_answer_mean": statistics.fmean(v["kl_answer"] for v in vals),
            **{k: 100 * statistics.fmean(v[k] for v in vals)
               for k in ("first_token_agree", "tf_agree", "em_vs_full", "f1_vs_full", "em_gold", "f1_gold",
                         "acc_gold")},
        }
        if m != "full":
            out[m]["computed_fraction"] = statistics.fmean(v["recomputed_fraction"] for v in vals)
    return out


def plot(path: Path, summary: dict[str, Any]) -> Path:
    from kvtier.bench.common import pyplot

    plt = pyplot()

    methods = list(summary)
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.5))
    med = [summary[m]["ttft_median_s"] for m in methods]
    low = [med[i] - summary[m]["ttft_min_s"] for i, m in enumerate(methods)]
    high = [summary[m]["ttft_max_s"] - med[i] for i, m in enumerate(methods)]
    ax1.bar(methods, med, yerr=[low, high], capsize=4, color="tab:blue")
    for i, m in enumerate(methods):
        ax1.text(i, summary[m]["ttft_max_s"], f"{summary[m]['speedup_median']:.1f}x", ha="center", va="bottom")
    ax1.set_ylabel("TTFT, s (median, min-max over prompts)")
    ax1.set_title("Time to first token (speedup vs full, median)")
    keys = [("acc_gold", "gold acc"), ("f1_gold", "F1 vs gold"), ("f1_vs_full", "F1 vs full"),
            ("tf_agree", "tf agree with full"), ("first_token_agree", "1st token = full")]
    width = 0.8 / len(keys)
    for j, (key, label) in enumerate(keys):
        ax2.bar([i + j * width for i in range(len(methods))], [summary[m][key] for m in methods], width,
                label=label)
    ax2.set_xticks([i + width * (len(keys) - 1) / 2 for i in range(len(methods))], methods)
    ax2.set_ylabel("points (0-100)")
    ax2.set_ylim(0, 105)
    ax2.set_title("Answer quality")
    ax2.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.08), ncol=len(keys))
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def register(app: typer.Typer) -> None:
    @app.command("blend")
    def bench_blend(
        questions: int = typer.Option(24, help="Questions to run (the data set has 36)."),
        ratio: float = typer.Option(0.15, help="recompute_ratio of the 'blend' method."),
        check_layer: int = typer.Option(1, help="check_layer of the blend methods."),
        ratios: str = typer.Option("", help="Extra blend ratios to run too, comma-separated (e.g. 0.05,0.3)."),
        max_new_tokens: int = typer.Option(24, help="Greedy answer length cap."),
        repeat: int = typer.Option(1, help="Timed runs per prompt and method (min is kept)."),
        seed: int = typer.Option(0, help="Seed of the passage selection and order."),
        dtype: str = typer.Option("float32", help="Model dtype: float32 or bfloat16."),
        threads: int = typer.Option(0, help="torch threads (0 = torch's default). On a shared, oversubscribed "
                                    "CPU, 1 gives steadier timings than 2."),
        out: str = typer.Option("results", help="Output folder."),
    ) -> None:
        """Full prefill vs naive KV reuse vs CacheBlend on multi-document QA (SmolLM2-135M)."""
        from rich.console import Console

        from kvtier.bench.common import show_table, write_results

        if threads > 0:
            import torch

            torch.set_num_threads(threads)
        extra = tuple(float(r) for r in ratios.split(",") if r.strip())
        result = run(questions, ratio, check_layer, extra, max_new_tokens, repeat, seed, dtype,
                     progress=lambda line: Console().log(line))
        path = write_results("bench_blend", result, out)
        png = plot(Path(out) / "bench_blend.png", result["summary"])
        show_table(f"CacheBlend, {result['questions']} prompts, {dtype}",
                   ["method", "TTFT min/med/max s", "speedup", "computed", "1st tok =", "tf agree", "KL 1st",
                    "KL answer", "F1 vs full", "EM vs full", "gold acc", "F1 gold"],
                   [[m, f"{s['ttft_min_s']:.2f}/{s['ttft_median_s']:.2f}/{s['ttft_max_s']:.2f}",
                     f"{s['speedup_median']:.2f}x", f"{100 * s.get('computed_fraction', 1.0):.0f}%",
                     f"{s['first_token_agree']:.1f}", f"{s['tf_agree']:.1f}", f"{s['kl_mean']:.4f}",
                     f"{s['kl_answer_mean']:.4f}", f"{s['f1_vs_full']:.1f}", f"{s['em_vs_full']:.1f}",
                     f"{s['acc_gold']:.1f}", f"{s['f1_gold']:.1f}"] for m, s in result["summary"].items()],
                   width=150)
        print(f"wrote {path} and {png}")
