"""Judging a kernel against fastdit.reference, by the rule in DESIGN.md.

The reference runs twice: in the input dtype (`pt`, PyTorch's own rounding) and in float64
(`ref`). A float16/bfloat16 result passes when, element by element,

    |out - ref| <= 2 |pt - ref| + ulp + K_NOISE * noise,

`ulp` being the spacing of the output dtype at that element's |ref| (rounding a correct value
costs up to half of it; an element where pt happens to be exact still gets it) and `noise` the
RMS of PyTorch's own error over the tensor; and when its error has no systematic part beyond
PyTorch's: no bias, no scale error (components along 1 and along ref, each within twice
PyTorch's plus Z_SYSTEMATIC * noise).

Why a floor in units of noise: a kernel that rounds intermediates (attention's P and dS, the fused
op's stored r) rounds them differently from pt, so where pt happens to land on ref its error is
its neighbours', not zero. Measured over this suite's fp16/bf16 tensors, correct kernels need up
to 4.6 noise there (attention gradients at Dh = 128, fp16) and show systematic components up to
3.5 noise. Why the systematic checks: no per-element floor above that can see a uniform bias of
1 % of the median output in bfloat16, which is about PyTorch's own RMS error there; summed over
N elements it stands sqrt(N) times out of the noise (tests/test_helpers.py).

Where PyTorch itself gives inf or NaN it earns no allowance. float32 results pass within
2 |pt - ref| + 1e-5 of the tensor's largest |ref| (PyTorch's own float32 error matters only for
ill-conditioned inputs, e.g. attention logits near -100). NaN never passes. A failure says where and
by how much.
"""

from pathlib import Path

import torch

DTYPES = (torch.float32, torch.float16, torch.bfloat16)
# The GPU machine's Triton, beside the installed one (.ci/run: pip install --target .ci/triton-3.6 triton==3.6.0 --no-deps).
TRITON_36 = Path(__file__).resolve().parents[1] / ".ci" / "triton-3.6"
K_NOISE = 8.0  # per-element floor, in PyTorch's RMS errors
Z_SYSTEMATIC = 8.0  # allowance for a bias or scale error's component, in PyTorch's RMS errors


def ulp(values, dtype):
    """Spacing of `dtype` at |values| (float64): 2**floor(log2 |v|) * eps; subnormal spacing below tiny."""
    finfo = torch.finfo(dtype)
    return finfo.eps * torch.exp2(torch.floor(torch.log2(values.abs().clamp_min(finfo.tiny))))


def _check_low_precision(name, out64, pt64, ref64, own, dtype):
    err = out64 - ref64
    spacing = ulp(ref64, dtype)
    noise = float((own.square().mean() + spacing.square().mean() / 12).sqrt())  # PyTorch's RMS error, or a rounding's
    _report(name, dtype, out64, pt64, ref64, err.abs(), 2 * own.abs() + spacing + K_NOISE * noise)
    for what, direction in (("a bias", torch.ones_like(ref64)), ("a scale error", ref64)):
        # The error's component along a unit direction: for independent errors of RMS `noise`, about noise.
        unit = direction / direction.norm().clamp_min(1e-300)
        got, pt_got = float((err * unit).sum()), float((own * unit).sum())
        allowed = 2 * abs(pt_got) + Z_SYSTEMATIC * noise
        assert abs(got) <= allowed, (
            f"{name} ({dtype}): systematic error ({what}): its component {got:.3g} exceeds {allowed:.3g} "
            f"(PyTorch's {pt_got:.3g}, PyTorch's RMS error {noise:.3g}, {err.numel()} elements)"
        )


def _report(name, dtype, out64, pt64, ref64, err, bound):
    excess = err - bound
    if (excess > 0).any():
        i = tuple(int(j) for j in torch.unravel_index(excess.argmax(), excess.shape))
        raise AssertionError(
            f"{name} ({dtype}): {int((excess > 0).sum())} of {err.numel()} elements out of tolerance; "
            f"worst at {i}: got {out64[i].item():.6g}, float64 reference {ref64[i].item():.6g}, "
            f"PyTorch in {dtype} {pt64[i].item():.6g}; error {err[i].item():.3g} > allowed {bound[i].item():.3g} "
            f"(max |error| {err.max().item():.3g}, max |ref| {ref64.abs().max().item():.3g})"
        )


def assert_close(name, out, pt, ref, rel_fp32=1e-5):
    assert out.shape == ref.shape, f"{name}: shape {tuple(out.shape)}, expected {tuple(ref.shape)}"
    assert out.dtype == pt.dtype, f"{name}: dtype {out.dtype}, expected {pt.dtype}"
    nan = torch.isnan(out)
    assert not nan.any(), f"{name}: {int(nan.sum())} NaN values, first at {tuple(nan.nonzero()[0].tolist())}"
    out64, pt64, ref64 = (t.detach().double() for t in (out, pt, ref))
    assert ref64.isfinite().all(), f"{name}: the float64 reference is not finite: the test's inputs are out of range"
    own = torch.where((pt64 - ref64).isfinite(), pt64 - ref64, 0.0)  # PyTorch overflowed there: no credit
    if out.dtype == torch.float32:
        err = (out64 - ref64).abs()
        _report(name, out.dtype, out64, pt64, ref64, err, 2 * own.abs() + rel_fp32 * float(ref64.abs().max()))
    else:
        _check_low_precision(name, out64, pt64, ref64, own, out.dtype)


def reference_pair(fn, inputs, grad_out=None):
    """Run `fn` on `inputs` in their dtype and in float64; return (pt, ref) outputs and grads.

    inputs: tensors (requires_grad is set here); grad_out: per-output upstream gradients
    (random when None). Returns dicts {"out": [...], "grad": [...]} for pt and ref.
    """
    runs = {}
    for key, cast in (("pt", lambda t: t), ("ref", lambda t: t.double())):
        leaves = [cast(t.detach()).requires_grad_() for t in inputs]
        outs = fn(*leaves)
        outs = list(outs) if isinstance(outs, (tuple, list)) else [outs]
        runs[key] = {"out": outs, "leaves": leaves}
    if grad_out is None:
        grad_out = [torch.randn_like(o) for o in runs["pt"]["out"]]
    for run in runs.values():
        gs = [g.to(o.dtype) for g, o in zip(grad_out, run["out"])]
        run["grad"] = torch.autograd.grad(run["out"], run["leaves"], gs, allow_unused=True)
    return runs["pt"], runs["ref"], grad_out


def assert_rel_close(name, got, expected, rel):
    """max |got - expected| <= rel * max |expected|: a float32 result against official float32 numbers
    computed another way (other summation orders). NaN never passes; a failure says where."""
    assert got.shape == expected.shape, f"{name}: shape {tuple(got.shape)}, expected {tuple(expected.shape)}"
    assert not torch.isnan(got).any(), f"{name}: NaN"
    err = (got.double() - expected.double()).abs()
    scale = expected.double().abs().max().clamp_min(1e-30)
    i = tuple(int(j) for j in torch.unravel_index(err.argmax(), err.shape)) if err.numel() else ()
    assert err.numel() == 0 or err[i] <= rel * scale, (
        f"{name}: max |error| {err[i]:.3g} at {i} (got {got[i].item():.6g}, expected {expected[i].item():.6g}) "
        f"> {rel:g} x max |expected| {scale:.3g}"
    )
