"""ReferenceDiT: facebookresearch/DiT's architecture computed the official way, unfused.

The baseline for parity tests and benchmarks: a Conv2d patch embedding, LayerNorm then
modulate, PyTorch scaled_dot_product_attention (as timm's Attention uses), separate gated
residuals, and einsum unpatchify, with the official module tree, so state_dicts, random
initialisation and outputs are interchangeable with fastdit.models.DiT. No fastdit.ops here.
"""
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from .models import DiT, Mlp, _pair, model_configs


def modulate(x, shift, scale):
    return x * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)


class ReferencePatchEmbed(nn.Module):
    def __init__(self, img_size, patch_size, in_chans, embed_dim):
        super().__init__()
        self.img_size = _pair(img_size, "input_size")
        self.patch_size = (patch_size, patch_size)
        self.grid_size = (self.img_size[0] // patch_size, self.img_size[1] // patch_size)
        self.num_patches = self.grid_size[0] * self.grid_size[1]
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size, bias=True)

    def forward(self, x):
        return self.proj(x).flatten(2).transpose(1, 2)  # (B, D, h, w) -> (B, T, D)


class ReferenceAttention(nn.Module):
    def __init__(self, dim, num_heads, math=False):
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.math = math
        self.qkv = nn.Linear(dim, dim * 3, bias=True)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x):
        B, N, C = x.shape
        qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)  # (B, H, N, Dh)
        if self.math:
            x = (q @ k.transpose(-2, -1) * self.head_dim**-0.5).softmax(dim=-1) @ v
        else:
            x = F.scaled_dot_product_attention(q, k, v)
        return self.proj(x.transpose(1, 2).reshape(B, N, C))


class ReferenceBlock(nn.Module):
    def __init__(self, hidden_size, num_heads, mlp_ratio=4.0, math_attention=False):
        super().__init__()
        self.norm1 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.attn = ReferenceAttention(hidden_size, num_heads, math=math_attention)
        self.norm2 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.mlp = Mlp(hidden_size, int(hidden_size * mlp_ratio))
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 6 * hidden_size, bias=True))

    def forward(self, x, c):
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.adaLN_modulation(c).chunk(6, dim=1)
        x = x + gate_msa.unsqueeze(1) * self.attn(modulate(self.norm1(x), shift_msa, scale_msa))
        x = x + gate_mlp.unsqueeze(1) * self.mlp(modulate(self.norm2(x), shift_mlp, scale_mlp))
        return x


class ReferenceFinalLayer(nn.Module):
    def __init__(self, hidden_size, patch_size, out_channels):
        super().__init__()
        self.norm_final = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(hidden_size, patch_size * patch_size * out_channels, bias=True)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 2 * hidden_size, bias=True))

    def forward(self, x, c):
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=1)
        return self.linear(modulate(self.norm_final(x), shift, scale))


class ReferenceDiT(DiT):
    """fastdit.models.DiT's constructor (the same module tree, parameters and initial weights), plus
    math_attention=True for softmax(q k^T) v written out; the official forward."""

    patch_embed_cls, final_layer_cls = ReferencePatchEmbed, ReferenceFinalLayer

    def __init__(self, *args, math_attention=False, **kwargs):
        self.math_attention = math_attention  # read by block_cls while DiT.__init__ builds the blocks
        super().__init__(*args, **kwargs)

    def block_cls(self, hidden_size, num_heads, mlp_ratio):
        return ReferenceBlock(hidden_size, num_heads, mlp_ratio, self.math_attention)

    def unpatchify(self, x):
        c, p = self.out_channels, self.patch_size
        h, w = self.x_embedder.grid_size
        x = x.reshape(x.shape[0], h, w, p, p, c)
        x = torch.einsum("nhwpqc->nchpwq", x)
        return x.reshape(x.shape[0], c, h * p, w * p)

    def forward(self, x, t, y):
        x = self.x_embedder(x) + self.pos_embed  # (N, T, D)
        c = self.t_embedder(t) + self.y_embedder(y, self.training)  # (N, D)
        for block in self.blocks:
            if self.gradient_checkpointing and torch.is_grad_enabled():
                x = checkpoint(block, x, c, use_reentrant=False)
            else:
                x = block(x, c)  # (N, T, D)
        x = self.final_layer(x, c)  # (N, T, p*p*out_channels)
        return self.unpatchify(x)  # (N, out_channels, H, W)


reference_DiT_models = model_configs(ReferenceDiT)
