"""A pytest plugin for bench/suite_times.py: CPU time (this process and the child processes it waited for) and
wall time of every test, setup and teardown included, written as JSON to $PYTEST_TIMES_OUT at the end. Under
pytest-xdist each worker writes its own file ($PYTEST_TIMES_OUT.<worker>) and the controller, which runs no test,
merges them: the total CPU time is the controller's plus every worker's, the wall time the controller's."""
from __future__ import annotations

import json
import os
import resource
import time
from pathlib import Path

import pytest

_tests: list[dict] = []
_start: dict[str, float] = {}


def _cpu_seconds() -> float:
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def pytest_sessionstart(session):
    _start.update(cpu=_cpu_seconds(), wall=time.perf_counter())


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item, nextitem):
    cpu, wall = _cpu_seconds(), time.perf_counter()
    yield
    _tests.append({"test": item.nodeid, "cpu": _cpu_seconds() - cpu, "wall": time.perf_counter() - wall})


def pytest_sessionfinish(session, exitstatus):
    out = Path(os.environ["PYTEST_TIMES_OUT"])
    total = {"cpu": _cpu_seconds() - _start["cpu"], "wall": time.perf_counter() - _start["wall"], "exitstatus": int(exitstatus)}
    worker = os.environ.get("PYTEST_XDIST_WORKER")
    if worker:
        out.with_name(f"{out.name}.{worker}").write_text(json.dumps({"total": total, "tests": _tests}))
        return
    tests = list(_tests)
    for part in sorted(out.parent.glob(f"{out.name}.gw*")):
        record = json.loads(part.read_text())
        tests += record["tests"]
        total["cpu"] += record["total"]["cpu"]
        part.unlink()
    out.write_text(json.dumps({"total": total, "tests": tests}))
