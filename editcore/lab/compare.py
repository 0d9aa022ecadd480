"""The teaching view's numbers: one correction, fixed by every method, each from its unedited model.

Methods, each on every loaded model (baseline- and editable-trained): a lookup table (exact match, and nearest
neighbour in pixel space), fine-tuning (until the image is fixed, within a step budget), the page's local editor and
the paper's RMSProp at their tuned default rates, RMSProp at the rate editable training learned where there is one,
and the editor selected on the page when it is another. For each: success, steps, time, held-out accuracy before
and after (the corrected image left out when it is a held-out image), how many held-out predictions the fix
corrected or broke, and its predictions on augmented views of the image (does it generalise?).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch

from ..core.augment_views import augmented_views
from ..core.data import TRAIN_SAMPLE_SOURCE, ImageSet
from ..core.editors import EDITORS
from ..experiments.fixers import FINETUNE_DEFAULTS, EditorFixer, FinetuneFixer, Fixer, LookupFixer
from .session import SettingsError, SharedModel, lesson_editors


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
    n_heldout: int = 0  # held-out images scored (the corrected image left out when it is one of them)
    max_steps: int | None = None  # the step budget it had (None: no steps)

    def to_dict(self) -> dict:
        return {k: v for k, v in self.__dict__.items()}


def _run(title: str, detail: str, shared: SharedModel, fixer: Fixer, image: torch.Tensor, target: int,
         views: torch.Tensor, heldout_row: int | None = None) -> MethodOutcome:
    """One method's fix and its scores; `heldout_row`: the corrected image's row in the held-out set, left out
    of the held-out figures (an image cannot be held out from its own correction)."""
    evaluator = shared.evaluator(shared.default_layers)
    labels = evaluator.labels
    views = views.to(shared.device)
    with shared.replica(shared.primary):  # the fixers run the first replica's module
        result = fixer.fix(image[None].to(shared.device), torch.tensor([target], device=shared.device))
        before, after = evaluator.base_predictions, fixer.predict_heldout(result, evaluator)
        views_before = fixer.predict(None, views).tolist()
        views_after = fixer.predict(result, views).tolist()
    if heldout_row is not None:
        keep = torch.ones(len(labels), dtype=torch.bool, device=labels.device)
        keep[heldout_row] = False
        labels, before, after = labels[keep], before[keep], after[keep]
    changed = before != after
    return MethodOutcome(
        title, shared.name, detail, bool(result.success), int(result.steps), float(result.seconds),
        int((before == labels).sum()) / len(labels), int((after == labels).sum()) / len(labels),
        int((changed & (after == labels)).sum()), int((changed & (before == labels)).sum()),
        views_before, views_after, fixer.hyperparameters(), len(labels), fixer_budget(fixer))


def fixer_budget(fixer: Fixer) -> int | None:
    """The most steps the fixer may take (None: it takes none, as a lookup table)."""
    return getattr(fixer, "max_steps", None)


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
                  heldout_row: int | None = None,
                  progress: Callable[[float, str], None] = lambda f, s: None) -> tuple[torch.Tensor, list[MethodOutcome]]:
    """Fix `image` (uint8 (3,H,W)) to `target` with every method on every model; returns (augmented views,
    outcomes), grouped by method: the lookup tables (exact, nearest neighbour), fine-tuning, the page's two editors
    (`lesson_editors`: the local one and the paper's) at their defaults, the paper's as editable training learned
    it (where a model learned one), and
    `editor` (the page's selection, at `max_steps`) when it is another.
    `replay`: training images that fine-tuning mixes in (None: the shipped training sample); fine-tuning uses the
    library defaults (`FINETUNE_DEFAULTS`) on each model's editable layers and stops at the first step that fixes
    the image, `finetune_steps` at most. `heldout_row`: the image's row in the held-out set when it is a held-out
    image: left out of every held-out figure."""
    if not models:
        raise SettingsError("no model is loaded")
    if editor not in EDITORS:
        raise SettingsError(f"editor must be one of {', '.join(EDITORS)}, got {editor!r}")
    views = augmented_views(image)
    lesson = lesson_editors(models)  # every comparison shows them, whatever the page has selected
    editors = [*lesson, *([editor] if editor not in lesson else [])]
    plans: list[tuple[str, str, SharedModel, Callable[[], Fixer]]] = []
    for name, shared in models.items():
        plans.append((f"Lookup table, exact match ({name} model)", "overrides the prediction only for this exact image",
                      shared, lambda shared=shared: LookupFixer(shared.model, "exact")))
    for name, shared in models.items():
        plans.append((f"Lookup table, nearest neighbour ({name} model)",
                      "overrides it for images within a small pixel distance", shared,
                      lambda shared=shared: LookupFixer(shared.model, "nearest", "pixel")))
    for name, shared in models.items():
        finetuner = FinetuneFixer(shared.model, replay, max_steps=finetune_steps, prefix=shared.default_layers)
        plans.append((f"Fine-tuning ({name} model)", finetune_detail(finetuner), shared, lambda f=finetuner: f))
    for kind in editors:
        steps = max_steps if kind == editor else EDITORS[kind].default_max_steps
        lr, title = EDITORS[kind].default_lr, EDITOR_TITLES.get(kind, kind)
        for name, shared in models.items():
            layers = shared.layers_for(kind)
            rate = "step scale" if kind == "local" else "lr"
            plans.append((f"{title} on the {name} model",
                          f"{kind}, {rate} {lr:.3g} (the default), up to {steps} steps on {layers}", shared,
                          lambda shared=shared, layers=layers, kind=kind, lr=lr, steps=steps:
                          EditorFixer(shared.editable(layers), shared.make_editor(kind, lr), steps)))
            if (learned := shared.learned_hyperparameters(kind)) is not None:
                plans.append((f"{title} on the {name} model, as learned",
                              f"{kind} as editable training learned it ({hyperparameter_text(learned)}), "
                              f"up to {steps} steps on {shared.default_layers}", shared,
                              lambda shared=shared, steps=steps: EditorFixer(shared.editable(shared.default_layers),
                                                                             shared.learned_editor, steps)))
    outcomes = []
    for i, (title, detail, shared, make) in enumerate(plans):
        progress(i / len(plans), title)
        outcomes.append(_run(title, detail, shared, make(), image, target, views, heldout_row))
    return views, outcomes


def hyperparameter_text(hyperparameters: dict[str, float]) -> str:
    """An editor's hyper-parameters in words: 'lr 0.001, beta 0.21'."""
    return ", ".join(f"{name} {value:.3g}" for name, value in hyperparameters.items())


EDITOR_TITLES = {"local": "Local editor", "rmsprop": "RMSProp (the paper's editor)", "rmsprop-paper":
                 "RMSProp as in the paper's code", "gd": "Gradient descent", "momentum": "Momentum", "adam": "Adam"}
