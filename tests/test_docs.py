"""The generated reference pages (docs/configuration.md, docs/api.md) match the code."""

from __future__ import annotations

import runpy
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_generated_reference_pages_are_current() -> None:
    gen = runpy.run_path(str(ROOT / "scripts" / "gen-docs.py"))
    pages = gen["render"]()
    assert set(pages) == {ROOT / "docs" / "configuration.md", ROOT / "docs" / "api.md"}
    for path, text in pages.items():
        assert path.read_text() == text, f"{path.name} is stale: run python scripts/gen-docs.py"
    assert "`cluster.enabled`" in pages[ROOT / "docs" / "configuration.md"]
    assert "class `CacheEngine`" in pages[ROOT / "docs" / "api.md"]
