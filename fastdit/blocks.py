"""The DiT paper's other block designs (its §3.2 and Figure 5), on the same fused ops as adaLN-Zero.

    DiT(..., block="adaLN")            scale and shift of every LayerNorm regressed from c = t + y
                                       (4 x D per block, 2 x D for the final layer), residuals without
                                       gates, the modulation initialised like any linear layer (no zeros)
    DiT(..., block="cross-attention")  t and y embeddings as a length-two sequence; after self-attention
                                       a multi-head cross-attention layer (queries: the tokens; keys and
                                       values: the two embeddings); LayerNorms with learned affine
    DiT(..., block="in-context")       t and y embeddings as two more tokens after the image tokens,
                                       standard ViT blocks, the two tokens dropped before the final layer

The default, adaLN-Zero, is fastdit.models.DiTBlock (the official one). Every design keeps DiT's
output layer initialised at zero. Two identities run the other designs on the fused ops: a LayerNorm
with weight w and bias b is modulate_layer_norm with shift b and scale w - 1, and a plain residual is
a gated one with gate 1. So every block, as DiTBlock does, leaves its closing residual to the next
LayerNorm (defer_residual) and the two run as one gated_residual_modulate_layer_norm.
"""

import torch.nn as nn

from . import ops
from .models import Attention, DiTBlock, FinalLayer, Mlp, _mlp, _norm_after, takes_pending


def _ones(x):
    """(B, D) gate of a residual without a gate (a stride-0 view: no memory per batch element)."""
    return x.new_ones(x.shape[-1]).expand(x.shape[0], -1)


def _close(x, y, defer_residual):
    """A block's closing residual x + y, or (x, (y, gate 1)) for the next LayerNorm to apply (see DiTBlock)."""
    return (x, (y, _ones(x))) if defer_residual else x + y


class AdaLNBlock(DiTBlock):
    """adaLN: LayerNorm then modulate with shift and scale regressed from c; no gates. DiTBlock's layers,
    with a modulation of 4 x D (shift, scale for attention and MLP) instead of 6 x D."""

    def __init__(self, hidden_size, num_heads, mlp_ratio=4.0):
        super().__init__(hidden_size, num_heads, mlp_ratio)
        self.adaLN_modulation[-1] = nn.Linear(hidden_size, 4 * hidden_size, bias=True)

    @takes_pending
    def forward(self, x, c, pending=None, defer_residual=False, modulation=None):
        """x (B, T, D), c (B, D) -> x (B, T, D), or (x, pending) with defer_residual (see DiTBlock)."""
        if modulation is None:
            modulation = self.adaLN_modulation(c)  # (B, 4D)
        shift_msa, scale_msa, shift_mlp, scale_mlp = modulation.chunk(4, dim=1)
        x, h = _norm_after(x, pending, self.norm1, (shift_msa, scale_msa), keep_x=True)  # (B, T, D) each
        x, h = _norm_after(x, (self.attn(h), _ones(x)), self.norm2, (shift_mlp, scale_mlp))  # (B, T, D) each
        return _close(x, _mlp(self.mlp, h), defer_residual)


class CrossAttention(nn.Module):
    """Multi-head attention of T tokens (queries) over a short conditioning sequence (L keys and values):
    fastdit.ops.attention with Tk = L < Tq."""

    def __init__(self, dim, num_heads):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"hidden_size {dim} must be divisible by num_heads {num_heads}")
        self.num_heads, self.head_dim = num_heads, dim // num_heads
        self.q = nn.Linear(dim, dim)
        self.kv = nn.Linear(dim, 2 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x, context):
        """x (B, T, D), context (B, L, D) -> (B, T, D)."""
        B, T, D = x.shape
        q = self.q(x).view(B, T, self.num_heads, self.head_dim)  # (B, T, H, Dh)
        kv = self.kv(context).view(B, context.shape[1], 2, self.num_heads, self.head_dim)  # (B, L, 2, H, Dh)
        o = ops.attention(q, kv[:, :, 0], kv[:, :, 1])  # (B, T, H, Dh); k, v: strided views
        return self.proj(o.reshape(B, T, D))


class TransformerBlock(nn.Module):
    """A standard pre-norm transformer block, LayerNorms with learned affine: the in-context design's.
    cross_attention=True adds a cross-attention layer over the conditioning sequence after self-attention
    (the cross-attention design's)."""

    def __init__(self, hidden_size, num_heads, mlp_ratio=4.0, cross_attention=False):
        super().__init__()
        self.norm1 = nn.LayerNorm(hidden_size, eps=1e-6)
        self.attn = Attention(hidden_size, num_heads=num_heads, qkv_bias=True)
        if cross_attention:
            self.norm_cross = nn.LayerNorm(hidden_size, eps=1e-6)
            self.cross_attn = CrossAttention(hidden_size, num_heads)
        else:
            self.cross_attn = None
        self.norm2 = nn.LayerNorm(hidden_size, eps=1e-6)
        self.mlp = Mlp(hidden_size, int(hidden_size * mlp_ratio))

    @takes_pending
    def forward(self, x, c, pending=None, defer_residual=False, modulation=None):
        """x (B, T, D), c: the conditioning sequence (B, L, D) that cross-attention reads -> x (B, T, D), or
        (x, pending) with defer_residual (see DiTBlock). `modulation` is unused (no adaptive norms)."""
        x, h = _norm_after(x, pending, self.norm1, keep_x=True)  # (B, T, D) each
        y = self.attn(h)  # (B, T, D)
        if self.cross_attn is not None:
            x, h = _norm_after(x, (y, _ones(x)), self.norm_cross)  # (B, T, D) each
            y = self.cross_attn(h, c)  # (B, T, D)
        # x: the cross-attention residual, kept by its op
        x, h = _norm_after(x, (y, _ones(x)), self.norm2, keep_x=self.cross_attn is not None)  # (B, T, D) each
        return _close(x, _mlp(self.mlp, h), defer_residual)


class StandardFinalLayer(nn.Module):
    """LayerNorm (learned affine) and the linear decoder: the final layer of the designs without adaptive norms."""

    def __init__(self, hidden_size, patch_size, out_channels):
        super().__init__()
        self.norm_final = nn.LayerNorm(hidden_size, eps=1e-6)
        self.linear = nn.Linear(hidden_size, patch_size * patch_size * out_channels, bias=True)

    @takes_pending
    def forward(self, x, c, pending=None, modulation=None):
        """x (B, T, D) -> (B, T, p*p*C); `pending`: the last block's deferred residual."""
        _, h = _norm_after(x, pending, self.norm_final, keep_x=True)  # (B, T, D)
        return self.linear(h)


def build_block(design, hidden_size, num_heads, mlp_ratio):
    if design == "adaLN":
        return AdaLNBlock(hidden_size, num_heads, mlp_ratio)
    return TransformerBlock(hidden_size, num_heads, mlp_ratio, cross_attention=design == "cross-attention")


def build_final_layer(design, hidden_size, patch_size, out_channels):
    cls = FinalLayer if design == "adaLN" else StandardFinalLayer  # the final LayerNorm is adaptive under adaLN
    return cls(hidden_size, patch_size, out_channels)
