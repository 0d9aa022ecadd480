"""Integration: the shipped checkpoints load, carry honest cards, and editable training pays off.

The edit evaluation runs on the embedded sample (CIFAR-10 test 0-999), with the same seeded edits
for both models on the layers the editable one was trained to edit: the editable-trained model with
the editor it learned, the baseline-trained one with the same editor untrained, which is what the
learned one started from.
"""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from editcore import (SHIPPED_MODELS, EditableModel, EditSession, EditSettings, HeldOutEvaluator, ImageRef,
                      SharedModel, create_editor, evaluate_edits, full_logits, load_checkpoint, load_sample, read_card)

BASELINE, EDITABLE = SHIPPED_MODELS["baseline"], SHIPPED_MODELS["editable"]
# The test uses 100 seeded edits (seed 0; each edit a random label, which may be the true one), each scored on the
# sample's first HELDOUT_ROWS images. Measured when the pair shipped: drawdown 8.87 points (baseline, untrained editor)
# vs 5.54 (editable, as learned), 0.62x; 200 other-label edits on all 1,000 images: 8.49 vs 4.78 (docs/RESULTS.md).
N_EDITS = 100
HELDOUT_ROWS = 500
DRAWDOWN_RATIO_BOUND = 0.8
# Points of held-out accuracy after fifty default corrections in a row: measured 1.16 on this editable model (0.53 on
# the editable model the page shipped before it; the local editor is less local on a model trained for `layer2` edits
# of another editor, docs/RESULTS.md, issue 20).
SESSION50_DROP_BOUND = 1.5

pytestmark = pytest.mark.skipif(not (BASELINE.exists() and EDITABLE.exists()), reason="shipped checkpoints missing")


@pytest.mark.parametrize("path, objective", [(BASELINE, "baseline"), (EDITABLE, "editable")])
def test_cards_describe_the_shipped_models(path, objective):
    """Both from scratch with the same outer recipe and early-stopping rule (issue 20); the editable one with the
    paper's editor, whose learned hyper-parameters the card gives; both edited on the layers it was trained for."""
    card = read_card(path)
    config = card["train_config"]
    assert card["arch"] == "resnet20" and card["objective"] == objective and card["init"] is None
    assert card["editable_prefix"] == "layer2"
    assert card["data"]["n_train"] == 50000 and card["data"]["n_test"] == 10000
    assert 0.5 < card["test_accuracy"] <= 1 and 0.5 < card["test_accuracy_exact_0_999"] <= 1
    assert card["command"].startswith("python -m editcore train") and card["wall_seconds"] > 0
    assert (config["optimizer"], config["lr"], config["clip_grad_norm"], config["schedule"]) == ("adam", 1e-3, 10, "constant")
    assert (config["val_size"], config["patience"]) == (2000, 20) and 0 < card["best_epoch"] < card["epochs"]
    assert card["best_epoch_rule"].startswith("the epoch with the lowest validation error")
    assert path.stat().st_size < 5_000_000
    assert config["editable"] == (objective == "editable")
    if objective == "editable":
        assert card["recipe"] == "paper" and config["editable_prefix"] == "layer2"
        assert card["editor"]["name"] == "rmsprop-paper" and 0 < card["editor"]["beta"] < 1


def _drawdown(path: Path, learned: bool) -> dict:
    checkpoint = load_checkpoint(path)
    editable = EditableModel(checkpoint.model, checkpoint.card["editable_prefix"])
    editor = checkpoint.editor if learned else create_editor("rmsprop-paper")
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
    assert editable["drawdown"] < DRAWDOWN_RATIO_BOUND * baseline["drawdown"], (editable, baseline)


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


# Issue 13: one correction by fine-tuning without replay (SGD lr 0.01 on every weight) cost 78.3 points of held-out
# accuracy. CORRECTION: test #52, an airplane the baseline calls a dog and the editable model a cat (the page's
# example in issue 20). On the embedded default (held-out = the test sample, #52 itself left out) with the
# shipped replay sample and the tuned defaults, on each model's editable layers (`layer2`), it measured -0.1
# points (baseline, 4 held-out images broken) and +0.1 (editable, 19 broken); the bound leaves room for other
# platforms' floating point.
CORRECTION = 52
CORRECTION_BOUND_POINTS = 2.0


@pytest.mark.slow
@pytest.mark.parametrize("name, path", [("baseline", BASELINE), ("editable", EDITABLE)])
def test_finetuning_one_correction_on_the_default_path_costs_little_heldout_accuracy(name, path, monkeypatch):
    from editcore import SOURCE_TEST, Lab, compare_fixes

    monkeypatch.delenv("EDITLAB_DATA", raising=False)
    lab = Lab.load([(name, path)], log=lambda *_: None)  # no data root: the embedded default
    test = lab.sources[SOURCE_TEST]
    image, label = test.images[CORRECTION], int(test.labels[CORRECTION])
    assert int(full_logits(lab.models[name].model, image[None]).argmax()) != label  # a correction
    _, outcomes = compare_fixes(lab.models, image, label, "rmsprop", 10, lab.replay_set(), heldout_row=CORRECTION)
    finetuning = next(o for o in outcomes if o.title.startswith("Fine-tuning"))
    assert finetuning.hyperparameters["replay"] == "cifar10-train-sample" and finetuning.hyperparameters["replay_ratio"] > 0
    assert finetuning.success
    cost = 100 * (finetuning.accuracy_before - finetuning.accuracy_after)
    print(f"fine-tuning the {name} model on test #{CORRECTION}: {finetuning.detail}; held-out accuracy "
          f"{100 * finetuning.accuracy_before:.1f}% -> {100 * finetuning.accuracy_after:.1f}% ({cost:+.1f} points, "
          f"{finetuning.n_broken} broken)")
    assert cost < CORRECTION_BOUND_POINTS
