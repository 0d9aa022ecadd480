"""Stored anchor statistics: they round-trip, the local editor uses them only for the exact weights they were
computed on, and the shipped files belong to the shipped checkpoints and match a recomputation."""
from __future__ import annotations

import dataclasses

import pytest
import torch

from editcore import AnchorSubspace, EditableModel, create_editor
from editcore.core import anchor_stats
from editcore.core.anchor_stats import (anchor_covariances, read_about, recording_inputs, save_anchor_stats,
                                        shipped_covariances, weights_fingerprint)
from editcore.core.checkpoint import load_checkpoint
from editcore.core.data import ASSETS, SHIPPED_MODELS, load_train_sample
from editcore.core.locality import LocalEditor, local_weight_names

from conftest import make_tiny

ANCHORS = torch.randn(64, 3, 8, 8, generator=torch.Generator().manual_seed(3))


def stored(tmp_path, model, names, about=None):
    covariances, images = anchor_covariances(model, names, ANCHORS.split(16))
    save_anchor_stats(tmp_path / "tiny.safetensors", model, covariances, about or {"anchors": "test", "images": images})
    return covariances


def test_stored_statistics_give_the_subspace_of_the_anchors_themselves(tmp_path):
    editable = EditableModel(make_tiny(), "body")
    names = local_weight_names(editable)
    covariances = stored(tmp_path, editable.model, names)
    loaded, about = shipped_covariances(editable.model, names, tmp_path)
    assert about["path"] == "tiny.safetensors" and about["images"] == len(ANCHORS)
    for name in names:
        assert torch.allclose(loaded[name], covariances[name], rtol=1e-6, atol=1e-9)
        assert torch.equal(loaded[name], loaded[name].T)
    fresh = AnchorSubspace(editable, ANCHORS, energy=0.3)
    from_file = AnchorSubspace(editable, None, energy=0.3, covariances=loaded, about=about)
    assert fresh.dims == from_file.dims and from_file.about["path"] == "tiny.safetensors"
    for name in names:
        assert torch.allclose(fresh.projectors[name], from_file.projectors[name], atol=1e-5)


def test_the_local_editor_uses_statistics_only_for_the_weights_they_were_computed_on(tmp_path, monkeypatch):
    model = make_tiny()
    names = local_weight_names(EditableModel(model, "body"))
    stored(tmp_path, model, names)
    (tmp_path / "damaged.safetensors").write_bytes(b"not a safetensors file")  # skipped, not fatal
    monkeypatch.setattr(anchor_stats, "ANCHOR_STATS_DIR", tmp_path)
    subspace = create_editor("local").subspace(EditableModel(model, "body"))
    assert subspace.about["path"] == "tiny.safetensors"

    changed = make_tiny()
    with torch.no_grad():
        changed.body[1].running_mean[0] += 1e-6  # a buffer ahead of nothing edited still changes the key
    assert weights_fingerprint(changed) != weights_fingerprint(model)
    assert shipped_covariances(changed, names, tmp_path) is None
    assert shipped_covariances(model, [*names, "head.2.weight"], tmp_path) is None  # a weight it does not cover


def test_recorded_inputs_are_the_unfolded_patches(tmp_path):
    model = make_tiny()
    conv = model.body[0]
    with torch.no_grad(), recording_inputs(model, ["body.0.weight"]) as (sums, counts):
        features = model.stem(ANCHORS)
        model(ANCHORS)
    patches = torch.nn.functional.unfold(features.double(), 3, padding=1).transpose(1, 2).reshape(-1, conv.in_channels * 9)
    assert counts["body.0.weight"] == len(patches) and torch.allclose(sums["body.0.weight"], patches.T @ patches)


@pytest.mark.parametrize("model_name", [path.stem for path in SHIPPED_MODELS.values()])
def test_the_shipped_statistics_are_the_shipped_models_and_match_a_recomputation(model_name):
    """The page's two models open with stored statistics; their smallest matrix (layer3's 1x1 shortcut, cheap to
    recompute) equals the covariance of that layer's inputs over the training sample the file names."""
    model = load_checkpoint(ASSETS / f"{model_name}.safetensors").model
    editable = EditableModel(model, LocalEditor.default_layers)
    names = local_weight_names(editable)
    covariances, about = shipped_covariances(model, names)
    assert about["checkpoint"] == f"{model_name}.safetensors" and about["images"] >= 2000
    assert about["command"].startswith("python -m editcore anchor-stats") and "training sample" in about["anchors"]
    shortcut = "layer3.0.shortcut.0.weight"
    assert about == read_about(anchor_stats.ANCHOR_STATS_DIR / about["path"]) | {"path": about["path"]}
    images = load_train_sample().images
    recomputed = anchor_covariances(model, [shortcut], model.domain.normalize(images).split(500))[0][shortcut]
    assert torch.allclose(covariances[shortcut], recomputed, rtol=1e-12, atol=0)  # the same images: the same matrix
    eigenvalues = torch.linalg.eigvalsh(covariances[shortcut])
    assert float(eigenvalues.min()) > -1e-6 * float(eigenvalues.max())  # a covariance: positive semi-definite


def test_the_command_writes_statistics_the_editor_finds(tmp_path, capsys):
    """`python -m editcore anchor-stats` on one cheap conv (layer3's 1x1 shortcut) of the shipped baseline: the file
    it writes is found for those weights and holds the matrix the shipped file holds; a bad request exits 2."""
    from editcore.cli import main

    checkpoint = SHIPPED_MODELS["baseline"]
    out = tmp_path / "stats" / "mine.safetensors"
    assert main(["anchor-stats", "--checkpoint", str(checkpoint), "--layers", "layer3.0.shortcut", "--device", "cpu",
                 "--out", str(out)]) == 0
    model = load_checkpoint(checkpoint).model
    shortcut = "layer3.0.shortcut.0.weight"
    written, about = shipped_covariances(model, [shortcut], out.parent)
    assert about["layers"] == "layer3.0.shortcut" and about["command"].startswith("python -m editcore anchor-stats")
    assert torch.equal(written[shortcut], shipped_covariances(model, [shortcut])[0][shortcut])
    assert main(["anchor-stats", "--checkpoint", str(checkpoint), "--passes", "2", "--out", str(out)]) == 2
    assert "--passes needs --data-root" in capsys.readouterr().err


def test_the_training_sample_statistics_are_computed_once_per_process_for_the_same_weights(tmp_path, monkeypatch):
    """Without stored statistics the local editor computes the training sample's; a second model object (a
    replica, a second command in one process) on the same weights reuses them, and gets the very same subspace."""
    from editcore.core import locality
    from conftest import tiny_images

    monkeypatch.setattr(anchor_stats, "ANCHOR_STATS_DIR", tmp_path)  # nothing stored
    monkeypatch.setattr(locality, "_sample_covariances", locality.OrderedDict())
    sample = tiny_images(48, seed=5)
    monkeypatch.setattr(locality, "load_train_sample", lambda: sample)
    editable = EditableModel(make_tiny(), "body")
    direct = AnchorSubspace(editable, editable.domain.normalize(sample.images), energy=LocalEditor().energy)
    calls = []
    monkeypatch.setattr(locality, "anchor_covariances", lambda *a: calls.append(1) or anchor_covariances(*a))
    first = create_editor("local").subspace(EditableModel(make_tiny(), "body"))
    again = create_editor("local").subspace(EditableModel(make_tiny(), "body"))  # equal weights, a new object
    assert len(calls) == 1 and again.about == first.about == {"anchors": "48 images"}
    assert all(torch.equal(direct.projectors[n], again.projectors[n]) for n in direct.names)
    create_editor("local").subspace(EditableModel(make_tiny(seed=1), "body"))  # other weights: computed
    assert len(calls) == 2
    renormalised = make_tiny()
    renormalised.domain = dataclasses.replace(editable.domain, mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0))
    create_editor("local").subspace(EditableModel(renormalised, "body"))  # same weights, other anchor inputs: computed
    assert len(calls) == 3
