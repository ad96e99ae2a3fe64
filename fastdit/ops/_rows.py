"""Row kernels behind modulate_layer_norm, gated_residual and gated_residual_modulate_layer_norm.

One forward and one backward kernel serve the three ops, specialised by two constexpr flags:
  HAS_RESIDUAL  r = x + gate * y                         (gated_residual, the fused op)
  HAS_NORM      out = layer_norm(r) * (1 + scale) + shift (modulate_layer_norm with r = x, the fused op)
Each specialisation compiles under its op's name (`modulate_layer_norm_fwd_kernel`, ...), so a
profiler trace says which op ran.

A program owns a chunk of consecutive tokens of one batch element b and walks it in tiles of
BLOCK_T rows x BLOCK_D columns (BLOCK_D = D rounded up to a power of two, masked). b's gate,
shift and scale rows are loaded once per program; in the backward the per-batch gradients
(d-shift, d-scale, d-gate: sums over tokens) accumulate in fp32 registers and each program
writes its partial sums once to a (B, chunks, D) fp32 buffer, which torch then sums over the
chunks: deterministic, no atomics. Statistics and arithmetic are fp32 whatever the storage
dtypes; each output is rounded once, to torch's promotion of the inputs that make it. The
variance is taken of the centred row scaled by a power of two (_rstd): nothing overflows while
the row's sum does not (D * max|x| < 3.4e38), where squaring first overflows from a standard
deviation of 5.4e17 at D = 1152.

Why rows are padded to a power of two (D = 1152 runs as 2048 masked lanes), not split exactly:
tl.arange needs a power of two, and masked lanes issue no memory transactions, so the DRAM traffic
these memory-bound kernels live on stays exact; what padding costs is registers and issue slots
on 44 % dead lanes, i.e. fewer programs resident per SM (PROGRAMS_PER_SM, checked ahead of time)
and so fewer bytes in flight. An exact width would split each row into power-of-two pieces
(1152 = 1024 + 128), doubling every load, statistic and store in both kernels; the native CUDA
kernels (kernels/rows.cu) already run exact widths (144 lanes x 8 bf16), and the benchmark's
`cuda x triton` column at D = 1152 measures what the padding costs before anyone pays that
complexity.
"""

import math
from collections import namedtuple

import torch

from . import _triton_utils as tu
from ._triton_utils import offset64, row_major, tl, triton

# A program holds whole rows in registers: at D = 8192 they still fit (sm_90, 16 warps), to 16384
# the kernels are correct but spill; wider rows would need a kernel that loops over D.
MAX_D = 16384
# Programs per SM the grid is sized for, per (direction, op): what fits at once in the registers the
# kernels take (8 warps a program; compiled ahead of time for sm_80 and sm_90 on Triton 3.6 and the
# newest, every DiT width and dtype, bf16 autocast's mix included: tests/test_codegen.py checks
# these numbers). The fused op holds the most live tiles, so fewer of its programs fit; the backward
# aims lower anyway: every program adds a row of partial sums per reduced vector (~1/T of the traffic).
PROGRAMS_PER_SM = {
    ("fwd", "modulate_layer_norm"): 3, ("fwd", "gated_residual"): 4, ("fwd", "gated_residual_modulate_layer_norm"): 2,
    ("bwd", "modulate_layer_norm"): 2, ("bwd", "gated_residual"): 2, ("bwd", "gated_residual_modulate_layer_norm"): 1,
}  # fmt: skip

Blocking = namedtuple("Blocking", "block_t block_d rows chunks num_warps")


def check_width(D):
    if D > MAX_D:
        raise ValueError(f"x's last dimension D={D} exceeds the Triton row kernels' maximum of {MAX_D}")


def blocking(B, T, D, device, programs_per_sm):
    """Tile shape, tokens per program (a multiple of the tile's rows) and chunks per batch element.

    On the GPU, as many chunks as keep B * chunks within one wave of programs_per_sm per SM (a
    second, partial wave would leave most SMs idle while it runs); interpreted, one program per
    batch element (the interpreter runs programs one at a time).
    """
    block_d = triton.next_power_of_2(D)
    block_t = tu.tile_rows(T, block_d, device)
    target = programs_per_sm * tu.sm_count(device) if tu.gpu_launch(device) else 1
    tiles = triton.cdiv(T, block_t)
    rows = triton.cdiv(tiles, min(tiles, max(1, target // B))) * block_t
    return Blocking(block_t, block_d, rows, triton.cdiv(T, rows), tu.num_warps(block_t * block_d))


def _promote(dtype, *tensors):
    for t in tensors:
        dtype = torch.promote_types(dtype, t.dtype)
    return dtype


OP_OF_FLAGS = {  # (HAS_RESIDUAL, HAS_NORM) -> op
    (False, True): "modulate_layer_norm",
    (True, False): "gated_residual",
    (True, True): "gated_residual_modulate_layer_norm",
}


def _kernel_name(direction):
    """Triton `repr`: a specialisation's compiled name, from its constexpr flags."""

    def name(specialization):
        flags = (specialization.constants["HAS_RESIDUAL"], specialization.constants["HAS_NORM"])
        return f"{OP_OF_FLAGS[tuple(bool(getattr(f, 'value', f)) for f in flags)]}_{direction}_kernel"

    return name


# ALIGN, a power of two dividing D and every row stride (`alignment`), tells Triton that row starts
# are multiples of it: `n // ALIGN * ALIGN` is n itself, and provably a multiple (Triton tracks
# divisibility through arithmetic; its own specialisation only knows 16-divisibility). Then the
# loads and stores of D = 72k, k odd, move 16 bytes at a time instead of one element.
@triton.jit
def _aligned(n, ALIGN: tl.constexpr):
    return n // ALIGN * ALIGN


@triton.jit
def _load_vec(P, b, stride_b, cols, col_ok, ALIGN: tl.constexpr):
    """Row b of a (B, D) tensor as fp32 [BLOCK_D]."""
    return tl.load(P + b.to(tl.int64) * _aligned(stride_b, ALIGN) + cols, mask=col_ok, other=0.0).to(tl.float32)


@triton.jit
def _load_tile(P, b, stride_b, t, stride_t, cols, mask, ALIGN: tl.constexpr):
    """Rows t of batch element b of a (B, T, D) tensor (unit column stride) as fp32 [BLOCK_T, BLOCK_D]."""
    starts = offset64(b, _aligned(stride_b, ALIGN), t, _aligned(stride_t, ALIGN))  # [BLOCK_T]
    return tl.load(P + starts[:, None] + cols[None, :], mask=mask, other=0.0).to(tl.float32)


@triton.jit
def _inverse_power_of_two(s):
    """1 / 2**floor(log2(s)) for positive normal float32 s, from its exponent bits (254 - e): exact,
    so scaling by it moves no rounding. 0 for s >= 2**127."""
    return (0x7F000000 - (s.to(tl.int32, bitcast=True) & 0x7F800000)).to(tl.float32, bitcast=True)


@triton.jit
def _rstd(xc, eps, D):
    """1 / sqrt(mean(xc**2) + eps) for the rows of centred xc [BLOCK_T, BLOCK_D], without overflow.

    The squares are taken of xc * 2**-k, 2**k the power of two at or below the row's
    max(max |xc|, sqrt(eps)), and eps is scaled by 2**-2k alike: |xc| * 2**-k < 2 and eps * 2**-2k
    <= 4, so nothing overflows until |xc| reaches 2**127. Power-of-two scaling is exact, so where the
    plain sum of squares does not overflow or underflow the result is the same, bit for bit.
    """
    inv = _inverse_power_of_two(tl.maximum(tl.max(tl.abs(xc), axis=1), tl.sqrt(eps)))  # [BLOCK_T]
    y = xc * inv[:, None]
    return tl.math.rsqrt(tl.sum(y * y, axis=1) / D + eps * inv * inv) * inv


@triton.jit
def _residual(x, gate, y, dtype: tl.constexpr):
    """r = x + gate * y rounded to r's dtype, for the tiles x, y [BLOCK_T, BLOCK_D] and the row gate
    [BLOCK_D]: the forward's r, and the backward's when it recomputes r from the x it kept (one
    expression, so both compile to the same fused multiply-add and the same rounding)."""
    return (x + gate[None, :] * y).to(dtype)


@triton.jit
def _store(P, offsets, value, mask):
    tl.store(P + offsets, value.to(P.dtype.element_ty), mask=mask)


@triton.jit(repr=_kernel_name("fwd"))
def rows_fwd_kernel(
    X, Y, GATE, SHIFT, SCALE,  # x, y (B, T, D); gate, shift, scale (B, D): any batch/token strides
    R, OUT, MEAN, RSTD,  # r, out (B, T, D) and mean, rstd (B, T) fp32: contiguous
    T, D, rows, eps,
    sx_b, sx_t, sy_b, sy_t, s_gate, s_shift, s_scale,
    HAS_RESIDUAL: tl.constexpr, HAS_NORM: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr,
    ALIGN: tl.constexpr,
):  # fmt: skip
    b = tl.program_id(0)
    t_begin = tl.program_id(1) * rows
    t_end = tl.minimum(t_begin + rows, T)
    D = _aligned(D, ALIGN)  # the column mask then holds over whole vectors
    cols = tl.arange(0, BLOCK_D)
    col_ok = cols < D
    if HAS_RESIDUAL:
        gate = _load_vec(GATE, b, s_gate, cols, col_ok, ALIGN)
    if HAS_NORM:
        shift = _load_vec(SHIFT, b, s_shift, cols, col_ok, ALIGN)
        scale1 = 1.0 + _load_vec(SCALE, b, s_scale, cols, col_ok, ALIGN)
    for t0 in range(t_begin, t_end, BLOCK_T):
        t = t0 + tl.arange(0, BLOCK_T)
        row_ok = t < t_end
        mask = row_ok[:, None] & col_ok[None, :]
        row = offset64(b, T, t, 1)  # (b, t) in the contiguous outputs [BLOCK_T]
        dense = row[:, None] * D + cols[None, :]
        x = _load_tile(X, b, sx_b, t, sx_t, cols, mask, ALIGN)
        if HAS_RESIDUAL:
            r = _residual(x, gate, _load_tile(Y, b, sy_b, t, sy_t, cols, mask, ALIGN), R.dtype.element_ty)
            tl.store(R + dense, r, mask=mask)
            x = r.to(tl.float32)  # normalise r as stored: what the backward reloads
        if HAS_NORM:
            mean = tl.sum(x, axis=1) / D
            xc = tl.where(mask, x - mean[:, None], 0.0)
            rstd = _rstd(xc, eps, D)
            tl.store(MEAN + row, mean, mask=row_ok)
            tl.store(RSTD + row, rstd, mask=row_ok)
            _store(OUT, dense, xc * rstd[:, None] * scale1[None, :] + shift[None, :], mask)


# Backward. With xhat = (r - mean) * rstd and out = xhat * (1 + scale) + shift, per batch
# element b and row t (sums over t run over b's tokens, means over the D columns):
#   d-shift = sum_t dout          d-scale = sum_t dout * xhat
#   g = dout * (1 + scale);  d-xhat = g, and through xhat = (r - mean(r)) / sqrt(var(r) + eps):
#   dr = rstd * (g - mean(g) - xhat * mean(g * xhat))
# The fused op adds the gradient arriving at r itself: dr_total = dr + grad_r. Through
# r = x + gate * y:  dx = dr_total,  dy = dr_total * gate,  d-gate = sum_t dr_total * y.
# gated_residual alone has no norm: dr_total = grad_r, and dx = grad_r needs no kernel.
# RECOMPUTE_R (the fused op): R holds the x the caller keeps anyway, not r, and r = x + gate * y is
# recomputed as the forward computed it. That costs no traffic: x replaces r in the reads, and y,
# read for d-gate anyway, is read once, earlier.
@triton.jit(repr=_kernel_name("bwd"))
def rows_bwd_kernel(
    DOUT, DR, R, Y, GATE, SCALE, MEAN, RSTD,  # grads of out and r (B, T, D); saved r (or x), y, gate, scale, mean, rstd
    DX, DY, PART,  # dx, dy (B, T, D) contiguous; partial sums (n_sums, B, chunks, D) fp32
    B, T, D, rows,
    sdo_b, sdo_t, sdr_b, sdr_t, sr_b, sr_t, sy_b, sy_t, s_gate, s_scale,
    HAS_RESIDUAL: tl.constexpr, HAS_NORM: tl.constexpr, RECOMPUTE_R: tl.constexpr, BLOCK_T: tl.constexpr,
    BLOCK_D: tl.constexpr, ALIGN: tl.constexpr,
):  # fmt: skip
    b = tl.program_id(0)
    chunk = tl.program_id(1)
    t_begin = chunk * rows
    t_end = tl.minimum(t_begin + rows, T)
    D = _aligned(D, ALIGN)
    cols = tl.arange(0, BLOCK_D)
    col_ok = cols < D
    if HAS_RESIDUAL:
        gate = _load_vec(GATE, b, s_gate, cols, col_ok, ALIGN)
        acc_gate = tl.zeros([BLOCK_D], tl.float32)
    if HAS_NORM:
        scale1 = 1.0 + _load_vec(SCALE, b, s_scale, cols, col_ok, ALIGN)
        acc_shift = tl.zeros([BLOCK_D], tl.float32)
        acc_scale = tl.zeros([BLOCK_D], tl.float32)
    for t0 in range(t_begin, t_end, BLOCK_T):
        t = t0 + tl.arange(0, BLOCK_T)
        row_ok = t < t_end
        mask = row_ok[:, None] & col_ok[None, :]
        row = offset64(b, T, t, 1)
        dense = row[:, None] * D + cols[None, :]
        d = tl.zeros([BLOCK_T, BLOCK_D], tl.float32)
        if HAS_NORM:
            dout = _load_tile(DOUT, b, sdo_b, t, sdo_t, cols, mask, ALIGN)
            mean = tl.load(MEAN + row, mask=row_ok, other=0.0)
            rstd = tl.load(RSTD + row, mask=row_ok, other=0.0)  # 0 on masked rows: their d stays 0
            r = _load_tile(R, b, sr_b, t, sr_t, cols, mask, ALIGN)
            if RECOMPUTE_R:
                y = _load_tile(Y, b, sy_b, t, sy_t, cols, mask, ALIGN)
                r = _residual(r, gate, y, R.dtype.element_ty).to(tl.float32)
            xhat = tl.where(mask, (r - mean[:, None]) * rstd[:, None], 0.0)
            acc_shift += tl.sum(dout, axis=0)
            acc_scale += tl.sum(dout * xhat, axis=0)
            g = dout * scale1[None, :]
            mean_g = tl.sum(g, axis=1) / D
            mean_gx = tl.sum(g * xhat, axis=1) / D
            d = rstd[:, None] * (g - mean_g[:, None] - xhat * mean_gx[:, None])
        if HAS_RESIDUAL:
            d += _load_tile(DR, b, sdr_b, t, sdr_t, cols, mask, ALIGN)
            _store(DY, dense, d * gate[None, :], mask)
            if not RECOMPUTE_R:
                y = _load_tile(Y, b, sy_b, t, sy_t, cols, mask, ALIGN)
            acc_gate += tl.sum(d * y, axis=0)
        if HAS_NORM:
            _store(DX, dense, d, mask)
    part = offset64(b, tl.num_programs(1), chunk, 1) * D + cols  # [BLOCK_D]: (b, chunk) of a slice
    n_slice = tl.num_programs(1).to(tl.int64) * D * B  # elements in one (B, chunks, D) slice
    if HAS_NORM:
        tl.store(PART + part, acc_shift, mask=col_ok)
        tl.store(PART + n_slice + part, acc_scale, mask=col_ok)
        if HAS_RESIDUAL:
            tl.store(PART + 2 * n_slice + part, acc_gate, mask=col_ok)
    else:
        tl.store(PART + part, acc_gate, mask=col_ok)


def forward_buffers(x, y=None, gate=None, shift=None, scale=None):
    """(r, out, mean, rstd) as the forward writes them (None where the op has no such output).

    Also the ops' fake implementations: under torch.compile's fake mode these are fake tensors.
    """
    B, T, D = x.shape
    r = out = mean = rstd = None
    dtype = x.dtype
    if y is not None:
        dtype = _promote(dtype, y, gate)
        r = tu.empty((B, T, D), dtype, x.device)
    if shift is not None:
        out = tu.empty((B, T, D), _promote(dtype, shift, scale), x.device)
        mean, rstd = (tu.empty((B, T), torch.float32, x.device) for _ in range(2))
    return r, out, mean, rstd


def forward(x, y=None, gate=None, shift=None, scale=None, eps=0.0):
    """Launch the forward: y and gate for the residual, shift and scale for the norm; -> forward_buffers."""
    r, out, mean, rstd = outputs = forward_buffers(x, y, gate, shift, scale)
    B, T, D = x.shape
    x, y, gate, shift, scale = (None if t is None else row_major(t) for t in (x, y, gate, shift, scale))
    strides = (*_strides(x, 2), *_strides(y, 2), *_strides(gate, 1), *_strides(shift, 1), *_strides(scale, 1))
    programs = PROGRAMS_PER_SM["fwd", OP_OF_FLAGS[y is not None, shift is not None]]
    blk = blocking(B, T, D, x.device, programs)
    rows_fwd_kernel[(B, blk.chunks)](
        x, y, gate, shift, scale, r, out, mean, rstd,
        T, D, blk.rows, eps, *strides,
        HAS_RESIDUAL=y is not None, HAS_NORM=shift is not None, BLOCK_T=blk.block_t, BLOCK_D=blk.block_d,
        ALIGN=alignment(D, *strides), **tu.launch_options(blk.num_warps, programs),
    )  # fmt: skip
    return outputs


def _grad_buffers(like, x_dtype, has_norm, y):
    """dx (x_dtype) when there is a norm, dy (y's dtype) when there is a residual; else None."""
    dx = tu.empty(like.shape, x_dtype, like.device) if has_norm else None
    dy = tu.empty(like.shape, y.dtype, like.device) if y is not None else None
    return dx, dy


def can_recompute_r(x, y, gate, shift, scale):
    """Whether the fused op's backward can recompute r from x (recompute_r): when r, out and so every
    tensor the backward loads have x's dtype, x rounds to r as the forward rounded it (the native
    kernels load those tensors in one dtype). So under autocast (fp32 x, 16-bit y and modulation)
    and in a model of one dtype."""
    return _promote(x.dtype, y, gate, shift, scale) == x.dtype


def backward_fake(x_dtype, grad_out=None, grad_r=None, y=None, **_):
    """What backward returns, as empty tensors of the right shapes: the ops' fake implementations."""
    like = grad_out if grad_out is not None else grad_r
    B, _, D = like.shape
    n_sums = 2 * (grad_out is not None) + (y is not None)
    return (*_grad_buffers(like, x_dtype, grad_out is not None, y), like.new_empty((n_sums, B, D), dtype=torch.float32))


def backward(
    x_dtype, grad_out=None, r=None, scale=None, mean=None, rstd=None, grad_r=None, y=None, gate=None, recompute_r=False
):
    """Launch the backward -> (dx, dy, sums).

    The norm's inputs: grad_out (gradient of out), r (what was normalised: x or r), scale, mean,
    rstd. The residual's: grad_r (gradient arriving at r), y, gate. An op passes the ones it has.
    recompute_r (both parts present): `r` holds the residual's x, of r's dtype, and the kernel
    recomputes r = x + gate * y (see can_recompute_r).
    dx (x_dtype) comes with a norm, dy (y's dtype) with a residual; sums (n_sums, B, D) fp32 holds
    [d-shift, d-scale] with a norm, then [d-gate] with a residual.
    """
    like = grad_out if grad_out is not None else grad_r
    B, T, D = like.shape
    dx, dy = _grad_buffers(like, x_dtype, grad_out is not None, y)
    grad_out, r, scale, grad_r, y, gate = (
        None if t is None else row_major(t) for t in (grad_out, r, scale, grad_r, y, gate)
    )
    programs = PROGRAMS_PER_SM["bwd", OP_OF_FLAGS[y is not None, grad_out is not None]]
    blk = blocking(B, T, D, like.device, programs)
    n_sums = 2 * (grad_out is not None) + (y is not None)
    partial = tu.empty((n_sums, B, blk.chunks, D), torch.float32, like.device)
    strides = (
        *_strides(grad_out, 2),
        *_strides(grad_r, 2),
        *_strides(r, 2),
        *_strides(y, 2),
        *_strides(gate, 1),
        *_strides(scale, 1),
    )
    rows_bwd_kernel[(B, blk.chunks)](
        grad_out, grad_r, r, y, gate, scale, mean, rstd, dx, dy, partial,
        B, T, D, blk.rows, *strides,
        HAS_RESIDUAL=y is not None, HAS_NORM=grad_out is not None, RECOMPUTE_R=recompute_r, BLOCK_T=blk.block_t,
        BLOCK_D=blk.block_d, ALIGN=alignment(D, *strides), **tu.launch_options(blk.num_warps, programs),
    )  # fmt: skip
    return dx, dy, partial.sum(dim=2)  # second stage: a fixed-order reduction over the chunks


def alignment(D, *strides):
    """ALIGN: the largest power of two, up to 16, dividing D and every row stride."""
    g = math.gcd(D, *strides)
    return min(16, g & -g)


def _strides(t, n):
    """The first n strides of t (zeros for an absent tensor)."""
    return t.stride()[:n] if t is not None else (0,) * n
