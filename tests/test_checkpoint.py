"""Checkpoints: safetensors + JSON card round trip; a user-supplied file is never unpickled."""
from __future__ import annotations

import json
import pickle

import pytest
import torch

from editcore import create_editor, create_model, load_checkpoint, read_card, save_checkpoint

CARD = {"arch": "resnet20", "editable_prefix": "layer3", "seed": 3, "test_accuracy": 0.5, "command": "python -m editcore train"}


def test_round_trip_keeps_card_weights_and_editor(tmp_path):
    torch.manual_seed(0)
    model = create_model("resnet20")
    with torch.no_grad():  # give batch-norm buffers values a fresh model would not have
        for name, buffer in model.named_buffers():
            if name.endswith("running_mean"):
                buffer.uniform_(-1, 1)
    editor = create_editor("adam", lr=0.0123, learnable=True, beta1=0.7, beta2=0.95)
    path = save_checkpoint(tmp_path / "ckpt.safetensors", model, CARD, editor)

    loaded = load_checkpoint(path)
    for key, value in model.state_dict().items():
        assert torch.equal(loaded.model.state_dict()[key], value), key
    assert not loaded.model.training
    assert loaded.editor is not None and loaded.editor.name == "adam"
    assert loaded.editor.hyperparameters() == pytest.approx({"lr": 0.0123, "beta1": 0.7, "beta2": 0.95})
    expected_card = {**CARD, "editor": {"name": "adam", **editor.hyperparameters()}}
    assert loaded.card == expected_card
    assert read_card(path) == expected_card
    assert json.loads(path.with_suffix(".json").read_text()) == expected_card


def test_round_trip_without_editor(tmp_path):
    model = create_model("resnet20")
    path = save_checkpoint(tmp_path / "base.safetensors", model, CARD)
    loaded = load_checkpoint(path)
    assert loaded.editor is None and "editor" not in loaded.card
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(loaded.model(x), model.eval()(x))


def test_card_needs_an_arch(tmp_path):
    with pytest.raises(ValueError, match="arch"):
        save_checkpoint(tmp_path / "x.safetensors", create_model("resnet20"), {"seed": 0})


def test_missing_checkpoint(tmp_path):
    with pytest.raises(FileNotFoundError, match="nothing.safetensors"):
        read_card(tmp_path / "nothing.safetensors")


class Payload:
    """Unpickling this calls open(path, 'w'): it creates a marker file as its side effect."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_payload_really_runs_when_unpickled(tmp_path):
    # Guards the next test: the payload is live, so its marker not appearing there means something.
    marker = tmp_path / "proof"
    pickle.loads(pickle.dumps(Payload(marker))).close()
    assert marker.exists()


@pytest.mark.parametrize("writer", ["pickle", "torch.save"])
def test_a_pickle_renamed_safetensors_is_refused_unopened(tmp_path, writer):
    marker = tmp_path / "was_unpickled"
    bomb = tmp_path / "model.safetensors"
    if writer == "pickle":
        bomb.write_bytes(pickle.dumps({"state_dict": Payload(marker)}))
    else:
        torch.save({"state_dict": Payload(marker)}, bomb)
    with pytest.raises(ValueError, match="not a safetensors"):
        read_card(bomb)
    with pytest.raises(ValueError, match="not a safetensors"):
        load_checkpoint(bomb)
    assert not marker.exists()
