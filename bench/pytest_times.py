"""A pytest plugin for bench/suite_times.py: CPU time (this process and the child processes it waited for) and
wall time of every test, setup and teardown included, written as JSON to $PYTEST_TIMES_OUT at the end. Under
pytest-xdist each worker writes its own file ($PYTEST_TIMES_OUT.<worker>) and the controller, which runs no test,
merges them: the total CPU time is the controller's own (not its children's: the workers are its children) plus
every worker's, the wall time the controller's."""
from __future__ import annotations

import json
import os
import resource
import time
from pathlib import Path

import pytest

_tests: list[dict] = []
_failed: list[str] = []  # under xdist the controller sees every worker's reports
_start: dict[str, float] = {}


def _cpu_seconds() -> float:
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def pytest_sessionstart(session):
    own = resource.getrusage(resource.RUSAGE_SELF)
    _start.update(cpu=_cpu_seconds(), own_cpu=own.ru_utime + own.ru_stime, wall=time.perf_counter())


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item, nextitem):
    cpu, wall = _cpu_seconds(), time.perf_counter()
    yield
    _tests.append({"test": item.nodeid, "cpu": _cpu_seconds() - cpu, "wall": time.perf_counter() - wall})


def pytest_runtest_logreport(report):
    if report.failed and report.nodeid not in _failed:
        _failed.append(report.nodeid)


def pytest_sessionfinish(session, exitstatus):
    out = Path(os.environ["PYTEST_TIMES_OUT"])
    total = {"cpu": _cpu_seconds() - _start["cpu"], "wall": time.perf_counter() - _start["wall"], "exitstatus": int(exitstatus)}
    worker = os.environ.get("PYTEST_XDIST_WORKER")
    if worker:
        out.with_name(f"{out.name}.{worker}").write_text(json.dumps({"total": total, "tests": _tests}))
        return
    tests, parts = list(_tests), sorted(out.parent.glob(f"{out.name}.gw*"))
    if parts:  # the workers' CPU (theirs and their children's) comes from their files, once
        own = resource.getrusage(resource.RUSAGE_SELF)
        total["cpu"] = own.ru_utime + own.ru_stime - _start["own_cpu"]
    for part in parts:
        record = json.loads(part.read_text())
        tests += record["tests"]
        total["cpu"] += record["total"]["cpu"]
        part.unlink()
    out.write_text(json.dumps({"total": total, "tests": tests, "failed": _failed}))
