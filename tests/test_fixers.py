"""The classic fixes (lookup table, fine-tuning), the generalisation metric, and their CLI."""
from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from editcore import (EditableModel, EditorFixer, FinetuneFixer, HeldOutEvaluator, ImageSet, LookupFixer, LookupTable,
                      PatchResult, augmented_views, create_editor, finetune, full_logits, generalization, normalize,
                      save_checkpoint, view_families, view_specs)
from editcore.cli import main
from editcore.core.models import StagedNet

from conftest import make_tiny

FAMILIES = {"crop", "flip", "shift", "brightness", "contrast", "jpeg", "noise"}
SUMMARY_KEYS = {"test_error", "drawdown", "success_rate", "mean_steps", "mean_edit_seconds", "generalization", "n_edits",
                "seconds", "fixer"}


def random_images(n: int, size: int = 8, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 256, (n, 3, size, size), generator=torch.Generator().manual_seed(seed), dtype=torch.uint8)


def params_snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: t.detach().clone() for n, t in model.state_dict().items()}


# --- lookup table -----------------------------------------------------------------------------


def test_exact_lookup_overrides_only_the_byte_identical_image(sample):
    image = sample.images[3]
    table = LookupTable("exact")
    table.add(image, 7)
    queries = torch.stack([image, image.roll(1, dims=-1), sample.images[4], image.clone()])
    base = torch.tensor([1, 1, 2, 3])
    assert table.predict(queries, base).tolist() == [7, 1, 2, 7]
    assert base.tolist() == [1, 1, 2, 3]  # the base predictions are not modified in place


def test_nearest_pixel_lookup_respects_its_threshold():
    """Mean |difference| / 255: adding 10 to k of the 3*8*8 values is at distance 10k / (192*255)."""
    image = random_images(1)[0].clamp(max=245)
    table = LookupTable("nearest", "pixel", threshold=0.01)
    table.add(image, 4)

    def moved(k: int) -> torch.Tensor:
        flat = image.flatten().clone()
        flat[:k] += 10
        return flat.view_as(image)

    inside, outside = moved(48), moved(49)  # 480/48960 = 0.00980 <= 0.01 < 490/48960 = 0.01001
    assert float(table.distances(inside[None])) == pytest.approx(480 / 48960)
    assert table.predict(torch.stack([inside, outside]), torch.tensor([0, 0])).tolist() == [4, 0]


def test_nearest_feature_lookup_respects_its_threshold():
    model = make_tiny()
    images = random_images(6, seed=2)
    probe = LookupTable("nearest", "feature", threshold=0.0, model=model)
    probe.add(images[0], 9)
    distance = probe.distances(images[1:2]).item()
    assert distance > 0
    base = torch.zeros(1, dtype=torch.long)
    for threshold, expected in ((distance * 1.001, 9), (distance * 0.999, 0)):
        table = LookupTable("nearest", "feature", threshold=threshold, model=model)
        table.add(images[0], 9)
        assert table.predict(images[1:2], base).tolist() == [expected]


def test_lookup_fixer_result_is_a_patch_that_changes_no_weights():
    model = make_tiny()
    before = params_snapshot(model)
    fixer = LookupFixer(model, "exact")
    image = random_images(1, seed=3)
    base = fixer.predict(None, image)
    target = (base + 1) % 10
    result = fixer.fix(image, target)
    assert isinstance(result, PatchResult)
    assert (result.success, result.steps, result.params) == (True, 0, {})
    assert fixer.predict(result, image).tolist() == target.tolist()
    assert all(torch.equal(before[n], t) for n, t in model.state_dict().items())


# --- fine-tuning ------------------------------------------------------------------------------


@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
def test_finetune_reaches_the_target_and_leaves_the_base_model_untouched(optimizer):
    model = make_tiny()
    before = params_snapshot(model)
    replay = ImageSet(random_images(32, seed=5), torch.randint(0, 10, (32,), generator=torch.Generator().manual_seed(6)),
                      torch.arange(32), "synthetic")
    image = random_images(1, seed=4)
    base_class = int(full_logits(model, image).argmax(1))
    target = torch.tensor([(base_class + 3) % 10])
    lr = 0.05 if optimizer == "sgd" else 0.01
    result = finetune(model, normalize(image), target, replay, replay_ratio=4, optimizer=optimizer, lr=lr,
                      max_steps=200, gen=torch.Generator().manual_seed(0), prefix=None)
    assert result.success and 0 < result.steps <= 200
    assert set(result.params) == {n for n, _ in model.named_parameters()}
    assert int(full_logits(model, image, result.params).argmax(1)) == int(target)
    assert len(result.losses) == result.steps + 1
    assert (result.replay_source, result.replayed) == ("synthetic", 4 * len(result.losses))
    for name, tensor in model.state_dict().items():
        assert torch.equal(before[name], tensor), name


def test_finetune_with_a_prefix_changes_only_those_parameters_and_stops_at_its_budget():
    model = make_tiny()
    image = random_images(1, seed=4)
    target = torch.tensor([(int(full_logits(model, image).argmax(1)) + 3) % 10])
    result = finetune(model, normalize(image), target, None, replay_ratio=0, lr=1e-6, max_steps=3, prefix="head")
    assert set(result.params) == {"head.2.weight", "head.2.bias"}
    assert not result.success and result.steps == 3
    assert (result.replay_source, result.replayed) == (None, 0)


def test_finetune_fixer_replays_the_shipped_training_sample_when_given_no_replay(monkeypatch):
    """The library default never fine-tunes on the corrected image alone: with no replay set it draws
    replay_ratio images per step from the shipped 2,000-image training sample."""
    monkeypatch.delenv("EDITLAB_DATA", raising=False)
    model = make_tiny()
    fixer = FinetuneFixer(model, optimizer="sgd", lr=0.05, max_steps=20, prefix=None)
    image = random_images(1, size=32, seed=4)
    target = torch.tensor([(int(full_logits(model, image).argmax(1)) + 3) % 10])
    result = fixer.fix(image, target)
    assert fixer.replay_ratio > 0 and result.replay_source == "cifar10-train-sample"
    assert result.replayed == fixer.replay_ratio * len(result.losses) > 0
    assert fixer.hyperparameters()["replay"] == "cifar10-train-sample"
    assert fixer.hyperparameters()["replay_size"] == 2000


def test_finetune_fixer_is_seeded():
    model = make_tiny()
    replay = ImageSet(random_images(32, seed=5), torch.arange(32) % 10, torch.arange(32), "synthetic")
    image = random_images(1, seed=4)
    target = torch.tensor([(int(full_logits(model, image).argmax(1)) + 3) % 10])
    runs = [FinetuneFixer(model, replay, replay_ratio=4, optimizer="sgd", lr=0.05, max_steps=50, seed=1, prefix=None)
            .fix(image, target)
            for _ in range(2)]
    assert runs[0].steps == runs[1].steps
    assert all(torch.equal(runs[0].params[n], runs[1].params[n]) for n in runs[0].params)


def test_the_compare_view_names_the_replay_source(monkeypatch):
    from editcore.lab.compare import finetune_detail

    monkeypatch.delenv("EDITLAB_DATA", raising=False)
    model = make_tiny()
    training_set = ImageSet(random_images(8), torch.arange(8) % 10, torch.arange(8), "cifar10-train")
    assert "7 replayed images per step from the CIFAR-10 training set (8 images)" in \
        finetune_detail(FinetuneFixer(model, training_set, replay_ratio=7))
    default = FinetuneFixer(model)
    assert f"{default.replay_ratio} replayed images per step from the shipped 2,000-image training sample" in \
        finetune_detail(default)
    assert finetune_detail(FinetuneFixer(model, replay_ratio=0)).endswith("no replay")


# --- held-out evaluation with parameters before the split -------------------------------------


def test_heldout_predict_goes_through_the_full_model_for_params_before_the_split(tiny):
    editable, _ = tiny
    images, labels = random_images(64, seed=7), torch.randint(0, 10, (64,))
    evaluator = HeldOutEvaluator(editable, images, labels, batch_size=16)
    stem_changed = {"stem.0.weight": editable.model.stem[0].weight.detach() * -3.0}
    full = evaluator.predict_full(stem_changed)
    cached_only = editable.logits_from_features(evaluator.features, stem_changed).argmax(1)
    assert not torch.equal(full, cached_only)  # the cache would silently ignore the stem change
    assert torch.equal(evaluator.predict(stem_changed), full)
    body_changed = {"body.0.bias": editable.model.body[0].bias.detach() + 1.0}
    assert torch.equal(evaluator.predict(body_changed), evaluator.predict_full(body_changed))


# --- augmented views and the generalisation metric --------------------------------------------


def test_augmented_views_are_a_fixed_seeded_set_of_named_families(sample):
    image = sample.images[0]
    views = augmented_views(image, seed=0)
    specs = view_specs(0)
    assert views.dtype == torch.uint8 and views.shape == (len(specs), 3, 32, 32) and len(specs) >= 16
    assert set(view_families(0)) == FAMILIES
    assert len({s.name for s in specs}) == len(specs)
    assert torch.equal(views, augmented_views(image[None], seed=0))
    assert not torch.equal(views, augmented_views(image, seed=1))
    assert torch.equal(views[[s.family for s in specs].index("flip")], image.flip(-1))
    assert not any(torch.equal(view, image) for view in views)


def test_generalization_is_after_minus_before_per_family():
    before = torch.tensor([0, 0, 3, 3])
    after = torch.tensor([3, 0, 3, 1])
    overall, by_family = generalization(before, after, 3, ["a", "a", "b", "b"])
    assert overall == pytest.approx((2 - 2) / 4)
    assert by_family == {"a": pytest.approx(0.5), "b": pytest.approx(-0.5)}


class ChannelMeanNet(StagedNet):
    """Logits from the per-channel mean of the image: a horizontal flip cannot change them."""

    stage_names = ("pool", "head")

    def __init__(self):
        super().__init__()
        self.pool = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.head = nn.Linear(3, 10)


def test_a_flip_invariant_model_generalises_fully_to_the_flip_view(sample):
    torch.manual_seed(0)
    model = ChannelMeanNet().eval()
    image = sample.images[0:1]
    fixer = EditorFixer(EditableModel(model, "head"), create_editor("gd", lr=1.0), max_steps=200)
    base_class = int(fixer.predict(None, image))
    target = (base_class + 5) % 10
    result = fixer.fix(image, torch.tensor([target]))
    assert result.success
    views = augmented_views(image)
    families = view_families()
    before, after = fixer.predict(None, views), fixer.predict(result, views)
    flip = families.index("flip")
    assert int(before[flip]) == base_class and int(after[flip]) == target
    _, by_family = generalization(before, after, target, families)
    assert by_family["flip"] == 1.0


# --- CLI end to end on the embedded sample ----------------------------------------------------


@pytest.fixture(scope="module")
def sample_checkpoint(tmp_path_factory, resnet20):
    """conftest's ResNet-20, trained briefly on the sample, as a checkpoint file for the CLI."""
    path = tmp_path_factory.mktemp("fixers") / "sample.safetensors"
    save_checkpoint(path, resnet20, {"arch": "resnet20", "editable_prefix": "layer3"})
    return path


def run_evaluate(checkpoint, capsys, monkeypatch, *flags) -> tuple[dict, str]:
    monkeypatch.delenv("EDITLAB_DATA", raising=False)
    monkeypatch.setenv("EDITLAB_DEVICE", "cpu")
    assert main(["evaluate-edits", "--checkpoint", str(checkpoint), "--n-edits", "5", "--json", *flags]) == 0
    captured = capsys.readouterr()
    return json.loads(captured.out.strip().splitlines()[-1]), captured.err


@pytest.mark.slow
def test_cli_lookup_exact_on_the_sample(sample_checkpoint, capsys, monkeypatch):
    summary, err = run_evaluate(sample_checkpoint, capsys, monkeypatch, "--fixer", "lookup-exact")
    assert "embedded sample" in err
    assert SUMMARY_KEYS <= set(summary) and summary["fixer"] == "lookup-exact"
    assert summary["n_edits"] == 5 and summary["success_rate"] == 1.0 and summary["mean_steps"] == 0.0
    # No augmented view is byte-identical to the stored image, so nothing carries over.
    assert summary["generalization"] == 0.0
    # Only the edited images themselves (they are in the held-out sample) can change.
    assert abs(summary["drawdown"]) <= 1 / summary["n_heldout"] + 1e-9


@pytest.mark.slow
def test_cli_finetune_on_the_sample(sample_checkpoint, capsys, monkeypatch):
    summary, err = run_evaluate(sample_checkpoint, capsys, monkeypatch, "--fixer", "finetune", "--finetune-steps", "20",
                                "--heldout-size", "300", "--replay-ratio", "7", "--verbose")
    assert "fine-tuning replays the shipped sample of 2,000 CIFAR-10 training images" in err
    assert SUMMARY_KEYS <= set(summary) and summary["fixer"] == "finetune"
    hparams = summary["fixer_hparams"]
    assert hparams["replay_ratio"] == 7 and hparams["max_steps"] == 20
    assert (hparams["replay"], hparams["replay_size"]) == ("cifar10-train-sample", 2000)
    assert 0.0 <= summary["mean_steps"] <= 20 and -1.0 <= summary["generalization"] <= 1.0
    assert set(summary["generalization_by_family"]) == FAMILIES
