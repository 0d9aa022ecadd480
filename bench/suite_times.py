"""Where the test suite's time goes: the README's test command with CPU and wall time per test file, for this
checkout and, at the same time (so under the same load), for another commit.

    .venv/bin/python bench/suite_times.py [--against REV] [--top 15] [-- PYTEST_ARGS...]

Runs `python -m pytest -q -p no:cacheprovider` (the README's command; the cache plugin off so that both runs
start as a fresh clone does) with bench/pytest_times.py, which records each test's CPU time (the pytest
process plus the child processes it waited for) and wall time, setup and teardown included. With --against,
REV is exported with `git archive` into a temporary folder and its suite runs beside this one, with this
checkout's Python. PYTEST_ARGS (e.g. one test file) narrow both runs. Prints per-file and slowest-test tables
(markdown) for docs/PERFORMANCE.md ("tests").
"""
from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

from report import machine  # bench/ is on sys.path when run as a script

ROOT = Path(__file__).resolve().parent.parent


def run_suite(root: Path, out: Path, log: Path, pytest_args: list[str]) -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items() if k != "EDITLAB_DATA"}  # as CI: the embedded sample
    env.update(PYTEST_TIMES_OUT=str(out), PYTHONPATH=str(ROOT / "bench"))
    return subprocess.Popen([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "pytest_times", *pytest_args],
                            cwd=root, env=env, stdout=log.open("w"), stderr=subprocess.STDOUT)


def per_file(tests: list[dict]) -> dict[str, dict]:
    files = defaultdict(lambda: {"cpu": 0.0, "wall": 0.0, "n": 0})
    for test in tests:
        entry = files[test["test"].split("::")[0]]
        entry["cpu"] += test["cpu"]
        entry["wall"] += test["wall"]
        entry["n"] += 1
    return files


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--against", default=None, help="a commit whose suite runs at the same time")
    parser.add_argument("--top", type=int, default=15, help="slowest tests listed (by CPU time)")
    parser.add_argument("pytest_args", nargs="*", help="passed to both pytest runs (after --)")
    args = parser.parse_args()

    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory() as folder:
        folder = Path(folder)
        roots = {"this checkout": ROOT}
        if args.against:
            roots[args.against] = folder / "against"
            roots[args.against].mkdir()
            archive = subprocess.run(["git", "archive", args.against], cwd=ROOT, capture_output=True, check=True).stdout
            subprocess.run(["tar", "-x", "-C", str(roots[args.against])], input=archive, check=True)
        runs = {name: run_suite(root, folder / f"{k}.json", folder / f"{k}.log", args.pytest_args) for k, (name, root) in enumerate(roots.items())}
        results = {}
        for k, (name, process) in enumerate(runs.items()):
            process.wait()
            log = (folder / f"{k}.log").read_text()
            print(f"{name}: {log.strip().splitlines()[-1]}")
            results[name] = json.loads((folder / f"{k}.json").read_text())
            for test in results[name].get("failed", []):
                print(f"{name}: FAILED {test}")
    load_after = os.getloadavg()

    names = list(results)
    print(f"\nCommand: .venv/bin/python bench/suite_times.py {shlex.join(sys.argv[1:])}")
    print(f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, {machine()}; load average (1 min) {load_before[0]:.1f} before, {load_after[0]:.1f} after\n")
    files = {name: per_file(results[name]["tests"]) for name in names}
    print("| file | " + " | ".join(f"{name}: CPU s | wall s" for name in names) + " |")
    print("|---|" + "---:|---:|" * len(names))
    order = sorted(set().union(*files.values()), key=lambda f: -max(files[n].get(f, {"cpu": 0})["cpu"] for n in names))
    for name in order:
        cells = [f"{files[n][name]['cpu']:.1f} | {files[n][name]['wall']:.1f}" if name in files[n] else "- | -" for n in names]
        print(f"| {name} | " + " | ".join(cells) + " |")
    totals = [f"**{results[n]['total']['cpu']:.0f}** | **{results[n]['total']['wall']:.0f}**" for n in names]
    print("| whole suite (pytest's own time included) | " + " | ".join(totals) + " |")
    for name in names:
        print(f"\nSlowest tests by CPU time, {name} (CPU s, wall s):")
        for test in sorted(results[name]["tests"], key=lambda t: -t["cpu"])[: args.top]:
            print(f"- `{test['test']}` {test['cpu']:.1f}, {test['wall']:.1f}")
    return max(r["total"]["exitstatus"] for r in results.values())


if __name__ == "__main__":
    sys.exit(main())
