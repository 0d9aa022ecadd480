"""The CLI end to end on the embedded sample, with no data root set."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from editcore import SHIPPED_MODELS
from editcore.cli import build_parser, main

ROOT = Path(__file__).resolve().parent.parent
DOCUMENTED = {"train", "evaluate-edits", "info", "download-cifar10"}
COMMANDS = sorted(next(a for a in build_parser()._actions if a.dest == "command").choices)
SUMMARY_KEYS = {"test_error", "drawdown", "success_rate", "mean_steps", "n_edits", "seconds"}


def run_cli(*args, timeout=300):
    env = {k: v for k, v in os.environ.items() if k != "EDITLAB_DATA"}
    env["EDITLAB_DEVICE"] = "cpu"
    return subprocess.run([sys.executable, "-m", "editcore", *map(str, args)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """`train --epochs 1` on the sample, run as a user would."""
    out = tmp_path_factory.mktemp("cli") / "tiny.safetensors"
    proc = run_cli("train", "--epochs", 1, "--batch-size", 250, "--out", out)
    assert proc.returncode == 0, proc.stderr
    return out, proc


@pytest.mark.slow
def test_train_on_the_sample_writes_checkpoint_and_card(trained):
    out, proc = trained
    assert "embedded sample" in proc.stderr
    card = json.loads(out.with_suffix(".json").read_text())
    assert card["arch"] == "resnet20" and card["epochs"] == 1 and card["objective"] == "baseline"
    assert card["data"]["train"] == "cifar10-test-sample" and card["data"]["n_train"] == 1000
    assert 0.0 <= card["test_accuracy"] <= 1.0
    assert card["command"].startswith("python -m editcore train")


@pytest.mark.slow
def test_evaluate_edits_json_on_the_sample():
    """The shipped default model as a user would run it (its stored anchor statistics: no 19 s of CPU to compute
    them; test_nae runs evaluate-edits on a freshly trained model)."""
    proc = run_cli("evaluate-edits", "--checkpoint", SHIPPED_MODELS["editable"], "--n-edits", 5,
                   "--json")
    assert proc.returncode == 0, proc.stderr
    assert "embedded sample" in proc.stderr
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    assert SUMMARY_KEYS <= set(summary)
    assert summary["n_edits"] == 5 and summary["n_heldout"] == 1000
    assert 0.0 <= summary["test_error"] <= 1.0 and 0.0 <= summary["success_rate"] <= 1.0
    assert summary["editor"] == "local" and summary["protocol"] == "other"  # the page's editor, targets != true label
    assert 0.0 <= summary["mean_steps"] <= summary["max_steps"] == 20
    assert -1.0 <= summary["drawdown"] <= 1.0 and summary["seconds"] >= 0


def test_a_baseline_is_judged_under_the_editor_the_editable_model_learned(monkeypatch, capsys):
    """--editor-from: the other checkpoint's learned editor (lr and beta), as the paper judges both models; a
    checkpoint that learned no such editor is refused with a clear message."""
    monkeypatch.delenv("EDITLAB_DATA", raising=False)
    editable, baseline = SHIPPED_MODELS["editable"], SHIPPED_MODELS["baseline"]
    learned = json.loads(editable.with_suffix(".json").read_text())["editor"]
    args = ["evaluate-edits", "--checkpoint", str(baseline),
            "--editor", learned["name"], "--n-edits", "2", "--heldout-size", "50", "--device", "cpu", "--json"]
    assert main([*args, "--editor-from", str(editable)]) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["editor_learned"] and summary["editor_from"] == str(editable)
    assert summary["editor_hparams"] == pytest.approx({"lr": learned["lr"], "beta": learned["beta"]})
    assert main([*args, "--editor-from", str(baseline)]) == 2
    assert f"learned no {learned['name']} editor" in capsys.readouterr().err


@pytest.mark.slow
def test_info_prints_the_card(trained):
    out, _ = trained
    proc = run_cli("info", out)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout) == json.loads(out.with_suffix(".json").read_text())


def test_info_prints_how_the_shipped_models_were_trained(capsys):
    """The page's models: `info` gives the recipe, the epochs trained, the one kept and the rule that kept it."""
    for path in SHIPPED_MODELS.values():
        assert main(["info", str(path)]) == 0
        card = json.loads(capsys.readouterr().out)
        assert card["train_config"]["optimizer"] == "adam" and card["recipe"] in ("paper", "default")
        assert card["best_epoch"] < card["epochs"] == len(card["history"])
        assert "lowest validation error" in card["best_epoch_rule"] and card["resumed"]


@pytest.mark.slow
def test_editable_training_on_the_sample_stores_the_learned_editor(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("EDITLAB_DATA", raising=False)
    out = tmp_path / "editable.safetensors"
    code = main(["train", "--epochs", "1", "--editable", "--train-subset", "64", "--batch-size", "32",
                 "--max-steps", "2", "--device", "cpu", "--out", str(out)])
    assert code == 0
    assert main(["info", str(out)]) == 0
    card = json.loads(capsys.readouterr().out)
    assert card["objective"] == "editable" and card["editable_prefix"] == "layer3"
    assert card["editor"]["name"] == "rmsprop" and {"lr", "beta"} <= set(card["editor"])
    assert card["train_config"]["order"] == "second"


@pytest.mark.parametrize("command", COMMANDS)
def test_help_works_for_every_command(command, capsys):
    with pytest.raises(SystemExit) as info:
        main([command, "--help"])
    assert info.value.code == 0
    assert "usage: python -m editcore " + command in capsys.readouterr().out


def test_documented_commands_exist():
    assert DOCUMENTED <= set(COMMANDS)


def test_missing_data_root_exits_2_naming_the_path(tmp_path, capsys):
    missing = tmp_path / "no_such_root"
    code = main(["train", "--epochs", "1", "--data-root", str(missing), "--out", str(tmp_path / "x.safetensors")])
    assert code == 2
    assert str(missing) in capsys.readouterr().err


def test_missing_data_root_env_exits_2_naming_the_path(tmp_path, capsys, monkeypatch):
    missing = tmp_path / "env_root"
    monkeypatch.setenv("EDITLAB_DATA", str(missing))
    code = main(["train", "--epochs", "1", "--out", str(tmp_path / "x.safetensors")])
    assert code == 2
    assert str(missing) in capsys.readouterr().err


def test_info_on_a_missing_or_foreign_file_exits_2(tmp_path, capsys):
    assert main(["info", str(tmp_path / "absent.safetensors")]) == 2
    assert "absent.safetensors" in capsys.readouterr().err
    foreign = tmp_path / "foreign.safetensors"
    foreign.write_bytes(b"\x80\x04not a checkpoint")
    assert main(["info", str(foreign)]) == 2
    assert "not a safetensors" in capsys.readouterr().err


@pytest.mark.parametrize("how", ["flag", "env"])
def test_download_goes_to_the_named_root_even_before_it_exists(tmp_path, monkeypatch, how):
    import torchvision

    calls = []
    monkeypatch.setattr(torchvision.datasets, "CIFAR10", lambda root, **kw: calls.append((root, kw)))
    root = tmp_path / "not_yet"
    monkeypatch.delenv("EDITLAB_DATA", raising=False)
    if how == "env":
        monkeypatch.setenv("EDITLAB_DATA", str(root))
    assert main(["download-cifar10"] + (["--data-root", str(root)] if how == "flag" else [])) == 0
    assert calls == [(str(root), {"train": True, "download": True})]
