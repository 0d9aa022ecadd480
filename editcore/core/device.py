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


# The app's torch threads: a fixed count rather than the machine's core count, because the count changes the
# last bits of an edit's arithmetic (and so, now and then, its step count): a log recorded on one server then
# replays the same on another with other cores.
DEFAULT_THREADS = 2


def arithmetic(device: torch.device | str) -> dict:
    """What, besides weights, images and settings, decides an edit's floating-point results here."""
    device = torch.device(device)
    if device.type == "cuda":
        return {"device": "cuda", "gpu": torch.cuda.get_device_name(device), "torch": torch.__version__}
    return {"device": device.type, "threads": torch.get_num_threads(),
            "cpu_capability": torch.backends.cpu.get_cpu_capability(), "torch": torch.__version__}


def arithmetic_differences(recorded: dict | None, here: dict) -> list[str]:
    """How `recorded` (an edit log's `arithmetic`) differs from `here`, in words; [] when it does not."""
    if not isinstance(recorded, dict):
        return ["the log does not record its thread count and device (an older log)"]
    return [f"{key} {recorded.get(key)!r} in the log, {value!r} here" for key, value in here.items()
            if recorded.get(key) != value]
