"""The edit: the paper's margin loss, batch edits, argument checks, and the model stays in its mode."""
from __future__ import annotations

import math

import pytest
import torch

from editcore import create_editor, edit, edit_loss, eval_mode

from conftest import make_tiny as create_tiny_model


def test_edit_loss_matches_the_formula_by_hand():
    logits = torch.tensor([[2.0, 1.0, 0.0], [0.0, 3.0, -1.0]])
    targets = torch.tensor([2, 1])

    def by_hand(row, y):
        log_z = math.log(sum(math.exp(v) for v in row))
        log_p = [v - log_z for v in row]
        return max(0.0, max(lp for c, lp in enumerate(log_p) if c != y) - log_p[y])

    expected = (by_hand([2.0, 1.0, 0.0], 2) + by_hand([0.0, 3.0, -1.0], 1)) / 2
    assert by_hand([2.0, 1.0, 0.0], 2) == pytest.approx(2.0)  # margin to the best other class
    assert by_hand([0.0, 3.0, -1.0], 1) == 0.0  # already the argmax: no loss
    assert float(edit_loss(logits, targets)) == pytest.approx(expected)


def test_edit_loss_is_zero_exactly_when_every_target_wins():
    logits = torch.randn(16, 10, generator=torch.Generator().manual_seed(0))
    assert float(edit_loss(logits, logits.argmax(1))) == 0.0
    assert float(edit_loss(logits, logits.argmin(1))) > 0.0


def test_batch_edit_fixes_every_pair_at_once(tiny):
    editable, inputs = tiny
    with torch.no_grad():
        targets = editable.logits(inputs[:4]).argmin(1)
    result = edit(editable, inputs[:4], targets, create_editor("rmsprop", lr=0.01), max_steps=100)
    assert result.success
    assert torch.equal(result.final_logits.argmax(1), targets)
    with torch.no_grad():
        assert torch.equal(editable.logits(inputs[:4], result.params).argmax(1), targets)


def test_batch_edit_fails_when_one_pair_is_not_reached(tiny):
    editable, inputs = tiny
    with torch.no_grad():
        targets = editable.logits(inputs[:2]).argmax(1)
    targets[1] = (targets[1] + 1) % 10  # the first pair already holds, the second needs a change
    result = edit(editable, inputs[:2], targets, create_editor("gd", lr=1e-8), max_steps=2)
    assert not result.success and result.steps == 2


def test_edit_runs_batch_norm_in_eval_mode_and_restores_the_mode(tiny):
    editable, inputs = tiny
    editable.model.train()
    running_mean = editable.model.body[1].running_mean.clone()
    with torch.no_grad(), eval_mode(editable.model):
        targets = editable.logits(inputs[:2]).argmin(1)
    result = edit(editable, inputs[:2], targets, create_editor("gd", lr=0.1), max_steps=3)
    assert editable.model.training
    assert torch.equal(editable.model.body[1].running_mean, running_mean)  # train-mode BN would update it
    with torch.no_grad(), eval_mode(editable.model):
        expected = editable.logits(inputs[:2], result.params)
    assert torch.allclose(result.final_logits, expected, atol=1e-6)


def test_edit_rejects_bad_arguments(tiny):
    editable, inputs = tiny
    with pytest.raises(ValueError):
        edit(editable, inputs[:1], torch.tensor([0]), create_editor("gd"), order="third")
    with pytest.raises(ValueError):
        edit(editable, inputs[:1], torch.tensor([0]), create_editor("gd"), max_steps=-1)


def test_delta_is_the_change_from_base(tiny):
    editable, inputs = tiny
    with torch.no_grad():
        target = editable.logits(inputs[:1]).argmin(1)
    result = edit(editable, inputs[:1], target, create_editor("gd", lr=0.1), max_steps=50)
    base = editable.frozen_base_params()
    delta = result.delta(base)
    for name in editable.names:
        assert torch.allclose(base[name] + delta[name], result.params[name])


def test_eval_mode_sets_and_restores_every_modules_mode(tiny):
    editable, _ = tiny
    model = editable.model
    for root, body in ((True, True), (False, True), (False, False)):  # (False, True): a train-mode part of an eval model
        model.train(root)
        model.body.train(body)
        with eval_mode(model):
            assert not any(module.training for module in model.modules())
        assert [module.training for module in model.modules()] == [root] * len(list(model.modules()))


def test_edited_params_replace_a_tied_weight_everywhere_it_is_used():
    from editcore import EditableModel
    from editcore.core.models import StagedNet

    class Tied(StagedNet):
        stage_names = ("stem", "head")

        def __init__(self):
            super().__init__()
            self.stem, self.head = torch.nn.Linear(4, 4), torch.nn.Linear(4, 4)
            self.head.weight = self.stem.weight  # one tensor under two names

    torch.manual_seed(0)
    model = Tied().eval()
    editable = EditableModel(model, "stem")
    assert editable.tied and not EditableModel(create_tiny_model(), "body").tied
    inputs, weight = torch.randn(3, 4), torch.randn(4, 4)
    with torch.no_grad():
        edited = editable.logits_from_features(inputs, {"stem.weight": weight})
        both = torch.nn.functional.linear(torch.nn.functional.linear(inputs, weight, model.stem.bias), weight, model.head.bias)
    assert torch.allclose(edited, both)
