"""The paper's edit protocol: N seeded edits, each from the unedited model, scored on held-out data.

Re-evaluating held-out images after an edit only re-runs the stages from the first editable one
(`heldout.HeldOutEvaluator` caches their inputs).
"""
from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, ContextManager

import numpy as np
import torch

from ..core.augment_views import DEFAULT_VIEWS_SEED, augmented_views, generalization, view_families
from ..core.data import ImageSet
from ..core.edit import EditableModel
from ..core.editors import Editor
from .fixers import EditorFixer, Fixer
from ..core.heldout import HeldOutEvaluator

if TYPE_CHECKING:
    from .torchrun import Ranks


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


def drawdown_spread(drawdowns: np.ndarray) -> dict:
    """How much the per-edit drawdowns vary: their standard deviation, a 95% interval for their mean (normal
    approximation, mean +- 1.96 sd / sqrt(n)) and the range holding the middle 95% of single edits."""
    n = len(drawdowns)
    sd = float(drawdowns.std(ddof=1)) if n > 1 else 0.0
    half = 1.96 * sd / np.sqrt(n)
    mean = float(drawdowns.mean())
    return {"drawdown_sd": sd, "drawdown_ci95": [mean - half, mean + half],
            "drawdown_middle95": [float(np.percentile(drawdowns, 2.5)), float(np.percentile(drawdowns, 97.5))]}


def summarize(records: list[EditRecord], base_error: float) -> dict:
    """Drawdown = mean error after edit - base error (with its spread, `drawdown_spread`); success rate;
    mean steps; mean edit time."""
    if not records:
        raise ValueError("no edits to summarise")
    errors = np.array([r.error_after for r in records])
    drawdowns = errors - base_error
    summary = {
        "test_error": base_error,
        "drawdown": float(drawdowns.mean()),
        **drawdown_spread(drawdowns),
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


def score_edit(fixer: Fixer, heldout: HeldOutEvaluator, edit_set: ImageSet, row: int, target: int,
               views_seed: int = DEFAULT_VIEWS_SEED, families: list[str] | None = None) -> EditRecord:
    """One edit of the protocol, from the unedited model: fix row `row` of `edit_set` to `target`, then score
    the fixed model on the held-out set and on the image's augmented views (per family with `families`)."""
    device = heldout.features.device
    image = edit_set.images[row : row + 1].to(device)
    result = fixer.fix(image, torch.tensor([target], device=device))
    views = augmented_views(image, views_seed)
    gain, by_family = generalization(fixer.predict(None, views), fixer.predict(result, views), target, families)
    return EditRecord(int(edit_set.indices[row]), target, result.success, result.steps, result.seconds,
                      heldout.error(fixer.predict_heldout(result, heldout)), gain, by_family or None)


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
    ranks: Ranks | None = None,
    predictions: torch.Tensor | None = None,
    hold: Callable[[], ContextManager[tuple[Fixer, HeldOutEvaluator]]] | None = None,
) -> tuple[dict | None, list[EditRecord]]:
    """Run the protocol with `fixer` (default: the editor, `max_steps` steps). Each edit is also
    scored for generalisation on `augmented_views` of the edited image (per family if `verbose`).

    With `ranks` (several processes under torchrun), every rank draws the same seeded edits and runs
    its share; rank 0 gathers the records in draw order and returns the summary, the others (None, []).
    `predictions`: the model's classes on `edit_set`, which targets='corrections' draws from.
    `hold`: entered around each edit, it gives the (fixer, held-out evaluator) that edit runs on, so a
    server can lend one of a model's identical replicas per edit (editcore.lab.measure); default: `fixer` and
    `heldout` for every edit. `progress(done, total)` after each edit; an exception it raises stops the run."""
    fixer = fixer or EditorFixer(editable, editor, max_steps)
    hold = hold or (lambda: contextlib.nullcontext((fixer, heldout)))
    families = view_families(views_seed) if verbose else None
    rows, chosen = draw_edits(edit_set, n_edits, seed, targets, len(editable.domain.classes), predictions)
    positions = range(len(rows)) if ranks is None else ranks.share(len(rows))
    records, start = [], time.perf_counter()
    for done, position in enumerate(positions, 1):
        with hold() as (edit_fixer, edit_heldout):
            records.append(score_edit(edit_fixer, edit_heldout, edit_set, rows[position], chosen[position], views_seed,
                                      families))
        if progress:
            progress(done, len(positions))
    if ranks is not None:
        records = ranks.gather(list(positions), records)
        if records is None:
            return None, []
    summary = summarize(records, heldout.base_error)
    summary.update(n_heldout=len(heldout.labels), seconds=round(time.perf_counter() - start, 2), seed=seed,
                   max_steps=max_steps, targets=targets, fixer=fixer.name, fixer_hparams=fixer.hyperparameters(),
                   views_seed=views_seed, precision=heldout.precision, world_size=ranks.world_size if ranks else 1)
    return summary, records
