"""DiT backbone: the public API and state_dict of facebookresearch/DiT's models.py, on fused ops.

Same constructor arguments and defaults, the same twelve configs, the same state_dict keys
and shapes, the same initialisation (and the same random draws, so a seed gives the same
weights). What differs is the forward: patch embedding, LayerNorm+modulate, gated residuals,
attention and unpatchify go through `fastdit.ops`, and each block's closing gated residual is
fused with the LayerNorm+modulate that opens the next block (or the final layer).

Between the fused ops only GEMMs and attention remain, each feeding the next op directly:
  - adaLN: one GEMM computes every block's and the final layer's modulation (DiT._modulations;
    per block under DDP and FSDP);
  - attention: the qkv GEMM adds its bias in the GEMM (addmm), and its output viewed
    (B, T, 3, H, Dh) is what attention reads, no head-split copy; proj's output goes straight into
    the fused gated residual + LayerNorm+modulate;
  - MLP: without autograd (sampling) on CUDA, fc1's bias and tanh-GELU run in the GEMM's epilogue
    (_linear_gelu_tanh); in training GELU's output is recomputed in the backward, not kept
    (_GeluLinear); fc2's output is the next fused op's input.
"""

import math
import numbers
from functools import lru_cache, partial

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import CheckpointPolicy, checkpoint, create_selective_checkpoint_contexts

from . import _validate, ops
from ._validate import check_positive_int

# The DiT paper's block designs (its §3.2 and Figure 5): DiT(block=...). adaLN-Zero is DiT's own
# (DiTBlock below); the others live in fastdit.blocks. ADAPTIVE: those conditioned through c = t + y.
BLOCKS = ("adaLN-Zero", "adaLN", "cross-attention", "in-context")
ADAPTIVE = ("adaLN-Zero", "adaLN")

#################################################################################
#               Embedding layers for patches, timesteps and class labels        #
#################################################################################


def modulate(x, shift, scale):
    """adaLN's modulation, x (N, T, D) * (1 + scale) + shift with shift, scale (N, D): the official helper
    (the model runs it fused with its LayerNorm: ops.modulate_layer_norm)."""
    return x * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)


def _is_positive_int(v):
    # numbers.Integral: numpy's integers too, which the official code takes (np.arange, timm's to_2tuple)
    return isinstance(v, numbers.Integral) and not isinstance(v, bool) and v >= 1


def _is_real(v):
    return isinstance(v, numbers.Real) and not isinstance(v, bool)


def _pair(v, name):
    if _is_positive_int(v):
        return (int(v), int(v))
    if isinstance(v, (tuple, list)) and len(v) == 2 and all(_is_positive_int(i) for i in v):
        return tuple(int(i) for i in v)
    raise ValueError(f"{name} must be a positive int or a pair of positive ints (H, W), got {v!r}")


def _check_config(
    input_size,
    patch_size,
    in_channels,
    hidden_size,
    depth,
    num_heads,
    mlp_ratio,
    class_dropout_prob,
    num_classes,
    learn_sigma,
    block,
):
    """A ValueError naming the first constructor argument outside its domain.

    hidden_size's divisibility is checked where it matters: by num_heads in Attention, by 4 in the
    position embedding; input_size's by patch_size in PatchEmbed.
    """
    sizes = dict(
        patch_size=patch_size, in_channels=in_channels, hidden_size=hidden_size, depth=depth, num_heads=num_heads
    )
    for name, value in sizes.items():
        check_positive_int(name, value)
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 0:
        raise ValueError(f"num_classes must be an int >= 0 (0: an unconditional model), got {num_classes!r}")
    _pair(input_size, "input_size")
    if not (_is_real(mlp_ratio) and math.isfinite(mlp_ratio) and int(hidden_size * mlp_ratio) >= 1):
        raise ValueError(f"mlp_ratio must be a finite number with int(hidden_size * mlp_ratio) >= 1, got {mlp_ratio!r}")
    if not (_is_real(class_dropout_prob) and 0 <= class_dropout_prob <= 1):
        raise ValueError(f"class_dropout_prob must be a probability in [0, 1], got {class_dropout_prob!r}")
    if learn_sigma not in (True, False):
        raise ValueError(f"learn_sigma must be True or False, got {learn_sigma!r}")
    if block not in BLOCKS:
        raise ValueError(f"block must be one of {', '.join(BLOCKS)}; got {block!r}")


def _hooked(*modules):
    """Whether any of the modules has forward hooks, which a fused path that skips calling it, or changes what
    it returns, would not honour. FSDP2's hooks (fully_shard hooks every unit it shards) are not counted:
    they gather and free the parameters around any forward. (Loops, not any() over generators: this runs a
    few times per block and forward.)"""
    for m in modules:
        for hooks in (m._forward_hooks, m._forward_pre_hooks):
            for hook in hooks.values():
                if not type(getattr(hook, "__self__", hook)).__module__.startswith("torch.distributed.fsdp"):
                    return True
    return False


def _plain_parameters(*modules):
    """Whether the modules' parameters are plain nn.Parameters, which fused paths may read, concatenate and cast:
    not quantized weights (torchao's are tensor subclasses), nor FSDP2's sharded DTensors."""
    for m in modules:
        for p in m._parameters.values():
            if p is not None and type(p) is not nn.Parameter:
                return False
    return True


def takes_pending(forward):
    """Marks the forward of a block or final layer that takes the previous block's closing residual as `pending`
    (and a block, `defer_residual`), and its adaLN `modulation` if computed already: see DiTBlock.forward."""
    forward.takes_pending = True
    return forward


def _chains(module):
    """Whether module takes part in the fused chain: its forward is marked takes_pending (not a subclass's
    override, not another kind of module's)."""
    return getattr(type(module).forward, "takes_pending", False)


def _fuses(module):
    """Whether DiT.forward chains module (a block or the final layer) fused: it takes `pending` and has no forward
    hooks. Otherwise it is called as the official model calls it, module(x, c), its input's residual applied
    first (_applied)."""
    return _chains(module) and not _hooked(module)


def _applied(x, pending):
    """x with a pending residual (y, gate) applied: x + gate * y (N, T, D), one op."""
    return x if pending is None else ops.gated_residual(x, *pending)


class PatchEmbed(nn.Module):
    """Image to patch tokens: a stride-p convolution, computed as patchify + one GEMM.

    Keeps the Conv2d parameter `proj` so checkpoints keep the key `x_embedder.proj.*`.
    """

    def __init__(self, img_size, patch_size, in_chans, embed_dim, bias=True):
        super().__init__()
        self.img_size = _pair(img_size, "input_size")
        self.patch_size = (patch_size, patch_size)
        if any(s % patch_size for s in self.img_size):
            raise ValueError(f"input_size {self.img_size} must be divisible by patch_size {patch_size}")
        self.grid_size = (self.img_size[0] // patch_size, self.img_size[1] // patch_size)
        self.num_patches = self.grid_size[0] * self.grid_size[1]
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size, bias=bias)

    def forward(self, x):
        if not self._is_plain_proj():  # a changed or hooked proj runs itself, as the official PatchEmbed calls it
            return self.proj(x).flatten(2).transpose(1, 2)  # (B, T, D)
        tokens = ops.patchify(x, self.patch_size[0])  # (B, T, C*p*p), features in Conv2d weight order
        return F.linear(tokens, self.proj.weight.flatten(1), self.proj.bias)  # (B, T, D)

    def _is_plain_proj(self):
        """Whether proj is the stride-p, p x p convolution it was built as (what patchify + one GEMM computes)."""
        proj = self.proj
        return (
            type(proj) is nn.Conv2d
            and proj.kernel_size == proj.stride == self.patch_size
            and proj.padding == (0, 0)
            and proj.dilation == (1, 1)
            and proj.groups == 1
            and not _hooked(proj)
            and _plain_parameters(proj)
        )


def _frequencies(dim, max_period=10000):
    """(dim // 2,) float32 frequencies, geometric from 1 to 1/max_period, computed on the CPU as the
    official model computes them (a GPU's exp can differ in the last bit)."""
    half = dim // 2
    return torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32) / half)


class TimestepEmbedder(nn.Module):
    """Scalar timesteps -> vectors: sinusoidal frequencies, then a 2-layer MLP."""

    def __init__(self, hidden_size, frequency_embedding_size=256):
        super().__init__()
        self.mlp = nn.Sequential(
            nn.Linear(frequency_embedding_size, hidden_size, bias=True),
            nn.SiLU(),
            nn.Linear(hidden_size, hidden_size, bias=True),
        )
        self.frequency_embedding_size = frequency_embedding_size
        # Kept on the model's device (not in the state_dict): no host-to-device copy per forward,
        # which CUDA-graph capture of a sampling loop would not allow.
        self.register_buffer("freqs", _frequencies(frequency_embedding_size), persistent=False)

    def _apply(self, fn, recurse=True):
        super()._apply(fn, recurse)
        # Casting the module (.half(), .to(bf16)) must not round the table: recompute it in float32.
        self.freqs = _frequencies(self.frequency_embedding_size).to(self.freqs.device)
        return self

    @staticmethod
    def timestep_embedding(t, dim, max_period=10000, freqs=None):
        """(N,) possibly fractional timesteps -> (N, dim) float32: [cos(t f), sin(t f)] (zero-padded if dim is odd)."""
        if freqs is None:
            freqs = _frequencies(dim, max_period).to(t.device)
        args = t[:, None].float() * freqs[None]  # (N, dim // 2)
        embedding = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)  # (N, 2 * (dim // 2))
        if dim % 2:
            embedding = torch.cat([embedding, torch.zeros_like(embedding[:, :1])], dim=-1)
        return embedding

    def forward(self, t):
        t_freq = self.timestep_embedding(t, self.frequency_embedding_size, freqs=self.freqs)  # (N, 256)
        return self.mlp(t_freq.to(self.mlp[0].weight.dtype))  # (N, D); a no-op cast unless the model was cast


class LabelEmbedder(nn.Module):
    """Class labels -> vectors; with dropout_prob > 0 an extra 'null' class drops labels for CFG."""

    def __init__(self, num_classes, hidden_size, dropout_prob):
        super().__init__()
        use_cfg_embedding = dropout_prob > 0
        self.embedding_table = nn.Embedding(num_classes + use_cfg_embedding, hidden_size)
        self.num_classes = num_classes
        self.dropout_prob = dropout_prob

    def token_drop(self, labels, force_drop_ids=None):
        if force_drop_ids is None:
            drop_ids = torch.rand(labels.shape[0], device=labels.device) < self.dropout_prob
        else:
            drop_ids = force_drop_ids == 1
        return torch.where(drop_ids, self.num_classes, labels)

    def forward(self, labels, train, force_drop_ids=None):
        if (train and self.dropout_prob > 0) or force_drop_ids is not None:
            labels = self.token_drop(labels, force_drop_ids)
        return self.embedding_table(labels)  # (N, D)


#################################################################################
#                                 Core DiT model                                #
#################################################################################


class Attention(nn.Module):
    """Multi-head self-attention. The qkv GEMM's output, viewed (B, T, 3, H, Dh), already is the
    (B, T, H, Dh) layout fastdit.ops.attention takes: q, k and v are strided views, never copied;
    ops.attention_packed takes the view whole, so the backward writes one packed qkv gradient."""

    def __init__(self, dim, num_heads, qkv_bias=True):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"hidden_size {dim} must be divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x):
        B, T, D = x.shape
        qkv = self.qkv(x).view(B, T, 3, self.num_heads, self.head_dim)  # (B, T, 3, H, Dh)
        o = ops.attention_packed(qkv)  # (B, T, H, Dh)
        return self.proj(o.reshape(B, T, D))  # (B, T, D)


class Mlp(nn.Module):
    # Training recomputes GELU's output in the backward instead of keeping it (_GeluLinear); off under full
    # gradient checkpointing, whose recomputation would then rerun fc2's GEMM (it reruns a Function's whole
    # forward), for nothing: the block keeps only its inputs there.
    recompute_gelu = True

    def __init__(self, in_features, hidden_features):
        super().__init__()
        self.fc1 = nn.Linear(in_features, hidden_features)
        self.act = nn.GELU(approximate="tanh")
        self.fc2 = nn.Linear(hidden_features, in_features)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


def _mlp(mlp, x):
    """mlp(x) (B, T, D) -> (B, T, D): in training GELU's output is recomputed in the backward, not kept (see
    _GeluLinear); in sampling on CUDA fc1 and GELU run as one GEMM (see _linear_gelu_tanh). An MLP whose
    parts were swapped or hooked (torchao's float8 linears, another activation, a subclass, forward hooks)
    runs as it is."""
    if not _is_plain(mlp):
        return mlp(x)
    if torch.is_grad_enabled():
        if not mlp.recompute_gelu:
            return mlp(x)
        dtype = _gemm_dtype(x)  # the casts autocast would make for fc2, outside the Function (autograd sees them)
        return _GeluLinear.apply(mlp.fc1(x), mlp.fc2.weight.to(dtype), mlp.fc2.bias.to(dtype))  # (B, T, D)
    if x.is_cuda:
        return mlp.fc2(_linear_gelu_tanh(x, mlp.fc1.weight, mlp.fc1.bias))
    return mlp(x)


def _is_plain(mlp):
    """Whether mlp is this module's Mlp as built: biased nn.Linear layers around tanh-GELU, no forward hooks."""
    if type(mlp) is not Mlp:
        return False
    layers = mlp._modules  # a dict read each, not nn.Module.__getattr__ (~1 us each, run per block and forward)
    fc1, act, fc2 = layers.get("fc1"), layers.get("act"), layers.get("fc2")
    return (
        type(fc1) is nn.Linear
        and type(fc2) is nn.Linear
        and fc1.bias is not None
        and fc2.bias is not None
        and type(act) is nn.GELU
        and act.approximate == "tanh"
        and not _hooked(mlp, fc1, act, fc2)
        and _plain_parameters(fc1, fc2)
    )


class _GeluLinear(torch.autograd.Function):
    """fc2(gelu(h, approximate='tanh')) keeping only h for the backward, which recomputes gelu(h).

    Unfused, autograd keeps both h (for GELU's backward) and gelu(h) (for fc2's weight gradient): two
    (B, T, 4D) tensors, 16 bytes per channel per token under bf16 autocast (a block keeps 36 that way). This
    keeps 8; the recomputation costs one elementwise pass over h (read 8, write 8 bytes per channel per token:
    DiT-XL/2 at 32 x 256^2 images, ~4 GB of traffic, ~1 ms of a step, predicted, unmeasured).

    The backward issues the ops autograd's would for F.linear over a contiguous (B, T, 4D) input (addmm
    on the flattened rows; aten's mm_mat1_backward and mm_mat2_backward for row-major inputs and a
    transposed weight; the bias's sum over rows; gelu_backward), in the same dtypes, so values and
    gradients are the unfused ones bit for bit (tests/test_fused_forward.py). h, weight and bias arrive
    in the GEMM's dtype; the backward runs without autocast, in the dtypes the forward used.
        forward:  a = gelu(h); out = a W^T + b
        backward: dW = g^T a; db = sum_rows g; dh = gelu'(h) * (g W)
    """

    @staticmethod
    def forward(ctx, h, weight, bias):
        ctx.save_for_backward(h, weight)
        return F.linear(F.gelu(h, approximate="tanh"), weight, bias)

    @staticmethod
    def backward(ctx, grad):
        h, weight = ctx.saved_tensors
        with torch.autocast(grad.device.type, enabled=False):
            g = grad.reshape(-1, grad.shape[-1])  # (B*T, D)
            a = F.gelu(h, approximate="tanh").reshape(-1, h.shape[-1])  # (B*T, 4D), as the forward computed it
            grad_h = torch.ops.aten.gelu_backward(g.mm(weight).view(h.shape), h, approximate="tanh")
            return grad_h, g.t().mm(a), g.sum(0)


def _linear_gelu_tanh(x, weight, bias):
    """gelu(x W^T + b, approximate='tanh') in one cuBLASLt GEMM: the bias add and GELU run in fp32 in the
    epilogue, then one rounding to the GEMM's dtype (the unfused GEMM rounds h, then GELU rounds again).

    CUDA only, and without autograd: on CUDA torch._addmm_activation's GELU is the tanh approximation
    (the Lt epilogue, or its explicit "tanh" fallback); on the CPU it is the exact erf GELU. Training
    keeps fc1 and GELU apart because GELU's backward needs the pre-activation, which this epilogue
    does not return (cuBLASLt's GELU_AUX epilogue would, but torch does not expose it): fusing would
    cost a second fc1 GEMM in the backward. Without autograd it saves writing and re-reading the
    (B, T, 4D) pre-activation, 4 bytes per element in bf16: ~17 GB per DiT-XL/2 forward of 2 x 64
    images at 256^2 (predicted, unmeasured: ~4 ms of a ~50 ms sampling step at ~4.5 TB/s).
    """
    dtype = _gemm_dtype(x)  # autocast does not list _addmm_activation: cast as it would for a linear
    h = torch._addmm_activation(
        bias.to(dtype), x.reshape(-1, x.shape[-1]).to(dtype), weight.to(dtype).t(), use_gelu=True
    )
    return h.view(*x.shape[:-1], h.shape[-1])  # (B, T, 4D)


def _gemm_dtype(t):
    """The dtype a GEMM on t computes in: autocast's where it is on, else t's."""
    device = t.device.type
    return torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else t.dtype


class DiTBlock(nn.Module):
    """A DiT block with adaptive layer norm zero (adaLN-Zero) conditioning."""

    def __init__(self, hidden_size, num_heads, mlp_ratio=4.0):
        super().__init__()
        # Parameter-free, kept for API parity (and their eps): the ops below do the normalisation.
        self.norm1 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.attn = Attention(hidden_size, num_heads=num_heads, qkv_bias=True)
        self.norm2 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.mlp = Mlp(hidden_size, int(hidden_size * mlp_ratio))
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 6 * hidden_size, bias=True))

    @takes_pending
    def forward(self, x, c, pending=None, defer_residual=False, modulation=None):
        """x (B, T, D), c (B, D) -> x (B, T, D): the official block.

        DiT.forward chains blocks differently, to fuse every gated residual with the
        LayerNorm+modulate after it: with defer_residual=True the block leaves its closing residual
        undone and returns (x, (y, gate)); the next block (or the final layer) receives that as
        `pending` and applies it fused with its opening LayerNorm+modulate. `modulation`: this
        block's adaLN_modulation(c) (B, 6D) when the caller computed it already (DiT._modulations).
        """
        if modulation is None:
            modulation = self.adaLN_modulation(c)  # (B, 6D)
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = modulation.chunk(6, dim=1)
        x, h = _norm_after(x, pending, self.norm1, (shift_msa, scale_msa), keep_x=True)  # (B, T, D) each
        x, h = _norm_after(x, (self.attn(h), gate_msa), self.norm2, (shift_mlp, scale_mlp))  # (B, T, D) each
        y = _mlp(self.mlp, h)  # (B, T, D)
        if defer_residual:
            return x, (y, gate_mlp)
        return ops.gated_residual(x, y, gate_mlp)


CHECKPOINTING = {False: False, "none": False, True: "full", "full": "full", "selective": "selective"}
# Ops whose outputs selective checkpointing keeps: GEMMs (fp8 ones too) and attention (any backend's op).
_GEMMS = {
    torch.ops.aten.mm.default,
    torch.ops.aten.addmm.default,
    torch.ops.aten.bmm.default,
    torch.ops.aten.baddbmm.default,
    torch.ops.aten._scaled_mm.default,
}


def _keep_gemm_and_attention(ctx, op, *args, **kwargs):
    """Selective checkpointing's policy: save what is expensive to recompute, recompute the rest.

    Saved: GEMM and attention outputs. Recomputed: everything else, all memory-bound: LayerNorm+modulate
    and the gated residuals (fused ops), GELU, casts. That includes autocast's casts of the weights:
    saving them would pin every block's bf16 weight copy from forward to backward, and it would break
    when the backward runs inside the forward's autocast region (its cast cache then skips the casts in
    the recomputation, so the saved outputs would no longer line up with the ops that ask for them).
    Recasting costs 6 bytes per parameter per step (DiT-XL/2: ~4 GB of traffic, ~1 ms on an H200,
    predicted) and frees the 2-byte-per-parameter copies (1.35 GB) while the forward runs.
    """
    if op in _GEMMS or "attention" in str(op) or "attn" in str(op):
        return CheckpointPolicy.MUST_SAVE
    return CheckpointPolicy.PREFER_RECOMPUTE


def _is_plain_modulation(module):
    """Whether an adaLN_modulation is as built, SiLU then a biased nn.Linear, without forward hooks: the one
    GEMM of DiT._modulations reads its weights and skips the module, so a changed or hooked one runs itself."""
    if type(module) is not nn.Sequential or len(module) != 2:
        return False
    act, linear = module
    return (
        type(act) is nn.SiLU
        and type(linear) is nn.Linear
        and linear.bias is not None
        and not _hooked(module, act, linear)
        and _plain_parameters(linear)
    )


def _is_plain_norm(norm, affine):
    """Whether norm is the nn.LayerNorm it was built as (parameter-free in the adaptive designs, affine with a
    bias in the others) without forward hooks: the fused ops compute such a norm themselves, reading only its
    eps (and weight and bias), and never call it."""
    return (
        type(norm) is nn.LayerNorm
        and norm.elementwise_affine == affine
        and (not affine or norm.bias is not None)
        and not _hooked(norm)
        and _plain_parameters(norm)
    )


def _norm_after(x, residual, norm, modulation=None, keep_x=False):
    """(x', h): x' = x + gate * y for a residual (y, gate) (x itself for None), h = norm(x'), modulated by
    modulation = (shift, scale), each (B, D), in the adaptive designs (their norms are parameter-free; the
    other designs' norms are affine and take none).

    One fused op computes both: modulate_layer_norm, or gated_residual_modulate_layer_norm with a residual
    (an affine norm being modulate with shift b and scale w - 1). With keep_x its backward keeps x and
    recomputes x', for an x that another op keeps anyway (the previous block's mid-block residual): a block
    then keeps one fp32 residual stream, not two. A norm that is not as built (another module, another
    LayerNorm setting, a forward hook) runs itself, unfused, as the official block calls it."""
    if not _is_plain_norm(norm, affine=modulation is None):
        x = _applied(x, residual)
        h = norm(x)
        return x, h if modulation is None else modulate(h, *modulation)
    if modulation is None:  # an affine LayerNorm as modulate_layer_norm, shift and scale (B, D) stride-0 views
        modulation = norm.bias.expand(x.shape[0], -1), (norm.weight - 1).expand(x.shape[0], -1)
    if residual is None:
        return x, ops.modulate_layer_norm(x, *modulation, norm.eps)
    return ops.gated_residual_modulate_layer_norm(x, *residual, *modulation, norm.eps, keep_x=keep_x)


class FinalLayer(nn.Module):
    def __init__(self, hidden_size, patch_size, out_channels):
        super().__init__()
        self.norm_final = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(hidden_size, patch_size * patch_size * out_channels, bias=True)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 2 * hidden_size, bias=True))

    @takes_pending
    def forward(self, x, c, pending=None, modulation=None):
        """x (B, T, D), c (B, D) -> (B, T, p*p*C); `pending`: a block's deferred residual, `modulation`:
        adaLN_modulation(c) (B, 2D) if already computed (see DiTBlock)."""
        if modulation is None:
            modulation = self.adaLN_modulation(c)  # (B, 2D)
        shift, scale = modulation.chunk(2, dim=1)
        _, h = _norm_after(x, pending, self.norm_final, (shift, scale), keep_x=True)  # (B, T, D)
        return self.linear(h)


class DiT(nn.Module):
    """Diffusion model with a Transformer backbone (Peebles & Xie), drop-in for facebookresearch/DiT.

    input_size may also be a pair (H, W) for non-square latents; forward accepts any H, W divisible
    by patch_size (the fixed sin-cos position embedding is computed for other grids). num_classes=0
    makes an unconditional model: no label embedding (no y_embedder), no CFG, forward(x, t).
    block: one of BLOCKS, the paper's block designs (fastdit.blocks); adaLN-Zero, the default, is DiT's.
    """

    patch_embed_cls, block_cls, final_layer_cls = PatchEmbed, DiTBlock, FinalLayer  # the module tree's parts

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
        block="adaLN-Zero",
    ):
        super().__init__()
        _check_config(
            input_size,
            patch_size,
            in_channels,
            hidden_size,
            depth,
            num_heads,
            mlp_ratio,
            class_dropout_prob,
            num_classes,
            learn_sigma,
            block,
        )
        self.block = block
        self.learn_sigma = learn_sigma
        self.in_channels = in_channels
        self.out_channels = in_channels * 2 if learn_sigma else in_channels
        self.patch_size = patch_size
        self.num_heads = num_heads
        self.num_classes = num_classes
        self.gradient_checkpointing = False
        self.adaln_one_gemm = True  # DiT._modulations

        self.x_embedder = self.patch_embed_cls(input_size, patch_size, in_channels, hidden_size)
        self.t_embedder = TimestepEmbedder(hidden_size)
        self.y_embedder = LabelEmbedder(num_classes, hidden_size, class_dropout_prob) if num_classes > 0 else None
        # Fixed sin-cos embedding, stored (as the official model does) but never trained.
        self.pos_embed = nn.Parameter(torch.zeros(1, self.x_embedder.num_patches, hidden_size), requires_grad=False)

        if block == "adaLN-Zero":
            self.blocks = nn.ModuleList([self.block_cls(hidden_size, num_heads, mlp_ratio) for _ in range(depth)])
            self.final_layer = self.final_layer_cls(hidden_size, patch_size, self.out_channels)
        else:
            from . import blocks as designs  # imported here: that module builds on this one

            self.blocks = nn.ModuleList(
                [designs.build_block(block, hidden_size, num_heads, mlp_ratio) for _ in range(depth)]
            )
            self.final_layer = designs.build_final_layer(block, hidden_size, patch_size, self.out_channels)
        self.initialize_weights()

    def initialize_weights(self):
        def _basic_init(module):
            if isinstance(module, nn.Linear):
                torch.nn.init.xavier_uniform_(module.weight)
                if module.bias is not None:
                    nn.init.constant_(module.bias, 0)

        self.apply(_basic_init)

        pos_embed = get_2d_sincos_pos_embed(self.pos_embed.shape[-1], self.x_embedder.grid_size)
        self.pos_embed.data.copy_(torch.from_numpy(pos_embed).float().unsqueeze(0))

        # Patch embedding initialised like nn.Linear (bias zero), not nn.Conv2d.
        w = self.x_embedder.proj.weight.data
        nn.init.xavier_uniform_(w.view([w.shape[0], -1]))
        nn.init.constant_(self.x_embedder.proj.bias, 0)

        if self.y_embedder is not None:
            nn.init.normal_(self.y_embedder.embedding_table.weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[0].weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[2].weight, std=0.02)

        # adaLN-Zero: every block starts as the identity, and the output layer at zero (every design's).
        if self.block == "adaLN-Zero":
            for block in self.blocks:
                nn.init.constant_(block.adaLN_modulation[-1].weight, 0)
                nn.init.constant_(block.adaLN_modulation[-1].bias, 0)
            nn.init.constant_(self.final_layer.adaLN_modulation[-1].weight, 0)
            nn.init.constant_(self.final_layer.adaLN_modulation[-1].bias, 0)
        nn.init.constant_(self.final_layer.linear.weight, 0)
        nn.init.constant_(self.final_layer.linear.bias, 0)

    def set_gradient_checkpointing(self, enabled=True):
        """Trade compute for activation memory in training (the same values and gradients either way).

        True or "full": keep only each block's inputs and recompute the whole block in the backward
        (about a third more FLOPs). "selective": keep the outputs of the GEMMs and attention and
        recompute only the cheap memory-bound ops between them (LayerNorm+modulate, the gated
        residuals, GELU, casts). False or "none": keep everything but GELU's output (see _GeluLinear).
        Per token and block, under bf16 autocast, that keeps 28, 24 or 6 bytes per channel (none,
        selective, full; the official model keeps 48), as tests/test_fused_forward.py measures.
        """
        if enabled not in CHECKPOINTING:
            raise ValueError(
                f"gradient checkpointing must be one of {', '.join(map(repr, CHECKPOINTING))}, got {enabled!r}"
            )
        self.gradient_checkpointing = CHECKPOINTING[enabled]
        for module in self.modules():
            if isinstance(module, Mlp):
                module.recompute_gelu = self.gradient_checkpointing != "full"
        return self

    def _check_inputs(self, x, t, y):
        """forward's arguments against the model: a clear error for each misfit; returns the token grid (h, w)."""
        if (y is None) != (self.y_embedder is None):
            raise ValueError(
                "y must be None for an unconditional model (num_classes=0)"
                if y is not None
                else f"y (N,) class labels are required: the model has {self.num_classes} classes"
            )
        for name, v in (("x", x), ("t", t), ("y", y)):
            if v is not None:
                _check_is_tensor(name, v)
        if x.dim() != 4 or x.shape[1] != self.in_channels:  # N may be 0, as in the official model
            raise ValueError(f"x must be (N, {self.in_channels}, H, W), got shape {tuple(x.shape)}")
        p = self.patch_size
        H, W = x.shape[-2:]
        if H % p or W % p:
            raise ValueError(f"x's height and width {(H, W)} must be divisible by patch_size {p}")
        weight = self.x_embedder.proj.weight
        if x.device != weight.device:
            raise ValueError(f"x is on {x.device} but the model's weights are on {weight.device}")
        # Under autocast the GEMMs cast their inputs, so x need not match the weights (as with the official model).
        if x.dtype != weight.dtype and not (x.dtype in _AUTOCAST_DTYPES and torch.is_autocast_enabled(x.device.type)):
            raise TypeError(
                f"x is {x.dtype} but the model's weights are {weight.dtype}: cast x to {weight.dtype} "
                f"(or the model to x's dtype), or run under torch.autocast"
            )
        _check_per_sample("t", t, x, "timesteps as integers or floats", t.dtype != torch.bool and not t.is_complex())
        if y is None:
            return H // p, W // p
        _check_per_sample("y", y, x, "class labels as int64 or int32", y.dtype in (torch.int64, torch.int32))
        if len(y) and _validate.can_read_values(y):
            self._check_labels(y)
        return H // p, W // p

    def _check_labels(self, y):
        emb = self.y_embedder
        lo, hi = (int(v) for v in torch.aminmax(y))  # y is on the CPU: reading it costs no sync
        if 0 <= lo and hi < emb.embedding_table.num_embeddings:  # num_classes, + 1 (the null class) with dropout
            return
        null = (
            f"or the null class {emb.num_classes}"
            if emb.dropout_prob > 0
            else "(no null class: class_dropout_prob is 0)"
        )
        raise ValueError(f"y holds label {lo if lo < 0 else hi}; labels must be 0..{emb.num_classes - 1} {null}")

    def _pos_embed(self, grid, like):
        if grid == self.x_embedder.grid_size:
            return self.pos_embed
        return _sincos_pos_embed_tensor(self.pos_embed.shape[-1], grid, like.device, like.dtype)

    def unpatchify(self, x, grid_size=None):
        """x: (N, T, p*p*C) -> imgs (N, C, H, W); grid_size (h, w) defaults to a square grid."""
        return ops.unpatchify(x, self.patch_size, self.out_channels, grid_size=grid_size)

    def condition(self, t, y):
        """The conditioning: c = t_emb + y_emb (N, D) for the adaLN designs; the sequence [t_emb, y_emb]
        (N, 2, D) for cross-attention and in-context. An unconditional model (y None) has t_emb alone."""
        c = self.t_embedder(t)  # (N, D)
        if self.block in ADAPTIVE:
            return c if y is None else c + self.y_embedder(y, self.training)
        return torch.stack([c] if y is None else [c, self.y_embedder(y, self.training)], dim=1)  # (N, L, D)

    def forward(self, x, t, y=None):
        """x: (N, C, H, W) latents or images, t: (N,) diffusion timesteps, y: (N,) class labels (None for an
        unconditional model, num_classes=0).

        Bad arguments raise a ValueError or TypeError naming them. Label values are checked where
        reading them is free: CPU tensors in eager mode. On the GPU that read would stall the
        training step (a device-to-host sync), and under torch.compile it would break the graph:
        there an out-of-range label fails inside the embedding lookup, as in PyTorch.
        """
        grid = self._check_inputs(x, t, y)
        x = self.x_embedder(x) + self._pos_embed(grid, self.pos_embed)  # (N, T, D), T = H * W / p**2
        c = self.condition(t, y)  # (N, D); cross-attention, in-context: (N, L, D)
        T = x.shape[1]
        if self.block == "in-context":
            x = torch.cat([x, c.to(x.dtype)], dim=1)  # (N, T + L, D): t and y as extra tokens
        *mods, final_mod = self._modulations(c)  # (N, 6D) per block, (N, 2D); or None each
        pending = None  # each block's closing residual, applied fused into the next LayerNorm+modulate
        for block, mod in zip(self.blocks, mods):
            x, pending = self._block(block, x, c, pending, mod)  # (N, T, D), ((N, T, D), (N, D)) or None
        if self.block == "in-context":  # the conditioning tokens leave before the final layer
            x, pending = x[:, :T], pending and (pending[0][:, :T], pending[1])
        if _fuses(self.final_layer):
            x = self.final_layer(x, c, pending=pending, modulation=final_mod)  # (N, T, p*p*out_channels)
        else:
            x = self.final_layer(_applied(x, pending), c)  # (N, T, p*p*out_channels)
        return self.unpatchify(x, grid)  # (N, out_channels, H, W)

    def _block(self, block, x, c, pending, modulation):
        """block's (x, pending): its closing residual left to the next LayerNorm (see DiTBlock), or for a block
        not chained fused (_fuses: one with forward hooks, or of another kind) applied, pending None: the block
        is called as the official one is, block(x, c), and its hooks see its input and its output, the
        (N, T, D) hidden state, which they may replace."""
        fused = _fuses(block)
        if fused:
            kwargs = dict(pending=pending, defer_residual=True, modulation=modulation)
        else:
            x, kwargs = _applied(x, pending), {}
        mode = self.gradient_checkpointing if torch.is_grad_enabled() else False
        if not mode:
            out = block(x, c, **kwargs)
        elif mode == "full":
            out = checkpoint(block, x, c, use_reentrant=False, **kwargs)
        else:  # the partial is built here, not kept in a global: torch.compile traces only an inline one
            context = partial(create_selective_checkpoint_contexts, _keep_gemm_and_attention)
            out = checkpoint(block, x, c, use_reentrant=False, context_fn=context, **kwargs)
        return out if fused else (out, None)

    def _modulations(self, c):
        """adaLN_modulation(c) of every block and of the final layer from one GEMM: c (N, D) -> [(N, 6D)] * depth
        + [(N, 2D)], views of one (N, depth * 6D + 2D) output (adaLN: 4D per block).

        The parameters stay per layer (official keys, shapes and strict loading; per-block FSDP units);
        the GEMM reads them concatenated, cast first to the GEMM's dtype. That copy is the price, and
        it is small: under bf16 autocast 4 bytes per adaLN parameter on top of the casts autocast makes
        anyway (DiT-XL/2: 223M parameters, ~0.9 GB, ~0.2 ms per step predicted; the backward adds
        nothing, cat's gradient being views), against depth + 1 GEMMs of N rows each in the forward
        and twice that in the backward, each its own launch with a poorly filled GPU. Inductor can fuse
        the casts and the copy into one kernel. The concatenated weight is what the GEMM's backward
        keeps, as the per-layer GEMMs keep their autocast casts: no more memory under autocast. With
        FSDP-sharded parameters (DTensors) a block's weights are whole only inside its own forward:
        every layer then computes its own modulation (None here), as the official model does. So it does
        with adaln_one_gemm False, which `fastdit train` sets under DDP: the one GEMM's weight gradient
        (a third of DiT-XL's parameters) would be ready only when the backward ends, its all-reduce
        overlapping nothing; per layer, each block's is all-reduced while the blocks below run theirs.
        """
        if self.block not in ADAPTIVE:  # cross-attention, in-context: no adaptive norms, nothing to compute
            return [None] * (len(self.blocks) + 1)
        # None for a block or final layer of another kind, which computes its own: then every layer does
        modules = [m.adaLN_modulation if _chains(m) else None for m in (*self.blocks, self.final_layer)]
        if not self.adaln_one_gemm or not all(map(_is_plain_modulation, modules)):  # (FSDP2-sharded ones too)
            return [None] * len(modules)
        layers = [module[-1] for module in modules]
        dtype = _gemm_dtype(layers[0].weight)
        weight = torch.cat([layer.weight.to(dtype) for layer in layers])  # (depth * 6D + 2D, D)
        bias = torch.cat([layer.bias.to(dtype) for layer in layers])  # (depth * 6D + 2D,)
        mod = F.linear(F.silu(c), weight, bias)  # (N, depth * 6D + 2D)
        return mod.split([layer.out_features for layer in layers], dim=1)

    def forward_with_cfg(self, x, t, y, cfg_scale, cfg_channels="paper"):
        """Forward with classifier-free guidance; the batch is [conditional half, unconditional half].

        Only predicted-noise (eps) channels are guided, never the learned-sigma ones. cfg_channels:
        "paper" guides the first min(3, in_channels) channels, as the official code (and its
        reported FIDs) do for 4-channel latents; "all" guides every eps channel (the standard
        formulation).
        """
        if cfg_channels not in ("paper", "all"):
            raise ValueError(f"cfg_channels must be 'paper' or 'all', got {cfg_channels!r}")
        if self.y_embedder is None:
            raise ValueError("classifier-free guidance needs a class-conditional model; this one has num_classes=0")
        if not isinstance(cfg_scale, (numbers.Real, torch.Tensor)) or isinstance(cfg_scale, bool):
            raise TypeError(f"cfg_scale must be a number (or a tensor), got {type(cfg_scale).__name__}")
        if isinstance(cfg_scale, numbers.Real) and not math.isfinite(cfg_scale):
            raise ValueError(f"cfg_scale must be finite, got {cfg_scale!r}")
        _check_is_tensor("x", x)
        if len(x) % 2:
            raise ValueError(f"x must be an even batch (conditional half, then unconditional half), got {len(x)}")
        n_half = len(x) // 2
        half = x[:n_half]
        combined = torch.cat([half, half], dim=0)
        model_out = self.forward(combined, t, y)
        n = min(3, self.in_channels) if cfg_channels == "paper" else self.in_channels
        eps, rest = model_out[:, :n], model_out[:, n:]
        # Slices, not the official torch.split(eps, len(eps) // 2), which fails on an empty batch (one empty part)
        cond_eps, uncond_eps = eps[:n_half], eps[n_half:]
        half_eps = uncond_eps + cfg_scale * (cond_eps - uncond_eps)
        eps = torch.cat([half_eps, half_eps], dim=0)
        return torch.cat([eps, rest], dim=1)


_AUTOCAST_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _check_is_tensor(name, v):
    if not isinstance(v, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(v).__name__}")


def _check_per_sample(name, v, x, kind, dtype_ok):
    """v holds one value per sample of x, of a dtype of `kind`, on x's device."""
    if tuple(v.shape) != (len(x),):
        raise ValueError(f"{name} must be ({len(x)},), one value per sample of x, got shape {tuple(v.shape)}")
    if not dtype_ok:
        raise TypeError(f"{name} must hold {kind}, got {v.dtype}")
    if v.device != x.device:
        raise ValueError(f"{name} is on {v.device} but x is on {x.device}")


#################################################################################
#                   Sine/cosine positional embedding                            #
#################################################################################


def get_2d_sincos_pos_embed(embed_dim, grid_size, cls_token=False, extra_tokens=0):
    """grid_size: int (square) or (h, w) -> (h*w, embed_dim) float64, tokens row-major over (h, w).

    The first half of the channels encodes the column (w) coordinate, the second half the row,
    as in MAE and DiT.
    """
    gh, gw = _pair(grid_size, "grid_size")
    grid = np.stack(np.meshgrid(np.arange(gw, dtype=np.float32), np.arange(gh, dtype=np.float32)))  # (2, h, w)
    emb = get_2d_sincos_pos_embed_from_grid(embed_dim, grid)  # (h*w, D)
    if cls_token and extra_tokens > 0:
        emb = np.concatenate([np.zeros([extra_tokens, embed_dim]), emb], axis=0)
    return emb


def get_2d_sincos_pos_embed_from_grid(embed_dim, grid):
    """grid (2, ...): the column and the row coordinate of M positions -> (M, embed_dim), the first half
    of the channels encoding grid[0], the second grid[1]."""
    if embed_dim % 4:
        raise ValueError(
            f"hidden_size must be a multiple of 4 for the 2-D sin-cos position embedding (sin and cos of each "
            f"axis take a quarter), got {embed_dim}"
        )
    emb_w = get_1d_sincos_pos_embed_from_grid(embed_dim // 2, grid[0])  # (M, D/2)
    emb_h = get_1d_sincos_pos_embed_from_grid(embed_dim // 2, grid[1])  # (M, D/2)
    return np.concatenate([emb_w, emb_h], axis=1)  # (M, D)


def get_1d_sincos_pos_embed_from_grid(embed_dim, pos):
    """pos: positions of any shape (M values) -> (M, embed_dim) = [sin(pos w), cos(pos w)]."""
    if embed_dim % 2:
        raise ValueError(f"embed_dim must be even, got {embed_dim}")
    omega = 1.0 / 10000 ** (np.arange(embed_dim // 2, dtype=np.float64) / (embed_dim / 2.0))  # (D/2,)
    out = np.outer(pos.reshape(-1), omega)  # (M, D/2)
    return np.concatenate([np.sin(out), np.cos(out)], axis=1)  # (M, D)


@lru_cache(maxsize=16)
def _sincos_pos_embed_tensor(embed_dim, grid, device, dtype):
    pos = get_2d_sincos_pos_embed(embed_dim, grid)
    return torch.from_numpy(pos).to(device=device, dtype=torch.float32).to(dtype).unsqueeze(0)  # (1, T, D)


#################################################################################
#                                   DiT configs                                 #
#################################################################################

CONFIGS = {  # DiT size: (depth, hidden_size, num_heads)
    "XL": (28, 1152, 16),
    "L": (24, 1024, 16),
    "B": (12, 768, 12),
    "S": (12, 384, 6),
}


def _config(cls, size, patch_size, depth, hidden_size, num_heads):
    def make(**kwargs):
        return cls(depth=depth, hidden_size=hidden_size, patch_size=patch_size, num_heads=num_heads, **kwargs)

    make.__name__ = f"DiT_{size}_{patch_size}"
    make.__doc__ = f"DiT-{size}/{patch_size}: depth {depth}, hidden size {hidden_size}, {num_heads} heads."
    return make


def model_configs(cls):
    """The twelve named configurations 'DiT-XL/2' ... 'DiT-S/8' of a DiT-like class."""
    return {f"DiT-{size}/{p}": _config(cls, size, p, *CONFIGS[size]) for size in CONFIGS for p in (2, 4, 8)}


# Beyond the paper: a CPU-sized DiT (~1.9M parameters), what `fastdit train` picks for small data (the
# digits job trains DiT-Tiny/2); patch size 1 for inputs as small as 4x4 latents.
TINY = (6, 128, 4)  # depth, hidden_size, num_heads
DiT_models = {**model_configs(DiT), **{f"DiT-Tiny/{p}": _config(DiT, "Tiny", p, *TINY) for p in (1, 2, 4)}}
DiT_XL_2, DiT_XL_4, DiT_XL_8 = (DiT_models[f"DiT-XL/{p}"] for p in (2, 4, 8))
DiT_L_2, DiT_L_4, DiT_L_8 = (DiT_models[f"DiT-L/{p}"] for p in (2, 4, 8))
DiT_B_2, DiT_B_4, DiT_B_8 = (DiT_models[f"DiT-B/{p}"] for p in (2, 4, 8))
DiT_S_2, DiT_S_4, DiT_S_8 = (DiT_models[f"DiT-S/{p}"] for p in (2, 4, 8))
