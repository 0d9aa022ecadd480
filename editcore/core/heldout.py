"""Held-out predictions: the whole model on uint8 images, and the evaluator that caches the activations
entering the first edited stage so that re-evaluating an edit re-runs only the stages after it.

Where bfloat16 runs natively the re-evaluation runs in bfloat16, and float32 settles every row whose
bfloat16 margin is too small, so the predicted classes are float32's. The library, the CLI and the app
all use this one evaluator; `fixers` and `metrics` both build on it (neither imports the other's user).
"""
from __future__ import annotations

import copy
import functools
from collections.abc import Callable

import torch
from torch import nn
from torch.func import functional_call

from .domain import Domain
from .edit import EditableModel, eval_mode, has_tied_tensors, logit_margins, model_domain
from .editors import Params

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


def bfloat16_tolerance(scale: torch.Tensor) -> torch.Tensor:
    """How far a bfloat16 logit difference may be from float32's, per row, for rows whose logits are about `scale`."""
    return MARGIN_ABS + MARGIN_REL * scale.abs()


def unsure_rows(logits: torch.Tensor) -> torch.Tensor:
    """Indices of the rows whose low-precision top-2 margin is too small to trust their argmax."""
    top2 = logits.topk(2, dim=1).values
    return torch.nonzero(top2[:, 0] - top2[:, 1] < bfloat16_tolerance(top2[:, 0])).view(-1)


def mixed_logits(suffix: Callable[[torch.Tensor], torch.Tensor], features: torch.Tensor, batch_size: int,
                 mixed_precision: bool, unsure: Callable[[torch.Tensor], torch.Tensor]) -> tuple[torch.Tensor, int]:
    """(logits, rows recomputed): `suffix` on `features` in batches of `batch_size`; with `mixed_precision` in
    bfloat16, then again in float32 for the rows `unsure(logits)` picks (indices), so their float32 values decide."""
    batches = lambda items: range(0, len(items), batch_size)  # noqa: E731
    with torch.autocast(features.device.type, dtype=torch.bfloat16, enabled=mixed_precision):
        logits = torch.cat([suffix(features[i : i + batch_size]) for i in batches(features)])
    if not mixed_precision:
        return logits, 0
    rows = unsure(logits)
    for i in batches(rows):
        chosen = rows[i : i + batch_size]
        logits[chosen] = suffix(features[chosen])
    return logits, len(rows)


@torch.no_grad()
def settled_margins(editable: EditableModel, features: torch.Tensor, targets: torch.Tensor, thresholds: torch.Tensor,
                    params: Params | None, mixed_precision: bool, batch_size: int = EVAL_BATCH) -> torch.Tensor:
    """Each row's logit margin (`logit_margins`: target minus the best other class) at `params`, from its features
    entering the editable stage, to be compared with its threshold. With `mixed_precision` the margins come from
    bfloat16, and float32 settles every row whose bfloat16 margin lies within `bfloat16_tolerance` of its
    threshold (as `HeldOutEvaluator.logits` settles argmaxes), so each row's side of it is float32's."""
    suffix = lambda inputs: editable.logits_from_features(inputs, params or None).float()  # noqa: E731
    near = lambda logits: torch.nonzero(  # noqa: E731
        (logit_margins(logits, targets) - thresholds).abs() < bfloat16_tolerance(logits.abs().amax(1))).view(-1)
    return logit_margins(mixed_logits(suffix, features, batch_size, mixed_precision, near)[0], targets)


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
            self.features = torch.cat([editable.features(inference_input(images[i : i + batch_size], editable.domain))
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
        with eval_mode(self.editable.model):
            logits, self.recomputed = mixed_logits(suffix, features, self.batch_size, self.mixed_precision, unsure_rows)
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



def inference_input(images: torch.Tensor, domain: Domain) -> torch.Tensor:
    """Normalised uint8 images in channels_last: convolutions run ~25% faster on CPU. HeldOutEvaluator
    builds its cache from the same layout, so cached and full predictions stay identical bit for bit."""
    return domain.normalize(images).contiguous(memory_format=torch.channels_last)


@torch.no_grad()
def full_logits(model: nn.Module, images: torch.Tensor, params: Params | None = None, batch_size: int = 1000) -> torch.Tensor:
    """Logits of the whole model (base + replacement `params`) on uint8 images, batch norm in eval mode."""
    tied, domain = bool(params) and has_tied_tensors(model), model_domain(model)
    with eval_mode(model):
        return torch.cat([
            functional_call(model, params, (inference_input(images[i : i + batch_size], domain),), tie_weights=tied)
            if params else model(inference_input(images[i : i + batch_size], domain))
            for i in range(0, len(images), batch_size)])


