"""ReferenceDiT: facebookresearch/DiT's model written out plainly, the oracle for fastdit.models.

It shares no code with what it judges (it imports nothing from fastdit) and is checked itself
against goldens from the official models.py (tests/data/make_official_model_golden.py). Same
constructor arguments, module tree, state_dict keys, initialisation and random draws as the
official model, so a seed gives the official weights; the official computation, unfused: a Conv2d
patch embedding, LayerNorm then modulate, softmax attention (PyTorch's scaled_dot_product_attention,
as timm's Attention calls it, or written out with math_attention=True), separate gated residuals,
einsum unpatchify.

Where it departs from the official code, for testing only: the float32 timestep embedding is cast
to the MLP's dtype (the official model runs in float32 only; a float64 copy is the tests' exact
oracle), input_size may be a pair (H, W), and forward_with_cfg follows fastdit's documented
contract (cfg_channels; only eps channels are guided), which is the official one for in_channels >= 3.
It is also the benchmarks' eager baseline.
"""

import math
from functools import partial

import torch
import torch.nn as nn
import torch.nn.functional as F


def modulate(x, shift, scale):
    return x * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)


def timestep_embedding(t, dim, max_period=10000):
    """(N,) timesteps, possibly fractional -> (N, dim) float32: [cos(t f), sin(t f)] for dim // 2
    frequencies f geometric from 1 down to 1/max_period (GLIDE's), a zero column when dim is odd."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32) / half).to(t.device)  # (half,)
    args = t[:, None].float() * freqs[None]  # (N, half)
    embedding = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        embedding = torch.cat([embedding, torch.zeros_like(embedding[:, :1])], dim=-1)
    return embedding


def sincos_pos_embed(dim, grid_h, grid_w):
    """(grid_h * grid_w, dim) float32, tokens row-major. MAE's layout: the first half of the channels
    is [sin, cos] of the token's column index, the second half of its row index, at dim // 4
    frequencies 10000^(-k / (dim // 4)), computed in float64 on the CPU (as the official numpy code)."""
    if dim % 4:
        raise ValueError(f"hidden_size must be a multiple of 4 for the sin-cos position embedding, got {dim}")
    omega = 1.0 / 10000 ** (torch.arange(dim // 4, dtype=torch.float64, device="cpu") / (dim // 4))  # (D/4,)
    rows, cols = torch.meshgrid(torch.arange(grid_h, device="cpu"), torch.arange(grid_w, device="cpu"), indexing="ij")

    def encode(pos):
        angles = pos.reshape(-1, 1).double() * omega  # (h*w, D/4)
        return torch.cat([torch.sin(angles), torch.cos(angles)], dim=1)  # (h*w, D/2)

    return torch.cat([encode(cols), encode(rows)], dim=1).float()  # (h*w, D)


class PatchEmbed(nn.Module):
    def __init__(self, img_size, patch_size, in_chans, embed_dim):
        super().__init__()
        self.grid_size = (img_size[0] // patch_size, img_size[1] // patch_size)
        self.num_patches = self.grid_size[0] * self.grid_size[1]
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size, bias=True)

    def forward(self, x):
        return self.proj(x).flatten(2).transpose(1, 2)  # (N, D, h, w) -> (N, T, D)


class TimestepEmbedder(nn.Module):
    def __init__(self, hidden_size, frequency_embedding_size=256):
        super().__init__()
        self.mlp = nn.Sequential(
            nn.Linear(frequency_embedding_size, hidden_size, bias=True),
            nn.SiLU(),
            nn.Linear(hidden_size, hidden_size, bias=True),
        )
        self.frequency_embedding_size = frequency_embedding_size

    def forward(self, t):
        t_freq = timestep_embedding(t, self.frequency_embedding_size)  # (N, 256) float32
        return self.mlp(t_freq.to(self.mlp[0].weight.dtype))  # (N, D)


class LabelEmbedder(nn.Module):
    """Labels -> vectors; with dropout_prob > 0 a last table row, the null class num_classes,
    replaces each label with probability dropout_prob in training (or where force_drop_ids == 1)."""

    def __init__(self, num_classes, hidden_size, dropout_prob):
        super().__init__()
        self.embedding_table = nn.Embedding(num_classes + int(dropout_prob > 0), hidden_size)
        self.num_classes = num_classes
        self.dropout_prob = dropout_prob

    def forward(self, labels, train, force_drop_ids=None):
        if (train and self.dropout_prob > 0) or force_drop_ids is not None:
            if force_drop_ids is None:
                drop = torch.rand(labels.shape[0], device=labels.device) < self.dropout_prob
            else:
                drop = force_drop_ids == 1
            labels = torch.where(drop, self.num_classes, labels)
        return self.embedding_table(labels)  # (N, D)


class Attention(nn.Module):
    def __init__(self, dim, num_heads, math_attention=False):
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.math_attention = math_attention
        self.qkv = nn.Linear(dim, dim * 3, bias=True)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x):
        B, T, D = x.shape
        qkv = self.qkv(x).reshape(B, T, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)  # (B, H, T, Dh) each
        if self.math_attention:
            o = torch.softmax(q @ k.transpose(-2, -1) / math.sqrt(self.head_dim), dim=-1) @ v
        else:
            o = F.scaled_dot_product_attention(q, k, v)
        return self.proj(o.transpose(1, 2).reshape(B, T, D))  # (B, T, D)


class Mlp(nn.Module):
    def __init__(self, in_features, hidden_features):
        super().__init__()
        self.fc1 = nn.Linear(in_features, hidden_features)
        self.act = nn.GELU(approximate="tanh")
        self.fc2 = nn.Linear(hidden_features, in_features)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


class DiTBlock(nn.Module):
    def __init__(self, hidden_size, num_heads, mlp_ratio, math_attention):
        super().__init__()
        self.norm1 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.attn = Attention(hidden_size, num_heads, math_attention)
        self.norm2 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.mlp = Mlp(hidden_size, int(hidden_size * mlp_ratio))
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 6 * hidden_size, bias=True))

    def forward(self, x, c):
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.adaLN_modulation(c).chunk(6, dim=1)
        x = x + gate_msa.unsqueeze(1) * self.attn(modulate(self.norm1(x), shift_msa, scale_msa))
        x = x + gate_mlp.unsqueeze(1) * self.mlp(modulate(self.norm2(x), shift_mlp, scale_mlp))
        return x


class FinalLayer(nn.Module):
    def __init__(self, hidden_size, patch_size, out_channels):
        super().__init__()
        self.norm_final = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(hidden_size, patch_size * patch_size * out_channels, bias=True)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 2 * hidden_size, bias=True))

    def forward(self, x, c):
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=1)
        return self.linear(modulate(self.norm_final(x), shift, scale))


class ReferenceDiT(nn.Module):
    """The official DiT (constructor, defaults, parameters, init), plus math_attention."""

    def __init__(
        self,
        input_size=32,
        patch_size=2,
        in_channels=4,
        hidden_size=1152,
        depth=28,
        num_heads=16,
        mlp_ratio=4.0,
        class_dropout_prob=0.1,
        num_classes=1000,
        learn_sigma=True,
        math_attention=False,
    ):
        super().__init__()
        self.learn_sigma = learn_sigma
        self.in_channels = in_channels
        self.out_channels = in_channels * 2 if learn_sigma else in_channels
        self.patch_size = patch_size
        self.num_heads = num_heads
        img_size = (input_size, input_size) if isinstance(input_size, int) else tuple(input_size)

        # Modules in the official order: their constructors' random draws precede the init's.
        self.x_embedder = PatchEmbed(img_size, patch_size, in_channels, hidden_size)
        self.t_embedder = TimestepEmbedder(hidden_size)
        self.y_embedder = LabelEmbedder(num_classes, hidden_size, class_dropout_prob)
        self.pos_embed = nn.Parameter(torch.zeros(1, self.x_embedder.num_patches, hidden_size), requires_grad=False)
        self.blocks = nn.ModuleList([DiTBlock(hidden_size, num_heads, mlp_ratio, math_attention) for _ in range(depth)])
        self.final_layer = FinalLayer(hidden_size, patch_size, self.out_channels)
        self.initialize_weights()

    def initialize_weights(self):
        """The official init, draw for draw: every Linear xavier-uniform (in module order) with zero
        bias; the fixed sin-cos pos_embed; the patch embedding like a Linear, bias zero; N(0, 0.02)
        label table and timestep MLP weights; adaLN modulations and the output layer zero."""
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                nn.init.zeros_(module.bias)
        self.pos_embed.data.copy_(sincos_pos_embed(self.pos_embed.shape[-1], *self.x_embedder.grid_size).unsqueeze(0))
        proj = self.x_embedder.proj
        nn.init.xavier_uniform_(proj.weight.data.view(proj.weight.shape[0], -1))
        nn.init.zeros_(proj.bias)
        nn.init.normal_(self.y_embedder.embedding_table.weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[0].weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[2].weight, std=0.02)
        zeroed = [block.adaLN_modulation[-1] for block in self.blocks]
        zeroed += [self.final_layer.adaLN_modulation[-1], self.final_layer.linear]
        for linear in zeroed:
            nn.init.zeros_(linear.weight)
            nn.init.zeros_(linear.bias)

    def unpatchify(self, x):
        """(N, T, p*p*C) -> (N, C, h*p, w*p): token (i, j)'s features, ordered (p, q, c), fill pixel block (i, j)."""
        c, p = self.out_channels, self.patch_size
        h, w = self.x_embedder.grid_size
        x = x.reshape(x.shape[0], h, w, p, p, c)
        x = torch.einsum("nhwpqc->nchpwq", x)
        return x.reshape(x.shape[0], c, h * p, w * p)

    def forward(self, x, t, y):
        x = self.x_embedder(x) + self.pos_embed  # (N, T, D)
        c = self.t_embedder(t) + self.y_embedder(y, self.training)  # (N, D)
        for block in self.blocks:
            x = block(x, c)  # (N, T, D)
        x = self.final_layer(x, c)  # (N, T, p*p*out_channels)
        return self.unpatchify(x)  # (N, out_channels, H, W)

    def forward_with_cfg(self, x, t, y, cfg_scale, cfg_channels="paper"):
        """Classifier-free guidance over [conditional; unconditional] halves: the official scheme on
        channels [:min(3, in_channels)] ("paper") or [:in_channels] ("all"), the eps channels."""
        half = x[: len(x) // 2]
        out = self.forward(torch.cat([half, half]), t, y)
        n = min(3, self.in_channels) if cfg_channels == "paper" else self.in_channels
        cond, uncond = out[:, :n].chunk(2)
        guided = uncond + cfg_scale * (cond - uncond)
        return torch.cat([torch.cat([guided, guided]), out[:, n:]], dim=1)


_SIZES = {"XL": (28, 1152, 16), "L": (24, 1024, 16), "B": (12, 768, 12), "S": (12, 384, 6)}  # depth, width, heads
reference_DiT_models = {
    f"DiT-{size}/{p}": partial(ReferenceDiT, depth=depth, hidden_size=width, patch_size=p, num_heads=heads)
    for size, (depth, width, heads) in _SIZES.items()
    for p in (2, 4, 8)
}
