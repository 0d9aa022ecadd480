"""CIFAR classifiers built as a chain of named stages.

Every model is `stem -> stage... -> head`, each a direct child, so parameter names read like
`layer3.0.conv1.weight` and a model can be run from any stage boundary: `model(x, start=i)`.
That is what lets an evaluator cache the activations entering the first edited stage and re-run
only the stages after it.
"""
from __future__ import annotations

from typing import Callable, Sequence

import torch
from torch import nn

from .domain import CIFAR10, Domain


class StagedNet(nn.Module):
    """Runs its direct children named in `stage_names` in order; `start`/`end` pick a slice. `domain`: the
    classes, image size and normalisation of its inputs (CIFAR-10 unless the model says otherwise)."""

    stage_names: tuple[str, ...] = ()
    domain: Domain = CIFAR10

    def forward(self, x: torch.Tensor, start: int = 0, end: int | None = None) -> torch.Tensor:
        for name in self.stage_names[start:end]:
            x = getattr(self, name)(x)
        return x

    def first_stage_of(self, param_names: Sequence[str]) -> int:
        """Index of the first stage that holds any of `param_names` (the cache boundary)."""
        for index, stage in enumerate(self.stage_names):
            if any(name.startswith(stage + ".") for name in param_names):
                return index
        raise ValueError(f"none of {list(param_names)[:3]}... belongs to a stage of {self.stage_names}")


class BasicBlock(nn.Module):
    def __init__(self, c_in: int, c_out: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.shortcut = nn.Sequential()
        if stride != 1 or c_in != c_out:
            self.shortcut = nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride, bias=False), nn.BatchNorm2d(c_out))

    def forward(self, x):
        out = torch.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return torch.relu(out + self.shortcut(x))


class Head(nn.Module):
    def __init__(self, c_in: int, num_classes: int):
        super().__init__()
        self.fc = nn.Linear(c_in, num_classes)

    def forward(self, x):
        return self.fc(torch.flatten(nn.functional.adaptive_avg_pool2d(x, 1), 1))


class CifarResNet(StagedNet):
    """ResNet for 32x32 inputs: 3x3 stem, no max-pool, stages of BasicBlocks, global pool + fc."""

    def __init__(self, widths: Sequence[int], blocks: Sequence[int], num_classes: int = 10):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, widths[0], 3, 1, 1, bias=False), nn.BatchNorm2d(widths[0]), nn.ReLU())
        names = ["stem"]
        c_in = widths[0]
        for i, (width, n_blocks) in enumerate(zip(widths, blocks)):
            stride = 1 if i == 0 else 2
            layers = [BasicBlock(c_in if j == 0 else width, width, stride if j == 0 else 1) for j in range(n_blocks)]
            setattr(self, f"layer{i + 1}", nn.Sequential(*layers))
            names.append(f"layer{i + 1}")
            c_in = width
        self.head = Head(c_in, num_classes)
        self.stage_names = tuple(names + ["head"])
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")


class CifarVGG(StagedNet):
    """A small VGG (conv-BN-ReLU blocks with max-pool): an architecture unlike ResNet, for filtering."""

    def __init__(self, widths: Sequence[int] = (64, 128, 256, 512), num_classes: int = 10):
        super().__init__()
        names = []
        c_in = 3
        for i, width in enumerate(widths):
            block = nn.Sequential(
                nn.Conv2d(c_in, width, 3, 1, 1, bias=False), nn.BatchNorm2d(width), nn.ReLU(),
                nn.Conv2d(width, width, 3, 1, 1, bias=False), nn.BatchNorm2d(width), nn.ReLU(),
                nn.MaxPool2d(2),
            )
            setattr(self, f"block{i + 1}", block)
            names.append(f"block{i + 1}")
            c_in = width
        self.head = Head(c_in, num_classes)
        self.stage_names = tuple(names + ["head"])


# name -> (constructor, default editable prefix)
MODELS: dict[str, tuple[Callable[[], StagedNet], str]] = {
    "resnet20": (lambda: CifarResNet((16, 32, 64), (3, 3, 3)), "layer3"),  # CPU default, 0.27M params
    "resnet32": (lambda: CifarResNet((16, 32, 64), (5, 5, 5)), "layer3"),
    "resnet18": (lambda: CifarResNet((64, 128, 256, 512), (2, 2, 2, 2)), "layer3"),  # the paper's
    "vgg8": (lambda: CifarVGG((64, 128, 256, 512)), "block3"),
}
DEFAULT_ARCH = "resnet20"


def create_model(name: str) -> StagedNet:
    if name not in MODELS:
        raise ValueError(f"unknown architecture {name!r}; choose from {sorted(MODELS)}")
    return MODELS[name][0]()


def default_editable_prefix(name: str) -> str:
    return MODELS[name][1]


def weight_layer_names(model: nn.Module) -> list[str]:
    """Names of the conv and linear modules, in definition order: the layers the local editor can edit."""
    return [name for name, module in model.named_modules() if isinstance(module, (nn.Conv2d, nn.Linear))]


def editable_names(model: nn.Module, prefixes: str | Sequence[str]) -> list[str]:
    """Parameter names under any of the comma-separated module prefixes (e.g. 'layer3')."""
    if isinstance(prefixes, str):
        prefixes = [p.strip() for p in prefixes.split(",") if p.strip()]
    names = [n for n, _ in model.named_parameters() if any(n == p or n.startswith(p + ".") for p in prefixes)]
    if not names:
        raise ValueError(f"no parameters match editable prefix {list(prefixes)}")
    return names
