"""The app's GUI-free core: edit sessions (apply, undo, reset, guardrail, export, replay), workspaces
(browse, uploads, batch, isolation) and the method comparison, called directly as Python."""
from __future__ import annotations

import io
import json

import numpy as np
import pytest
import torch
from PIL import Image

from app_support import make_lab
from editcore import (CLASSES, EDITORS, SOURCE_TEST, SOURCE_UPLOADS, BrowseQuery, EditSession, EditSettings, ImageError,
                      ImageRef, SettingsError, compare_fixes, create_editor, decode_image, lesson_editors,
                      load_checkpoint, normalize, read_log, replay_summary)
from editcore.lab.compare import EDITOR_TITLES


@pytest.fixture(scope="module")
def lab(tmp_path_factory, request):
    return make_lab(tmp_path_factory, request)


_keys = iter(range(10**6))


@pytest.fixture
def ws(lab):
    """A fresh workspace (its own edits) on the shared lab, dropped after the test."""
    key = f"test-{next(_keys)}"
    yield lab.registry.get(key)
    lab.registry.drop(key)


def first_misclassified(ws, model="baseline"):
    page = ws.browse(model, BrowseQuery(misclassified=True, sort="confidence-desc", page_size=5))
    item = page.items[0]
    ws.select(item.ref)
    return item


def test_apply_report_adds_up_and_matches_the_exported_model(ws, lab, tmp_path):
    item = first_misclassified(ws)
    session = ws.session("baseline")
    report = ws.apply("baseline", item.label, EditSettings(editor="rmsprop", lr=1e-3, max_steps=20))
    d = report.to_dict()
    assert d["success"] and d["applied"] and d["steps"] >= 1 and d["seconds"] >= 0
    # The edited image is not scored as held-out: 999 of the sample's 1,000 images are.
    test = lab.sources[SOURCE_TEST]
    others = torch.arange(len(test)) != item.ref.index
    n = d["n_heldout"]
    assert n == int(others.sum()) == 999 and session.heldout_accuracy() == d["heldout_accuracy_after"]
    base_accuracy = int((session._base.predictions == test.labels)[others].sum()) / n
    assert d["heldout_accuracy_before"] == d["heldout_accuracy_base"] == base_accuracy
    # Accuracy moves by exactly (fixed - broken) / n; the edited image is neither.
    assert d["heldout_accuracy_after"] == pytest.approx(base_accuracy + (d["n_fixed"] - d["n_broken"]) / n, abs=1e-12)
    assert item.ref.index not in report.fixed_rows + report.broken_rows
    assert d["n_fixed"] + d["n_broken"] <= d["n_changed"]
    assert d["n_corrections"] == d["corrections_held"] == 1
    assert session.topk(item.image)[0][0] == CLASSES[item.label]
    # The cached-feature evaluation agrees with the whole exported model run from scratch on the other images.
    exported = load_checkpoint(session.export_weights(tmp_path / "edited.safetensors"))
    with torch.no_grad():
        predictions = exported.model(normalize(test.images)).argmax(1)
    assert int((predictions == test.labels)[others].sum()) / n == d["heldout_accuracy_after"]
    assert exported.card["edits"][0]["targets"] == [CLASSES[item.label]]
    assert exported.card["edits"][0]["heldout_accuracy_after"] == d["heldout_accuracy_after"]


def test_undo_restores_the_top_k_exactly_and_reset_clears(ws):
    item = first_misclassified(ws)
    session = ws.session("baseline")
    original = session.topk(item.image)
    for target in (item.label, (item.label + 1) % 10):
        assert ws.apply("baseline", target, EditSettings(editor="rmsprop", lr=1e-3, max_steps=30)).applied
    assert session.topk(item.image) != original
    assert session.undo().number == 2 and len(session.history) == 1
    assert session.undo().number == 1 and session.params == {}
    assert session.topk(item.image) == original
    assert session.undo() is None
    ws.apply("baseline", item.label, EditSettings(editor="rmsprop", lr=1e-3, max_steps=30))
    assert session.reset() == 1 and session.history == [] and session.topk(item.image) == original
    assert session.accuracy_curve() == [session.heldout_accuracy()]


def test_an_edit_that_does_not_converge_is_rolled_back(ws):
    item = first_misclassified(ws)
    session = ws.session("baseline")
    report = ws.apply("baseline", item.label, EditSettings(editor="gd", lr=1e-9, max_steps=2))
    assert not report.success and not report.applied and "did not reach" in report.message
    assert session.history == [] and session.params == {}


def test_guardrail_rolls_back_an_edit_that_costs_too_much(ws):
    item = first_misclassified(ws)
    session = ws.session("baseline")
    # A large RMSProp step on layer3 of a weak model: it reaches the target and breaks many others.
    report = ws.apply("baseline", item.label, EditSettings(editor="rmsprop", lr=0.05, max_steps=20, max_drop=0.5))
    drop = 100 * (report.heldout_accuracy_before - report.heldout_accuracy_after)
    assert report.success and drop > 0.5
    assert not report.applied and "Guardrail" in report.message and session.history == []
    kept = ws.apply("baseline", item.label, EditSettings(editor="rmsprop", lr=0.05, max_steps=20, max_drop=100))
    assert kept.applied and len(session.history) == 1


def test_an_edit_tells_its_outcome_then_exact_held_out_figures_part_by_part(ws, lab, monkeypatch):
    from editcore.lab import session as session_module

    monkeypatch.setattr(session_module, "FIRST_SCORED_ROWS", 400)  # the sample in two parts, as the 10,000 images are
    item = first_misclassified(ws)
    session = ws.session("baseline")
    heard = []
    report = ws.apply("baseline", item.label, EditSettings(editor="rmsprop", lr=1e-3, max_steps=20),
                      on_outcome=heard.append, on_scored=heard.append)
    outcome, score = heard
    assert isinstance(outcome, session_module.EditOutcome) and isinstance(score, session_module.HeldOutScore)
    assert outcome.applied is report.applied is True and outcome.message == report.message
    assert (outcome.success, outcome.steps, outcome.views_after, outcome.corrections_held) == \
        (report.success, report.steps, report.views_after, report.corrections_held)
    assert outcome.topk == session.topk(item.image)  # the edited model's, as the page shows it once kept
    # The first part's figures are exact for its rows: those of the full report's predictions on them.
    labels, first = lab.sources[SOURCE_TEST].labels, slice(0, 400)
    scored = torch.arange(len(labels)) != item.ref.index
    right = lambda predictions: int(((predictions[first] == labels[first]) & scored[first]).sum())  # noqa: E731
    assert (score.n_rows, score.n_total, score.n_heldout) == (400, 1000, int(scored[first].sum()))
    assert score.heldout_accuracy_before == right(report.predictions_before) / score.n_heldout
    assert score.heldout_accuracy_after == right(report.predictions_after) / score.n_heldout
    assert score.n_fixed == sum(r < 400 for r in report.fixed_rows)
    assert score.n_broken == sum(r < 400 for r in report.broken_rows)
    # The parts put together are one pass over every row.
    whole = lab.models["baseline"].heldout_probabilities(session.layers, session.params)
    assert torch.equal(session.heldout_probs, whole)


def test_with_a_guardrail_the_outcome_waits_for_the_held_out_verdict(ws):
    item = first_misclassified(ws)
    heard = []
    report = ws.apply("baseline", item.label, EditSettings(editor="rmsprop", lr=0.05, max_steps=20, max_drop=0.5),
                      on_outcome=heard.append)
    assert heard[0].success and heard[0].applied is None and "guardrail" in heard[0].message
    assert not report.applied and "Guardrail" in report.message
    assert heard[0].topk[0][0] == CLASSES[item.label]  # the candidate's, shown while the guardrail checks it
    failed = []
    ws.apply("baseline", item.label, EditSettings(editor="gd", lr=1e-9, max_steps=2, max_drop=0.5), on_outcome=failed.append)
    assert failed[0].applied is False and "did not reach" in failed[0].message  # nothing left to wait for
    assert failed[0].topk == ws.session("baseline").topk(item.image)


@pytest.mark.parametrize("settings, message", [
    (EditSettings(lr=-1), "learning rate"),
    (EditSettings(lr=0), "learning rate"),
    (EditSettings(lr="abc"), "learning rate must be a number"),
    (EditSettings(lr=float("nan")), "finite"),
    (EditSettings(max_steps=0), "max steps"),
    (EditSettings(max_steps=2.5), "whole number"),
    (EditSettings(max_steps="ten"), "max steps must be a number"),
    (EditSettings(editor="sgd"), "editor must be one of"),
    (EditSettings(layers="stem"), "editable layers"),
    (EditSettings(max_drop=150), "guardrail"),
])
def test_bad_settings_are_refused_and_change_nothing(ws, settings, message):
    item = first_misclassified(ws)
    session = ws.session("baseline")
    before = session.topk(item.image)
    with pytest.raises(SettingsError, match=message):
        ws.apply("baseline", item.label, settings)
    assert session.history == [] and session.params == {} and session.topk(item.image) == before


def test_layers_are_fixed_while_a_session_has_edits(ws):
    item = first_misclassified(ws)
    assert ws.apply("baseline", item.label, EditSettings(editor="rmsprop", lr=1e-3, max_steps=30, layers="layer3")).applied
    with pytest.raises(SettingsError, match="reset before"):
        ws.apply("baseline", item.label, EditSettings(layers="head"))
    ws.session("baseline").reset()
    report = ws.apply("baseline", item.label, EditSettings(editor="rmsprop", lr=1e-2, max_steps=50, layers="head"))
    assert report.applied and set(ws.session("baseline").params) == {"head.fc.weight", "head.fc.bias"}


def test_edit_log_replays_to_the_same_model(ws, lab):
    session = ws.session("editable")
    page = ws.browse("editable", BrowseQuery(misclassified=True, page_size=3))
    for item in page.items[:2]:
        ws.select(item.ref)
        assert ws.apply("editable", item.label, EditSettings(max_steps=30)).applied
    text = json.dumps(session.log())
    other = lab.registry.get("replayer").session("editable")
    reports = other.replay(read_log(text))
    after = [s["heldout_accuracy_after"] for s in session.summaries()]
    assert [s["heldout_accuracy_after"] for s in other.summaries()] == after == \
        [e["heldout_accuracy_after"] for e in json.loads(text)["edits"]]
    assert reports[-1].heldout_accuracy_after == after[-1]  # the last report scores the same images as the log
    assert all(torch.equal(other.params[k], session.params[k]) for k in session.params)
    assert [e.refs for e in other.history] == [e.refs for e in session.history]
    message, fields = replay_summary(read_log(text), reports, other)
    assert fields["reproduced"] and fields["arithmetic_differences"] == [] and "reproduced exactly" in message


def test_a_log_replayed_with_another_thread_count_says_so(ws, lab):
    item = first_misclassified(ws, "editable")
    session = ws.session("editable")
    assert ws.apply("editable", item.label, EditSettings()).applied
    log = session.log()
    assert log["arithmetic"]["threads"] == torch.get_num_threads() == 1  # the module runs on one thread
    other = lab.registry.get("replayer-2").session("editable")
    torch.set_num_threads(2)  # as a server started with --threads 2
    try:
        reports = other.replay(json.loads(json.dumps(log)))
        message, fields = replay_summary(log, reports, other)
    finally:
        torch.set_num_threads(1)
    assert fields["arithmetic_differences"] == ["threads 1 in the log, 2 here"]
    assert "threads 1 in the log, 2 here" in message and "step count" in message
    if not fields["reproduced"]:
        assert "NOT identical" in message


def test_held_out_figures_leave_out_every_image_the_session_edited(ws, lab):
    session = ws.session("editable")
    test = lab.sources[SOURCE_TEST]
    page = ws.browse("editable", BrowseQuery(misclassified=True, page_size=3))
    for item in page.items:
        ws.select(item.ref)
        report = ws.apply("editable", item.label, EditSettings())
        assert report.applied and report.n_corrections == report.corrections_held == len(session.history)
    edited = [item.ref.index for item in page.items]
    scored = torch.ones(len(test), dtype=torch.bool)
    scored[edited] = False
    assert torch.equal(session.scored_rows(), scored) and report.n_heldout == len(test) - 3
    predictions = [state.predictions for state in [session._base, *session._stack]]
    expected = [int((p == test.labels)[scored].sum()) / int(scored.sum()) for p in predictions]
    assert session.accuracy_curve() == expected
    summaries = session.summaries()
    assert [s["heldout_accuracy_after"] for s in summaries] == expected[1:]
    assert all(s["n_heldout"] == len(test) - 3 for s in summaries)
    _, _, fixed, broken = session.last_flips()
    assert not set(fixed + broken) & set(edited)


def test_an_edit_that_would_undo_an_earlier_correction_is_refused(lab):
    """A constructed conflict: correct image A, then edit its mirror image to another class with a large
    RMSProp step (which ignores earlier corrections): A would follow its mirror, so the edit is refused."""
    session = EditSession(lab.models["baseline"])
    test = lab.sources[SOURCE_TEST]
    a = int(torch.nonzero(session._base.predictions == test.labels)[0])  # a correct image to "correct" again
    rmsprop = EditSettings(editor="rmsprop", lr=0.05, max_steps=20)
    first = session.apply(test.images[a][None], [int(test.labels[a])], rmsprop, [ImageRef("test", a)])
    assert first.applied and first.steps == 0
    other = (int(test.labels[a]) + 1) % 10
    mirror = test.images[a].flip(-1)[None]
    report = session.apply(mirror, [other], rmsprop, [ImageRef("uploads", 0)])
    assert report.success and not report.applied
    assert f"undo 1 of this session's 1 earlier correction(s) (test:{a})" in report.message
    assert report.n_corrections == 2 and report.corrections_held == 1
    assert len(session.history) == 1 and session.topk(test.images[a])[0][0] == CLASSES[int(test.labels[a])]


def test_editing_an_image_again_replaces_its_earlier_target(ws):
    item = first_misclassified(ws, "editable")
    session = ws.session("editable")
    wrong = (item.label + 1) % 10 if (item.label + 1) % 10 != item.predicted else (item.label + 2) % 10
    assert ws.apply("editable", wrong, EditSettings(max_steps=50)).applied
    report = ws.apply("editable", item.label, EditSettings())  # back to its true label, no undo in between
    assert report.applied and report.success, report.message
    assert f"{item.ref.source}:{item.ref.index} (to {CLASSES[wrong]})" in report.message
    assert "latest target replaces" in report.message
    assert report.n_corrections == report.corrections_held == 1
    assert report.n_heldout == 999


def test_one_feature_cache_per_model_and_split(lab):
    shared = lab.models["editable"]
    assert shared.evaluator("layer3") is shared.evaluator("layer3.0.conv1")
    first, second = EditSession(shared), EditSession(shared)
    image = lab.sources[SOURCE_TEST].images[0][None]
    for number, session in enumerate((first, second)):
        session.apply(image, [number], EditSettings(), [ImageRef("test", 0)])
    with shared.replica() as replica:
        assert shared._evaluator_on(replica, "layer3.0.conv1").features.data_ptr() == \
            shared.evaluator("layer3").features.data_ptr()
    # One cache per stage the model's edits start at: layer3's (every layer3 variant's), and its default layers'.
    assert len(shared.primary.evaluators) == len({shared.evaluator("layer3"), shared.evaluator(shared.default_layers)})


@pytest.mark.parametrize("mutate, message", [
    (lambda log: log.update(format="something-else"), "not an EditLab edit log"),
    (lambda log: log.update(version=99), "version"),
    (lambda log: log["checkpoint"].update(arch="vgg8"), "vgg8"),
    (lambda log: log["edits"][0].update(pixels=["AAAA"]), "bytes"),
    (lambda log: log["edits"][0]["settings"].update(lr=-3), "learning rate"),
    (lambda log: log["edits"][0].pop("target_indices"), "malformed"),
])
def test_a_bad_edit_log_is_refused_and_changes_nothing(ws, mutate, message):
    item = first_misclassified(ws, "editable")
    session = ws.session("editable")
    assert ws.apply("editable", item.label, EditSettings(max_steps=30)).applied
    log = json.loads(json.dumps(session.log()))
    mutate(log)
    params = dict(session.params)
    with pytest.raises(SettingsError, match=message):
        session.replay(log)
    assert len(session.history) == 1 and all(torch.equal(params[k], session.params[k]) for k in params)


def test_read_log_refuses_non_json():
    with pytest.raises(SettingsError, match="not valid JSON"):
        read_log(b"\x80not json")


def test_browse_filters_sort_and_pages(ws, lab):
    probs = ws.probabilities("baseline", SOURCE_TEST)
    labels = lab.sources[SOURCE_TEST].labels
    confidence, predicted = probs.max(1)
    page = ws.browse("baseline", BrowseQuery(misclassified=True, label=3, min_confidence=0.2, max_confidence=0.9,
                                             sort="confidence-desc", page_size=7))
    expected = int(((predicted != labels) & (labels == 3) & (confidence >= 0.2) & (confidence <= 0.9)).sum())
    assert page.total == expected > 0
    values = [item.confidence for item in page.items]
    assert values == sorted(values, reverse=True)
    assert all(item.label == 3 != item.predicted and 0.2 <= item.confidence <= 0.9 for item in page.items)
    last = ws.browse("baseline", BrowseQuery(page=10**6, page_size=7))
    assert last.page == last.n_pages == -(-1000 // 7) and len(last.items) == 1000 - 7 * (last.n_pages - 1)
    by_loss = ws.browse("baseline", BrowseQuery(sort="loss-desc", page_size=2)).items
    losses = [-np.log(probs[i.ref.index, i.label].item()) for i in by_loss]
    assert losses[0] >= losses[1] and losses[0] >= float(-torch.log(probs[torch.arange(1000), labels]).max()) - 1e-6
    assert ws.page_refs == [i.ref for i in by_loss]
    with pytest.raises(SettingsError, match="sort"):
        ws.browse("baseline", BrowseQuery(sort="random"))


def _image_file(tmp_path, name, mode, size, fmt):
    """Pixel i is (7i mod 256) in a one-band mode, else (k*i mod 256) in band k (1-based); built with numpy (a
    list of 3.8 M tuples for the large JPEG took most of the upload test's time)."""
    image = Image.new(mode, size)
    i = np.arange(size[0] * size[1], dtype=np.int64)[:, None]
    bands = np.array([7]) if mode in ("L", "P") else np.arange(1, len(mode) + 1)
    image.frombytes(((i * bands) % 256).astype(np.uint8).tobytes())
    path = tmp_path / name
    image.save(path, format=fmt)
    return path


def test_uploads_of_any_size_and_mode_become_32x32_rgb(ws, tmp_path):
    paths = [_image_file(tmp_path, "gray.png", "L", (50, 40), "PNG"),
             _image_file(tmp_path, "alpha.png", "RGBA", (31, 77), "PNG"),
             _image_file(tmp_path, "big.jpg", "RGB", (2400, 1600), "JPEG"),
             _image_file(tmp_path, "palette.gif", "P", (20, 20), "GIF")]
    for path in paths:
        image = decode_image(path)
        assert image.shape == (3, 32, 32) and image.dtype == torch.uint8
    refs = ws.add_uploads(paths)
    assert refs == [ImageRef(SOURCE_UPLOADS, i) for i in range(4)]
    page = ws.browse("baseline", BrowseQuery(source=SOURCE_UPLOADS))
    assert page.total == 4 and all(item.label == -1 for item in page.items)
    ws.select(refs[1])
    assert ws.apply("baseline", 5, EditSettings(editor="rmsprop", lr=1e-3, max_steps=50)).refs == [refs[1]]


def test_a_bad_upload_is_refused_with_its_name_and_adds_nothing(ws, tmp_path):
    good = _image_file(tmp_path, "good.png", "RGB", (32, 32), "PNG")
    text = tmp_path / "notes.txt"
    text.write_text("not an image")
    buffer = io.BytesIO()
    Image.new("RGB", (64, 64), "red").save(buffer, format="PNG")
    truncated = tmp_path / "truncated.png"
    truncated.write_bytes(buffer.getvalue()[:60])
    for bad in (text, truncated):
        with pytest.raises(ImageError, match=bad.name):
            ws.add_uploads([good, bad])
        assert len(ws.uploads) == 0
    with pytest.raises(ImageError):
        ws.add_uploads([])


def test_batch_edit_fixes_every_image_at_once(ws):
    page = ws.browse("baseline", BrowseQuery(misclassified=True, page_size=3))
    for item in page.items[:3]:
        ws.select(item.ref)
        ws.add_to_batch(item.label)
    ws.add_to_batch(page.items[2].label)  # adding the same image again replaces it
    assert len(ws.batch) == 3
    report = ws.apply_batch("baseline", EditSettings(editor="rmsprop", lr=1e-3, max_steps=60))
    assert report.applied and report.targets == [i.label for i in page.items[:3]] and ws.batch == []
    session = ws.session("baseline")
    assert [session.topk(i.image)[0][0] for i in page.items[:3]] == [CLASSES[i.label] for i in page.items[:3]]
    with pytest.raises(SettingsError, match="empty"):
        ws.apply_batch("baseline", EditSettings())


def test_workspaces_are_isolated_and_dropped(lab):
    a, b = lab.registry.get("iso-a"), lab.registry.get("iso-b")
    item = first_misclassified(a)
    b.select(item.ref)
    before = b.session("baseline").topk(item.image)
    assert a.apply("baseline", item.label, EditSettings(editor="rmsprop", lr=1e-3, max_steps=30)).applied
    assert b.session("baseline").topk(item.image) == before and b.session("baseline").history == []
    lab.registry.drop("iso-a")
    assert lab.registry.get("iso-a") is not a and lab.registry.get("iso-a").sessions == {}


class Clock:
    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now


def registry_with_clock(lab, **limits):
    from editcore.lab.workspace import WorkspaceRegistry

    clock = Clock()
    return WorkspaceRegistry(lab, keep_seconds=600, idle_seconds=3600, clock=clock, **limits), clock


def test_a_full_registry_refuses_newcomers_and_never_drops_recent_work(lab):
    registry, clock = registry_with_clock(lab, max_workspaces=2)
    victim = registry.get("victim")
    item = first_misclassified(victim)
    assert victim.apply("baseline", item.label, EditSettings(editor="rmsprop", lr=1e-3, max_steps=30)).applied
    registry.get("other")
    for attacker in range(5):
        clock.now += 30
        with pytest.raises(SettingsError, match="EditLab is full: 2 sessions"):
            registry.get(f"attacker-{attacker}")
    assert registry.get("victim") is victim and len(victim.session("baseline").history) == 1


def test_a_full_registry_makes_room_by_dropping_the_least_recently_used_idle_session(lab):
    registry, clock = registry_with_clock(lab, max_workspaces=2)
    first, second = registry.get("first"), registry.get("second")
    clock.now = 200
    registry.get("first")  # "second" is now the least recently used
    clock.now = 700  # both idle, "second" for over 10 minutes
    newcomer = registry.get("newcomer")
    assert registry.get("first") is first and registry.get("newcomer") is newcomer and len(registry) == 2
    clock.now = 700 + 3601  # idle for over an hour: dropped at the next arrival even with room to spare
    registry.drop("newcomer")
    registry.get("late")
    assert len(registry) == 1


def test_edits_share_a_memory_budget_that_refuses_rather_than_drops_recent_work(lab):
    probe = lab.registry.get("budget-probe")
    one_edit = probe.session("baseline").edit_bytes("layer3")
    registry, clock = registry_with_clock(lab, max_edit_bytes=int(2.5 * one_edit))
    a, b = registry.get("a"), registry.get("b")
    settings = EditSettings(editor="rmsprop", lr=1e-3, max_steps=30, layers="layer3")
    item = first_misclassified(a)
    b.select(item.ref)
    assert a.apply("baseline", item.label, settings).applied
    assert a.apply("baseline", item.label, settings).steps == 0  # kept: its state is held too
    assert 0 < registry.edit_bytes() == a.edit_bytes() <= 2 * one_edit  # reserved at the most, held at most that
    with pytest.raises(SettingsError, match="memory for edits is full"):
        b.apply("baseline", item.label, settings)
    assert b.session("baseline").history == [] and len(a.session("baseline").history) == 2
    clock.now = 601  # "a" idle for over 10 minutes: dropped to make room
    assert b.apply("baseline", item.label, settings).applied
    assert len(registry) == 1 and 0 < registry.edit_bytes() == b.edit_bytes() <= one_edit


def test_compare_runs_every_method_on_both_models_from_the_unedited_models(ws, lab):
    item = first_misclassified(ws)
    views, outcomes = compare_fixes(lab.models, item.image, item.label, "gd", 20, lab.replay_set(), finetune_steps=20,
                                    heldout_row=item.ref.index)
    titles = [o.title for o in outcomes]
    both = lambda method: [f"{method} (baseline model)", f"{method} (editable model)"]  # noqa: E731
    on_both = lambda method: [f"{method} on the baseline model", f"{method} on the editable model"]  # noqa: E731
    # Whatever the page has selected (here gradient descent), the local editor and the paper's are always there: the
    # paper's as the editable model learned it (its editor), untrained on both models and as learned on the editable.
    paper = lesson_editors(lab.models)[1]
    assert paper == lab.models["editable"].learned_editor.name and paper != "gd"
    title = EDITOR_TITLES[paper]
    assert titles == [*both("Lookup table, exact match"), *both("Lookup table, nearest neighbour"), *both("Fine-tuning"),
                      *on_both("Local editor"), *on_both(title), f"{title} on the editable model, as learned",
                      *on_both("Gradient descent")]
    assert len(views) == 16 and all(len(o.views_after) == 16 for o in outcomes)
    by_title = dict(zip(titles, outcomes))
    for row, expected in ((f"{title} on the editable model, as learned", lab.models["editable"].learned_editor),
                          (f"{title} on the editable model", create_editor(paper))):
        used = by_title[row].hyperparameters
        assert {k: used[k] for k in expected.hyperparameters()} == pytest.approx(expected.hyperparameters()), row
    assert by_title["Local editor on the baseline model"].max_steps == EDITORS["local"].default_max_steps
    assert by_title["Gradient descent on the baseline model"].max_steps == 20  # the page's steps for its own editor
    exact = outcomes[0]
    # The lookup table changes no weights, and the corrected image (a held-out image) is left out of the held-out
    # figures: nothing held out moves.
    assert exact.success and exact.n_broken == exact.n_fixed == 0 and exact.accuracy_after == exact.accuracy_before
    assert all(o.n_heldout == len(lab.sources["test"]) - 1 for o in outcomes)
    assert ws.session("baseline").history == []  # comparing is not editing
    # No data root: fine-tuning replays the shipped training sample, and the page says so.
    finetuning = by_title["Fine-tuning (baseline model)"]
    assert (finetuning.hyperparameters["replay"], finetuning.hyperparameters["replay_size"]) == ("cifar10-train-sample", 2000)
    assert finetuning.hyperparameters["replay_ratio"] > 0 and finetuning.max_steps == 20
    assert f"{finetuning.hyperparameters['replay_ratio']} replayed images per step from the shipped 2,000-image " \
           "training sample" in finetuning.detail


def test_without_a_data_root_the_replay_set_is_the_shipped_training_sample(lab):
    assert lab.data_root is None
    replay = lab.replay_set()
    assert (replay.source, len(replay)) == ("cifar10-train-sample", 2000)
    assert lab.replay_set() is replay  # read once


def test_mixed_precision_held_out_predictions_equal_float32(lab):
    """bfloat16 re-evaluation with float32 for low-margin rows predicts exactly what float32 does (the float32
    cached evaluator here; tests/test_metrics.py checks that it predicts what the whole model does)."""
    from editcore import SharedModel, edit

    reference = lab.models["baseline"]
    mixed = SharedModel("mixed", reference.path, lab.sources[SOURCE_TEST], mixed_precision=True)
    editable = reference.editable("layer3")
    float32 = reference.evaluator("layer3").on(editable)
    float32.mixed_precision = False  # the same cached features, scored in float32 whatever this CPU
    images = lab.sources[SOURCE_TEST].images
    assert torch.equal(mixed.heldout_logits("layer3", None).argmax(1), float32.predict())
    for row, target, lr in ((0, 3, 1e-3), (1, 9, 1e-2), (2, 0, 3e-2)):
        params = edit(editable, normalize(images[row : row + 1]), torch.tensor([target]),
                      create_editor("rmsprop", lr=lr), max_steps=10).params
        assert torch.equal(mixed.heldout_logits("layer3", params).argmax(1), float32.predict(params))


def test_a_missing_checkpoint_is_a_note_and_an_nae_set_a_source(lab, tmp_path):
    from editcore import SOURCE_NAE, Lab
    from editcore.experiments.nae import save_nae

    nae = save_nae(tmp_path / "nae.npz", lab.sources[SOURCE_TEST].subset(torch.arange(40, 60)), {"note": "test"})
    present = lab.models["baseline"].path
    partial = Lab.load([("baseline", present), ("editable", tmp_path / "gone.safetensors")], nae_path=nae,
                       log=lambda *_: None)
    assert list(partial.models) == ["baseline"]
    assert partial.source_names() == [SOURCE_TEST, SOURCE_NAE, SOURCE_UPLOADS]
    ws = partial.registry.get("nae")
    page = ws.browse("baseline", BrowseQuery(source=SOURCE_NAE, page_size=50))
    assert page.total == 20 and [i.label for i in page.items] == lab.sources[SOURCE_TEST].labels[40:60].tolist()
    ws.select(page.items[0].ref)
    report = ws.apply("baseline", 3, EditSettings(editor="rmsprop", lr=1e-3, max_steps=50))
    assert report.applied and report.refs == [ImageRef(SOURCE_NAE, 0)]
    assert ws.browse("baseline", BrowseQuery(source=SOURCE_NAE)).items[0].predicted == 3  # re-scored under the edit
    assert any("gone.safetensors" in note and "missing" in note for note in partial.notes)
    with pytest.raises(FileNotFoundError, match="gone.safetensors"):
        Lab.load([("editable", tmp_path / "gone.safetensors")], log=lambda *_: None)


def two_edits(ws, model="editable"):
    """Two applied edits of `model` in `ws`; returns its session."""
    page = ws.browse(model, BrowseQuery(misclassified=True, page_size=3))
    for item in page.items[:2]:
        ws.select(item.ref)
        assert ws.apply(model, item.label, EditSettings(max_steps=30)).applied
    return ws.session(model)


def same_state(session, history, params) -> bool:
    return session.history == history and session.params.keys() == params.keys() and \
        all(torch.equal(params[k], session.params[k]) for k in params)


@pytest.mark.parametrize("mutate, message", [
    (lambda log: log["edits"][1].update(target_indices=[99]), "edit 2 of the log: targets must be class indices"),
    (lambda log: log["edits"][1]["settings"].update(layers="layer2"), "edit 2 of the log changes layer2"),
    (lambda log: log["edits"][1]["settings"].update(layers="stem"), "edit 2 of the log: editable layers"),
    (lambda log: log["edits"][1]["refs"].append({"source": "test", "index": 1}), "must match"),
    (lambda log: log.update(checkpoint=[]), "checkpoint"),
    (lambda log: log.update(edits={"not": "a list"}), "must be a list"),
])
def test_a_log_refused_anywhere_leaves_the_session_as_it_was(ws, mutate, message):
    session = two_edits(ws)
    history, params = list(session.history), dict(session.params)
    log = json.loads(json.dumps(session.log()))
    mutate(log)
    with pytest.raises(SettingsError, match=message):
        session.replay(log)
    assert same_state(session, history, params)


def test_a_replay_that_fails_midway_leaves_the_session_as_it_was(ws, monkeypatch):
    from editcore.lab.session import EditSession

    session = two_edits(ws)
    history, params = list(session.history), dict(session.params)
    log = session.log()
    calls, real_apply = [], EditSession.apply

    def apply_then_fail(self, *args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("the server went away")
        return real_apply(self, *args, **kwargs)

    monkeypatch.setattr(EditSession, "apply", apply_then_fail)
    with pytest.raises(RuntimeError):
        session.replay(log)
    assert len(calls) == 2 and same_state(session, history, params)


def test_a_refused_edit_does_not_switch_the_model_on_screen(ws):
    session = two_edits(ws)
    with pytest.raises(SettingsError, match="learning rate"):
        ws.apply("baseline", 3, EditSettings(lr=-1, max_steps=10, layers="layer3"))
    assert ws.model == "editable" and len(ws.session(ws.model).history) == 2 and session is ws.session(ws.model)


def test_an_edit_cut_off_midway_leaves_no_trace(ws):
    """A client that disconnects mid-edit: Gradio stops the event where it reports progress."""
    session = two_edits(ws)
    history, params = list(session.history), dict(session.params)

    def disconnect(fraction, stage):
        if fraction > 0.5:
            raise ConnectionError("client went away")

    with pytest.raises(ConnectionError):
        ws.apply("editable", 3, EditSettings(max_steps=30), progress=disconnect)
    assert same_state(session, history, params) and session.heldout_probs is session._top.heldout_probs


def test_an_edit_whose_loss_turns_nan_is_rolled_back_with_a_message(ws, monkeypatch):
    from editcore import create_editor

    item = first_misclassified(ws)
    shared = ws.session("baseline").shared
    monkeypatch.setattr(shared, "make_editor", lambda name, lr: create_editor("gd", lr=1e38))
    report = ws.apply("baseline", item.label, EditSettings(editor="gd", max_steps=5))
    assert not report.applied and "NaN or infinite" in report.message
    assert ws.session("baseline").history == [] and ws.session("baseline").params == {}


def test_read_log_refuses_a_deeply_nested_document():
    with pytest.raises(SettingsError, match="nested too deeply"):
        read_log("[" * 200_000)


def test_a_16_bit_grey_png_keeps_its_tones(tmp_path):
    gradient = (np.arange(64 * 64).reshape(64, 64) * 16).astype(np.uint16)  # 0 .. 65520, left to right and down
    path = tmp_path / "gradient16.png"
    Image.fromarray(gradient).save(path)
    image = decode_image(path).float()
    assert image.min() < 10 and image.max() > 245 and 110 < image.mean() < 145  # mid-grey on average, not white
    assert torch.equal(image[0], image[1]) and torch.equal(image[1], image[2])


def test_an_unreadable_upload_names_the_file_not_the_servers_path(tmp_path):
    path = tmp_path / "server" / "temp" / "holiday.png"
    path.parent.mkdir(parents=True)
    path.write_bytes(b"0" * 100)
    with pytest.raises(ImageError) as refused:
        decode_image(path)
    assert "holiday.png" in str(refused.value) and str(path.parent) not in str(refused.value)


def test_replicas_run_edits_at_once_with_the_results_of_one_at_a_time(lab):
    """Two replicas are held by two threads at the same moment (nested calls reuse the one held), and
    edits run on them concurrently equal the same edits run one after another on one replica."""
    import threading

    from editcore import EditSession, SharedModel

    reference = lab.models["baseline"]
    twins = SharedModel("twins", reference.path, lab.sources[SOURCE_TEST], replicas=2)
    held, errors, together = [], [], threading.Barrier(2, timeout=60)

    def hold():
        try:
            with twins.replica() as replica, twins.replica() as again:
                assert again is replica
                held.append(replica)
                together.wait()
        except Exception as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=hold) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors and sorted(map(id, held)) == sorted(map(id, twins.replicas))

    test = lab.sources[SOURCE_TEST]
    plans = [(row, (int(test.labels[row]) + 1) % len(CLASSES), settings)
             for row, settings in ((3, EditSettings(editor="local")),
                                   (4, EditSettings(editor="rmsprop", lr=1e-3, max_steps=20, layers="layer3")))]

    def run(shared, row, target, settings, out):
        session = EditSession(shared)
        report = session.apply(test.images[row], [target], settings, [ImageRef(SOURCE_TEST, row)])
        out[row] = (report.applied, session.params, session.heldout_probs)

    concurrent, sequential = {}, {}
    threads = [threading.Thread(target=run, args=(twins, *plan, concurrent)) for plan in plans]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    for plan in plans:
        run(reference, *plan, sequential)
    for row, (applied, params, probs) in sequential.items():
        twin_applied, twin_params, twin_probs = concurrent[row]
        assert applied and twin_applied and torch.equal(probs, twin_probs)
        assert params.keys() == twin_params.keys() and all(torch.equal(params[k], twin_params[k]) for k in params)
    # What depends only on the base weights (the local editor's anchor subspace) is computed once for all copies.
    first, second = (twins.editable(twins.layers_for("local"), replica) for replica in twins.replicas)
    assert first.model is not second.model and first.cache is second.cache and len(first.cache["_anchor_subspaces"]) == 1
