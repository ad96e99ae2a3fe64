"""What every benchmark suite shares: the device's ceilings, timing, byte counts and result rows.

Method (BENCHMARKING.md): measure the GPU's device-to-device copy bandwidth and bf16 matmul
rate in the same process; time with CUDA events after warm-up and report the median
(triton.testing.do_bench); rotate inputs that would sit in L2; time each thing twice and
report the spread, so differences inside it read as noise.

Without CUDA (or with FASTDIT_BENCH_SMOKE=1) every suite runs in smoke mode: tiny shapes,
one timed call, no ceilings. Smoke numbers prove the suites run; they are not measurements.

A suite is a pytest file whose tests record rows (`record`); what pytest itself times is the
harness, so nothing here reports pytest's own timings. What `python -m benchmarks`
(benchmarks/runner.py) passes to every suite it runs:
  FASTDIT_BENCH_JSON      where this process's rows go (written after every test: a crash keeps them)
  FASTDIT_BENCH_QUICK=1   the device check's quick mode: suites run `shapes(...)`'s quick subset,
                          the headline case first
  FASTDIT_BENCH_SMOKE=1   smoke mode (no CUDA)
  FASTDIT_BENCH_CEILINGS  the ceilings the runner measured once (JSON), so every suite divides by
                          the same numbers and none re-measures them
  FASTDIT_BENCH_DEADLINE  a Unix time this suite should finish by; every case asks `skip_reason()`
                          before it starts and is recorded as skipped, with the reason, when it
                          would not fit
"""

import functools
import json
import math
import os
import statistics
import time

import torch

SMOKE = os.environ.get("FASTDIT_BENCH_SMOKE") == "1" or not torch.cuda.is_available()
QUICK = os.environ.get("FASTDIT_BENCH_QUICK") == "1"
DEVICE = "cpu" if SMOKE and not torch.cuda.is_available() else "cuda"
L2_ROTATE_BYTES = 256 * 2**20  # cycle through input sets totalling this much when one set fits in L2
DEADLINE = float(os.environ.get("FASTDIT_BENCH_DEADLINE") or math.inf)

# Implementation names the report understands (third-party alternatives keep their own names:
# flash_attn, xformers, apex, sdpa_flash, sdpa_efficient, sdpa_cudnn, sdpa_math, ...).
EAGER, COMPILE, TRITON, CUDA = "eager", "compile", "triton", "cuda"

RESULTS = []  # rows recorded by the suites in this process; benchmarks/conftest.py writes them out


def bytes_of(*tensors):
    return sum(t.numel() * t.element_size() for t in tensors if t is not None)


@functools.cache
def ceilings():
    """{'copy_bandwidth_gbs', 'bf16_matmul_tflops'} of this GPU, measured once per process
    (or once per run: taken from FASTDIT_BENCH_CEILINGS when the runner set it)."""
    if os.environ.get("FASTDIT_BENCH_CEILINGS"):
        return json.loads(os.environ["FASTDIT_BENCH_CEILINGS"])
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


def shapes(full, quick=None, smoke=None):
    """The cases a suite runs in this mode: `smoke` in smoke mode (tiny, CPU-interpretable; default
    the first of `full`), `quick` in the device check (the headline case first, then a few
    representative ones; default `full`), else `full`."""
    if SMOKE:
        return list(smoke) if smoke is not None else list(full)[:1]
    if QUICK and quick is not None:
        return list(quick)
    return list(full)


def time_left():
    """Seconds until this suite's deadline (inf without one)."""
    return DEADLINE - time.time()


OUT_OF_TIME = "skipped: the time budget ran out before this case"


def skip_reason(min_seconds=0.0):
    """Why a case that needs about `min_seconds` must not start now (None: run it)."""
    return OUT_OF_TIME if time_left() < min_seconds else None


def time_ms(fn, grad_to_none=None):
    """(median ms, spread ms): the median of two independent timings and their difference."""
    if SMOKE:
        fn()  # warm-up (and compilation)
        t0 = time.perf_counter()
        fn()
        return (time.perf_counter() - t0) * 1e3, 0.0
    a, b = _median_ms(fn, grad_to_none), _median_ms(fn, grad_to_none)
    return statistics.mean((a, b)), abs(a - b)


def time_steps(fn, iters, warmup=1):
    """(ms per call, spread ms) of a long-running `fn` with side effects (a training step, a sampling
    loop): `warmup` untimed calls, then two timings of `iters` back-to-back calls, each bracketed by
    CUDA events (perf_counter in smoke mode); their mean and difference, per call."""
    for _ in range(warmup):
        fn()
    timings = [_time_block(fn, iters) / iters for _ in range(2)]
    return statistics.mean(timings), abs(timings[0] - timings[1])


def _time_block(fn, iters):
    if DEVICE != "cuda":
        t0 = time.perf_counter()
        for _ in range(iters):
            fn()
        return (time.perf_counter() - t0) * 1e3
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda.synchronize()
    start.record()
    for _ in range(iters):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end)


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


def not_run(suite, case, impl, why, **extra):
    """A row for a case that did not run here (an alternative not installed, the time budget spent):
    listed with its reason, never silently dropped, never timed. Pass the case's mode/dtype/shape
    fields in `extra` so the report puts it beside the case's other rows."""
    return record(suite, case=case, impl=impl, ms=None, status=why, **extra)


def compiled(fn):
    """torch.compile(fn), or None where compilation is not possible on this machine."""
    try:
        return torch.compile(fn)
    except Exception:  # pragma: no cover - platform without a working compiler
        return None


def write_results(path, complete=True, planned=(), finished=()):
    """Write every row recorded so far, and the cases planned and finished; complete=False while
    the suite is still running."""
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        json.dump({"complete": complete, "planned": list(planned), "finished": list(finished), "rows": RESULTS}, f)
    os.replace(tmp, path)  # a reader (or a crash) never sees half a file
