"""gated_residual: the adaLN-Zero residual update x + gate * y.

Kernels (impl): the row kernels of _rows.py (Triton) or _native.py (CUDA) with the residual only.
Backward: dx is the incoming gradient itself (no kernel, no copy); one pass writes dy and
d-gate's partial sums.
"""

import torch
from torch import Tensor

from .. import reference
from . import _rows
from ._checks import check_like, check_rows
from ._dispatch import kernels
from ._triton_utils import implementation


@torch.library.custom_op("fastdit::gated_residual_fwd", mutates_args=())
def _fwd(x: Tensor, y: Tensor, gate: Tensor, impl: str) -> Tensor:
    return kernels(impl, _rows).forward(x, y=y, gate=gate)[0]  # (B, T, D)


@_fwd.register_fake
def _(x, y, gate, impl):
    return _rows.forward_buffers(x, y=y, gate=gate)[0]


@torch.library.custom_op("fastdit::gated_residual_bwd", mutates_args=())
def _bwd(grad: Tensor, y: Tensor, gate: Tensor, impl: str) -> tuple[Tensor, Tensor]:
    _, dy, sums = kernels(impl, _rows).backward(y.dtype, grad_r=grad, y=y, gate=gate)
    return dy, sums  # (B, T, D); (1, B, D) fp32: d-gate


@_bwd.register_fake
def _(grad, y, gate, impl):
    _, dy, sums = _rows.backward_fake(y.dtype, grad_r=grad, y=y)
    return dy, sums


def _setup(ctx, inputs, output):
    x, y, gate, ctx.impl = inputs
    ctx.save_for_backward(y, gate)
    ctx.x_dtype = x.dtype


def _backward(ctx, grad):
    y, gate = ctx.saved_tensors
    dy, sums = _bwd(grad, y, gate, ctx.impl)
    return grad.to(ctx.x_dtype), dy, sums[0].to(gate.dtype), None


_fwd.register_autograd(_backward, setup_context=_setup)


def gated_residual(x, y, gate):
    """x + gate[:, None] * y; x, y (B, T, D), gate (B, D)."""
    check_rows(x, "x", {"gate": gate})
    check_like("y", y, x)
    impl = implementation("x", x, y, gate)
    if impl == "reference":
        return reference.gated_residual(x, y, gate)
    kernels(impl, _rows).check_width(x.shape[-1])
    return _fwd(x, y, gate, impl)
