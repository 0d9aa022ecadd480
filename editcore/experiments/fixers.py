"""The classic fixes Editable Training is measured against, behind one interface with the editor.

A fixer turns (image, target) into an `EditResult` and predicts with the fixed model:
- `EditorFixer`: the gradient editor (`edit()`) on the editable parameters;
- `FinetuneFixer`: SGD/Adam on the corrected sample mixed with replayed training images
  (`finetune()`): the given training set, or else the shipped 2,000-image training sample;
- `LookupFixer`: a patch store (`LookupTable`) that never touches weights and overrides the
  prediction for inputs that match the stored image, exactly or within a distance threshold.

Every fix starts from the unedited model and leaves it untouched: a fixed model is the base model
plus `result.params` (replacement tensors), or, for the lookup table, the base model's predictions
with the table's overrides.
"""
from __future__ import annotations

import time
from abc import ABC, abstractmethod
from dataclasses import dataclass
import torch
from torch import nn
from torch.func import functional_call

from ..core.data import ImageSet, load_train_sample
from ..core.edit import EditableModel, EditResult, edit, eval_mode, is_success, model_domain
from ..core.editors import Editor, Params
from ..core.heldout import HeldOutEvaluator, full_logits, inference_input
from ..core.models import StagedNet, editable_names

FIXERS = ("editor", "finetune", "lookup-exact", "lookup-nn")
# Fine-tuning's defaults everywhere (library, CLI, compare view), tuned on the C protocol (corrections of the
# shipped ResNet-20s; docs/FIXERS.md "Fine-tuning at its best"): Adam at lr 3e-5 on the editable stage (layer3),
# replaying 15 training images per step, stopping at the first step where the target is the top class. The lr
# is FINETUNE_DEFAULT_LR[optimizer]; prefix None trains every parameter (34-81 points of drawdown with SGD).
# max_steps is a budget, not a length: on the embedded sample, fine-tuning layer3 fixed all 197 corrections of the two
# shipped models in at most 11 steps and 20 R edits in at most 29 (issue 21); 500 lets it fix what it can rather
# than report the drawdown of edits it never made.
FINETUNE_DEFAULT_LR = {"sgd": 1e-3, "adam": 3e-5}
FINETUNE_DEFAULTS = {"optimizer": "adam", "max_steps": 500, "replay_ratio": 15, "prefix": "layer3"}
# Default nearest-neighbour thresholds. Pixel: mean |difference| of uint8 values / 255 (0..1);
# 0.03 admits a JPEG recompression or light noise of the stored image but not a 1-pixel shift of a
# typical CIFAR image. Feature: cosine distance (0..2) of the base model's penultimate features.
LOOKUP_DEFAULT_THRESHOLD = {"pixel": 0.03, "feature": 0.02}


@torch.no_grad()
def penultimate_features(model: StagedNet, images: torch.Tensor, batch_size: int = 1000) -> torch.Tensor:
    """The base model's input to its final linear layer (globally pooled last stage), (N, C)."""
    with eval_mode(model):
        return torch.cat([
            torch.flatten(nn.functional.adaptive_avg_pool2d(model(model_domain(model).normalize(images[i : i + batch_size]),
                                                                  end=-1), 1), 1)
            for i in range(0, len(images), batch_size)])


@dataclass
class FinetuneResult(EditResult):
    """A fine-tuning fix, with what it replayed: `replayed` training images drawn in all (replay_ratio per
    forward pass), from the ImageSet whose `source` is `replay_source` (None: no replay)."""
    replayed: int = 0
    replay_source: str | None = None


def finetune(
    model: StagedNet,
    x: torch.Tensor,
    target: torch.Tensor,
    replay: ImageSet | None,
    replay_ratio: int = FINETUNE_DEFAULTS["replay_ratio"],
    optimizer: str = FINETUNE_DEFAULTS["optimizer"],
    lr: float | None = None,
    max_steps: int = FINETUNE_DEFAULTS["max_steps"],
    gen: torch.Generator | None = None,
    prefix: str | None = FINETUNE_DEFAULTS["prefix"],
) -> FinetuneResult:
    """Fine-tune on the corrected sample plus `replay_ratio` replayed training images per step.

    x: the normalised image (1,3,H,W); target: (1,). Each step's batch is the corrected sample and
    `replay_ratio` images drawn (seeded by `gen`) from `replay` with their true labels. Loss:
    cross-entropy of the sample to its target + mean cross-entropy of the replayed images, so the
    sample weighs as much as the whole replay batch and is not drowned by it; the replay anchors
    the rest of the model. Batch norm stays in eval mode (running statistics unchanged). Stops at
    the first parameters where the target is the argmax, or after `max_steps` optimizer steps.

    Pure: `model` is untouched; `params` of the result hold new values of every parameter trained:
    those under the module prefix(es) in `prefix` (default layer3), or all of them when it is None.
    """
    if optimizer not in FINETUNE_DEFAULT_LR:
        raise ValueError(f"optimizer must be one of {sorted(FINETUNE_DEFAULT_LR)}, not {optimizer!r}")
    if max_steps < 0 or replay_ratio < 0:
        raise ValueError("max_steps and replay_ratio must be >= 0")
    if replay_ratio and (replay is None or len(replay) == 0):
        raise ValueError("replay_ratio > 0 needs replay images")
    lr = FINETUNE_DEFAULT_LR[optimizer] if lr is None else float(lr)
    names = editable_names(model, prefix) if prefix else [n for n, _ in model.named_parameters()]
    own = dict(model.named_parameters())
    target = target.view(-1).to(x.device)
    start = time.perf_counter()
    params = {n: own[n].detach().clone().requires_grad_(True) for n in names}
    opt = (torch.optim.SGD(params.values(), lr=lr, momentum=0.9) if optimizer == "sgd"
           else torch.optim.Adam(params.values(), lr=lr))
    losses: list[float] = []
    steps = 0
    with eval_mode(model), torch.enable_grad():
        while True:
            if replay_ratio:
                rows = torch.randint(0, len(replay), (replay_ratio,), generator=gen).to(replay.images.device)
                batch = torch.cat([x, model_domain(model).normalize(replay.images[rows]).to(x.device)])
            else:
                batch = x
            logits = functional_call(model, params, (batch,))
            sample_logits = logits[: len(x)]
            loss = nn.functional.cross_entropy(sample_logits, target)
            if replay_ratio:
                loss = loss + nn.functional.cross_entropy(logits[len(x):], replay.labels[rows].to(x.device))
            losses.append(float(loss.detach()))
            success = is_success(sample_logits.detach(), target)
            if success or steps == max_steps:
                break
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            steps += 1
    if x.is_cuda:
        torch.cuda.synchronize(x.device)
    return FinetuneResult({n: p.detach() for n, p in params.items()}, success, steps, losses,
                          time.perf_counter() - start, sample_logits.detach(), replay_ratio * len(losses),
                          replay.source if replay_ratio else None)


class LookupTable:
    """A patch store: overrides the base model's prediction on inputs matching a stored image.

    mode 'exact': only byte-identical images match. mode 'nearest': a query takes the label of its
    nearest stored image when the distance is <= `threshold`; distances live in `space`:
    - 'pixel': mean absolute difference of the uint8 values / 255 (0 = identical, 1 = black vs white);
    - 'feature': cosine distance 1 - cos(f_q, f_s) of the base model's penultimate-layer features
      (0..2); needs `model`.
    It never touches weights, so on held-out data it changes only images within the threshold of a
    stored one: its held-out drawdown is ~0 by construction (exactly 0 for 'exact' unless a held-out
    image is a byte copy of a patched one). By the same token it does not generalise beyond the
    threshold: a shifted or flipped copy of a patched image keeps the base model's mistake.
    """

    def __init__(self, mode: str = "exact", space: str = "pixel", threshold: float | None = None,
                 model: StagedNet | None = None):
        if mode not in ("exact", "nearest"):
            raise ValueError(f"mode must be 'exact' or 'nearest', not {mode!r}")
        if space not in LOOKUP_DEFAULT_THRESHOLD:
            raise ValueError(f"space must be 'pixel' or 'feature', not {space!r}")
        if mode == "nearest" and space == "feature" and model is None:
            raise ValueError("a feature-space lookup table needs the base model")
        self.mode, self.space, self.model = mode, space, model
        self.threshold = LOOKUP_DEFAULT_THRESHOLD[space] if threshold is None else float(threshold)
        if self.threshold < 0:
            raise ValueError("threshold must be >= 0")
        self.images = torch.empty(0, 3, 0, 0, dtype=torch.uint8)  # takes the first stored image's size
        self.labels = torch.empty(0, dtype=torch.long)
        self._features: torch.Tensor | None = None

    def __len__(self) -> int:
        return len(self.labels)

    def add(self, image: torch.Tensor, label: int) -> None:
        """Store one uint8 image (3,H,W) or (1,3,H,W) with the label it must get."""
        image = image.reshape(1, *image.shape[-3:])
        if image.dtype != torch.uint8:
            raise ValueError(f"lookup images are uint8, got {image.dtype}")
        if len(self) == 0:
            self.images = self.images.to(image.device).reshape(0, *image.shape[1:])
            self.labels = self.labels.to(image.device)
        self.images = torch.cat([self.images, image])
        self.labels = torch.cat([self.labels, torch.tensor([int(label)], device=image.device)])
        self._features = None

    def distances(self, images: torch.Tensor, features: torch.Tensor | None = None) -> torch.Tensor:
        """(N, K) distances from each query to each stored image in the table's space."""
        if self.space == "pixel":
            diff = images.float().unsqueeze(1) - self.images.float().unsqueeze(0)
            return diff.abs().flatten(2).mean(2) / 255.0
        if self._features is None:
            self._features = penultimate_features(self.model, self.images)
        queries = penultimate_features(self.model, images) if features is None else features
        cos = nn.functional.normalize(queries, dim=1) @ nn.functional.normalize(self._features, dim=1).T
        return 1.0 - cos

    @torch.no_grad()
    def predict(self, images: torch.Tensor, base_predictions: torch.Tensor,
                features: torch.Tensor | None = None) -> torch.Tensor:
        """Base predictions with the table's overrides. images uint8 (N,3,H,W); `features`: the
        queries' penultimate features when already computed (feature space only)."""
        predictions = base_predictions.clone()
        if len(self) == 0 or len(images) == 0:
            return predictions
        if self.mode == "exact":
            match = (images.unsqueeze(1) == self.images.unsqueeze(0)).flatten(2).all(2)  # (N, K)
            hit = match.any(1)
            predictions[hit] = self.labels[match[hit].float().argmax(1)].to(predictions.device)
            return predictions
        nearest, which = self.distances(images, features).min(1)
        hit = nearest <= self.threshold
        predictions[hit] = self.labels[which[hit]].to(predictions.device)
        return predictions


@dataclass
class PatchResult(EditResult):
    """A lookup-table fix: no parameter changes (`params` is {}), a table that overrides predictions."""
    table: LookupTable | None = None


class Fixer(ABC):
    """fix(image uint8 (1,3,H,W), target (1,)) -> EditResult; predict(result, images) -> classes."""

    name = "fixer"

    def __init__(self, model: StagedNet):
        self.model = model

    @abstractmethod
    def fix(self, image: torch.Tensor, target: torch.Tensor) -> EditResult:
        """Correct the model on `image` (uint8, one image) so that it predicts `target`."""

    @abstractmethod
    def hyperparameters(self) -> dict:
        """The settings that define this fixer, for reports."""

    def predict(self, result: EditResult | None, images: torch.Tensor) -> torch.Tensor:
        """Predicted classes of the fixed model (the base model when `result` is None) on uint8 images."""
        return full_logits(self.model, images, result.params if result is not None else None).argmax(1)

    def predict_heldout(self, result: EditResult, heldout: HeldOutEvaluator) -> torch.Tensor:
        """Predictions of the fixed model on the evaluator's held-out images (using its cache)."""
        return heldout.predict(result.params)


class EditorFixer(Fixer):
    """The gradient editor on the editable parameters (see `edit`)."""

    name = "editor"

    def __init__(self, editable: EditableModel, editor: Editor, max_steps: int = 10):
        super().__init__(editable.model)
        self.editable, self.editor, self.max_steps = editable, editor, max_steps
        self._features: tuple[torch.Tensor, torch.Tensor] | None = None  # (images, their features at the split)

    def fix(self, image: torch.Tensor, target: torch.Tensor) -> EditResult:
        return edit(self.editable, self.editable.domain.normalize(image), target, self.editor, self.max_steps)

    @torch.no_grad()
    def predict(self, result: EditResult | None, images: torch.Tensor) -> torch.Tensor:
        """As `Fixer.predict`, through the split: an edit changes only the stages from it on, so the features
        entering it are computed once for images predicted before and after a fix (the protocol's augmented
        views). The same stages run on the same layout as a whole forward pass: the same logits."""
        params = result.params if result is not None else None
        if params and self.model.first_stage_of(list(params)) < self.editable.split:
            return super().predict(result, images)
        if self._features is None or self._features[0] is not images:
            with eval_mode(self.model):
                self._features = (images, self.editable.features(inference_input(images, self.editable.domain)))
        with eval_mode(self.model):
            return self.editable.logits_from_features(self._features[1], params).argmax(1)

    def hyperparameters(self) -> dict:
        return {"editor": self.editor.name, **self.editor.hyperparameters(), "max_steps": self.max_steps,
                "prefix": self.editable.prefixes}


class FinetuneFixer(Fixer):
    """Fine-tuning with replay (see `finetune`); replay draws come from one seeded generator.

    `replay`: the training images to replay; None replays the shipped training sample
    (`load_train_sample`), so fine-tuning never runs without replay unless `replay_ratio` is 0.
    """

    name = "finetune"

    def __init__(self, model: StagedNet, replay: ImageSet | None = None,
                 replay_ratio: int = FINETUNE_DEFAULTS["replay_ratio"], optimizer: str = FINETUNE_DEFAULTS["optimizer"],
                 lr: float | None = None, max_steps: int = FINETUNE_DEFAULTS["max_steps"], seed: int = 0,
                 prefix: str | None = FINETUNE_DEFAULTS["prefix"]):
        super().__init__(model)
        if replay is None and replay_ratio:
            replay = load_train_sample()
        self.replay, self.replay_ratio, self.optimizer = replay, replay_ratio, optimizer
        self.lr = FINETUNE_DEFAULT_LR.get(optimizer) if lr is None else lr
        self.max_steps, self.prefix = max_steps, prefix
        self.gen = torch.Generator().manual_seed(seed)

    def fix(self, image: torch.Tensor, target: torch.Tensor) -> EditResult:
        return finetune(self.model, model_domain(self.model).normalize(image), target, self.replay, self.replay_ratio, self.optimizer,
                        self.lr, self.max_steps, self.gen, self.prefix)

    def hyperparameters(self) -> dict:
        return {"optimizer": self.optimizer, "lr": self.lr, "max_steps": self.max_steps,
                "replay_ratio": self.replay_ratio, "prefix": self.prefix or "all",
                "replay": self.replay.source if self.replay_ratio else None,
                "replay_size": len(self.replay) if self.replay_ratio else 0}


class LookupFixer(Fixer):
    """One `LookupTable` per fix holding the corrected image; success is True by construction
    (the stored image maps to its target), steps 0, no parameter changes."""

    def __init__(self, model: StagedNet, mode: str = "exact", space: str = "pixel", threshold: float | None = None):
        super().__init__(model)
        self.threshold = LookupTable(mode, space, threshold, model).threshold  # validates the settings
        self.mode, self.space = mode, space
        self.name = "lookup-exact" if mode == "exact" else "lookup-nn"
        self._heldout_features: tuple[object, torch.Tensor] | None = None

    def fix(self, image: torch.Tensor, target: torch.Tensor) -> EditResult:
        start = time.perf_counter()
        table = LookupTable(self.mode, self.space, self.threshold, self.model)
        table.add(image, int(target.view(-1)[0]))
        return PatchResult({}, True, 0, [], time.perf_counter() - start, None, table)

    def predict(self, result: EditResult | None, images: torch.Tensor) -> torch.Tensor:
        base = super().predict(None, images)
        return result.table.predict(images, base) if isinstance(result, PatchResult) else base

    def predict_heldout(self, result: EditResult, heldout: HeldOutEvaluator) -> torch.Tensor:
        features = None
        if self.mode == "nearest" and self.space == "feature":
            # The held-out set's features do not change between fixes: compute them once per evaluator.
            if self._heldout_features is None or self._heldout_features[0] is not heldout:
                self._heldout_features = (heldout, penultimate_features(self.model, heldout.images))
            features = self._heldout_features[1]
        return result.table.predict(heldout.images, heldout.base_predictions, features)

    def hyperparameters(self) -> dict:
        return {"mode": self.mode, "space": self.space, "threshold": self.threshold}
