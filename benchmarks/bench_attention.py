"""Attention: TFLOP/s of every backend side by side, forward and backward (BENCHMARKING.md).

Shapes: T in {256, 1024, 4096} (DiT /2 at 256², 512², and a long case), head dim 64 (DiT-S/B/L)
and 72 (DiT-XL), H = 16, bfloat16, B*T = 128K tokens; the headline cases first (head dim 72 at
T = 256 and 1024, benchmarks/cases.py), and in the device check's quick mode only those and head
dim 64 at T = 256. A case that would not fit the time budget is recorded as skipped, with the reason (q, k, v as views of one (B, T, 3, H, Dh)
GEMM output, the model's layout). FLOPs: 4 B H T² Dh forward, 2.5x that backward (two matmuls
forward, five backward: S and dP recomputed, dV, dQ, dK).

Rows (suite "attention"), one per (case, impl):
  case        "T{T}_hd{Dh}_{mode}"
  impl        a backend name of fastdit.ops.ATTENTION_BACKENDS ("auto" included), or
              "triton_deterministic" (backward with use_deterministic(True)),
              "math_compiled" (torch.compile of fastdit.reference.attention)
  mode        "fwd" (timed under no_grad: inference) or "bwd" (the backward alone, graph retained)
  T, Dh, H, B, dtype
              the shape; math backends run a smaller B where B H T² scores would not fit (B says)
  ms, spread_ms
              median time and the difference between two timings (harness.time_ms)
  tflops, pct_matmul
              achieved TFLOP/s and % of the measured bf16 matmul rate (None in smoke mode)
  picked      (auto rows) the backend auto chose for this shape; auto_slowdown_pct: how much
              slower auto ran than the fastest named backend of the case (by TFLOP/s)
  status      (rows of backends that cannot run here) why, e.g. "not installed", or "rejected this
              case: ..." where a forced third-party kernel refused the shape; ms None
and summary rows (impl "triton"): case "T{T}_{mode}_hd72_over_hd64" with hd72_over_hd64_per_flop
(triton's TFLOP/s at Dh 72 over Dh 64) and case "T{T}_hd{Dh}_{mode}_vs_best_other" with
vs_best_other (triton's TFLOP/s over the best other named backend's: > 1 means triton is faster).

FASTDIT_BENCH_ATTENTION_CONFIGS=1 adds rows timing the Triton kernels with one kernel's tiles
swapped, to revisit the defaults (chosen without a GPU) on one: impl "triton[fwd=128x64/w4/s3]"
(BLOCK_M x BLOCK_N, warps, stages), "triton[dkdv=...]" (backward, atomic dQ) and
"triton_deterministic[dq=...]" (the deterministic backward's dQ kernel).
Smoke mode (no CUDA): one tiny shape, Triton interpreted; it proves the suite runs.
"""

import importlib
import itertools
import os
from unittest import mock

import pytest
import torch
import torch._functorch.config

from benchmarks import cases, harness, workloads
from fastdit import ops, reference

SUITE = "attention"
attention_module = importlib.import_module("fastdit.ops._attention")

HEADLINE_SHAPES = [(T, cases.ATTENTION_HEAD_DIM) for T in cases.ATTENTION_T]
SHAPES = harness.shapes(
    full=HEADLINE_SHAPES + [(T, Dh) for T in (256, 1024, 4096) for Dh in (64, 72) if (T, Dh) not in HEADLINE_SHAPES],
    quick=HEADLINE_SHAPES + [(cases.ATTENTION_HEADLINE_T, cases.ATTENTION_BASELINE_HEAD_DIM)],
    smoke=[(32, 72)],
)
H, TOKENS = (2, 64) if harness.SMOKE else (16, 128 * 1024)
DTYPE = torch.bfloat16
MODES = ("fwd", "bwd")
MATH_SCORES = 2**31  # most B*H*T*T score elements the math backends are given (4 GiB in bf16)
IMPLS = [b for b in ops.ATTENTION_BACKENDS if b != "auto"] + ["triton_deterministic", "math_compiled", "auto"]
CONFIG_SWEEP = os.environ.get("FASTDIT_BENCH_ATTENTION_CONFIGS") == "1" and not harness.SMOKE
MIN_SECONDS = {"math_compiled": 15.0, "auto": 5.0}  # to start a case before the deadline; others
MIN_SECONDS_OTHER = 2.0
# fastdit's own implementations: an error is a failure. Another backend may refuse a case (a forced SDPA
# kernel's shape or stride limits): its row then says why, untimed, and the suite goes on.
FASTDIT_IMPLS = ("triton", "triton_deterministic", "auto", "math", "math_compiled")


def flops(B, T, Dh, mode):
    fwd = 4 * B * H * T * T * Dh
    return fwd if mode == "fwd" else 2.5 * fwd


def batch(T, impl):
    B = max(1, TOKENS // T)
    if impl in ("math", "sdpa_math", "math_compiled"):
        B = max(1, min(B, MATH_SCORES // (H * T * T)))
    return B


def runner(impl):
    """(q, k, v) -> o for an impl name; the forward also fixes which backward runs."""
    if impl == "math_compiled":
        # The timed backward retains its graph (one forward, many backwards), which a compiled backward
        # donating its buffers refuses (seen on the H200, torch 2.11): keep them.
        torch._functorch.config.donated_buffer = False
        return harness.compiled(reference.attention)
    if impl == "triton_deterministic":

        def run(q, k, v):
            with ops.use_deterministic(True):
                return ops.attention(q, k, v, backend="triton")

        return run
    return lambda q, k, v: ops.attention(q, k, v, backend=impl)


def timed_call(run, B, T, Dh, mode):
    """A no-argument callable timing one forward (no_grad) or one backward of `run`, and its inputs."""
    device = harness.DEVICE

    def make_inputs():
        qkv = torch.randn(B, T, 3, H, Dh, dtype=DTYPE, device=device)
        leaves = [t.requires_grad_(mode == "bwd") for t in qkv.unbind(2)]  # strided views, as in DiT
        if mode == "fwd":
            return leaves, None, None
        o = run(*leaves)
        return leaves, o, torch.randn_like(o)

    set_bytes = 3 * B * T * H * Dh * DTYPE.itemsize * (1 if mode == "fwd" else 3)
    next_set = harness.rotating(make_inputs, set_bytes)

    def fwd():
        leaves, _, _ = next_set()
        with torch.no_grad():
            run(*leaves)

    def bwd():
        leaves, o, do = next_set()
        torch.autograd.grad(o, leaves, do, retain_graph=True)

    return fwd if mode == "fwd" else bwd, next_set


def tflops_row(case, impl, mode, T, Dh, B, ms, spread_ms, **extra):
    tflops = flops(B, T, Dh, mode) / ms / 1e9 if ms else None
    peak = harness.ceilings()["bf16_matmul_tflops"]
    return harness.record(
        SUITE, case=case, impl=impl, mode=mode, T=T, Dh=Dh, H=H, B=B, dtype=str(DTYPE).replace("torch.", ""),
        ms=ms, spread_ms=spread_ms, tflops=tflops, pct_matmul=100 * tflops / peak if (tflops and peak) else None,
        **extra,
    )  # fmt: skip


def cannot_run(impl, T, Dh):
    """Why `impl` cannot run this case on this machine, or None."""
    backend = {"triton_deterministic": "triton", "math_compiled": "math"}.get(impl, impl)
    if backend == "auto":
        return None
    probe = torch.empty(1, T, H, Dh, dtype=DTYPE, device=harness.DEVICE)
    why = attention_module.unavailable(backend, probe)
    if why is None and impl == "math_compiled" and harness.compiled(reference.attention) is None:
        why = "torch.compile unavailable"
    return why


def measure(impl, T, Dh, mode):
    case = f"T{T}_hd{Dh}_{mode}"
    why = harness.skip_reason(MIN_SECONDS.get(impl, MIN_SECONDS_OTHER)) or cannot_run(impl, T, Dh)
    if why is not None:
        status = "not installed" if "not installed" in why else why
        return harness.not_run(
            SUITE, case, impl, status, mode=mode, T=T, Dh=Dh, H=H, dtype=str(DTYPE).replace("torch.", "")
        )
    B = batch(T, impl)
    try:
        fn, next_set = timed_call(runner(impl), B, T, Dh, mode)
        ms, spread = harness.time_ms(fn)
    except Exception as exc:
        if impl in FASTDIT_IMPLS and not workloads.is_oom(exc):
            raise  # fastdit's own backends fail the case
        why = (
            f"out of memory at batch {B}"
            if workloads.is_oom(exc)
            else f"rejected this case: {type(exc).__name__}: {exc}"
        )
        return harness.not_run(SUITE, case, impl, why.strip().splitlines()[0][:300], mode=mode, T=T, Dh=Dh, H=H, B=B,
                               dtype=str(DTYPE).replace("torch.", ""))  # fmt: skip
    extra = {}
    if impl == "auto":
        leaves = next_set()[0]
        with torch.enable_grad() if mode == "bwd" else torch.no_grad():
            extra["picked"] = ops.attention_backend(*leaves)
        best = _best_tflops(case, exclude=())
        extra["auto_slowdown_pct"] = 100 * (best / (flops(B, T, Dh, mode) / ms / 1e9) - 1) if best else None
    return tflops_row(case, impl, mode, T, Dh, B, ms, spread, **extra)


def _best_tflops(case, exclude):
    """The highest TFLOP/s a named backend (not in `exclude`) reached in `case` (rates, not times:
    the math backends may run a smaller batch)."""
    rates = [r["tflops"] for r in harness.RESULTS if r.get("case") == case and r.get("tflops")
             and r["impl"] in attention_module.BACKENDS and r["impl"] not in exclude]  # fmt: skip
    return max(rates, default=None)


CASES = [
    pytest.param(T, Dh, mode, impl, id=f"T{T}-hd{Dh}-{mode}-{impl}",
                 marks=[pytest.mark.headline] if (T, Dh) in HEADLINE_SHAPES and not harness.SMOKE else [])
    for (T, Dh), mode, impl in itertools.product(SHAPES, MODES, IMPLS) if not (impl == "triton_deterministic" and mode == "fwd")
]  # fmt: skip


@pytest.mark.parametrize("T, Dh, mode, impl", CASES)
def test_attention(T, Dh, mode, impl):
    measure(impl, T, Dh, mode)


def _row(case, impl):
    return next((r for r in harness.RESULTS if r.get("case") == case and r.get("impl") == impl and r.get("ms")), None)


def test_attention_summary():
    """Triton's Dh 72 / Dh 64 per-FLOP rate and its margin over the fastest other backend, per case."""
    for (T, Dh), mode in itertools.product(SHAPES, MODES):
        case = f"T{T}_hd{Dh}_{mode}"
        mine, best_other = _row(case, "triton"), _best_tflops(case, exclude=("triton",))
        if mine and best_other:
            harness.record(SUITE, case=f"{case}_vs_best_other", impl="triton", mode=mode, T=T, Dh=Dh,
                           vs_best_other=mine["tflops"] / best_other)  # fmt: skip
    for T, mode in itertools.product(sorted({s[0] for s in SHAPES}), MODES):
        hd64, hd72 = _row(f"T{T}_hd64_{mode}", "triton"), _row(f"T{T}_hd72_{mode}", "triton")
        if hd64 and hd72:
            harness.record(SUITE, case=f"T{T}_{mode}_hd72_over_hd64", impl="triton", mode=mode, T=T,
                           hd72_over_hd64_per_flop=hd72["tflops"] / hd64["tflops"])  # fmt: skip


# --------------------------------------------------------------------------------------------
# optional: the Triton tile configurations side by side (FASTDIT_BENCH_ATTENTION_CONFIGS=1)
# --------------------------------------------------------------------------------------------


FWD_VARIANTS = [(128, 64, 4, 3), (128, 64, 8, 3), (128, 128, 8, 3), (64, 64, 4, 3), (128, 32, 4, 4)]
DKDV_VARIANTS = [(32, 128, 4, 5), (32, 128, 8, 4), (64, 128, 8, 3), (32, 64, 4, 5)]
DQ_VARIANTS = [(128, 32, 4, 5), (128, 32, 8, 4), (64, 64, 4, 3)]  # timed through the deterministic backward
SWEEP = ([("fwd", "triton", 0, b) for b in FWD_VARIANTS] + [("bwd", "triton", 1, b) for b in DKDV_VARIANTS]
         + [("bwd", "triton_deterministic", 2, b) for b in DQ_VARIANTS])  # fmt: skip
CONFIG_CASES = (
    [shape + sweep for shape in SHAPES for sweep in SWEEP] if CONFIG_SWEEP else [(0, 0, "fwd", "triton", 0, ())]
)


@pytest.mark.skipif(not CONFIG_SWEEP, reason="set FASTDIT_BENCH_ATTENTION_CONFIGS=1 on a GPU to compare tile configs")
@pytest.mark.parametrize("T, Dh, mode, impl, kernel, blocks", CONFIG_CASES)
def test_attention_triton_configs(T, Dh, mode, impl, kernel, blocks):
    """The Triton kernels with one kernel's (BLOCK_M, BLOCK_N, warps, stages) replaced."""
    triton_module = importlib.import_module("fastdit.ops._attention_triton")
    chosen = list(triton_module.configs(Dh, DTYPE, torch.device(harness.DEVICE)))
    chosen[kernel] = triton_module.Blocks(*blocks)
    label = f"{impl}[{('fwd', 'dkdv', 'dq')[kernel]}={blocks[0]}x{blocks[1]}/w{blocks[2]}/s{blocks[3]}]"

    with mock.patch.object(triton_module, "configs", lambda head_dim, dtype, device: tuple(chosen)):
        row = measure(impl, T, Dh, mode)
    row["impl"] = label
