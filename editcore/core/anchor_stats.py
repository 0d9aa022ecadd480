"""The local editor's anchor statistics: the covariance E[p p^T] of each edited weight's input vectors p over
"everything else" (anchor images), computed once per model and stored beside it.

Computing them costs a forward pass over the anchors plus one Gram matrix per edited weight (about 19 s of CPU
for the 2,000-image training sample and `layer3` of ResNet-20), paid by every process that opens a model. A
shipped statistics file (`assets/anchor_stats/*.safetensors`) holds them for the shipped models, found by the
fingerprint of the weights they were computed on, so a model whose weights differ in any bit never uses another's.
`python -m editcore anchor-stats` writes one, from the training sample or from a data root's full training set
with augmented copies.

File format: one float64 tensor per weight name, the lower triangle of its covariance (row-major), and JSON
metadata: the weights' fingerprint, each matrix's dimension, the anchors it saw and the command that wrote it.
float64 and the lower triangle because that is what the eigendecomposition reads (`torch.linalg.eigh`): a stored
matrix gives the very subspace a recomputation over the same images in the same order gives, so the edits agree
to the last bit; float32 storage moved the low-energy tail enough to change an edit's step count.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
from pathlib import Path
from typing import Iterable

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from .data import ASSETS
from .edit import eval_mode

ANCHOR_STATS_DIR = ASSETS / "anchor_stats"
FORMAT = "editlab-anchor-stats-2"


def owner(model: nn.Module, name: str) -> nn.Module:
    """The module holding parameter `name`."""
    return model.get_submodule(name.rsplit(".", 1)[0])


@contextlib.contextmanager
def recording_inputs(model: nn.Module, names: list[str]):
    """While inside, every forward pass adds the input vectors of each weight in `names` (a conv's unfolded
    k x k x c_in patches, a linear layer's rows) to sums[name] = sum of p p^T (float64) and counts[name]."""
    sums: dict[str, torch.Tensor] = {}
    counts: dict[str, int] = {}

    def hook(name: str, module: nn.Module):
        def record(_module, args):
            x = args[0].detach().double()  # float64: the low-energy tail is what matters
            if isinstance(module, nn.Conv2d):
                x = nn.functional.unfold(x, module.kernel_size, module.dilation, module.padding, module.stride)
                x = x.transpose(1, 2).reshape(-1, x.shape[1])  # (N * positions, c_in * k * k)
            else:
                x = x.reshape(-1, x.shape[-1])
            sums[name] = sums.get(name, 0) + x.T @ x
            counts[name] = counts.get(name, 0) + len(x)
        return record

    handles = [owner(model, n).register_forward_pre_hook(hook(n, owner(model, n))) for n in names]
    try:
        yield sums, counts
    finally:
        for handle in handles:
            handle.remove()


def anchor_covariances(model: nn.Module, names: list[str], batches: Iterable[torch.Tensor]
                       ) -> tuple[dict[str, torch.Tensor], int]:
    """Each weight's input covariance (float64) over the normalised image `batches`, and how many images."""
    images = 0
    with recording_inputs(model, names) as (sums, counts), torch.no_grad(), eval_mode(model):
        for batch in batches:
            model(batch)
            images += len(batch)
    return {n: sums[n] / counts[n] for n in names}, images


def weights_fingerprint(model: nn.Module) -> str:
    """sha256 of every parameter and buffer (names, dtypes, shapes, bytes): the statistics' key."""
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        tensor = tensor.detach().cpu().contiguous()
        digest.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)};".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def save_anchor_stats(path: Path, model: nn.Module, covariances: dict[str, torch.Tensor], about: dict) -> None:
    """Write `covariances` (of `model`'s weights) to `path`; `about`: the anchors and the command, kept as metadata."""
    tensors, dims = {}, {}
    for name, covariance in covariances.items():
        rows, cols = torch.tril_indices(len(covariance), len(covariance))
        tensors[name] = covariance[rows, cols].double().contiguous()
        dims[name] = len(covariance)
    meta = {"format": FORMAT, "fingerprint": weights_fingerprint(model), "dims": dims, **about}
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path), metadata={"editlab": json.dumps(meta)})


def read_about(path: Path) -> dict | None:
    """A statistics file's metadata, or None when `path` is not one."""
    try:
        with safe_open(str(path), "pt") as handle:
            meta = json.loads((handle.metadata() or {}).get("editlab", "null"))
    except Exception:  # not a safetensors file, or damaged: not statistics we can use
        return None
    return meta if isinstance(meta, dict) and meta.get("format") == FORMAT else None


def shipped_covariances(model: nn.Module, names: list[str], directory: Path | None = None
                        ) -> tuple[dict[str, torch.Tensor], dict] | None:
    """The covariances of `names` from a statistics file in `directory` computed on exactly these weights (float64,
    full matrices), with the file's metadata; None when there is none. `directory` default: ANCHOR_STATS_DIR."""
    directory = ANCHOR_STATS_DIR if directory is None else directory
    if not directory.is_dir():
        return None
    files = sorted(directory.glob("*.safetensors"))
    if not files:
        return None
    fingerprint = weights_fingerprint(model)
    for path in files:
        about = read_about(path)
        if about is None or about["fingerprint"] != fingerprint or not set(names) <= set(about["dims"]):
            continue
        covariances = {}
        with safe_open(str(path), "pt") as handle:
            for name in names:
                dim = about["dims"][name]
                full = torch.zeros(dim, dim, dtype=torch.float64)
                rows, cols = torch.tril_indices(dim, dim)
                full[rows, cols] = handle.get_tensor(name)
                covariances[name] = full + full.tril(-1).T
        return covariances, {**about, "path": path.name}
    return None
