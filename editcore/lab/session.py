"""Interactive editing: one user's stack of edits over a base model that every user shares.

A `SharedModel` is loaded once per checkpoint: the base module, the editor it learned (editable
training, if any), and held-out evaluators that cache the activations entering the first edited stage.
An `EditSession` holds only what one user changed: a stack of replacement-parameter dicts (one per
applied edit), the held-out probabilities under each, and the history. Apply pushes, undo pops,
reset clears; the base weights never change.

`torch.func.functional_call` swaps a module's parameters while it runs, so two threads must never
run the same module at the same time: every computation holds one of the model's replicas
(`SharedModel.replica`), identical copies that let as many edits run at once as there are replicas.
"""
from __future__ import annotations

import base64
import contextlib
import copy
import functools
import hashlib
import itertools
import json
import math
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Iterator

import torch

from ..core.augment_views import augmented_views, view_specs
from ..core.checkpoint import Checkpoint, load_checkpoint, save_checkpoint
from ..core.data import ImageSet
from ..core.domain import CIFAR10
from ..core.device import arithmetic, arithmetic_differences
from ..core.edit import EditableModel, edit, eval_mode, model_domain
from ..core.editors import EDITORS, Editor, Params, create_editor
from ..core.locality import DEFAULT_EDITOR
from ..core.heldout import EVAL_BATCH, HeldOutEvaluator, full_logits, native_bfloat16
from ..core.models import default_editable_prefix, weight_layer_names

LOG_FORMAT = "editlab-edit-log"
LOG_VERSION = 2  # 2: "arithmetic"; held-out figures leave out the images the session edited
READ_LOG_VERSIONS = (1, 2)
MAX_STEPS_LIMIT = 500
MAX_LR = 10.0
MAX_EDITS_PER_SESSION = 200  # each applied edit keeps one parameter dict and one set of probabilities
MAX_LOG_BYTES = 20_000_000
ROW_BYTES = 36  # a held-out row in a flip list: an 8-byte pointer and a 28-byte int
BASE64_BYTES_PER_PIXEL = 4  # an edited image's pixels in base64: 4 characters per 3 bytes (one RGB pixel)
PREDICTION_BYTES = 8  # a held-out row's predicted class (int64), kept per state
# An edit scores these held-out rows first and reports them on their own: CIFAR-10 test images 0-999 are the
# pixel-exact ones (the embedded sample), so a page on the 10,000 images has their figures in a tenth of the time.
FIRST_SCORED_ROWS = EVAL_BATCH


class SettingsError(ValueError):
    """A hyper-parameter or request the session refuses; the message says what to change."""


@dataclass(frozen=True)
class ImageRef:
    """Where an edited image came from: a browse source name and the row in it."""

    source: str
    index: int


def _number(value, name: str) -> float:
    if isinstance(value, bool):
        raise SettingsError(f"{name} must be a number, got {value!r}")
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise SettingsError(f"{name} must be a number, got {value!r}") from None
    if not math.isfinite(number):
        raise SettingsError(f"{name} must be a finite number, got {value!r}")
    return number


def whole_number(value, name: str) -> int:
    """`value` as an int if it is a finite whole number (2.0 yes, 2.5 / 'abc' / NaN no); else SettingsError."""
    number = _number(value, name)
    if number != int(number):
        raise SettingsError(f"{name} must be a whole number, got {value!r}")
    return int(number)


def _tensor_bytes(tensors) -> int:
    return sum(t.nbytes for t in tensors)


def _all_finite(result) -> bool:
    """False when an edit's loss or parameters went NaN / infinite (then it must not be kept)."""
    return all(math.isfinite(loss) for loss in result.losses) and \
        all(bool(torch.isfinite(p).all()) for p in result.params.values())


@dataclass(frozen=True)
class EditSettings:
    """How to edit. editor None: the page's default (DEFAULT_EDITOR); lr None: the editor's default
    (tuned) rate, the same for every model; max_steps None: the editor's default; layers '': the
    editor's default layers (the local editor's convs), else the checkpoint's editable layers;
    max_drop None: no guardrail, else the largest held-out accuracy drop (percentage points) an edit
    may cause and be kept."""

    editor: str | None = DEFAULT_EDITOR
    lr: float | None = None
    max_steps: int | None = None
    layers: str = ""
    max_drop: float | None = None

    def resolved(self, shared: "SharedModel") -> "EditSettings":
        """Validated settings with every default filled in; raises SettingsError."""
        editor = self.editor or DEFAULT_EDITOR
        if editor not in EDITORS:
            raise SettingsError(f"editor must be one of {', '.join(EDITORS)}, got {editor!r}")
        lr = EDITORS[editor].default_lr if self.lr in (None, "") else _number(self.lr, "learning rate")
        if not 0 < lr <= MAX_LR:
            raise SettingsError(f"learning rate must be > 0 and <= {MAX_LR}, got {lr:g}")
        max_steps = EDITORS[editor].default_max_steps if self.max_steps in (None, "") else self.max_steps
        steps = _number(max_steps, "max steps")
        if steps != int(steps) or not 1 <= steps <= MAX_STEPS_LIMIT:
            raise SettingsError(f"max steps must be a whole number from 1 to {MAX_STEPS_LIMIT}, got {max_steps!r}")
        layers = self.layers or shared.layers_for(editor)
        if layers not in shared.layer_choices:
            raise SettingsError(f"editable layers must be one of {', '.join(shared.layer_choices)}, got {layers!r}")
        max_drop = None
        if self.max_drop not in (None, ""):
            max_drop = _number(self.max_drop, "guardrail (max accuracy drop)")
            if not 0 <= max_drop <= 100:
                raise SettingsError(f"guardrail must be between 0 and 100 accuracy points, got {max_drop:g}")
        return EditSettings(editor, lr, int(steps), layers, max_drop)


class Replica:
    """One copy of a shared model, used by one thread at a time: its module, the editable views of it
    and the held-out evaluators on it (their cached features shared with the first replica's)."""

    def __init__(self, model: torch.nn.Module):
        self.model = model
        self.editables: dict[str, EditableModel] = {}
        self.evaluators: dict[int, HeldOutEvaluator] = {}  # by the stage where the cached features enter


class SharedModel:
    """A checkpoint loaded once, shared read-only by all sessions, with its held-out evaluators.

    `replicas` copies of the module (a few MB each) let that many edits run at once; with one torch
    thread each, two replicas on two cores served 16 users ~1.25x the edits per second of one replica on
    two threads (docs/RELIABILITY.md). Which replica runs a computation never changes its result."""

    def __init__(self, name: str, path: str | Path, heldout: ImageSet, device: torch.device | str = "cpu",
                 mixed_precision: bool | None = None, replicas: int = 1, checkpoint: Checkpoint | None = None,
                 anchors: ImageSet | None = None, source_flags: list[str] | None = None):
        """`checkpoint`: the model already loaded from `path` (a torchvision model, `load_model`), else the
        editcore checkpoint at `path` is read. `anchors`: the images the local editor keeps its edits away from
        (default: the shipped CIFAR-10 training sample). `source_flags`: the command-line flags that open this
        model and its held-out set again (`--model ... --images ...`), None for a checkpoint on CIFAR-10."""
        self.source_flags = source_flags
        self.name, self.path, self.device = name, Path(path), torch.device(device)
        self.mixed_precision = native_bfloat16(self.device) if mixed_precision is None else mixed_precision
        checkpoint = checkpoint or load_checkpoint(self.path, self.device)
        self.card, self.model, self.learned_editor = checkpoint.card, checkpoint.model.eval(), checkpoint.editor
        self.domain = model_domain(self.model)
        self.sha256 = hashlib.sha256(self.path.read_bytes()).hexdigest()
        self.default_layers = self.card.get("editable_prefix") or default_editable_prefix(self.card["arch"])
        self.local_layer = self.card.get("local_layer")  # the local editor's default here, when not its own
        # Every stage but the first (editing the stem would make every held-out check a full forward pass),
        # each editor's own default layers, and every conv / linear layer after the first stage.
        own = [self.layers_for(name) for name, cls in EDITORS.items() if cls.default_layers]
        layers = [name for name in weight_layer_names(self.model)
                  if len(self.model.stage_names) == 1 or self.model.first_stage_of([name + ".weight"]) > 0]
        self.layer_choices = tuple(dict.fromkeys([*self.model.stage_names[1:], self.default_layers, *own, *layers]))
        self.heldout = heldout.to(self.device)
        self.anchors = anchors.images.to(self.device) if anchors is not None else None
        self.primary = Replica(self.model)
        self.replicas = [self.primary] + [Replica(copy.deepcopy(self.model)) for _ in range(max(1, replicas) - 1)]
        self._busy: set[Replica] = set()  # the replicas some thread holds
        self._free = threading.Condition()
        self._held = threading.local()
        self._source_probs: dict[str, torch.Tensor] = {}
        self._heldout_rows: dict[str, list[int]] = {}  # image digest -> the held-out rows holding that image
        for row, image in enumerate(self.heldout.images.cpu()):
            self._heldout_rows.setdefault(image_digest(image), []).append(row)
        self.base_heldout_probs = self.heldout_probabilities(self.default_layers, None)

    def heldout_rows_of(self, digests) -> set[int]:
        """Rows of the held-out set whose pixels are exactly those of an image with one of these digests."""
        return {row for digest in digests for row in self._heldout_rows.get(digest, ())}

    @contextlib.contextmanager
    def replica(self, which: Replica | None = None) -> Iterator[Replica]:
        """Hold a replica (`which`, else any free one) for this thread; nested calls get the one held."""
        held = getattr(self._held, "replica", None)
        if held is not None and which in (None, held):
            yield held
            return
        with self._free:
            candidates = [which] if which is not None else self.replicas
            while (chosen := next((r for r in candidates if r not in self._busy), None)) is None:
                self._free.wait()
            self._busy.add(chosen)
        self._held.replica = chosen
        try:
            yield chosen
        finally:
            self._held.replica = held
            with self._free:
                self._busy.discard(chosen)
                self._free.notify_all()

    @property
    def description(self) -> str:
        if "model_source" in self.card:
            return f"{self.name}: {self.card['arch']}, weights {self.path.name}, {len(self.domain.classes)} classes"
        trained = "editable-trained" if self.card.get("objective") == "editable" else "baseline-trained"
        text = f"{self.name}: {self.card['arch']}, {trained}"
        accuracy = self.card.get("test_accuracy")
        return text if accuracy is None else f"{text}, test accuracy {accuracy:.1%}"

    def learned_hyperparameters(self, editor: str) -> dict[str, float] | None:
        """What editable training learned for this editor (lr, betas), if this checkpoint learned it. Only shown
        and compared, never the page's default: a learned rate can cost far more than the default (the H200
        editable model's learned RMSProp rate ~60 points of held-out accuracy per edit, docs/RESULTS.md)."""
        if self.learned_editor is not None and self.learned_editor.name == editor:
            return self.learned_editor.hyperparameters()
        return None

    def layers_for(self, editor: str) -> str:
        """The layers `editor` edits by default on this model: its own (the model's choice for it, when the
        model names one: the local editor's conv), else the checkpoint's."""
        own = EDITORS[editor].default_layers
        return (self.local_layer or own) if own else self.default_layers

    def make_editor(self, name: str, lr: float) -> Editor:
        return create_editor(name, lr=lr).to(self.device)

    def editable(self, layers: str, replica: Replica | None = None) -> EditableModel:
        """`replica`'s editable view (default: the first replica's; run it only while holding it). The
        copies share the first's `cache`: what depends on the base weights is computed once."""
        replica = replica or self.primary
        built = replica.editables.get(layers)
        if built is not None:
            return built
        if replica is not self.primary:
            twin = EditableModel(replica.model, layers, cache=self.editable(layers).cache, anchors=self.anchors)
            return replica.editables.setdefault(layers, twin)
        with self.replica(self.primary):  # reading its parameters while another thread swaps them would not do
            return self.primary.editables.setdefault(layers, EditableModel(self.model, layers, anchors=self.anchors))

    def evaluator(self, layers: str) -> HeldOutEvaluator:
        """The first replica's held-out evaluator whose cache sits at these layers' first stage (built on
        first use). Layers that begin in the same stage share it: one feature cache per model and split."""
        split = self.editable(layers).split
        built = self.primary.evaluators.get(split)
        if built is not None:
            return built
        with self.replica(self.primary) as primary:
            if split not in primary.evaluators:
                primary.evaluators[split] = HeldOutEvaluator(self.editable(layers), self.heldout.images,
                                                             self.heldout.labels, EVAL_BATCH, self.mixed_precision)
            return primary.evaluators[split]

    def _evaluator_on(self, replica: Replica, layers: str) -> HeldOutEvaluator:
        """`replica`'s evaluator: the first replica's on its own module (cached features computed once)."""
        if replica is self.primary:
            return self.evaluator(layers)
        split = self.editable(layers).split
        if split not in replica.evaluators:
            replica.evaluators[split] = self.evaluator(layers).on(self.editable(layers, replica))
        return replica.evaluators[split]

    def heldout_logits(self, layers: str, params: Params | None, rows: slice = slice(None)) -> torch.Tensor:
        """Logits (N, classes) on the held-out set (or its `rows`) from the cached features; with
        `mixed_precision`, bfloat16 except for the rows whose prediction float32 has to settle
        (HeldOutEvaluator.logits)."""
        with self.replica() as replica:
            return self._evaluator_on(replica, layers).logits(params, rows)

    def heldout_probabilities(self, layers: str, params: Params | None, rows: slice = slice(None)) -> torch.Tensor:
        """Class probabilities (N, classes) on the held-out set or its `rows` (CPU); argmax = float32's prediction."""
        return torch.softmax(self.heldout_logits(layers, params, rows), 1).cpu()

    def heldout_parts(self) -> list[slice]:
        """The held-out rows in the order an edit scores them: the first FIRST_SCORED_ROWS, then the rest
        (both whole batches of the evaluator, so the parts give the logits of one pass over all rows)."""
        first = min(FIRST_SCORED_ROWS, len(self.heldout))
        return [slice(0, first)] + ([slice(first, len(self.heldout))] if first < len(self.heldout) else [])

    @torch.no_grad()
    def probabilities(self, images: torch.Tensor, params: Params | None = None) -> torch.Tensor:
        """Class probabilities (N, classes) of uint8 images through the whole model (CPU)."""
        if len(images) == 0:
            return torch.empty(0, len(self.domain.classes))
        with self.replica() as replica:
            return torch.softmax(full_logits(replica.model, images.to(self.device), params, EVAL_BATCH), 1).cpu()

    def base_source_probabilities(self, key: str, images: torch.Tensor) -> torch.Tensor:
        """Base-model probabilities of a fixed browse source, computed once for all sessions (two first
        callers at once may both compute it: the same numbers, and no lock held while waiting for a replica)."""
        if key not in self._source_probs:
            self._source_probs.setdefault(key, self.probabilities(images))
        return self._source_probs[key]

    def edited_state_dict(self, params: Params) -> dict[str, torch.Tensor]:
        with self.replica(self.primary):
            state = {k: v.detach().clone() for k, v in self.model.state_dict().items()}
        state.update({k: v.detach().clone() for k, v in params.items()})
        return state


def lesson_editors(models: dict[str, SharedModel]) -> tuple[str, str]:
    """The editors the page puts side by side: its local editor and the paper's gradient editor, the one editable
    training learned where a loaded model learned one (the shipped pair: the paper code's RMSProp), else RMSProp."""
    learned = [shared.learned_editor.name for shared in models.values() if shared.learned_editor is not None]
    return DEFAULT_EDITOR, learned[0] if learned else "rmsprop"


def encode_pixels(image: torch.Tensor) -> str:
    return base64.b64encode(image.to(torch.uint8).cpu().contiguous().numpy().tobytes()).decode("ascii")


def image_digest(image: torch.Tensor) -> str:
    """Names an image by its pixels: two images have the same digest iff they are the same image."""
    return hashlib.blake2b(image.to(torch.uint8).cpu().contiguous().numpy().tobytes(), digest_size=16).hexdigest()


def decode_pixels(text: str, shape: tuple[int, int, int] = CIFAR10.shape) -> torch.Tensor:
    raw = base64.b64decode(text.encode("ascii"), validate=True)
    if len(raw) != math.prod(shape):
        raise SettingsError(f"an edit log image has {len(raw)} bytes, expected {math.prod(shape)}")
    return torch.frombuffer(bytearray(raw), dtype=torch.uint8).view(*shape).clone()


@dataclass
class EditEntry:
    """One applied edit, as it appears in the history and the log."""

    number: int
    refs: list[ImageRef]
    targets: list[int]
    pixels: list[str]  # base64 of each edited uint8 image, so a log replays without the sources
    digests: list[str]  # `image_digest` of each edited image
    settings: EditSettings
    success: bool
    steps: int
    seconds: float
    fixed_rows: list[int] = field(repr=False)  # held-out rows it turned right (its own images' rows included)
    broken_rows: list[int] = field(repr=False)  # and wrong

    def image_names(self) -> list[str]:
        return [f"{r.source}:{r.index}" for r in self.refs]


@dataclass
class EditReport:
    """What one apply did. The accuracy and flip fields describe the candidate edit; `applied`
    says whether the session kept it (a failed or guard-railed edit is rolled back)."""

    success: bool
    applied: bool
    message: str
    steps: int
    seconds: float
    evaluation_seconds: float
    heldout_accuracy_base: float
    heldout_accuracy_before: float
    heldout_accuracy_after: float
    n_heldout: int
    n_fixed: int
    n_broken: int
    n_changed: int
    n_corrections: int  # the session's corrections with this edit: its images and every earlier edited image
    corrections_held: int  # how many of them the candidate edit predicts as their (latest) target
    model: str
    settings: EditSettings
    refs: list[ImageRef]
    targets: list[int]
    views_before: list[int]  # predicted class of each augmented view of the first image, before
    views_after: list[int]  # and after the candidate edit
    views: torch.Tensor = field(repr=False)  # the augmented views themselves, uint8 (V,3,H,W), `view_names()` order
    predictions_before: torch.Tensor = field(repr=False)  # held-out predicted classes before the candidate edit
    predictions_after: torch.Tensor = field(repr=False)  # and after it
    fixed_rows: list[int] = field(repr=False)
    broken_rows: list[int] = field(repr=False)
    classes: tuple[str, ...] = CIFAR10.classes  # the model's class names

    def to_dict(self) -> dict:
        target = self.targets[0]
        hits = lambda preds: sum(p == target for p in preds) / max(1, len(preds))  # noqa: E731
        return {
            "success": self.success,
            "applied": self.applied,
            "message": self.message,
            "steps": self.steps,
            "seconds": round(self.seconds, 4),
            "evaluation_seconds": round(self.evaluation_seconds, 4),
            "heldout_accuracy_base": self.heldout_accuracy_base,
            "heldout_accuracy_before": self.heldout_accuracy_before,
            "heldout_accuracy_after": self.heldout_accuracy_after,
            "n_heldout": self.n_heldout,
            "n_fixed": self.n_fixed,
            "n_broken": self.n_broken,
            "n_changed": self.n_changed,
            "n_corrections": self.n_corrections,
            "corrections_held": self.corrections_held,
            "model": self.model,
            "images": [f"{r.source}:{r.index}" for r in self.refs],
            "targets": [self.classes[t] for t in self.targets],
            **asdict(self.settings),
            "views_at_target_before": hits(self.views_before),
            "views_at_target_after": hits(self.views_after),
        }


@dataclass
class Corrections:
    """A session's earlier corrections as an edit must keep them."""

    names: list[str]  # 'source:index' of each image
    features: torch.Tensor  # activations entering the edited stage, one row per image
    targets: torch.Tensor  # the latest target of each

    def slipped(self, editable: EditableModel, params: Params) -> list[str]:
        """Names of the corrections that `params` no longer predict as their target."""
        predicted = editable.logits_from_features(self.features, params).argmax(1)
        return [name for name, ok in zip(self.names, (predicted == self.targets).tolist()) if not ok]


@dataclass
class EditOutcome:
    """What an edit did to its own image(s), known before any held-out image is scored (`EditSession.apply`
    hands it to `on_outcome` first). `applied` is the verdict once nothing left can change it: a failed edit, or
    one that would undo an earlier correction, is rolled back; with no guardrail a successful one is kept. It is
    None while the guardrail waits for the held-out scoring; `message` says which."""

    success: bool
    applied: bool | None
    message: str
    steps: int
    seconds: float
    n_corrections: int
    corrections_held: int
    model: str
    settings: EditSettings
    refs: list[ImageRef]
    targets: list[int]
    topk: list[tuple[str, float]]  # the first image's classes, best first: by the edited model unless rolled back
    views_before: list[int]
    views_after: list[int]
    views: torch.Tensor = field(repr=False)
    classes: tuple[str, ...] = CIFAR10.classes  # the model's class names


@dataclass(frozen=True)
class HeldOutScore:
    """A candidate edit's held-out figures on the first `n_rows` rows of the held-out set, exact for those rows
    (`EditSession.apply` hands one to `on_scored` after each part of the held-out set but the last)."""

    n_rows: int  # held-out rows scored so far: the first ones
    n_total: int  # rows in the held-out set
    n_heldout: int  # of the rows scored so far, those the figures count (the session has not edited them)
    heldout_accuracy_before: float
    heldout_accuracy_after: float
    n_fixed: int
    n_broken: int


def _accuracy(predictions: torch.Tensor, labels: torch.Tensor, scored: torch.Tensor) -> float:
    return int(((predictions == labels) & scored).sum()) / max(1, int(scored.sum()))


def _flips(before: torch.Tensor, after: torch.Tensor, labels: torch.Tensor,
           scored: torch.Tensor) -> tuple[list[int], list[int], int]:
    """(rows fixed, rows broken, how many changed their prediction) among the scored rows."""
    changed = (before != after) & scored
    return (torch.nonzero(changed & (after == labels)).view(-1).tolist(),
            torch.nonzero(changed & (before == labels)).view(-1).tolist(), int(changed.sum()))


@dataclass
class _State:
    params: Params  # replacement tensors for the editable parameters ({} = the base model)
    heldout_probs: torch.Tensor  # (N, classes) on the held-out set, CPU
    version: int  # unique per state: keys caches of probabilities on other sources

    @functools.cached_property
    def predictions(self) -> torch.Tensor:
        return self.heldout_probs.argmax(1)


class EditSession:
    """One user's edits of one shared model."""

    _versions = itertools.count(1)

    def __init__(self, shared: SharedModel):
        self.shared = shared
        self.layers = shared.default_layers
        self.history: list[EditEntry] = []
        self._base = _State({}, shared.base_heldout_probs, 0)
        self._stack: list[_State] = []
        self._source_cache: dict[tuple[str, int], torch.Tensor] = {}
        self._correction_features: dict[tuple[str, str], torch.Tensor] = {}  # (layers, pixels) -> features

    @property
    def _top(self) -> _State:
        return self._stack[-1] if self._stack else self._base

    @property
    def params(self) -> Params:
        return self._top.params

    @property
    def version(self) -> int:
        return self._top.version

    @property
    def heldout_probs(self) -> torch.Tensor:
        return self._top.heldout_probs

    def scored_rows(self, digests=()) -> torch.Tensor:
        """Mask of the held-out rows this session's figures score: every image but the ones the session has
        edited (and the images `digests` name, an edit being tried). An edited image counts as its own
        "fixed" held-out row otherwise, so a session of corrections would look better than it did."""
        mask = torch.ones(len(self.shared.heldout), dtype=torch.bool)
        edited = self.shared.heldout_rows_of([*digests, *(d for entry in self.history for d in entry.digests)])
        mask[sorted(edited)] = False
        return mask

    def heldout_accuracy(self, predictions: torch.Tensor | None = None, scored: torch.Tensor | None = None) -> float:
        """Accuracy of `predictions` (default: the current model's) on the scored rows (default: `scored_rows()`)."""
        predictions = self._top.predictions if predictions is None else predictions
        return _accuracy(predictions, self.shared.heldout.labels.cpu(), self.scored_rows() if scored is None else scored)

    def accuracy_curve(self) -> list[float]:
        """Held-out accuracy of the base model, then after each applied edit, all on today's scored rows."""
        scored = self.scored_rows()
        return [self.heldout_accuracy(state.predictions, scored) for state in [self._base, *self._stack]]

    def summaries(self) -> list[dict]:
        """The applied edits as the history, the /history API, the log and an exported card show them: the
        held-out figures on today's scored rows (the images the session has not edited)."""
        scored = self.scored_rows()
        curve = self.accuracy_curve()
        return [{
            "edit": entry.number,
            "images": entry.image_names(),
            "targets": [self.shared.domain.classes[t] for t in entry.targets],
            **asdict(entry.settings),
            "success": entry.success,
            "steps": entry.steps,
            "seconds": round(entry.seconds, 4),
            "heldout_accuracy_before": curve[i],
            "heldout_accuracy_after": curve[i + 1],
            "n_heldout": int(scored.sum()),
            "n_fixed": sum(bool(scored[r]) for r in entry.fixed_rows),
            "n_broken": sum(bool(scored[r]) for r in entry.broken_rows),
        } for i, entry in enumerate(self.history)]

    def probabilities(self, images: torch.Tensor) -> torch.Tensor:
        return self.shared.probabilities(images, self.params)

    def state_bytes(self) -> int:
        """Memory this session's edits hold: each keeps its edited parameters, held-out probabilities and
        predictions, flip rows (Python ints), the edited images' pixels (base64) and, once a later edit kept
        them, their features entering the edited stage."""
        return sum(_tensor_bytes(state.params.values()) + (state.heldout_probs.nbytes +
                                                           PREDICTION_BYTES * len(state.heldout_probs))
                   for state in self._stack) + \
            sum(ROW_BYTES * (len(e.fixed_rows) + len(e.broken_rows)) + sum(map(len, e.pixels)) for e in self.history) + \
            _tensor_bytes(self._correction_features.values())

    def edit_bytes(self, layers: str, n_images: int = 1) -> int:
        """The most that one more edit of `layers` on `n_images` images adds to `state_bytes` (every held-out
        image a flip at worst)."""
        probs = self.shared.base_heldout_probs
        features = self.shared.evaluator(layers).features
        return _tensor_bytes(self.shared.editable(layers).frozen_base_params().values()) + probs.nbytes + \
            (ROW_BYTES + PREDICTION_BYTES) * len(probs) + \
            n_images * (BASE64_BYTES_PER_PIXEL * self.shared.domain.size ** 2 + features[0].nbytes)

    def source_probabilities(self, key: str, images: torch.Tensor) -> torch.Tensor:
        """Probabilities of a fixed image set under the current edits (cached per state)."""
        if not self._stack:
            return self.shared.base_source_probabilities(key, images)
        cache_key = (key, self.version)
        if cache_key not in self._source_cache:
            self._source_cache = {k: v for k, v in self._source_cache.items() if k[1] == self.version}
            self._source_cache[cache_key] = self.probabilities(images)
        return self._source_cache[cache_key]

    def topk(self, image: torch.Tensor, k: int | None = None, params: Params | None = None) -> list[tuple[str, float]]:
        """The k (default: all) most likely classes for one uint8 image (3,H,W), best first, by the current model
        (or by the base model with `params`)."""
        names = self.shared.domain.classes
        probs = self.shared.probabilities(image.view(1, *image.shape[-3:]), self.params if params is None else params)[0]
        values, classes = probs.topk(min(k or len(names), len(names)))
        return [(names[c], float(v)) for v, c in zip(values.tolist(), classes.tolist())]

    def apply(self, images: torch.Tensor, targets: list[int], settings: EditSettings, refs: list[ImageRef],
              progress: Callable[[float, str], None] = lambda fraction, stage: None,
              on_outcome: Callable[[EditOutcome], None] | None = None,
              on_scored: Callable[[HeldOutScore], None] = lambda score: None) -> EditReport:
        """Edit so every image gets its target; keep the result only if it succeeds, keeps the session's
        earlier corrections and passes the guardrail. Bad settings raise SettingsError before anything
        changes. `progress(fraction, stage)` is told when each stage starts; `on_outcome` gets the edit's
        outcome before any held-out image is scored, `on_scored` the figures of each part of the held-out
        set but the last (`SharedModel.heldout_parts`); the report has them all."""
        settings = settings.resolved(self.shared)
        images = images.view(-1, *images.shape[-3:])
        if images.dtype != torch.uint8 or len(images) == 0 or len(images) != len(targets) or len(refs) != len(targets):
            raise SettingsError("an edit needs one or more uint8 images, each with a target and a reference")
        n_classes = len(self.shared.domain.classes)
        if not all(isinstance(t, int) and 0 <= t < n_classes for t in targets):
            raise SettingsError(f"targets must be class indices 0-{n_classes - 1}, got {targets}")
        if self.history and settings.layers != self.layers:
            raise SettingsError(f"this session's edits change {self.layers}; reset before editing {settings.layers}")
        if len(self.history) >= MAX_EDITS_PER_SESSION:
            raise SettingsError(f"a session keeps at most {MAX_EDITS_PER_SESSION} edits; reset or export and start again")
        shared, device = self.shared, self.shared.device
        editor = shared.make_editor(settings.editor, settings.lr)
        target_tensor = torch.tensor(targets, device=device)
        digests = [image_digest(image) for image in images]
        views = augmented_views(images[0])
        with shared.replica() as replica:
            editable = shared.editable(settings.layers, replica)
            earlier = self._corrections(editable, exclude=digests)
            progress(0.0, f"editing ({settings.editor}, up to {settings.max_steps} steps)")
            start_params = self.params or editable.frozen_base_params()
            result = edit(editable, shared.domain.normalize(images.to(device)), target_tensor, editor, settings.max_steps,
                          params=start_params, keep=earlier and (earlier.features, earlier.targets))
            progress(0.2, "checking augmented views and earlier corrections")
            with torch.no_grad(), eval_mode(replica.model):
                view_features = editable.features(shared.domain.normalize(views.to(device)))  # an edit leaves these unchanged
                views_before = editable.logits_from_features(view_features, self.params or None).argmax(1).tolist()
                views_after = editable.logits_from_features(view_features, result.params).argmax(1).tolist()
                slipped = earlier.slipped(editable, result.params) if earlier else []
            n_earlier = len(earlier.names) if earlier else 0
            corrections_held = n_earlier - len(slipped) + int((result.final_logits.argmax(1).cpu() ==
                                                               target_tensor.cpu()).sum())
            replaced = self._earlier_targets(digests)
            note = (" This session edited " + "; ".join(replaced) + " before: the latest target replaces the earlier "
                    "one, and only it is kept.") if replaced else ""
            applied, message = self._verdict(result, settings, slipped, n_earlier, drop=None)
            if on_outcome is not None:  # its top-k costs a whole-model pass: only for a caller who shows it
                on_outcome(EditOutcome(result.success, applied, message + note, result.steps, result.seconds,
                                       n_earlier + len(targets), corrections_held, shared.name, settings, list(refs),
                                       list(targets), self.topk(images[0], params=self.params if applied is False
                                                                else result.params),
                                       views_before, views_after, views, shared.domain.classes))
            scored = self.scored_rows(digests)
            labels = shared.heldout.labels.cpu()
            before, parts, evaluation_seconds = self._top.predictions, [], 0.0
            for part in shared.heldout_parts():
                progress(0.3 + 0.7 * part.start / len(labels), f"re-evaluating held-out images {part.start:,}-"
                                                               f"{part.stop - 1:,} of {len(labels):,}")
                started = time.perf_counter()
                parts.append(shared.heldout_probabilities(settings.layers, result.params, part))
                evaluation_seconds += time.perf_counter() - started
                if part.stop < len(labels):
                    covered = slice(0, part.stop)
                    after = torch.cat(parts).argmax(1)
                    fixed, broken, _ = _flips(before[covered], after, labels[covered], scored[covered])
                    on_scored(HeldOutScore(part.stop, len(labels), int(scored[covered].sum()),
                                           _accuracy(before[covered], labels[covered], scored[covered]),
                                           _accuracy(after, labels[covered], scored[covered]), len(fixed), len(broken)))
            progress(1.0, "checking the held-out figures")  # the last point where a client gone stops the edit
        probs_after = torch.cat(parts)
        after = probs_after.argmax(1)
        fixed, broken, changed = _flips(before, after, labels, scored)
        acc_before, acc_after = _accuracy(before, labels, scored), _accuracy(after, labels, scored)
        if applied is None:  # the guardrail's verdict, on every scored row
            applied, message = self._verdict(result, settings, slipped, n_earlier, drop=100 * (acc_before - acc_after))
        if applied:
            self.layers = settings.layers
            self._stack.append(_State(result.params, probs_after, next(self._versions)))
            self.history.append(EditEntry(len(self.history) + 1, list(refs), list(targets),
                                          [encode_pixels(image) for image in images], digests, settings,
                                          result.success, result.steps, result.seconds, fixed, broken))
        return EditReport(result.success, applied, message + note, result.steps, result.seconds, evaluation_seconds,
                          _accuracy(self._base.predictions, labels, scored), acc_before, acc_after, int(scored.sum()),
                          len(fixed), len(broken), changed, n_earlier + len(targets), corrections_held,
                          shared.name, settings, list(refs), list(targets), views_before, views_after, views, before,
                          after, fixed, broken, shared.domain.classes)

    def _verdict(self, result, settings: EditSettings, slipped: list[str], n_earlier: int,
                 drop: float | None) -> tuple[bool | None, str]:
        """(kept?, why) for a candidate edit; kept is None while the guardrail waits for the held-out accuracy
        `drop` (points) that only the scoring gives."""
        if not _all_finite(result):
            return False, "The edit's loss became NaN or infinite (the learning rate is probably too large); rolled back."
        if not result.success:
            return False, (f"The edit did not reach the target within {settings.max_steps} steps; rolled back (try "
                           "more steps or a larger learning rate).")
        if slipped:
            return False, (
                f"The edit would undo {len(slipped)} of this session's {n_earlier} earlier correction(s) "
                f"({', '.join(slipped[:5])}{', ...' if len(slipped) > 5 else ''}); rolled back. Earlier corrections "
                "are kept: undo one of them to go on, or use the local editor, which edits with them as constraints.")
        if settings.max_drop is not None and drop is None:
            return None, (f"the edit reached its target; the guardrail (at most {settings.max_drop:g} points of "
                          "held-out accuracy) decides once the held-out images are scored.")
        if settings.max_drop is not None and drop > settings.max_drop:
            return False, (f"Guardrail: held-out accuracy would drop by {drop:.2f} points "
                           f"(limit {settings.max_drop:g}); rolled back.")
        return True, f"Edit {len(self.history) + 1} applied in {result.steps} step(s)."

    def _latest_corrections(self) -> dict[str, tuple[str, str, int]]:
        """Each image this session edited, by digest: (its name, pixels, latest target). An image edited
        again keeps only its latest target: that is the correction the session keeps."""
        latest = {}
        for entry in self.history:
            for name, pixels, digest, target in zip(entry.image_names(), entry.pixels, entry.digests, entry.targets):
                latest[digest] = (name, pixels, target)
        return latest

    def _earlier_targets(self, digests: list[str]) -> list[str]:
        """'NAME (to TARGET)' for each of `digests` this session has already edited."""
        latest = self._latest_corrections()
        return [f"{latest[d][0]} (to {self.shared.domain.classes[latest[d][2]]})" for d in dict.fromkeys(digests) if d in latest]

    def _corrections(self, editable: EditableModel, exclude: list[str]) -> "Corrections | None":
        """This session's corrections (latest target per image) but the images in `exclude`, with their
        features entering `editable`'s first stage, which no edit changes: computed once per image."""
        latest = {d: c for d, c in self._latest_corrections().items() if d not in exclude}
        if not latest:
            return None
        keys = [(editable.prefixes, digest) for digest in latest]
        missing = [k for k in keys if k not in self._correction_features]
        if missing:
            images = torch.stack([decode_pixels(latest[digest][1], self.shared.domain.shape)
                                  for _, digest in missing]).to(self.shared.device)
            with torch.no_grad(), eval_mode(editable.model):
                features = editable.features(self.shared.domain.normalize(images))
            self._correction_features.update(zip(missing, [f.clone() for f in features]))  # rows of their own
        self._correction_features = {k: self._correction_features[k] for k in keys}  # forget undone edits
        return Corrections([name for name, _, _ in latest.values()],
                           torch.stack([self._correction_features[k] for k in keys]),
                           torch.tensor([target for _, _, target in latest.values()], device=self.shared.device))

    def last_flips(self) -> tuple[torch.Tensor, torch.Tensor, list[int], list[int]] | None:
        """(predictions before, after, fixed rows, broken rows) of the last applied edit, or None; the rows
        are those scored now (no image the session has edited)."""
        if not self._stack:
            return None
        below = self._stack[-2] if len(self._stack) > 1 else self._base
        entry, scored = self.history[-1], self.scored_rows()
        return (below.predictions, self._top.predictions, [r for r in entry.fixed_rows if scored[r]],
                [r for r in entry.broken_rows if scored[r]])

    def undo(self) -> EditEntry | None:
        """Drop the last applied edit; returns it (None when there was none)."""
        if not self._stack:
            return None
        self._stack.pop()
        return self.history.pop()

    def reset(self) -> int:
        """Back to the base model; returns how many edits were dropped."""
        dropped = len(self.history)
        self._stack.clear()
        self.history.clear()
        self._source_cache.clear()
        self.layers = self.shared.default_layers
        return dropped

    def export_weights(self, path: str | Path) -> Path:
        """The edited model as a checkpoint (safetensors + card) that `load_checkpoint` reads."""
        with self.shared.replica(self.shared.primary):
            model = copy.deepcopy(self.shared.model).cpu()
        model.load_state_dict({k: v.cpu() for k, v in self.shared.edited_state_dict(self.params).items()})
        card = {**self.shared.card, "edited_from": {"checkpoint": self.shared.path.name, "sha256": self.shared.sha256},
                "edits": self.summaries()}
        card.pop("editor", None)  # save_checkpoint re-adds it from the editor it is given
        for key in ("source", "sha256"):  # those of the file it was edited from (kept in "edited_from")
            card.pop(key, None)
        editor = copy.deepcopy(self.shared.learned_editor).cpu() if self.shared.learned_editor is not None else None
        return save_checkpoint(path, model, card, editor)

    def log(self) -> dict:
        """The session as a JSON-ready edit log that `replay` reproduces."""
        return {
            "format": LOG_FORMAT,
            "version": LOG_VERSION,
            "model": self.shared.name,
            "checkpoint": {"path": self.shared.path.name, "sha256": self.shared.sha256, "arch": self.shared.card["arch"]},
            "heldout": {"source": self.shared.heldout.source, "n": len(self.shared.heldout)},
            "layers": self.layers,
            "arithmetic": arithmetic(self.shared.device),
            "edits": [{**summary, "refs": [asdict(r) for r in entry.refs], "target_indices": entry.targets,
                       "pixels": entry.pixels, "settings": asdict(entry.settings)}
                      for summary, entry in zip(self.summaries(), self.history)],
        }

    def replay(self, log: dict) -> list[EditReport]:
        """Replace this session's edits by those of `log` (from `log()`), each applied with its recorded
        settings; one report per edit of the log (an edit that cannot succeed again is rolled back).
        All or nothing: the whole log is validated first and replayed on a scratch session, so a refused
        log (SettingsError) or a failure midway leaves this session exactly as it was."""
        edits = parse_log(log, self.shared)
        scratch = EditSession(self.shared)
        reports = [scratch.apply(item["images"], item["targets"], item["settings"], item["refs"]) for item in edits]
        self.layers, self.history, self._stack = scratch.layers, scratch.history, scratch._stack
        self._source_cache = {}
        return reports


def replay_summary(log: dict, reports: list[EditReport], session: EditSession) -> tuple[str, dict]:
    """What replaying `log` into `session` reproduced, in words and as the report's fields. 'Reproduced
    exactly' needs the same weights (the log's checkpoint sha256), every edit kept, and every recorded
    held-out accuracy met exactly; the words say what else differs (threads, CPU kernels, device)."""
    shared = session.shared
    kept = [r for r in reports if r.applied]
    dropped = [number for number, r in enumerate(reports, 1) if not r.applied]
    recorded = [e.get("heldout_accuracy_after") for e in log["edits"]]
    replayed = [s["heldout_accuracy_after"] for s in session.summaries()]
    logged_sha = str(log["checkpoint"].get("sha256"))
    same_weights = logged_sha == shared.sha256
    reproduced = same_weights and not dropped and recorded == replayed
    differences = arithmetic_differences(log.get("arithmetic"), arithmetic(shared.device))
    parts = [f"Replayed the log's {len(reports)} edit(s) on the {shared.name} model: **{len(kept)} kept**"]
    if dropped:
        parts.append(f", edit(s) {', '.join(map(str, dropped))} did not succeed again and were rolled back")
    parts.append(f". Held-out accuracy after each: {[round(100 * a, 2) for a in replayed]} — "
                 f"{'reproduced exactly' if reproduced else 'NOT identical to the log'}.")
    if not same_weights:
        parts.append(f" **The log was recorded on different weights** (checkpoint sha256 {logged_sha[:12]}… in the "
                     f"log, {shared.sha256[:12]}… here), so the replay cannot reproduce it.")
    if log.get("version") == 1:
        parts.append(" This version-1 log scored the session's own edited images as held-out; figures here leave "
                     "them out.")
    if differences:
        parts.append(f" The arithmetic differs ({'; '.join(differences)}): the last bits of each step differ, which "
                     "can change an edit's step count and so its weights and figures.")
    return "".join(parts), {"replayed": len(reports), "kept": len(kept), "same_weights": same_weights,
                            "reproduced": reproduced, "arithmetic_differences": differences}


def parse_log(log: dict, shared: SharedModel) -> list[dict]:
    """Validate an edit log and decode its edits; raises SettingsError with the reason."""
    if not isinstance(log, dict) or log.get("format") != LOG_FORMAT:
        raise SettingsError(f"not an EditLab edit log (expected \"format\": \"{LOG_FORMAT}\")")
    if log.get("version") not in READ_LOG_VERSIONS:
        raise SettingsError(f"edit log version {log.get('version')!r} is not supported (this app reads "
                            f"{', '.join(map(str, READ_LOG_VERSIONS))})")
    if not isinstance(log.get("checkpoint"), dict):
        raise SettingsError("malformed edit log: \"checkpoint\" must be an object")
    arch = log["checkpoint"].get("arch")
    if arch != shared.card["arch"]:
        raise SettingsError(f"the log edits a {arch} model but {shared.name} is a {shared.card['arch']}")
    if not isinstance(log.get("edits"), list):
        raise SettingsError("malformed edit log: \"edits\" must be a list")
    if len(log["edits"]) > MAX_EDITS_PER_SESSION:
        raise SettingsError(f"the edit log has {len(log['edits'])} edits; a session keeps at most {MAX_EDITS_PER_SESSION}")
    edits = []
    for number, item in enumerate(log["edits"], 1):
        try:
            settings = EditSettings(**item["settings"]).resolved(shared)
            refs = [ImageRef(str(r["source"]), whole_number(r["index"], "index")) for r in item["refs"]]
            images = torch.stack([decode_pixels(p, shared.domain.shape) for p in item["pixels"]])
            targets = [whole_number(t, "target") for t in item["target_indices"]]
        except SettingsError as exc:
            raise SettingsError(f"edit {number} of the log: {exc}") from None
        except (KeyError, TypeError, ValueError, RuntimeError) as exc:
            raise SettingsError(f"malformed edit log, edit {number}: {exc!r}") from None
        if not len(images) == len(targets) == len(refs):
            raise SettingsError(f"edit {number} of the log has {len(images)} image(s), {len(targets)} target(s) and "
                                f"{len(refs)} reference(s); they must match")
        if not all(0 <= t < len(shared.domain.classes) for t in targets):
            raise SettingsError(f"edit {number} of the log: targets must be class indices 0-{len(shared.domain.classes) - 1}, "
                                f"got {targets}")
        if edits and settings.layers != edits[0]["settings"].layers:
            raise SettingsError(f"edit {number} of the log changes {settings.layers} but edit 1 changes "
                                f"{edits[0]['settings'].layers}; a session edits one set of layers")
        edits.append({"images": images, "targets": targets, "settings": settings, "refs": refs})
    return edits


def read_log(data: bytes | str) -> dict:
    """Parse edit-log JSON text (JSON only, size-capped)."""
    if len(data) > MAX_LOG_BYTES:
        raise SettingsError(f"edit log is larger than {MAX_LOG_BYTES // 1_000_000} MB")
    try:
        return json.loads(data)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise SettingsError(f"the edit log is not valid JSON: {exc}") from None
    except RecursionError:
        raise SettingsError("the edit log is nested too deeply to be an EditLab edit log") from None


def view_names() -> list[str]:
    return [spec.name for spec in view_specs()]
