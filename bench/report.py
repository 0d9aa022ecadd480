"""docs/PERFORMANCE.md is shared by the benchmarks: each one owns a '## NAME' section of it."""
from __future__ import annotations

import os
import platform
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


def busy(load_before: tuple[float, ...], load_after: tuple[float, ...]) -> bool:
    """Whether the 1-minute load average before or after a run exceeded the cores: other processes shared them."""
    return max(load_before[0], load_after[0]) > (os.cpu_count() or 1)


def machine() -> str:
    """The machine a figure was measured on, in words. This project's machines differ in CPU model: one with AMX
    and native bfloat16 ran `measure`'s 200 edits 3.5x faster than one without (docs/PERFORMANCE.md)."""
    import sys
    import torch  # here, not at the top: the benchmarks' clients otherwise never import torch
    if str(REPORT.parent.parent) not in sys.path:
        sys.path.insert(0, str(REPORT.parent.parent))
    from editcore.core.heldout import native_bfloat16
    cpuinfo = Path("/proc/cpuinfo")
    names = [line.split(":", 1)[1].strip() for line in (cpuinfo.read_text().splitlines() if cpuinfo.exists() else [])
             if line.startswith("model name")]
    model = names[0] if names else platform.processor() or "CPU model unknown"
    return (f"{platform.machine()}, {os.cpu_count()} CPU cores ({model}; torch kernels "
            f"{torch.backends.cpu.get_cpu_capability()}, native bfloat16: {'yes' if native_bfloat16('cpu') else 'no'}), "
            f"Python {platform.python_version()}")
