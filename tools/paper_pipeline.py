"""The whole measured pipeline as one job graph: train, build CIFAR-10-NAE, tune editors, evaluate.

Every job is a `python -m editcore ...` command; independent jobs run in parallel (on one GPU they
share it). Results land in WORK (checkpoints, per-run JSON, logs) and, after every finished job,
are packed into OUT/results.tar so that a run stopped at its time limit still returns what it made.

    python tools/paper_pipeline.py --scale full --work /tmp/work --out $OUT --deadline-s 520
    python tools/paper_pipeline.py --scale tiny --work runs/pipeline_tiny   # CPU dry run (~minutes)
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tarfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

EDITORS = ("gd", "momentum", "rmsprop", "adam")
LR_GRID = {
    "gd": (1e-3, 3e-3, 1e-2, 3e-2, 1e-1),
    "momentum": (3e-4, 1e-3, 3e-3, 1e-2, 3e-2),
    "rmsprop": (1e-4, 3e-4, 1e-3, 3e-3),
    "adam": (1e-4, 3e-4, 1e-3, 3e-3),
}
TUNE_SEED, EVAL_SEED = 1000, 0


@dataclass
class Job:
    name: str
    command: Callable[[], list[str]] | list[str]
    deps: tuple[str, ...] = ()
    priority: int = 50  # lower runs first
    min_seconds: float = 20  # don't start it unless this much time is left
    json_out: bool = False
    output: str = ""  # with --resume, a job whose output exists counts as done
    state: str = "waiting"
    started: float = 0.0
    ended: float = 0.0
    proc: subprocess.Popen | None = field(default=None, repr=False)


def scale_settings(scale: str) -> dict:
    if scale == "full":
        return dict(base_epochs=40, base_budget=190, filter_epochs=30, filter_budget=150, ed_epochs=10, ed_budget=170,
                    mr_budget=150, n_edits=1000, n_tune=100, n_finetune=300, rn18=True, subset=[], parallel=12, grid=9, heldout=[])
    return dict(base_epochs=1, base_budget=0, filter_epochs=1, filter_budget=0, ed_epochs=1, ed_budget=0, mr_budget=0,
                n_edits=6, n_tune=4, n_finetune=3, rn18=False, subset=["--train-subset", "1024"], parallel=3, grid=1,
                heldout=["--heldout-size", "300"])


def build_jobs(work: Path, s: dict, device: str) -> tuple[dict[str, Job], dict]:
    py = [sys.executable, "-m", "editcore"]
    ck = lambda name: str(work / "ckpt" / f"{name}.safetensors")  # noqa: E731
    dev = ["--device", device]
    nae = str(work / "nae" / "cifar10_nae.npz")
    chosen: dict = {"lr": {}}
    jobs: dict[str, Job] = {}

    def add(job: Job):
        jobs[job.name] = job

    def train(name, arch, epochs, budget, extra=(), deps=(), priority=50, seed=0):
        add(Job(f"train-{name}", py + ["train", "--arch", arch, "--epochs", str(epochs), "--seed", str(seed),
                                       "--time-budget-s", str(budget), "--out", ck(name), *s["subset"], *dev, *extra],
                deps, priority, min_seconds=max(30, budget * 0.6), output=ck(name)))

    # 1. baseline (the shipped default), filter models for NAE, paper-scale ResNet-18
    wide = ["--batch-size", "256"]  # lr scales with it (0.2); halves the launch-bound step count on a GPU
    train("resnet20_baseline", "resnet20", s["base_epochs"], s["base_budget"], wide, priority=0)
    filters = [("filter_resnet32_s11", "resnet32", 11), ("filter_vgg8_s12", "vgg8", 12), ("filter_resnet20_s13", "resnet20", 13)]
    for name, arch, seed in filters:
        train(name, arch, s["filter_epochs"], s["filter_budget"], wide, priority=5, seed=seed)
    # 2. editable training, fine-tuned from the baseline (paper settings; variants say what else we tried)
    finetune = ["--editable", "--init", ck("resnet20_baseline"), "--lr", "1e-4", "--weight-decay", "0", "--warmup-epochs", "0.2"]
    base_dep = ("train-resnet20_baseline",)
    train("resnet20_editable", "resnet20", s["ed_epochs"], s["ed_budget"], finetune, base_dep, priority=1)
    train("resnet20_editable_c0.1", "resnet20", s["ed_epochs"], s["ed_budget"], finetune + ["--c-edit", "0.1", "--c-loc", "0.1"],
          base_dep, priority=30)
    train("resnet20_editable_first_order", "resnet20", s["ed_epochs"], s["ed_budget"], finetune + ["--first-order"],
          base_dep, priority=31)
    # 3. CIFAR-10-NAE, then match-ranks editable training
    add(Job("build-nae", py + ["build-nae", "--filters", *[ck(f[0]) for f in filters], "--reference", ck("resnet20_baseline"),
                               "--out", nae, *dev], tuple(f"train-{f[0]}" for f in filters) + base_dep, priority=2, output=nae))
    train("resnet20_matchranks", "resnet20", s["ed_epochs"], s["mr_budget"],
          finetune + ["--edit-targets", "match-ranks", "--nae", nae], base_dep + ("build-nae",), priority=3)

    def evaluate(name, model, extra, deps=(), priority=50, n=None, min_seconds=25):
        add(Job(name, lambda: py + ["evaluate-edits", "--checkpoint", ck(model), "--json", *dev, *s["heldout"],
                                   *(extra() if callable(extra) else extra)],
                deps + (f"train-{model}",), priority, min_seconds, json_out=True, output=str(work / "evals" / f"{name}.json")))

    # 4. editor learning rates: the smallest grid value with >= 99% success on tuning edits (another seed)
    for editor in EDITORS:
        for lr in LR_GRID[editor][: s["grid"]]:
            evaluate(f"tune-{editor}-{lr:g}", "resnet20_baseline",
                     ["--editor", editor, "--lr", str(lr), "--n-edits", str(s["n_tune"]), "--seed", str(TUNE_SEED)], priority=10)

    def tuned(editor):
        def lr():
            if editor not in chosen["lr"]:
                runs = [(g, read_json(work / "evals" / f"tune-{editor}-{g:g}.json")) for g in LR_GRID[editor][: s["grid"]]]
                runs = [(g, r) for g, r in runs if r]
                ok = [g for g, r in runs if r["success_rate"] >= 0.99]
                chosen["lr"][editor] = min(ok) if ok else max(runs, key=lambda gr: gr[1]["success_rate"])[0]
            return chosen["lr"][editor]
        return lr

    tune_deps = lambda editor: tuple(f"tune-{editor}-{g:g}" for g in LR_GRID[editor][: s["grid"]])  # noqa: E731
    n = ["--n-edits", str(s["n_edits"]), "--seed", str(EVAL_SEED)]
    for editor in EDITORS:
        args = lambda e=editor: ["--editor", e, "--lr", str(tuned(e)())] + n  # noqa: E731
        evaluate(f"eval-baseline-{editor}", "resnet20_baseline", args, tune_deps(editor), priority=12 if editor == "rmsprop" else 20)
        evaluate(f"eval-editable-{editor}-tuned-lr", "resnet20_editable", args, tune_deps(editor),
                 priority=13 if editor == "rmsprop" else 21)
    evaluate("eval-editable-rmsprop-learned", "resnet20_editable", ["--editor", "rmsprop"] + n, priority=11)
    for variant in ("resnet20_editable_c0.1", "resnet20_editable_first_order", "resnet20_matchranks"):
        evaluate(f"eval-{variant}-rmsprop-learned", variant, ["--editor", "rmsprop"] + n, priority=40)
    # 5. NAE protocol: edit to the true label of NAE images, drawdown on the held-out half of the test set
    nae_args = ["--protocol", "nae", "--nae", nae] + n
    evaluate("nae-baseline-rmsprop", "resnet20_baseline", lambda: ["--editor", "rmsprop", "--lr", str(tuned("rmsprop")())] + nae_args,
             tune_deps("rmsprop") + ("build-nae",), priority=14)
    for model in ("resnet20_editable", "resnet20_matchranks"):
        evaluate(f"nae-{model.split('_')[1]}-rmsprop-learned", model, ["--editor", "rmsprop"] + nae_args, ("build-nae",), priority=14)
    # 6. the classic fixes on the same seeded edits (random targets, then NAE)
    for protocol, extra, deps in (("random", [], ()), ("nae", ["--protocol", "nae", "--nae", nae], ("build-nae",))):
        for fixer, fx in (("lookup-exact", []), ("lookup-nn", ["--lookup-space", "pixel"])):
            evaluate(f"fix-{protocol}-{fixer}", "resnet20_baseline", ["--fixer", fixer] + fx + n + extra, deps, priority=25)
        evaluate(f"fix-{protocol}-finetune", "resnet20_baseline",
                 ["--fixer", "finetune", "--n-edits", str(s["n_finetune"]), "--seed", str(EVAL_SEED)] + extra, deps,
                 priority=26, min_seconds=60)
    # 7. the paper's own CIFAR model, when a GPU makes it affordable
    if s["rn18"]:
        train("resnet18_baseline", "resnet18", 30, 200, wide, priority=8)
        train("resnet18_editable", "resnet18", 5, 140,
              ["--editable", "--init", ck("resnet18_baseline"), "--lr", "1e-4", "--weight-decay", "0", "--warmup-epochs", "0.2"],
              ("train-resnet18_baseline",), priority=9)
        for model, lr in (("resnet18_baseline", ["--lr", "1e-3"]), ("resnet18_editable", [])):
            evaluate(f"eval-{model}-rmsprop", model, ["--editor", "rmsprop", *lr, "--n-edits", "500", "--seed", str(EVAL_SEED)],
                     priority=35, min_seconds=40)
    return jobs, chosen


def read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text().strip().splitlines()[-1])
    except (OSError, ValueError, IndexError):
        return None


def pack(work: Path, out: Path | None) -> None:
    if out is None:
        return
    out.mkdir(parents=True, exist_ok=True)
    tmp = out / "results.tar.tmp"
    with tarfile.open(tmp, "w") as tar:
        for path in sorted(work.rglob("*")):
            big = path.suffix == ".safetensors" and path.stat().st_size > 8_000_000  # ResNet-18 weights stay behind
            if path.is_file() and not big:
                tar.add(path, arcname=str(path.relative_to(work)))
    tmp.replace(out / "results.tar")


def run(jobs: dict[str, Job], chosen: dict, work: Path, out: Path | None, deadline: float, parallel: int,
        resume: bool = False) -> None:
    t0 = time.time()
    for sub in ("ckpt", "evals", "logs", "nae"):
        (work / sub).mkdir(parents=True, exist_ok=True)
    for job in jobs.values():
        if resume and job.output and Path(job.output).exists():
            job.state = "done"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}

    def status():
        summary = {"elapsed_s": round(time.time() - t0, 1), "chosen_lr": chosen["lr"],
                   "jobs": {j.name: {"state": j.state, "seconds": round((j.ended or time.time()) - j.started, 1) if j.started else None,
                                     "command": j.command if isinstance(j.command, list) else None} for j in jobs.values()}}
        (work / "pipeline_status.json").write_text(json.dumps(summary, indent=1))

    while True:
        now = time.time() - t0
        for job in jobs.values():
            if job.state == "running" and job.proc.poll() is not None:
                job.ended, job.state = time.time(), "done" if job.proc.returncode == 0 else f"failed({job.proc.returncode})"
                print(f"[{now:6.1f}s] {job.name}: {job.state} in {job.ended - job.started:.1f}s", flush=True)
                if job.json_out and job.state == "done":
                    result = read_json(work / "logs" / f"{job.name}.out")
                    (work / "evals" / f"{job.name}.json").write_text(json.dumps(result) + "\n")
                status()
                pack(work, out)
        for job in jobs.values():
            if job.state == "waiting" and any(jobs[d].state not in ("waiting", "running", "done") for d in job.deps):
                job.state = "skipped"
        running = [j for j in jobs.values() if j.state == "running"]
        ready = sorted((j for j in jobs.values() if j.state == "waiting" and all(jobs[d].state == "done" for d in j.deps)),
                       key=lambda j: j.priority)
        for job in ready[: max(0, parallel - len(running))]:
            if deadline - now < job.min_seconds:
                job.state = "no-time"
                continue
            command = job.command() if callable(job.command) else job.command
            job.command = command
            job.started, job.state = time.time(), "running"
            with open(work / "logs" / f"{job.name}.out", "w") as fo, open(work / "logs" / f"{job.name}.log", "w") as fe:
                job.proc = subprocess.Popen(command, stdout=fo, stderr=fe, env=env)
            print(f"[{now:6.1f}s] start {job.name}", flush=True)
        if not running and not ready:
            break
        if now > deadline:
            for job in running:
                job.proc.kill()
                job.state = "killed-at-deadline"
            break
        time.sleep(0.5)
    status()
    pack(work, out)
    print(json.dumps({j.name: j.state for j in jobs.values()}, indent=1))


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--scale", choices=["full", "tiny"], default="tiny")
    ap.add_argument("--work", required=True)
    ap.add_argument("--out", default=None, help="folder for results.tar (refreshed after every job)")
    ap.add_argument("--deadline-s", type=float, default=3600)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--resume", action="store_true", help="count jobs whose output already exists as done")
    ap.add_argument("--only", default="", help="comma list of job-name prefixes to keep (with their dependencies)")
    args = ap.parse_args()
    s = scale_settings(args.scale)
    work = Path(args.work)
    jobs, chosen = build_jobs(work, s, args.device)
    if args.only:
        keep = {n for n in jobs if any(n.startswith(p) for p in args.only.split(","))}
        while True:
            more = {d for n in keep for d in jobs[n].deps} - keep
            if not more:
                break
            keep |= more
        jobs = {n: j for n, j in jobs.items() if n in keep}
    run(jobs, chosen, work, Path(args.out) if args.out else None, args.deadline_s, s["parallel"], args.resume)


if __name__ == "__main__":
    main()
