"""gated_residual_modulate_layer_norm: a gated residual and the LayerNorm+modulate after it, in one pass.

Kernels (impl): the row kernels of _rows.py (Triton) or _native.py (CUDA) with both the residual
and the norm. The forward reads x,
y (and b's gate, shift, scale rows) once and writes r and the modulated output; the backward
saves r, y, gate, scale and the per-row fp32 mean and rstd, and writes dx, dy and the partial
sums of d-gate, d-shift and d-scale in one pass.

keep_x=True saves x instead of r, and the backward recomputes r = x + gate * y, bit for bit, in
the same pass (reading x where it read r, and y, which d-gate reads anyway, once). That is for a
caller that keeps x anyway: in DiT's chain of residuals each op's r is the next op's x, so
alternating the two (DiT.forward) keeps one residual stream per block instead of two.
"""

import torch
from torch import Tensor

from .. import reference
from . import _rows
from ._checks import check_eps, check_like, check_rows
from ._dispatch import kernels
from ._triton_utils import implementation


@torch.library.custom_op("fastdit::gated_residual_modulate_layer_norm_fwd", mutates_args=())
def _fwd(
    x: Tensor, y: Tensor, gate: Tensor, shift: Tensor, scale: Tensor, eps: float, impl: str, keep_x: bool
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    return kernels(impl, _rows).forward(
        x, y=y, gate=gate, shift=shift, scale=scale, eps=eps
    )  # r, out (B, T, D); mean, rstd (B, T)


@_fwd.register_fake
def _(x, y, gate, shift, scale, eps, impl, keep_x):
    return _rows.forward_buffers(x, y=y, gate=gate, shift=shift, scale=scale)


@torch.library.custom_op("fastdit::gated_residual_modulate_layer_norm_bwd", mutates_args=())
def _bwd(
    grad_r: Tensor, grad_out: Tensor, r: Tensor, y: Tensor, gate: Tensor, scale: Tensor, mean: Tensor,
    rstd: Tensor, x_dtype: torch.dtype, impl: str, recompute_r: bool,
) -> tuple[Tensor, Tensor, Tensor]:  # fmt: skip
    return kernels(impl, _rows).backward(
        x_dtype,
        grad_out=grad_out,
        r=r,
        scale=scale,
        mean=mean,
        rstd=rstd,
        grad_r=grad_r,
        y=y,
        gate=gate,
        recompute_r=recompute_r,
    )  # dx, dy (B, T, D); (3, B, D) fp32: d-shift, d-scale, d-gate


@_bwd.register_fake
def _(grad_r, grad_out, r, y, gate, scale, mean, rstd, x_dtype, impl, recompute_r):
    return _rows.backward_fake(x_dtype, grad_out=grad_out, grad_r=grad_r, y=y)


def _setup(ctx, inputs, output):
    x, y, gate, shift, scale, _, ctx.impl, keep_x = inputs
    r, _, mean, rstd = output
    ctx.mark_non_differentiable(mean, rstd)
    ctx.recompute_r = keep_x and _rows.can_recompute_r(x, y, gate, shift, scale)
    ctx.save_for_backward(x if ctx.recompute_r else r, y, gate, scale, mean, rstd)
    ctx.dtypes = x.dtype, shift.dtype


def _backward(ctx, grad_r, grad_out, _grad_mean, _grad_rstd):
    r, y, gate, scale, mean, rstd = ctx.saved_tensors  # r: x where recompute_r
    x_dtype, shift_dtype = ctx.dtypes
    dx, dy, sums = _bwd(grad_r, grad_out, r, y, gate, scale, mean, rstd, x_dtype, ctx.impl, ctx.recompute_r)
    return dx, dy, sums[2].to(gate.dtype), sums[0].to(shift_dtype), sums[1].to(scale.dtype), None, None, None


_fwd.register_autograd(_backward, setup_context=_setup)


def gated_residual_modulate_layer_norm(x, y, gate, shift, scale, eps=1e-6, *, keep_x=False):
    """(r, modulate_layer_norm(r, shift, scale, eps)) with r = x + gate[:, None] * y.

    keep_x=True: keep x for the backward instead of r, and recompute r there (the same values and
    gradients; less memory for a caller that keeps x anyway, see the module's docstring).

    Rows of huge spread: the Triton kernels stay accurate (float32 rounding, against float64) while
    D * max|r| < 3.4e38. PyTorch's layer_norm, which the reference backend runs (and `auto` on CPU),
    returns `shift` for a row of r whose squared deviations from its mean sum past 3.4e38 (a standard
    deviation of 5.4e17 at D = 1152; measured on CPU in float32 and bfloat16), and NaN further out.
    """
    check_rows(x, "x", {"gate": gate, "shift": shift, "scale": scale})
    check_like("y", y, x)
    check_eps(eps)
    if not isinstance(keep_x, bool):
        raise TypeError(f"keep_x must be True or False, got {keep_x!r}")
    impl = implementation("x", x, y, gate, shift, scale)
    if impl == "reference":
        return reference.gated_residual_modulate_layer_norm(x, y, gate, shift, scale, eps)
    kernels(impl, _rows).check_width(x.shape[-1])
    r, out, _, _ = _fwd(x, y, gate, shift, scale, float(eps), impl, keep_x)
    return r, out
