"""Locality benchmark: what an edit costs the rest of the model, on three protocols.

- R: the paper's: a random image to a random target != its true label.
- C: corrections: an image the model gets wrong, to its true label.
- S: sessions: K corrections one after another without reset, kept or rolled back by the app's rule (an
  edit that misses its target or would undo an earlier correction is rolled back); after each, held-out
  accuracy, how many kept corrections still hold, and each correction's generalisation to its augmented views;
  at the end, how many of the K asked for the model gets right (`held`).

Every method sees the same seeded edits. Held-out images never include an edited one: with a data root,
edits come from test 1000-9999 and the held-out set is the pixel-exact test 0-999 (`--heldout full`:
all 10,000 test images, each edit scored without the images it edited); without one, both come from
the embedded sample and each edit is scored without its own image. Corrections are drawn from images
that every `--checkpoint` (or `--corrections-of`) gets wrong, so models are compared on the same corrections;
a model scored on other models' corrections may already get some right (no step, no drop): the summary
counts those (`already`) and gives the mean drop over the others (`drop_needed`).

    python bench/locality.py --data-root ../shared/data/cifar10 --protocols R C S20 --n 100 \\
        --method rmsprop@layer3 --method local@layer3.0.conv1

A method is EDITOR@LAYERS[,key=value...]: EDITOR is a gradient editor (rmsprop, gd, momentum, adam;
keys lr, steps) or `local` (editcore.core.locality; keys energy, margin, copies, steps, keep=0/1 for
session constraints, protect=S to keep steps away from earlier corrections' inputs, anchors=N (the training sample's first N
images instead of the statistics stored for the model, `--anchor-stats`), ridge=R for the soft
projector, guard=N: in a session, the N training-sample images with the smallest base margins join each edit's kept
rows, each keeping the base model's class (`LocalEditor.guard_rows`; default DEFAULT_GUARD as the page, 0: none)). Prints one table; `--json FILE` writes every number.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from editcore import (EditableModel, HeldOutEvaluator, ImageSet, augmented_views, create_editor, edit,  # noqa: E402
                      load_checkpoint, load_cifar10, load_train_sample, normalize, resolve_data_root)
from editcore.core.anchor_stats import shipped_covariances  # noqa: E402
from editcore.core.heldout import full_logits  # noqa: E402
from editcore.core.locality import (DEFAULT_COPIES, DEFAULT_ENERGY, DEFAULT_GUARD, DEFAULT_MARGIN,  # noqa: E402
                                    DEFAULT_MAX_STEPS, AnchorSubspace, LocalEditor, local_edit, local_weight_names,
                                    with_guard)
from editcore.experiments.metrics import draw_edits  # noqa: E402

EXACT_TEST = 1000  # test images 0-999 are pixel-exact in the project's copy of CIFAR-10
ROOT = Path(__file__).resolve().parent.parent


@dataclass
class Method:
    spec: str
    editor: str
    layers: str
    options: dict = field(default_factory=dict)

    @classmethod
    def parse(cls, spec: str) -> "Method":
        head, *pairs = spec.split(",")
        editor, _, layers = head.partition("@")
        options = {}
        for pair in pairs:
            key, _, value = pair.partition("=")
            options[key] = float(value)
        return cls(spec, editor, layers or "layer3", options)


class Runner:
    """One method on one model: edit(x, target, params, keep) and predictions, all from cached features."""

    def __init__(self, method: Method, model, anchors: ImageSet, device, stats_dir: Path | None = None):
        self.method, self.model = method, model
        self.editable = EditableModel(model, method.layers)
        opts = method.options
        self.steps = int(opts.get("steps", DEFAULT_MAX_STEPS if method.editor == "local" else 20))
        if method.editor == "local":
            # As the page: the statistics stored for these weights unless anchors=N asks for the sample's first N.
            stored = None if "anchors" in opts else shipped_covariances(model, local_weight_names(self.editable), stats_dir)
            count = int(opts.get("anchors", len(anchors)))
            self.subspace = AnchorSubspace(self.editable, None if stored else normalize(anchors.images[:count].to(device)),
                                           energy=opts.get("energy", DEFAULT_ENERGY), ridge=opts.get("ridge"),
                                           covariances=stored and stored[0], about=stored and stored[1])
            # As the page: the guard's anchor images (LocalEditor.guard_rows; guard=0 turns it off).
            self.guard = LocalEditor(guard=int(opts.get("guard", DEFAULT_GUARD))).guard_rows(self.editable) \
                if opts.get("guard", DEFAULT_GUARD) else None
        else:
            self.editor = create_editor(method.editor, lr=opts.get("lr")).to(device)

    def edit(self, image: torch.Tensor, target: int, params, keep: list[tuple[torch.Tensor, int]]):
        x, t = normalize(image), torch.tensor([target], device=image.device)
        if self.method.editor != "local":
            return edit(self.editable, x, t, self.editor, self.steps, params=params or None)
        opts = self.method.options
        keep_inputs = keep_targets = keep_features = keep_margins = None
        if keep and opts.get("keep", 1):
            keep_inputs = normalize(torch.cat([k[0] for k in keep]))
            keep_targets = torch.tensor([k[1] for k in keep], device=image.device)
        if self.guard is not None and keep_inputs is not None:  # as LocalEditor: the session's corrections, then the guard
            with torch.no_grad():
                kept = self.editable.features(keep_inputs)
            keep_features, keep_targets, keep_margins = with_guard(kept, keep_targets, self.guard)
            keep_inputs = None
        return local_edit(self.editable, x, t, self.subspace, self.steps, opts.get("margin", DEFAULT_MARGIN),
                          int(opts.get("copies", DEFAULT_COPIES)), params or None, keep_inputs, keep_targets,
                          keep_features=keep_features, protect=opts.get("protect", 0.0), keep_margins=keep_margins)

    def predict(self, images: torch.Tensor, params) -> torch.Tensor:
        return full_logits(self.model, images, params or None).argmax(1)


def not_edited(indices: torch.Tensor, exclude: set[int], device) -> torch.Tensor:
    """Mask of the held-out rows whose test index (`indices`) is not an edited image's."""
    return torch.tensor([int(i) not in exclude for i in indices], device=device)


def accuracy(heldout: HeldOutEvaluator, indices: torch.Tensor, predictions: torch.Tensor, exclude: set[int]) -> float:
    """Held-out accuracy over the rows whose test index (`indices`) is not an edited image's."""
    mask = not_edited(indices, exclude, predictions.device)
    return float((predictions[mask] == heldout.labels[mask]).float().mean())


def views_at_target(runner: Runner, image: torch.Tensor, target: int, params) -> float:
    views = augmented_views(image[0])
    return float((runner.predict(views, params) == target).float().mean())


def single_edits(runner: Runner, heldout: HeldOutEvaluator, indices, edits: ImageSet, rows, targets) -> list[dict]:
    records = []
    for row, target in zip(rows, targets):
        image = edits.images[row : row + 1]
        exclude = {int(edits.indices[row])}
        result = runner.edit(image, target, {}, [])
        before = accuracy(heldout, indices, heldout.base_predictions, exclude)
        after = accuracy(heldout, indices, heldout.predict(result.params), exclude)
        gain = views_at_target(runner, image, target, result.params) - views_at_target(runner, image, target, {})
        records.append({"index": int(edits.indices[row]), "target": int(target), "success": result.success,
                        "steps": result.steps, "seconds": result.seconds, "drop": 100 * (before - after),
                        "generalization": gain})
    return records


def session(runner: Runner, heldout: HeldOutEvaluator, indices, edits: ImageSet, rows, targets, score_every: int = 1) -> dict:
    """K corrections in a row, kept as the app keeps them (EditSession.apply): an edit that does not reach
    its target, or that would leave an earlier kept correction wrong, is rolled back. `held` counts, of all K
    corrections asked for, those the final model predicts right; `kept_curve` the kept ones holding after each.
    `accuracy_curve` is scored after every `score_every`-th correction and after the last (None elsewhere), so a
    long session on the full test set does not pay a 10,000-image re-evaluation per correction. `change_curve`: the
    session's total change after each correction, |sum of its edits| / |edited weights| (a change budget's measure).
    `views_before` / `generalization_curve`: per correction, the share of its augmented views at the target before it,
    and the gain it made (0 when rolled back), whose mean is `generalization`. Later in a session `views_before`
    rises (earlier corrections carry over to new images), so the gain falls while the views reached do not:
    `views_base` is each share under the unedited model, `generalization_from_base` the mean of (reached - base).
    `views_at_end`: each correction's share under the session's final model (do later edits wear it away?)."""
    params, keep, curve, kept, gains, successes, rolled_back, seconds, changes = {}, [], [], [], [], [], [], [], []
    views_before, views_base = [], []
    base_params = runner.editable.frozen_base_params()
    exclude = {int(edits.indices[r]) for r in rows}
    base = accuracy(heldout, indices, heldout.base_predictions, exclude)
    for position, (row, target) in enumerate(zip(rows, targets), 1):
        image = edits.images[row : row + 1]
        before = views_at_target(runner, image, target, params)
        views_before.append(before)
        views_base.append(views_at_target(runner, image, target, {}))
        result = runner.edit(image, target, params, keep)
        successes.append(result.success)
        seconds.append(result.seconds)
        slipped = bool(keep) and not bool((runner.predict(torch.cat([k[0] for k in keep]), result.params).cpu()
                                           == torch.tensor([k[1] for k in keep])).all())
        rolled_back.append(not result.success or slipped)
        if not rolled_back[-1]:
            params = result.params
            keep.append((image, int(target)))
        gains.append(views_at_target(runner, image, target, params) - before)
        scored = position % score_every == 0 or position == len(rows)
        if scored:  # the last position always is: `predictions` ends as the final model's
            predictions = heldout.predict(params)
        curve.append(accuracy(heldout, indices, predictions, exclude) if scored else None)
        kept.append(int((runner.predict(torch.cat([k[0] for k in keep]), params).cpu() ==
                         torch.tensor([k[1] for k in keep])).sum()) if keep else 0)
        changes.append(relative_change(params, base_params))
    asked = edits.images[torch.as_tensor(rows)]
    held = int((runner.predict(asked, params).cpu() == torch.as_tensor(targets).cpu()).sum())
    at_end = [views_at_target(runner, edits.images[row : row + 1], target, params) for row, target in zip(rows, targets)]
    # The final drop split into held-out images the session fixed and broke, and the classes the broken ones went to.
    others = not_edited(indices, exclude, predictions.device)
    final, was = predictions[others], heldout.base_predictions[others]
    right_before, right_after = was == heldout.labels[others], final == heldout.labels[others]
    broken_to = torch.bincount(final[right_before & ~right_after].cpu(), minlength=10).tolist()
    return {"base_accuracy": base, "accuracy_curve": curve, "kept_curve": kept, "final_drop": 100 * (base - curve[-1]),
            "kept": kept[-1], "held": held, "rolled_back": sum(rolled_back), "n": len(rows),
            "success_rate": sum(successes) / len(successes), "generalization": statistics.mean(gains),
            "edit_seconds": seconds, "change_curve": changes, "views_before": views_before, "generalization_curve": gains,
            "views_base": views_base, "views_at_end": at_end, "heldout_fixed": int((~right_before & right_after).sum()),
            "heldout_broken": int((right_before & ~right_after).sum()), "broken_to_class": broken_to,
            "targets_per_class": torch.bincount(torch.as_tensor(targets), minlength=10).tolist(),
            "generalization_from_base": statistics.mean(b + g - b0 for b, g, b0 in zip(views_before, gains, views_base))}


def relative_change(params, base_params) -> float:
    """|params - base| / |base| over the tensors `params` replaces (0 for the unedited model)."""
    if not params:
        return 0.0
    moved = sum(float((params[n] - base_params[n]).double().pow(2).sum()) for n in params)
    return (moved / sum(float(base_params[n].double().pow(2).sum()) for n in params)) ** 0.5


def summarize(records: list[dict]) -> dict:
    """Means over the edits. `already`: edits the model needed no step for (it already predicted the
    target: with corrections drawn from other models' mistakes, a model may not share them); `drop_needed`:
    the mean drop over the others, the edits that changed the model."""
    needed = [r["drop"] for r in records if r["steps"] > 0]
    return {"n": len(records), "drop": statistics.mean(r["drop"] for r in records),
            "already": len(records) - len(needed), "drop_needed": statistics.mean(needed) if needed else None,
            "success_rate": statistics.mean(float(r["success"]) for r in records),
            "steps": statistics.mean(r["steps"] for r in records),
            "edit_ms_median": 1000 * statistics.median(r["seconds"] for r in records),
            "generalization": statistics.mean(r["generalization"] for r in records)}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-root", default=None)
    parser.add_argument("--checkpoint", action="append", default=None,
                        help="default: assets/resnet20_baseline.safetensors and assets/resnet20_editable.safetensors")
    parser.add_argument("--corrections-of", action="append", default=None,
                        help="checkpoints whose shared mistakes the C and S corrections come from (default: --checkpoint's; "
                             "give the same list to runs that are compared)")
    parser.add_argument("--method", action="append", default=None, help="EDITOR@LAYERS[,key=value...] (repeat)")
    parser.add_argument("--protocols", nargs="+", default=["R", "C", "S20"], help="R, C, S<K> (e.g. S20 S50)")
    parser.add_argument("--n", type=int, default=100, help="edits per single-edit protocol")
    parser.add_argument("--sessions", type=int, default=3, help="seeded sessions per S protocol")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--heldout", default="exact", choices=["exact", "full"])
    parser.add_argument("--threads", type=int, default=0)
    parser.add_argument("--anchor-stats", type=Path, default=None,
                        help="the local editor's stored anchor statistics from this folder (default: assets/anchor_stats)")
    parser.add_argument("--score-every", type=int, default=1, help="S: held-out accuracy after every K-th correction")
    parser.add_argument("--json", default=None, help="write every record here")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device("cpu")
    checkpoints = args.checkpoint or [str(ROOT / "assets/resnet20_baseline.safetensors"),
                                      str(ROOT / "assets/resnet20_editable.safetensors")]
    methods = [Method.parse(m) for m in (args.method or ["rmsprop@layer3", "local@layer3.0.conv1"])]
    test = load_cifar10("test", args.data_root)
    has_root = resolve_data_root(args.data_root) is not None
    if has_root:
        edits = test.subset(range(EXACT_TEST, len(test)))
        heldout_set = test if args.heldout == "full" else test.subset(range(EXACT_TEST))
    else:
        edits, heldout_set = test, test
    anchors = load_train_sample()  # the local editor's anchors in the product, with or without a data root
    models = {Path(c).stem: load_checkpoint(c, device).model.eval() for c in checkpoints}
    mistakes = torch.ones(len(edits), dtype=torch.bool)
    for path in args.corrections_of or checkpoints:
        mistakes &= (full_logits(load_checkpoint(path, device).model.eval(), edits.images).argmax(1) != edits.labels)
    wrong_predictions = torch.where(mistakes, (edits.labels + 1) % 10, edits.labels)
    draws = {"R": draw_edits(edits, args.n, args.seed, "other"),
             "C": draw_edits(edits, args.n, args.seed, "corrections", predictions=wrong_predictions)}
    print(f"edit source: {edits.source} ({len(edits)} images, {int(mistakes.sum())} wrong for every model); "
          f"held-out: {len(heldout_set)} images; anchors: {len(anchors)} training images, or the statistics stored for "
          f"the model", flush=True)
    results = []
    for name, model in models.items():
        for method in methods:
            started = time.perf_counter()
            runner = Runner(method, model, anchors, device, args.anchor_stats)
            heldout = HeldOutEvaluator(runner.editable, heldout_set.images, heldout_set.labels)
            row = {"model": name, "method": method.spec}
            if method.editor == "local":
                row["anchors"] = runner.subspace.about
            for protocol in args.protocols:
                if protocol in draws:
                    records = single_edits(runner, heldout, heldout_set.indices, edits, *draws[protocol])
                    row[protocol] = {**summarize(records), "records": records}
                elif protocol.startswith("S"):
                    k = int(protocol[1:])
                    row[protocol] = [session(runner, heldout, heldout_set.indices, edits,
                                             *draw_edits(edits, k, args.seed + 1000 + s, "corrections", predictions=wrong_predictions),
                                             score_every=args.score_every)
                                     for s in range(args.sessions)]
            row["seconds"] = time.perf_counter() - started
            results.append(row)
            print(format_row(row, args.protocols), flush=True)
            if args.json:  # after every row, so a long run that is stopped keeps what it measured
                Path(args.json).write_text(json.dumps({"argv": sys.argv[1:], "results": results}, indent=1))
    return 0


def format_row(row: dict, protocols) -> str:
    parts = [f"{row['model']:<22} {row['method']:<40}"]
    for protocol in protocols:
        value = row.get(protocol)
        if isinstance(value, dict):
            needed = ""
            if value.get("already"):  # the mean drop over the edits that took a step
                needed = (f" ({value['drop_needed']:.2f} over the {value['n'] - value['already']} that took a step)"
                          if value["drop_needed"] is not None else " (all already at the target)")
            parts.append(f"{protocol}: drop {value['drop']:5.2f}{needed} succ {value['success_rate']:.2f} "
                         f"steps {value['steps']:.1f} gen {value['generalization']:+.2f} {value['edit_ms_median']:.0f}ms")
        elif isinstance(value, list):
            drops = [s["final_drop"] for s in value]
            parts.append(f"{protocol}: drop {statistics.mean(drops):5.2f} (worst {max(drops):.2f}) "
                         f"held {min(s['held'] for s in value)}-{max(s['held'] for s in value)}/{value[0]['n']} "
                         f"rolled back {sum(s['rolled_back'] for s in value)} "
                         f"gen {statistics.mean(s['generalization'] for s in value):+.2f} "
                         f"(from the unedited model {statistics.mean(s['generalization_from_base'] for s in value):+.2f})")
    parts.append(f"[{row['seconds']:.0f}s]")
    return " | ".join(parts)


if __name__ == "__main__":
    sys.exit(main())
