"""Shipped text data: an original long English document about a fictional region (the Velmora Valley)
and short-answer questions about it.

The document is longer than 9,000 tokens with the SmolLM2 tokenizer, so an 8K-token context can be cut
from its beginning; questions are ordered by where their answer first appears (earliest first).
"""

from __future__ import annotations

import json
from importlib import resources


def load_document() -> str:
    """The full long document as one string (UTF-8, paragraphs separated by blank lines)."""
    return resources.files(__package__).joinpath("longdoc.txt").read_text(encoding="utf-8")


def load_questions() -> list[dict[str, str]]:
    """Questions as ``{"question": ..., "answer": ...}``; each answer appears verbatim in the document."""
    raw = resources.files(__package__).joinpath("questions.json").read_text(encoding="utf-8")
    return [{"question": str(q["question"]), "answer": str(q["answer"])} for q in json.loads(raw)]
