"""Benchmark suites run under pytest(-benchmark). Without CUDA they run in smoke mode, with the
Triton kernels interpreted. FASTDIT_BENCH_JSON=path writes every recorded row there at the end."""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


def pytest_sessionfinish(session, exitstatus):
    path = os.environ.get("FASTDIT_BENCH_JSON")
    if path:
        from benchmarks import harness

        harness.write_results(path)
