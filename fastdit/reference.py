"""Pure-PyTorch semantics of every fused op: the oracle for kernel tests and benchmarks.

Kept dumb and obviously right: each function is the formula from the op contract in
DESIGN.md, written with plain PyTorch in whatever dtype it is given (tests call it once in
the input dtype and once upcast to float64). Nothing here imports from fastdit.
"""

import torch
import torch.nn.functional as F


def modulate_layer_norm(x, shift, scale, eps=1e-6):
    """layer_norm(x) * (1 + scale) + shift; x (B, T, D), shift/scale (B, D)."""
    return F.layer_norm(x, x.shape[-1:], eps=eps) * (1 + scale[:, None]) + shift[:, None]


def gated_residual(x, y, gate):
    """x + gate * y; x, y (B, T, D), gate (B, D)."""
    return x + gate[:, None] * y


def gated_residual_modulate_layer_norm(x, y, gate, shift, scale, eps=1e-6):
    """(r, modulate_layer_norm(r, shift, scale)) with r = x + gate * y."""
    r = gated_residual(x, y, gate)
    return r, modulate_layer_norm(r, shift, scale, eps)


def patchify(x, patch_size):
    """(B, C, H, W) -> (B, T, C*p*p): tokens row-major over the (H/p, W/p) grid, features (c, i, j)."""
    B, C, H, W = x.shape
    p = patch_size
    x = x.reshape(B, C, H // p, p, W // p, p)  # (B, C, h, i, w, j)
    x = x.permute(0, 2, 4, 1, 3, 5)  # (B, h, w, C, i, j)
    return x.reshape(B, (H // p) * (W // p), C * p * p)


def unpatchify(x, patch_size, channels, grid_size=None):
    """(B, T, p*p*C) -> (B, C, H, W), features ordered (i, j, c) as DiT's final layer writes them.

    grid_size = (h, w) tokens; None means a square grid h = w = sqrt(T).
    """
    B, T, _ = x.shape
    p, c = patch_size, channels
    h, w = grid_size if grid_size is not None else (int(round(T**0.5)),) * 2
    x = x.reshape(B, h, w, p, p, c)
    x = torch.einsum("nhwpqc->nchpwq", x)
    return x.reshape(B, c, h * p, w * p)


def attention(q, k, v):
    """softmax(q k^T / sqrt(Dh)) v; q, k, v (B, T, H, Dh) -> (B, T, H, Dh)."""
    q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # (B, H, T, Dh)
    s = q @ k.transpose(-2, -1) * q.shape[-1] ** -0.5  # (B, H, T, T)
    return (s.softmax(dim=-1) @ v).transpose(1, 2)  # (B, T, H, Dh)
