"""Rewrite the config reference table in README.md from the code (``kvtier config reference``)."""

from __future__ import annotations

import re
from pathlib import Path

from kvtier.config import config_reference

readme = Path(__file__).resolve().parent.parent / "README.md"
text = readme.read_text()
start, end = "<!-- config-reference:start -->", "<!-- config-reference:end -->"
new = re.sub(re.escape(start) + r".*?" + re.escape(end), lambda _m: f"{start}\n{config_reference()}\n{end}",
             text, flags=re.S)
readme.write_text(new)
