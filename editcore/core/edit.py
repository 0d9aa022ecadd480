"""The edit: a few editor steps on the editable parameters until the target is the argmax.

An edited model is never a modified module: it is the base module plus a dict of replacement
tensors for the editable parameters, run through `torch.func.functional_call`. Inputs to the first
editable stage do not change under an edit, so they are computed once (`features`) and every step
re-runs only the stages from the split on.
"""
from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass, field
from typing import Sequence

import torch
from torch import nn
from torch.func import functional_call

from .domain import CIFAR10, Domain
from .editors import Editor, Params
from .models import StagedNet, editable_names

ORDERS = ("none", "first", "second")


def logit_margins(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Target score minus the largest other score, per row (> 0 iff the target is the argmax)."""
    target = logits.gather(1, targets.view(-1, 1)).squeeze(1)
    others = logits.masked_fill(nn.functional.one_hot(targets, logits.shape[1]).bool(), float("-inf"))
    return target - others.max(dim=1).values


def edit_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean over the batch of max(0, max_{c != y} log p(c|x) - log p(y|x))."""
    return torch.clamp(-logit_margins(torch.log_softmax(logits, dim=1), targets), min=0).mean()


def is_success(logits: torch.Tensor, targets: torch.Tensor) -> bool:
    return bool((logits.argmax(dim=1) == targets).all())


@contextlib.contextmanager
def eval_mode(model: nn.Module):
    """Batch norm in eval mode (running statistics) for the duration, then restore (`model.train(was)` sets every
    submodule to the model's own mode). A model already all in eval mode is left alone: switching walks every
    module twice, ~0.5 ms on a ResNet-20, and an edit and its scoring enter this ~8 times."""
    was_training = model.training
    switch = was_training or any(module.training for module in model.modules())
    if switch:
        model.eval()
    try:
        yield model
    finally:
        if switch:
            model.train(was_training)


def has_tied_tensors(model: nn.Module) -> bool:
    """Whether one tensor is registered under two names. Only then must `functional_call` replace it under
    both (`tie_weights`), which costs a walk of the whole module per call (~1 ms on a ResNet-20)."""
    tensors = [t for _, t in (*model.named_parameters(remove_duplicate=False), *model.named_buffers(remove_duplicate=False))]
    return len({id(tensor) for tensor in tensors}) < len(tensors)


def model_domain(model: nn.Module) -> Domain:
    """The model's class names, image size and normalisation (`StagedNet.domain`; CIFAR-10 for a plain module)."""
    return getattr(model, "domain", CIFAR10)


class EditableModel:
    """A base model, the names of its editable parameters, and the stage where they begin. `anchors`: uint8
    images that stand for "everything else" to the local editor (None: the shipped CIFAR-10 training sample)."""

    def __init__(self, model: StagedNet, prefixes: str | Sequence[str], cache: dict | None = None,
                 anchors: torch.Tensor | None = None):
        self.model = model
        self.anchors = anchors
        # What depends only on the base weights (the local editor's anchor subspace): copies of one model
        # pass the same dict, so it is computed once.
        self.cache = {} if cache is None else cache
        self.prefixes = prefixes if isinstance(prefixes, str) else ",".join(prefixes)
        self.names = editable_names(model, self.prefixes)
        self.split = model.first_stage_of(self.names)
        self.tied = has_tied_tensors(model)
        own = dict(model.named_parameters())
        self._own = {n: own[n] for n in self.names}

    @property
    def domain(self) -> Domain:
        return model_domain(self.model)

    def base_params(self) -> Params:
        """The model's own editable tensors (live; with grad when the model is being trained)."""
        return dict(self._own)

    def frozen_base_params(self) -> Params:
        return {n: p.detach() for n, p in self._own.items()}

    def features(self, inputs: torch.Tensor) -> torch.Tensor:
        """Activations entering the first editable stage; unchanged by any edit."""
        return self.model(inputs, end=self.split)

    def logits_from_features(self, features: torch.Tensor, params: Params | None = None) -> torch.Tensor:
        if not params:
            return self.model(features, start=self.split)
        return functional_call(self.model, params, (features,), {"start": self.split}, tie_weights=self.tied)

    def logits(self, inputs: torch.Tensor, params: Params | None = None) -> torch.Tensor:
        return self.logits_from_features(self.features(inputs), params)


@dataclass
class EditResult:
    params: Params  # new values of the editable parameters (the edited model = base + these)
    success: bool
    steps: int
    losses: list[float] = field(default_factory=list)
    seconds: float = 0.0
    final_logits: torch.Tensor | None = None

    def delta(self, base: Params) -> Params:
        return {n: (p - base[n]).detach() for n, p in self.params.items()}


def edit(
    editable: EditableModel,
    inputs: torch.Tensor,
    targets: torch.Tensor,
    editor: Editor,
    max_steps: int = 10,
    params: Params | None = None,
    order: str = "none",
    features: torch.Tensor | None = None,
    keep: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> EditResult:
    """Edit so that every input in the batch gets its target label.

    inputs: normalised images (N,3,H,W); targets: (N,) class indices. `params` are the editable
    tensors to start from (default: the base model's). `order` = 'none' for a plain edit, 'first' or
    'second' to keep the graph from the starting params through the steps (editable training).
    Returns the first parameters at which all targets are argmax, or the last ones after
    `max_steps` steps (success False). An editor with its own procedure (`apply_edit`, e.g. the local
    editor) runs that instead; `keep` = (features, targets) of earlier corrections such an editor
    holds in place, the features being their activations entering the editable stage
    (`editable.features`, which no edit changes); gradient editors ignore it.
    """
    if not editor.differentiable:
        if order != "none":
            raise ValueError(f"the {editor.name} editor does not support differentiable (order={order!r}) edits")
        return editor.apply_edit(editable, inputs, targets, max_steps, params, keep)
    if order not in ORDERS:
        raise ValueError(f"order must be one of {ORDERS}, not {order!r}")
    if max_steps < 0:
        raise ValueError("max_steps must be >= 0")
    targets = targets.view(-1).to(inputs.device)
    differentiable = order != "none"
    start = time.perf_counter()
    with eval_mode(editable.model), torch.set_grad_enabled(True):
        if features is None:
            with torch.set_grad_enabled(differentiable):
                features = editable.features(inputs)
        if params is None:
            params = editable.base_params() if differentiable else editable.frozen_base_params()
        if not differentiable:
            params = {n: p.detach().requires_grad_(True) for n, p in params.items()}
        state = editor.init_state(params)
        losses: list[float] = []
        steps = 0
        while True:
            logits = editable.logits_from_features(features, params)
            loss = edit_loss(logits, targets)
            losses.append(float(loss.detach()))
            success = is_success(logits.detach(), targets)
            if success or steps == max_steps:
                break
            grads = torch.autograd.grad(loss, list(params.values()), create_graph=order == "second", allow_unused=True)
            grads = {n: torch.zeros_like(p) if g is None else g for (n, p), g in zip(params.items(), grads)}
            if not differentiable:
                with torch.no_grad():
                    params, state = editor.step(params, grads, state)
                params = {n: p.requires_grad_(True) for n, p in params.items()}
            else:
                if order == "first":
                    grads = {n: g.detach() for n, g in grads.items()}
                params, state = editor.step(params, grads, state)
            steps += 1
    if not differentiable:
        params = {n: p.detach() for n, p in params.items()}
        logits = logits.detach()
    if inputs.is_cuda:
        torch.cuda.synchronize(inputs.device)
    return EditResult(params, success, steps, losses, time.perf_counter() - start, logits)
