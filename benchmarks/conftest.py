"""Benchmark suites run under pytest(-benchmark). Without CUDA they run in smoke mode, with the
Triton kernels interpreted. FASTDIT_BENCH_JSON=path writes every recorded row there: after each
test (so a crash keeps what was measured) and, marked complete, at the end of the session."""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


def _write(complete):
    path = os.environ.get("FASTDIT_BENCH_JSON")
    if path:
        from benchmarks import harness

        harness.write_results(path, complete=complete)


def pytest_runtest_logfinish(nodeid, location):
    _write(complete=False)


def pytest_sessionfinish(session, exitstatus):
    _write(complete=True)
