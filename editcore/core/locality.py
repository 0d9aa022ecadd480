"""Edits that stay local: a projected, margin-seeking edit of a few layers' weights.

The gradient editors move every editable weight (RMSProp's and Adam's first step from a zero state
is a dense sign step), so one correction shifts the outputs of many other images. The local edit
changes one or a few weight matrices W (conv or linear) and only along directions that the layer's
*anchor inputs* (patches of its input on a few thousand training images) barely excite:

- `AnchorSubspace`: for each edited weight, the covariance C = E[p p^T] of its input vectors p over
  the anchors (for a conv, the unfolded k x k x c_in patches), and the projector P onto the
  eigenvectors of C that together hold only `energy` of its trace (the low-energy subspace). An
  update dW = G P changes the layer's output on an anchor input by G P p, and E|P p|^2 <= energy *
  E|p|^2: the edit moves the anchors' activations little *from the first step on*, which a penalty
  that is zero at the base model cannot do (the idea of null-space constrained editing, AlphaEdit).
- `local_edit`: Polyak steps on a hinge loss of the logit margin, dW = -(loss / |G P|^2) G P,
  i.e. the smallest step (in the projected metric) that closes the linearised margin gap; no learning
  rate to tune, and the first step follows the gradient's size. It edits the image together with a few
  crops / flips of it (so the fix carries over to small changes of the input; drawn per image and never
  one of the generalisation views, `copy_offsets`, so generalisation is measured on unseen copies), and it may
  keep earlier corrections of a session as constraints (so a later edit cannot undo them).

An edited model is still the base model plus a dict of replacement tensors (`EditResult.params`).
"""
from __future__ import annotations

import copy
import threading
import time
import zlib
from collections import OrderedDict

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from .anchor_stats import anchor_covariances, owner, recording_inputs, shipped_covariances, weights_fingerprint
from .augment_views import view_specs
from .data import load_train_sample
from .edit import EditableModel, EditResult, eval_mode, logit_margins
from .editors import Editor, Params, register_editor
from .heldout import native_bfloat16, settled_margins

DEFAULT_EDITOR = "local"  # the page's and evaluate-edits' default editor (docs/LOCALITY.md)
DEFAULT_ENERGY = 0.1  # share of the anchors' input energy the edit may touch
DEFAULT_MARGIN = 2.5  # logit margin the edit aims for (target logit - best other logit)
DEFAULT_COPIES = 8  # random crop/flip copies of the edited image, edited with it
DEFAULT_MAX_STEPS = 20
MAX_HALVINGS = 8  # line search: a step is halved at most this often before the edit gives up
KEEP_MARGIN = 1.0  # earlier corrections of a session are kept at least this far above the next class
# guard=N: once a session keeps corrections, each later edit also keeps the base model's class on the N images with
# the smallest base margins among the anchor images and their mirror images (4,000 candidates on the shipped
# sample), each with GUARD_SHARE of its base margin (at most KEEP_MARGIN): a session of 200 corrections drifts a
# third as far (docs/LOCALITY.md). A single edit gains nothing from it and would take ~7x the time. 1,284 rows: more
# buy little (all 4,000: 0.1 point less after 200 corrections of the baseline-trained model, at 1.6x the edit time,
# past the 0.3 s target). At most GUARD_FLOPS a check, counted on the stage after the features (what a check runs):
# ResNet-20's 1,284 rows, so a bigger model's check costs no more (a 224-px ResNet-18 edited at layer3 keeps 20).
DEFAULT_GUARD = 1284
GUARD_SHARE = 0.9
GUARD_FLOPS = DEFAULT_GUARD * 26_215_680  # ResNet-20's check of one row: layer3 and the head
SAMPLE_COVARIANCES_KEPT = 4  # models whose training-sample covariances a process keeps (~18 MB each for layer3)


def copy_offsets(count: int, seed: int) -> list[tuple[int, int, bool]]:
    """`count` distinct crop/flip moves (dy, dx, flipped), |dy|, |dx| <= 4, drawn with `seed`: never the image
    itself, nor the move of a generalisation view (`view_specs`: its crops, flip and small shifts)."""
    taken = {(0, 0, False)} | {spec.offset for spec in view_specs() if spec.offset is not None}
    moves = [(dy, dx, flipped) for dy in range(-4, 5) for dx in range(-4, 5) for flipped in (False, True)
             if (dy, dx, flipped) not in taken]
    if count > len(moves):
        raise ValueError(f"at most {len(moves)} distinct copies, asked for {count}")
    order = torch.randperm(len(moves), generator=torch.Generator().manual_seed(seed))[:count]
    return [moves[i] for i in order.tolist()]


def crop_flip(images: torch.Tensor, dy: int, dx: int, flipped: bool) -> torch.Tensor:
    """The crop at (dy, dx) of the images after 4-pixel zero padding (the training augmentation's), flipped."""
    h, w = images.shape[-2:]
    moved = nn.functional.pad(images, (4, 4, 4, 4))[..., 4 + dy : 4 + dy + h, 4 + dx : 4 + dx + w]
    return moved.flip(-1) if flipped else moved


def image_seed(images: torch.Tensor) -> int:
    """A seed that follows the images: each edit gets its own copies, and the same images get the same."""
    return zlib.crc32(images.detach().cpu().contiguous().numpy().tobytes())


def local_weight_names(editable: EditableModel) -> list[str]:
    """The weights the local editor changes: those of the Conv2d / Linear modules among the editable parameters."""
    names = [n for n in editable.names if n.endswith(".weight") and isinstance(owner(editable.model, n), (nn.Conv2d, nn.Linear))]
    if not names:
        raise ValueError(f"no conv or linear weight among the editable parameters {editable.names[:4]}...")
    return names


class AnchorSubspace:
    """Projectors onto the low-energy subspace of anchor inputs, one per edited weight matrix.

    Only `weight` tensors of Conv2d / Linear modules among the editable parameters are edited
    locally; `names` lists them (other editable parameters, e.g. batch norm, stay as they are).
    """

    def __init__(self, editable: EditableModel, anchor_inputs: torch.Tensor | None, energy: float = DEFAULT_ENERGY,
                 batch_size: int = 500, ridge: float | None = None,
                 covariances: dict[str, torch.Tensor] | None = None, about: dict | None = None):
        """From normalised `anchor_inputs`, or from their `covariances` computed before (`anchor_stats`; `about`:
        that file's metadata, kept as `self.about`)."""
        if not 0 < energy <= 1:
            raise ValueError(f"energy must be in (0, 1], got {energy}")
        if ridge is not None and not ridge > 0:
            raise ValueError(f"ridge must be > 0, got {ridge}")
        self.energy, self.ridge = energy, ridge
        self.names = local_weight_names(editable)
        if covariances is None and anchor_inputs is None:
            raise ValueError("an anchor subspace needs anchor inputs or their covariances")
        self.about = about or {"anchors": f"{len(anchor_inputs)} images" if covariances is None else "given covariances"}
        if covariances is None:
            batches = (anchor_inputs[i : i + batch_size] for i in range(0, len(anchor_inputs), batch_size))
            covariances = anchor_covariances(editable.model, self.names, batches)[0]
        self.projectors: dict[str, torch.Tensor] = {}
        self.dims: dict[str, tuple[int, int]] = {}  # (kept directions, input dimension)
        self.bases: dict[str, torch.Tensor] = {}  # hard cut: orthonormal basis of the subspace (float64)
        self.scales: dict[str, float] = {}  # mean eigenvalue of the anchors' covariance
        for name in self.names:
            covariance = covariances[name]
            eigenvalues, eigenvectors = torch.linalg.eigh(covariance)  # ascending
            eigenvalues = eigenvalues.clamp(min=0)
            keep = int((eigenvalues.cumsum(0) <= energy * eigenvalues.sum()).sum())
            self.dims[name] = (max(keep, 1), len(eigenvalues))
            self.scales[name] = float(eigenvalues.mean())
            if ridge is None:
                basis = self.bases[name] = eigenvectors[:, :max(keep, 1)]
                self.projectors[name] = (basis @ basis.T).float()
            else:
                # The soft projector ridge (C / mean eigenvalue + ridge)^-1: ~1 on directions the anchors leave
                # empty, ~ridge / eigenvalue on busy ones. A step G M is the one that changes the anchors' outputs
                # least, E|dW p|^2 = tr(dW C dW^T), for its first-order effect on the edit's loss.
                weights = ridge / (eigenvalues / eigenvalues.mean() + ridge)
                self.projectors[name] = ((eigenvectors * weights) @ eigenvectors.T).float()

    def protecting(self, covariances: dict[str, torch.Tensor], strength: float) -> "AnchorSubspace":
        """This subspace with each step also kept away from the inputs of `covariances` (a session's earlier
        corrections, AlphaEdit's "keys of previous edits"): inside the subspace (basis B), the direction is
        G B (I + strength B^T C B / s)^-1 B^T, s the anchors' mean eigenvalue, the step that changes the
        layer's output on those inputs least, E|dW p|^2 = tr(dW C dW^T), for its first-order effect on the loss."""
        if not self.bases:
            raise ValueError("protecting earlier corrections needs the hard-cut subspace (no ridge)")
        protected = copy.copy(self)
        protected.projectors = {}
        for name in self.names:
            basis = self.bases[name]
            inner = basis.T @ covariances[name].to(basis) @ basis * (strength / self.scales[name])
            inverse = torch.linalg.inv(torch.eye(len(inner), dtype=inner.dtype, device=inner.device) + inner)
            protected.projectors[name] = (basis @ inverse @ basis.T).float()
        return protected

    def project(self, name: str, tensor: torch.Tensor) -> torch.Tensor:
        """tensor (shaped like the weight) with its input side projected onto the low-energy subspace."""
        flat = tensor.reshape(tensor.shape[0], -1)
        return (flat @ self.projectors[name].to(flat.device)).reshape(tensor.shape)


def local_edit(
    editable: EditableModel,
    inputs: torch.Tensor,
    targets: torch.Tensor,
    subspace: AnchorSubspace,
    max_steps: int = DEFAULT_MAX_STEPS,
    margin: float = DEFAULT_MARGIN,
    copies: int = DEFAULT_COPIES,
    params: Params | None = None,
    keep_inputs: torch.Tensor | None = None,
    keep_targets: torch.Tensor | None = None,
    step_scale: float = 1.0,
    seed: int | None = None,
    keep_features: torch.Tensor | None = None,
    protect: float = 0.0,
    keep_margins: torch.Tensor | None = None,
) -> EditResult:
    """Edit so that every input gets its target, changing only `subspace.names` within the subspace.

    inputs: normalised images (N,3,H,W), targets (N,). Each input is edited together with `copies`
    crop/flip copies (`copy_offsets`, seeded by `seed`, default `image_seed(inputs)`); the loss is the mean over those rows of
    relu(margin - logit margin). `keep_inputs` (earlier corrections to keep) must stay KEEP_MARGIN above
    their next class: whenever the loss reaches 0, all of them are checked, and the ones that fell
    short join the loss (with KEEP_MARGIN) for the steps that follow. A satisfied one adds nothing to the
    hinge's gradient, so only those rows need the backward pass, not every correction of a long
    session at every step. It stops when the loss is 0 with every kept row in place, or after `max_steps`
    steps; `success` means every input's target is the argmax. `params`: the editable tensors to start
    from (default: the base model's). `keep_features` may stand for `keep_inputs`: their activations
    entering the editable stage, which a caller keeping a session's corrections can compute once.
    `protect` > 0: every step also stays away from the kept corrections' inputs to the edited layers
    (`AnchorSubspace.protecting`, with this strength), not only from the anchors'. `keep_margins`: a margin per
    kept row instead of KEEP_MARGIN for all.
    """
    if max_steps < 0:
        raise ValueError("max_steps must be >= 0")
    if not step_scale > 0:
        raise ValueError("step_scale must be > 0")
    start = time.perf_counter()
    targets = targets.view(-1).to(inputs.device)
    rows = [inputs]
    if copies:
        seed = image_seed(inputs) if seed is None else seed
        rows += [crop_flip(inputs, *move) for move in copy_offsets(copies, seed)]
    n_edit_rows = len(inputs) * (1 + copies)
    row_targets = targets.repeat(1 + copies)
    row_margins = torch.full((n_edit_rows,), float(margin), device=inputs.device)
    params = {n: p.detach() for n, p in (params or editable.frozen_base_params()).items()}
    names = subspace.names
    with eval_mode(editable.model), torch.enable_grad():
        with torch.no_grad():
            features = editable.features(torch.cat(rows))
            if keep_features is None and keep_inputs is not None:
                keep_features = editable.features(keep_inputs.to(inputs.device))
            if keep_features is not None and len(keep_features):
                keep_features = keep_features.to(inputs.device)
                keep_targets = keep_targets.view(-1).to(inputs.device)
                keep_margins = torch.full((len(keep_features),), KEEP_MARGIN, device=inputs.device) \
                    if keep_margins is None else keep_margins.view(-1).to(inputs.device)
            else:
                keep_features = None
        kept = torch.zeros(0 if keep_features is None else len(keep_features), dtype=torch.bool, device=inputs.device)
        if protect > 0 and keep_features is not None:
            with torch.no_grad(), recording_inputs(editable.model, names) as (sums, counts):
                editable.logits_from_features(keep_features, params)
            subspace = subspace.protecting({n: sums[n] / counts[n] for n in names}, protect)

        def evaluate(candidate: Params) -> tuple[Params, torch.Tensor, torch.Tensor]:
            candidate = {n: p.detach().requires_grad_(n in subspace.projectors) for n, p in candidate.items()}
            logits = editable.logits_from_features(features, candidate)
            return candidate, torch.relu(row_margins - logit_margins(logits, row_targets)).mean(), logits

        mixed_precision = native_bfloat16(inputs.device)

        def slipped(candidate: Params) -> torch.Tensor:
            """Kept rows below their keep margin at `candidate` that are not in the loss yet. bfloat16 where it is
            native, float32 near the margin: checking a guard's thousands of rows is most of an edit's time."""
            margins = settled_margins(editable, keep_features, keep_targets, keep_margins, candidate, mixed_precision)
            return (margins < keep_margins) & ~kept

        params, loss, logits = evaluate(params)
        losses, steps = [float(loss.detach())], 0
        while steps < max_steps:
            if losses[-1] == 0:
                new = slipped(params) if keep_features is not None else None
                if new is None or not new.any():
                    break
                kept |= new
                features = torch.cat([features, keep_features[new]])
                row_targets = torch.cat([row_targets, keep_targets[new]])
                row_margins = torch.cat([row_margins, keep_margins[new]])
                params, loss, logits = evaluate(params)
                losses[-1] = float(loss.detach())
            grads = torch.autograd.grad(loss, [params[n] for n in names])
            directions = {n: subspace.project(n, g) for n, g in zip(names, grads)}
            # <G, G M>: the loss's first-order decrease per unit step (|G P|^2 for a hard projector P)
            norm2 = sum(float((g * directions[n]).sum()) for n, g in zip(names, grads))
            if norm2 == 0.0:
                break  # the subspace holds no direction that moves this loss
            # Polyak step, halved until the loss goes down (the margin is not linear in the weights).
            rate = step_scale * losses[-1] / norm2
            for _ in range(MAX_HALVINGS):
                candidate = {n: p - rate * directions[n] if n in directions else p for n, p in params.items()}
                candidate, candidate_loss, candidate_logits = evaluate(candidate)
                if float(candidate_loss.detach()) < losses[-1]:
                    break
                rate /= 2
            else:
                break  # no step along this direction lowers the loss
            params, loss, logits = candidate, candidate_loss, candidate_logits
            losses.append(float(loss.detach()))
            steps += 1
    success = bool((logits[: len(targets)].argmax(1) == targets).all())
    params = {n: p.detach() for n, p in params.items()}
    return EditResult(params, success, steps, losses, time.perf_counter() - start, logits[: len(targets)].detach())


_sample_covariances: OrderedDict[tuple, tuple[dict[str, torch.Tensor], int]] = OrderedDict()
_sample_covariances_lock = threading.Lock()


def sample_covariances(editable: EditableModel, batch_size: int = 500) -> tuple[dict[str, torch.Tensor], dict]:
    """The shipped training sample's input covariances for `editable`'s local weights, with their `about`: computed
    once per process for the same weights (sha256) and normalisation, kept for the last SAMPLE_COVARIANCES_KEPT
    models, so a second model object or a second command in one process on those weights does not pay ~19 s of CPU
    again."""
    names = local_weight_names(editable)
    key = (weights_fingerprint(editable.model), tuple(names), editable.domain)  # the domain normalises the anchors
    with _sample_covariances_lock:
        if key not in _sample_covariances:
            anchors, device = load_train_sample().images, next(editable.model.parameters()).device
            batches = (editable.domain.normalize(anchors[i : i + batch_size].to(device))
                       for i in range(0, len(anchors), batch_size))
            _sample_covariances[key] = anchor_covariances(editable.model, names, batches)
            while len(_sample_covariances) > SAMPLE_COVARIANCES_KEPT:
                _sample_covariances.popitem(last=False)
        _sample_covariances.move_to_end(key)
        covariances, images = _sample_covariances[key]
    return covariances, {"anchors": f"{images} images"}


def in_conv_layout(features: torch.Tensor) -> torch.Tensor:
    """Image-shaped activations in channels_last, where every check of a guard's rows runs ~1.5x faster on CPU
    (float32 and bfloat16); others (a transformer's tokens) as they are."""
    return features.contiguous(memory_format=torch.channels_last) if features.dim() == 4 else features


def with_guard(keep_features: torch.Tensor, keep_targets: torch.Tensor,
               guard: tuple[torch.Tensor, torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A session's corrections to keep (KEEP_MARGIN each) and the guarded anchors (`LocalEditor.guard_rows`) as one
    set of kept rows: (features, targets, margins) for `local_edit`."""
    features, classes, margins = guard
    keep_features = in_conv_layout(keep_features.to(features.device))  # as the guard's, so the rows stay in it
    return (torch.cat([keep_features, features]),
            torch.cat([keep_targets.view(-1).to(classes.device), classes]),
            torch.cat([torch.full((len(keep_features),), KEEP_MARGIN, device=margins.device), margins]))


@register_editor
class LocalEditor(Editor):
    """`local_edit` behind the editor interface, so the app, the CLI and the fixers can pick it by name.

    Its `lr` is a multiplier of the Polyak step (1: close the linearised margin gap exactly). The
    anchor subspace of each EditableModel is computed on first use from `anchors` (default: the EditableModel's
    own; else the statistics shipped for exactly these weights, `anchor_stats`; else the shipped 2,000-image
    CIFAR-10 training sample) and cached on that EditableModel.
    """

    name = "local"
    default_lr = 1.0
    default_max_steps = DEFAULT_MAX_STEPS
    default_layers = "layer3"  # every conv of the stage: spread over them, a session drifts less than on one conv (LOCALITY.md)
    differentiable = False

    def __init__(self, lr: float | None = None, learnable: bool = False, energy: float = DEFAULT_ENERGY,
                 margin: float = DEFAULT_MARGIN, copies: int = DEFAULT_COPIES, anchors: torch.Tensor | None = None,
                 guard: int = DEFAULT_GUARD):
        if learnable:
            raise ValueError("the local editor has no learnable hyper-parameters")
        super().__init__(lr)
        if not 0 < energy <= 1 or margin < 0 or copies < 0 or guard < 0:
            raise ValueError("local editor needs 0 < energy <= 1, margin >= 0, copies >= 0, guard >= 0; "
                             f"got {energy}, {margin}, {copies}, {guard}")
        self.energy, self.margin, self.copies, self.anchors = float(energy), float(margin), int(copies), anchors
        self.guard = int(guard)

    def hyperparameters(self) -> dict[str, float]:
        return {"lr": float(self.lr.detach()), "energy": self.energy, "margin": self.margin, "copies": self.copies,
                "guard": self.guard}

    def guard_rows(self, editable: EditableModel) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(features, classes, margins) of the guarded images: of this editor's anchors, else the model's, else the
        shipped training sample, and of their mirror images, the `guard` whose base-model margins are smallest (the
        images an edit flips first; at most GUARD_FLOPS a check), with their base-model classes, each to be kept with
        GUARD_SHARE of its base margin, at most KEEP_MARGIN. Computed once per base model, as the subspace."""
        cache = (editable.cache if self.anchors is None else self.__dict__).setdefault("_guard_rows", {})
        key = (editable.prefixes, self.guard) if self.anchors is None else (id(editable), self.guard)
        if key not in cache:
            device = next(editable.model.parameters()).device
            anchors = self.anchors if self.anchors is not None else editable.anchors
            anchors = load_train_sample().images if anchors is None else anchors
            # Mirror images: as many new rows again, as natural as the anchors (training flips them too), for free.
            anchors = torch.cat([anchors, anchors.flip(-1)])

            def features(images: torch.Tensor) -> torch.Tensor:
                return torch.cat([editable.features(editable.domain.normalize(images[i : i + 500].to(device)))
                                  for i in range(0, len(images), 500)])

            with torch.no_grad(), eval_mode(editable.model):
                logits = torch.cat([editable.logits_from_features(features(anchors[i : i + 500]))
                                    for i in range(0, len(anchors), 500)])
                classes = logits.argmax(1)
                margins = logit_margins(logits, classes)
                one_row = features(anchors[:1])
                with FlopCounterMode(display=False) as counter:  # a check runs only the stage after the features
                    editable.logits_from_features(one_row)
                count = min(self.guard, GUARD_FLOPS // max(1, counter.get_total_flops()))
                rows = margins.argsort()[:count].cpu()
                cache[key] = (in_conv_layout(features(anchors[rows])),
                              classes[rows.to(classes.device)],
                              (margins[rows.to(margins.device)] * GUARD_SHARE).clamp(max=KEEP_MARGIN))
        return cache[key]

    def subspace(self, editable: EditableModel) -> AnchorSubspace:
        """The anchor subspace for `editable`: with the model's anchors (`editable.anchors`, else the shipped
        ones), computed once per base model (`editable.cache`; editors are made per edit, models live on); with
        anchors given to this editor, once per editor."""
        cache = (editable.cache if self.anchors is None else self.__dict__).setdefault("_anchor_subspaces", {})
        key = (editable.prefixes, self.energy) if self.anchors is None else (id(editable), self.energy)
        if key not in cache:
            device = next(editable.model.parameters()).device
            anchors = self.anchors if self.anchors is not None else editable.anchors
            shipped = shipped_covariances(editable.model, local_weight_names(editable)) if anchors is None else None
            if shipped is not None:
                cache[key] = AnchorSubspace(editable, None, self.energy, covariances=shipped[0], about=shipped[1])
            elif anchors is None:
                covariances, about = sample_covariances(editable)
                cache[key] = AnchorSubspace(editable, None, self.energy, covariances=covariances, about=about)
            else:
                cache[key] = AnchorSubspace(editable, editable.domain.normalize(anchors.to(device)), self.energy)
        return cache[key]

    def weights_changed(self, editable: EditableModel) -> None:
        """Training moved the weights, so the anchors' inputs to the edited layer moved: recompute the
        subspace on next use."""
        for owner in (editable.cache, self.__dict__):
            owner.pop("_anchor_subspaces", None)
            owner.pop("_guard_rows", None)

    def apply_edit(self, editable: EditableModel, inputs: torch.Tensor, targets: torch.Tensor, max_steps: int,
                   params: Params | None = None, keep: tuple[torch.Tensor, torch.Tensor] | None = None) -> EditResult:
        keep_features, keep_targets = keep if keep is not None else (None, None)
        keep_margins = None
        if self.guard and keep_features is not None and len(keep_features):  # a session with corrections to keep
            keep_features, keep_targets, keep_margins = with_guard(keep_features, keep_targets, self.guard_rows(editable))
        return local_edit(editable, inputs, targets, self.subspace(editable), max_steps, self.margin, self.copies,
                          params, keep_targets=keep_targets, step_scale=float(self.lr.detach()),
                          keep_features=keep_features, keep_margins=keep_margins)

    def step(self, params, grads, state):
        raise NotImplementedError("the local editor edits through apply_edit, not per-step updates")
