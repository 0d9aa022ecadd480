"""The Measure tab on a shared server: how long a protocol run takes, how often its progress bar moves, and
what it does to another visitor's single edits.

    .venv/bin/python bench/measure_sharing.py [--n-edits 50] [--seed 1] [--rounds 4] [--edits 6] [--round-edits 10]
                                              [--app-args "--threads 1"] [--no-write]

Starts `python app.py` (embedded sample) in a subprocess and waits for its background preparation of the local
editor's anchors. Visitor B calls /run_protocol alone (R, N edits x both models x the local editor and RMSProp,
seed S, which the shipped results do not hold): the run's wall time and the longest gap between two progress
updates B's client saw (polled every 0.1 s). Then, in each of R rounds, visitor A makes E single edits alone (the
page's default edit: true label, editable model, local editor, on misclassified test images, /undo between them),
then goes on editing while B runs a shorter protocol (--round-edits per model and editor, a new seed): A's round
trip p50 alone and beside a run. Alternating rounds keep a drifting load from the machine's other jobs out of
the ratio. Writes the "measure" section of docs/PERFORMANCE.md.
"""
from __future__ import annotations

import argparse
import os
import shlex
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

from app_roundtrip import ROOT, cpu_seconds, start_app  # bench/ is on sys.path when run as a script
from report import REPORT, busy, machine, write_section

TARGET_RUN_S, TARGET_GAP_S, TARGET_SLOWDOWN = 60.0, 2.0, 2.0


def single_edits(client, n_edits: int, start: int = 0, keep_going: threading.Event | None = None) -> tuple[list, int]:
    """Round trips of the page's default edit on misclassified test images from `start` on: `n_edits` of them, or
    with `keep_going` as many as fit while it is set (at least one). Returns (times, next image index)."""
    times, index = [], start
    while len(times) < n_edits if keep_going is None else (keep_going.is_set() or not times):
        _, info, _, target = client.predict("test", index % 1000, api_name="/select_image")
        index += 1
        if "misclassified" not in info:
            continue
        started = time.perf_counter()
        client.predict(target, "editable", None, None, None, None, 0, api_name="/apply_edit")
        times.append(time.perf_counter() - started)
        client.predict(api_name="/undo")
    return times, index


def wait_for_warm_up(url: str) -> None:
    """One local edit on each model: it waits for app.py's background preparation of that model's anchors."""
    from gradio_client import Client

    client = Client(url, verbose=False, download_files=False)
    target = client.predict("test", 0, api_name="/select_image")[3]
    for model in ("baseline", "editable"):
        client.predict(target, model, None, None, None, None, 0, api_name="/apply_edit")
        client.predict(api_name="/reset")


def protocol_run(url: str, n_edits: int, seed: int) -> dict:
    """/run_protocol from its own client, its progress polled: wall time, progress gaps, the rows."""
    from gradio_client import Client

    client = Client(url, verbose=False, download_files=False)
    started = time.perf_counter()
    job = client.submit("other", n_edits, seed, ["local", "rmsprop"], [], api_name="/run_protocol")
    last_done, last_change, gaps = None, started, []
    while not job.done():
        progress = job.status().progress_data
        done = progress[0].index if progress else None
        now = time.perf_counter()
        if done is not None and done != last_done:
            gaps.append(now - last_change)
            last_done, last_change = done, now
        time.sleep(0.1)
    results = job.result()[0]
    wall = time.perf_counter() - started
    return {"wall": wall, "max_gap": max(gaps[1:], default=float("nan")), "updates": len(gaps),
            "rows": [(r["model"], r["editor"], r["summary"]["n_edits"], r["summary"]["drawdown"]) for r in results["rows"]]}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n-edits", type=int, default=50, help="the timed run's N per model and editor")
    parser.add_argument("--seed", type=int, default=1, help="its seed (not 0: the shipped results hold it); the "
                                                            "rounds' runs use the seeds after it")
    parser.add_argument("--rounds", type=int, default=4, help="alternations of A alone / A beside a run")
    parser.add_argument("--edits", type=int, default=6, help="A's timed edits alone per round")
    parser.add_argument("--round-edits", type=int, default=10, help="N per model and editor of each round's run")
    parser.add_argument("--app-args", default="", help="more app.py flags, e.g. '--threads 1'")
    parser.add_argument("--no-write", action="store_true", help="print only; leave docs/PERFORMANCE.md alone")
    args = parser.parse_args()

    from gradio_client import Client

    load_before = os.getloadavg()
    idle: list[float] = []
    during: list[float] = []
    with tempfile.TemporaryDirectory() as folder:
        process, url = start_app([], None, Path(folder) / "app.log", shlex.split(args.app_args))
        try:
            wait_for_warm_up(url)
            cpu_before = cpu_seconds(process.pid)
            alone = protocol_run(url, args.n_edits, args.seed)
            alone_cpu = cpu_seconds(process.pid) - cpu_before if cpu_before is not None else float("nan")
            visitor = Client(url, verbose=False, download_files=False)
            index = single_edits(visitor, 1)[1]  # a warm-up edit, not counted
            for round_number in range(1, args.rounds + 1):
                times, index = single_edits(visitor, args.edits, index)
                idle += times
                running = threading.Event()
                running.set()
                beside: list = []
                editing = threading.Thread(target=lambda: beside.append(single_edits(visitor, 0, index, running)))
                editing.start()
                protocol_run(url, args.round_edits, args.seed + round_number)
                running.clear()
                editing.join()
                times, index = beside[0]
                during += times
        finally:
            process.terminate()
            process.wait(timeout=30)
    load_after = os.getloadavg()
    idle_p50, during_p50 = statistics.median(idle), statistics.median(during)
    slowdown = during_p50 / idle_p50
    shared = busy(load_before, load_after)
    verdict = lambda ok: "met" if ok else "not met"  # noqa: E731
    lines = [
        "## measure",
        "",
        "The Measure tab on a shared server (`bench/measure_sharing.py`), embedded sample, all through gradio_client "
        "once app.py's background preparation of the local editor's anchors is done: visitor B's /run_protocol alone "
        f"(R, N = {args.n_edits} x 2 models x 2 editors, local and RMSProp, seed {args.seed}); then {args.rounds} rounds "
        f"of visitor A's single edits (the page's default edit, /undo between them), {args.edits} alone, then as many "
        f"as fit beside a run of B's (N = {args.round_edits} x 2 x 2, a new seed).",
        "",
        f"Command: `{shlex.join(['.venv/bin/python', 'bench/measure_sharing.py', *sys.argv[1:]])}`",
        "",
        f"Measured {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())} on {machine()}. Load average (1 min) {load_before[0]:.1f} before, "
        f"{load_after[0]:.1f} after{' (busy: other processes shared the cores)' if shared else ''}.",
        "",
        "| figure | measured | target |",
        "|---|---:|---|",
        f"| protocol run alone, {4 * args.n_edits} edits | {alone['wall']:.1f} s | <= {TARGET_RUN_S:.0f} s: "
        f"**{verdict(alone['wall'] <= TARGET_RUN_S)}** |",
        f"| the app's CPU time during that run (all its threads) | {alone_cpu:.1f} s | |",
        f"| longest gap between two progress updates ({alone['updates']} seen) | {alone['max_gap']:.2f} s | "
        f"<= {TARGET_GAP_S:.0f} s: **{verdict(alone['max_gap'] <= TARGET_GAP_S)}** |",
        f"| A's edit round trip p50 alone ({len(idle)} edits in {args.rounds} rounds) | {idle_p50:.3f} s | |",
        f"| A's edit round trip p50 beside a run ({len(during)} edits in {args.rounds} rounds) | {during_p50:.3f} s ({slowdown:.2f}x) | "
        f"<= {TARGET_SLOWDOWN:.0f}x: **{verdict(slowdown <= TARGET_SLOWDOWN)}** |",
        "",
        "Rows of the run alone (model, editor, edits, drawdown): "
        + "; ".join(f"{m} {e} {n} {d:.4f}" for m, e, n, d in alone["rows"]),
    ]
    text = "\n".join(lines) + "\n"
    print(text)
    if not args.no_write:
        write_section("measure", text)
        print(f"wrote the measure section of {REPORT.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
