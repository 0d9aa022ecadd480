"""docs/PERFORMANCE.md is shared by the benchmarks: each one owns a '## NAME' section of it."""
from __future__ import annotations

import re
from pathlib import Path

REPORT = Path(__file__).resolve().parent.parent / "docs" / "PERFORMANCE.md"


def write_section(name: str, text: str) -> None:
    """Replace (or append) the '## NAME' section of docs/PERFORMANCE.md, leaving other sections alone."""
    current = REPORT.read_text() if REPORT.exists() else "# Performance\n"
    section = re.compile(rf"^## {re.escape(name)}\b.*?(?=^## |\Z)", re.S | re.M)
    new = section.sub(lambda _: text, current) if section.search(current) else current.rstrip("\n") + "\n\n" + text
    REPORT.parent.mkdir(parents=True, exist_ok=True)
    REPORT.write_text(new)
