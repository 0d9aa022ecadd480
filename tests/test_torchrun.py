"""Sharding the protocol across torchrun's processes: the same edits, the same records, on rank 0 only."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from editcore.experiments.torchrun import Ranks

ROOT = Path(__file__).resolve().parent.parent
BASELINE = ROOT / "assets" / "resnet20_baseline.safetensors"
TORCHRUN_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE")


def test_without_torchrun_a_process_is_the_only_rank(monkeypatch):
    for name in TORCHRUN_ENV:
        monkeypatch.delenv(name, raising=False)
    ranks = Ranks.from_env()
    assert ranks == Ranks(0, 1, 0, 1, launched=False) and ranks.is_main
    assert list(ranks.share(5)) == [0, 1, 2, 3, 4]
    assert ranks.gather([0, 1], ["a", "b"]) == ["a", "b"]
    assert ranks.device(torch.device("cuda")) == torch.device("cuda")


def test_ranks_come_from_torchruns_environment(monkeypatch):
    monkeypatch.setenv("RANK", "5")
    monkeypatch.setenv("WORLD_SIZE", "8")
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")
    ranks = Ranks.from_env()
    assert ranks == Ranks(5, 8, 1, 4, launched=True) and not ranks.is_main
    assert ranks.device(torch.device("cuda")) == torch.device("cuda", 1)  # its own GPU on this node
    assert ranks.device(torch.device("cuda:3")) == torch.device("cuda", 3)  # asked for: kept
    assert ranks.device(torch.device("cpu")) == torch.device("cpu")


def test_shares_cover_every_position_once():
    shares = [list(Ranks(rank, 3).share(10)) for rank in range(3)]
    assert sorted(sum(shares, [])) == list(range(10))
    assert shares[1] == [1, 4, 7]


def run_protocol(*launcher: str, records: Path, timeout: int = 400) -> tuple[dict, list[dict]]:
    env = {k: v for k, v in os.environ.items() if k not in ("EDITLAB_DATA", *TORCHRUN_ENV)}
    proc = subprocess.run(
        [sys.executable, *launcher, "-m", "editcore", "evaluate-edits", "--checkpoint", str(BASELINE), "--device", "cpu",
         "--n-edits", "5", "--heldout-size", "300", "--seed", "3", "--threads", "1", "--json", "--records", str(records)],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    assert len(lines) == 1, proc.stdout  # only rank 0 prints
    return json.loads(lines[0]), json.loads(records.read_text())


@pytest.mark.slow
@pytest.mark.skipif(not BASELINE.exists(), reason="needs the shipped baseline checkpoint")
def test_two_processes_under_torchrun_give_the_single_process_records(tmp_path):
    single, single_records = run_protocol(records=tmp_path / "single.json")
    sharded, sharded_records = run_protocol("-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                                            records=tmp_path / "sharded.json")
    timing = ("seconds",)
    assert [{k: v for k, v in r.items() if k not in timing} for r in sharded_records] == \
        [{k: v for k, v in r.items() if k not in timing} for r in single_records]
    assert len(sharded_records) == 5
    assert single["world_size"] == 1 and sharded["world_size"] == 2
    for key in ("test_error", "drawdown", "success_rate", "mean_steps", "generalization", "n_edits", "n_heldout"):
        assert sharded[key] == single[key], key
