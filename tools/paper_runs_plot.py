"""Issue 20's curves: the from-scratch runs' drawdown under the paper's editor against epochs and against
error, from the records `tools/paper_runs.sh paper NAME N...` writes (docs/runs/paper_runs/NAME_epN_paper_editor.json:
200 seeded R edits on the embedded sample, the same for every run and epoch).

    python tools/paper_runs_plot.py [--records docs/runs/paper_runs] [--out docs/paper_runs_drawdown.png]

Prints the markdown table the figure shows (drawdown in points with its 95% interval).
"""
from __future__ import annotations

import argparse
import json
import re
import sys
from collections import defaultdict
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

RECORD = re.compile(r"(?P<run>.+)_ep(?P<epoch>\d+)_paper_editor\.json$")


def read_records(folder: Path) -> dict[str, list[tuple[int, dict]]]:
    """run name -> [(epoch, evaluate-edits summary)], by epoch."""
    runs: dict[str, list[tuple[int, dict]]] = defaultdict(list)
    for path in folder.iterdir():
        match = RECORD.match(path.name)
        if match:
            runs[match["run"]].append((int(match["epoch"]), json.loads(path.read_text())))
    return {run: sorted(points, key=lambda point: point[0]) for run, points in sorted(runs.items())}


def table(runs: dict[str, list[tuple[int, dict]]]) -> str:
    lines = ["| run | epoch | sample error | drawdown (points, 95% interval) | success | steps |",
             "|---|---:|---:|---:|---:|---:|"]
    for run, points in runs.items():
        for epoch, s in points:
            low, high = (100 * v for v in s["drawdown_ci95"])
            lines.append(f"| {run} | {epoch} | {100 * s['test_error']:.1f}% | {100 * s['drawdown']:.1f} ({low:.1f}-{high:.1f}) "
                         f"| {100 * s['success_rate']:.0f}% | {s['mean_steps']:.2f} |")
    return "\n".join(lines)


def plot(runs: dict[str, list[tuple[int, dict]]], out: Path) -> None:
    fig, (by_epoch, by_error) = plt.subplots(1, 2, figsize=(11, 4))
    for run, points in runs.items():
        epochs = [e for e, _ in points]
        drawdown = [100 * s["drawdown"] for _, s in points]
        low = [100 * (s["drawdown"] - s["drawdown_ci95"][0]) for _, s in points]
        high = [100 * (s["drawdown_ci95"][1] - s["drawdown"]) for _, s in points]
        by_epoch.errorbar(epochs, drawdown, yerr=[low, high], marker="o", capsize=3, label=run)
        by_error.plot([100 * s["test_error"] for _, s in points], drawdown, marker="o", label=run)
        for (epoch, s), d in zip(points, drawdown):
            by_error.annotate(str(epoch), (100 * s["test_error"], d), fontsize=7, xytext=(3, 3), textcoords="offset points")
    by_epoch.set(xlabel="epochs of training from scratch", ylabel="drawdown under the paper's editor (points)",
                 title="200 R edits, embedded sample")
    by_error.set(xlabel="sample test error (%)", ylabel="drawdown (points)", title="drawdown against error (labels: epoch)")
    by_error.invert_xaxis()
    for axes in (by_epoch, by_error):
        axes.grid(alpha=0.3)
        axes.set_ylim(bottom=0)
        axes.legend()
    fig.tight_layout()
    fig.savefig(out, dpi=110)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--records", default="docs/runs/paper_runs")
    parser.add_argument("--out", default="docs/paper_runs_drawdown.png")
    args = parser.parse_args(argv)
    runs = read_records(Path(args.records))
    if not runs:
        print(f"no *_epN_paper_editor.json records in {args.records}", file=sys.stderr)
        return 2
    plot(runs, Path(args.out))
    print(table(runs))
    return 0


if __name__ == "__main__":
    sys.exit(main())
