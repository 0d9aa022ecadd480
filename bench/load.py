"""Many users at once: concurrent gradio_client sessions against `python app.py` on 127.0.0.1.

    .venv/bin/python bench/load.py [--clients 1 4 8 16 32] [--cycles 5] [--long-edits 200] [--app-args "--threads 1"]
        [--no-write]

Starts the app in a subprocess on a free loopback port (embedded 1,000-image sample, shipped checkpoints).
For each client count, that many clients start together; each runs `--cycles` cycles of
/select_image -> /apply_edit -> /history -> /undo on its own images (the page's default
edit: editable model, the local editor with its own steps and layer; targets: the true label of a
misclassified image, or the runner-up class of a correct one), then keeps one last edit; each client's calls
go through one kept-alive HTTP connection (`Caller`). Measured: /apply_edit
wall time (p50, p95), errors, and isolation: every /history holds exactly the client's own edit, and
each client's final top-5 on its probe images equals what one quiet client gets by replaying that
client's edit log (/export_log -> /replay_log). Server CPU is the app process's user + system time
(all threads) over the round, per cycle. Clients then close; RSS is read after their sessions are
dropped. Last, one session applies `--long-edits` edits in a row and keeps them all: apply time at the
start and the end, and RSS. Everything is bounded (no endless loops) and local. Writes the "Load"
section of docs/RELIABILITY.md.
"""
from __future__ import annotations

import argparse
import json
import os
import shlex
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

from app_roundtrip import ROOT, cpu_seconds, start_app  # bench/ is on sys.path when run as a script
from report import machine, write_section

RELIABILITY = ROOT / "docs" / "RELIABILITY.md"
EDIT = ("editable", None, None, None, None, 0)  # /apply_edit after the target: the page's defaults (local editor)
CALL_TIMEOUT_S = 300


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS")


def settle_rss(pid: int, seconds: float = 20) -> float:
    """RSS once the server has had `seconds` to drop the sessions of closed clients."""
    time.sleep(seconds)
    return rss_mb(pid)


def new_client(url: str):
    from gradio_client import Client

    return Client(url, verbose=False, download_files=False)


class Caller:
    """Calls the API with one kept-alive HTTP connection per user: POST /gradio_api/call/<name>, then read
    its event stream. gradio_client opens a new HTTP client (and TLS context) per call, ~0.5 CPU-s per
    cycle on this machine, a third of the two cores the server needs; a browser elsewhere costs the server
    nothing of the kind. The gradio_client session stays open for its heartbeat and its session id."""

    def __init__(self, client):
        import httpx

        self.client, self.base = client, client.src.rstrip("/") + "/gradio_api/call/"
        self.http = httpx.Client(timeout=CALL_TIMEOUT_S)

    def predict(self, *args, api_name: str):
        name = api_name.lstrip("/")
        posted = self.http.post(self.base + name, json={"data": list(args), "session_hash": self.client.session_hash})
        posted.raise_for_status()
        event, data = None, None
        with self.http.stream("GET", f"{self.base}{name}/{posted.json()['event_id']}") as stream:
            for line in stream.iter_lines():
                if line.startswith("event:"):
                    event = line[6:].strip()
                elif line.startswith("data:") and event in ("complete", "error"):
                    data = json.loads(line[5:])
                    break
        if event != "complete":
            raise RuntimeError(f"/{name} failed: {data}")
        return data[0] if len(data) == 1 else data

    def close(self):
        self.http.close()
        self.client.close()


def top5(client, index: int) -> list:
    label = client.predict("test", index, api_name="/select_image")[2]
    return [(c["label"], c["confidence"]) for c in label["confidences"]]


def edit_plan() -> list[tuple[int, str]]:
    """(test index, target) for distinct edits: every sample image the app's editable model gets wrong,
    to its true label (the page's default), then the others, to their runner-up class. Found in this
    process rather than through a thousand /select_image calls."""
    sys.path.insert(0, str(ROOT))
    from editcore import CLASSES, SharedModel, load_sample

    test = load_sample()
    probs = SharedModel("editable", ROOT / "assets" / "resnet20_editable.safetensors", test).base_heldout_probs
    top2 = probs.topk(2, dim=1).indices
    wrong = top2[:, 0] != test.labels
    plan = [(i, CLASSES[int(test.labels[i])]) for i in wrong.nonzero().view(-1).tolist()]
    return plan + [(i, CLASSES[int(top2[i, 1])]) for i in (~wrong).nonzero().view(-1).tolist()]


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def run_client(url: str, images: list[tuple[int, str]], cycles: int, start: threading.Barrier, out: dict) -> None:
    """One user: `cycles` select -> apply -> history -> undo, then one kept edit; fills `out`."""
    out.update(apply_s=[], errors=[], isolated=True)
    client = None
    try:
        client = Caller(new_client(url))
        start.wait(timeout=CALL_TIMEOUT_S)
        for index, target in images[:cycles]:
            client.predict("test", index, api_name="/select_image")
            started = time.perf_counter()
            client.predict(target, *EDIT, api_name="/apply_edit")
            out["apply_s"].append(time.perf_counter() - started)
            history = client.predict(api_name="/history")
            out["isolated"] &= [h["images"] for h in history] in ([[f"test:{index}"]], [])  # [] if not kept
            client.predict(api_name="/undo")
        index, target = images[cycles]
        client.predict("test", index, api_name="/select_image")
        client.predict(target, *EDIT, api_name="/apply_edit")
        history = client.predict(api_name="/history")
        out["isolated"] &= [h["images"] for h in history] in ([[f"test:{index}"]], [])
        out["probes"] = [index, images[0][0]]
        out["final"] = [top5(client, i) for i in out["probes"]]
        files = client.predict(api_name="/export_log")  # a gr.update of the downloads: {"value": [file], ...}
        out["log"] = (files["value"] if isinstance(files, dict) else files)[0]
    except Exception as exc:  # noqa: BLE001 - every failure is counted and reported
        out["errors"].append(f"{type(exc).__name__}: {exc}")
    finally:
        if client is not None:
            client.close()  # ends its heartbeat: the server drops the session


def log_path(file_output) -> str:
    """The server-side path of an exported file (the bench runs on the server's machine)."""
    return file_output["path"] if isinstance(file_output, dict) else str(file_output)


def replay_matches(url: str, results: list[dict]) -> int:
    """How many clients' final top-5s one quiet client reproduces by replaying their edit logs."""
    from gradio_client import handle_file

    client, matches = new_client(url), 0
    for out in results:
        if "log" not in out:
            continue
        client.predict(handle_file(log_path(out["log"])), api_name="/replay_log")
        matches += [top5(client, i) for i in out["probes"]] == out["final"]
    client.close()
    return matches


def load_round(url: str, pid: int, n_clients: int, cycles: int, images: list[tuple[int, str]]) -> dict:
    span = cycles + 1
    results = [{} for _ in range(n_clients)]
    start = threading.Barrier(n_clients)
    threads = [threading.Thread(target=run_client, daemon=True,
                                args=(url, [images[(c * span + k) % len(images)] for k in range(span)], cycles, start,
                                      results[c]))
               for c in range(n_clients)]
    cpu_before, clients_before, wall_before = cpu_seconds(pid), cpu_seconds(os.getpid()), time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=CALL_TIMEOUT_S * 4 * (cycles + 4))
    wall, cpu = time.perf_counter() - wall_before, cpu_seconds(pid) - cpu_before
    clients_cpu = cpu_seconds(os.getpid()) - clients_before
    apply_s = [s for r in results for s in r.get("apply_s", [])]
    errors = [e for r in results for e in r.get("errors", ["client did not finish"])]
    return {"clients": n_clients, "apply_p50": statistics.median(apply_s) if apply_s else float("nan"),
            "apply_p95": pct(apply_s, 0.95) if apply_s else float("nan"), "n_apply": len(apply_s),
            "errors": errors, "isolated": sum(r.get("isolated", False) and "final" in r for r in results),
            "replayed": replay_matches(url, results), "wall": wall,
            "cpu_per_cycle": cpu / (n_clients * (cycles + 1)),
            "clients_cpu_per_cycle": clients_cpu / (n_clients * (cycles + 1))}


def per_call_cpu(url: str, pid: int, images: list[tuple[int, str]], repeats: int = 5) -> dict[str, float]:
    """Median server CPU seconds of each call of a cycle, one quiet client."""
    client, samples = new_client(url), {"select_image": [], "apply_edit": [], "history": [], "undo": []}
    for index, target in images[:repeats]:
        for name, args in (("select_image", ("test", index)), ("apply_edit", (target, *EDIT)), ("history", ()),
                           ("undo", ())):
            before = cpu_seconds(pid)
            client.predict(*args, api_name=f"/{name}")
            samples[name].append(cpu_seconds(pid) - before)
    client.close()
    return {name: statistics.median(values) for name, values in samples.items()}


def long_session(url: str, pid: int, n_edits: int, images: list[tuple[int, str]]) -> dict:
    """One session applying `n_edits` edits in a row, keeping them: apply time at the start and the end."""
    client, kept = new_client(url), 0
    series = {"round trip": [], "edit": [], "re-evaluation": [], "steps": []}  # the report's own timings
    rss_before = rss_mb(pid)
    for k in range(n_edits):
        index, target = images[k % len(images)]
        client.predict("test", index, api_name="/select_image")
        started = time.perf_counter()
        report = client.predict(target, *EDIT, api_name="/apply_edit")[0]
        series["round trip"].append(time.perf_counter() - started)
        series["edit"].append(report["seconds"])
        series["re-evaluation"].append(report["evaluation_seconds"])
        series["steps"].append(report["steps"])
        kept += report["applied"]
    edits = len(client.predict(api_name="/history"))
    rss_full = rss_mb(pid)
    client.close()
    window = max(1, min(10, n_edits // 4))
    ends = {name: (statistics.median(values[:window]), statistics.median(values[-window:]))
            for name, values in series.items()}
    return {"n": n_edits, "kept": kept, "edits": edits, "first_p50": ends["round trip"][0],
            "last_p50": ends["round trip"][1], "ends": ends, "window": window, "rss_before": rss_before,
            "rss_full": rss_full, "rss_after": settle_rss(pid)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clients", type=int, nargs="+", default=[1, 4, 8, 16, 32])
    parser.add_argument("--cycles", type=int, default=5)
    parser.add_argument("--long-edits", type=int, default=200)
    parser.add_argument("--app-args", default="", help="extra app.py arguments, e.g. '--threads 1'")
    parser.add_argument("--no-write", action="store_true", help="print only; leave docs/RELIABILITY.md alone")
    args = parser.parse_args()

    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory() as folder:
        process, url = start_app([], None, Path(folder) / "app.log", shlex.split(args.app_args))
        try:
            pid = process.pid
            images = edit_plan()
            calls = per_call_cpu(url, pid, images)
            idle = settle_rss(pid, 10)
            rounds = []
            for n in args.clients:
                result = load_round(url, pid, n, args.cycles, images)
                result["rss_after"] = settle_rss(pid)
                rounds.append(result)
                print(result, flush=True)
            long = long_session(url, pid, args.long_edits, images) if args.long_edits else None
            print(long, flush=True)
        finally:
            process.terminate()
            process.wait(timeout=30)
    load_after = os.getloadavg()

    lines = [
        "## Load",
        "",
        f"Command: `.venv/bin/python {shlex.join(['bench/load.py', *sys.argv[1:]])}`",
        "",
        f"Measured {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())} on {machine()}; `{shlex.join(['python', 'app.py', *shlex.split(args.app_args)])}` "
        f"(shipped checkpoints, "
        f"embedded 1,000-image sample, 127.0.0.1). Load average (1, 5, 15 min) before "
        f"{', '.join(f'{v:.1f}' for v in load_before)}, after {', '.join(f'{v:.1f}' for v in load_after)}"
        f"{': other processes shared the cores, so wall times are inflated' if max(load_before[0], load_after[0]) > 1 else ''}.",
        "",
        f"Each client: {args.cycles} cycles of /select_image -> /apply_edit -> /history -> /undo, then one kept edit. "
        "Isolation: every /history held only the client's own edit, and its final top-5 on two probe images equals "
        "a quiet client's after /replay_log of its exported log. Server CPU: the app process, all threads.",
        "",
        "| clients | /apply_edit calls | p50 | p95 | errors | isolated | replay equal | server CPU per cycle "
        "| round wall | RSS after clients left |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rounds:
        lines.append(f"| {r['clients']} | {r['n_apply']} | {r['apply_p50']:.2f} s | {r['apply_p95']:.2f} s | "
                     f"{len(r['errors'])} | {r['isolated']}/{r['clients']} | {r['replayed']}/{r['clients']} | "
                     f"{r['cpu_per_cycle']:.2f} s | {r['wall']:.0f} s | {r['rss_after']:.0f} MB |")
    lines += ["", f"Idle RSS (after one quiet client): **{idle:.0f} MB**. Largest after a round: "
              f"{max(r['rss_after'] for r in rounds):.0f} MB ({100 * (max(r['rss_after'] for r in rounds) / idle - 1):+.0f}%).",
              "", "Server CPU per call, one quiet client (median of 5): " +
              ", ".join(f"/{name} {1000 * s:.0f} ms" for name, s in calls.items()) + "."]
    errors = sorted({e for r in rounds for e in r["errors"]})
    if errors:
        lines += ["", "Errors: " + "; ".join(errors[:5])]
    if long:
        lines += ["", f"One session, {long['n']} edits in a row, none undone ({long['kept']} kept, "
                  f"/history {long['edits']}): /apply_edit p50 {long['first_p50']:.2f} s over the first "
                  f"{long['window']}, {long['last_p50']:.2f} s over the last {long['window']} "
                  f"(ratio {long['last_p50'] / long['first_p50']:.2f}; medians first -> last: "
                  + ", ".join(f"{name} {a:.3g} -> {b:.3g}{'' if name == 'steps' else ' s'}"
                            for name, (a, b) in long["ends"].items() if name != "round trip")
                  + f"); RSS {long['rss_before']:.0f} MB before, "
                  f"{long['rss_full']:.0f} MB with all edits held, {long['rss_after']:.0f} MB after the client left."]
    text = "\n".join(lines) + "\n"
    print(text)
    if not args.no_write:
        write_section("Load", text, RELIABILITY)
        print(f"wrote the Load section of {RELIABILITY.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
