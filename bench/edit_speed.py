"""Edit speed on CPU with the default model: one edit to success, and re-scoring 10,000 held-out images
after an edit through the cached suffix (HeldOutEvaluator.predict) vs the whole model (predict_full).

    .venv/bin/python bench/edit_speed.py [--checkpoint PATH] [--edits 30] [--repeats 5] [--no-write]

Uses assets/resnet20_baseline.safetensors (or --checkpoint) when it exists, else a randomly initialised
ResNet-20, and the CIFAR-10 test split from $EDITLAB_DATA / --data-root (else the embedded sample tiled
to 10,000 images). Prints every figure and writes the "editcore" section of docs/PERFORMANCE.md.

Everything is timed twice: wall-clock with torch's default thread count (the figure the targets are
judged on), and with one thread, where the process's CPU time is the work itself, unaffected by other
processes on a busy machine (on an idle machine a one-thread wall time equals it).
"""
from __future__ import annotations

import argparse
import copy
import os
import shlex
import statistics
import sys
import time
from pathlib import Path

import torch

from report import REPORT, machine, write_section  # bench/ is on sys.path when run as a script

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from editcore import (DEFAULT_ARCH, EditableModel, HeldOutEvaluator, create_editor, create_model,  # noqa: E402
                      default_editable_prefix, draw_edits, edit, load_checkpoint, load_cifar10, load_sample,
                      normalize, resolve_data_root)

CHECKPOINT = ROOT / "assets" / f"{DEFAULT_ARCH}_baseline.safetensors"
HELDOUT_SIZE = 10_000
TARGETS = {"edit_ms": 30.0, "cached_s": 1.0, "speedup": 3.0}


def shown(path: Path) -> str:
    path = path.resolve()
    return str(path.relative_to(ROOT)) if path.is_relative_to(ROOT) else str(path)


def load_model(path: Path, notes: list[str]):
    if path.exists():
        ckpt = load_checkpoint(path)
        notes.append(f"model: {shown(path)} ({ckpt.card['arch']}, test accuracy {ckpt.card.get('test_accuracy', '?')})")
        return ckpt.model, ckpt.card.get("editable_prefix") or default_editable_prefix(ckpt.card["arch"])
    torch.manual_seed(0)
    notes.append(f"model: randomly initialised {DEFAULT_ARCH} ({shown(path)} does not exist)")
    return create_model(DEFAULT_ARCH).eval(), default_editable_prefix(DEFAULT_ARCH)


def load_heldout(data_root, notes: list[str]):
    if resolve_data_root(data_root) is not None:
        test = load_cifar10("test", data_root)
        notes.append(f"held-out: the CIFAR-10 test split, {len(test)} images")
        return test
    sample = load_sample()
    reps = -(-HELDOUT_SIZE // len(sample))
    tiled = sample.subset(torch.arange(len(sample)).repeat(reps)[:HELDOUT_SIZE])
    notes.append(f"held-out: no data root, so the embedded sample ({len(sample)} images) tiled to {len(tiled)}")
    return tiled


def timed(fn, repeats: int) -> tuple[float, float, object]:
    """(median wall seconds, median CPU seconds of this process, last result) over `repeats` calls."""
    wall, cpu, out = [], [], None
    for _ in range(repeats):
        w, c = time.perf_counter(), time.process_time()
        out = fn()
        wall.append(time.perf_counter() - w)
        cpu.append(time.process_time() - c)
    return statistics.median(wall), statistics.median(cpu), out


def time_edits(editable, editor, images, rows, targets, max_steps) -> dict:
    """Edit each (row, target) from the base model; the first call only warms up."""
    results, cpu = [], []
    for row, target in zip(rows, targets):
        c = time.process_time()
        results.append(edit(editable, normalize(images[row : row + 1]), torch.tensor([target]), editor, max_steps))
        cpu.append(time.process_time() - c)
    results, cpu = results[1:], cpu[1:]
    done = [i for i, r in enumerate(results) if r.success]
    moved = [results[i] for i in done if results[i].steps > 0]
    nan = float("nan")
    return {
        "results": results, "n": len(results), "succeeded": len(done), "moved": moved,
        "wall_ms": statistics.median(results[i].seconds for i in done) * 1e3 if done else nan,
        "cpu_ms": statistics.median(cpu[i] for i in done) * 1e3 if done else nan,
        "steps": statistics.median(results[i].steps for i in done) if done else nan,
        "step_ms": statistics.median(r.seconds / r.steps for r in moved) * 1e3 if moved else nan,
    }


def multiply_adds(editable: EditableModel, image: torch.Tensor) -> tuple[int, int]:
    """Multiply-adds of conv and linear layers for one image: (stages from the split on, whole model)."""
    counts = {"n": 0}

    def hook(module, inputs, output):
        if isinstance(module, torch.nn.Conv2d):
            counts["n"] += output.numel() * module.in_channels // module.groups * module.kernel_size[0] * module.kernel_size[1]
        else:
            counts["n"] += output.numel() * module.in_features

    handles = [m.register_forward_hook(hook) for m in editable.model.modules()
               if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear))]
    with torch.no_grad():
        features = editable.features(image)
        before_split = counts["n"]
        editable.logits_from_features(features)
    for handle in handles:
        handle.remove()
    return counts["n"] - before_split, counts["n"]


def load_average() -> str:
    return ", ".join(f"{x:.1f}" for x in os.getloadavg())


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", type=Path, default=CHECKPOINT)
    parser.add_argument("--edits", type=int, default=30, help="edits to time (random targets)")
    parser.add_argument("--max-steps", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=5, help="timed re-evaluations of each kind (default threads)")
    parser.add_argument("--repeats-1thread", type=int, default=2, help="the same with one thread")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--data-root", default=None)
    parser.add_argument("--no-write", action="store_true", help="print only; leave docs/PERFORMANCE.md alone")
    args = parser.parse_args()

    load_before = load_average()
    threads = torch.get_num_threads()
    notes: list[str] = []
    model, prefix = load_model(args.checkpoint, notes)
    editable = EditableModel(model, prefix)
    heldout_set = load_heldout(args.data_root, notes)
    editor = create_editor("rmsprop")
    lr = editor.hyperparameters()["lr"]
    for note in notes:
        print(note)

    # One edit to success: the whole call a user makes (the image's features, then editor steps).
    rows, targets = draw_edits(heldout_set, args.edits + 1, args.seed)
    edits = time_edits(editable, editor, heldout_set.images, rows, targets, args.max_steps)
    torch.set_num_threads(1)
    edits_1 = time_edits(editable, editor, heldout_set.images, rows, targets, args.max_steps)
    torch.set_num_threads(threads)
    for label, e in ((f"{threads} threads", edits), ("1 thread", edits_1)):
        print(f"edit, {label} (rmsprop lr {lr:g}, max {args.max_steps} steps): {e['succeeded']}/{e['n']} succeeded, "
              f"median {e['steps']:g} steps; median {e['wall_ms']:.1f} ms wall ({e['cpu_ms']:.1f} ms CPU) to success, "
              f"{e['step_ms']:.1f} ms wall per step")

    # Re-evaluation after an edit, with the params of the first edit that needed steps.
    start = time.perf_counter()
    evaluator = HeldOutEvaluator(editable, heldout_set.images, heldout_set.labels)
    cache_s = time.perf_counter() - start
    n = len(evaluator.labels)
    params = (edits["moved"] or edits["results"])[0].params
    evaluator.predict(params)  # warm-up
    cached_s, cached_cpu, cached = timed(lambda: evaluator.predict(params), args.repeats)
    f32_s, f32_cpu, f32 = cached_s, cached_cpu, cached
    if evaluator.mixed_precision:  # the float32 floor too: issue 24's yardstick for 10,000 images
        float32 = copy.copy(evaluator)
        float32.mixed_precision = False
        float32.predict(params)  # warm-up
        f32_s, f32_cpu, f32 = timed(lambda: float32.predict(params), args.repeats)
    full_s, full_cpu, full = timed(lambda: evaluator.predict_full(params), args.repeats)
    torch.set_num_threads(1)
    _, cached_cpu_1, cached_1 = timed(lambda: evaluator.predict(params), args.repeats_1thread)
    _, full_cpu_1, _ = timed(lambda: evaluator.predict_full(params), args.repeats_1thread)
    torch.set_num_threads(threads)
    identical = torch.equal(cached, full) and torch.equal(cached, cached_1) and torch.equal(cached, f32)
    speedup, speedup_1 = full_s / cached_s, full_cpu_1 / cached_cpu_1
    print(f"building the cache ({n} images, once per model): {cache_s:.2f} s")
    print(f"re-evaluate {n} images after an edit, {threads} threads (medians of {args.repeats}): cached suffix "
          f"{cached_s:.3f} s wall ({cached_cpu:.2f} s CPU), full model {full_s:.3f} s wall ({full_cpu:.2f} s CPU); "
          f"full / cached = {speedup:.2f}x")
    print(f"re-evaluate {n} images, 1 thread (medians of {args.repeats_1thread}): cached suffix {cached_cpu_1:.3f} s CPU, "
          f"full model {full_cpu_1:.3f} s CPU; full / cached = {speedup_1:.2f}x")
    print(f"cached suffix in {evaluator.precision}; in float32: {f32_s:.3f} s wall ({f32_cpu:.2f} s CPU)")
    print(f"cached and full predictions identical: {identical}")
    suffix_macs, full_macs = multiply_adds(editable, normalize(heldout_set.images[:1]))
    suffix_gflops = 2 * suffix_macs * n / cached_cpu_1 / 1e9
    print(f"work per image: {suffix_macs / 1e6:.1f} M multiply-adds after the split, {full_macs / 1e6:.1f} M in all; "
          f"the cached suffix ran at {suffix_gflops:.0f} GFLOP/s on one thread")

    rows_md = [
        ("one edit to success, p50", f"{edits['wall_ms']:.1f} ms", f"{edits_1['cpu_ms']:.1f} ms",
         f"<= {TARGETS['edit_ms']:g} ms", edits["wall_ms"] <= TARGETS["edit_ms"]),
        (f"re-evaluate {n} images, cached suffix ({evaluator.precision})", f"{cached_s:.3f} s", f"{cached_cpu_1:.3f} s",
         f"<= {TARGETS['cached_s']:g} s", cached_s <= TARGETS["cached_s"]),
        *([(f"re-evaluate {n} images, cached suffix (float32)", f"{f32_s:.3f} s", "", "", None)]
          if evaluator.mixed_precision else []),
        (f"re-evaluate {n} images, full model", f"{full_s:.3f} s", f"{full_cpu_1:.3f} s", "", None),
        ("full / cached", f"{speedup:.2f}x", f"{speedup_1:.2f}x", f">= {TARGETS['speedup']:g}x", speedup >= TARGETS["speedup"]),
    ]
    for name, wall, cpu, target, met in rows_md:
        verdict = "" if met is None else ("met" if met else "NOT met")
        print(f"  {name}: {wall} wall, {threads} threads" + (f"; {cpu} CPU, 1 thread" if cpu else "")
              + (f" (target {target}: {verdict})" if target else ""))
    if not identical:
        print("ERROR: cached and full predictions differ")

    table = "\n".join(f"| {name} | {wall} | {cpu} | {target} | {'' if met is None else ('met' if met else '**not met**')} |"
                      for name, wall, cpu, target, met in rows_md)
    command = ("python bench/edit_speed.py " + shlex.join(sys.argv[1:])).strip()
    if args.data_root is None and os.environ.get("EDITLAB_DATA"):
        command = f"EDITLAB_DATA={shlex.quote(os.environ['EDITLAB_DATA'])} {command}"
    text = f"""## editcore

Command: `{command}` ({time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())})
Machine: {machine()}, torch {torch.__version__} ({threads} threads by default), device cpu. Load average (1, 5, 15 min) before: {load_before}; after: {load_average()}.
{chr(10).join('- ' + note for note in notes)}

| measure | wall, {threads} threads | CPU time, 1 thread | target (wall) | |
|---|---|---|---|---|
{table}

- Edits: {edits['n']} edits, random targets (seed {args.seed}), RMSProp lr {lr:g}, at most {args.max_steps} steps.
  {threads} threads: {edits['succeeded']} succeeded, median {edits['steps']:g} steps, {edits['step_ms']:.1f} ms wall per step.
  1 thread: {edits_1['succeeded']} succeeded, {edits_1['wall_ms']:.1f} ms wall, {edits_1['step_ms']:.1f} ms wall per step.
  An edit's time includes computing the image's features up to the editable stage.
- Re-evaluation: wall medians of {args.repeats}, one-thread CPU medians of {args.repeats_1thread}. Cached and full
  predictions identical{' (and the float32 ones)' if evaluator.mixed_precision else ''}: {identical}. Building the cache (once per model) took {cache_s:.2f} s.
- Work: {suffix_macs / 1e6:.1f} M multiply-adds per image from the split on ({full_macs / 1e6:.1f} M for the whole
  model), so re-scoring {n} images after an edit is {2 * suffix_macs * n / 1e9:.0f} GFLOP of convolution ({evaluator.precision}),
  which ran at {suffix_gflops:.0f} GFLOP/s on one thread. At that rate, {TARGETS['cached_s']:g} s for {n} images needs
  {2 * suffix_macs * n / 1e9 / TARGETS['cached_s'] / suffix_gflops:.1f} such cores working in parallel without loss.
- Wall-clock figures depend on what else runs: with a load average above the core count, other
  processes take most of the CPU, and two threads that wait on each other lose more than one thread does.
  The one-thread CPU column is the work itself; an idle machine runs it in about that time on one core.

"""
    if not args.no_write:
        write_section("editcore", text)
        print(f"wrote the editcore section of {shown(REPORT)}")
    return 0 if identical else 1


if __name__ == "__main__":
    raise SystemExit(main())
