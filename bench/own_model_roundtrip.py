"""The page's apply round trip on your own model: a torchvision ResNet-18 at 224 px on a 1,000-image folder.

    .venv/bin/python bench/own_model_roundtrip.py [--edits 3] [--images N] [--threads 1] [--no-write]

Writes a synthetic ImageFolder (10 classes, N JPEGs of 320x240 noise with a class tint) and a random-init
10-class ResNet-18 (safetensors) to a temporary folder, starts
`python app.py --model torchvision:resnet18 --weights W --images DIR` in a subprocess (the split-point cache on:
a ResNet runs as a chain of stages), and times /apply_edit through gradio_client as bench/app_roundtrip.py does:
the page's default edit (the local editor on layer3.0.conv1) of misclassified images, /undo between edits,
the first edit not counted (it also waits for the anchor subspace the server computes at start). The
weights are random: timings do not depend on them, beyond how many steps an edit takes (reported).
Writes the "own-model" section of docs/PERFORMANCE.md.
"""
from __future__ import annotations

import argparse
import os
import shlex
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from app_roundtrip import cpu_seconds, start_app  # bench/ is on sys.path when run as a script
from report import REPORT, busy, machine, write_section

ROOT = Path(__file__).resolve().parent.parent
CLASSES = 10
WHERE_THE_TIME_GOES = (
    "Server CPU time is the app process's CPU time during the call, the work itself; with the cores shared by other "
    "processes, wall time is that much longer. Where the time goes: the re-evaluation of the held-out set through "
    "layer3, layer4 and fc at 224 px (its cached layer3 inputs are 128 x 28 x 28 floats, 401 KB, per image), and "
    "the edit (local editor: Polyak steps on the image and 8 crop/flip copies through the same stages). Start-up "
    "decodes the folder and runs every image through stem, layer1 and layer2 once.")


def write_inputs(folder: Path, n_images: int) -> tuple[Path, Path]:
    import torch
    from PIL import Image
    from safetensors.torch import save_file
    from torchvision.models import resnet18

    rng = np.random.default_rng(0)
    images = folder / "images"
    for i in range(n_images):
        label = i % CLASSES
        (images / f"class{label}").mkdir(parents=True, exist_ok=True)
        pixels = rng.integers(0, 256, (240, 320, 3), dtype=np.uint8)
        pixels[..., label % 3] //= 2
        Image.fromarray(pixels).save(images / f"class{label}" / f"{i:05d}.jpg", quality=90)
    torch.manual_seed(0)
    weights = folder / "resnet18.safetensors"
    save_file({k: v.contiguous() for k, v in resnet18(num_classes=CLASSES).state_dict().items()}, str(weights))
    return images, weights


def measure(url: str, model: str, n_edits: int, pid: int) -> dict:
    from gradio_client import Client

    client = Client(url, verbose=False, download_files=False)
    times, cpu, edit_s, eval_s, steps, reports = [], [], [], [], [], []
    index = 0
    while len(times) < n_edits + 1:
        _, info, _, target = client.predict("test", index, api_name="/select_image")
        index += 1
        if "misclassified" not in info:
            continue
        started, cpu_started = time.perf_counter(), cpu_seconds(pid)
        report = client.predict(target, model, None, None, None, None, 0, api_name="/apply_edit")[0]
        times.append(time.perf_counter() - started)
        cpu.append(cpu_seconds(pid) - cpu_started if cpu_started is not None else float("nan"))
        edit_s.append(report["seconds"])
        eval_s.append(report["evaluation_seconds"])
        steps.append(report["steps"])
        reports.append(report)
        client.predict(api_name="/undo")
    return {"n": n_edits, "n_heldout": reports[0]["n_heldout"], "warmup": times[0], "p50": statistics.median(times[1:]),
            "max": max(times[1:]), "cpu_p50": statistics.median(cpu[1:]), "edit_p50": statistics.median(edit_s[1:]),
            "eval_p50": statistics.median(eval_s[1:]), "steps": steps[1:],
            "succeeded": sum(r["success"] for r in reports[1:]), "layers": reports[0]["layers"]}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--edits", type=int, default=3, help="timed edits (after one warm-up)")
    parser.add_argument("--images", type=int, default=1000, help="images in the folder (a seeded 20%% become anchors)")
    parser.add_argument("--threads", type=int, default=1, help="app.py --threads (and one replica)")
    parser.add_argument("--no-write", action="store_true", help="print only; leave docs/PERFORMANCE.md alone")
    args = parser.parse_args()
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory() as folder:
        images, weights = write_inputs(Path(folder), args.images)
        started = time.perf_counter()
        process, url = start_app([], None, Path(folder) / "app.log",
                                 ["--model", "torchvision:resnet18", "--weights", str(weights), "--images", str(images),
                                  "--threads", str(args.threads), "--replicas", "1"])
        ready = time.perf_counter() - started
        try:
            result = measure(url, "resnet18", args.edits, process.pid)
        finally:
            process.terminate()
            process.wait(timeout=30)
        log = (Path(folder) / "app.log").read_text()
    load_after = os.getloadavg()
    print(log)
    lines = [
        "## own-model",
        "",
        "Your own model: `python app.py --model torchvision:resnet18 --weights W.safetensors --images DIR` with a",
        f"random-init 10-class ResNet-18 at 224 px (resize 256, centre crop 224) on a synthetic {args.images:,}-image",
        "folder (320x240 JPEGs); a seeded 20% are the anchors, the rest browse and held-out set. The split-point",
        "cache is on (a ResNet runs as a chain of stages): one /apply_edit re-runs layer3, layer4 and fc on the",
        "held-out set. Round trip through gradio_client as in the app section: the page's default edit (local",
        f"editor, {result['layers']}), /undo between edits, one warm-up edit not counted.",
        "",
        f"Command: `.venv/bin/python bench/own_model_roundtrip.py {shlex.join(sys.argv[1:])}`",
        "",
        f"Measured {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())} on {machine()}, app.py --threads {args.threads}; load average (1 min) {load_before[0]:.1f} before, "
        f"{load_after[0]:.1f} after{' (other processes shared the cores)' if busy(load_before, load_after) else ''}.",
        "",
        "| held-out images | start to first page | warm-up edit | edits | round trip p50 | max | server CPU p50 "
        "| edit p50 | re-evaluation p50 | steps |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|",
        f"| {result['n_heldout']:,} | {ready:.0f} s | {result['warmup']:.1f} s | {result['n']} "
        f"({result['succeeded']} reached the target) | {result['p50']:.1f} s | {result['max']:.1f} s "
        f"| {result['cpu_p50']:.1f} s | {result['edit_p50']:.1f} s | {result['eval_p50']:.1f} s | {result['steps']} |",
        "",
        WHERE_THE_TIME_GOES,
    ]
    text = "\n".join(lines) + "\n"
    print(text)
    if not args.no_write:
        write_section("own-model", text)
        print(f"wrote the own-model section of {REPORT.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
