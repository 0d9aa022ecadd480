"""The paper's table for a baseline / editable pair: per editor, test error, drawdown, success rate and mean steps of
both models, on the embedded sample (test 0-999, pixel-exact) and on the full test set. Every figure is one
`python -m editcore evaluate-edits` run (R protocol: a random other label; N seeded edits, each from the unedited
model); the gradient editors edit the layers --prefix names on both models (default `layer2`, where the
shipped editable model learned to be edited).

    .venv/bin/python bench/editor_table.py --baseline assets/resnet20_scratch_baseline.safetensors \\
        --editable assets/resnet20_scratch_editable.safetensors --data-root ../shared/data/cifar10 [--jobs 2]

- GD, momentum, RMSProp, Adam: the lr the paper's tuning rule picks, the smallest on a grid reaching >= 99% success
  on N_TUNE tuning edits of another seed on the baseline; both models edited at that lr.
- The paper's RMSProp as the editable model learned it (both models under it, `--editor-from`), and untrained.
- The page's local editor, with its defaults.

Each run's summary is kept in --work under its job name with its command; a rerun reuses a summary whose command
is unchanged. The tables replace the `## SECTION` of --doc (docs/RESULTS.md).
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
from pathlib import Path

from report import machine, write_section  # bench/ is on sys.path when run as a script

ROOT = Path(__file__).resolve().parent.parent
SECTION = "The paper's table: the from-scratch pair"
# Ascending; the paper-pipeline grids (tools/paper_pipeline.py) extended downwards for the smaller `layer2` edits.
LR_GRID = {"gd": (1e-4, 3e-4, 1e-3, 3e-3, 1e-2), "momentum": (3e-5, 1e-4, 3e-4, 1e-3, 3e-3),
           "rmsprop": (1e-5, 3e-5, 1e-4, 3e-4, 1e-3), "adam": (1e-5, 3e-5, 1e-4, 3e-4, 1e-3)}
TUNED_SUCCESS = 0.99


def evaluate(work: Path, name: str, words: list[str]) -> dict:
    """One evaluate-edits run's JSON summary (reused from `work` when its command is unchanged)."""
    command = ["python", "-m", "editcore", "evaluate-edits", *words, "--threads", "1", "--json"]
    kept = work / f"{name}.json"
    if kept.exists():
        record = json.loads(kept.read_text())
        if record["command"] == shlex.join(command):
            return record["summary"]
    env = {k: v for k, v in os.environ.items() if k != "EDITLAB_DATA"}  # no --data-root means the sample, here
    done = subprocess.run([sys.executable, *command[1:]], cwd=ROOT, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"{shlex.join(command)} failed:\n{done.stderr[-2000:]}")
    summary = json.loads(done.stdout.strip().splitlines()[-1])
    kept.write_text(json.dumps({"command": shlex.join(command), "summary": summary}, indent=1) + "\n")
    print(f"{name}: drawdown {100 * summary['drawdown']:.2f}, success {summary['success_rate']:.3f} "
          f"({summary['seconds']:.0f} s)", flush=True)
    return summary


def tune(work: Path, editor: str, baseline: str, prefix: str, n_tune: int, seed: int) -> list[tuple[float, dict]]:
    """The grid up to the first lr reaching TUNED_SUCCESS on the baseline (that lr is the last entry)."""
    tried = []
    for lr in LR_GRID[editor]:
        summary = evaluate(work, f"tune_{editor}_{lr:g}", ["--checkpoint", baseline, "--editor", editor, "--lr", f"{lr:g}",
                                                           "--editable-prefix", prefix, "--protocol", "other",
                                                           "--n-edits", str(n_tune), "--seed", str(seed)])
        tried.append((lr, summary))
        if summary["success_rate"] >= TUNED_SUCCESS:
            return tried
    raise RuntimeError(f"{editor}: no lr in {LR_GRID[editor]} reaches {TUNED_SUCCESS:.0%} success; extend LR_GRID")


def settings(args, tuned: dict[str, float]) -> list[tuple[str, str, dict[str, list[str]]]]:
    """(row key, row label, model -> editor arguments) for every row of the table."""
    rows = [(e, f"{e} (lr {tuned[e]:g})", {m: ["--editor", e, "--lr", f"{tuned[e]:g}", "--editable-prefix", args.prefix]
                                          for m in ("baseline", "editable")}) for e in tuned]
    rows.append(("paper_learned", "paper RMSProp, as learned (lr 1e-3, β of the editable model)",
                 {"baseline": ["--editor", "rmsprop-paper", "--editor-from", args.editable, "--editable-prefix", args.prefix],
                  "editable": ["--editor", "rmsprop-paper"]}))
    rows.append(("paper_untrained", "paper RMSProp, untrained (lr 1e-3, β 0.5)",
                 {m: ["--editor", "rmsprop-paper", "--lr", "1e-3", "--editable-prefix", args.prefix] for m in ("baseline", "editable")}))
    rows.append(("local", "local (the page's; its own layer)", {m: ["--editor", "local"] for m in ("baseline", "editable")}))
    return rows


def cell(s: dict) -> str:
    low, high = (100 * v for v in s["drawdown_ci95"])
    return (f"{100 * s['test_error']:.1f}% | {100 * s['drawdown']:.2f} ({low:.1f}-{high:.1f}) | "
            f"{100 * s['success_rate']:.1f}% | {s['mean_steps']:.2f}")


def ratio(editable: dict, baseline: dict) -> str:
    return f"{editable['drawdown'] / baseline['drawdown']:.2f}×" if baseline["drawdown"] > 0 else "—"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--baseline", required=True)
    parser.add_argument("--editable", required=True)
    parser.add_argument("--prefix", default="layer2", help="the layers the gradient editors edit on both models")
    parser.add_argument("--data-root", required=True, help="the full CIFAR-10 (its test split is the full-test column)")
    parser.add_argument("--n-edits", type=int, default=200)
    parser.add_argument("--seed", type=int, default=11)
    parser.add_argument("--n-tune", type=int, default=100)
    parser.add_argument("--tune-seed", type=int, default=1000)
    parser.add_argument("--jobs", type=int, default=2, help="evaluate-edits processes at once (one thread each)")
    parser.add_argument("--work", default="docs/runs/editor_table")
    parser.add_argument("--doc", default="docs/RESULTS.md")
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args(argv)
    work = ROOT / args.work
    work.mkdir(parents=True, exist_ok=True)

    with ThreadPoolExecutor(args.jobs) as pool:
        tuning = dict(zip(LR_GRID, pool.map(lambda e: tune(work, e, args.baseline, args.prefix, args.n_tune, args.tune_seed),
                                            LR_GRID)))
        tuned = {e: tried[-1][0] for e, tried in tuning.items()}
        rows = settings(args, tuned)
        data = {"sample": [], "full test": ["--data-root", args.data_root]}
        jobs = {(key, model, where): (f"{key}_{model}_{where.replace(' ', '_')}",
                                      ["--checkpoint", getattr(args, model), *by_model[model], "--protocol", "other",
                                       "--n-edits", str(args.n_edits), "--seed", str(args.seed), *data[where]])
                for key, _, by_model in rows for where in data for model in ("baseline", "editable")}
        results = dict(zip(jobs, pool.map(lambda job: evaluate(work, *job), jobs.values())))

    lines = [f"## {SECTION}", "",
             f"`python bench/editor_table.py --baseline {args.baseline} --editable {args.editable} --prefix {args.prefix} "
             f"--data-root <CIFAR-10> --n-edits {args.n_edits} --seed {args.seed}` "
             f"({time.strftime('%Y-%m-%d', time.gmtime())}; {machine()}; one-thread runs, {args.jobs} at a time). R protocol, "
             f"N = {args.n_edits} seeded edits (seed {args.seed}), the same images and targets for every row; "
             f"gradient editors edit `{args.prefix}` on both models. Drawdown in points with its 95% interval. As in the "
             "paper's code, the edited image is among the held-out ones: a successful edit moves it to a wrong label, "
             "up to 0.1 point of the sample's drawdown and 0.01 of the full test set's (the local editor's rows).", ""]
    for where in data:
        n = results[(rows[0][0], "baseline", where)]["n_heldout"]
        lines += [f"**{where}** ({n:,} held-out images)", "",
                  "| editor | baseline: test error | drawdown | success | steps | editable: test error | drawdown | "
                  "success | steps | drawdown ratio |", "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
        for key, label, _ in rows:
            b, e = results[(key, "baseline", where)], results[(key, "editable", where)]
            lines.append(f"| {label} | {cell(b)} | {cell(e)} | {ratio(e, b)} |")
        lines.append("")
    lines += [f"Editor learning rates (the tuning rule: the smallest grid lr reaching {TUNED_SUCCESS:.0%} success on "
              f"{args.n_tune} R edits of seed {args.tune_seed}, on the baseline, sample held out):", "",
              "| editor | lr | success | drawdown | steps |", "|---|---:|---:|---:|---:|"]
    for editor, tried in tuning.items():
        for lr, s in tried:
            lines.append(f"| {editor} | {lr:g} | {100 * s['success_rate']:.0f}% | {100 * s['drawdown']:.2f} | {s['mean_steps']:.2f} |")
    lines.append(f"\nEvery run's command and summary: `{args.work}/`.\n")
    text = "\n".join(lines)
    print(text)
    if not args.no_write:
        write_section(SECTION, text, ROOT / args.doc)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
