"""Editors: optimizers written as pure functions over dicts of parameter tensors.

`editor.step(params, grads, state)` returns new dicts and never touches its inputs, so the base
model stays intact and, when the caller builds the gradients with `create_graph=True`, the whole
chain of steps is differentiable (editable training backpropagates through it). The learning rate
(and beta where there is one) are modules' parameters, stored in log / logit form so they stay in
range; they are trained with the model when `learnable=True`.
"""
from __future__ import annotations

import math

import torch
from torch import nn

Params = dict[str, torch.Tensor]


def _logit(p: float) -> float:
    return math.log(p / (1.0 - p))


class Editor(nn.Module):
    name = "editor"
    # Default lrs: the smallest value reaching >= 99% success on 100 tuning edits of the shipped
    # ResNet-20 baseline (docs/RESULTS.md, "Editor learning rates"); larger ones cost far more accuracy.
    default_lr = 1e-4
    default_max_steps = 10  # the paper's k
    default_layers: str | None = None  # None: the checkpoint's editable prefix (paper, CIFAR: layer3)
    # False for an editor with its own procedure (`apply_edit`, the local one): no per-step updates to
    # differentiate through, so editable training with it is first order.
    differentiable = True
    beta_names: tuple[str, ...] = ()
    beta_defaults: tuple[float, ...] = ()
    frozen: tuple[str, ...] = ()  # parameters that stay fixed even when the editor is learnable

    def __init__(self, lr: float | None = None, learnable: bool = False, **betas: float):
        super().__init__()
        lr = self.default_lr if lr is None else float(lr)
        if not (math.isfinite(lr) and lr > 0):
            raise ValueError(f"learning rate must be a positive number, got {lr}")
        self.log_lr = nn.Parameter(torch.tensor(math.log(lr)))
        for name, default in zip(self.beta_names, self.beta_defaults):
            value = float(betas.pop(name, default))
            if not 0.0 < value < 1.0:
                raise ValueError(f"{name} must lie strictly between 0 and 1, got {value}")
            self.register_parameter(f"logit_{name}", nn.Parameter(torch.tensor(_logit(value))))
        if betas:
            raise ValueError(f"{self.name} takes no {sorted(betas)}")
        self.set_learnable(learnable)

    def weights_changed(self, editable) -> None:
        """The model's weights moved (training): forget what was computed from them (none here)."""

    def set_learnable(self, learnable: bool) -> "Editor":
        """Train the lr/betas with the model (all but `frozen`), or keep them fixed."""
        for name, param in self.named_parameters():
            param.requires_grad_(learnable and name not in self.frozen)
        return self

    @property
    def lr(self) -> torch.Tensor:
        return self.log_lr.exp()

    def beta(self, name: str) -> torch.Tensor:
        return torch.sigmoid(getattr(self, f"logit_{name}"))

    def hyperparameters(self) -> dict[str, float]:
        values = {"lr": float(self.lr.detach())}
        values.update({name: float(self.beta(name).detach()) for name in self.beta_names})
        return values

    def init_state(self, params: Params) -> dict:
        return {}

    def step(self, params: Params, grads: Params, state: dict) -> tuple[Params, dict]:
        raise NotImplementedError


class GradientDescent(Editor):
    name = "gd"
    default_lr = 1e-3

    def step(self, params, grads, state):
        lr = self.lr
        return {n: p - lr * grads[n] for n, p in params.items()}, state


class Momentum(Editor):
    name = "momentum"
    default_lr = 3e-4
    beta_names = ("momentum",)
    beta_defaults = (0.9,)

    def init_state(self, params):
        return {"velocity": {n: torch.zeros_like(p) for n, p in params.items()}}

    def step(self, params, grads, state):
        lr, mu = self.lr, self.beta("momentum")
        velocity = {n: mu * state["velocity"][n] + grads[n] for n in params}
        return {n: p - lr * velocity[n] for n, p in params.items()}, {"velocity": velocity}


class RMSProp(Editor):
    name = "rmsprop"
    default_lr = 1e-4
    beta_names = ("beta",)
    beta_defaults = (0.9,)
    eps = 1e-10  # added under the square root: keeps its derivative finite when a gradient is exactly 0

    def init_state(self, params):
        return {"square": {n: torch.zeros_like(p) for n, p in params.items()}}

    def step(self, params, grads, state):
        lr, beta = self.lr, self.beta("beta")
        square = {n: beta * state["square"][n] + (1 - beta) * grads[n] ** 2 for n in params}
        return {n: p - lr * grads[n] / (square[n] + self.eps).sqrt() for n, p in params.items()}, {"square": square}


class PaperRMSProp(RMSProp):
    """The paper code's IngraphRMSProp (its CIFAR notebook): the running average starts at the first g^2,
    so every edit's first step is lr * sign(g); beta starts at 0.5 and is learnable, the lr stays fixed."""

    name = "rmsprop-paper"
    default_lr = 1e-3
    beta_defaults = (0.5,)
    frozen = ("log_lr",)

    def init_state(self, params):
        return {"square": None}

    def step(self, params, grads, state):
        if state["square"] is None:  # beta * g^2 + (1 - beta) * g^2 = g^2: the average starts at the first g^2
            state = {"square": {n: grads[n] ** 2 for n in params}}
        return super().step(params, grads, state)


class Adam(Editor):
    name = "adam"
    default_lr = 1e-4
    beta_names = ("beta1", "beta2")
    beta_defaults = (0.9, 0.999)
    eps = 1e-10

    def init_state(self, params):
        zeros = lambda: {n: torch.zeros_like(p) for n, p in params.items()}  # noqa: E731
        return {"mean": zeros(), "square": zeros(), "t": 0}

    def step(self, params, grads, state):
        lr, b1, b2 = self.lr, self.beta("beta1"), self.beta("beta2")
        t = state["t"] + 1
        mean = {n: b1 * state["mean"][n] + (1 - b1) * grads[n] for n in params}
        square = {n: b2 * state["square"][n] + (1 - b2) * grads[n] ** 2 for n in params}
        scale = lr * (1 - b2**t).sqrt() / (1 - b1**t)
        new = {n: p - scale * mean[n] / (square[n] + self.eps).sqrt() for n, p in params.items()}
        return new, {"mean": mean, "square": square, "t": t}


EDITORS: dict[str, type[Editor]] = {cls.name: cls for cls in (GradientDescent, Momentum, RMSProp, PaperRMSProp, Adam)}


def register_editor(cls: type[Editor]) -> type[Editor]:
    """Make an editor class available by name (create_editor, the CLI, the app)."""
    EDITORS[cls.name] = cls
    return cls


def create_editor(name: str, lr: float | None = None, learnable: bool = False, **betas: float) -> Editor:
    if name not in EDITORS:
        raise ValueError(f"unknown editor {name!r}; choose from {sorted(EDITORS)}")
    return EDITORS[name](lr=lr, learnable=learnable, **betas)


def editor_from_state(name: str, state: dict[str, torch.Tensor]) -> Editor:
    """Rebuild an editor (with its learned lr/betas) from the tensors a checkpoint stored."""
    editor = create_editor(name)
    editor.load_state_dict({k: v.clone() for k, v in state.items()})
    return editor
