"""The blend benchmark's data set and metrics (no model run)."""

from __future__ import annotations

import re

from kvtier.bench.blend import build_items, contains, exact_match, f1, load_passages, normalize


def test_items_are_deterministic_and_well_formed() -> None:
    data = load_passages()
    assert len(data["passages"]) >= 8
    texts = {p["id"]: p["text"] for p in data["passages"]}
    items = build_items(data, seed=0)
    assert items == build_items(data, seed=0)
    assert items != build_items(data, seed=1)
    assert len(items) == len(data["questions"])
    for item in items:
        assert 4 <= len(item.docs) <= 8
        assert len(set(item.docs)) == len(item.docs)
        assert sum(texts[item.gold] in doc for doc in item.docs) == 1
        # the answer is stated in the gold passage
        assert re.search(rf"\b{re.escape(normalize(item.answer))}\b", normalize(texts[item.gold]))


def test_passage_lengths(model_dir) -> None:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    for p in load_passages()["passages"]:
        assert 300 <= len(tok(p["text"], add_special_tokens=False)["input_ids"]) <= 600, p["id"]


def test_metrics() -> None:
    assert normalize("The 6,412 metres!") == "6412 metres"
    assert normalize("3.4 kilometres.") == "3.4 kilometres"
    assert exact_match("the Grey Heron.", "Grey Heron") == 1.0
    assert f1("Ada Thorncliff designed it", "Ada Thorncliff") == 2 * (2 / 4) * 1 / (2 / 4 + 1)
    assert contains("It was designed by Ada Thorncliff.", "Ada Thorncliff") == 1.0
    assert contains("Adam", "Ada") == 0.0
