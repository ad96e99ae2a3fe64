"""Judging a kernel against fastdit.reference, by the rule in DESIGN.md.

The reference runs twice: in the input dtype (`pt`, PyTorch's own rounding) and in float64
(`ref`). A result passes where |out - ref| <= 2 |pt - ref| + atol, atol being one unit of the
dtype's precision at the tensor's scale; float32 results pass within a relative error of 1e-5.
NaN never passes. A failure says where and by how much.
"""
import torch

DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def assert_close(name, out, pt, ref, rel_fp32=1e-5):
    assert out.shape == ref.shape, f"{name}: shape {tuple(out.shape)}, expected {tuple(ref.shape)}"
    assert out.dtype == pt.dtype, f"{name}: dtype {out.dtype}, expected {pt.dtype}"
    nan = torch.isnan(out)
    assert not nan.any(), f"{name}: {int(nan.sum())} NaN values, first at {tuple(nan.nonzero()[0].tolist())}"
    out64, pt64, ref64 = out.double(), pt.double(), ref.double()
    err = (out64 - ref64).abs()
    scale = ref64.abs().max().clamp_min(1e-30)
    if out.dtype == torch.float32:
        bound = torch.full_like(err, rel_fp32 * float(scale))
    else:
        bound = 2 * (pt64 - ref64).abs() + torch.finfo(out.dtype).eps * scale
    excess = err - bound
    if (excess > 0).any():
        i = tuple(int(j) for j in torch.unravel_index(excess.argmax(), excess.shape))
        raise AssertionError(
            f"{name} ({out.dtype}): {int((excess > 0).sum())} of {err.numel()} elements out of tolerance; "
            f"worst at {i}: got {out64[i].item():.6g}, float64 reference {ref64[i].item():.6g}, "
            f"PyTorch in {out.dtype} {pt64[i].item():.6g}; error {err[i].item():.3g} > allowed {bound[i].item():.3g} "
            f"(max |error| {err.max().item():.3g}, max |ref| {scale.item():.3g})"
        )


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
    for key, run in runs.items():
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
