"""The local editor: projected updates leave anchor outputs alone, steps follow the gradient's size,
session constraints keep earlier corrections, and the edit is still a pure function."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from editcore import AnchorSubspace, EditableModel, create_editor, edit, local_edit, logit_margins
from editcore.core.locality import GUARD_SHARE, KEEP_MARGIN, in_conv_layout, with_guard
from editcore.core.models import StagedNet

from conftest import make_tiny

DIM, RANK, CLASSES = 12, 5, 4


class LinearNet(StagedNet):
    """features -> linear head: the edited layer's inputs are the network's inputs, so anchors can be
    placed in a chosen subspace and the effect of an update on them is exactly linear."""

    stage_names = ("stem", "head")

    def __init__(self):
        super().__init__()
        self.stem = nn.Flatten()
        self.head = nn.Linear(DIM, CLASSES)


@pytest.fixture
def linear():
    torch.manual_seed(0)
    model = LinearNet().eval()
    gen = torch.Generator().manual_seed(1)
    basis = torch.linalg.qr(torch.randn(DIM, RANK, generator=gen))[0]  # anchors span RANK of DIM directions
    anchors = torch.randn(200, RANK, generator=gen) @ basis.T
    return EditableModel(model, "head"), anchors


def test_projector_keeps_only_low_energy_directions(linear):
    editable, anchors = linear
    subspace = AnchorSubspace(editable, anchors, energy=1e-9)
    projector = subspace.projectors["head.weight"]
    assert subspace.names == ["head.weight"]  # the bias has no input side to project
    assert subspace.dims["head.weight"] == (DIM - RANK, DIM)
    assert torch.allclose(projector @ projector, projector, atol=1e-5)  # a projector
    assert float((anchors @ projector).norm()) < 1e-4 * float(anchors.norm())  # orthogonal to every anchor


def test_a_projected_edit_leaves_the_anchors_outputs_unchanged(linear):
    editable, anchors = linear
    subspace = AnchorSubspace(editable, anchors, energy=1e-9)
    query = torch.randn(1, DIM, generator=torch.Generator().manual_seed(2))  # off the anchors' span
    with torch.no_grad():
        target = editable.logits(query).argmin(1)
        before = editable.logits(anchors)
    result = local_edit(editable, query, target, subspace, max_steps=20, copies=0)
    assert result.success
    with torch.no_grad():
        after = editable.logits(anchors, result.params)
        assert torch.allclose(after, before, atol=1e-4)
        # The same loss reduced without the projection moves the anchors.
        plain = AnchorSubspace(editable, anchors, energy=1.0)
        moved = editable.logits(anchors, local_edit(editable, query, target, plain, 20, copies=0).params)
        assert float((moved - before).abs().max()) > 0.1


def test_first_step_is_the_polyak_step_along_the_projected_gradient(linear):
    editable, anchors = linear
    subspace = AnchorSubspace(editable, anchors, energy=0.5)
    query = torch.randn(1, DIM, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        target = editable.logits(query).argmin(1)
    weight = editable.frozen_base_params()["head.weight"].clone().requires_grad_(True)
    bias = editable.frozen_base_params()["head.bias"]
    loss = torch.relu(3.0 - logit_margins(nn.functional.linear(query, weight, bias), target)).mean()
    grad = torch.autograd.grad(loss, weight)[0]
    direction = grad @ subspace.projectors["head.weight"]
    expected = weight.detach() - float(loss.detach()) / float((direction * direction).sum()) * direction
    for scale in (1.0, 0.5):
        result = local_edit(editable, query, target, subspace, max_steps=1, margin=3.0, copies=0, step_scale=scale)
        step = result.params["head.weight"] - weight.detach()
        assert torch.allclose(step, scale * (expected - weight.detach()), atol=1e-6)
        assert torch.equal(result.params["head.bias"], bias)  # only projected weights move


def test_session_constraints_keep_an_earlier_correction():
    model = make_tiny()
    editable = EditableModel(model, "body")
    inputs = torch.randn(8, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    anchors = torch.randn(64, 3, 8, 8, generator=torch.Generator().manual_seed(5))
    subspace = AnchorSubspace(editable, anchors, energy=0.5)
    with torch.no_grad():
        logits = editable.logits(inputs)
    first_target = logits[0:1].argsort(1)[:, -2]  # the runner-up class
    first = local_edit(editable, inputs[0:1], first_target, subspace, 50, margin=1.0, copies=0)
    assert first.success
    # Push the second input towards the class the first one had before its correction.
    second_target = logits[0:1].argmax(1)
    kept = local_edit(editable, inputs[1:2], second_target, subspace, 50, margin=4.0, copies=0, params=first.params,
                      keep_inputs=inputs[0:1], keep_targets=first_target)
    with torch.no_grad():
        assert editable.logits(inputs[0:1], kept.params).argmax(1).item() == first_target.item()
        assert kept.success


def test_each_kept_row_can_carry_its_own_margin():
    """`keep_margins`: KEEP_MARGIN for every row is the default, bit for bit; a row given a higher one ends higher."""
    model = make_tiny()
    editable = EditableModel(model, "body")
    inputs = torch.randn(8, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    subspace = AnchorSubspace(editable, torch.randn(64, 3, 8, 8, generator=torch.Generator().manual_seed(5)), 0.5)
    with torch.no_grad():
        logits = editable.logits(inputs)
    first_target = logits[0:1].argsort(1)[:, -2]
    first = local_edit(editable, inputs[0:1], first_target, subspace, 50, margin=1.0, copies=0)
    second_target = logits[0:1].argmax(1)  # pulls the first input back to where it was
    common = dict(params=first.params, keep_inputs=inputs[0:1], keep_targets=first_target, copies=0)
    default = local_edit(editable, inputs[1:2], second_target, subspace, 50, margin=1.0, **common)
    same = local_edit(editable, inputs[1:2], second_target, subspace, 50, margin=1.0, **common,
                      keep_margins=torch.tensor([KEEP_MARGIN]))
    assert all(torch.equal(default.params[n], same.params[n]) for n in default.params)
    higher = local_edit(editable, inputs[1:2], second_target, subspace, 50, margin=1.0, **common,
                        keep_margins=torch.tensor([3.0]))
    with torch.no_grad():
        kept = logit_margins(editable.logits(inputs[0:1], higher.params), first_target)
        kept_default = logit_margins(editable.logits(inputs[0:1], default.params), first_target)
    assert default.success and higher.success and kept.item() > kept_default.item() >= KEEP_MARGIN


def test_the_guard_keeps_the_anchor_classes_an_unguarded_edit_flips():
    model = make_tiny(seed=1)
    with torch.no_grad():
        model.head[2].weight.mul_(20)
    editable = EditableModel(model, "body")
    anchors = torch.randint(0, 256, (200, 3, 8, 8), dtype=torch.uint8, generator=torch.Generator().manual_seed(7))
    image = torch.randint(0, 256, (1, 3, 8, 8), dtype=torch.uint8, generator=torch.Generator().manual_seed(3))
    x, normalised = editable.domain.normalize(image), editable.domain.normalize(anchors)
    with torch.no_grad():
        base, target = editable.logits(normalised).argmax(1), editable.logits(x).argsort(1)[:, -2]
    # a session's earlier correction, kept: the guard acts in sessions only (a single edit gains nothing from it)
    earlier = torch.randint(0, 256, (1, 3, 8, 8), dtype=torch.uint8, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        earlier = editable.features(editable.domain.normalize(earlier))
        keep = (earlier, editable.logits_from_features(earlier).argmax(1))
    flipped, alone = {}, {}
    for guard in (0, 400):  # 400: the anchors and their mirror images
        editor = create_editor("local", anchors=anchors, guard=guard, margin=2.0, energy=0.5)
        result = edit(editable, x, target, editor, 50, keep=keep)
        assert result.success
        alone[guard] = edit(editable, x, target, editor, 50).params
        with torch.no_grad():
            flipped[guard] = int((editable.logits(normalised, result.params).argmax(1) != base).sum())
    assert flipped[400] * 20 < flipped[0]  # 2 of 200 against 141 when written
    assert all(torch.equal(alone[0][name], alone[400][name]) for name in alone[0])  # no session: no guard
    # guard=50: of the anchors and their mirror images, the 50 with the smallest base margins, GUARD_SHARE of each
    # margin kept (at most KEEP_MARGIN).
    features, classes, margins = create_editor("local", anchors=anchors, guard=50).guard_rows(editable)
    normalised = editable.domain.normalize(torch.cat([anchors, anchors.flip(-1)]))
    with torch.no_grad():
        base = editable.logits(normalised).argmax(1)
        base_margins = logit_margins(editable.logits(normalised), base)
    smallest = base_margins.argsort()[:50]
    assert torch.equal(features, editable.features(normalised[smallest])) and torch.equal(classes, base[smallest])
    assert torch.allclose(margins, (base_margins[smallest] * GUARD_SHARE).clamp(max=KEEP_MARGIN))


def test_the_guard_joins_a_sessions_corrections_in_the_layout_its_checks_run_fastest():
    for shape in ((8, 6, 4), (6,)):  # conv activations (channels_last), a transformer's or a linear layer's (as given)
        guard = (in_conv_layout(torch.randn(3, *shape)), torch.tensor([0, 1, 2]), torch.tensor([0.2, 0.4, 0.6]))
        corrections = torch.randn(2, *shape)
        features, targets, margins = with_guard(corrections, torch.tensor([3, 3]), guard)
        assert torch.equal(features, torch.cat([corrections, guard[0]])) and targets.tolist() == [3, 3, 0, 1, 2]
        assert torch.allclose(margins, torch.tensor([KEEP_MARGIN, KEEP_MARGIN, 0.2, 0.4, 0.6]))
        assert features.is_contiguous(memory_format=torch.channels_last) == (len(shape) == 3)


def test_the_guard_keeps_as_many_rows_as_a_check_may_cost(monkeypatch):
    """GUARD_FLOPS bounds a check of the guarded rows, counted on the stage the check runs (after the features):
    a model whose check of a row costs more keeps fewer rows."""
    from torch.utils.flop_counter import FlopCounterMode

    from editcore.core import locality

    editable = EditableModel(make_tiny(seed=1), "body")
    anchors = torch.randint(0, 256, (40, 3, 8, 8), dtype=torch.uint8, generator=torch.Generator().manual_seed(7))
    image = editable.domain.normalize(anchors[:1])
    with torch.no_grad():
        one_row = editable.features(image)
        with FlopCounterMode(display=False) as whole:
            editable.logits_from_features(editable.features(image))
        with FlopCounterMode(display=False) as check:
            editable.logits_from_features(one_row)
    assert whole.get_total_flops() > check.get_total_flops()  # else this test could not tell the two counts apart
    # the check of a row runs the stage after the features only: that is what a row costs, not a whole forward pass
    monkeypatch.setattr(locality, "GUARD_FLOPS", 3 * check.get_total_flops() + 1)
    assert len(create_editor("local", anchors=anchors, guard=20).guard_rows(editable)[0]) == 3


def test_the_shipped_resnet20_guards_exactly_the_default_rows():
    """GUARD_FLOPS is DEFAULT_GUARD checks of a shipped ResNet-20 row: the page's model keeps all DEFAULT_GUARD."""
    from torch.utils.flop_counter import FlopCounterMode

    from editcore import SHIPPED_MODELS
    from editcore.core.checkpoint import load_checkpoint
    from editcore.core.locality import DEFAULT_GUARD, GUARD_FLOPS

    model = load_checkpoint(SHIPPED_MODELS["editable"]).model
    editable = EditableModel(model, "layer3")
    with torch.no_grad():
        one_row = editable.features(torch.zeros(1, 3, 32, 32))
        with FlopCounterMode(display=False) as check:
            editable.logits_from_features(one_row)
    assert GUARD_FLOPS // check.get_total_flops() == DEFAULT_GUARD


def test_kept_rows_that_hold_cost_the_edit_nothing():
    """Earlier corrections that stay in place are only checked: the edit is the one made without them."""
    model = make_tiny()
    with torch.no_grad():
        model.head[2].weight.mul_(50)  # margins of a few logits, like a trained model's
    editable = EditableModel(model, "body")
    inputs = torch.randn(8, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    subspace = AnchorSubspace(editable, torch.randn(64, 3, 8, 8, generator=torch.Generator().manual_seed(5)), 0.5)
    with torch.no_grad():
        logits = editable.logits(inputs)
    margins = logits.topk(2, 1).values
    steady = (margins[:, 0] - margins[:, 1]).argsort(descending=True)[:3]  # the most confident inputs
    steady = steady[steady != 0]
    target = logits[0:1].argsort(1)[:, -2]
    alone = local_edit(editable, inputs[0:1], target, subspace, 50, margin=1.0, copies=0)
    kept = local_edit(editable, inputs[0:1], target, subspace, 50, margin=1.0, copies=0,
                      keep_inputs=inputs[steady], keep_targets=logits[steady].argmax(1))
    with torch.no_grad():
        after = editable.logits(inputs[steady], kept.params)
    assert (logit_margins(after, logits[steady].argmax(1)) >= KEEP_MARGIN).all()  # they held
    assert kept.steps == alone.steps and all(torch.equal(kept.params[n], alone.params[n]) for n in alone.params)


def test_protecting_earlier_corrections_keeps_their_outputs_to_first_order(linear):
    """With `protect`, steps also stay away from the kept corrections' inputs: an edit whose inputs share a
    direction with an earlier correction's leaves that correction's logits (nearly) where they were, while the
    same edit without it moves them; both reach their target."""
    editable, anchors = linear
    subspace = AnchorSubspace(editable, anchors, energy=1e-9)
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():
        earlier = 40 * editable.model.head.weight[0:1].clone()  # an input its class 0 holds by a wide margin
        query = earlier + 2 * torch.randn(1, DIM, generator=gen)  # close to the earlier correction
        target = editable.logits(query).argsort(1)[:, -2]
        before = editable.logits(earlier)
    assert logit_margins(before, before.argmax(1)).item() > KEEP_MARGIN  # it holds: only checked, never in the loss
    moved = {}
    for protect in (0.0, 1e4):
        result = local_edit(editable, query, target, subspace, max_steps=20, copies=0, keep_inputs=earlier,
                            keep_targets=before.argmax(1), protect=protect)
        assert result.success
        with torch.no_grad():
            moved[protect] = float((editable.logits(earlier, result.params) - before).norm())
    assert moved[1e4] < 0.01 * moved[0.0], moved


def test_protecting_needs_the_hard_cut(linear):
    editable, anchors = linear
    with pytest.raises(ValueError, match="hard-cut"):
        AnchorSubspace(editable, anchors, ridge=0.1).protecting({"head.weight": torch.eye(DIM)}, 1.0)


def test_local_editor_is_pure_and_registered(tiny):
    editable, inputs = tiny
    before = {k: v.clone() for k, v in editable.model.state_dict().items()}
    editor = create_editor("local", anchors=torch.randint(0, 256, (32, 3, 8, 8), dtype=torch.uint8))
    with torch.no_grad():
        target = editable.logits(inputs[:1]).argmin(1)
    result = edit(editable, inputs[:1], target, editor, max_steps=50)
    assert result.success and result.steps >= 1
    for key, value in editable.model.state_dict().items():
        assert torch.equal(value, before[key]), f"{key} changed"
    assert not torch.equal(result.params["body.0.weight"], before["body.0.weight"])
    with pytest.raises(ValueError, match="differentiable"):
        edit(editable, inputs[:1], target, editor, max_steps=5, order="second")
    with pytest.raises(ValueError):
        create_editor("local", energy=0.0)


def test_the_edits_copies_are_drawn_per_image_and_never_a_generalisation_view():
    from editcore import augmented_views, view_specs
    from editcore.core.locality import DEFAULT_COPIES, copy_offsets, crop_flip, image_seed

    views = {spec.offset for spec in view_specs() if spec.offset is not None}
    assert len(views) == 9  # 4 crops, the flip, 4 shifts
    draws = [copy_offsets(DEFAULT_COPIES, seed) for seed in range(50)]
    for moves in draws:
        assert len(set(moves)) == DEFAULT_COPIES and not set(moves) & (views | {(0, 0, False)})
    assert len({tuple(moves) for moves in draws}) == 50  # a different set for each seed
    image = torch.randint(0, 256, (3, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    other = image.roll(1, -1)
    assert image_seed(image) == image_seed(image.clone()) != image_seed(other)
    # No copy equals one of the 16 views pixel for pixel.
    copies = [crop_flip(image[None], *move)[0] for move in copy_offsets(DEFAULT_COPIES, image_seed(image))]
    assert not any(torch.equal(c, v) for c in copies for v in augmented_views(image))
