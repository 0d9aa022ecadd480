"""Editors: edits converge, leave the base model untouched, and are differentiable end to end."""
from __future__ import annotations

import pytest
import torch

from editcore import EDITORS, EditableModel, create_editor, edit, edit_loss
from editcore.core.editors import editor_from_state

from conftest import make_tiny

# Learning rates at which each editor fixes the tiny model in a few steps.
CONVERGING_LR = {"gd": 0.1, "momentum": 0.1, "rmsprop": 0.01, "rmsprop-paper": 0.01, "adam": 0.01}
# Editors that take per-step updates (the local editor runs its own procedure: tests/test_locality.py).
STEP_EDITORS = sorted(name for name, cls in EDITORS.items() if not hasattr(cls, "apply_edit"))


def test_every_editor_is_covered():
    assert set(CONVERGING_LR) == set(STEP_EDITORS)


@pytest.mark.parametrize("name", sorted(CONVERGING_LR))
def test_edit_converges_and_leaves_base_params_bit_identical(tiny, name):
    editable, inputs = tiny
    before = {k: v.clone() for k, v in editable.model.state_dict().items()}
    with torch.no_grad():
        target = editable.logits(inputs[:1]).argmin(1)  # the least likely class: a real edit

    result = edit(editable, inputs[:1], target, create_editor(name, lr=CONVERGING_LR[name]), max_steps=50)

    assert result.success and 0 < result.steps <= 50
    assert len(result.losses) == result.steps + 1 and result.losses[-1] < result.losses[0]
    with torch.no_grad():
        assert editable.logits(inputs[:1], result.params).argmax(1).item() == target.item()
    for key, value in editable.model.state_dict().items():
        assert torch.equal(value, before[key]), f"{key} changed"
    assert set(result.params) == set(editable.names)
    assert any(not torch.equal(result.params[n], before[n]) for n in editable.names)
    assert all(not p.requires_grad for p in result.params.values())


def test_edit_stops_without_steps_when_target_already_wins(tiny):
    editable, inputs = tiny
    with torch.no_grad():
        target = editable.logits(inputs[:1]).argmax(1)
    result = edit(editable, inputs[:1], target, create_editor("gd"), max_steps=10)
    assert result.success and result.steps == 0


def test_edit_reports_failure_after_max_steps(tiny):
    editable, inputs = tiny
    with torch.no_grad():
        target = editable.logits(inputs[:1]).argmin(1)
    result = edit(editable, inputs[:1], target, create_editor("gd", lr=1e-6), max_steps=3)
    assert not result.success and result.steps == 3 and len(result.losses) == 4


def test_editor_step_does_not_modify_its_inputs():
    params = {"w": torch.randn(3, 4)}
    grads = {"w": torch.randn(3, 4)}
    copies = {"w": params["w"].clone()}, {"w": grads["w"].clone()}
    for name in STEP_EDITORS:
        editor = create_editor(name)
        state = editor.init_state(params)
        new, _ = editor.step(params, grads, state)
        new, _ = editor.step(new, grads, _)
        assert torch.equal(params["w"], copies[0]["w"]) and torch.equal(grads["w"], copies[1]["w"])
        assert not torch.equal(new["w"], params["w"])


def test_editor_validates_hyperparameters():
    with pytest.raises(ValueError):
        create_editor("gd", lr=-1.0)
    with pytest.raises(ValueError):
        create_editor("adam", beta1=1.0)
    with pytest.raises(ValueError):
        create_editor("gd", beta=0.5)
    with pytest.raises(ValueError):
        create_editor("sgd-with-typo")


def test_editor_state_round_trip_keeps_learned_values():
    editor = create_editor("adam", lr=0.02, learnable=True, beta1=0.7, beta2=0.95)
    again = editor_from_state("adam", editor.state_dict())
    assert again.hyperparameters() == pytest.approx({"lr": 0.02, "beta1": 0.7, "beta2": 0.95})


# --- differentiability: editable training backpropagates through the editor's steps ------------------

K = 3


def after_edit_objective(editable, editor, inputs, order):
    """What editable training minimises, on a tiny scale: edit one image for exactly K steps, then
    (edit loss at the end) + (cross-entropy of the edited model on other images)."""
    with torch.no_grad():
        base_logits = editable.logits(inputs)
    target = base_logits[:1].argmin(1)
    result = edit(editable, inputs[:1], target, editor, max_steps=K, order=order)
    # The objective is only smooth if the number of steps cannot change under a small perturbation.
    assert not result.success and result.steps == K
    others = editable.logits(inputs[1:], result.params)
    return edit_loss(result.final_logits, target) + torch.nn.functional.cross_entropy(others, base_logits[1:].argmax(1))


def analytic_and_numeric(editor_name, order, directions=3, eps=1e-6):
    """(gradient . v, central difference along v) for random directions v over all model and editor parameters."""
    model = make_tiny(seed=3, dtype=torch.float64)
    editable = EditableModel(model, "body")
    editor = create_editor(editor_name, lr=1e-3, learnable=True).double()
    inputs = torch.randn(6, 3, 8, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    named = list(model.named_parameters()) + [(n, p) for n, p in editor.named_parameters() if p.requires_grad]
    leaves = [p for _, p in named]

    loss = after_edit_objective(editable, editor, inputs, order)
    grads = torch.autograd.grad(loss, leaves)

    gen = torch.Generator().manual_seed(5)
    pairs = []
    for _ in range(directions):
        direction = [torch.randn(p.shape, dtype=p.dtype, generator=gen) for p in leaves]
        values = []
        for sign in (1.0, -1.0):
            with torch.no_grad():
                for p, v in zip(leaves, direction):
                    p.add_(sign * eps * v)
            with torch.no_grad():
                values.append(float(after_edit_objective(editable, editor, inputs, "none")))
            with torch.no_grad():
                for p, v in zip(leaves, direction):
                    p.sub_(sign * eps * v)
        numeric = (values[0] - values[1]) / (2 * eps)
        analytic = float(sum((g * v).sum() for g, v in zip(grads, direction)))
        pairs.append((analytic, numeric))
    return pairs, dict(zip([n for n, _ in named], grads))


@pytest.mark.parametrize("name", STEP_EDITORS)
def test_second_order_gradient_matches_finite_differences(name):
    pairs, _ = analytic_and_numeric(name, "second")
    for analytic, numeric in pairs:
        assert analytic == pytest.approx(numeric, rel=1e-5, abs=1e-9)


def test_first_order_gradient_flows_but_is_approximate():
    second, _ = analytic_and_numeric("gd", "second", directions=2)
    first, grads = analytic_and_numeric("gd", "first", directions=2)
    for (exact, numeric), (approx, _) in zip(second, first):
        assert exact == pytest.approx(numeric, rel=1e-5)
        assert approx != pytest.approx(numeric, rel=1e-3)  # drops the second-order terms
    assert all(torch.isfinite(g).all() for g in grads.values())
    assert grads["log_lr"].abs() > 0
    assert all(grads[n].abs().sum() > 0 for n in ("body.0.weight", "stem.0.weight", "head.2.weight"))


@pytest.mark.parametrize("name", STEP_EDITORS)
def test_learnable_hyperparameters_receive_gradients(name):
    editable = EditableModel(make_tiny(seed=3), "body")
    editor = create_editor(name, lr=1e-3, learnable=True)
    inputs = torch.randn(6, 3, 8, 8, generator=torch.Generator().manual_seed(4))
    after_edit_objective(editable, editor, inputs, "second").backward()
    hyper = dict(editor.named_parameters())
    assert set(hyper) == {"log_lr"} | {f"logit_{b}" for b in editor.beta_names}
    for key, param in hyper.items():
        if key in editor.frozen:
            assert param.grad is None, key
        else:
            assert param.grad is not None and torch.isfinite(param.grad) and param.grad.abs() > 0, key


def test_fixed_editor_hyperparameters_are_not_trained():
    editor = create_editor("rmsprop")
    assert not any(p.requires_grad for p in editor.parameters())


def test_paper_rmsprop_first_step_is_lr_times_sign_and_its_lr_stays_fixed():
    grads = {"w": torch.tensor([[3.0, -0.2], [0.5, -40.0]])}
    params = {"w": torch.zeros(2, 2)}
    editor = create_editor("rmsprop-paper", learnable=True)
    assert editor.hyperparameters() == pytest.approx({"lr": 1e-3, "beta": 0.5})
    new, state = editor.step(params, grads, editor.init_state(params))
    assert torch.allclose(new["w"], -1e-3 * grads["w"].sign(), rtol=1e-6, atol=0)
    assert torch.equal(state["square"]["w"], grads["w"] ** 2)
    plain = create_editor("rmsprop", lr=1e-3)  # its average starts at 0: a first step 1/sqrt(1 - 0.9) times larger
    first, _ = plain.step(params, grads, plain.init_state(params))
    assert torch.allclose(first["w"], new["w"] * 10**0.5, rtol=1e-5)
    assert [n for n, p in editor.named_parameters() if p.requires_grad] == ["logit_beta"]
    assert not any(p.requires_grad for p in editor.set_learnable(False).parameters())
