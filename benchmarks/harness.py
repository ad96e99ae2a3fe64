"""What every benchmark suite shares: the device's ceilings, timing, byte counts and result rows.

Method (BENCHMARKING.md): measure the GPU's device-to-device copy bandwidth and bf16 matmul
rate in the same process; time with CUDA events after warm-up and report the median
(triton.testing.do_bench); rotate inputs that would sit in L2; time each thing twice and
report the spread, so differences inside it read as noise.

Without CUDA (or with FASTDIT_BENCH_SMOKE=1) every suite runs in smoke mode: tiny shapes,
one timed call, no ceilings. Smoke numbers prove the suites run; they are not measurements.

What `python -m benchmarks` (benchmarks/__main__.py) passes to every suite it runs:
  FASTDIT_BENCH_JSON      where this suite's rows go (written after every test: a crash keeps them)
  FASTDIT_BENCH_QUICK=1   --quick: suites run `shapes(...)`'s quick subset
  FASTDIT_BENCH_SMOKE=1   --smoke (or no CUDA)
  FASTDIT_BENCH_CEILINGS  the ceilings the runner measured once (JSON), so every suite divides by
                          the same numbers and none re-measures them
  FASTDIT_BENCH_DEADLINE  a Unix time this suite should finish by (--quick's time budget); a
                          suite checks `time_left()` before an expensive case and records the
                          case as skipped when it would not fit
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

# The kernel shape the report's headline quotes (BENCHMARKING.md: the DiT-XL/2 width, 64K tokens
# = batch 256 at 256^2 or batch 64 at 512^2, bf16). Quick subsets must include it.
HEADLINE_KERNEL_SHAPE = {"D": 1152, "tokens": 65536, "dtype": "bfloat16"}

RESULTS = []  # rows recorded by the suites in this process; benchmarks/conftest.py writes them out


def bytes_of(*tensors):
    return sum(t.numel() * t.element_size() for t in tensors if t is not None)


@functools.lru_cache(maxsize=None)
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
    the first of `full`), `quick` with --quick (a representative subset that includes the headline
    shape; default `full`), else `full`."""
    if SMOKE:
        return list(smoke) if smoke is not None else list(full)[:1]
    if QUICK and quick is not None:
        return list(quick)
    return list(full)


# (B, T, D) activations of the DiT family (BENCHMARKING.md): widths of S, B, L and XL; 256^2 and
# 512^2 latents of the /2 models; training batches and a CFG sampling batch (2 x 64).
DIT_TOKEN_SHAPES = [(B, T, D) for D in (384, 768, 1024, 1152) for B, T in ((32, 256), (128, 256), (256, 256), (64, 1024))]
DIT_TOKEN_SHAPES_QUICK = [(256, 256, 1152), (32, 256, 1152), (256, 256, 768), (64, 1024, 1152)]


def time_left():
    """Seconds until this suite's deadline (inf without one)."""
    return DEADLINE - time.time()


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


def not_installed(suite, case, impl, why="not installed", **extra):
    """A row for an alternative that could not run here: listed, never silently dropped. Pass the
    case's mode/dtype/shape fields in `extra` so the report puts it beside the case's other rows."""
    return record(suite, case=case, impl=impl, ms=None, status=why, **extra)


def compiled(fn):
    """torch.compile(fn), or None where compilation is not possible on this machine."""
    try:
        return torch.compile(fn)
    except Exception:  # pragma: no cover - platform without a working compiler
        return None


def write_results(path, complete=True):
    """Write every row recorded so far; complete=False while the suite is still running."""
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        json.dump({"ceilings": ceilings(), "complete": complete, "rows": RESULTS}, f, indent=1)
    os.replace(tmp, path)  # a reader (or a crash) never sees half a file


def run_case(benchmark, measure):
    """Run `measure()` (which times a case and returns its recorded row) once under pytest-benchmark,
    keeping the row in the benchmark's extra_info so `--benchmark-json` carries it too."""
    row = benchmark.pedantic(measure, rounds=1, iterations=1, warmup_rounds=0)
    benchmark.extra_info.update({k: v for k, v in row.items() if isinstance(v, (int, float, str, bool, type(None)))})
    return row
