"""Drawdown against epochs of editable training, and against accuracy, from `bench/locality.py --json` runs
(the same seeded edits for every model).

    python tools/drawdown_curve.py RUN.json [RUN2.json ...] \
        --series "c_loc 1" resnet20_baseline=0 resnet20_editable=2 ep3=3 --series "c_loc 0.3" cloc03_ep1=1 \
        --out docs/drawdown_vs_epochs.png [--accuracy-out docs/drawdown_vs_accuracy.png --cards DIR ... \
        --baseline resnet20_baseline]

Each `--series LABEL NAME=E ...` places the locality runs' model NAME (its checkpoint's file stem) at E
epochs of editable training; a series is drawn as one line per method panel and protocol (R, C; C over the
corrections that took a step, see `mean_drop`). With
`--accuracy-out`, a second figure puts each model's RMSProp R drop against its accuracy on the exact test
0-999, read from its card: `NAME.json` or `NAME_card.json` in a `--cards` folder (also for models named in
`--also` that belong to no series, e.g. a control). Prints the numbers it plots.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

ACCURACY_KEY = "test_accuracy_exact_0_999"


def mean_drop(summary: dict, protocol: str) -> float:
    """R: the paper's mean over all edits. C: the mean over the corrections that took a step; a model scored
    on other models' mistakes may already get some right, and those would count as free corrections."""
    records = summary.get("records")
    if protocol != "C" or not records or all(r["steps"] > 0 for r in records):
        return summary["drop"]
    return sum(r["drop"] for r in records if r["steps"] > 0) / sum(r["steps"] > 0 for r in records)


def curves(results: list[dict], epochs: dict[str, float]) -> dict[tuple[str, str], list[tuple[float, float]]]:
    """(method, protocol) -> [(epochs, mean drop in points)] sorted by epochs, for the models named."""
    lines: dict[tuple[str, str], list[tuple[float, float]]] = {}
    for row in results:
        if row["model"] not in epochs:
            continue
        for protocol in ("R", "C"):
            if isinstance(row.get(protocol), dict):
                point = (epochs[row["model"]], mean_drop(row[protocol], protocol))
                lines.setdefault((row["method"], protocol), []).append(point)
    return {key: sorted(points) for key, points in lines.items()}


def card_accuracy(name: str, folders: list[Path]) -> float:
    for folder in folders:
        for path in (folder / f"{name}.json", folder / f"{name}_card.json"):
            if path.exists():
                return 100 * json.loads(path.read_text())[ACCURACY_KEY]
    raise SystemExit(f"no card with {ACCURACY_KEY} for {name} in {[str(f) for f in folders]}")


def parse_series(items: list[list[str]]) -> dict[str, dict[str, float]]:
    series = {}
    for label, *pairs in items:
        if not pairs or not all("=" in pair for pair in pairs):
            raise SystemExit(f"--series {label!r} needs NAME=EPOCHS pairs after its label")
        series[label] = {name: float(value) for name, value in (pair.split("=", 1) for pair in pairs)}
    return series


def epochs_figure(results: list[dict], series: dict[str, dict[str, float]], out: str) -> None:
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6), sharex=True)
    for color, (label, epochs) in enumerate(series.items()):
        lines = curves(results, epochs)
        if not lines:
            raise SystemExit(f"none of {sorted(epochs)} is a model of the runs given")
        for (method, protocol), points in sorted(lines.items()):
            ax = axes[0] if method.startswith("local") else axes[1]
            xs, ys = zip(*points)
            ax.plot(xs, ys, marker="o", color=f"C{color}", linestyle="-" if protocol == "R" else "--",
                    label=f"{label}, {protocol}")
            print(f"{label:<12} {method:<40} {protocol}: " + ", ".join(f"{x:g} ep {y:.2f}" for x, y in points))
    for ax, title in zip(axes, ("local editor (page default)", "RMSProp lr 1e-4 on layer3")):
        ax.set_title(title)
        ax.set_xlabel("epochs of editable training (0 = baseline-trained)")
        ax.set_ylabel("held-out drop, points")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    print(f"wrote {out}")


def accuracy_figure(results: list[dict], series: dict[str, dict[str, float]], also: list[str], folders: list[Path],
                    out: str, baseline: str | None = None) -> None:
    """RMSProp R drop against exact 0-999 accuracy: one line per series (in epoch order), lone points for `also`,
    and with `baseline` the issue's target region: R <= 1/3 of the baseline's, accuracy within 1 point of it."""
    drops = {row["model"]: row["R"]["drop"] for row in results
             if row["method"].startswith("rmsprop") and isinstance(row.get("R"), dict)}
    fig, ax = plt.subplots(figsize=(5.6, 4))
    groups = [(label, sorted(epochs, key=epochs.get), epochs) for label, epochs in series.items()]
    groups += [(name, [name], {}) for name in also]
    for color, (label, names, epochs) in enumerate(groups):
        points = [(card_accuracy(name, folders), drops[name], epochs.get(name)) for name in names if name in drops]
        if not points:
            raise SystemExit(f"no RMSProp R result for {names}")
        xs, ys, es = zip(*points)
        ax.plot(xs, ys, marker="o", color=f"C{color}", linestyle="-" if len(points) > 1 else "none", label=label,
                linewidth=0.8)
        for x, y, e in points:
            if e:  # the epoch beside each point of a series
                ax.annotate(f"{e:g}", (x, y), textcoords="offset points", xytext=(3, 3), fontsize=7, color=f"C{color}")
        print(f"{label:<12} R vs accuracy: " + ", ".join(f"{x:.1f}% {y:.2f}" for x, y in zip(xs, ys)))
    if baseline:
        r_max, accuracy_min = drops[baseline] / 3, card_accuracy(baseline, folders) - 1
        limits = ax.get_xlim()
        ax.fill_between([accuracy_min, max(limits)], 0, r_max, color="C2", alpha=0.1, linewidth=0)
        ax.set_xlim(limits)
        ax.axhline(r_max, color="C2", linestyle=":")
        ax.axvline(accuracy_min, color="C2", linestyle=":")
        ax.annotate(f"target: R <= {r_max:.2f}, accuracy >= {accuracy_min:.1f}%", (accuracy_min, r_max),
                    textcoords="offset points", xytext=(4, 4), fontsize=8, color="C2")
        print(f"target region: R <= {r_max:.2f} at accuracy >= {accuracy_min:.1f}%")
    ax.set_xlabel("accuracy on the exact test 0-999, %")
    ax.set_ylabel("R drop under RMSProp lr 1e-4, points")
    ax.invert_xaxis()  # left to right: what a model gives up
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    print(f"wrote {out}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", nargs="+", help="bench/locality.py --json outputs")
    parser.add_argument("--series", nargs="+", action="append", required=True, metavar="LABEL NAME=E")
    parser.add_argument("--out", required=True)
    parser.add_argument("--accuracy-out", help="also draw R drop against exact test accuracy here")
    parser.add_argument("--cards", nargs="+", type=Path, default=[], help="folders holding the models' cards")
    parser.add_argument("--also", nargs="*", default=[], help="models outside any series on the accuracy figure")
    parser.add_argument("--baseline", help="model whose R and accuracy set the target region on the accuracy figure")
    args = parser.parse_args()
    series = parse_series(args.series)
    results = [row for run in args.runs for row in json.loads(Path(run).read_text())["results"]]
    epochs_figure(results, series, args.out)
    if args.accuracy_out:
        accuracy_figure(results, series, args.also, args.cards, args.accuracy_out, args.baseline)
    return 0


if __name__ == "__main__":
    sys.exit(main())
