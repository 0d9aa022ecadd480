"""The page's handlers called as plain Python (no server): outputs line up with the page, errors are
messages, exports and replays round-trip."""
from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import gradio as gr
import pytest
import torch
from PIL import Image

from app import Handlers
from app_support import make_lab
from editcore import CLASSES, EDITORS, lesson_editors, load_checkpoint


@pytest.fixture(scope="module")
def handlers(tmp_path_factory, request):
    return Handlers(make_lab(tmp_path_factory, request))


def request(name: str):
    return SimpleNamespace(session_hash=name)


def test_page_load_select_apply_undo(handlers):
    r = request("h1")
    model, lr, max_steps, layers, image, target, report, status, topk, info, plot, views, fixed, broken, history, \
        gallery, page = handlers.on_load(r)
    ws = handlers.workspace(r)
    # The page's defaults: the local editor on its one conv.
    assert model["value"] == "editable" and layers["value"] == "layer3" and lr["value"] == 1.0
    assert max_steps["value"] == EDITORS["local"].default_max_steps
    assert Image.open(image).size == (256, 256) and "misclassified" in info
    assert len(gallery) == 24 and all("→" in caption for _, caption in gallery)  # misclassified only, by default
    assert report["edits"] == 0 and history == [] and fixed == [] and broken == []
    true_label = CLASSES[int(handlers.lab.sources["test"].labels[ws.selection.index])]
    assert target == true_label

    outputs = handlers.apply_edit(true_label, "editable", None, None, None, None, 0, r)  # None: the page's defaults
    report, status, topk_after = outputs[0], outputs[1], outputs[2]
    assert report["success"] and report["applied"] and "Applied" in status
    assert (report["editor"], report["layers"], report["max_steps"]) == ("local", "layer3", 20)
    assert max(topk_after, key=topk_after.get) == true_label
    assert len(outputs[8]) == 1 and outputs[8][0][0] == 1  # history table: one row, edit 1
    assert "green" in outputs[5] and outputs[5].count("<figure>") == 16  # the augmented views panel
    assert outputs[4].startswith("<svg") and outputs[4].count(",") >= 2  # the plot: two points, unedited and edit 1
    assert handlers.history(r)[0]["targets"] == [true_label]

    undone = handlers.undo(r)
    assert undone[0]["undone"]["edit"] == 1 and undone[0]["edits"] == 0
    assert undone[2] == handlers._selection_outputs(ws)[2]  # top-k back to the unedited model's
    assert handlers.history(r) == []


def test_the_pages_apply_shows_the_outcome_first_then_the_whole_report(handlers):
    r = request("progressive")
    handlers.on_load(r)
    ws = handlers.workspace(r)
    true_label = CLASSES[int(handlers.lab.sources["test"].labels[ws.selection.index])]
    first, last = list(handlers.apply_edit_progressively(true_label, "editable", None, None, None, None, 0, r))
    report, status, topk, info, plot, views, fixed, broken, history, gallery, page = first
    assert report == plot == fixed == broken == history == gallery == page == gr.update()  # they wait for the scoring
    assert "Applied:" in status and "scoring the 1,000 held-out images" in status
    assert max(topk, key=topk.get) == true_label and views.count("<figure>") == 16
    assert last[0]["applied"] and last[0]["n_heldout"] == 999 and "of 999 changed their prediction" in last[1]
    assert last[2] == last[3] == last[5] == gr.update()  # the outcome's top-k, description and views stand
    assert handlers._selection_outputs(ws)[1:3] == (info, topk)  # as the edited model, kept, gives them
    assert len(handlers.history(r)) == 1
    with pytest.raises(gr.Error, match="learning rate"):
        list(handlers.apply_edit_progressively(true_label, "editable", "rmsprop", -1, 10, "layer3", 0, r))
    assert len(handlers.history(r)) == 1


def test_a_page_gone_after_the_outcome_leaves_the_edit_whole(handlers):
    r = request("gone")
    handlers.on_load(r)
    ws = handlers.workspace(r)
    true_label = CLASSES[int(handlers.lab.sources["test"].labels[ws.selection.index])]
    steps = handlers.apply_edit_progressively(true_label, "editable", None, None, None, None, 0, r)
    assert "Applied:" in next(steps)[1]
    steps.close()  # as Gradio does when the client goes: the scoring is not held back for it
    with ws.lock:  # the edit holds it until its end
        session = ws.session("editable")
        assert len(session.history) == 1 and session.heldout_accuracy() == session.accuracy_curve()[-1]


def test_errors_become_page_messages(handlers, tmp_path):
    r = request("h2")
    handlers.on_load(r)
    with pytest.raises(gr.Error, match="learning rate"):
        handlers.apply_edit("cat", "editable", "rmsprop", -0.5, 10, "layer3", 0, r)
    with pytest.raises(gr.Error, match="target must be one of"):
        handlers.apply_edit("catt", "editable", "rmsprop", None, 10, "layer3", 0, r)
    with pytest.raises(gr.Error, match="index must be between 0 and 999"):
        handlers.select_image("test", 5000, r)
    with pytest.raises(gr.Error, match="whole number"):
        handlers.select_image("test", 2.5, r)
    bad = tmp_path / "model.safetensors"
    bad.write_bytes(b"\x00" * 100)
    with pytest.raises(gr.Error, match="model.safetensors is not a readable image"):
        handlers.upload([str(bad)], r)
    assert handlers.history(r) == [] and len(handlers.workspace(r).uploads) == 0


def test_an_upload_is_shown_selected_and_editable(handlers, tmp_path):
    from PIL import Image

    r = request("h5")
    handlers.on_load(r)
    path = tmp_path / "photo.png"
    Image.new("LA", (300, 200), (90, 128)).save(path)
    source, label, misclassified, low, high, sort, gallery, page, message, image, info, topk, target = \
        handlers.upload([str(path)], r)
    assert (source, label, misclassified, low, high, sort) == ("uploads", "all", False, 0.0, 1.0, "index")
    assert len(gallery) == 1 and "Added 1 image" in message and "Upload #0" in info and "unlabelled" in info
    assert Image.open(image).size == (384 + 8 + 256, 256) and target in CLASSES  # the photo, then the model's view
    path.unlink()  # Gradio's copy of an upload may be gone later: the model's view alone
    assert Image.open(handlers.select_image("uploads", 0, r)[0]).size == (256, 256)
    new_target = next(c for c in CLASSES if c != target)
    assert handlers.apply_edit(new_target, "editable", "rmsprop", None, 50, "layer3", 0, r)[0]["images"] == ["uploads:0"]


def test_export_and_replay_round_trip(handlers):
    r, other = request("h3"), request("h4")
    handlers.on_load(r)
    handlers.select_image("test", 0, r)
    handlers.apply_edit("cat", "editable", "rmsprop", None, 30, "layer3", 0, r)
    weights, card = handlers.export_weights(r)["value"]
    assert load_checkpoint(weights).card["edits"][0]["targets"] == ["cat"] and Path(card).is_file()
    log_path, = handlers.export_log(r)["value"]
    assert json.loads(Path(log_path).read_text())["edits"][0]["images"] == ["test:0"]
    handlers.on_load(other)
    outputs = handlers.replay_log(log_path, other)
    assert outputs[0]["value"] == "editable" and outputs[1]["reproduced"] is True
    timeless = lambda history: [{k: v for k, v in h.items() if k != "seconds"} for h in history]  # noqa: E731
    assert timeless(handlers.history(other)) == timeless(handlers.history(r))


def run_app_py(checkpoint: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "app.py", "--checkpoint", str(checkpoint)], capture_output=True, text=True,
                          timeout=300, cwd=Path(__file__).resolve().parent.parent)


def test_app_py_stops_with_a_message_when_a_checkpoint_is_missing(tmp_path):
    missing = tmp_path / "none.safetensors"
    result = run_app_py(missing)
    assert result.returncode == 2 and f"checkpoint {missing} does not exist" in result.stderr


def _truncated(path: Path, tmp_path: Path) -> Path:
    damaged = tmp_path / "truncated.safetensors"
    damaged.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    return damaged


def _foreign_tensors(path: Path, tmp_path: Path) -> Path:
    import torch
    from safetensors.torch import save_file

    damaged = tmp_path / "foreign.safetensors"
    save_file({"x": torch.zeros(3)}, str(damaged), metadata={"card": json.dumps({"arch": "resnet20"})})
    return damaged


def _broken_card(path: Path, tmp_path: Path) -> Path:
    from safetensors.torch import load_file, save_file

    damaged = tmp_path / "card.safetensors"
    save_file(load_file(str(path)), str(damaged), metadata={"card": '["not", "a card"]'})
    return damaged


def app_py():
    """app.py's code as a module (`import app` is the package of the same name), its allocator tuning off:
    that is process-wide and would outlive the test."""
    spec = importlib.util.spec_from_file_location("app_py", Path(__file__).resolve().parent.parent / "app.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    module.limit_allocator_retention = lambda: None
    return module


@pytest.mark.parametrize("damage, message", [(_truncated, "is not a safetensors checkpoint"),
                                             (_foreign_tensors, "is not a usable resnet20 checkpoint"),
                                             (_broken_card, "has a damaged model card")])
def test_app_py_stops_with_a_message_when_a_checkpoint_is_damaged(handlers, tmp_path, capsys, damage, message):
    """app.py's main() in this process (the test above runs the script itself): a new Python per case cost ~3 s."""
    damaged = damage(handlers.lab.models["baseline"].path, tmp_path)
    assert app_py().main(["--checkpoint", str(damaged)]) == 2
    stderr = capsys.readouterr().err
    assert f"error: {damaged} {message}" in stderr and "Traceback" not in stderr


@pytest.mark.parametrize("hostile", ["absolute", "dotdot"])
def test_exports_stay_in_the_apps_folder_whatever_the_session_id(handlers, tmp_path, hostile):
    target = tmp_path / "elsewhere"
    session_id = str(target) if hostile == "absolute" else "../../../../../../../.." + str(target)
    r = request(session_id)
    handlers.on_load(r)
    written = [*handlers.export_log(r)["value"], *handlers.export_weights(r)["value"]]
    assert not target.exists()
    assert all(Path(path).parent == handlers.export_dir for path in written)
    assert len(set(written)) == 3 and all(Path(path).is_file() for path in written)


def test_a_refused_edit_keeps_the_session_on_its_model(handlers):
    r = request("refused-model")
    handlers.on_load(r)
    handlers.select_image("test", 0, r)
    handlers.apply_edit("cat", "editable", "rmsprop", None, 30, "layer3", 0, r)
    with pytest.raises(gr.Error, match="learning rate"):
        handlers.apply_edit("dog", "baseline", "rmsprop", -1, 10, "layer3", 0, r)
    assert [h["targets"] for h in handlers.history(r)] == [["cat"]]
    assert handlers.undo(r)[0]["model"] == "editable"


@pytest.mark.parametrize("index, message", [("abc", "index must be a number"), (float("nan"), "finite"),
                                            (float("inf"), "finite"), (2.5, "whole number"), ([1], "must be a number")])
def test_a_bad_image_index_is_a_clear_message(handlers, index, message):
    r = request("bad-index")
    with pytest.raises(gr.Error, match=message):
        handlers.select_image("test", index, r)


def edited_log(handlers, r, tmp_path, change) -> str:
    """Two edits in session `r`, its exported log changed by `change(log)`, written to a file."""
    handlers.on_load(r)
    for index in (0, 1):
        topk = handlers.select_image("test", index, r)[2]
        runner_up = sorted(topk, key=topk.get)[-2]  # a target the model does not predict yet
        assert handlers.apply_edit(runner_up, "editable", "rmsprop", None, 50, "layer3", 0, r)[0]["applied"]
    log = json.loads(Path(handlers.export_log(r)["value"][0]).read_text())
    change(log)
    path = tmp_path / "log.json"
    path.write_text(json.dumps(log))
    return str(path)


def test_a_replay_on_other_weights_says_so(handlers, tmp_path):
    path = edited_log(handlers, request("sha-a"), tmp_path, lambda log: log["checkpoint"].update(sha256="0" * 64))
    outputs = handlers.replay_log(path, request("sha-b"))
    assert outputs[1]["same_weights"] is False and outputs[1]["reproduced"] is False
    assert "recorded on different weights" in outputs[2] and "reproduced exactly" not in outputs[2]


def test_a_replay_counts_only_the_edits_it_kept(handlers, tmp_path):
    def hopeless_second_edit(log):
        log["edits"][1]["settings"].update(lr=1e-9, max_steps=1)

    path = edited_log(handlers, request("kept-a"), tmp_path, hopeless_second_edit)
    outputs = handlers.replay_log(path, request("kept-b"))
    assert (outputs[1]["replayed"], outputs[1]["kept"], outputs[1]["reproduced"]) == (2, 1, False)
    assert "**1 kept**" in outputs[2] and "edit(s) 2 did not succeed again" in outputs[2]
    assert len(handlers.history(request("kept-b"))) == 1


def test_exported_logs_and_cards_name_the_checkpoint_without_its_server_path(handlers):
    r = request("no-paths")
    handlers.on_load(r)
    log = json.loads(Path(handlers.export_log(r)["value"][0]).read_text())
    shared = handlers.lab.models[log["model"]]
    assert log["checkpoint"]["path"] == shared.path.name and log["checkpoint"]["sha256"] == shared.sha256
    weights, _ = handlers.export_weights(r)["value"]
    assert load_checkpoint(weights).card["edited_from"] == {"checkpoint": shared.path.name, "sha256": shared.sha256}


def test_the_export_folder_keeps_only_the_newest_files(handlers, monkeypatch):
    import app.ui

    monkeypatch.setattr(app.ui, "MAX_EXPORT_FILES", 4)
    r = request("many-exports")
    handlers.on_load(r)
    logs = [handlers.export_log(r)["value"][0] for _ in range(6)]
    weights = handlers.export_weights(r)["value"]
    kept = set(map(str, handlers.export_dir.iterdir()))
    assert len(kept) <= 4 and set(weights) <= kept and logs[-1] in kept and logs[0] not in kept


def test_the_measure_tab_gives_evaluate_edits_numbers_with_progress_and_downloads(handlers, tmp_path, capsys):
    from app.measure_tab import MeasureHandlers
    from app.ui import EDITOR_LABELS
    from editcore.cli import main

    tab = MeasureHandlers(handlers.lab, handlers._export_path, EDITOR_LABELS)
    ticks = []
    results, status, table, plot, files, command = tab.run_protocol(
        "other", 10, 5, ["rmsprop"], ["baseline"], request("measure"),
        progress=lambda value, desc=None, unit=None: ticks.append(value))
    assert ticks == [(i, 10) for i in range(11)]  # the bar moves once per edit
    assert "1 measured now" in status and "<table" in table and plot.startswith("<svg") and plot.count("<circle") == 10
    summary_csv, edits_csv, results_file = files["value"]
    assert "-summary-" in summary_csv and "-edits-" in edits_csv and summary_csv.endswith(".csv")
    assert json.loads(Path(results_file).read_text())["rows"][0]["records"]
    row = results["rows"][0]
    assert "python -m editcore measure --checkpoint baseline=" in command and row["command"] in Path(summary_csv).read_text()

    # The same seed, editor and N through the command line: the same numbers, edit for edit.
    records = tmp_path / "records.json"
    assert main(["evaluate-edits", "--checkpoint", str(handlers.lab.models["baseline"].path), "--editor", "rmsprop",
                 "--n-edits", "10", "--seed", "5", "--json", "--records", str(records)]) == 0
    cli = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    for key in ("test_error", "drawdown", "drawdown_ci95", "success_rate", "mean_steps", "generalization", "n_edits",
                "n_heldout", "editor_hparams", "layers"):
        assert row["summary"][key] == cli[key], key
    timeless = lambda rows: [{k: v for k, v in r.items() if k != "seconds"} for r in rows]  # noqa: E731
    tab_records = json.loads(Path(results_file).read_text())["rows"][0]["records"]
    assert timeless(tab_records) == timeless(json.loads(records.read_text()))

    # Asked again: from the cache at once. A bad N is a message; nothing runs.
    assert "from stored results" in tab.run_protocol("other", 10, 5, ["rmsprop"], ["baseline"], request("measure"),
                                                     progress=lambda *a, **k: pytest.fail("nothing to run"))[1]
    with pytest.raises(gr.Error, match="N must be"):
        tab.run_protocol("other", 5000, 5, ["rmsprop"], ["baseline"], request("measure"))
    assert "No measurement is running" in tab.cancel(request("measure"))
    # Cancel (as the page's button does from its own request) stops the run after the current edit.
    cancel_at_two = lambda value, desc=None, unit=None: value[0] == 2 and tab.cancel(request("measure"))  # noqa: E731
    status = tab.run_protocol("other", 10, 6, ["rmsprop"], ["baseline"], request("measure"), progress=cancel_at_two)[1]
    assert status.startswith("**Cancelled**") and "after 2 of 10 edits" in status


def test_the_measure_tab_opens_with_the_shipped_results_of_its_default_settings(handlers):
    from app.measure_tab import MeasureHandlers
    from app.ui import EDITOR_LABELS

    results, status, table, plot, files, command = MeasureHandlers(handlers.lab, handlers._export_path,
                                                                   EDITOR_LABELS).initial()
    assert results is not None, "assets/measure_defaults.json is not the default settings' run on these models: " \
                                "rerun the command it records"
    assert all(row["from_cache"] for row in results["rows"]) and "Stored results" in status
    assert {(r["model"], r["editor"]) for r in results["rows"]} == {(m, e) for m in ("baseline", "editable")
                                                                    for e in lesson_editors(handlers.lab.models)}


def test_a_compare_row_says_plainly_when_its_method_did_not_fix_the_image(handlers):
    from app import render
    from editcore import MethodOutcome

    outcome = MethodOutcome("Fine-tuning (baseline model)", "baseline", "Adam on layer3", False, 500, 9.5, 0.9, 0.89, 0, 10,
                            [0] * 16, [1] * 16, {}, 999, 500)
    table = render.compare_html(torch.zeros(16, 3, 32, 32, dtype=torch.uint8), handlers.view_names, [outcome], 3, CLASSES)
    assert "NOT fixed</b> within 500 steps" in table and "500 of up to 500" in table and "999 images" in table


def test_training_history_draws_what_each_card_recorded():
    from app.render_measure import training_history

    baseline = {"objective": "baseline", "epochs": 2, "test_accuracy": 0.6, "command": "train ...",
                "history": [{"epoch": 1, "loss_base": 1.2, "test_accuracy": 0.5}, {"epoch": 2, "loss_base": 0.9,
                                                                                    "test_accuracy": 0.6}]}
    editable = {"objective": "editable", "epochs": 1, "test_accuracy": 0.58, "init": "runs/gpu/base.safetensors",
                "editable_prefix": "layer3", "editor": {"name": "rmsprop", "lr": 2e-4, "beta": 0.9},
                "train_config": {"c_edit": 0.01, "c_loc": 1.0, "editor": "rmsprop", "max_steps": 10, "order": "second"},
                "history": [{"epoch": 1, "loss_base": 1.0, "loss_edit": 0.1, "loss_loc": 0.3, "val_error": 0.4,
                             "val_drawdown": 0.05, "test_accuracy": 0.58, "editor": {"lr": 2e-4, "beta": 0.9}}]}
    drawn = training_history({"baseline": baseline, "editable": editable},
                             {"baseline": "base.safetensors", "editable": "editable.safetensors"})
    assert drawn.count("<svg") == 6 and "not recorded" not in drawn and "no editor was learned" not in drawn
    assert "drawn after the baseline model's 2" in drawn and "c_loc = 1.0" in drawn
    assert "ended at lr 0.0002 (learned), beta 0.9 (learned)" in drawn  # a card without editor_trained: all learned
    fixed_lr = training_history({"editable": {**editable, "editor_trained": ["logit_beta"], "best_epoch": 1}},
                                {"editable": "editable.safetensors"})
    assert "epoch 1 kept; its editor ended at lr 0.0002 (fixed), beta 0.9 (learned)" in fixed_lr
    alone = training_history({"baseline": baseline}, {"baseline": "base.safetensors"})
    assert "no model here was trained for edits" in alone and "not recorded: trained without --val-size" in alone


def test_a_damaged_stored_measurement_is_a_note_not_a_crash(handlers, tmp_path):
    from app.measure_tab import MeasureHandlers
    from app.ui import EDITOR_LABELS

    damaged = tmp_path / "measure_defaults.json"
    damaged.write_text('{"format": "editlab-measurement", "version": 1, "rows": [{"model": "baseline"}]}')
    tab = MeasureHandlers(handlers.lab, handlers._export_path, EDITOR_LABELS, shipped=[damaged])
    assert len(tab.notes) == 1 and "measure_defaults.json could not be read" in tab.notes[0]
    assert tab.initial()[0] is None and "No stored results" in tab.initial()[1]
