"""Training: the paper's recipe, resumable state, learnable editors, validation-based selection, DDP."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from editcore import TrainConfig, create_editor, load_checkpoint, train
from editcore.cli import main
from editcore.experiments.train_state import load_state, save_state
from editcore.experiments.training import recipe_config

from conftest import make_tiny, tiny_images

ROOT = Path(__file__).resolve().parent.parent
# TinyNet's settings (conftest); also used by tests/ddp_worker.py.
TINY = dict(editable_prefix="body", channels_last=False, batch_size=8, max_steps=3, seed=0)


def quiet(*_):
    pass


def paper_tiny(**changes) -> TrainConfig:
    """The paper's recipe at toy scale, with a warm-up and a cosine schedule so the schedule's position matters."""
    settings = {**TINY, "epochs": 3, "val_size": 8, "val_edits": 2, "patience": 0, "editor_lr": 0.05,
                "schedule": "cosine", "warmup_epochs": 1.0, **changes}
    return recipe_config("paper", **settings)


def without_times(history):
    return [{k: v for k, v in record.items() if k != "seconds"} for record in history]


@pytest.mark.parametrize("stop_after", [4, 6], ids=["at-epoch-end", "mid-epoch"])
def test_resume_continues_bit_identically(tmp_path, stop_after):
    data = tiny_images()
    model, editor, summary = train(paper_tiny(), data, init_model=make_tiny(), log=quiet,
                                   state_path=tmp_path / "whole.safetensors")

    state = tmp_path / "parts.safetensors"
    _, _, first = train(paper_tiny(), data, init_model=make_tiny(), log=quiet, state_path=state, stop_after_steps=stop_after)
    assert not first["finished"] and first["steps"] == stop_after
    saved = json.loads(state.with_suffix(".json").read_text())  # the sidecar: JSON structure, no pickle
    assert saved["format"].startswith("editlab-train-state")
    resumed_model, resumed_editor, second = train(TrainConfig(), data, init_model=make_tiny(), log=quiet,
                                                  resume=load_state(state), state_path=state)

    assert second["finished"] and second["steps"] == summary["steps"] == 12
    assert without_times(second["history"]) == without_times(summary["history"])  # losses, val metrics, editor
    assert second["best_epoch"] == summary["best_epoch"]
    for key, value in model.state_dict().items():
        assert torch.equal(value, resumed_model.state_dict()[key]), key
    assert torch.equal(editor.logit_beta, resumed_editor.logit_beta)
    whole, parts = load_state(tmp_path / "whole.safetensors"), load_state(state)
    for key, value in whole["optimizer"]["state"][0].items():
        assert torch.equal(value, parts["optimizer"]["state"][0][key]), key


def test_resume_refuses_another_world_size(tmp_path):
    state = tmp_path / "s.safetensors"
    train(paper_tiny(epochs=1), tiny_images(), init_model=make_tiny(), log=quiet, state_path=state, stop_after_steps=1)
    forged = load_state(state)
    forged["world_size"] = 2
    save_state(state, forged)
    with pytest.raises(ValueError, match="2 processes"):
        train(TrainConfig(), tiny_images(), init_model=make_tiny(), log=quiet, resume=load_state(state))


@pytest.mark.parametrize("editor, learned, kept", [
    ("rmsprop", {"lr", "beta"}, set()),
    ("rmsprop-paper", {"beta"}, {"lr"}),
])
def test_learnable_editor_parameters_move_under_the_outer_optimizer(editor, learned, kept):
    config = recipe_config("paper", **TINY, epochs=2, editor=editor, editor_lr=0.05, val_size=0, patience=0)
    start = create_editor(editor, lr=0.05).hyperparameters()
    _, trained, summary = train(config, tiny_images(), init_model=make_tiny(), log=quiet)
    end = trained.hyperparameters()
    assert {k for k in end if end[k] != start[k]} == learned
    assert {k for k in end if end[k] == start[k]} == kept
    assert summary["history"][-1]["editor"] == end  # logged per epoch
    assert summary["editor_trained"] == sorted(f"{'log' if k == 'lr' else 'logit'}_{k}" for k in learned)


def test_fixed_editor_stays_fixed():
    config = recipe_config("paper", **TINY, epochs=1, learnable_editor=False, val_size=0, patience=0)
    _, editor, summary = train(config, tiny_images(), init_model=make_tiny(), log=quiet)
    assert editor.hyperparameters() == pytest.approx({"lr": 1e-3, "beta": 0.5}, rel=1e-6)
    assert summary["editor_trained"] == []


def test_validation_keeps_the_best_epoch_and_stops_on_patience():
    config = paper_tiny(epochs=6, patience=1, lr=0.5)  # an outer lr this large makes later epochs worse
    model, _, summary = train(config, tiny_images(), init_model=make_tiny(), log=quiet)
    scores = [r["val_score"] for r in summary["history"]]
    assert all(r["val_score"] == pytest.approx(r["val_error"] + r["val_drawdown"]) for r in summary["history"])
    assert summary["best_epoch"] == 1 + scores.index(min(scores))
    assert len(scores) == summary["best_epoch"] + 1 < 6  # one epoch without improvement, then stop
    assert summary["config"]["epochs"] == len(scores)


def test_recipes_and_validation_settings_are_checked():
    assert recipe_config("paper", lr=3e-4).lr == 3e-4  # a given flag wins over the recipe
    paper = recipe_config("paper").resolved()
    assert (paper.optimizer, paper.lr, paper.weight_decay, paper.schedule, paper.clip_grad_norm) == ("adam", 1e-3, 0.0,
                                                                                                     "constant", 10.0)
    assert (paper.editor, paper.c_edit, paper.c_loc, paper.editable) == ("rmsprop-paper", 0.01, 0.01, True)
    with pytest.raises(ValueError, match="recipe"):
        recipe_config("papers")
    with pytest.raises(ValueError, match="val_size"):
        TrainConfig(patience=3).resolved()
    with pytest.raises(ValueError, match="schedule"):
        TrainConfig(schedule="step").resolved()
    with pytest.raises(ValueError, match="leaves no training images"):
        train(TrainConfig(**TINY, val_size=40), tiny_images(), init_model=make_tiny(), log=quiet)


def test_state_file_is_not_a_checkpoint_and_vice_versa(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("EDITLAB_DATA", raising=False)
    assert main(["train", "--resume", str(tmp_path / "none.safetensors"), "--out", str(tmp_path / "x.safetensors")]) == 2
    assert "does not exist" in capsys.readouterr().err
    shipped = ROOT / "assets" / "resnet20_baseline.safetensors"
    assert main(["train", "--resume", str(shipped), "--out", str(tmp_path / "x.safetensors")]) == 2
    assert "holds no training state" in capsys.readouterr().err


@pytest.mark.slow
def test_paper_recipe_on_the_sample_writes_a_card_with_the_outer_and_editor_settings(tmp_path, monkeypatch):
    monkeypatch.delenv("EDITLAB_DATA", raising=False)
    out, state = tmp_path / "paper.safetensors", tmp_path / "paper.state.safetensors"
    common = ["train", "--recipe", "paper", "--epochs", "2", "--train-subset", "96", "--val-size", "32",
              "--val-edits", "2", "--batch-size", "32", "--max-steps", "2", "--device", "cpu", "--out", str(out)]
    assert main(common + ["--state", str(state), "--stop-after-steps", "3"]) == 0
    assert state.is_file() and not out.exists()  # interrupted: a state, no checkpoint
    written = state.read_bytes()
    assert main(["train", "--resume", str(state), "--checkpoint-from-state", "--out", str(out)]) == 0
    assert state.read_bytes() == written  # a look at the run so far leaves its state alone
    so_far = load_checkpoint(out).card
    assert so_far["from_state"]["epochs_done"] == 1 and not so_far["from_state"]["finished"] and so_far["best_epoch"] == 1
    assert "resumed" not in so_far
    latest = tmp_path / "latest.safetensors"  # the weights as the run left them, one step into epoch 2
    assert main(["train", "--resume", str(state), "--checkpoint-from-state", "--latest", "--out", str(latest)]) == 0
    saved, best = load_state(state)["model"], load_checkpoint(out).model.state_dict()
    weights = load_checkpoint(latest).model.state_dict()
    assert all(torch.equal(v, saved[k]) for k, v in weights.items()) and not torch.equal(weights["head.fc.weight"], best["head.fc.weight"])
    assert load_checkpoint(latest).card["from_state"]["weights"] == "latest"
    assert main(["train", "--resume", str(state), "--out", str(out)]) == 0

    ckpt = load_checkpoint(out)
    card = ckpt.card
    config = card["train_config"]
    assert (config["optimizer"], config["lr"], config["clip_grad_norm"], config["schedule"]) == ("adam", 1e-3, 10.0, "constant")
    assert card["recipe"] == "paper" and card["world_size"] == 1 and card["steps"] == 4
    assert card["editor"]["name"] == "rmsprop-paper" and card["editor"]["lr"] == pytest.approx(1e-3)
    assert ckpt.editor.hyperparameters() == pytest.approx({k: card["editor"][k] for k in ("lr", "beta")})
    assert card["editor_trained"] == ["logit_beta"]
    assert [set(r) >= {"loss_base", "val_error", "val_drawdown", "editor", "grad_norm"} for r in card["history"]] == [True] * 2
    assert card["best_epoch"] in (1, 2) and card["data"]["n_train"] == 96
    assert card["best_epoch_rule"] == ("the epoch with the lowest validation error + drawdown of 2 seeded edits on the last "
                                       "32 training images (held out); stop after 20 epochs without a better one")
    assert card["command"].startswith("python -m editcore train --recipe paper")
    assert card["resumed"][0]["command"].startswith("python -m editcore train --resume")


def torchrun(*args, timeout=300):
    env = {k: v for k, v in os.environ.items() if k != "EDITLAB_DATA"}
    env.update(EDITLAB_DEVICE="cpu", OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", *map(str, args)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)


@pytest.mark.slow
def test_two_process_editable_training_writes_a_loadable_checkpoint(tmp_path):
    out = tmp_path / "ddp.safetensors"
    proc = torchrun("-m", "editcore", "train", "--editable", "--epochs", "1", "--train-subset", "64", "--batch-size", "32",
                    "--max-steps", "2", "--out", out)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ckpt = load_checkpoint(out)
    assert ckpt.card["world_size"] == 2 and ckpt.card["objective"] == "editable" and len(ckpt.card["history"]) == 1
    assert ckpt.editor is not None and ckpt.card["editor"]["name"] == "rmsprop"


@pytest.mark.slow
def test_two_process_gradients_are_the_mean_of_each_ranks_own(tmp_path):
    """tests/ddp_worker.py: each rank computes its step's gradients alone, then under DDP; with batch norm per
    rank (DDP's default), the DDP gradients are the mean of the ranks' own, for the model and the editor."""
    proc = torchrun(ROOT / "tests" / "ddp_worker.py", tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    from safetensors.torch import load_file

    for kind in ("baseline", "editable"):
        ranks = [load_file(str(tmp_path / f"{kind}_rank{r}.safetensors")) for r in range(2)]
        names = {k[len("ddp."):] for k in ranks[0] if k.startswith("ddp.")}
        assert names and (kind == "baseline" or "editor.log_lr" in names)
        for name in names:
            assert torch.equal(ranks[0]["ddp." + name], ranks[1]["ddp." + name]), name  # in sync
            mean = (ranks[0]["own." + name] + ranks[1]["own." + name]) / 2
            assert torch.allclose(ranks[0]["ddp." + name], mean, rtol=1e-5, atol=1e-7), name
        own = [r["own.editor.log_lr" if kind == "editable" else "own.head.2.weight"] for r in ranks]
        assert not torch.equal(own[0], own[1])  # the ranks did see different data / edits


def test_editable_training_with_the_local_editor_is_first_order_and_moves_the_weights():
    config = TrainConfig(**{**TINY, "max_steps": 0}, epochs=1, editable=True, editor="local", c_loc=1.0, lr=1e-2).resolved()
    assert (config.order, config.learnable_editor, config.editor_lr, config.max_steps) == ("first", False, 1.0, 20)
    start = make_tiny()
    model, editor, summary = train(config, tiny_images(), init_model=make_tiny(), log=quiet)
    assert editor.name == "local" and summary["editor_trained"] == []
    record = summary["history"][-1]
    assert record["edit_success"] > 0 and record["loss_loc"] > 0  # edits ran and moved the batch's outputs
    assert not torch.equal(model.body[0].weight, start.body[0].weight)
    assert TrainConfig(editable=True, editor="local").resolved().editable_prefix == "layer3"


@pytest.mark.parametrize("reference", ["training", "eval"])
def test_the_locality_term_compares_the_edited_model_with_the_training_forward(reference):
    """An editor too weak to move anything leaves the edited model as it was: L_loc is then the gap between
    the reference and the eval-mode model, zero for 'eval' and the train/eval-mode KL for 'training' (the
    paper's code), the term that keeps the eval-mode network tied to what the training forward learns."""
    import copy

    from editcore import EditableModel, normalize
    from editcore.experiments.training import kl_div, train_step

    config = TrainConfig(**TINY, editable=True, editor="gd", loc_reference=reference).resolved()
    model = make_tiny()
    editable, editor = EditableModel(model, "body"), create_editor("gd", lr=1e-12)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)  # the step must not move what we compare
    pool = tiny_images()
    x, y = normalize(pool.images[:8]), pool.labels[:8]
    twin = copy.deepcopy(model)  # its training forward updates batch norm's running statistics as train_step's does
    with torch.no_grad():
        train_logits = twin.train()(x)
        eval_logits = twin.eval()(x)
    stats = train_step(model, editable, editor, optimizer, x, y, pool, config, torch.Generator().manual_seed(0))
    expected = kl_div(train_logits, eval_logits) if reference == "training" else torch.tensor(0.0)
    assert (float(expected) > 1e-3) == (reference == "training")
    assert float(stats["loss_loc"]) == pytest.approx(float(expected), abs=1e-6)
