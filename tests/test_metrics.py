"""Edit metrics: the cached-prefix evaluator agrees with the full model; the protocol's numbers add up."""
from __future__ import annotations

import pytest
import torch

from editcore import (EditableModel, EditRecord, HeldOutEvaluator, create_editor, draw_edits, edit, evaluate_edits,
                      normalize, summarize)
from editcore.core.edit import logit_margins
from editcore.core.heldout import MARGIN_ABS, MARGIN_REL, settled_margins, unsure_rows

from conftest import make_tiny


@pytest.fixture(scope="module")
def evaluator(resnet20, sample):
    editable = EditableModel(resnet20, "layer3")
    # A batch size that does not divide 1000, so the last, shorter batch is exercised too.
    return HeldOutEvaluator(editable, sample.images, sample.labels, batch_size=300)


def test_cached_prefix_predictions_equal_full_model(evaluator, sample):
    assert evaluator.editable.split == evaluator.editable.model.stage_names.index("layer3")
    assert torch.equal(evaluator.base_predictions, evaluator.predict_full())
    assert len(evaluator.base_predictions) == len(sample) == 1000
    # The briefly trained model is better than chance, so these predictions carry signal.
    assert evaluator.base_error < 0.85


def test_cached_features_match_a_plain_forward_pass(evaluator, sample):
    # The cache may use a faster memory layout; the numbers must still be the model's own.
    editable = evaluator.editable
    with torch.no_grad():
        plain = editable.model(normalize(sample.images[:300]))
        cached = editable.logits_from_features(evaluator.features[:300])
    assert torch.allclose(cached, plain, atol=1e-4, rtol=1e-4)


def test_cached_prefix_predictions_equal_full_model_after_an_edit(evaluator, sample):
    editable = evaluator.editable
    x = normalize(sample.images[:1])
    with torch.no_grad():
        target = editable.logits(x).argmin(1)
    result = edit(editable, x, target, create_editor("rmsprop", lr=1e-3), max_steps=20)
    assert result.success
    cached, full = evaluator.predict(result.params), evaluator.predict_full(result.params)
    assert torch.equal(cached, full)
    assert cached[0] == target  # the edited image is in the held-out set
    assert not torch.equal(cached, evaluator.base_predictions)


def test_summarize_on_a_hand_built_case():
    records = [
        EditRecord(index=0, target=3, success=True, steps=2, seconds=0.01, error_after=0.12),
        EditRecord(index=1, target=5, success=True, steps=0, seconds=0.02, error_after=0.10),
        EditRecord(index=2, target=1, success=False, steps=10, seconds=0.03, error_after=0.20),
        EditRecord(index=3, target=7, success=True, steps=4, seconds=0.04, error_after=0.14),
    ]
    summary = summarize(records, base_error=0.10)
    assert summary["test_error"] == 0.10
    assert summary["drawdown"] == pytest.approx((0.12 + 0.10 + 0.20 + 0.14) / 4 - 0.10)  # 0.04
    assert summary["success_rate"] == pytest.approx(0.75)
    assert summary["mean_steps"] == pytest.approx(4.0)
    assert summary["mean_edit_seconds"] == pytest.approx(0.025)
    assert summary["n_edits"] == 4
    with pytest.raises(ValueError):
        summarize([], 0.1)


def test_draw_edits_is_seeded_and_may_target_the_true_label(sample):
    rows, targets = draw_edits(sample, 200, seed=7)
    assert (rows, targets) == draw_edits(sample, 200, seed=7)
    assert (rows, targets) != draw_edits(sample, 200, seed=8)
    assert len(set(rows)) == 200 and all(0 <= t < 10 for t in targets)
    # Random targets are uniform over all classes, so some equal the true label (as in the paper's code).
    assert any(int(sample.labels[r]) == t for r, t in zip(rows, targets))
    rows, targets = draw_edits(sample, 5, seed=0, targets="true")
    assert targets == sample.labels[rows].tolist()


def test_evaluate_edits_scores_each_edit_from_the_unedited_model(evaluator, sample):
    editor = create_editor("rmsprop", lr=1e-3)
    summary, records = evaluate_edits(evaluator.editable, editor, evaluator, sample, n_edits=4, seed=0, max_steps=20)
    assert summary["n_edits"] == len(records) == 4
    rows, targets = draw_edits(sample, 4, seed=0)
    assert [r.index for r in records] == rows and [r.target for r in records] == targets
    for record in records:
        # Each edit starts from the base model, so scoring it alone reproduces its recorded error.
        x = normalize(sample.images[record.index : record.index + 1])
        result = edit(evaluator.editable, x, torch.tensor([record.target]), editor, max_steps=20)
        assert record.success == result.success and record.steps == result.steps
        assert record.error_after == evaluator.error(evaluator.predict(result.params))
    assert summary["test_error"] == evaluator.base_error
    assert summary["drawdown"] == pytest.approx(sum(r.error_after for r in records) / 4 - evaluator.base_error)


def test_draw_edits_other_never_targets_the_true_label(sample):
    rows, targets = draw_edits(sample, 300, seed=3, targets="other")
    assert all(t != int(sample.labels[r]) for r, t in zip(rows, targets))
    assert len(set(targets)) == 10
    assert (rows, targets) == draw_edits(sample, 300, seed=3, targets="other")


def test_draw_edits_corrections_are_mistakes_to_the_true_label(sample):
    predictions = sample.labels.clone()
    predictions[:40:2] = (predictions[:40:2] + 1) % 10  # 20 mistakes
    rows, targets = draw_edits(sample, 50, seed=0, targets="corrections", predictions=predictions)
    assert sorted(rows) == list(range(0, 40, 2))
    assert targets == [int(sample.labels[r]) for r in rows]
    assert draw_edits(sample, 5, seed=1, targets="corrections", predictions=predictions)[0] != rows[:5]
    with pytest.raises(ValueError, match="predictions"):
        draw_edits(sample, 5, seed=0, targets="corrections")


def test_unsure_rows_are_those_under_the_margin():
    threshold = MARGIN_ABS + MARGIN_REL * 10
    logits = torch.tensor([[10.0, 10 - threshold * 0.99, 0.0],   # just under: unsure
                           [10.0, 10 - threshold * 1.01, 0.0],   # just over: trusted
                           [-1.0, 5.0, 5.0],                     # a tie
                           [0.0, 0.0, 20.0]])
    assert unsure_rows(logits).tolist() == [0, 2]


def test_mixed_precision_settles_near_ties_as_float32_does():
    """Two classes whose logits differ by a little, around a large shared value: bfloat16 alone mixes them
    up on some rows; the evaluator recomputes exactly the unsure ones and predicts float32's classes."""
    model = make_tiny()
    with torch.no_grad():
        fc = model.head[2]
        fc.bias[:2] = 10.0
        fc.weight[1] = fc.weight[0] + 0.8 * torch.randn(24, generator=torch.Generator().manual_seed(0))
    editable = EditableModel(model, "body")
    images = torch.randint(0, 256, (600, 3, 8, 8), generator=torch.Generator().manual_seed(1), dtype=torch.uint8)
    labels = torch.zeros(600, dtype=torch.long)
    mixed = HeldOutEvaluator(editable, images, labels, batch_size=128, mixed_precision=True)
    exact = HeldOutEvaluator(editable, images, labels, batch_size=128, mixed_precision=False)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        bfloat16_only = editable.logits_from_features(mixed.features).float().argmax(1)
    float32 = exact.predict()
    assert not torch.equal(bfloat16_only, float32)  # the fallback has work to do
    assert torch.equal(mixed.predict(), float32) and torch.equal(float32, exact.predict_full())
    assert 0 < mixed.recomputed < len(images)  # both paths ran
    assert mixed.precision != exact.precision == "float32" and exact.recomputed == 0


def test_settled_margins_put_every_row_on_float32s_side_of_its_threshold():
    """A local edit's check of its kept rows (thousands with a guard): bfloat16 alone puts some rows on the wrong side
    of their keep margin; settled, every row is on float32's side, and without mixed precision the margins are
    float32's exactly."""
    model = make_tiny()
    with torch.no_grad():
        model.head[2].bias[:2] = 10.0
    editable = EditableModel(model, "body")
    images = torch.randint(0, 256, (600, 3, 8, 8), generator=torch.Generator().manual_seed(3), dtype=torch.uint8)
    with torch.no_grad():
        features = editable.features(normalize(images))
        float32 = logit_margins(editable.logits_from_features(features), torch.zeros(600, dtype=torch.long))
        with torch.autocast("cpu", dtype=torch.bfloat16):
            bfloat16 = logit_margins(editable.logits_from_features(features).float(), torch.zeros(600, dtype=torch.long))
    thresholds = float32 + 0.02 * torch.randn(600, generator=torch.Generator().manual_seed(4))  # right at the margins
    targets = torch.zeros(600, dtype=torch.long)
    assert not torch.equal(bfloat16 >= thresholds, float32 >= thresholds)  # the settling has work to do
    settled = settled_margins(editable, features, targets, thresholds, None, mixed_precision=True, batch_size=128)
    assert torch.equal(settled >= thresholds, float32 >= thresholds)
    exact = settled_margins(editable, features, targets, thresholds, None, mixed_precision=False, batch_size=128)
    assert torch.equal(exact, float32)


def test_held_out_rows_scored_in_parts_give_the_logits_of_one_pass():
    model = make_tiny()
    editable = EditableModel(model, "body")
    images = torch.randint(0, 256, (700, 3, 8, 8), generator=torch.Generator().manual_seed(2), dtype=torch.uint8)
    evaluator = HeldOutEvaluator(editable, images, torch.zeros(700, dtype=torch.long), batch_size=200,
                                 mixed_precision=False)
    params = {name: value + 0.1 for name, value in editable.frozen_base_params().items()}
    whole = evaluator.logits(params)
    parts = torch.cat([evaluator.logits(params, slice(0, 400)), evaluator.logits(params, slice(400, None))])
    assert torch.equal(parts, whole) and not torch.equal(whole, evaluator.logits())


def test_mixed_precision_predicts_float32s_classes_before_and_after_an_edit(resnet20, sample):
    editable = EditableModel(resnet20, "layer3")
    images, labels = sample.images[:400], sample.labels[:400]
    mixed = HeldOutEvaluator(editable, images, labels, batch_size=150, mixed_precision=True)
    exact = HeldOutEvaluator(editable, images, labels, batch_size=150, mixed_precision=False)
    assert torch.equal(mixed.base_predictions, exact.base_predictions)
    for row, target in ((0, 3), (7, 8)):
        params = edit(editable, normalize(images[row : row + 1]), torch.tensor([target]), create_editor("rmsprop", lr=1e-3),
                      max_steps=10).params
        assert torch.equal(mixed.predict(params), exact.predict(params))


def test_bfloat16_is_native_only_on_a_cpu_that_lists_its_instructions(monkeypatch):
    """oneDNN runs bfloat16 on any AVX-512 CPU, emulated and slower than float32 there: such a CPU gets float32."""
    from editcore.core import heldout

    onednn = bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    monkeypatch.setattr(heldout, "x86_cpu_flags", lambda: frozenset({"avx2", "avx512f", "avx512bw", "avx512_vnni"}))
    assert heldout.native_bfloat16("cpu") is False
    for flags in (frozenset({"avx512f", "avx512_bf16"}), frozenset({"amx_tile", "amx_bf16"}), None):  # None: not x86 Linux
        monkeypatch.setattr(heldout, "x86_cpu_flags", lambda: flags)
        assert heldout.native_bfloat16("cpu") is onednn
    assert heldout.native_bfloat16("meta") is False
