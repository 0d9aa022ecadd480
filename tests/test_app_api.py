"""The programmatic contract: named endpoints driven through gradio_client against a served app."""
from __future__ import annotations

import threading

import httpx
import pytest

from app_support import launch, make_lab

pytestmark = [pytest.mark.api, pytest.mark.filterwarnings("ignore::pandas.errors.Pandas4Warning")]  # from gradio's queue




@pytest.fixture(scope="module")
def served(tmp_path_factory, request):
    demo, url = launch(make_lab(tmp_path_factory, request))
    yield url
    demo.close()


def client(url):
    from gradio_client import Client

    return Client(url, verbose=False, download_files=False)


def topk_of(label_output):
    return [(c["label"], c["confidence"]) for c in label_output["confidences"]]


def test_named_endpoints_exist(served):
    names = client(served).view_api(print_info=False, return_format="dict")["named_endpoints"]
    assert {"/select_image", "/apply_edit", "/apply_edit_progressive", "/undo", "/reset", "/history"} <= set(names)


def test_the_progressive_apply_streams_the_outcome_then_ends_on_the_full_report(served):
    c = client(served)
    _, _, label, target = c.predict("test", 8, api_name="/select_image")
    job = c.submit(target, "editable", None, None, None, None, 0, api_name="/apply_edit_progressive")
    final = job.result(timeout=300)
    steps = job.outputs()
    assert len(steps) == 2 and "scoring the 1,000 held-out images" in steps[0][1]
    assert final[0]["applied"] and final[0]["n_heldout"] == 999 and steps[-1][0] == final[0]
    c.predict(api_name="/undo")
    assert c.predict(target, "editable", None, None, None, None, 0, api_name="/apply_edit")[0]["n_heldout"] == 999
    c.predict(api_name="/reset")


def test_select_edit_report_and_undo_restores_top_k_exactly(served):
    c = client(served)
    _, info, label, target = c.predict("test", 7, api_name="/select_image")
    original = topk_of(label)
    assert "#7" in info and len(original) == 5
    new_target = next(name for name, _ in original[1:])  # the runner-up: an edit that must move the argmax
    report = c.predict(new_target, "editable", "rmsprop", None, 50, "layer3", 0, api_name="/apply_edit")[0]
    assert report["success"] is True and report["applied"] is True
    assert isinstance(report["steps"], int) and 1 <= report["steps"] <= 50 and report["seconds"] >= 0
    for key in ("heldout_accuracy_before", "heldout_accuracy_after"):
        assert 0.0 <= report[key] <= 1.0
    assert report["n_fixed"] >= 0 and report["n_broken"] >= 0 and report["n_heldout"] == 999  # all but image 7
    assert report["heldout_accuracy_after"] == pytest.approx(
        report["heldout_accuracy_before"] + (report["n_fixed"] - report["n_broken"]) / 999, abs=1e-12)
    edited = topk_of(c.predict("test", 7, api_name="/select_image")[2])
    assert edited[0][0] == new_target
    assert len(c.predict(api_name="/history")) == 1
    c.predict(api_name="/undo")
    assert topk_of(c.predict("test", 7, api_name="/select_image")[2]) == original
    assert c.predict(api_name="/history") == []


def test_bad_hyperparameter_is_an_error_and_leaves_state_intact(served):
    from gradio_client.exceptions import AppError

    c = client(served)
    c.predict("test", 3, api_name="/select_image")
    c.predict("cat", "editable", "rmsprop", None, 30, "layer3", 0, api_name="/apply_edit")
    history = c.predict(api_name="/history")
    for lr, steps in ((-1, 10), ("fast", 10), (None, 0), (None, "many")):
        with pytest.raises(AppError, match="learning rate|max steps"):
            c.predict("dog", "editable", "rmsprop", lr, steps, "layer3", 0, api_name="/apply_edit")
    assert c.predict(api_name="/history") == history
    c.predict(api_name="/reset")
    assert c.predict(api_name="/history") == []


def test_two_clients_editing_at_once_stay_isolated(served):
    a, b = client(served), client(served)
    baseline_b = topk_of(a.predict("test", 11, api_name="/select_image")[2])
    b.predict("test", 11, api_name="/select_image")
    results, errors = {}, []

    def edit(name, c, targets):
        try:
            results[name] = [c.predict(t, "editable", "rmsprop", None, 50, "layer3", 0, api_name="/apply_edit")[0]
                             for t in targets]
        except Exception as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=edit, args=("a", a, ["frog", "ship"])),
               threading.Thread(target=edit, args=("b", b, ["horse"]))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=180)
    assert not errors
    history_a, history_b = a.predict(api_name="/history"), b.predict(api_name="/history")
    assert [h["targets"] for h in history_a] == [["frog"], ["ship"]]
    assert [h["targets"] for h in history_b] == [["horse"]]
    assert topk_of(a.predict("test", 11, api_name="/select_image")[2])[0][0] == "ship"
    assert topk_of(b.predict("test", 11, api_name="/select_image")[2])[0][0] == "horse"
    b.predict(api_name="/reset")
    assert topk_of(b.predict("test", 11, api_name="/select_image")[2]) == baseline_b
    assert len(a.predict(api_name="/history")) == 2


def test_a_fractional_or_non_numeric_image_index_is_refused(served):
    from gradio_client.exceptions import AppError

    c = client(served)
    for index, message in ((2.5, "whole number"), ("abc", "must be a number")):
        with pytest.raises(AppError, match=message):
            c.predict("test", index, api_name="/select_image")
    for raw in ("NaN", "Infinity"):  # JSON extensions a hand-written request can send; gradio_client cannot
        event = httpx.post(f"{served}gradio_api/call/select_image", content=f'{{"data": ["test", {raw}]}}',
                           headers={"Content-Type": "application/json"}, timeout=60).json()["event_id"]
        stream = httpx.get(f"{served}gradio_api/call/select_image/{event}", timeout=120).text
        assert "event: error" in stream and "must be a finite number" in stream


def exported_weights(c) -> str:
    """The path of the session's edited weights, exported through /export_weights (the app runs here)."""
    weights = c.predict(api_name="/export_weights")["value"][0]
    return weights["path"] if isinstance(weights, dict) else weights


def test_twenty_corrections_score_the_980_images_they_did_not_touch(served):
    """The session's figures are what an independent look at the exported weights finds on the other images."""
    import torch

    from editcore import CLASSES, load_checkpoint, load_sample, normalize

    sample = load_sample()
    c = client(served)
    c.predict("test", 0, api_name="/select_image")  # the session's model: editable, as the page starts
    exported_before = load_checkpoint(exported_weights(c))
    with torch.no_grad():
        wrong = torch.nonzero(exported_before.model(normalize(sample.images)).argmax(1) != sample.labels).view(-1)
    corrected = wrong[:20].tolist()
    for index in corrected:
        c.predict("test", index, api_name="/select_image")
        report = c.predict(CLASSES[int(sample.labels[index])], "editable", None, None, None, None, 0,
                           api_name="/apply_edit")[0]
        assert report["applied"], report["message"]
    assert report["n_heldout"] == 980 and report["n_corrections"] == report["corrections_held"] == 20
    exported = load_checkpoint(exported_weights(c))
    others = torch.ones(len(sample), dtype=torch.bool)
    others[corrected] = False
    with torch.no_grad():
        predictions = exported.model(normalize(sample.images)).argmax(1)
    assert int((predictions == sample.labels)[others].sum()) / 980 == report["heldout_accuracy_after"]
    assert bool((predictions[corrected] == sample.labels[corrected]).all())
    history = c.predict(api_name="/history")
    assert history[-1]["heldout_accuracy_after"] == report["heldout_accuracy_after"]
    assert all(h["n_heldout"] == 980 for h in history)
    c.predict(api_name="/reset")


def test_run_protocol_measures_then_answers_from_its_cache(served):
    c = client(served)
    assert "/run_protocol" in c.view_api(print_info=False, return_format="dict")["named_endpoints"]
    results, status, *_ = c.predict("other", 10, 2, ["gd"], ["baseline"], api_name="/run_protocol")
    row, = results["rows"]
    assert (row["model"], row["editor"], row["protocol"], row["n_edits"], row["seed"]) == ("baseline", "gd", "other", 10, 2)
    assert len(row["drawdowns"]) == row["summary"]["n_edits"] == 10 and not row["from_cache"]
    assert row["summary"]["drawdown"] == pytest.approx(sum(row["drawdowns"]) / 10)
    again, status, *_ = client(served).predict("other", 10, 2, ["gd"], ["baseline"], api_name="/run_protocol")
    assert again["rows"][0]["from_cache"] and again["rows"][0]["summary"] == row["summary"]
    from gradio_client.exceptions import AppError

    with pytest.raises(AppError, match="maximum value 500"):  # the slider's bound, checked before the handler's
        c.predict("other", 501, 2, ["gd"], ["baseline"], api_name="/run_protocol")
    with pytest.raises(AppError, match="choose at least one editor"):
        c.predict("other", 10, 2, [], ["baseline"], api_name="/run_protocol")
