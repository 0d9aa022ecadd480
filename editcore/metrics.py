"""The paper's edit protocol: N seeded edits, each from the unedited model, scored on held-out data.

Re-evaluating held-out images after an edit only re-runs the stages from the first editable one:
their inputs (`HeldOutEvaluator.features`) are computed once and cached.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch

from .augment_views import DEFAULT_VIEWS_SEED, augmented_views, generalization, view_families
from .data import ImageSet
from .edit import EditableModel, eval_mode
from .editors import Editor, Params
from .fixers import EditorFixer, Fixer, full_logits, inference_input


class HeldOutEvaluator:
    """Predictions on a fixed held-out set for the base model and for any edited params."""

    def __init__(self, editable: EditableModel, images: torch.Tensor, labels: torch.Tensor, batch_size: int = 2500):
        self.editable = editable
        self.labels = labels
        self.batch_size = batch_size
        self.images = images
        with torch.no_grad(), eval_mode(editable.model):
            self.features = torch.cat([editable.features(inference_input(images[i : i + batch_size]))
                                       for i in range(0, len(labels), batch_size)])
        self.base_predictions = self.predict()

    @torch.no_grad()
    def predict(self, params: Params | None = None) -> torch.Tensor:
        """Predicted classes from the cached features (re-runs only the stages after the split);
        through the whole model when `params` change a stage before the split (e.g. fine-tuning)."""
        if params and self.editable.model.first_stage_of(list(params)) < self.editable.split:
            return self.predict_full(params)
        with eval_mode(self.editable.model):
            return torch.cat([self.editable.logits_from_features(self.features[i : i + self.batch_size], params).argmax(1)
                              for i in range(0, len(self.labels), self.batch_size)])

    @torch.no_grad()
    def predict_full(self, params: Params | None = None) -> torch.Tensor:
        """The same predictions through the whole model (reference for the cache; slower)."""
        return full_logits(self.editable.model, self.images, params, self.batch_size).argmax(1)

    def error(self, predictions: torch.Tensor) -> float:
        return float((predictions != self.labels).float().mean())

    @property
    def base_error(self) -> float:
        return self.error(self.base_predictions)


@dataclass
class EditRecord:
    index: int  # position of the edited image in the edit source
    target: int
    success: bool
    steps: int
    seconds: float
    error_after: float
    generalization: float | None = None  # frac of augmented views at the target, after - before
    generalization_by_family: dict[str, float] | None = None


def summarize(records: list[EditRecord], base_error: float) -> dict:
    """Drawdown = mean error after edit - base error; success rate; mean steps; mean edit time."""
    if not records:
        raise ValueError("no edits to summarise")
    errors = np.array([r.error_after for r in records])
    summary = {
        "test_error": base_error,
        "drawdown": float(errors.mean() - base_error),
        "success_rate": float(np.mean([r.success for r in records])),
        "mean_steps": float(np.mean([r.steps for r in records])),
        "mean_edit_seconds": float(np.mean([r.seconds for r in records])),
        "n_edits": len(records),
    }
    scored = [r for r in records if r.generalization is not None]
    if scored:
        summary["generalization"] = float(np.mean([r.generalization for r in scored]))
    by_family = [r.generalization_by_family for r in scored if r.generalization_by_family]
    if by_family:
        summary["generalization_by_family"] = {f: float(np.mean([b[f] for b in by_family])) for f in by_family[0]}
    return summary


TARGET_KINDS = ("random", "other", "true", "corrections")


def draw_edits(edit_set: ImageSet, n_edits: int, seed: int, targets: str = "random", classes: int = 10,
               predictions: torch.Tensor | None = None):
    """Seeded (row, target) pairs.

    'random': uniform over all classes, so a target may equal the true label (the paper's code; such an
    edit succeeds in 0 steps). 'other': uniform over the nine other classes (the locality benchmark's R).
    'true': true labels. 'corrections': rows the model gets wrong (`predictions`, one per row), each to
    its true label (the locality benchmark's C); at most as many as there are mistakes.
    """
    if targets not in TARGET_KINDS:
        raise ValueError(f"targets must be one of {TARGET_KINDS}, not {targets!r}")
    gen = torch.Generator().manual_seed(seed)
    if targets == "corrections":
        if predictions is None or len(predictions) != len(edit_set):
            raise ValueError("'corrections' needs the model's predictions, one per row of the edit set")
        wrong = torch.nonzero(predictions.cpu() != edit_set.labels.cpu()).view(-1)
        rows = wrong[torch.randperm(len(wrong), generator=gen)[:n_edits]]
        return rows.tolist(), edit_set.labels.cpu()[rows].tolist()
    n = min(n_edits, len(edit_set)) if targets == "true" else n_edits
    rows = torch.randperm(len(edit_set), generator=gen)[:n] if n <= len(edit_set) else \
        torch.randint(0, len(edit_set), (n,), generator=gen)
    if targets == "random":
        chosen = torch.randint(0, classes, (n,), generator=gen)
    elif targets == "other":
        chosen = (edit_set.labels.cpu()[rows] + torch.randint(1, classes, (n,), generator=gen)) % classes
    else:
        chosen = edit_set.labels.cpu()[rows]
    return rows.tolist(), chosen.tolist()


def evaluate_edits(
    editable: EditableModel,
    editor: Editor,
    heldout: HeldOutEvaluator,
    edit_set: ImageSet,
    n_edits: int = 1000,
    seed: int = 0,
    max_steps: int = 10,
    targets: str = "random",
    fixer: Fixer | None = None,
    progress: Callable[[int, int], None] | None = None,
    views_seed: int = DEFAULT_VIEWS_SEED,
    verbose: bool = False,
) -> tuple[dict, list[EditRecord]]:
    """Run the protocol with `fixer` (default: the editor, `max_steps` steps). Each edit is also
    scored for generalisation on `augmented_views` of the edited image (per family if `verbose`)."""
    device = heldout.features.device
    fixer = fixer or EditorFixer(editable, editor, max_steps)
    families = view_families(views_seed)
    rows, chosen = draw_edits(edit_set, n_edits, seed, targets)
    records, start = [], time.perf_counter()
    for i, (row, target) in enumerate(zip(rows, chosen)):
        image = edit_set.images[row : row + 1].to(device)
        result = fixer.fix(image, torch.tensor([target], device=device))
        views = augmented_views(image, views_seed)
        gain, by_family = generalization(fixer.predict(None, views), fixer.predict(result, views), target,
                                         families if verbose else None)
        records.append(EditRecord(int(edit_set.indices[row]), target, result.success, result.steps, result.seconds,
                                  heldout.error(fixer.predict_heldout(result, heldout)), gain, by_family or None))
        if progress:
            progress(i + 1, len(rows))
    summary = summarize(records, heldout.base_error)
    summary.update(n_heldout=len(heldout.labels), seconds=round(time.perf_counter() - start, 2), seed=seed,
                   max_steps=max_steps, targets=targets, fixer=fixer.name, fixer_hparams=fixer.hyperparameters(),
                   views_seed=views_seed)
    return summary, records
