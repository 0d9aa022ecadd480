"""The Measure tab's library (editcore.lab.measure): the protocol's sets and editors as evaluate-edits builds them,
settings checks, the result cache, one run per session, cancelling, and a run on a model's replicas."""
from __future__ import annotations

import contextlib
import json
import threading
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from editcore import (EditRecord, ImageSet, SettingsError, SharedModel, create_editor, lesson_editors, load_sample,
                      summarize)
from editcore.lab.measure import (MAX_EDITS, MIN_EDITS, MeasureCancelled, MeasureSettings, ProtocolRuns, ResultCache,
                                  cached_rows, edits_csv, measure, protocol_editor, protocol_sets, results_json,
                                  summary_csv)

from app_support import SHIPPED


def images(n: int, first_index: int = 0, source: str = "cifar10-test") -> ImageSet:
    gen = torch.Generator().manual_seed(first_index)
    return ImageSet(torch.randint(0, 256, (n, 3, 8, 8), generator=gen, dtype=torch.uint8),
                    torch.randint(0, 10, (n,), generator=gen), torch.arange(first_index, first_index + n), source)


def test_protocol_sets_are_evaluate_edits_sets():
    test = images(50)
    whole = protocol_sets("other", test)
    assert whole.heldout_set is test and whole.edit_set is test and whole.overlaps and whole.targets == "other"
    split = protocol_sets("corrections", test, heldout_size=20)
    assert split.heldout_set.indices.tolist() == list(range(20)) and split.edit_set.indices.tolist() == list(range(20, 50))
    assert not split.overlaps and split.targets == "corrections"
    nae = images(5, first_index=5000, source="cifar10-nae")
    nae.indices[0] = 3  # one NAE image that is also a held-out test image: left out of the held-out part
    said = []
    sets = protocol_sets("nae", test, nae_set=nae, say=said.append)
    assert sets.edit_set is nae and sets.targets == "true" and not sets.overlaps
    assert 3 not in sets.heldout_set.indices.tolist() and len(sets.heldout_set) == 49
    assert any("also in the NAE set" in line for line in said)
    with pytest.raises(SettingsError, match="NAE set"):
        protocol_sets("nae", test)
    with pytest.raises(SettingsError, match="protocol must be"):
        protocol_sets("sideways", test)


def test_the_lesson_puts_the_editor_editable_training_learned_beside_the_local_one():
    untrained = SimpleNamespace(learned_editor=None)  # lesson_editors reads only this of a SharedModel
    paper = SimpleNamespace(learned_editor=create_editor("rmsprop-paper"))
    assert lesson_editors({"baseline": untrained}) == ("local", "rmsprop")
    assert lesson_editors({"baseline": untrained, "editable": paper}) == ("local", "rmsprop-paper")


def test_protocol_editor_is_the_learned_one_only_when_evaluate_edits_would_take_it():
    learned = create_editor("rmsprop", lr=3e-5)
    assert protocol_editor("rmsprop", learned) == (learned, True)
    editor, was_learned = protocol_editor("rmsprop", learned, lr=1e-4)  # a given rate wins, as --lr does
    assert not was_learned and editor.hyperparameters()["lr"] == pytest.approx(1e-4)
    editor, was_learned = protocol_editor("local", learned)
    assert not was_learned and editor.name == "local"


@pytest.mark.parametrize("change, message", [
    ({"n_edits": MIN_EDITS - 1}, "N must be"), ({"n_edits": MAX_EDITS + 1}, "N must be"), ({"n_edits": 12.5}, "whole number"),
    ({"seed": -1}, "seed"), ({"editors": ()}, "at least one editor"), ({"editors": ("sgd",)}, "editors"),
    ({"models": ("other",)}, "models"), ({"protocol": "random"}, "protocol")])
def test_settings_are_checked(change, message):
    with pytest.raises(SettingsError, match=message):
        MeasureSettings(**change).validated(["baseline", "editable"])


def test_settings_fill_in_every_model_and_the_command_line_may_ask_for_more_edits():
    settings = MeasureSettings(n_edits=20.0, editors=("rmsprop", "rmsprop")).validated(["baseline", "editable"])
    assert settings.models == ("baseline", "editable") and settings.editors == ("rmsprop",) and settings.n_edits == 20
    assert MeasureSettings(n_edits=MAX_EDITS * 2).validated(["baseline"], bounded=False).n_edits == MAX_EDITS * 2


def test_summary_reports_the_spread_of_the_drawdowns():
    errors = [0.10, 0.12, 0.11, 0.15, 0.10, 0.13]
    records = [EditRecord(i, 0, True, 1, 0.01, e) for i, e in enumerate(errors)]
    summary = summarize(records, base_error=0.10)
    drawdowns = np.array(errors) - 0.10
    half = 1.96 * drawdowns.std(ddof=1) / np.sqrt(len(errors))
    assert summary["drawdown_ci95"] == pytest.approx([drawdowns.mean() - half, drawdowns.mean() + half])
    assert summary["drawdown_middle95"] == pytest.approx([np.percentile(drawdowns, 2.5), np.percentile(drawdowns, 97.5)])
    assert summary["drawdown_sd"] == pytest.approx(drawdowns.std(ddof=1))


def test_one_run_per_session_and_cancel_reaches_only_that_run():
    runs = ProtocolRuns()
    with runs.start("a") as stop_a, runs.start("b") as stop_b:
        with pytest.raises(SettingsError, match="already running"):
            with runs.start("a"):
                pass
        assert runs.cancel("a") and stop_a.is_set() and not stop_b.is_set()
    assert not runs.running("a") and not runs.cancel("a")  # finished: nothing left to cancel


@pytest.fixture(scope="module")
def small_models():
    """The shipped models on the first 80 sample images (held out and edited): cheap, real weights, and fewer of the
    baseline's mistakes (9) than MIN_EDITS."""
    heldout = load_sample().subset(torch.arange(80))
    return {name: SharedModel(name, path, heldout, replicas=2) for name, path in SHIPPED}, heldout


def test_a_run_is_cached_by_its_settings_and_a_cancelled_one_keeps_its_finished_rows(small_models, tmp_path):
    models, heldout = small_models
    cache = ResultCache()
    paper = lesson_editors(models)[1]  # the editor the editable model learned
    settings = MeasureSettings("other", MIN_EDITS, 1, (paper,))
    ticks = []
    rows = measure(models, settings, heldout, cache=cache, progress=lambda done, total, stage: ticks.append((done, total)))
    assert [(r.model, r.editor, r.editor_learned) for r in rows] == [("baseline", paper, False), ("editable", paper, True)]
    assert ticks[0] == (0, 2 * MIN_EDITS) and ticks[1:] == [(i, 2 * MIN_EDITS) for i in range(1, 2 * MIN_EDITS + 1)]
    assert all(len(r.records) == r.summary["n_edits"] == MIN_EDITS and len(r.drawdowns()) == MIN_EDITS for r in rows)
    assert rows[0].summary["drawdown"] == pytest.approx(float(np.mean(rows[0].drawdowns())))
    assert f"--editor {paper} --protocol other --n-edits 10 --seed 1" in rows[0].command
    # The same settings again: every row from the cache, nothing run.
    again = measure(models, settings, heldout, cache=cache, progress=lambda *_: pytest.fail("nothing to run"))
    assert [r.from_cache for r in again] == [True, True] and [r.records for r in again] == [r.records for r in rows]
    assert cached_rows(models, settings, heldout, None, cache) is not None
    assert cached_rows(models, MeasureSettings("other", MIN_EDITS, 2, (paper,)), heldout, None, cache) is None
    # A results file round-trips through the cache, as the shipped defaults do.
    path = tmp_path / "results.json"
    path.write_text(json.dumps(results_json(rows, "python -m editcore measure ...")))
    loaded = ResultCache()
    assert loaded.load(path) == 2 and cached_rows(models, settings, heldout, None, loaded)[1].records == rows[1].records
    assert summary_csv(rows).count("\n") == 3 and edits_csv(rows).count("\n") == 1 + 2 * MIN_EDITS
    # Cancelled during the second row: the first is kept, the second is not.
    stop = threading.Event()
    other_seed = MeasureSettings("other", MIN_EDITS, 3, (paper,))

    def cancel_in_second_row(done, total, stage):
        if done == MIN_EDITS + 2:
            stop.set()

    with pytest.raises(MeasureCancelled, match=f"after {MIN_EDITS + 2} of {2 * MIN_EDITS} edits"):
        measure(models, other_seed, heldout, cache=cache, progress=cancel_in_second_row, stop=stop)
    done_rows = [r for r in (cache.get(k) for k in list(cache._rows)) if r.seed == 3]
    assert [r.model for r in done_rows] == ["baseline"]


def test_between_two_edits_a_run_holds_no_replica(small_models):
    """Another thread (another visitor's edit) can take every replica of the model between two of the run's edits."""
    models, heldout = small_models
    shared = models["baseline"]
    took_all = []

    def take_every_replica():
        with contextlib.ExitStack() as stack:
            for replica in shared.replicas:
                stack.enter_context(shared.replica(replica))
            took_all.append(True)

    def between_edits(done, total, stage):
        if done:
            visitor = threading.Thread(target=take_every_replica)
            visitor.start()
            visitor.join(timeout=120)  # a guard against a deadlock, not a timing: it returns at once when free

    measure({"baseline": shared}, MeasureSettings("other", MIN_EDITS, 4, ("gd",)), heldout, progress=between_edits)
    assert took_all == [True] * MIN_EDITS


def test_corrections_are_capped_by_each_models_mistakes_and_nae_edits_the_nae_set(small_models):
    from editcore import full_logits
    from editcore.experiments.nae import load_nae

    models, heldout = small_models
    shared = models["baseline"]
    mistakes = int((full_logits(shared.model, heldout.images).argmax(1) != heldout.labels).sum())
    assert mistakes < MIN_EDITS  # fewer mistakes than N, so the cap shows
    ticks = []
    row, = measure({"baseline": shared}, MeasureSettings("corrections", MIN_EDITS, 0, ("gd",)), heldout,
                   progress=lambda done, total, stage: ticks.append(total))
    assert row.summary["n_edits"] == len(row.records) == mistakes and set(ticks) == {mistakes}
    assert all(r["target"] == int(heldout.labels[r["index"]]) for r in row.records)  # each to its true label
    nae = load_nae()
    row, = measure({"baseline": shared}, MeasureSettings("nae", MIN_EDITS, 0, ("gd",)), heldout, nae)
    assert row.edit_source == f"cifar10-nae:{len(nae)}" and row.summary["n_heldout"] == len(heldout)
    assert {r["index"] for r in row.records} <= set(nae.indices.tolist())
