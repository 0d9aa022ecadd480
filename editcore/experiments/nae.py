"""CIFAR-10 natural adversarial examples (NAE), built the way ImageNet-A was: adversarial filtration.

The CIFAR-10 test set is split once, by test index: [0, 5000) is the held-out part on which edits
are scored (it keeps the pixel-exact images 0-999), [5000, 10000) is the pool. The NAE set is the
pool images that every model of an ensemble of independently trained filter models misclassifies.
The set is stored as an npz (uint8 images, labels, test indices; no pickle) with a JSON card beside it.

Match-ranks editable training draws its edit targets by rank; `rank_distribution` turns the ranks of
the true labels of NAE images into the paper's rank probabilities.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from torch import nn

from ..core.data import ASSETS, ImageSet
from ..core.heldout import full_logits

HELDOUT = (0, 5000)  # test indices [start, stop): drawdown is measured here; holds the pixel-exact 0-999
NAE_POOL = (5000, 10000)  # test indices [start, stop): filtration candidates
SPLIT_DEFINITION = {"heldout_test_indices": list(HELDOUT), "pool_test_indices": list(NAE_POOL),
                    "note": "half-open ranges of CIFAR-10 test indices"}
RANK_KERNEL = (0.1, 0.2, 0.4, 0.2, 0.1)
SOURCE = "cifar10-nae"
DEFAULT_PATH = ASSETS / "cifar10_nae.npz"


def _in_range(images: ImageSet, bounds: tuple[int, int]) -> ImageSet:
    keep = (images.indices >= bounds[0]) & (images.indices < bounds[1])
    return images.subset(torch.nonzero(keep.cpu()).view(-1))


def heldout_part(test_set: ImageSet) -> ImageSet:
    """The test images whose index lies in HELDOUT (all of the embedded sample, test 0-999)."""
    return _in_range(test_set, HELDOUT)


def pool_part(test_set: ImageSet) -> ImageSet:
    """The test images whose index lies in NAE_POOL (none of the embedded sample)."""
    return _in_range(test_set, NAE_POOL)


def predict_logits(model: nn.Module, images: torch.Tensor, device, batch_size: int = 1000) -> torch.Tensor:
    """Logits for uint8 images, batch norm in eval mode, computed on `device`, returned on the CPU."""
    return full_logits(model, images.to(device), None, batch_size).float().cpu()


def filter_predictions(filter_models: Sequence[nn.Module], pool: ImageSet, device, batch_size: int = 1000) -> torch.Tensor:
    """Top-1 predictions of each filter model on the pool: (models, images), on the CPU."""
    if not filter_models:
        raise ValueError("adversarial filtration needs at least one filter model")
    return torch.stack([predict_logits(model, pool.images, device, batch_size).argmax(1) for model in filter_models])


def nae_from_predictions(pool: ImageSet, predictions: torch.Tensor) -> ImageSet:
    """The pool images that every row of `predictions` gets wrong, in pool order."""
    rows = torch.nonzero((predictions != pool.labels.cpu()).all(0)).view(-1)
    kept = pool.subset(rows.to(pool.labels.device))
    return ImageSet(kept.images, kept.labels, kept.indices, SOURCE)


def build_nae_set(filter_models: Sequence[nn.Module], pool: ImageSet, device, batch_size: int = 1000) -> ImageSet:
    """The pool images that every filter model misclassifies (top-1), in pool order."""
    return nae_from_predictions(pool, filter_predictions(filter_models, pool, device, batch_size))


def true_label_ranks(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, device,
                     batch_size: int = 1000) -> torch.Tensor:
    """Rank of the true label in each image's logits (0 = top-1): how many classes score higher."""
    logits = predict_logits(model, images, device, batch_size)
    true = logits.gather(1, labels.cpu().view(-1, 1))
    return (logits > true).sum(1).long()


def rank_histogram(ranks: torch.Tensor, classes: int = 10) -> list[int]:
    return torch.bincount(ranks.view(-1).cpu(), minlength=classes)[:classes].tolist()


def rank_distribution(ranks: torch.Tensor, classes: int = 10) -> list[float]:
    """P(rank) for match-ranks training: histogram of ranks, smoothed with RANK_KERNEL (centred,
    truncated at the edges), rank 0 zeroed (an edit target must differ from the prediction), renormalised."""
    if ranks.numel() == 0:
        raise ValueError("no ranks to build a distribution from (empty NAE set?)")
    counts = torch.tensor(rank_histogram(ranks, classes), dtype=torch.double)
    half = len(RANK_KERNEL) // 2
    smoothed = torch.zeros(classes, dtype=torch.double)
    for rank in range(classes):
        for offset, weight in enumerate(RANK_KERNEL):
            source = rank + offset - half
            if 0 <= source < classes:
                smoothed[rank] += weight * counts[source]
    smoothed[0] = 0.0
    if smoothed.sum() <= 0:
        raise ValueError("the smoothed rank distribution is all zero")
    return (smoothed / smoothed.sum()).tolist()


def card_path(path: str | Path) -> Path:
    return Path(path).with_suffix(".json")


def save_nae(path: str | Path, nae_set: ImageSet, card: dict) -> Path:
    """Write the set (npz, no pickle) and its card (JSON, with counts taken from the set itself)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    labels = nae_set.labels.cpu()
    np.savez_compressed(path, images=nae_set.images.cpu().numpy().astype(np.uint8),
                        labels=labels.numpy().astype(np.int64), indices=nae_set.indices.cpu().numpy().astype(np.int64))
    card = {**card, "n_images": len(nae_set), "per_class": torch.bincount(labels, minlength=10).tolist()}
    card_path(path).write_text(json.dumps(card, indent=2, sort_keys=True) + "\n")
    return path


def load_nae(path: str | Path = DEFAULT_PATH) -> ImageSet:
    """Read a set written by `save_nae` (never unpickles)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"NAE set {path} does not exist; build it with `python -m editcore build-nae`")
    try:
        with np.load(path, allow_pickle=False) as npz:
            images, labels, indices = npz["images"], npz["labels"], npz["indices"]
    except (KeyError, ValueError, OSError) as exc:
        raise ValueError(f"{path} is not an NAE set (npz with images, labels, indices): {exc}") from exc
    if images.dtype != np.uint8 or images.ndim != 4 or not len(images) == len(labels) == len(indices):
        raise ValueError(f"{path}: images must be uint8 (N,3,H,W) with N labels and N indices")
    return ImageSet(torch.from_numpy(images.copy()), torch.from_numpy(labels.astype(np.int64)),
                    torch.from_numpy(indices.astype(np.int64)), SOURCE)
