"""modulate_layer_norm: LayerNorm (no affine) then adaLN modulation, x * (1 + scale) + shift.

Kernels (impl): the row kernels of _rows.py (Triton) or _native.py (CUDA) with the norm only, one
pass over the rows each way; the backward saves x and the per-row fp32 mean and rstd (never the
normalised output).
"""

import torch
from torch import Tensor

from .. import reference
from . import _rows
from ._checks import check_eps, check_rows
from ._dispatch import kernels
from ._triton_utils import implementation


@torch.library.custom_op("fastdit::modulate_layer_norm_fwd", mutates_args=())
def _fwd(x: Tensor, shift: Tensor, scale: Tensor, eps: float, impl: str) -> tuple[Tensor, Tensor, Tensor]:
    _, out, mean, rstd = kernels(impl, _rows).forward(x, shift=shift, scale=scale, eps=eps)
    return out, mean, rstd  # (B, T, D), (B, T), (B, T)


@_fwd.register_fake
def _(x, shift, scale, eps, impl):
    return _rows.forward_buffers(x, shift=shift, scale=scale)[1:]


@torch.library.custom_op("fastdit::modulate_layer_norm_bwd", mutates_args=())
def _bwd(grad_out: Tensor, x: Tensor, scale: Tensor, mean: Tensor, rstd: Tensor, impl: str) -> tuple[Tensor, Tensor]:
    dx, _, sums = kernels(impl, _rows).backward(x.dtype, grad_out=grad_out, r=x, scale=scale, mean=mean, rstd=rstd)
    return dx, sums  # (B, T, D); (2, B, D) fp32: d-shift, d-scale


@_bwd.register_fake
def _(grad_out, x, scale, mean, rstd, impl):
    dx, _, sums = _rows.backward_fake(x.dtype, grad_out=grad_out)
    return dx, sums


def _setup(ctx, inputs, output):
    x, shift, scale, _, ctx.impl = inputs
    _, mean, rstd = output
    ctx.mark_non_differentiable(mean, rstd)
    ctx.save_for_backward(x, scale, mean, rstd)
    ctx.shift_dtype = shift.dtype


def _backward(ctx, grad_out, _grad_mean, _grad_rstd):
    x, scale, mean, rstd = ctx.saved_tensors
    dx, sums = _bwd(grad_out, x, scale, mean, rstd, ctx.impl)
    return dx, sums[0].to(ctx.shift_dtype), sums[1].to(scale.dtype), None, None


_fwd.register_autograd(_backward, setup_context=_setup)


def modulate_layer_norm(x, shift, scale, eps=1e-6):
    """layer_norm(x) * (1 + scale[:, None]) + shift[:, None]; x (B, T, D), shift/scale (B, D).

    Rows of huge spread: the Triton kernels stay accurate (float32 rounding, against float64) while
    D * max|x| < 3.4e38. PyTorch's layer_norm, which the reference backend runs (and `auto` on CPU),
    returns `shift` for a row whose squared deviations from its mean sum past 3.4e38 (a standard
    deviation of 5.4e17 at D = 1152; measured on CPU in float32 and bfloat16), and NaN further out.
    """
    check_rows(x, "x", {"shift": shift, "scale": scale})
    check_eps(eps)
    impl = implementation("x", x, shift, scale)
    if impl == "reference":
        return reference.modulate_layer_norm(x, shift, scale, eps)
    kernels(impl, _rows).check_width(x.shape[-1])
    return _fwd(x, shift, scale, float(eps), impl)[0]
