"""Apply-edit round trip of the app through gradio_client, as the page's Apply button makes it: the time to the edit's
outcome (its first update) and to the complete report (edit + held-out re-evaluation + plot + flip set + augmented
views), p50 over N edits, on the embedded sample and (with --data-root or $EDITLAB_DATA) on
the full 10,000 CIFAR-10 test images.

    .venv/bin/python bench/app_roundtrip.py [--edits 15] [--checkpoint PATH ...] [--data-root DIR] [--no-write]

Each configuration starts `python app.py` in a subprocess on a free port and opens one gradio_client
session (download_files=False: a client fetches thumbnails only when it shows them). It walks the test
images with /select_image, and for each one the model gets wrong it applies the page's default edit (the
true label, the editable model, every setting left to the page: the local editor) through
/apply_edit_progressive (the page's Apply: its updates stream) and times its first update and its end; /undo (not
timed) then restores the unedited model, so every edit starts from the same weights. The first edit is a warm-up and is not counted. Prints every figure and writes the "app" section of
docs/PERFORMANCE.md (other sections are left alone).
"""
from __future__ import annotations

import argparse
import os
import shlex
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

from report import REPORT, busy, machine, write_section  # bench/ is on sys.path when run as a script

ROOT = Path(__file__).resolve().parent.parent
TARGETS = {"first_p50": (0.4, 0.5), "p50": (0.6, None)}  # issue 24, seconds: (embedded sample, 10,000 images)
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
os.environ.setdefault("HF_HUB_OFFLINE", "1")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_app(checkpoints: list[str], data_root: str | None, log_path: Path,
              app_args: list[str] = ()) -> tuple[subprocess.Popen, str]:
    port = free_port()
    command = [sys.executable, str(ROOT / "app.py"), "--port", str(port), *app_args]
    for checkpoint in checkpoints:
        command += ["--checkpoint", checkpoint]
    env = {**os.environ}
    env.pop("EDITLAB_DATA", None)  # the data root is passed explicitly, or the sample is meant
    if data_root:
        command += ["--data-root", data_root]
    process = subprocess.Popen(command, cwd=ROOT, env=env, stdout=log_path.open("w"), stderr=subprocess.STDOUT)
    return process, wait_for_app(process, f"http://127.0.0.1:{port}/", log_path, 600)


def wait_for_app(process: subprocess.Popen, url: str, log_path: Path, timeout_s: float) -> str:
    """`url` once the app started as `process` answers it; the app's log in the error if it exits or never answers."""
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        if process.poll() is not None:
            raise SystemExit(f"app.py exited with {process.returncode}:\n{log_path.read_text()}")
        try:
            if httpx.get(url, timeout=2).status_code == 200:
                return url
        except httpx.HTTPError:
            pass
        time.sleep(1)
    process.kill()
    raise SystemExit(f"app.py did not answer within {timeout_s / 60:.0f} minutes:\n{log_path.read_text()}")


def cpu_seconds(pid: int) -> float | None:
    """User + system CPU time of a process so far (Linux /proc), or None elsewhere."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def measure(url: str, n_edits: int, pid: int) -> dict:
    from gradio_client import Client

    client = Client(url, verbose=False, download_files=False)
    times, firsts, cpu, edit_s, eval_s, selects, reports = [], [], [], [], [], [], []
    index = 0
    while len(times) < n_edits + 1:
        started = time.perf_counter()
        _, info, _, target = client.predict("test", index, api_name="/select_image")
        selects.append(time.perf_counter() - started)
        index += 1
        if "misclassified" not in info:
            continue
        started, cpu_started = time.perf_counter(), cpu_seconds(pid)
        job = client.submit(target, "editable", None, None, None, None, 0, api_name="/apply_edit_progressive")
        for _ in job:  # the first update is the edit's outcome, the last the complete report
            if len(firsts) < len(times) + 1:
                firsts.append(time.perf_counter() - started)
        report = job.result()[0]
        times.append(time.perf_counter() - started)
        cpu.append(cpu_seconds(pid) - cpu_started if cpu_started is not None else float("nan"))
        edit_s.append(report["seconds"])
        eval_s.append(report["evaluation_seconds"])
        reports.append(report)
        client.predict(api_name="/undo")
    times, firsts, cpu, edit_s, eval_s = times[1:], firsts[1:], cpu[1:], edit_s[1:], eval_s[1:]  # the first warms up
    ordered = sorted(times)
    return {
        "n": len(times), "n_heldout": reports[0]["n_heldout"], "first_p50": statistics.median(firsts),
        "p50": statistics.median(times), "p90": ordered[min(len(ordered) - 1, int(0.9 * len(ordered)))],
        "max": ordered[-1], "cpu_p50": statistics.median(cpu), "edit_p50": statistics.median(edit_s), "eval_p50": statistics.median(eval_s),
        "select_p50": statistics.median(selects),
        "succeeded": sum(r["success"] for r in reports[1:]),
    }


def check_precision(checkpoint: Path, data_root: str | None, n_edits: int) -> tuple[bool, int, float]:
    """Do bfloat16-with-float32-fallback held-out predictions equal float32's, for the unedited model and
    after `n_edits` seeded edits? Returns (all equal, rows compared, mean share of rows recomputed in float32)."""
    import torch

    sys.path.insert(0, str(ROOT))
    from editcore import EDITORS, SharedModel, draw_edits, edit, load_cifar10, load_sample, normalize

    test = load_cifar10("test", data_root) if data_root else load_sample()
    mixed = SharedModel("mixed", checkpoint, test, mixed_precision=True)
    exact = SharedModel("exact", checkpoint, test, mixed_precision=False)
    layers = mixed.default_layers
    rows, targets = draw_edits(test, n_edits, seed=0)
    params_list = [None] + [edit(mixed.editable(layers), normalize(test.images[r : r + 1]), torch.tensor([t]),
                                 mixed.make_editor("rmsprop", EDITORS["rmsprop"].default_lr), 10).params
                            for r, t in zip(rows, targets)]
    equal, recomputed = True, []
    for params in params_list:
        a, b = mixed.heldout_logits(layers, params), exact.heldout_logits(layers, params)
        equal &= torch.equal(a.argmax(1), b.argmax(1))
        recomputed.append(mixed.evaluator(layers).recomputed / len(test))
    return equal, len(test) * len(params_list), statistics.mean(recomputed)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--edits", type=int, default=15, help="timed edits per configuration")
    parser.add_argument("--checkpoint", action="append", default=None,
                        help="passed to app.py (default: its defaults, the shipped checkpoints)")
    parser.add_argument("--data-root", default=os.environ.get("EDITLAB_DATA"),
                        help="CIFAR-10 root for the 10,000-image run (default: $EDITLAB_DATA; none: sample only)")
    parser.add_argument("--no-write", action="store_true", help="print only; leave docs/PERFORMANCE.md alone")
    args = parser.parse_args()

    configs = [("embedded sample", None)] + ([("full test set", args.data_root)] if args.data_root else [])
    load_before = os.getloadavg()
    rows = []
    for label, data_root in configs:
        with tempfile.TemporaryDirectory() as folder:
            process, url = start_app(args.checkpoint or [], data_root, Path(folder) / "app.log")
            try:
                result = measure(url, args.edits, process.pid)
            finally:
                process.terminate()
                process.wait(timeout=30)
        rows.append((label, result))
        print(f"{label}: {result['n_heldout']:,} held-out images, {result['n']} edits ({result['succeeded']} reached "
              f"the target): first outcome p50 {result['first_p50']:.3f} s, round trip p50 {result['p50']:.3f} s, p90 {result['p90']:.3f} s, max {result['max']:.3f} s, "
              f"server CPU time p50 {result['cpu_p50']:.3f} s; "
              f"edit p50 {result['edit_p50'] * 1000:.0f} ms, re-evaluation p50 {result['eval_p50'] * 1000:.0f} ms; "
              f"/select_image p50 {result['select_p50'] * 1000:.0f} ms")
    load_after = os.getloadavg()
    checked = [value.rpartition("=")[2] for value in (args.checkpoint or [])][-1:] or \
        [str(ROOT / "assets" / "resnet20_editable.safetensors")]
    precision = check_precision(Path(checked[0]), args.data_root, args.edits)
    print(f"bfloat16 + float32 fallback predictions equal float32's: {precision[0]} ({precision[1]:,} predictions, "
          f"{precision[2]:.1%} of rows recomputed in float32 on average)")

    checkpoints = ", ".join(args.checkpoint) if args.checkpoint else "the defaults (assets/resnet20_*.safetensors)"
    lines = [
        "## app",
        "",
        "Apply-edit round trip through gradio_client against `python app.py` in a subprocess: one",
        "/apply_edit_progressive call (the page's Apply) = edit + augmented views, streamed as its first update",
        "(\"first outcome\"), then re-evaluation of the held-out set + accuracy plot + flip-set galleries + the refreshed",
        "browse page (its end, \"round trip\"; /apply_edit returns the same in one answer). The page's default edit (true label, editable model, the local editor",
        "with its defaults) on misclassified test images, each from the unedited model (/undo between edits), first one",
        "not counted.",
        "",
        f"Command: `.venv/bin/python bench/app_roundtrip.py {shlex.join(sys.argv[1:])}`",
        "",
        f"Measured {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())} on {machine()}; checkpoints: {checkpoints}. Load average (1 min) "
        f"{load_before[0]:.1f} before, {load_after[0]:.1f} after{' (busy: other processes shared the cores)' if busy(load_before, load_after) else ''}.",
        "Server CPU time is the app process's user + system time during the call, summed over its threads:",
        "the work itself, whatever else runs; on an idle machine the wall time lies between it divided by",
        "the number of cores and it.",
        "",
        "| held-out set | images | edits | first outcome p50 | round trip p50 | p90 | max | server CPU time p50 "
        "| edit p50 | re-evaluation p50 | targets (p50) |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for label, r in rows:
        limits = {key: pair[r["n_heldout"] > 1_000] for key, pair in TARGETS.items()}  # n_heldout: all but the edited
        target = "; ".join(f"{'first outcome' if key == 'first_p50' else 'round trip'} <= {limit} s: "
                           f"**{'met' if r[key] <= limit else 'not met'}**" for key, limit in limits.items() if limit)
        lines.append(f"| {label} | {r['n_heldout']:,} | {r['n']} | {r['first_p50']:.3f} s | {r['p50']:.3f} s | {r['p90']:.3f} s | {r['max']:.3f} s "
                     f"| {r['cpu_p50']:.3f} s | {r['edit_p50'] * 1000:.0f} ms | {r['eval_p50'] * 1000:.0f} ms | {target} |")
    import torch

    from editcore.core.heldout import native_bfloat16

    native = native_bfloat16(torch.device("cpu"))
    lines += ["", f"This CPU {'has' if native else 'has no'} native bfloat16, so the app's re-evaluation above ran in "
              f"{'bfloat16 with float32 for low-margin rows' if native else 'float32'}. The mixed-precision path, "
              f"checked here whatever the CPU, gives float32's predictions: **{precision[0]}** over "
              f"{precision[1]:,} predictions ({checked[0].replace(str(ROOT) + '/', '')}, unedited and after "
              f"{args.edits} seeded edits, {'full test set' if args.data_root else 'sample'}); on average "
              f"{precision[2]:.1%} of the rows were recomputed in float32."]
    if not args.data_root:
        lines += ["", "No data root was given, so the 10,000-image row is missing: set EDITLAB_DATA and rerun."]
    text = "\n".join(lines) + "\n"
    print(text)
    if not args.no_write:
        write_section("app", text)
        print(f"wrote the app section of {REPORT.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
