"""Benchmark suites run under pytest. Without CUDA they run in smoke mode, with the Triton kernels
interpreted.

FASTDIT_BENCH_JSON=path writes the process's rows there, with the cases collected and the cases
finished: after each test (so a process killed at its deadline keeps what it measured, and the
report lists the cases it never reached) and, marked complete, at the end of the session.
Cases marked `headline` run first, across every suite file of the process, and among them the ones
that compile (torch.compile of the reference: seconds each) after the ones that do not: a time budget
cuts the others, and the most headline numbers fit.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

PLANNED, FINISHED = [], []


COMPILING = ("compile", "math_compiled")  # implementations that compile before they are timed


def pytest_collection_modifyitems(session, config, items):
    def order(item):
        impl = getattr(getattr(item, "callspec", None), "params", {}).get("impl")
        return item.get_closest_marker("headline") is None, impl in COMPILING

    items.sort(key=order)  # stable: the order is kept otherwise


def pytest_collection_finish(session):
    PLANNED[:] = [item.nodeid for item in session.items]


def _write(complete):
    path = os.environ.get("FASTDIT_BENCH_JSON")
    if path:
        from benchmarks import harness

        harness.write_results(path, complete=complete, planned=PLANNED, finished=FINISHED)


def pytest_runtest_logfinish(nodeid, location):
    FINISHED.append(nodeid)
    _write(complete=False)


def pytest_sessionfinish(session, exitstatus):
    _write(complete=True)
