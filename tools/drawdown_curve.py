"""Drawdown against epochs of editable training, from `bench/locality.py --json` runs (same edits).

    python tools/drawdown_curve.py RUN.json [RUN2.json ...] --epochs resnet20_baseline=0 resnet20_editable=2 ep3=3 \
        --out docs/drawdown_vs_epochs.png

Each `--epochs NAME=E` places the locality runs' model NAME (its checkpoint's file stem) at E epochs of
editable training; one line per method and protocol (R, C). Prints the numbers it plots.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def curves(results: list[dict], epochs: dict[str, float]) -> dict[tuple[str, str], list[tuple[float, float]]]:
    """(method, protocol) -> [(epochs, mean drop in points)] sorted by epochs, for the models named."""
    lines: dict[tuple[str, str], list[tuple[float, float]]] = {}
    for row in results:
        if row["model"] not in epochs:
            continue
        for protocol in ("R", "C"):
            if isinstance(row.get(protocol), dict):
                lines.setdefault((row["method"], protocol), []).append((epochs[row["model"]], row[protocol]["drop"]))
    return {key: sorted(points) for key, points in lines.items()}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", nargs="+", help="bench/locality.py --json outputs")
    parser.add_argument("--epochs", nargs="+", required=True, metavar="NAME=E")
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    epochs = {name: float(value) for name, value in (item.split("=", 1) for item in args.epochs)}
    results = [row for run in args.runs for row in json.loads(Path(run).read_text())["results"]]
    lines = curves(results, epochs)
    if not lines:
        raise SystemExit(f"none of {sorted(epochs)} is a model of {args.runs}")
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6), sharex=True)
    for (method, protocol), points in sorted(lines.items()):
        ax = axes[0] if method.startswith("local") else axes[1]
        xs, ys = zip(*points)
        ax.plot(xs, ys, marker="o", label=f"{protocol}")
        print(f"{method:<40} {protocol}: " + ", ".join(f"{x:g} ep {y:.2f}" for x, y in points))
    for ax, title in zip(axes, ("local editor (page default)", "RMSProp lr 1e-4 on layer3")):
        ax.set_title(title)
        ax.set_xlabel("epochs of editable training (0 = baseline-trained)")
        ax.set_ylabel("held-out drop, points")
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(args.out, dpi=110)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
