"""CIFAR-10 data: the python-layout batches from a data root, or the small embedded sample.

Images travel as uint8 tensors of shape (N, 3, 32, 32); `normalize` and `augment` turn them into
model inputs on whatever device they live on, so a whole split can sit on the GPU. Other image folders
(any size, any classes) are read by `editcore.core.images`; their `Domain` says what CIFAR10 says here.
"""
from __future__ import annotations

import os
import pickle
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .domain import CIFAR10

CLASSES, MEAN, STD = CIFAR10.classes, CIFAR10.mean, CIFAR10.std
BATCH_DIR = "cifar-10-batches-py"
TRAIN_BATCHES = tuple(f"data_batch_{i}" for i in range(1, 6))
TEST_BATCHES = ("test_batch",)
ASSETS = Path(__file__).resolve().parents[2] / "assets"  # editcore/core/data.py -> the repository root
SAMPLE_PATH = ASSETS / "cifar10_test_sample.npz"
TRAIN_SAMPLE_PATH = ASSETS / "cifar10_train_sample.npz"
TRAIN_SAMPLE_SOURCE = "cifar10-train-sample"  # ImageSet.source of the shipped training sample
# The page's default models: the paper's editable training from scratch and its baseline (docs/RESULTS.md, issue 20)
SHIPPED_MODELS = {"baseline": ASSETS / "resnet20_scratch_baseline.safetensors",
                  "editable": ASSETS / "resnet20_scratch_editable.safetensors"}
DOWNLOAD_HINT = (
    "To download CIFAR-10 (needs internet): python -m editcore download-cifar10 --data-root DIR"
)


class DataError(RuntimeError):
    """A data root or batch file that cannot be used; the message names the path."""


@dataclass
class ImageSet:
    images: torch.Tensor  # uint8 (N, 3, S, S), S the domain's size (32 for CIFAR-10)
    labels: torch.Tensor  # int64 (N,)
    indices: torch.Tensor  # int64 (N,): position in the source split
    source: str
    paths: list[str] | None = None  # the picture file of each row, for sets read from an image folder

    def __len__(self) -> int:
        return len(self.labels)

    def subset(self, rows) -> "ImageSet":
        rows = torch.as_tensor(rows, dtype=torch.long)
        paths = [self.paths[row] for row in rows.tolist()] if self.paths is not None else None
        return ImageSet(self.images[rows], self.labels[rows], self.indices[rows], self.source, paths)

    def to(self, device) -> "ImageSet":
        return ImageSet(self.images.to(device), self.labels.to(device), self.indices.to(device), self.source,
                        self.paths)


def resolve_data_root(data_root: str | os.PathLike | None = None) -> Path | None:
    """The flag wins, then $EDITLAB_DATA; None means 'use the embedded sample'."""
    value = data_root if data_root not in (None, "") else os.environ.get("EDITLAB_DATA") or None
    if value is None:
        return None
    root = Path(value).expanduser()
    batch_dir = root / BATCH_DIR if (root / BATCH_DIR).is_dir() else root
    if not batch_dir.is_dir():
        raise DataError(f"CIFAR-10 data root {root} does not exist. {DOWNLOAD_HINT}")
    return batch_dir


def _read_batch(path: Path) -> tuple[np.ndarray, np.ndarray]:
    if not path.is_file():
        raise DataError(f"CIFAR-10 batch file {path} is missing. {DOWNLOAD_HINT}")
    try:
        with path.open("rb") as fh:
            # These batches are the data root's own dataset files (python layout), never user uploads.
            batch = pickle.load(fh, encoding="latin1")
        data = np.asarray(batch["data"], dtype=np.uint8).reshape(-1, 3, 32, 32)
        labels = np.asarray(batch["labels"], dtype=np.int64)
    except Exception as exc:  # noqa: BLE001 - any failure means the file is unusable
        raise DataError(f"CIFAR-10 batch file {path} is corrupt or not in the python layout: {exc}") from exc
    if len(data) != len(labels) or (len(labels) and not (0 <= labels.min() and labels.max() < 10)):
        raise DataError(f"CIFAR-10 batch file {path} is corrupt: {len(data)} images, {len(labels)} labels")
    return data, labels


def load_cifar10(split: str, data_root: str | os.PathLike | None = None) -> ImageSet:
    """Load 'train' or 'test' from the data root; with no root, 'test' is the embedded sample."""
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', not {split!r}")
    batch_dir = resolve_data_root(data_root)
    if batch_dir is None:
        if split == "train":
            raise DataError(f"training needs the full CIFAR-10: set --data-root or EDITLAB_DATA. {DOWNLOAD_HINT}")
        return load_sample()
    parts = [_read_batch(batch_dir / name) for name in (TRAIN_BATCHES if split == "train" else TEST_BATCHES)]
    images = torch.from_numpy(np.concatenate([p[0] for p in parts]))
    labels = torch.from_numpy(np.concatenate([p[1] for p in parts]))
    return ImageSet(images, labels, torch.arange(len(labels)), f"cifar10-{split}")


def load_sample(path: Path = SAMPLE_PATH, source: str = "cifar10-test-sample") -> ImageSet:
    """The embedded CIFAR-10 test sample shipped in assets/ (see assets/README.md)."""
    with np.load(path, allow_pickle=False) as npz:
        return ImageSet(
            torch.from_numpy(npz["images"].copy()),
            torch.from_numpy(npz["labels"].astype(np.int64)),
            torch.from_numpy(npz["indices"].astype(np.int64)),
            source,
        )


def load_train_sample() -> ImageSet:
    """The shipped class-balanced sample of 2,000 CIFAR-10 training images (assets/README.md): replay
    and anchor images wherever the full training set is not loaded."""
    return load_sample(TRAIN_SAMPLE_PATH, TRAIN_SAMPLE_SOURCE)


def normalize(images: torch.Tensor) -> torch.Tensor:
    """uint8 (N,3,H,W) -> float, standardised with the CIFAR-10 training statistics (`CIFAR10.normalize`)."""
    return CIFAR10.normalize(images)


def augment(images: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """The paper's augmentation on a batch: random crop after 4px zero padding, random h-flip."""
    n, _, h, w = images.shape
    device = images.device
    padded = torch.nn.functional.pad(images, (4, 4, 4, 4))
    dy = torch.randint(0, 9, (n,), generator=generator, device="cpu").to(device)
    dx = torch.randint(0, 9, (n,), generator=generator, device="cpu").to(device)
    rows = (dy.view(n, 1) + torch.arange(h, device=device).view(1, h))  # (n, h)
    cols = (dx.view(n, 1) + torch.arange(w, device=device).view(1, w))  # (n, w)
    flip = torch.rand(n, generator=generator, device="cpu").to(device) < 0.5
    cols = torch.where(flip.view(n, 1), cols.flip(1), cols)
    batch = torch.arange(n, device=device).view(n, 1, 1, 1)
    chan = torch.arange(3, device=device).view(1, 3, 1, 1)
    return padded[batch, chan, rows.view(n, 1, h, 1), cols.view(n, 1, 1, w)]
