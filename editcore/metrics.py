"""The paper's edit protocol: N seeded edits, each from the unedited model, scored on held-out data.

Re-evaluating held-out images after an edit only re-runs the stages from the first editable one:
their inputs (`HeldOutEvaluator.features`) are computed once and cached. Where bfloat16 runs natively
the re-evaluation runs in bfloat16, and float32 settles every row whose bfloat16 margin is too small,
so the predicted classes are float32's. The library, the CLI and the app all use this one evaluator.
"""
from __future__ import annotations

import contextlib
import copy
import functools
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, ContextManager

import numpy as np
import torch

from .augment_views import DEFAULT_VIEWS_SEED, augmented_views, generalization, view_families
from .data import ImageSet
from .edit import EditableModel, eval_mode
from .editors import Editor, Params
from .fixers import EditorFixer, Fixer, full_logits, inference_input

if TYPE_CHECKING:
    from .torchrun import Ranks

# Rows per batch of held-out re-evaluation: at M = 10,000 on a 2-core CPU, 1000 took 1.3x less CPU than
# 2500 (bench/protocol_speed.py, docs/PERFORMANCE.md); a smaller batch's activations stay in cache.
EVAL_BATCH = 1000
# bfloat16's error on these logits is about 0.4% of the largest one. A row whose bfloat16 top-2 logit
# margin is below MARGIN_ABS + MARGIN_REL * |top logit| is recomputed in float32 (tests compare with
# float32 exactly, rows near the margin included).
MARGIN_ABS, MARGIN_REL = 0.3, 0.03


def native_bfloat16(device: torch.device | str) -> bool:
    """True where bfloat16 is faster than float32: a CPU whose oneDNN kernels run it natively
    (AVX512-BF16, AMX), or a CUDA GPU that supports it (Ampere and later). oneDNN also accepts bfloat16 on
    any AVX-512 CPU, where it emulates it: on an Ice Lake Xeon (AVX-512, neither of those) the mixed-precision
    re-evaluation took twice float32's CPU time (docs/PERFORMANCE.md), so an x86 CPU must list the instructions."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    if device.type != "cpu" or not torch.backends.mkldnn.is_available():
        return False
    try:
        supported = bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False
    flags = x86_cpu_flags()
    return supported and (flags is None or bool(flags & {"avx512_bf16", "amx_bf16"}))


@functools.cache
def x86_cpu_flags() -> frozenset[str] | None:
    """The x86 CPU's feature flags (Linux's /proc/cpuinfo), or None where they cannot be read (another OS,
    another architecture: oneDNN's answer stands there)."""
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("flags"):
                    return frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    return None


def unsure_rows(logits: torch.Tensor) -> torch.Tensor:
    """Indices of the rows whose low-precision top-2 margin is too small to trust their argmax."""
    top2 = logits.topk(2, dim=1).values
    return torch.nonzero(top2[:, 0] - top2[:, 1] < MARGIN_ABS + MARGIN_REL * top2[:, 0].abs()).view(-1)


class HeldOutEvaluator:
    """Predictions on a fixed held-out set for the base model and for any edited params.

    mixed_precision None: bfloat16 with float32 for unsure rows where `native_bfloat16`, else float32.
    """

    def __init__(self, editable: EditableModel, images: torch.Tensor, labels: torch.Tensor,
                 batch_size: int = EVAL_BATCH, mixed_precision: bool | None = None):
        self.editable = editable
        self.labels = labels
        self.batch_size = batch_size
        self.images = images
        with torch.no_grad(), eval_mode(editable.model):
            self.features = torch.cat([editable.features(inference_input(images[i : i + batch_size]))
                                       for i in range(0, len(labels), batch_size)])
        self.mixed_precision = native_bfloat16(self.features.device) if mixed_precision is None else mixed_precision
        self.recomputed = 0  # rows the last `logits` call recomputed in float32
        self.base_predictions = self.predict()

    def on(self, editable: EditableModel) -> "HeldOutEvaluator":
        """The same evaluator (its cached features and base predictions shared) on a copy of the model."""
        twin = copy.copy(self)
        twin.editable, twin.recomputed = editable, 0
        return twin

    @property
    def precision(self) -> str:
        return "bfloat16, float32 for low-margin rows" if self.mixed_precision else "float32"

    @torch.no_grad()
    def logits(self, params: Params | None = None, rows: slice = slice(None)) -> torch.Tensor:
        """Logits (rows, classes) from the cached features (float32 dtype), of all rows or of the range `rows`.
        With `mixed_precision`, computed in bfloat16 except the rows `unsure_rows` picks, recomputed in float32:
        argmax is float32's. A range that starts at a multiple of `batch_size` runs the very batches a call for
        all rows runs, so in float32 ranges put together give the same logits bit for bit."""
        features = self.features[rows]
        suffix = lambda inputs: self.editable.logits_from_features(inputs, params or None).float()  # noqa: E731
        batches = lambda items: range(0, len(items), self.batch_size)  # noqa: E731
        with eval_mode(self.editable.model):
            with torch.autocast(features.device.type, dtype=torch.bfloat16, enabled=self.mixed_precision):
                logits = torch.cat([suffix(features[i : i + self.batch_size]) for i in batches(features)])
            if self.mixed_precision:
                unsure = unsure_rows(logits)
                for i in batches(unsure):
                    chosen = unsure[i : i + self.batch_size]
                    logits[chosen] = suffix(features[chosen])
                self.recomputed = len(unsure)
        return logits

    @torch.no_grad()
    def predict(self, params: Params | None = None) -> torch.Tensor:
        """Predicted classes from the cached features (re-runs only the stages after the split);
        through the whole model when `params` change a stage before the split (e.g. fine-tuning)."""
        if params and self.editable.model.first_stage_of(list(params)) < self.editable.split:
            return self.predict_full(params)
        return self.logits(params).argmax(1)

    @torch.no_grad()
    def predict_full(self, params: Params | None = None) -> torch.Tensor:
        """The same predictions through the whole model in float32 (reference for the cache; slower)."""
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
    server can lend one of a model's identical replicas per edit (editcore.measure); default: `fixer` and
    `heldout` for every edit. `progress(done, total)` after each edit; an exception it raises stops the run."""
    fixer = fixer or EditorFixer(editable, editor, max_steps)
    hold = hold or (lambda: contextlib.nullcontext((fixer, heldout)))
    families = view_families(views_seed) if verbose else None
    rows, chosen = draw_edits(edit_set, n_edits, seed, targets, predictions=predictions)
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
