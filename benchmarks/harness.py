"""What every benchmark suite shares: the device's ceilings, timing, byte counts and result rows.

Method (BENCHMARKING.md): measure the GPU's device-to-device copy bandwidth and bf16 matmul
rate in the same process; time with CUDA events after warm-up and report the median
(triton.testing.do_bench); rotate inputs that would sit in L2; time each thing twice and
report the spread, so differences inside it read as noise.

Without CUDA (or with FASTDIT_BENCH_SMOKE=1) every suite runs in smoke mode: tiny shapes,
one timed call, no ceilings. Smoke numbers prove the suites run; they are not measurements.
"""
import functools
import json
import os
import statistics
import time

import torch

SMOKE = os.environ.get("FASTDIT_BENCH_SMOKE") == "1" or not torch.cuda.is_available()
QUICK = os.environ.get("FASTDIT_BENCH_QUICK") == "1"
DEVICE = "cpu" if SMOKE and not torch.cuda.is_available() else "cuda"
L2_ROTATE_BYTES = 256 * 2**20  # cycle through input sets totalling this much when one set fits in L2

RESULTS = []  # rows recorded by the suites in this process; benchmarks/conftest.py writes them out


def bytes_of(*tensors):
    return sum(t.numel() * t.element_size() for t in tensors if t is not None)


@functools.lru_cache(maxsize=None)
def ceilings():
    """{'copy_bandwidth_gbs', 'bf16_matmul_tflops'} of this GPU, measured once per process."""
    if SMOKE:
        return {"copy_bandwidth_gbs": None, "bf16_matmul_tflops": None}
    src = torch.empty(2**30, dtype=torch.uint8, device="cuda").random_(0, 255)  # 1 GiB
    dst = torch.empty_like(src)
    ms = _median_ms(lambda: dst.copy_(src))
    n = 8192
    a, b = (torch.randn(n, n, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    mm_ms = _median_ms(lambda: a @ b)
    return {"copy_bandwidth_gbs": 2 * src.numel() / ms / 1e6, "bf16_matmul_tflops": 2 * n**3 / mm_ms / 1e9}


def _median_ms(fn, grad_to_none=None):
    import triton.testing

    return triton.testing.do_bench(fn, warmup=25, rep=100, grad_to_none=grad_to_none, return_mode="median")


def rotating(make_inputs, set_bytes):
    """A callable returning the next of enough input sets that together outrun the L2 cache."""
    n = 1 if SMOKE else max(1, min(16, -(-L2_ROTATE_BYTES // max(set_bytes, 1))))
    sets = [make_inputs() for _ in range(n)]
    state = {"i": 0}

    def next_set():
        state["i"] = (state["i"] + 1) % n
        return sets[state["i"]]

    return next_set


def time_ms(fn, grad_to_none=None):
    """(median ms, spread ms): the median of two independent timings and their difference."""
    if SMOKE:
        fn()  # warm-up (and compilation)
        t0 = time.perf_counter()
        fn()
        return (time.perf_counter() - t0) * 1e3, 0.0
    a, b = _median_ms(fn, grad_to_none), _median_ms(fn, grad_to_none)
    return statistics.mean((a, b)), abs(a - b)


def record(suite, **row):
    """Add one result row (suite, case, implementation, ms, ...) for the report; returns it."""
    row = {"suite": suite, "smoke": SMOKE, **row}
    RESULTS.append(row)
    return row


def memory_bound_row(suite, case, impl, ms, spread_ms, nbytes, **extra):
    """A memory-bound kernel's row: time, GB/s and % of the measured copy bandwidth."""
    gbs = nbytes / ms / 1e6 if ms > 0 else None
    peak = ceilings()["copy_bandwidth_gbs"]
    pct = 100 * gbs / peak if (gbs and peak) else None
    return record(suite, case=case, impl=impl, ms=ms, spread_ms=spread_ms, bytes=nbytes, gbs=gbs,
                  pct_copy_bw=pct, **extra)  # fmt: skip


def not_installed(suite, case, impl, why="not installed"):
    """A row for an alternative that could not run here: listed, never silently dropped."""
    return record(suite, case=case, impl=impl, ms=None, status=why)


def compiled(fn):
    """torch.compile(fn), or None where compilation is not possible on this machine."""
    try:
        return torch.compile(fn)
    except Exception:  # pragma: no cover - platform without a working compiler
        return None


def write_results(path):
    with open(path, "w") as f:
        json.dump({"ceilings": ceilings(), "rows": RESULTS}, f, indent=1)


def run_case(benchmark, measure):
    """Run `measure()` (which times a case and returns its recorded row) once under pytest-benchmark,
    keeping the row in the benchmark's extra_info so `--benchmark-json` carries it too."""
    row = benchmark.pedantic(measure, rounds=1, iterations=1, warmup_rounds=0)
    benchmark.extra_info.update({k: v for k, v in row.items() if isinstance(v, (int, float, str, bool, type(None)))})
    return row
