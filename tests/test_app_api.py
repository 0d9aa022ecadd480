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
    assert {"/select_image", "/apply_edit", "/undo", "/reset", "/history"} <= set(names)


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
    assert report["n_fixed"] >= 0 and report["n_broken"] >= 0 and report["n_heldout"] == 1000
    assert report["heldout_accuracy_after"] == pytest.approx(
        report["heldout_accuracy_before"] + (report["n_fixed"] - report["n_broken"]) / 1000, abs=1e-12)
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
