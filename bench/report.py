"""docs/PERFORMANCE.md is shared by the benchmarks: each one owns a '## NAME' section of it."""
from __future__ import annotations

import re
from pathlib import Path

REPORT = Path(__file__).resolve().parent.parent / "docs" / "PERFORMANCE.md"


def write_section(name: str, text: str, report: Path = REPORT) -> None:
    """Replace (or append) the '## NAME' section of `report` (docs/PERFORMANCE.md), leaving other sections alone."""
    current = report.read_text() if report.exists() else "# Performance\n"
    section = re.compile(rf"^## {re.escape(name)}\b.*?(?=^## |\Z)", re.S | re.M)
    new = section.sub(lambda _: text.rstrip("\n") + "\n\n", current) if section.search(current) else current.rstrip("\n") + "\n\n" + text
    report.parent.mkdir(parents=True, exist_ok=True)
    report.write_text(new)
