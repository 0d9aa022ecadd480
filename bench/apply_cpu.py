"""Server CPU per apply, A/B in one run: `python app.py` from two versions of this repository side by side,
the same edits sent to both in turn, so both see the same load.

    .venv/bin/python bench/apply_cpu.py --against REV [--rev REV2] [--edits 12] [--data-root DIR]
        [--app-args "--threads 1"]

REV (and REV2; default: this checkout as it is) are exported with `git archive` into a temporary folder and
run with this checkout's Python. Each app runs in its own process on a free loopback port with one
gradio_client session. The images are the test images both models get wrong, in order; for each, both apps
get /select_image, then the page's default edit (true label, editable model, the local editor) through
/apply_edit, then /undo, with the order of the two apps swapped every image. Measured per /apply_edit:
the app process's user + system CPU time (all threads, /proc) and the round trip; the first edit warms up
and is not counted. Prints the table rows that docs/PERFORMANCE.md ("cpu per apply") quotes.
"""
from __future__ import annotations

import argparse
import os
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from app_roundtrip import ROOT, cpu_seconds, free_port, wait_for_app  # bench/ is on sys.path when run as a script
from report import machine  # bench/ is on sys.path when run as a script

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
os.environ.setdefault("HF_HUB_OFFLINE", "1")


def export(rev: str, folder: Path) -> Path:
    """The files of commit `rev` in `folder` (no .git)."""
    folder.mkdir(parents=True)
    archive = subprocess.run(["git", "archive", rev], cwd=ROOT, capture_output=True, check=True).stdout
    subprocess.run(["tar", "-x", "-C", str(folder)], input=archive, check=True)
    return folder


def start(root: Path, app_args: list[str], log: Path) -> tuple[subprocess.Popen, str]:
    port = free_port()
    env = {k: v for k, v in os.environ.items() if k != "EDITLAB_DATA"}  # the data root is passed or the sample meant
    process = subprocess.Popen([sys.executable, "app.py", "--port", str(port), *app_args], cwd=root, env=env,
                               stdout=log.open("w"), stderr=subprocess.STDOUT)
    return process, wait_for_app(process, f"http://127.0.0.1:{port}/", log, 900)


def measure(apps: list[tuple[subprocess.Popen, str]], n_edits: int) -> list[dict]:
    from gradio_client import Client

    clients = [Client(url, verbose=False, download_files=False) for _, url in apps]
    results = [{"cpu": [], "wall": [], "edit": [], "evaluation": []} for _ in apps]
    index = done = 0
    while done < n_edits + 1:
        selected = [client.predict("test", index, api_name="/select_image") for client in clients]
        index += 1
        if not all("misclassified" in info for _, info, _, _ in selected):
            continue
        order = list(range(len(apps))) if done % 2 == 0 else list(reversed(range(len(apps))))
        for k in order:
            (process, _), client = apps[k], clients[k]
            cpu_started, started = cpu_seconds(process.pid), time.perf_counter()
            report = client.predict(selected[k][3], "editable", None, None, None, None, 0, api_name="/apply_edit")[0]
            if done:  # the first edit warms up
                results[k]["wall"].append(time.perf_counter() - started)
                results[k]["cpu"].append(cpu_seconds(process.pid) - cpu_started)
                results[k]["edit"].append(report["seconds"])
                results[k]["evaluation"].append(report["evaluation_seconds"])
            client.predict(api_name="/undo")
        done += 1
    return [{key: statistics.median(values) for key, values in r.items()} | {"min_cpu": min(r["cpu"])} for r in results]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--against", required=True, help="the version to compare with (a commit)")
    parser.add_argument("--rev", default=None, help="the version measured (a commit; default: this checkout as it is)")
    parser.add_argument("--edits", type=int, default=12, help="timed edits per app")
    parser.add_argument("--data-root", default=None, help="CIFAR-10 root: score on the 10,000 test images (default: the sample)")
    parser.add_argument("--app-args", default="", help="extra app.py arguments for both apps, e.g. '--threads 1'")
    args = parser.parse_args()

    app_args = shlex.split(args.app_args) + (["--data-root", args.data_root] if args.data_root else [])
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory() as folder:
        trees = [(args.against, export(args.against, Path(folder) / "a")),
                 (args.rev or "this checkout", export(args.rev, Path(folder) / "b") if args.rev else ROOT)]
        apps = []
        try:
            for k, (_, root) in enumerate(trees):
                apps.append(start(root, app_args, Path(folder) / f"app{k}.log"))
            results = measure(apps, args.edits)
        finally:
            for process, _ in apps:
                process.terminate()
                process.wait(timeout=30)
    load_after = os.getloadavg()

    held_out = "10,000 test images" if args.data_root else "sample"
    print(f"Command: .venv/bin/python bench/apply_cpu.py {shlex.join(sys.argv[1:])}")
    print(f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, {machine()}; "
          f"load average (1 min) {load_before[0]:.1f} before, {load_after[0]:.1f} after")
    print("| held-out | version | edits | server CPU per apply p50 | min | round trip p50 | edit p50 | re-evaluation p50 |")
    print("|---|---|---:|---:|---:|---:|---:|---:|")
    for (name, _), r in zip(trees, results):
        print(f"| {held_out} | {name} | {args.edits} | {r['cpu'] * 1000:.0f} ms | {r['min_cpu'] * 1000:.0f} ms | "
              f"{r['wall'] * 1000:.0f} ms | {r['edit'] * 1000:.0f} ms | {r['evaluation'] * 1000:.0f} ms |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
