"""The `triton` attention backend: FlashAttention-2 style forward and backward kernels.

softmax(q k^T / sqrt(Dh)) v, non-causal, on (B, T, H, Dh) tensors that may be strided views of
the qkv GEMM output (B, T, 3, H, Dh): the kernels take batch, token and head strides and need a
unit stride on Dh only. The output is contiguous (B, Tq, H, Dh), so the model's reshape to
(B, T, D) is free. Tq and Tk may differ; any T works (masked tails).

Head dim without padding to 128: tl.dot needs power-of-two tiles of at least 16, so the head dim
is split into a power-of-two part D0 and, when Dh is not a power of two, a tail tile D1 >= 16
whose columns past Dh are masked: 72 = 64 + 16 (8 masked), 96 = 64 + 32, 40 = 32 + 16. Every
product over the head dim is then two dots (one when there is no tail), and every (rows, Dh)
tile is carried as two tiles (x0, x1). Dh = 72 costs 80 columns of work, not 128.

Precision: float16/bfloat16 tiles feed tl.dot with float32 accumulation; softmax statistics are
float32; float32 inputs use IEEE dots (no TF32). The log-sum-exp saved for the backward is in
base 2 (lse2 = log2 sum_j 2^(s_ij log2(e)), s = q k^T / sqrt(Dh)), the unit the kernels use with exp2.

Under the Triton interpreter tl.dot on bfloat16 multiplies raw bits, so tiles are upcast to
float32 before each dot when interpreting; the rounding of p and dS to the input dtype, which the
GPU kernels do, is kept.
"""

import dataclasses
import math

import torch

from . import _triton_utils as tu
from ._triton_utils import INTERPRET, check_device, row_major, tl, triton

MAX_HEAD_DIM = 256
LOG2E = 1.4426950408889634


# --------------------------------------------------------------------------------------------
# kernels
# --------------------------------------------------------------------------------------------


@triton.jit
def _dot(a, b, acc, UPCAST: tl.constexpr, PRECISION: tl.constexpr):
    """acc + a @ b with float32 accumulation."""
    if UPCAST:
        a = a.to(tl.float32)
        b = b.to(tl.float32)
    return tl.dot(a, b, acc, input_precision=PRECISION)


@triton.jit
def _dot_heads(a0, a1, b0, b1, M: tl.constexpr, N: tl.constexpr, TAIL: tl.constexpr,
               UPCAST: tl.constexpr, PRECISION: tl.constexpr):  # fmt: skip
    """a @ b^T over the split head dim: (M, Dh) x (N, Dh) -> (M, N) float32."""
    acc = _dot(a0, tl.trans(b0), tl.zeros([M, N], tl.float32), UPCAST, PRECISION)
    if TAIL:
        acc = _dot(a1, tl.trans(b1), acc, UPCAST, PRECISION)
    return acc


@triton.jit
def _tile(ptr, rows, row_stride, n_rows, START: tl.constexpr, WIDTH: tl.constexpr, HEAD_DIM: tl.constexpr):
    """Pointers and mask of columns [START, START + WIDTH) at rows `rows` of a (n_rows, HEAD_DIM) tensor."""
    cols = START + tl.arange(0, WIDTH)
    return ptr + rows[:, None] * row_stride + cols[None, :], (rows[:, None] < n_rows) & (cols[None, :] < HEAD_DIM)


@triton.jit
def _load_rows(ptr, rows, row_stride, n_rows, D0: tl.constexpr, D1: tl.constexpr, HEAD_DIM: tl.constexpr,
               TAIL: tl.constexpr):  # fmt: skip
    """Rows `rows` of a (n_rows, HEAD_DIM) tensor as the split tile (x0, x1): columns [0, D0) and
    [D0, D0 + D1). Rows past n_rows and columns past HEAD_DIM read as 0, so they add nothing to any
    product. Without a tail, x1 is x0 and unused."""
    ptrs, mask = _tile(ptr, rows, row_stride, n_rows, 0, D0, HEAD_DIM)
    x0 = tl.load(ptrs, mask=mask, other=0.0)
    x1 = x0
    if TAIL:
        ptrs, mask = _tile(ptr, rows, row_stride, n_rows, D0, D1, HEAD_DIM)
        x1 = tl.load(ptrs, mask=mask, other=0.0)
    return x0, x1


@triton.jit
def _store_rows(ptr, rows, row_stride, n_rows, x0, x1, D0: tl.constexpr, D1: tl.constexpr,
                HEAD_DIM: tl.constexpr, TAIL: tl.constexpr, ATOMIC_ADD: tl.constexpr = False):  # fmt: skip
    """Store the split tile (x0, x1) at rows `rows` of a (n_rows, HEAD_DIM) tensor, cast to its dtype;
    with ATOMIC_ADD, add it atomically instead (float32 tensors)."""
    ptrs, mask = _tile(ptr, rows, row_stride, n_rows, 0, D0, HEAD_DIM)
    _store(ptrs, x0, mask, ATOMIC_ADD)
    if TAIL:
        ptrs, mask = _tile(ptr, rows, row_stride, n_rows, D0, D1, HEAD_DIM)
        _store(ptrs, x1, mask, ATOMIC_ADD)


@triton.jit
def _store(ptrs, x, mask, ATOMIC_ADD: tl.constexpr):
    if ATOMIC_ADD:
        tl.atomic_add(ptrs, x, mask=mask, sem="relaxed")
    else:
        tl.store(ptrs, x.to(ptrs.dtype.element_ty), mask=mask)


@triton.jit
def _program(n_rows, BLOCK: tl.constexpr):
    """(row block, batch*head) of this program. One grid axis: the second is capped at 65535, which
    B*H can pass; row blocks vary fastest, so the programs sharing a head's K/V run together (L2)."""
    n_blocks = tl.cdiv(n_rows, BLOCK)
    pid = tl.program_id(0)
    return pid % n_blocks, pid // n_blocks


@triton.jit
def _head_offset(bh, H, stride_b, stride_h, ALIGN: tl.constexpr):
    """Element offset of (batch, head) bh // H, bh % H; int64, since batch offsets outgrow int32.

    ALIGN divides every batch and head stride. Triton only sees strides that are multiples of 16;
    without the hint a head stride of 72 makes every load scalar and unpipelined (seen in the PTX).
    """
    return tl.multiple_of((bh // H).to(tl.int64) * stride_b + (bh % H).to(tl.int64) * stride_h, ALIGN)


@triton.jit
def _probs_and_dlogits(s, dp, lse, delta, key_ok, qk_scale):
    """P and dS = P (dP - delta) of a backward tile from its raw logits s = q.k, dP, and the
    queries' base-2 lse and delta and the keys' validity, all broadcast to the tile's shape.

    Past-the-end keys get the logit -inf, so P = 0 exactly. Their k loads as 0: left as it is, P =
    2^(0 - lse2) overflows where a query's logits are all strongly negative (lse2 < -128; rounded to
    float16, lse2 < -16), and inf times that zero k puts NaN in dQ.
    """
    p = tl.math.exp2(tl.where(key_ok, s * qk_scale, float("-inf")) - lse)
    return p, p * (dp - delta)


@triton.jit
def attention_fwd_kernel(
    Q, K, V, O, LSE,
    stride_qb, stride_qt, stride_qh, stride_kb, stride_kt, stride_kh,
    stride_vb, stride_vt, stride_vh, stride_ob, stride_ot, stride_oh,
    H, Tq, Tk, qk_scale,
    HEAD_DIM: tl.constexpr, D0: tl.constexpr, D1: tl.constexpr, TAIL: tl.constexpr, ALIGN: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr,
):  # fmt: skip
    # One program: BLOCK_M query rows of one (batch, head), streaming all keys in BLOCK_N steps with
    # the online softmax (running max m, running sum l, rescaled accumulator), in base 2.
    pid_m, bh = _program(Tq, BLOCK_M)
    Q += _head_offset(bh, H, stride_qb, stride_qh, ALIGN)
    K += _head_offset(bh, H, stride_kb, stride_kh, ALIGN)
    V += _head_offset(bh, H, stride_vb, stride_vh, ALIGN)
    O += _head_offset(bh, H, stride_ob, stride_oh, ALIGN)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    q0, q1 = _load_rows(Q, rows, stride_qt, Tq, D0, D1, HEAD_DIM, TAIL)  # (BLOCK_M, D0), (BLOCK_M, D1)
    m = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l = tl.zeros([BLOCK_M], tl.float32)
    acc0 = tl.zeros([BLOCK_M, D0], tl.float32)
    acc1 = tl.zeros([BLOCK_M, D1], tl.float32)
    for start_n in range(0, Tk, BLOCK_N):
        cols = start_n + tl.arange(0, BLOCK_N)
        k0, k1 = _load_rows(K, cols, stride_kt, Tk, D0, D1, HEAD_DIM, TAIL)  # (BLOCK_N, D0), (BLOCK_N, D1)
        v0, v1 = _load_rows(V, cols, stride_vt, Tk, D0, D1, HEAD_DIM, TAIL)
        s = _dot_heads(q0, q1, k0, k1, BLOCK_M, BLOCK_N, TAIL, UPCAST, PRECISION) * qk_scale  # (BLOCK_M, BLOCK_N)
        s = tl.where(cols[None, :] < Tk, s, float("-inf"))  # every block has a valid key: m stays finite
        m_new = tl.maximum(m, tl.max(s, 1))
        alpha = tl.math.exp2(m - m_new)
        p = tl.math.exp2(s - m_new[:, None])
        l = l * alpha + tl.sum(p, 1)
        p = p.to(V.dtype.element_ty)
        acc0 = _dot(p, v0, acc0 * alpha[:, None], UPCAST, PRECISION)
        if TAIL:
            acc1 = _dot(p, v1, acc1 * alpha[:, None], UPCAST, PRECISION)
        m = m_new
    _store_rows(O, rows, stride_ot, Tq, acc0 / l[:, None], acc1 / l[:, None], D0, D1, HEAD_DIM, TAIL)
    tl.store(LSE + bh.to(tl.int64) * Tq + rows, m + tl.math.log2(l), mask=rows < Tq)


@triton.jit
def attention_bwd_delta_kernel(
    O, DO, DELTA, stride_ob, stride_ot, stride_oh, stride_db, stride_dt, stride_dh, H, Tq,
    HEAD_DIM: tl.constexpr, D0: tl.constexpr, D1: tl.constexpr, TAIL: tl.constexpr, ALIGN: tl.constexpr,
    BLOCK_M: tl.constexpr,
):  # fmt: skip
    # delta_i = sum_d dO_id O_id (float32), the row sums of dP * P the backward needs (see below).
    pid_m, bh = _program(Tq, BLOCK_M)
    O += _head_offset(bh, H, stride_ob, stride_oh, ALIGN)
    DO += _head_offset(bh, H, stride_db, stride_dh, ALIGN)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    o0, o1 = _load_rows(O, rows, stride_ot, Tq, D0, D1, HEAD_DIM, TAIL)
    do0, do1 = _load_rows(DO, rows, stride_dt, Tq, D0, D1, HEAD_DIM, TAIL)
    delta = tl.sum(o0.to(tl.float32) * do0.to(tl.float32), 1)
    if TAIL:
        delta += tl.sum(o1.to(tl.float32) * do1.to(tl.float32), 1)
    tl.store(DELTA + bh.to(tl.int64) * Tq + rows, delta, mask=rows < Tq)


# Backward. With S = scale Q K^T (scale = 1/sqrt(Dh)), P = softmax(S) by rows, O = P V and the
# upstream gradient dO:
#   dV = P^T dO
#   dP = dO V^T
#   dS_ij = P_ij (dP_ij - sum_k P_ik dP_ik)          (softmax Jacobian, row by row)
#         = P_ij (dP_ij - delta_i),  delta_i = sum_k P_ik (dO_i . V_k) = dO_i . O_i
#   dQ = scale dS K,   dK = scale dS^T Q
# P is recomputed from the saved base-2 log-sum-exp: P_ij = 2^(S_ij log2(e) - lse2_i).
# dK, dV: one program per key block, looping over the queries (no atomics). dQ: either one program
# per query block looping over the keys (deterministic: recomputes S and dP), or added by the
# key-block programs into a float32 buffer with atomics (faster: no recomputation, but the order of
# the additions, hence the rounding, varies from run to run).


@triton.jit
def attention_bwd_dkdv_kernel(
    Q, K, V, DO, LSE, DELTA, DK, DV, DQ,
    stride_qb, stride_qt, stride_qh, stride_kb, stride_kt, stride_kh, stride_vb, stride_vt, stride_vh,
    stride_db, stride_dt, stride_dh, stride_gb, stride_gt, stride_gh, stride_ab, stride_at, stride_ah,
    H, Tq, Tk, sm_scale, qk_scale,
    HEAD_DIM: tl.constexpr, D0: tl.constexpr, D1: tl.constexpr, TAIL: tl.constexpr, ALIGN: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, ATOMIC_DQ: tl.constexpr,
    UPCAST: tl.constexpr, PRECISION: tl.constexpr,
):  # fmt: skip
    # One program: BLOCK_N keys of one (batch, head); dK, dV (strides g) accumulate over all queries
    # in BLOCK_M steps, in the transposed orientation (keys as rows). With ATOMIC_DQ, it also adds
    # its share scale dS K of dQ into the float32 buffer DQ (strides a).
    pid_n, bh = _program(Tk, BLOCK_N)
    Q += _head_offset(bh, H, stride_qb, stride_qh, ALIGN)
    K += _head_offset(bh, H, stride_kb, stride_kh, ALIGN)
    V += _head_offset(bh, H, stride_vb, stride_vh, ALIGN)
    DO += _head_offset(bh, H, stride_db, stride_dh, ALIGN)
    DK += _head_offset(bh, H, stride_gb, stride_gh, ALIGN)
    DV += _head_offset(bh, H, stride_gb, stride_gh, ALIGN)
    DQ += _head_offset(bh, H, stride_ab, stride_ah, ALIGN)
    LSE += bh.to(tl.int64) * Tq
    DELTA += bh.to(tl.int64) * Tq
    keys = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    k0, k1 = _load_rows(K, keys, stride_kt, Tk, D0, D1, HEAD_DIM, TAIL)  # (BLOCK_N, D0), (BLOCK_N, D1)
    v0, v1 = _load_rows(V, keys, stride_vt, Tk, D0, D1, HEAD_DIM, TAIL)
    dk0 = tl.zeros([BLOCK_N, D0], tl.float32)
    dk1 = tl.zeros([BLOCK_N, D1], tl.float32)
    dv0 = tl.zeros([BLOCK_N, D0], tl.float32)
    dv1 = tl.zeros([BLOCK_N, D1], tl.float32)
    for start_m in range(0, Tq, BLOCK_M):
        rows = start_m + tl.arange(0, BLOCK_M)
        q0, q1 = _load_rows(Q, rows, stride_qt, Tq, D0, D1, HEAD_DIM, TAIL)  # (BLOCK_M, D0), (BLOCK_M, D1)
        do0, do1 = _load_rows(DO, rows, stride_dt, Tq, D0, D1, HEAD_DIM, TAIL)
        # Past-the-end queries: lse2 = +inf makes their P column exactly 0.
        lse = tl.load(LSE + rows, mask=rows < Tq, other=float("inf"))
        delta = tl.load(DELTA + rows, mask=rows < Tq, other=0.0)
        s_t = _dot_heads(k0, k1, q0, q1, BLOCK_N, BLOCK_M, TAIL, UPCAST, PRECISION)  # S^T (BLOCK_N, BLOCK_M)
        dp_t = _dot_heads(v0, v1, do0, do1, BLOCK_N, BLOCK_M, TAIL, UPCAST, PRECISION)  # dP^T
        p_t, ds_t = _probs_and_dlogits(s_t, dp_t, lse[None, :], delta[None, :], (keys < Tk)[:, None], qk_scale)
        ds_t = ds_t.to(Q.dtype.element_ty)  # dS^T (BLOCK_N, BLOCK_M)
        p_t = p_t.to(DO.dtype.element_ty)
        dv0 = _dot(p_t, do0, dv0, UPCAST, PRECISION)
        dk0 = _dot(ds_t, q0, dk0, UPCAST, PRECISION)
        if TAIL:
            dv1 = _dot(p_t, do1, dv1, UPCAST, PRECISION)
            dk1 = _dot(ds_t, q1, dk1, UPCAST, PRECISION)
        if ATOMIC_DQ:
            ds = tl.trans(ds_t)  # (BLOCK_M, BLOCK_N)
            dq0 = _dot(ds, k0, tl.zeros([BLOCK_M, D0], tl.float32), UPCAST, PRECISION) * sm_scale
            dq1 = dq0
            if TAIL:
                dq1 = _dot(ds, k1, tl.zeros([BLOCK_M, D1], tl.float32), UPCAST, PRECISION) * sm_scale
            _store_rows(DQ, rows, stride_at, Tq, dq0, dq1, D0, D1, HEAD_DIM, TAIL, ATOMIC_ADD=True)
    _store_rows(DK, keys, stride_gt, Tk, dk0 * sm_scale, dk1 * sm_scale, D0, D1, HEAD_DIM, TAIL)
    _store_rows(DV, keys, stride_gt, Tk, dv0, dv1, D0, D1, HEAD_DIM, TAIL)


@triton.jit
def attention_bwd_dq_kernel(
    Q, K, V, DO, LSE, DELTA, DQ,
    stride_qb, stride_qt, stride_qh, stride_kb, stride_kt, stride_kh, stride_vb, stride_vt, stride_vh,
    stride_db, stride_dt, stride_dh, stride_gb, stride_gt, stride_gh,
    H, Tq, Tk, sm_scale, qk_scale,
    HEAD_DIM: tl.constexpr, D0: tl.constexpr, D1: tl.constexpr, TAIL: tl.constexpr, ALIGN: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr,
):  # fmt: skip
    # One program: dQ of BLOCK_M queries of one (batch, head), over all keys in BLOCK_N steps, in a
    # fixed order: deterministic.
    pid_m, bh = _program(Tq, BLOCK_M)
    Q += _head_offset(bh, H, stride_qb, stride_qh, ALIGN)
    K += _head_offset(bh, H, stride_kb, stride_kh, ALIGN)
    V += _head_offset(bh, H, stride_vb, stride_vh, ALIGN)
    DO += _head_offset(bh, H, stride_db, stride_dh, ALIGN)
    DQ += _head_offset(bh, H, stride_gb, stride_gh, ALIGN)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    q0, q1 = _load_rows(Q, rows, stride_qt, Tq, D0, D1, HEAD_DIM, TAIL)  # (BLOCK_M, D0), (BLOCK_M, D1)
    do0, do1 = _load_rows(DO, rows, stride_dt, Tq, D0, D1, HEAD_DIM, TAIL)
    lse = tl.load(LSE + bh.to(tl.int64) * Tq + rows, mask=rows < Tq, other=0.0)
    delta = tl.load(DELTA + bh.to(tl.int64) * Tq + rows, mask=rows < Tq, other=0.0)
    dq0 = tl.zeros([BLOCK_M, D0], tl.float32)
    dq1 = tl.zeros([BLOCK_M, D1], tl.float32)
    for start_n in range(0, Tk, BLOCK_N):
        keys = start_n + tl.arange(0, BLOCK_N)
        k0, k1 = _load_rows(K, keys, stride_kt, Tk, D0, D1, HEAD_DIM, TAIL)  # (BLOCK_N, D0), (BLOCK_N, D1)
        v0, v1 = _load_rows(V, keys, stride_vt, Tk, D0, D1, HEAD_DIM, TAIL)
        s = _dot_heads(q0, q1, k0, k1, BLOCK_M, BLOCK_N, TAIL, UPCAST, PRECISION)  # S (BLOCK_M, BLOCK_N)
        dp = _dot_heads(do0, do1, v0, v1, BLOCK_M, BLOCK_N, TAIL, UPCAST, PRECISION)  # dP
        _, ds = _probs_and_dlogits(s, dp, lse[:, None], delta[:, None], (keys < Tk)[None, :], qk_scale)
        ds = ds.to(K.dtype.element_ty)
        dq0 = _dot(ds, k0, dq0, UPCAST, PRECISION)
        if TAIL:
            dq1 = _dot(ds, k1, dq1, UPCAST, PRECISION)
    _store_rows(DQ, rows, stride_gt, Tq, dq0 * sm_scale, dq1 * sm_scale, D0, D1, HEAD_DIM, TAIL)


# --------------------------------------------------------------------------------------------
# launch configuration
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Blocks:
    """Tile sizes of one kernel: BLOCK_M query rows, BLOCK_N key rows, and the GPU launch knobs."""

    block_m: int
    block_n: int
    num_warps: int = 4
    num_stages: int = 3
    programs_per_sm: int = 1  # the occupancy this choice counts on (checked ahead of time: tests/test_codegen.py)

    def launch(self):
        return dict(BLOCK_M=self.block_m, BLOCK_N=self.block_n,
                    **tu.launch_options(self.num_warps, self.programs_per_sm, self.num_stages))  # fmt: skip


def split_head_dim(head_dim):
    """(D0, D1): the power-of-two part and the masked tail tile of the head dim (D1 = 0: no tail).

    D0 is the largest power of two <= head_dim (at least 16, tl.dot's minimum); the tail, when
    there is one, is the next power of two >= the remainder, at least 16: 72 -> (64, 16).
    """
    d0 = max(16, 1 << (head_dim.bit_length() - 1))
    rest = head_dim - d0
    return d0, (max(16, triton.next_power_of_2(rest)) if rest > 0 else 0)


# Tiles by padded head width W = D0 + D1 (64 for Dh = 64, 80 for Dh = 72, 96, 128, 256), chosen by
# reasoning and by compiling for sm_90a on a CPU box (python -m fastdit.ops._codegen:
# registers, stack/local spills, shared memory), with no GPU to time them on; the benchmark suite
# compares alternatives (FASTDIT_BENCH_ATTENTION_CONFIGS=1).
# - forward: 128 queries per program reuse each K/V tile across many rows (FA2's and the Triton
#   tutorial's Hopper choice). 4 warps hold the 128 x W float32 accumulator in 216 (W 64) / 245
#   (W 80) registers without spilling, two programs per SM; from W 96 a second warp group is needed.
# - backward dK/dV: 128 keys per program keep K, V and two float32 accumulators resident while Q/dO
#   tiles of 32 rows stream through a deep pipeline (the tutorial's BLOCK_N1 = 128, BLOCK_M1 = 32).
#   With 4 warps that is 255 registers plus stack at W 64 and 264 bytes of stack at W 80; 8 warps:
#   166 / 200 registers, none.
# - backward dQ (deterministic variant): 128 queries, 32-key steps (the tutorial's BLOCK_M2/N2).
# - float32 (IEEE dots on FMA units, the accuracy path, not the fast one): the 16-bit tiles spill
#   kilobytes of stack; quarter-size tiles over 8 warps spill none (64-query forwards and 64-key
#   dK/dV programs still spilled 8-24 bytes at W 80 with Triton 3.6 or on sm_80).
# Under the interpreter, small tiles make T = 33 exercise multi-block loops and masked tails.
_GPU_CONFIGS = {  # dtype class -> ((max padded width, forward, backward dK/dV, backward dQ), ...)
    "16-bit": (
        (64, Blocks(128, 64, 4, 3, 2), Blocks(32, 128, 8, 5), Blocks(128, 32, 4, 5)),
        (80, Blocks(128, 64, 4, 3, 2), Blocks(32, 128, 8, 4), Blocks(128, 32, 8, 4)),
        (128, Blocks(128, 64, 8, 3), Blocks(32, 128, 8, 4), Blocks(128, 32, 8, 4)),
        (256, Blocks(64, 64, 4, 2), Blocks(32, 32, 8, 2), Blocks(64, 32, 8, 2)),
    ),
    "float32": (
        (128, Blocks(32, 32, 8, 2), Blocks(16, 32, 8, 2), Blocks(64, 16, 8, 2)),
        (256, Blocks(32, 32, 8, 2), Blocks(16, 32, 8, 2), Blocks(32, 16, 8, 2)),
    ),
}
# sm_80 (A100: mma.sync, no wgmma) takes more registers for the same tiles, and some of Hopper's
# spill there (compiled with Triton 3.6: the 16-bit forward at W 80, 255 registers and 64 bytes of
# stack; dQ at W 64, 8 bytes; dK/dV with atomic dQ at W 80, 32-40 bytes): these replace them.
_AMPERE_CONFIGS = {  # (dtype class, max padded width) -> (forward, dK/dV, dQ), None: Hopper's
    ("16-bit", 64): (Blocks(128, 64, 8, 3), None, Blocks(128, 32, 8, 4)),
    ("16-bit", 80): (Blocks(128, 64, 8, 3), Blocks(32, 64, 8, 4), None),
}
_INTERPRETER_CONFIG = (Blocks(16, 16),) * 3
DELTA_BLOCK_M = 16 if INTERPRET else 64  # the delta pre-pass: memory-bound, (64, W) tiles over 4 warps


def configs(head_dim, dtype, device):
    """(forward, backward dK/dV, backward dQ) Blocks for this head dim and input dtype on `device`."""
    if INTERPRET:
        return _INTERPRETER_CONFIG
    return gpu_configs(head_dim, dtype, tu.capability(device))


def gpu_configs(head_dim, dtype, capability):
    """(forward, backward dK/dV, backward dQ) Blocks on a GPU of this (major, minor) compute capability."""
    width = sum(split_head_dim(head_dim))
    kind = "float32" if dtype == torch.float32 else "16-bit"
    max_width, *hopper = next(c for c in _GPU_CONFIGS[kind] if width <= c[0])
    ampere = _AMPERE_CONFIGS.get((kind, max_width), (None,) * 3) if capability < (9, 0) else (None,) * 3
    return tuple(a or h for a, h in zip(ampere, hopper))


# --------------------------------------------------------------------------------------------
# launchers
# --------------------------------------------------------------------------------------------


def _check(q, k, v):
    for name, t in (("q", q), ("k", k), ("v", v)):
        check_device(name, t)
    if q.shape[-1] > MAX_HEAD_DIM:
        raise ValueError(f"the triton attention backend takes head dims up to {MAX_HEAD_DIM}, got {q.shape[-1]}")


def _strides(t):
    """(batch, token, head) strides of a (B, T, H, Dh) tensor."""
    return t.stride(0), t.stride(1), t.stride(2)


def _layout_args(*tensors):
    """Kernel arguments describing the head dim and the (batch, head) stride alignment of `tensors`."""
    head_dim = tensors[0].shape[-1]
    d0, d1 = split_head_dim(head_dim)
    g = 0
    for t in tensors:
        g = math.gcd(g, t.stride(0), t.stride(2))
    return dict(HEAD_DIM=head_dim, D0=d0, D1=max(d1, 16), TAIL=d1 > 0, ALIGN=min(16, g & -g) if g else 16)


def _dot_args(q):
    """How the kernels' dots run for q's dtype."""
    return dict(UPCAST=INTERPRET, PRECISION="ieee" if q.dtype == torch.float32 else None)


def forward(q, k, v):
    """(o, lse2): o (B, Tq, H, Dh) contiguous in q's dtype, lse2 (B, H, Tq) float32 base-2 log-sum-exp."""
    _check(q, k, v)
    q, k, v = row_major(q), row_major(k), row_major(v)
    B, Tq, H, Dh = q.shape
    o = tu.empty((B, Tq, H, Dh), q.dtype, q.device)
    lse = tu.empty((B, H, Tq), torch.float32, q.device)
    blocks = configs(Dh, q.dtype, q.device)[0]
    attention_fwd_kernel[(triton.cdiv(Tq, blocks.block_m) * B * H,)](
        q, k, v, o, lse, *_strides(q), *_strides(k), *_strides(v), *_strides(o),
        H, Tq, k.shape[1], Dh**-0.5 * LOG2E, **_layout_args(q, k, v, o), **_dot_args(q), **blocks.launch(),
    )  # fmt: skip
    return o, lse


def backward(do, q, k, v, o, lse, deterministic, grads=None):
    """(dq, dk, dv) in the input dtype; `deterministic` avoids atomics.

    grads: (dq, dk, dv) buffers to write (dk and dv with equal strides, e.g. views of one packed
    (B, T, 3, H, Dh) gradient), else new contiguous tensors.
    """
    _check(q, k, v)
    do, q, k, v = row_major(do), row_major(q), row_major(k), row_major(v)
    B, Tq, H, Dh = q.shape
    Tk = k.shape[1]
    _, dkdv_blocks, dq_blocks = configs(Dh, q.dtype, q.device)
    if grads is None:
        grads = [tu.empty((B, T, H, Dh), q.dtype, q.device) for T in (Tq, Tk, Tk)]
    dq, dk, dv = grads

    delta = tu.empty((B, H, Tq), torch.float32, q.device)
    attention_bwd_delta_kernel[(triton.cdiv(Tq, DELTA_BLOCK_M) * B * H,)](
        o, do, delta, *_strides(o), *_strides(do), H, Tq, **_layout_args(o, do), BLOCK_M=DELTA_BLOCK_M,
        **tu.launch_options(4, programs_per_sm=1),
    )  # fmt: skip

    # Atomic dQ accumulates in float32 (zeroed), copied into dq after; the deterministic kernel writes dq.
    dq_acc = torch.zeros((B, Tq, H, Dh), dtype=torch.float32, device=q.device) if not deterministic else dq
    sm_scale = Dh**-0.5
    attention_bwd_dkdv_kernel[(triton.cdiv(Tk, dkdv_blocks.block_n) * B * H,)](
        q, k, v, do, lse, delta, dk, dv, dq_acc,
        *_strides(q), *_strides(k), *_strides(v), *_strides(do), *_strides(dk), *_strides(dq_acc),
        H, Tq, Tk, sm_scale, sm_scale * LOG2E, ATOMIC_DQ=not deterministic,
        **_layout_args(q, k, v, do, dk, dv, dq_acc), **_dot_args(q), **dkdv_blocks.launch(),
    )  # fmt: skip
    if not deterministic:
        return dq.copy_(dq_acc), dk, dv
    attention_bwd_dq_kernel[(triton.cdiv(Tq, dq_blocks.block_m) * B * H,)](
        q, k, v, do, lse, delta, dq,
        *_strides(q), *_strides(k), *_strides(v), *_strides(do), *_strides(dq),
        H, Tq, Tk, sm_scale, sm_scale * LOG2E, **_layout_args(q, k, v, do, dq), **_dot_args(q), **dq_blocks.launch(),
    )  # fmt: skip
    return dq, dk, dv


# --------------------------------------------------------------------------------------------
# torch.library registration (torch.compile traces through these; no host syncs, shapes only)
# --------------------------------------------------------------------------------------------


# Two entry points share the kernels: attention_fwd/_bwd on q, k, v (any strided views), and
# attention_packed_fwd/_bwd on the qkv GEMM output (B, T, 3, H, Dh), whose backward writes dq, dk
# and dv into one packed gradient: the model's qkv.unbind(2) would otherwise stack them (a copy of
# 3 B T D elements every layer). `deterministic` picks the backward algorithm; it rides on the
# forward so the backward (which may run on another thread) sees the choice in force at forward.


def _forward_fake(q):
    B, Tq, H, Dh = q.shape
    return q.new_empty((B, Tq, H, Dh)), q.new_empty((B, H, Tq), dtype=torch.float32)


@torch.library.custom_op("fastdit::attention_fwd", mutates_args=())
def attention_fwd(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, deterministic: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """(o, lse2) of q, k, v (B, T, H, Dh)."""
    return forward(q, k, v)


@attention_fwd.register_fake
def _attention_fwd_fake(q, k, v, deterministic):
    return _forward_fake(q)


@torch.library.custom_op("fastdit::attention_bwd", mutates_args=())
def attention_bwd(
    do: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, o: torch.Tensor, lse: torch.Tensor,
    deterministic: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:  # fmt: skip
    """(dq, dk, dv) of attention_fwd given the upstream gradient do of o."""
    return backward(do, q, k, v, o, lse, deterministic)


@attention_bwd.register_fake
def _attention_bwd_fake(do, q, k, v, o, lse, deterministic):
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


def _setup_context(ctx, inputs, output):
    *tensors, ctx.deterministic = inputs
    ctx.save_for_backward(*tensors, *output)
    ctx.mark_non_differentiable(output[1])


def _backward(ctx, do, dlse):
    q, k, v, o, lse = ctx.saved_tensors
    return *attention_bwd(do, q, k, v, o, lse, ctx.deterministic), None


attention_fwd.register_autograd(_backward, setup_context=_setup_context)


@torch.library.custom_op("fastdit::attention_packed_fwd", mutates_args=())
def attention_packed_fwd(qkv: torch.Tensor, deterministic: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(o, lse2) of qkv (B, T, 3, H, Dh)."""
    return forward(*qkv.unbind(2))


@attention_packed_fwd.register_fake
def _attention_packed_fwd_fake(qkv, deterministic):
    return _forward_fake(qkv[:, :, 0])


@torch.library.custom_op("fastdit::attention_packed_bwd", mutates_args=())
def attention_packed_bwd(
    do: torch.Tensor, qkv: torch.Tensor, o: torch.Tensor, lse: torch.Tensor, deterministic: bool
) -> torch.Tensor:  # fmt: skip
    """dqkv (B, T, 3, H, Dh) contiguous, of attention_packed_fwd given the upstream gradient do of o."""
    dqkv = tu.empty(qkv.shape, qkv.dtype, qkv.device)
    backward(do, *qkv.unbind(2), o, lse, deterministic, grads=dqkv.unbind(2))
    return dqkv


@attention_packed_bwd.register_fake
def _attention_packed_bwd_fake(do, qkv, o, lse, deterministic):
    return qkv.new_empty(qkv.shape)


def _packed_backward(ctx, do, dlse):
    qkv, o, lse = ctx.saved_tensors
    return attention_packed_bwd(do, qkv, o, lse, ctx.deterministic), None


attention_packed_fwd.register_autograd(_packed_backward, setup_context=_setup_context)


def attention(q, k, v, deterministic=False):
    """softmax(q k^T / sqrt(Dh)) v with the Triton kernels; (B, Tq, H, Dh) contiguous."""
    return attention_fwd(q, k, v, deterministic)[0]


def attention_packed(qkv, deterministic=False):
    """attention(*qkv.unbind(2)) for qkv (B, T, 3, H, Dh), with one packed gradient."""
    return attention_packed_fwd(qkv, deterministic)[0]
