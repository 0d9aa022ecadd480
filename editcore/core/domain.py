"""What a classifier's images are: its class names, the size of the uint8 images it takes, how a picture
becomes one of them and how they are normalised.

Every layer that turns pixels into model inputs or class indices into names reads these from the model's
`Domain` (`model.domain`; the Lab's and a SharedModel's are that of their models) instead of module
constants. `CIFAR10` is the embedded default; a torchvision model gets one from its weights' metadata
or from flags (`editcore.core.torchvision_models`).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

import torch

CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2470, 0.2435, 0.2616)
INTERPOLATIONS = ("lanczos", "bilinear", "bicubic", "nearest")


@dataclass(frozen=True)
class Domain:
    """classes: names in the model's output order. A picture becomes a uint8 (3, size, size) image by
    resizing its shorter side to `resize` with `interpolation`, then cropping the centre `size` square
    (resize == size: the centre square, resized); `mean`/`std` standardise it for the model."""

    classes: tuple[str, ...]
    size: int
    resize: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    interpolation: str = "bilinear"

    def __post_init__(self):
        for key in ("classes", "mean", "std"):  # a card's JSON lists: tuples, so domains compare and hash
            object.__setattr__(self, key, tuple(getattr(self, key)))
        if len(self.classes) < 2 or len(set(self.classes)) != len(self.classes):
            raise ValueError(f"a classifier needs at least two distinct class names, got {list(self.classes)[:5]}")
        if not 0 < self.size <= self.resize:
            raise ValueError(f"image size {self.size} must be > 0 and at most the resize {self.resize}")
        if len(self.mean) != 3 or len(self.std) != 3 or min(self.std) <= 0:
            raise ValueError(f"mean and std need three values each, std > 0; got {self.mean}, {self.std}")
        if self.interpolation not in INTERPOLATIONS:
            raise ValueError(f"interpolation must be one of {INTERPOLATIONS}, got {self.interpolation!r}")

    @property
    def shape(self) -> tuple[int, int, int]:
        return (3, self.size, self.size)

    def normalize(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 (N,3,H,W) -> float, standardised with this domain's statistics."""
        mean = torch.tensor(self.mean, device=images.device).view(1, 3, 1, 1)
        std = torch.tensor(self.std, device=images.device).view(1, 3, 1, 1)
        return (images.float() / 255.0 - mean) / std

    def preprocessing(self) -> dict:
        """The model card's "preprocessing" entry."""
        return {key: value for key, value in asdict(self).items() if key != "classes"}

    def with_classes(self, classes) -> "Domain":
        return Domain(tuple(classes), self.size, self.resize, self.mean, self.std, self.interpolation)


CIFAR10 = Domain(CIFAR10_CLASSES, 32, 32, CIFAR10_MEAN, CIFAR10_STD, "lanczos")
