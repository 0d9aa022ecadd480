"""The teaching view's numbers: one correction, fixed by every method, each from its unedited model.

Methods: a lookup table (exact match, and nearest neighbour in pixel space) and fine-tuning of one
model (the one the user is looking at), and the gradient editor on every loaded model (baseline- and editable-trained)
at the editor's tuned default rate, and at the rate editable training learned where there is one.
For each: success, steps, time, held-out accuracy before and after, how many held-out predictions
the fix corrected or broke, and its predictions on augmented views of the image (does it generalise?).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch

from .augment_views import augmented_views
from .data import TRAIN_SAMPLE_SOURCE, ImageSet
from .editors import EDITORS
from .fixers import FINETUNE_DEFAULTS, EditorFixer, FinetuneFixer, Fixer, LookupFixer
from .session import SettingsError, SharedModel


@dataclass
class MethodOutcome:
    title: str  # what the method is, for a newcomer
    model: str  # which shared model it fixed
    detail: str  # its settings in words
    success: bool
    steps: int
    seconds: float
    accuracy_before: float
    accuracy_after: float
    n_fixed: int
    n_broken: int
    views_before: list[int]
    views_after: list[int]
    hyperparameters: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return {k: v for k, v in self.__dict__.items()}


def _run(title: str, detail: str, shared: SharedModel, fixer: Fixer, image: torch.Tensor, target: int,
         views: torch.Tensor) -> MethodOutcome:
    evaluator = shared.evaluator(shared.default_layers)
    labels = evaluator.labels
    views = views.to(shared.device)
    with shared.replica(shared.primary):  # the fixers run the first replica's module
        result = fixer.fix(image[None].to(shared.device), torch.tensor([target], device=shared.device))
        before, after = evaluator.base_predictions, fixer.predict_heldout(result, evaluator)
        views_before = fixer.predict(None, views).tolist()
        views_after = fixer.predict(result, views).tolist()
    changed = before != after
    return MethodOutcome(
        title, shared.name, detail, bool(result.success), int(result.steps), float(result.seconds),
        int((before == labels).sum()) / len(labels), int((after == labels).sum()) / len(labels),
        int((changed & (after == labels)).sum()), int((changed & (before == labels)).sum()),
        views_before, views_after, fixer.hyperparameters())


def replay_source_label(replay: ImageSet) -> str:
    """Where fine-tuning's replayed images come from, in words."""
    if replay.source == TRAIN_SAMPLE_SOURCE:
        return f"the shipped {len(replay):,}-image training sample"
    if replay.source == "cifar10-train":
        return f"the CIFAR-10 training set ({len(replay):,} images)"
    return f"{replay.source} ({len(replay):,} images)"


def finetune_detail(fixer: FinetuneFixer) -> str:
    """Fine-tuning's settings in words, from the fixer itself so the page cannot say otherwise."""
    layers = "all weights" if fixer.prefix is None else fixer.prefix
    replay = (f"{fixer.replay_ratio} replayed images per step from {replay_source_label(fixer.replay)}"
              if fixer.replay_ratio else "no replay")
    return (f"{'SGD (momentum 0.9)' if fixer.optimizer == 'sgd' else 'Adam'} on {layers}, lr {fixer.lr:.3g}, up to "
            f"{fixer.max_steps} steps (stops when the target is the top class), {replay}")


def compare_fixes(models: dict[str, SharedModel], image: torch.Tensor, target: int, editor: str, max_steps: int,
                  replay: ImageSet | None = None, finetune_steps: int = FINETUNE_DEFAULTS["max_steps"],
                  patched: str | None = None,
                  progress: Callable[[float, str], None] = lambda f, s: None) -> tuple[torch.Tensor, list[MethodOutcome]]:
    """Fix `image` (uint8 (3,H,W)) to `target` with every method; returns (augmented views, outcomes).
    `replay`: training images that fine-tuning mixes in (None: the shipped training sample); fine-tuning
    uses the library defaults (`FINETUNE_DEFAULTS`) on the model's editable layers, `finetune_steps` steps at most.
    `patched`: the model the lookup tables and fine-tuning fix (default: 'baseline', else the first)."""
    if not models:
        raise SettingsError("no model is loaded")
    patched = patched or ("baseline" if "baseline" in models else next(iter(models)))
    if patched not in models:
        raise SettingsError(f"model must be one of {', '.join(models)}, got {patched!r}")
    views = augmented_views(image)
    practical = models[patched]
    finetuner = FinetuneFixer(practical.model, replay, max_steps=finetune_steps, prefix=practical.default_layers)
    plans: list[tuple[str, str, SharedModel, Callable[[], Fixer]]] = [
        (f"Lookup table, exact match ({patched} model)", "overrides the prediction only for this exact image",
         practical, lambda: LookupFixer(practical.model, "exact")),
        (f"Lookup table, nearest neighbour ({patched} model)", "overrides it for images within a small pixel distance",
         practical, lambda: LookupFixer(practical.model, "nearest", "pixel")),
        (f"Fine-tuning ({patched} model)", finetune_detail(finetuner), practical, lambda: finetuner),
    ]
    lr = EDITORS[editor].default_lr
    for name, shared in models.items():
        layers = shared.layers_for(editor)
        plans.append((f"Editor on the {name} model", f"{editor}, lr {lr:.3g} (the default), up to {max_steps} "
                      f"steps on {layers}", shared,
                      lambda shared=shared, layers=layers: EditorFixer(shared.editable(layers),
                                                                       shared.make_editor(editor, lr), max_steps)))
        if shared.learned_lr(editor) is not None:
            plans.append((f"Editor on the {name} model, learned rate", f"{editor} as editable training learned it "
                          f"(lr {shared.learned_lr(editor):.3g}), up to {max_steps} steps on {shared.default_layers}",
                          shared, lambda shared=shared: EditorFixer(shared.editable(shared.default_layers),
                                                                    shared.learned_editor, max_steps)))
    outcomes = []
    for i, (title, detail, shared, make) in enumerate(plans):
        progress(i / len(plans), title)
        outcomes.append(_run(title, detail, shared, make(), image, target, views))
    return views, outcomes
