"""Leak or allocator retention? Server-side memory of many sessions, in one process, without gradio.

    .venv/bin/python bench/memory.py [--threads 8] [--sessions 16] [--edits 3] [--rounds 3] [--no-write]

Loads the lab as `python app.py` does (shipped editable checkpoint, embedded sample). Each round,
`--sessions` workspaces each keep `--edits` edits, applied from `--threads` worker threads (the app's
handlers run on a pool of threads too), then every workspace is dropped. RSS is read before, at the
peak, and after the drop, twice over: once as the app runs now (dropping a workspace hands freed heap
back with glibc's malloc_trim), once with that call disabled (as before). If RSS after the drop returns
near the start with the trim and stays up without it, the growth was the allocator keeping freed memory,
not a leak; if it grew from round to round even with the trim, it would be a leak. Writes the "Memory"
section of docs/RELIABILITY.md.
"""
from __future__ import annotations

import argparse
import os
import shlex
import sys
import time
from concurrent.futures import ThreadPoolExecutor

from app_roundtrip import ROOT  # bench/ is on sys.path when run as a script
from load import RELIABILITY, edit_plan, rss_mb
from report import write_section

sys.path.insert(0, str(ROOT))
import editcore.workspace as workspace_module  # noqa: E402
from editcore import CLASSES, EditSettings, ImageRef, Lab  # noqa: E402


def run_rounds(lab: Lab, plan: list[tuple[int, str]], args) -> list[dict]:
    rounds, pid = [], os.getpid()
    for number in range(args.rounds):
        keys = [f"round{number}-session{s}" for s in range(args.sessions)]
        start = rss_mb(pid)

        def fill(s: int) -> None:
            ws = lab.registry.get(keys[s])
            for k in range(args.edits):
                index, target = plan[(s * args.edits + k) % len(plan)]
                ws.select(ImageRef("test", index))
                ws.apply("editable", CLASSES.index(target), EditSettings(max_steps=10))

        with ThreadPoolExecutor(args.threads) as pool:
            list(pool.map(fill, range(args.sessions)))
        held = lab.registry.edit_bytes() / 2**20
        peak = rss_mb(pid)
        for key in keys:
            lab.registry.drop(key)
        time.sleep(1)
        rounds.append({"start": start, "peak": peak, "held": held, "after": rss_mb(pid)})
    return rounds


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=8)
    parser.add_argument("--sessions", type=int, default=16)
    parser.add_argument("--edits", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args()

    plan = edit_plan()
    lab = Lab.load([("editable", ROOT / "assets" / "resnet20_editable.safetensors")], log=lambda *_: None)
    loaded = rss_mb(os.getpid())
    results = {}
    trim = workspace_module._libc
    for label, libc in (("without malloc_trim (as before)", None), ("with malloc_trim (now)", trim)):
        workspace_module._libc = libc
        results[label] = run_rounds(lab, plan, args)
        print(label, results[label], flush=True)
    workspace_module._libc = trim

    lines = ["## Memory", "", f"Command: `.venv/bin/python {shlex.join(['bench/memory.py', *sys.argv[1:]])}`", "",
             f"Measured {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; load average (1 min) "
             f"{os.getloadavg()[0]:.1f}. One process, lab loaded: {loaded:.0f} MB RSS. Each round: "
             f"{args.sessions} sessions x {args.edits} kept edits from {args.threads} threads, then all dropped.",
             "", "| allocator | round | RSS at start | RSS at peak | edit state held | RSS after the drop |",
             "|---|---:|---:|---:|---:|---:|"]
    for label, rounds in results.items():
        for number, r in enumerate(rounds, 1):
            lines.append(f"| {label} | {number} | {r['start']:.0f} MB | {r['peak']:.0f} MB | {r['held']:.1f} MB | "
                         f"{r['after']:.0f} MB |")
    text = "\n".join(lines) + "\n"
    print(text)
    if not args.no_write:
        write_section("Memory", text, RELIABILITY)
    return 0


if __name__ == "__main__":
    sys.exit(main())
