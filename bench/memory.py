"""Leak or allocator retention? Server-side memory of many sessions, in one process, without gradio.

    .venv/bin/python bench/memory.py [--threads 8] [--sessions 16] [--edits 3] [--rounds 3] [--no-write]

Runs itself twice, in fresh processes: once with the allocator settings `python app.py` makes at start
(`editcore.limit_allocator_retention`), once with glibc's defaults; each loads the lab as the app does
(shipped editable checkpoint, embedded sample) and reports its CPU time (user + system). Each round,
`--sessions` workspaces each keep `--edits` edits, applied from `--threads` worker threads (the app's
handlers run on a pool of threads too), then every workspace is dropped. RSS is read before, at the
peak, and after the drop, twice over: once as the app runs now (every edit and every dropped workspace
hand freed heap back with glibc's malloc_trim), once with that call disabled. If RSS after the drop returns
near the start with the trim and stays up without it, the growth was the allocator keeping freed memory,
not a leak; if it grew from round to round even with the trim, it would be a leak. Writes the "Memory"
section of docs/RELIABILITY.md.
"""
from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

from app_roundtrip import ROOT  # bench/ is on sys.path when run as a script
from load import RELIABILITY, edit_plan, rss_mb
from report import write_section

sys.path.insert(0, str(ROOT))
import editcore.lab.workspace as workspace_module  # noqa: E402
from editcore import CLASSES, EditSettings, ImageRef, Lab, limit_allocator_retention  # noqa: E402

ALLOCATORS = {"app": "app's setting (2 arenas, 32 MiB mmap threshold)", "glibc": "glibc's defaults"}


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


def measure(args) -> dict:
    """One process's rounds, with and without malloc_trim (after each edit and on drop), under `args.allocator`."""
    if args.allocator == "app":
        limit_allocator_retention()
    plan = edit_plan()
    lab = Lab.load([("editable", ROOT / "assets" / "resnet20_editable.safetensors")], log=lambda *_: None)
    loaded, cpu_before = rss_mb(os.getpid()), os.times()
    results = {}
    trim = workspace_module._libc
    for label, libc in (("no trim", None), ("trim after each edit and on drop (as the app)", trim)):
        workspace_module._libc = libc
        results[label] = run_rounds(lab, plan, args)
    workspace_module._libc = trim
    cpu = os.times()
    return {"loaded": loaded, "results": results, "user": cpu.user - cpu_before.user,
            "system": cpu.system - cpu_before.system}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=8)
    parser.add_argument("--sessions", type=int, default=16)
    parser.add_argument("--edits", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--no-write", action="store_true")
    parser.add_argument("--allocator", choices=list(ALLOCATORS), help=argparse.SUPPRESS)  # one child process
    args = parser.parse_args()
    if args.allocator:
        print(json.dumps(measure(args)))
        return 0

    runs = {}
    for allocator in ALLOCATORS:
        child = subprocess.run([sys.executable, __file__, *sys.argv[1:], "--allocator", allocator], check=True,
                               capture_output=True, text=True)
        runs[allocator] = json.loads(child.stdout.strip().splitlines()[-1])
        print(allocator, runs[allocator], flush=True)

    lines = ["## Memory", "", f"Command: `.venv/bin/python {shlex.join(['bench/memory.py', *sys.argv[1:]])}`", "",
             f"Measured {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; load average (1 min) "
             f"{os.getloadavg()[0]:.1f}. Two fresh processes, lab loaded in each ("
             + ", ".join(f"{a}: {r['loaded']:.0f} MB RSS" for a, r in runs.items()) + "). Each round: "
             f"{args.sessions} sessions x {args.edits} kept edits (the page's default editor) from {args.threads} "
             "threads, then all dropped; first without malloc_trim, then with it.",
             "", "| allocator | trim | round | RSS at start | RSS at peak | edit state held | RSS after the drop |",
             "|---|---|---:|---:|---:|---:|---:|"]
    for allocator, run in runs.items():
        for label, rounds in run["results"].items():
            for number, r in enumerate(rounds, 1):
                lines.append(f"| {ALLOCATORS[allocator]} | {label} | {number} | {r['start']:.0f} MB | {r['peak']:.0f} MB "
                             f"| {r['held']:.1f} MB | {r['after']:.0f} MB |")
    lines += ["", "CPU time of all rounds: " + "; ".join(
        f"{ALLOCATORS[a]} {r['user']:.0f} s user + {r['system']:.0f} s system" for a, r in runs.items()) + "."]
    text = "\n".join(lines) + "\n"
    print(text)
    if not args.no_write:
        write_section("Memory", text, RELIABILITY)
    return 0


if __name__ == "__main__":
    sys.exit(main())
