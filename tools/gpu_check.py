#!/usr/bin/env python
"""GPU path check: the app's edit + held-out re-evaluation, the edit protocol (one process, and torchrun
with nccl on one GPU) and one epoch of editable training, all on CUDA; timings as JSON.

    python tools/gpu_check.py                       # on a CUDA machine; $OUT/gpu_check.json when $OUT is set
    python tools/gpu_check.py --device cpu --tiny   # the same steps, small, on CPU (gloo): tests the script

Data: the CIFAR-10 test split from $EDITLAB_DATA / --data-root, else the embedded 1,000-image sample
(then the protocol's held-out set and the training set are that sample). Every step runs even when
an earlier one fails; its error goes into the JSON and the exit status is 1.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from editcore import (EditSession, EditSettings, ImageRef, SharedModel, draw_edits, load_cifar10,  # noqa: E402
                      load_sample, resolve_data_root)
from editcore.core.heldout import native_bfloat16  # noqa: E402

BASELINE = ROOT / "assets" / "resnet20_baseline.safetensors"


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def app_step(device: torch.device, data_root: str | None, n_edits: int) -> dict:
    """SharedModel + EditSession as the app runs them: load (held-out cache), apply/undo edits, and the
    mixed-precision predictions against float32 on the same device."""
    heldout = load_cifar10("test", data_root) if data_root else load_sample()
    start = time.perf_counter()
    shared = SharedModel("baseline", BASELINE, heldout, device)
    synchronize(device)
    load_s = time.perf_counter() - start
    exact = SharedModel("float32", BASELINE, heldout, device, mixed_precision=False)
    session = EditSession(shared)
    rows, targets = draw_edits(heldout, n_edits + 1, seed=0, targets="other")
    reports, equal = [], torch.equal(shared.base_heldout_probs.argmax(1), exact.base_heldout_probs.argmax(1))
    for row, target in zip(rows, targets):
        start = time.perf_counter()
        report = session.apply(heldout.images[row : row + 1], [target], EditSettings(), [ImageRef("test", row)])
        synchronize(device)
        reports.append((time.perf_counter() - start, report.seconds, report.evaluation_seconds))
        if report.applied:
            equal &= torch.equal(session.heldout_probs.argmax(1),
                                 exact.heldout_probabilities(shared.default_layers, session.params).argmax(1))
            session.undo()
    timed = reports[1:]  # the first one warms up (cuDNN autotune, allocator)
    return {
        "heldout_images": len(heldout), "mixed_precision": shared.mixed_precision, "load_s": round(load_s, 3),
        "edits": len(timed), "apply_p50_s": round(statistics.median(t[0] for t in timed), 4),
        "edit_p50_s": round(statistics.median(t[1] for t in timed), 4),
        "reevaluation_p50_s": round(statistics.median(t[2] for t in timed), 4),
        "predictions_equal_float32": bool(equal),
        "float32_convolutions_use_tf32": bool(torch.backends.cudnn.allow_tf32) if device.type == "cuda" else None,
    }


def run(command: list[str], timeout: int) -> tuple[float, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE")}
    start = time.perf_counter()
    proc = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} exited {proc.returncode}:\n{proc.stderr[-2000:]}")
    return time.perf_counter() - start, proc.stdout


def protocol_step(device: torch.device, data_root: str | None, n_edits: int, heldout_size: int, timeout: int) -> dict:
    """evaluate-edits on the device: auto precision, float32, and under torchrun (1 process; nccl on CUDA)."""
    common = ["-m", "editcore", "evaluate-edits", "--checkpoint", str(BASELINE), "--device", device.type,
              "--n-edits", str(n_edits), "--seed", "0", "--heldout-size", str(heldout_size), "--json"]
    if data_root:
        common += ["--data-root", data_root]
    torchrun = ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node=1"]
    variants = {"auto": ([], []), "float32": ([], ["--precision", "float32"]), "torchrun_1proc": (torchrun, [])}
    out, records = {}, {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, (launcher, extra) in variants.items():
            path = Path(tmp) / f"{name}.json"
            wall, stdout = run([sys.executable, *launcher, *common, *extra, "--records", str(path)], timeout)
            summary = json.loads([line for line in stdout.splitlines() if line.startswith("{")][-1])
            records[name] = [{k: v for k, v in r.items() if k != "seconds"} for r in json.loads(path.read_text())]
            out[name] = {"wall_s": round(wall, 2), "loop_s": summary["seconds"],
                         "s_per_edit": round(summary["seconds"] / summary["n_edits"], 4), "precision": summary["precision"],
                         "world_size": summary["world_size"], "drawdown": summary["drawdown"],
                         "n_heldout": summary["n_heldout"]}
    out["records_equal_auto_vs_float32"] = records["auto"] == records["float32"]
    out["records_equal_auto_vs_torchrun"] = records["auto"] == records["torchrun_1proc"]
    return out


def training_step(device: torch.device, data_root: str | None, arch: str, train_subset: int, batch_size: int,
                  timeout: int) -> dict:
    """One epoch of editable training (the paper's objective) through the CLI."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "epoch.safetensors"
        command = [sys.executable, "-m", "editcore", "train", "--arch", arch, "--epochs", "1", "--editable",
                   "--batch-size", str(batch_size), "--device", device.type, "--out", str(out)]
        if train_subset:
            command += ["--train-subset", str(train_subset)]
        if data_root:
            command += ["--data-root", data_root]
        wall, _ = run(command, timeout)
        card = json.loads(out.with_suffix(".json").read_text())
    steps = card["data"]["n_train"] // batch_size
    epoch_s = card["history"][0]["seconds"]
    return {"arch": arch, "n_train": card["data"]["n_train"], "batch_size": batch_size, "steps": steps,
            "epoch_s": epoch_s, "s_per_step": round(epoch_s / max(1, steps), 4), "wall_s": round(wall, 2),
            "test_accuracy": card["test_accuracy"]}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--tiny", action="store_true", help="small sizes, for a CPU test of the script")
    parser.add_argument("--data-root", default=os.environ.get("EDITLAB_DATA"))
    parser.add_argument("--arch", default=None, help="training architecture (default resnet18, resnet20 with --tiny)")
    parser.add_argument("--timeout", type=int, default=300, help="seconds per subprocess")
    args = parser.parse_args()
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("CUDA is not available here: run with --device cpu --tiny to test the script")
    data_root = args.data_root if resolve_data_root(args.data_root) is not None else None
    tiny = args.tiny
    result = {
        "device": str(device) + (f" ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else ""),
        "torch": torch.__version__, "native_bfloat16": native_bfloat16(device), "tiny": tiny,
        "data": "cifar10" if data_root else "embedded sample", "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    steps = {
        "app": lambda: app_step(device, data_root, 3 if tiny else 10),
        "protocol": lambda: protocol_step(device, data_root, 3 if tiny else 50, 200 if tiny else 0, args.timeout),
        "training": lambda: training_step(device, data_root, args.arch or ("resnet20" if tiny else "resnet18"),
                                          200 if tiny else 0, 50 if tiny else 128, args.timeout),
    }
    failed = False
    for name, step in steps.items():
        start = time.perf_counter()
        try:
            result[name] = step()
        except Exception:  # noqa: BLE001 - report and go on: device time is short
            result[name] = {"error": traceback.format_exc(limit=3)}
            failed = True
        result[name]["step_s"] = round(time.perf_counter() - start, 2)
        print(name, json.dumps(result[name]), flush=True)
    text = json.dumps(result, indent=2)
    if os.environ.get("OUT"):
        Path(os.environ["OUT"], "gpu_check.json").write_text(text + "\n")
    print(text)
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
