"""What the five fused-kernel suites (bench_modulate_layer_norm, bench_gated_residual,
bench_gated_residual_modulate_layer_norm, bench_patchify, bench_unpatchify) share.

Each suite times, per case (shape) and mode, every implementation side by side in one process:
  eager    fastdit.reference in PyTorch eager
  compile  torch.compile(fastdit.reference), compiled for the case's static shapes
  triton   fastdit.ops.<op> on the triton backend
  cuda     fastdit.ops.<op> on the cuda backend (the native kernels of kernels/); where they cannot
           run, a row saying why: "not built" (no library), "needs a CUDA GPU" (CPU smoke mode)
  apex     (ops with a LayerNorm) NVIDIA apex FusedLayerNorm + eager modulate (+ eager gated
           residual); where apex is not importable, a row with status "not installed"
Modes: "fwd" (the forward alone, no autograd graph: inference), "bwd" (the backward alone, from a
retained graph with a fixed upstream gradient), "fwd+bwd" (forward and backward: a training step's
share).

Bytes are counted explicitly, per suite and mode (formulas in each suite's docstring): what the
op must move at the least, each input read once and each output written once (plus the per-row
fp32 mean and rstd where the op saves them for its backward). The same count divides every
implementation's time, so GB/s is effective bandwidth and the rows compare directly; the Triton
kernels' own extra traffic (the backward's per-chunk partial sums, ~chunks/T of a tensor per
reduced vector) counts against them.

Cases run the headline shape first (benchmarks/cases.py), then, time allowing, the others; a
case that would not fit the time budget is recorded as skipped, with the reason.

Rows (harness.memory_bound_row / harness.not_run), one per (case, mode, impl):
  suite       the op's name, e.g. "modulate_layer_norm"
  case        "B=256,T=256,D=1152" (row ops) or "B=256,C=4,H=32,W=32,p=2" (layout ops)
  impl        eager | compile | triton | cuda | apex
  mode        fwd | bwd | fwd+bwd
  dtype       "bfloat16"
  B, T, D, tokens   batch, tokens per image, features per token (layout ops: C*p*p), B*T
  ms, spread_ms, bytes, gbs, pct_copy_bw   time (median of two timings, and their difference),
              bytes moved, GB/s and % of the measured copy bandwidth (None in smoke mode)
  status      why a row has no time (e.g. "not installed", "not built", or skipped for the time budget)
"""

import pytest
import torch

from benchmarks import cases, harness
from fastdit import ops
from fastdit.ops import _native

MODES = ("fwd", "bwd", "fwd+bwd")
DTYPE = getattr(torch, cases.KERNEL["dtype"])
# Row ops: DiT widths x 8K..64K tokens of 256-token images (DiT /2 at 256²), the 512² case, and an
# odd multiple of 72 (1080 = 72 x 15: not a multiple of 16 elements, padded by the Triton kernels
# to 2048 lanes, exact in the native ones); the headline shape first.
ROW_HEADLINE = tuple(cases.KERNEL[k] for k in "BTD")
ODD_72 = (256, 256, 1080)
ROW_SHAPES = (
    [ROW_HEADLINE]
    + [(B, 256, D) for D in (384, 768, 1024, 1152) for B in (32, 64, 128, 256) if (B, 256, D) != ROW_HEADLINE]
    + [(64, 1024, 1152), ODD_72]
)
# quick: after the headline, where the native kernels should win clearly (D 384, odd multiples of 72)
ROW_SHAPES_QUICK = [ROW_HEADLINE, (256, 256, 384), ODD_72, (32, 256, 1152), (64, 1024, 1152)]
SMOKE_ROW_SHAPE = (2, 16, 72)
# Layout ops: DiT latents of 256² (32x32) and 512² (64x64) images, batches 32..256, patch 2, 4, 8;
# the headline shape first.
LAYOUT_HEADLINE = tuple(cases.LAYOUT[k] for k in ("B", "H", "W", "p"))
LAYOUT_SHAPES = (
    [LAYOUT_HEADLINE] + [(B, 32, 32, 2) for B in (32, 64, 128)] + [(64, 64, 64, 2), (256, 32, 32, 4), (256, 32, 32, 8)]
)
LAYOUT_SHAPES_QUICK = [LAYOUT_HEADLINE, (64, 64, 64, 2)]
SMOKE_LAYOUT_SHAPE = (2, 8, 8, 2)
MIN_SECONDS = {"compile": 15.0}  # to start a case before the deadline (compile: compiling); others
MIN_SECONDS_OTHER = 2.0


def row_cases(impls):
    """pytest parameters (shape, mode, impl) of a row op's suite in this mode."""
    return _cases(ROW_SHAPES, ROW_SHAPES_QUICK, SMOKE_ROW_SHAPE, impls)


def layout_cases(impls):
    """pytest parameters (shape, mode, impl) of a layout op's suite in this mode."""
    return _cases(LAYOUT_SHAPES, LAYOUT_SHAPES_QUICK, SMOKE_LAYOUT_SHAPE, impls)


def _cases(full, quick, smoke, impls):
    """(shape, mode, impl) parameters, each shape's rows together; the first shape (the headline's)
    is marked `headline` so it runs before every other suite's other cases."""
    shapes = harness.shapes(full, quick, [smoke])
    mark = [] if harness.SMOKE else [pytest.mark.headline]
    return [pytest.param(s, m, i, marks=mark if s == full[0] else []) for s in shapes for m in MODES for i in impls]


def implementations(op, ref, **third_party):
    """{impl name: factory(case, D) -> the callable to time, or None ("not installed") or a string
    (why not) where it cannot run}."""

    def on_backend(name):
        def run(*args):
            with ops.use_backend(name):
                return op(*args)

        return run

    def cuda(case, D):
        try:
            _native.library()
        except _native.NativeUnavailable:
            return "not built"
        return on_backend("cuda") if harness.DEVICE == "cuda" else "needs a CUDA GPU"

    return {
        "eager": lambda case, D: ref,
        "compile": lambda case, D: compiled_reference(ref, case),
        "triton": lambda case, D: on_backend("triton"),
        "cuda": cuda,
        **third_party,
    }


_compiled = {}


def compiled_reference(fn, case):
    """torch.compile(fn) traced for `case`'s static shapes. Dynamo caches per code object: clearing
    it when a new case starts keeps later shapes from being traced as dynamic, or from hitting the
    recompile limit and silently running eager."""
    key = (fn, case)
    if key not in _compiled:
        torch._dynamo.reset()
        _compiled.clear()
        _compiled[key] = harness.compiled(fn)
    return _compiled[key]


def apex_layer_norm(D):
    """apex's FusedLayerNorm (no affine), or None where NVIDIA apex is not importable."""
    try:
        from apex.normalization import FusedLayerNorm
    except ImportError:
        return None
    return FusedLayerNorm(D, eps=1e-6, elementwise_affine=False).to(harness.DEVICE)


def _outputs(out):
    return list(out) if isinstance(out, (tuple, list)) else [out]


def timed_call(fn, make_inputs, mode, set_bytes):
    """A no-argument callable running one `mode` of fn on rotating inputs.

    make_inputs(requires_grad) -> (leaves, args): fn(*args) runs the op; gradients go to leaves.
    """
    if mode == "fwd":
        next_set = harness.rotating(lambda: make_inputs(False)[1], set_bytes)

        def call():
            with torch.no_grad():
                fn(*next_set())

        return call

    def make():
        leaves, args = make_inputs(True)
        outs = _outputs(fn(*args))
        return leaves, args, outs, [torch.randn_like(o) for o in outs]

    next_set = harness.rotating(make, set_bytes)

    def call():
        leaves, args, outs, grads = next_set()
        if mode == "fwd+bwd":
            outs = _outputs(fn(*args))
        torch.autograd.grad(outs, leaves, grads, retain_graph=mode == "bwd")

    return call


def measure(suite, case, fields, impl, factory, make_inputs, mode, nbytes):
    """Time impl's callable (factory() -> it; None: not installed; a string: why it cannot run) in
    `mode` and record its row; record why instead when it cannot run or the time budget would not fit it."""
    extra = dict(mode=mode, dtype=str(DTYPE).replace("torch.", ""), **fields)
    why = harness.skip_reason(MIN_SECONDS.get(impl, MIN_SECONDS_OTHER))
    fn = None if why else factory()
    if why or fn is None or isinstance(fn, str):
        return harness.not_run(suite, case, impl, why or fn or "not installed", **extra)
    ms, spread = harness.time_ms(timed_call(fn, make_inputs, mode, nbytes))
    return harness.memory_bound_row(suite, case, impl, ms, spread, nbytes, **extra)


def row_inputs(B, T, D, tensors, vectors):
    """make_inputs for a row op: `tensors` (B, T, D) then `vectors` (B, D) views of one (B, 6D)
    adaLN output, as DiT passes them; the gradient of a vector reaches that (B, 6D) leaf."""

    def make(requires_grad):
        big = [
            torch.randn(B, T, D, dtype=DTYPE, device=harness.DEVICE, requires_grad=requires_grad)
            for _ in range(tensors)
        ]
        ada = torch.randn(B, 6 * D, dtype=DTYPE, device=harness.DEVICE, requires_grad=requires_grad)
        return [*big, ada], [*big, *ada.chunk(6, dim=1)[:vectors]]

    return make


def run_row_case(suite, impls, shape, mode, impl, tensors, vectors, traffic):
    """One row op's (shape, mode, impl) case: `tensors` (B, T, D) and `vectors` (B, D) inputs;
    traffic(B, T, D) -> (forward bytes, backward bytes)."""
    B, T, D = shape
    fields = dict(B=B, T=T, D=D, tokens=B * T)
    case = f"B={B},T={T},D={D}"
    fwd, bwd = traffic(B, T, D)
    nbytes = {"fwd": fwd, "bwd": bwd, "fwd+bwd": fwd + bwd}[mode]
    measure(
        suite, case, fields, impl, lambda: impls[impl](case, D), row_inputs(B, T, D, tensors, vectors), mode, nbytes
    )


def apex_modulate_layer_norm(D):
    """apex's FusedLayerNorm, then the modulation in eager PyTorch (None without apex)."""
    ln = apex_layer_norm(D)
    return ln and (lambda x, shift, scale: ln(x) * (1 + scale[:, None]) + shift[:, None])


def run_layout_case(suite, impls, shape, mode, impl, channels, from_tokens):
    """One layout op's (shape, mode, impl) case: shape (B, H, W, p) of the image with `channels`;
    the op reads tokens (unpatchify: fn(tokens, p, channels)) or the image (patchify: fn(image, p)).
    Bytes: each direction reads and writes every element once, 2 B C H W e per pass (fwd+bwd: two)."""
    B, H, W, p = shape
    T, F = H * W // p**2, channels * p * p

    def make(requires_grad):
        size = (B, T, F) if from_tokens else (B, channels, H, W)
        x = torch.randn(size, dtype=DTYPE, device=harness.DEVICE, requires_grad=requires_grad)
        return [x], [x, p, channels] if from_tokens else [x, p]

    fields = dict(B=B, T=T, D=F, tokens=B * T, C=channels, H=H, W=W, p=p)
    case = f"B={B},C={channels},H={H},W={W},p={p}"
    nbytes = 2 * B * T * F * DTYPE.itemsize * (2 if mode == "fwd+bwd" else 1)
    measure(suite, case, fields, impl, lambda: impls[impl](case, F), make, mode, nbytes)
