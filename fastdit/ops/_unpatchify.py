"""unpatchify: DiT's final-layer tokens (B, T, p*p*C) -> image (B, C, H, W).

Kernels (impl): the layout kernel of _layout.py (Triton) or _native.py (CUDA), features in (i, j, c)
order; the backward is the same permutation in the other direction.
"""

import torch
from torch import Tensor

from .. import reference
from . import _layout
from ._checks import check_tokens
from ._dispatch import kernels
from ._triton_utils import implementation


@torch.library.custom_op("fastdit::unpatchify_fwd", mutates_args=())
def _fwd(x: Tensor, patch_size: int, channels: int, h: int, w: int, impl: str) -> Tensor:
    return kernels(impl, _layout).to_image(x, patch_size, channels, h, w, channels_last=True)  # (B, C, H, W)


@_fwd.register_fake
def _(x, patch_size, channels, h, w, impl):
    return _layout.image_like(x, patch_size, channels, h, w)


@torch.library.custom_op("fastdit::unpatchify_bwd", mutates_args=())
def _bwd(grad: Tensor, patch_size: int, impl: str) -> Tensor:
    return kernels(impl, _layout).to_tokens(grad, patch_size, channels_last=True)  # (B, T, p*p*C)


@_bwd.register_fake
def _(grad, patch_size, impl):
    return _layout.tokens_like(grad, patch_size)


def _setup(ctx, inputs, output):
    ctx.patch_size, ctx.impl = inputs[1], inputs[-1]


def _backward(ctx, grad):
    return _bwd(grad, ctx.patch_size, ctx.impl), None, None, None, None, None


_fwd.register_autograd(_backward, setup_context=_setup)


def unpatchify(x, patch_size, channels, grid_size=None):
    """(B, T, p*p*C) -> (B, C, H, W), features (i, j, c); grid_size (h, w) defaults to square."""
    h, w = check_tokens(x, patch_size, channels, grid_size)
    impl = implementation("x", x)
    if impl == "reference":
        return reference.unpatchify(x, patch_size, channels, (h, w))
    kernels(impl, _layout).check_features(x.shape[-1])
    return _fwd(x, patch_size, channels, h, w, impl)
