"""tools/: which numbers drawdown_curve.py plots (from locality runs and model cards); the GPU run script on CPU."""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tools"))
import drawdown_curve  # noqa: E402


def row(model: str, method: str, r: float, c: float) -> dict:
    return {"model": model, "method": method, "R": {"drop": r}, "C": {"drop": c}}


@pytest.fixture
def run(tmp_path):
    results = [row("base", "rmsprop@layer3", 9.0, 4.0), row("ep1", "rmsprop@layer3", 7.0, 3.0),
               row("ep2", "rmsprop@layer3", 6.0, 2.5), row("b1", "rmsprop@layer3", 8.0, 3.5),
               row("ep1", "local@layer3.0.conv1", 0.4, 0.1), row("base", "local@layer3.0.conv1", 0.0, -0.1)]
    path = tmp_path / "run.json"
    path.write_text(json.dumps({"argv": [], "results": results}))
    for name, accuracy in (("base", 0.9), ("ep1", 0.89), ("ep2", 0.88), ("b1", 0.895)):
        (tmp_path / f"{name}_card.json").write_text(json.dumps({"test_accuracy_exact_0_999": accuracy}))
    return path


def test_curves_follow_epochs_per_method_and_protocol(run):
    results = json.loads(run.read_text())["results"]
    lines = drawdown_curve.curves(results, {"ep2": 2, "base": 0, "ep1": 1})
    assert lines[("rmsprop@layer3", "R")] == [(0, 9.0), (1, 7.0), (2, 6.0)]
    assert lines[("local@layer3.0.conv1", "C")] == [(0, -0.1), (1, 0.1)]


def test_c_counts_only_the_corrections_a_model_needed():
    records = [{"steps": 0, "drop": 0.0}, {"steps": 1, "drop": 3.0}, {"steps": 2, "drop": 5.0}]
    assert drawdown_curve.mean_drop({"drop": 8 / 3, "records": records}, "C") == 4.0
    assert drawdown_curve.mean_drop({"drop": 8 / 3, "records": records}, "R") == 8 / 3  # the paper's mean
    assert drawdown_curve.mean_drop({"drop": 2.5}, "C") == 2.5  # no records: the summary


def test_figures_and_printed_numbers(run, tmp_path, monkeypatch, capsys):
    out, accuracy_out = tmp_path / "epochs.png", tmp_path / "accuracy.png"
    monkeypatch.setattr(sys, "argv", ["drawdown_curve.py", str(run), "--series", "A", "base=0", "ep1=1", "ep2=2",
                                      "--series", "B", "b1=1", "--out", str(out), "--accuracy-out", str(accuracy_out),
                                      "--cards", str(tmp_path), "--baseline", "base"])
    assert drawdown_curve.main() == 0
    printed = capsys.readouterr().out
    assert "0 ep 9.00, 1 ep 7.00, 2 ep 6.00" in printed
    assert "R vs accuracy: 90.0% 9.00, 89.0% 7.00, 88.0% 6.00" in printed
    assert "target region: R <= 3.00 at accuracy >= 89.0%" in printed
    assert out.stat().st_size > 0 and accuracy_out.stat().st_size > 0


def test_a_model_without_a_card_or_a_series_without_pairs_is_refused(run, tmp_path, monkeypatch):
    (tmp_path / "ep2_card.json").unlink()
    monkeypatch.setattr(sys, "argv", ["drawdown_curve.py", str(run), "--series", "A", "base=0", "ep2=2",
                                      "--out", str(tmp_path / "e.png"), "--accuracy-out", str(tmp_path / "a.png"),
                                      "--cards", str(tmp_path)])
    with pytest.raises(SystemExit, match="no card"):
        drawdown_curve.main()
    with pytest.raises(SystemExit, match="NAME=EPOCHS"):
        drawdown_curve.parse_series([["A"]])


def test_gpu_paper_recipe_script_returns_states_and_checkpoints_and_resumes(tmp_path):
    """tools/gpu_paper_recipe.sh on CPU and the embedded sample: both runs' checkpoints (cards with the paper's
    outer recipe), the weights as each epoch ended, states and logs come back in $OUT, and a second call resumes
    from the carried states."""
    env = {k: v for k, v in os.environ.items() if k != "EDITLAB_DATA"}
    env.update(DEVICE="cpu", BUDGET="300", PYTHON=sys.executable, STATE_DIR=str(tmp_path / "carried"),
               START="--train-subset 256 --epochs 1 --val-size 64 --val-edits 2")
    names, logs = ("paper_editable", "paper_baseline"), {}
    for call in ("first", "second"):
        out = tmp_path / call
        out.mkdir()
        snap_every = "1" if call == "first" else "5"  # the first call ends with epoch 1
        proc = subprocess.run(["bash", "tools/gpu_paper_recipe.sh"], cwd=ROOT,
                              env={**env, "OUT": str(out), "SNAP_EVERY": snap_every},
                              capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, proc.stdout + proc.stderr
        for name in names:
            assert (out / f"{name}.state.safetensors").is_file()
            if call == "first":
                assert json.loads((out / f"{name}_ep1.json").read_text())["from_state"]["epochs_done"] == 1
            config = json.loads((out / f"{name}.json").read_text())["train_config"]
            assert (config["optimizer"], config["lr"], config["clip_grad_norm"], config["weight_decay"],
                    config["schedule"]) == ("adam", 1e-3, 10.0, 0.0, "constant")
            assert config["editable"] == (name == "paper_editable")
            logs[call, name] = (out / f"{name}.log").read_text()
    assert json.loads((tmp_path / "second" / "paper_editable.json").read_text())["train_config"]["editor"] == "rmsprop-paper"
    for name in names:
        assert re.search("^training resnet20", logs["first", name], re.M)  # started afresh
        assert not re.search("^training resnet20", logs["second", name], re.M)
        assert re.search("^resuming resnet20", logs["second", name], re.M)
