"""Shared by the app tests: checkpoints to load (the shipped ones when present, else conftest's briefly
trained ResNet-20) and the app served from the test process on a free port."""
from __future__ import annotations

import os
import socket
from pathlib import Path

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from editcore import SHIPPED_MODELS, Lab, create_editor, save_checkpoint  # noqa: E402

SHIPPED = tuple(SHIPPED_MODELS.items())
_made: tuple[tuple[str, Path], ...] | None = None
_loaded: Lab | None = None


def checkpoints(tmp_path_factory, request) -> tuple[tuple[str, Path], ...]:
    """(name, path) of a baseline and an editable checkpoint: the shipped ones when present, else written
    once per test run from conftest's briefly trained ResNet-20 (trained only then). The written
    'editable' one carries the same weights and an RMSProp editor: enough for the app's mechanics (a
    learned editor, two models), which is what these tests check."""
    global _made
    if all(path.is_file() for _, path in SHIPPED):
        return SHIPPED
    if _made is None:
        model = request.getfixturevalue("resnet20")
        folder = tmp_path_factory.mktemp("app-checkpoints")
        card = {"arch": "resnet20", "editable_prefix": "layer3"}
        base = save_checkpoint(folder / "baseline.safetensors", model, {**card, "objective": "baseline"})
        editable = save_checkpoint(folder / "editable.safetensors", model, {**card, "objective": "editable"},
                                   create_editor("rmsprop", lr=2e-3))
        _made = (("baseline", base), ("editable", editable))
    return _made


def make_lab(tmp_path_factory, request) -> Lab:
    """A lab of its own (its own workspaces) on the embedded 1,000-image sample, even when $EDITLAB_DATA is
    set (the tests count on it). Its models are loaded once per test run and shared by every lab made here,
    as one server's users share them: what a model computes once (held-out features, the local editor's
    anchor subspace) is computed once for all the app and session tests."""
    global _loaded
    if _loaded is None:
        saved = os.environ.pop("EDITLAB_DATA", None)
        try:
            _loaded = Lab.load(list(checkpoints(tmp_path_factory, request)), log=lambda *_: None)
        finally:
            if saved is not None:
                os.environ["EDITLAB_DATA"] = saved
    return Lab(_loaded.models, _loaded.sources, _loaded.notes, _loaded.data_root)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def launch(lab: Lab):
    """The page served from this process on a free port: (demo, url); close with demo.close()."""
    from app import launch as launch_app

    return launch_app(lab, port=free_port(), block=False, quiet=True)
