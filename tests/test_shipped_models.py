"""Integration: the shipped checkpoints load, carry honest cards, and editable training pays off.

The edit evaluation runs on the embedded sample (CIFAR-10 test 0-999), with the same seeded edits
for both models: the editable-trained model with the editor it learned, the baseline-trained one
with the same editor at the default learning rate, which is what the learned one started from.
"""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from editcore import (DEFAULT_EDITOR, EditableModel, HeldOutEvaluator, create_editor, draw_edits, edit, evaluate_edits,
                      full_logits, load_checkpoint, load_sample, normalize, read_card)

ASSETS = Path(__file__).resolve().parent.parent / "assets"
BASELINE = ASSETS / "resnet20_baseline.safetensors"
EDITABLE = ASSETS / "resnet20_editable.safetensors"
# Measured with the shipped pair on the sample: drawdown 9.6% vs 8.1% (seed 0) and 10.0% vs 7.6% (seed 1) at
# 150 edits; at 40 edits seed 0 gave 8.4% vs 8.0%, too close to call. The test uses seed 0's first 100 of those
# edits: 9.58% vs 7.99%, as far apart as at 150 (paired difference per edit 1.60 +- 0.46 points, standard error),
# for two thirds of the time (docs/PERFORMANCE.md "tests").
N_EDITS = 100
SESSION_DROP_BOUND = 1.0  # points of held-out accuracy after ten default corrections in a row

pytestmark = pytest.mark.skipif(not (BASELINE.exists() and EDITABLE.exists()), reason="shipped checkpoints missing")


@pytest.mark.parametrize("path, objective", [(BASELINE, "baseline"), (EDITABLE, "editable")])
def test_cards_describe_the_shipped_models(path, objective):
    card = read_card(path)
    assert card["arch"] == "resnet20" and card["objective"] == objective
    assert card["editable_prefix"] == "layer3"
    assert card["data"]["n_train"] == 50000 and card["data"]["n_test"] == 10000
    assert 0.5 < card["test_accuracy"] <= 1 and 0.5 < card["test_accuracy_exact_0_999"] <= 1
    assert card["command"].startswith("python -m editcore train") and card["wall_seconds"] > 0
    assert path.stat().st_size < 5_000_000
    if objective == "editable":
        assert card["editor"]["name"] == "rmsprop" and card["editor"]["lr"] > 0
        assert card["train_config"]["editable"] and card["init"]


def _drawdown(path: Path, learned: bool) -> dict:
    checkpoint = load_checkpoint(path)
    editable = EditableModel(checkpoint.model, checkpoint.card["editable_prefix"])
    editor = checkpoint.editor if learned else create_editor("rmsprop")
    sample = load_sample()
    heldout = HeldOutEvaluator(editable, sample.images, sample.labels)
    torch.manual_seed(0)
    summary, _ = evaluate_edits(editable, editor, heldout, sample, n_edits=N_EDITS, seed=0, max_steps=10)
    return summary


@pytest.mark.slow
def test_editable_training_lowers_drawdown_on_the_same_edits():
    baseline = _drawdown(BASELINE, learned=False)
    editable = _drawdown(EDITABLE, learned=True)
    assert baseline["success_rate"] >= 0.95 and editable["success_rate"] >= 0.95
    assert editable["drawdown"] < baseline["drawdown"], (editable, baseline)


@pytest.mark.slow
@pytest.mark.parametrize("path", [BASELINE, EDITABLE])
def test_default_edits_correct_sample_images_locally(path):
    """The page's default editor (local) on ten corrections of the sample in one session: each succeeds,
    all ten still hold at the end, and held-out accuracy on the other images stays within a bound
    (measured on these ten: see docs/LOCALITY.md; plain RMSProp on layer3 loses several points)."""
    checkpoint = load_checkpoint(path)
    editor = create_editor(DEFAULT_EDITOR)
    editable = EditableModel(checkpoint.model, editor.default_layers)
    sample = load_sample()
    heldout = HeldOutEvaluator(editable, sample.images, sample.labels)
    rows, targets = draw_edits(sample, 10, seed=0, targets="corrections", predictions=heldout.base_predictions)
    others = torch.ones(len(sample), dtype=torch.bool)
    others[rows] = False
    accuracy = lambda predictions: float((predictions[others] == sample.labels[others]).float().mean())  # noqa: E731
    base, params, kept = accuracy(heldout.base_predictions), {}, []
    for row, target in zip(rows, targets):
        keep = (editable.features(normalize(sample.images[kept])), torch.tensor(targets[: len(kept)])) if kept else None
        result = edit(editable, normalize(sample.images[row : row + 1]), torch.tensor([target]), editor,
                      editor.default_max_steps, params=params or None, keep=keep)
        assert result.success
        params = result.params
        kept.append(row)
    with torch.no_grad():
        final = editable.logits(normalize(sample.images[rows]), params).argmax(1)
    assert final.tolist() == targets
    drop = 100 * (base - accuracy(heldout.predict(params)))
    assert drop <= SESSION_DROP_BOUND, drop


# Test #59 (a frog both shipped models call a cat), the correction issue 13 reproduced in the app's compare view:
# fine-tuning the editable model without replay (SGD lr 0.01 on every weight) cost 78.3 points of held-out
# accuracy. On the embedded default (held-out = the test sample, which holds #59 itself) with the shipped
# replay sample and the tuned defaults it measured 0.7 points (baseline, 17 held-out images broken) and
# 0.5 points (editable, 18 broken); Adam at lr 1e-4 measured 2.2 and 1.3. The bound leaves about 3x margin
# for other platforms' floating point.
FROG_59_BOUND_POINTS = 2.0


@pytest.mark.slow
@pytest.mark.parametrize("name, path", [("baseline", BASELINE), ("editable", EDITABLE)])
def test_finetuning_one_correction_on_the_default_path_costs_little_heldout_accuracy(name, path, monkeypatch):
    from editcore import SOURCE_TEST, Lab, compare_fixes

    monkeypatch.delenv("EDITLAB_DATA", raising=False)
    lab = Lab.load([(name, path)], log=lambda *_: None)  # no data root: the embedded default
    test = lab.sources[SOURCE_TEST]
    image, frog = test.images[59], int(test.labels[59])
    assert int(full_logits(lab.models[name].model, image[None]).argmax()) != frog  # a correction
    _, outcomes = compare_fixes(lab.models, image, frog, "rmsprop", 10, lab.replay_set())
    finetuning = next(o for o in outcomes if o.title.startswith("Fine-tuning"))
    assert finetuning.hyperparameters["replay"] == "cifar10-train-sample" and finetuning.hyperparameters["replay_ratio"] > 0
    assert finetuning.success
    cost = 100 * (finetuning.accuracy_before - finetuning.accuracy_after)
    print(f"fine-tuning the {name} model on test #59: {finetuning.detail}; held-out accuracy "
          f"{100 * finetuning.accuracy_before:.1f}% -> {100 * finetuning.accuracy_after:.1f}% ({cost:+.1f} points, "
          f"{finetuning.n_broken} broken)")
    assert cost < FROG_59_BOUND_POINTS
