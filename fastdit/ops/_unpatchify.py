"""unpatchify: DiT's final-layer tokens (B, T, p*p*C) -> image (B, C, H, W).

Triton: the layout kernel of _layout.py, features in (i, j, c) order; the backward is the same
permutation in the other direction.
"""
import torch
from torch import Tensor

from .. import reference
from . import _layout
from ._checks import check_tokens
from ._triton_utils import use_triton


@torch.library.custom_op("fastdit::unpatchify_fwd", mutates_args=())
def _fwd(x: Tensor, patch_size: int, channels: int, h: int, w: int) -> Tensor:
    return _layout.to_image(x, patch_size, channels, h, w, channels_last=True)  # (B, C, H, W)


@_fwd.register_fake
def _(x, patch_size, channels, h, w):
    return _layout.image_like(x, patch_size, channels, h, w)


@torch.library.custom_op("fastdit::unpatchify_bwd", mutates_args=())
def _bwd(grad: Tensor, patch_size: int) -> Tensor:
    return _layout.to_tokens(grad, patch_size, channels_last=True)  # (B, T, p*p*C)


@_bwd.register_fake
def _(grad, patch_size):
    return _layout.tokens_like(grad, patch_size)


def _setup(ctx, inputs, output):
    ctx.patch_size = inputs[1]


def _backward(ctx, grad):
    return _bwd(grad, ctx.patch_size), None, None, None, None


_fwd.register_autograd(_backward, setup_context=_setup)


def unpatchify(x, patch_size, channels, grid_size=None):
    """(B, T, p*p*C) -> (B, C, H, W), features (i, j, c); grid_size (h, w) defaults to square."""
    h, w = check_tokens(x, patch_size, channels, grid_size)
    if not use_triton("x", x):
        return reference.unpatchify(x, patch_size, channels, (h, w))
    _layout.check_features(x.shape[-1])
    return _fwd(x, patch_size, channels, h, w)
