"""Device choice: cuda when present, else cpu; always overridable."""
from __future__ import annotations

import os

import torch


def pick_device(requested: str | None = None) -> torch.device:
    """`requested` (or $EDITLAB_DEVICE) wins; otherwise cuda if available, else cpu."""
    requested = requested or os.environ.get("EDITLAB_DEVICE") or None
    if requested in (None, "", "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(requested)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {requested!r} was requested but CUDA is not available")
    return device
