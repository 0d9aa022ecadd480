"""Fine-tuning's settings on the locality benchmark's C protocol (corrections), so it is compared at its best.

C protocol: the edits are test images 1000-9999 that the model misclassifies, each edited to its TRUE label
(`draw_edits(..., targets="corrections")`); the held-out set is the pixel-exact test 0-999, so it never holds
an edited image. Every fix starts from the unedited model (`evaluate_edits` with a `FinetuneFixer`) and is
scored by held-out drawdown (accuracy lost, points), success, generalisation to the 16 augmented views of
the edited image (as `evaluate-edits` does) and the time of the fix itself.

    OMP_NUM_THREADS=1 .venv/bin/python bench/finetune_tuning.py --data-root ../shared/data/cifar10 \
        --checkpoint assets/resnet20_baseline.safetensors --n-edits 50 \
        --setting opt=sgd,lr=1e-3 --setting opt=adam,lr=1e-5,layers=layer3 [--replay sample full]

A setting is comma-separated key=value pairs over the defaults of `FinetuneFixer`
(opt, lr, steps, replay, layers: all or a module prefix such as layer3 or head); unnamed keys keep the
library default. `--replay sample` replays the shipped 2,000-image training sample, `full` the 50,000
training images of the data root. Prints one table row per (checkpoint, replay, setting). Results and the
commands behind them: docs/FIXERS.md, "Fine-tuning at its best (C protocol)".
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from editcore import (EditableModel, FinetuneFixer, HeldOutEvaluator, draw_edits, evaluate_edits,  # noqa: E402
                      full_logits, load_checkpoint, load_cifar10, load_train_sample, resolve_data_root)
from editcore.experiments.fixers import FINETUNE_DEFAULT_LR, FINETUNE_DEFAULTS  # noqa: E402

EXACT_TEST = 1000  # test 0-999 are pixel-exact (held out); 1000-9999 are JPEG decodes (the edit pool)
KEYS = {"opt": "optimizer", "lr": "lr", "steps": "max_steps", "replay": "replay_ratio", "layers": "prefix"}
CASTS = {"optimizer": str, "lr": float, "max_steps": int, "replay_ratio": int, "prefix": lambda v: None if v == "all" else v}


def parse_setting(text: str) -> dict:
    """'opt=adam,lr=1e-5,layers=layer3' -> FinetuneFixer keyword arguments over the library defaults."""
    setting = dict(FINETUNE_DEFAULTS)
    for pair in filter(None, text.split(",")):
        key, _, value = pair.partition("=")
        if key not in KEYS:
            raise SystemExit(f"unknown setting key {key!r}; use {', '.join(KEYS)}")
        setting[KEYS[key]] = CASTS[KEYS[key]](value)
    setting.setdefault("lr", FINETUNE_DEFAULT_LR[setting["optimizer"]])
    return setting


def describe(setting: dict) -> str:
    return (f"{setting['optimizer']} lr {setting['lr']:g}, replay {setting['replay_ratio']}, "
            f"<= {setting['max_steps']} steps, {setting['prefix'] or 'all'}")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-root", default=None, help="CIFAR-10 (default: $EDITLAB_DATA); the protocol needs the full test split")
    p.add_argument("--checkpoint", nargs="+", default=[str(ROOT / "assets" / "resnet20_baseline.safetensors")])
    p.add_argument("--setting", action="append", default=None, help="key=value,... (repeatable; default: the library default)")
    p.add_argument("--replay", nargs="+", default=["sample"], choices=("sample", "full"))
    p.add_argument("--n-edits", type=int, default=50)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--jsonl", default=None, help="append one JSON line per row to this file")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    root = resolve_data_root(args.data_root)
    if root is None:
        raise SystemExit("the C protocol needs the full CIFAR-10 test split: pass --data-root or set EDITLAB_DATA")
    test = load_cifar10("test", root)
    heldout = test.subset(torch.arange(EXACT_TEST))
    pool = test.subset(torch.arange(EXACT_TEST, len(test)))
    replays = {name: load_train_sample() if name == "sample" else load_cifar10("train", root) for name in args.replay}
    settings = [parse_setting(s) for s in (args.setting or [""])]
    print(f"C protocol: {args.n_edits} corrections (seed {args.seed}) from test {EXACT_TEST}-{len(test) - 1}, "
          f"held-out test 0-{EXACT_TEST - 1}; {torch.get_num_threads()} thread(s)", flush=True)
    header = (f"| model | replay | setting | success | drawdown (points) | generalisation | mean steps | "
              f"median ms/fix | mean ms/fix |\n|---|---|---|---|---|---|---|---|---|")
    print(header, flush=True)
    for path in args.checkpoint:
        checkpoint = load_checkpoint(path)
        model = checkpoint.model.eval()
        editable = EditableModel(model, checkpoint.card.get("editable_prefix") or "layer3")
        evaluator = HeldOutEvaluator(editable, heldout.images, heldout.labels)
        rows, _ = draw_edits(pool, args.n_edits, args.seed, targets="corrections",
                             predictions=full_logits(model, pool.images).argmax(1))
        # evaluate_edits draws its own edits; handing it exactly the drawn corrections with their true labels
        # ('true' over all of them) scores the same edits for every setting.
        corrections = pool.subset(rows)
        for replay in args.replay:
            for setting in settings:
                fixer = FinetuneFixer(model, replays[replay], seed=args.seed, **setting)
                started = time.perf_counter()
                summary, records = evaluate_edits(editable, None, evaluator, corrections, n_edits=len(rows),
                                                  seed=args.seed, targets="true", fixer=fixer)
                row = {"model": Path(path).stem, "replay": replay, "setting": describe(setting), **setting,
                       "success": summary["success_rate"], "drawdown_points": 100 * summary["drawdown"],
                       "generalization": summary["generalization"], "mean_steps": summary["mean_steps"],
                       "median_ms": 1000 * statistics.median(r.seconds for r in records),
                       "mean_ms": 1000 * summary["mean_edit_seconds"], "n_edits": len(records),
                       "base_accuracy": 1 - summary["test_error"], "wall_s": time.perf_counter() - started}
                print(f"| {row['model']} | {replay} | {row['setting']} | {100 * row['success']:.0f}% | "
                      f"{row['drawdown_points']:.2f} | {row['generalization']:+.3f} | {row['mean_steps']:.2f} | "
                      f"{row['median_ms']:.0f} | {row['mean_ms']:.0f} |", flush=True)
                if args.jsonl:
                    with open(args.jsonl, "a") as fh:
                        fh.write(json.dumps(row) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
