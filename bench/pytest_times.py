"""A pytest plugin for bench/suite_times.py: CPU time (this process and the child processes it waited for) and
wall time of every test, setup and teardown included, written as JSON to $PYTEST_TIMES_OUT at the end."""
from __future__ import annotations

import json
import os
import resource
import time

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
    total = {"cpu": _cpu_seconds() - _start["cpu"], "wall": time.perf_counter() - _start["wall"], "exitstatus": int(exitstatus)}
    with open(os.environ["PYTEST_TIMES_OUT"], "w") as out:
        json.dump({"total": total, "tests": _tests}, out)
