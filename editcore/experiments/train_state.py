"""Resumable training state on disk: safetensors tensors + the JSON structure around them.

Any nest of dicts, lists, tuples, numbers, strings and tensors (a model's or an optimizer's state_dict,
RNG states, the history) is split into named tensors and a JSON tree that refers to them by name. The
tree is stored in the safetensors header (one file, replaced atomically) and in a JSON sidecar for
reading. Loading reads tensors and JSON only, never a pickle.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from ..core.checkpoint import header_metadata

FORMAT = "editlab-train-state/1"


def _pack(value, key: str, tensors: dict[str, torch.Tensor]):
    if isinstance(value, torch.Tensor):
        if key in tensors:
            raise ValueError(f"two entries of a training state are both named {key}")
        tensors[key] = value.detach().cpu().contiguous()
        return {"tensor": key}
    if isinstance(value, dict):  # keys keep their JSON type: an optimizer's state is keyed by int
        return {"dict": [[k, _pack(v, f"{key}.{k}", tensors)] for k, v in value.items()]}
    if isinstance(value, (list, tuple)):
        kind = "tuple" if isinstance(value, tuple) else "list"
        return {kind: [_pack(v, f"{key}.{i}", tensors) for i, v in enumerate(value)]}
    if value is None or isinstance(value, (bool, int, float, str)):
        return {"value": value}
    raise TypeError(f"cannot store {type(value).__name__} at {key} in a training state")


def _unpack(tree, tensors: dict[str, torch.Tensor]):
    (kind, body), = tree.items()
    if kind == "tensor":
        return tensors[body]
    if kind == "dict":
        return {k: _unpack(v, tensors) for k, v in body}
    if kind in ("list", "tuple"):
        items = [_unpack(v, tensors) for v in body]
        return tuple(items) if kind == "tuple" else items
    return body


def sidecar_path(path: str | Path) -> Path:
    return Path(path).with_suffix(".json")


def save_state(path: str | Path, state: dict) -> Path:
    """Write `state` to `path` (safetensors) and its readable JSON structure beside it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors: dict[str, torch.Tensor] = {}
    text = json.dumps({"format": FORMAT, "state": _pack(state, "s", tensors)})
    partial = path.with_name(path.name + ".partial")
    save_file(tensors, str(partial), metadata={"train_state": text})
    os.replace(partial, path)  # an interrupted write leaves the previous state intact
    sidecar_path(path).write_text(json.dumps(json.loads(text), indent=1) + "\n")
    return path


def load_state(path: str | Path) -> dict:
    text = header_metadata(path, "training state").get("train_state")
    if text is None:
        raise ValueError(f"{path} holds no training state (a checkpoint? resume takes the state file written with --state)")
    header = json.loads(text)
    if header.get("format") != FORMAT:
        raise ValueError(f"{path}: unknown training state format {header.get('format')!r}")
    return _unpack(header["state"], load_file(str(path)))
