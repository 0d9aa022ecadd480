"""Integration: the shipped checkpoints load, carry honest cards, and editable training pays off.

The edit evaluation runs on the embedded sample (CIFAR-10 test 0-999), with the same seeded edits
for both models: the editable-trained model with the editor it learned, the baseline-trained one
with the same editor at the default learning rate, which is what the learned one started from.
"""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from editcore import (EditableModel, EditSession, EditSettings, HeldOutEvaluator, ImageRef, SharedModel, create_editor,
                      evaluate_edits, full_logits, load_checkpoint, load_sample, read_card)

ASSETS = Path(__file__).resolve().parent.parent / "assets"
BASELINE = ASSETS / "resnet20_baseline.safetensors"
EDITABLE = ASSETS / "resnet20_editable.safetensors"
# Measured with the shipped pair on the sample: drawdown 9.6% vs 8.1% (seed 0) and 10.0% vs 7.6% (seed 1) at
# 150 edits; at 40 edits seed 0 gave 8.4% vs 8.0%, too close to call. The test uses seed 0's first 100 of those
# edits, each scored on the sample's first HELDOUT_ROWS images: 10.53% vs 7.96% (paired difference per edit 2.57
# +- 0.49 points, standard error; on all 1,000 images 9.58% vs 7.99%, 1.60 +- 0.46) for half the scoring's CPU
# (docs/PERFORMANCE.md "tests").
N_EDITS = 100
HELDOUT_ROWS = 500
SESSION50_DROP_BOUND = 1.0  # points of held-out accuracy after fifty default corrections in a row (measured: 0.53,
# with the guard as without it)

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
    heldout = HeldOutEvaluator(editable, sample.images[:HELDOUT_ROWS], sample.labels[:HELDOUT_ROWS])
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
def test_fifty_corrections_in_one_session_hold_and_cost_little():
    """The page's defaults (the local editor on layer3, the editable-trained model) through EditSession: fifty
    corrections of the sample in a row are all kept, all still hold at the end, and held-out accuracy on the 950
    images the session did not edit stays within SESSION50_DROP_BOUND points (docs/LOCALITY.md, "Sessions of 50
    and 200"; one conv, the default before issue 22, lost ~3 points over 50 corrections)."""
    sample = load_sample()
    session = EditSession(SharedModel("editable", EDITABLE, sample))
    wrong = torch.nonzero(session.heldout_probs.argmax(1) != sample.labels).view(-1)
    rows = wrong[torch.randperm(len(wrong), generator=torch.Generator().manual_seed(0))[:50]].tolist()
    for row in rows:
        report = session.apply(sample.images[row : row + 1], [int(sample.labels[row])], EditSettings(),
                               [ImageRef("test", row)])
        assert report.applied and report.settings.layers == "layer3", report.message
    assert report.n_heldout == len(sample) - 50 and report.corrections_held == 50
    assert session.probabilities(sample.images[rows]).argmax(1).tolist() == sample.labels[rows].tolist()
    drop = 100 * (report.heldout_accuracy_base - report.heldout_accuracy_after)
    assert drop <= SESSION50_DROP_BOUND, drop


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
