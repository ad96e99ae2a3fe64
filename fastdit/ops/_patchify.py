"""patchify: image (B, C, H, W) -> patch tokens (B, T, C*p*p).

Kernels (impl): the layout kernel of _layout.py (Triton) or _native.py (CUDA), features in (c, i, j)
order; the backward is the same permutation in the other direction.
"""

import torch
from torch import Tensor

from .. import reference
from . import _layout
from ._checks import check_image
from ._dispatch import kernels
from ._triton_utils import implementation


@torch.library.custom_op("fastdit::patchify_fwd", mutates_args=())
def _fwd(x: Tensor, patch_size: int, impl: str) -> Tensor:
    return kernels(impl, _layout).to_tokens(x, patch_size, channels_last=False)  # (B, T, C*p*p)


@_fwd.register_fake
def _(x, patch_size, impl):
    return _layout.tokens_like(x, patch_size)


@torch.library.custom_op("fastdit::patchify_bwd", mutates_args=())
def _bwd(grad: Tensor, patch_size: int, channels: int, h: int, w: int, impl: str) -> Tensor:
    return kernels(impl, _layout).to_image(grad, patch_size, channels, h, w, channels_last=False)  # (B, C, H, W)


@_bwd.register_fake
def _(grad, patch_size, channels, h, w, impl):
    return _layout.image_like(grad, patch_size, channels, h, w)


def _setup(ctx, inputs, output):
    x, ctx.patch_size, ctx.impl = inputs
    ctx.image_shape = x.shape


def _backward(ctx, grad):
    _, C, H, W = ctx.image_shape
    p = ctx.patch_size
    return _bwd(grad, p, C, H // p, W // p, ctx.impl), None, None


_fwd.register_autograd(_backward, setup_context=_setup)


def patchify(x, patch_size):
    """(B, C, H, W) -> (B, T, C*p*p); T = (H/p)(W/p) row-major, features (c, i, j) like a Conv2d weight."""
    check_image(x, patch_size)
    impl = implementation("x", x)
    if impl == "reference":
        return reference.patchify(x, patch_size)
    kernels(impl, _layout).check_features(x.shape[1] * patch_size**2)
    return _fwd(x, patch_size, impl)
