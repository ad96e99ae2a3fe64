// Row kernels behind modulate_layer_norm, gated_residual and gated_residual_modulate_layer_norm.
//
// The math and the conventions are those of fastdit/ops/_rows.py (the Triton kernels); the
// difference is the shape of the work. A block owns a chunk of consecutive tokens of one batch
// element b, and each of its threads owns 8 columns of every row, so a block is exactly
// ceil(D / 8) threads wide (rounded up to whole warps): D = 1152 is 144 threads x 8 columns, no
// padding to 2048. b's gate, shift and scale columns and, in the backward, the thread's share of
// the per-batch sums (d-shift, d-scale, d-gate) stay in registers for the whole chunk. Each
// iteration works on kRows rows at once (more loads in flight, one barrier per reduction for
// all of them). Row statistics are block reductions: a warp butterfly, then the warps' results
// folded in order through shared memory.
//
// Memory: 16-byte accesses when D % 8 == 0 and every (B, T, D) tensor's base and strides are
// 16-byte aligned (fp32: two per 8 columns); otherwise the same kernels with scalar accesses, each
// thread owning columns tid, tid + threads, ... (coalesced element by element).
//
// The backward writes each block's partial sums once to a (n_sums, B, chunks, D) fp32 buffer;
// a second kernel then adds the chunks of each column in a fixed order: deterministic, no atomics.
//
// Each op's kernels carry its name (modulate_layer_norm_fwd_kernel, ..., as the Triton kernels
// compile), so a profiler trace says which op ran: thin __global__ wrappers over the shared
// __device__ bodies, which the op's flags (RES: residual, NORM: LayerNorm) specialise.
#include <algorithm>

#include "common.cuh"

namespace fastdit {
namespace {

constexpr int kCols = 8;                                  // columns of every row a thread owns
constexpr int kRows = 2;                                  // rows per iteration of a block (aligned kernels)
// 512; launch bounds (512, 1): up to 128 registers a thread. Without the 1, ptxas spills to fit
// two 512-thread blocks in 64 registers, though the blocks of DiT's widths are 48 to 160 threads.
constexpr int kMaxThreads = FASTDIT_ROWS_MAX_D / kCols;
constexpr int64_t kBwdMinRows = 32;  // each backward chunk adds n_sums rows of partial sums: keep it <~ 1/16 of the traffic

using Row = float[kCols];

// The scalar kernels hold 8 addresses a row: one row per iteration keeps them from spilling.
__host__ __device__ constexpr int rows_per_iteration(bool vec) { return vec ? kRows : 1; }

template <bool VEC>
struct Cols {
  int tid, threads, D;
  __device__ __forceinline__ int col(int e) const { return VEC ? tid * kCols + e : e * threads + tid; }
  __device__ __forceinline__ bool ok(int e) const { return VEC ? tid * kCols < D : col(e) < D; }
};

__device__ __forceinline__ int64_t offset(const fastdit_rows_tensor& t, int64_t b, int64_t tok) {
  return b * t.stride_b + tok * t.stride_t;
}

// A thread's columns of one row; columns past D read as 0 and are never written.
template <bool VEC, typename T>
__device__ __forceinline__ void load_row(const T* row, const Cols<VEC>& c, Row& v) {
  if constexpr (VEC) {
    if (c.ok(0)) {
      load8_vec(row + c.col(0), v);
    } else {
#pragma unroll
      for (int e = 0; e < kCols; ++e) v[e] = 0.f;
    }
  } else {
#pragma unroll
    for (int e = 0; e < kCols; ++e) v[e] = c.ok(e) ? to_f32(row[c.col(e)]) : 0.f;
  }
}

template <bool VEC, typename T>
__device__ __forceinline__ void store_row(T* row, const Cols<VEC>& c, const Row& v) {
  if constexpr (VEC) {
    if (c.ok(0)) store8_vec(row + c.col(0), v);
  } else {
#pragma unroll
    for (int e = 0; e < kCols; ++e)
      if (c.ok(e)) row[c.col(e)] = from_f32<T>(v[e]);
  }
}

// Row (b, tok) of a tensor whose dtype is a runtime code.
template <bool VEC>
__device__ __forceinline__ void store_row_as(const fastdit_rows_tensor& t, int64_t b, int64_t tok, const Cols<VEC>& c,
                                             const Row& v) {
  with_dtype(t.dtype, t.data, [&](auto* p) { store_row(p + offset(t, b, tok), c, v); });
}

// Row b of a (B, D) tensor: read once per block, element by element (no alignment asked).
template <bool VEC>
__device__ __forceinline__ void load_vector(const fastdit_rows_tensor& t, int64_t b, const Cols<VEC>& c, Row& v) {
  with_dtype(t.dtype, static_cast<const void*>(t.data), [&](auto* p) {
    p += b * t.stride_b;
#pragma unroll
    for (int e = 0; e < kCols; ++e) v[e] = c.ok(e) ? to_f32(p[c.col(e)]) : 0.f;
  });
}

template <bool VEC, typename T>
__device__ __forceinline__ void load_tensor_row(const fastdit_rows_tensor& t, int64_t b, int64_t tok, const Cols<VEC>& c,
                                                Row& v) {
  load_row(static_cast<const T*>(t.data) + offset(t, b, tok), c, v);
}

__device__ __forceinline__ void round_row(int32_t dtype, Row& v) {
  switch (dtype) {
    case FASTDIT_F16:
    case FASTDIT_BF16:
#pragma unroll
      for (int e = 0; e < kCols; ++e) v[e] = round_as(dtype, v[e]);
      break;
    default: break;
  }
}

// LayerNorm statistics of kRows rows, centring v in place: v - mean on columns < D, 0 elsewhere.
// Two passes over registers (mean, then the centred sum of squares), fp32. Where a sum overflows
// (|x| ~ 1e19 and beyond) a uniform branch recomputes it scaled, so |x| up to FLT_MAX gives the
// float64 answer instead of rstd = 0; rows holding inf or NaN give NaN, like the reference.
template <int R, bool VEC>
__device__ __forceinline__ void normalize_rows(Row (&v)[R], const Cols<VEC>& c, float inv_D, float eps,
                                               float (&red)[2][kWarp][R], int& parity, float (&mean)[R],
                                               float (&rstd)[R]) {
  float s[R];
#pragma unroll
  for (int i = 0; i < R; ++i) {
    s[i] = 0.f;
#pragma unroll
    for (int e = 0; e < kCols; ++e) s[i] += v[i][e];
  }
  block_sum(s, red, parity);
  bool overflow = false;
#pragma unroll
  for (int i = 0; i < R; ++i) {
    mean[i] = s[i] * inv_D;
    overflow |= !isfinite(mean[i]);
  }
  if (overflow) {  // every thread holds the same sums: a uniform branch
#pragma unroll
    for (int i = 0; i < R; ++i) {
      s[i] = 0.f;
#pragma unroll
      for (int e = 0; e < kCols; ++e) s[i] += v[i][e] * inv_D;
    }
    block_sum(s, red, parity);
#pragma unroll
    for (int i = 0; i < R; ++i)
      if (!isfinite(mean[i])) mean[i] = s[i];
  }
#pragma unroll
  for (int i = 0; i < R; ++i) {
    s[i] = 0.f;
#pragma unroll
    for (int e = 0; e < kCols; ++e) {
      v[i][e] = c.ok(e) ? v[i][e] - mean[i] : 0.f;
      s[i] += v[i][e] * v[i][e];
    }
  }
  block_sum(s, red, parity);
  bool big[R], any_big = false;
#pragma unroll
  for (int i = 0; i < R; ++i) {
    rstd[i] = rsqrtf(s[i] * inv_D + eps);
    big[i] = isinf(s[i]) && isfinite(mean[i]);
    any_big |= big[i];
  }
  if (any_big) {
    // var = 2^160 mean((v 2^-80)^2): exact power-of-two scaling. Such a row has max |v| > 2^64 / sqrt(D),
    // so its scaled squares neither overflow (|v| <= FLT_MAX) nor vanish, and eps is negligible.
    constexpr float kDown = 0x1p-80f;
#pragma unroll
    for (int i = 0; i < R; ++i) {
      s[i] = 0.f;
#pragma unroll
      for (int e = 0; e < kCols; ++e) s[i] += (v[i][e] * kDown) * (v[i][e] * kDown);
    }
    block_sum(s, red, parity);
#pragma unroll
    for (int i = 0; i < R; ++i)
      if (big[i]) rstd[i] = rsqrtf(s[i] * inv_D) * kDown;
  }
}

struct FwdParams {
  fastdit_rows_tensor x, y, gate, shift, scale, r, out;
  float* mean;
  float* rstd;
  int64_t T, rows;
  int chunks;  // B * chunks blocks fit a 32-bit grid: 32-bit division (64-bit division is a call)
  int D;
  float inv_D, eps;  // 1 / D: a multiply, not a division (whose slow path is a call), per row
};

template <bool RES, bool NORM, typename TA, bool VEC>
__device__ __forceinline__ void rows_fwd(const FwdParams& p) {
  constexpr int R = rows_per_iteration(VEC);
  const Cols<VEC> c{static_cast<int>(threadIdx.x), static_cast<int>(blockDim.x), p.D};
  const int64_t b = static_cast<int>(blockIdx.x) / p.chunks;
  const int64_t t_begin = static_cast<int>(blockIdx.x) % p.chunks * p.rows, t_end = min(t_begin + p.rows, p.T);
  Row gate, shift, scale1;
  if (RES) load_vector(p.gate, b, c, gate);
  if (NORM) {
    load_vector(p.shift, b, c, shift);
    load_vector(p.scale, b, c, scale1);
#pragma unroll
    for (int e = 0; e < kCols; ++e) scale1[e] += 1.f;
  }
  __shared__ float red[2][kWarp][R];
  int parity = 0;
  for (int64_t t0 = t_begin; t0 < t_end; t0 += R) {
    Row v[R], y[R];
#pragma unroll
    for (int i = 0; i < R; ++i) {
      const bool ok = t0 + i < t_end;
#pragma unroll
      for (int e = 0; e < kCols; ++e) v[i][e] = y[i][e] = 0.f;
      if (ok) load_tensor_row<VEC, TA>(p.x, b, t0 + i, c, v[i]);
      if (RES && ok) load_tensor_row<VEC, TA>(p.y, b, t0 + i, c, y[i]);
    }
    if (RES) {
#pragma unroll
      for (int i = 0; i < R; ++i) {
#pragma unroll
        for (int e = 0; e < kCols; ++e) v[i][e] += gate[e] * y[i][e];
        round_row(p.r.dtype, v[i]);  // normalise r as stored: what the backward reloads
        if (t0 + i < t_end) store_row_as(p.r, b, t0 + i, c, v[i]);
      }
    }
    if (NORM) {
      float mean[R], rstd[R];
      normalize_rows(v, c, p.inv_D, p.eps, red, parity, mean, rstd);
#pragma unroll
      for (int i = 0; i < R; ++i) {
        if (t0 + i >= t_end) continue;
        if (threadIdx.x == 0) {
          p.mean[b * p.T + t0 + i] = mean[i];
          p.rstd[b * p.T + t0 + i] = rstd[i];
        }
        Row o;
#pragma unroll
        for (int e = 0; e < kCols; ++e) o[e] = v[i][e] * rstd[i] * scale1[e] + shift[e];
        store_row_as(p.out, b, t0 + i, c, o);
      }
    }
  }
}

// Backward. With xhat = (r - mean) * rstd and out = xhat * (1 + scale) + shift, per row:
//   g = dout * (1 + scale);  dr = rstd * (g - mean(g) - xhat * mean(g * xhat))   (means over D)
// plus grad_r with a residual; then dx = dr, dy = dr * gate. Per batch element (sums over its
// tokens): d-shift = sum dout, d-scale = sum dout * xhat, d-gate = sum dr * y.
// recompute_r (the fused op): `r` holds x and r = x + gate * y is recomputed as the forward
// computed and rounded it; y, which d-gate reads anyway, is then loaded early.
struct BwdParams {
  fastdit_rows_tensor grad_out, r, scale, grad_r, y, gate, dx, dy;
  const float* mean;
  const float* rstd;
  float* partial;
  int64_t B, T, rows;
  int chunks;
  int D;
  float inv_D;
  bool recompute_r;
};

template <bool RES, bool NORM, typename TA, bool VEC>
__device__ __forceinline__ void rows_bwd(const BwdParams& p) {
  constexpr int R = rows_per_iteration(VEC);
  const Cols<VEC> c{static_cast<int>(threadIdx.x), static_cast<int>(blockDim.x), p.D};
  const int64_t b = static_cast<int>(blockIdx.x) / p.chunks, chunk = static_cast<int>(blockIdx.x) % p.chunks;
  const int64_t t_begin = chunk * p.rows, t_end = min(t_begin + p.rows, p.T);
  Row gate, scale1, acc_shift, acc_scale, acc_gate;
#pragma unroll
  for (int e = 0; e < kCols; ++e) acc_shift[e] = acc_scale[e] = acc_gate[e] = 0.f;
  if (RES) load_vector(p.gate, b, c, gate);
  if (NORM) {
    load_vector(p.scale, b, c, scale1);
#pragma unroll
    for (int e = 0; e < kCols; ++e) scale1[e] += 1.f;
  }
  __shared__ float red[2][kWarp][2 * R];
  int parity = 0;
  for (int64_t t0 = t_begin; t0 < t_end; t0 += R) {
    Row d[R], xhat[R], g[R], dr[R], y[R];
    float mean[R], rstd[R];
    const auto load_residual = [&](int i) {
      if (t0 + i < t_end) {
        load_tensor_row<VEC, TA>(p.grad_r, b, t0 + i, c, dr[i]);
        load_tensor_row<VEC, TA>(p.y, b, t0 + i, c, y[i]);
      }
    };
    // The aligned kernels issue every load of the iteration before the reduction waits on any;
    // the scalar ones load the residual's inputs after it, not to spill, unless r needs y.
    const bool recompute = RES && NORM && p.recompute_r, early = VEC || recompute;
#pragma unroll
    for (int i = 0; i < R; ++i) {
      mean[i] = rstd[i] = 0.f;  // rstd 0 on rows past the chunk: their d stays 0
#pragma unroll
      for (int e = 0; e < kCols; ++e) d[i][e] = xhat[i][e] = g[i][e] = dr[i][e] = y[i][e] = 0.f;
      if (NORM && t0 + i < t_end) {
        load_tensor_row<VEC, TA>(p.r, b, t0 + i, c, xhat[i]);
        load_tensor_row<VEC, TA>(p.grad_out, b, t0 + i, c, g[i]);
        mean[i] = p.mean[b * p.T + t0 + i];
        rstd[i] = p.rstd[b * p.T + t0 + i];
      }
      if (RES && early) load_residual(i);
      if (recompute) {  // as rows_fwd computes r
#pragma unroll
        for (int e = 0; e < kCols; ++e) xhat[i][e] += gate[e] * y[i][e];
        round_row(p.r.dtype, xhat[i]);
      }
    }
    if (NORM) {
      float s[2 * R];
#pragma unroll
      for (int i = 0; i < R; ++i) {
        s[2 * i] = s[2 * i + 1] = 0.f;
#pragma unroll
        for (int e = 0; e < kCols; ++e) {
          xhat[i][e] = c.ok(e) ? (xhat[i][e] - mean[i]) * rstd[i] : 0.f;
          acc_shift[e] += g[i][e];
          acc_scale[e] += g[i][e] * xhat[i][e];
          g[i][e] *= scale1[e];
          s[2 * i] += g[i][e];
          s[2 * i + 1] += g[i][e] * xhat[i][e];
        }
      }
      block_sum(s, red, parity);
#pragma unroll
      for (int i = 0; i < R; ++i) {
        const float mean_g = s[2 * i] * p.inv_D, mean_gx = s[2 * i + 1] * p.inv_D;
#pragma unroll
        for (int e = 0; e < kCols; ++e) d[i][e] = rstd[i] * (g[i][e] - mean_g - xhat[i][e] * mean_gx);
      }
    }
#pragma unroll
    for (int i = 0; i < R; ++i) {
      if (t0 + i >= t_end) continue;
      if (RES && !early) load_residual(i);
      if (RES) {
        Row dy;
#pragma unroll
        for (int e = 0; e < kCols; ++e) {
          d[i][e] += dr[i][e];
          dy[e] = d[i][e] * gate[e];
          acc_gate[e] += d[i][e] * y[i][e];
        }
        store_row_as(p.dy, b, t0 + i, c, dy);
      }
      if (NORM) store_row_as(p.dx, b, t0 + i, c, d[i]);
    }
  }
  float* part = p.partial + (b * p.chunks + chunk) * p.D;
  const int64_t slice = p.B * p.chunks * p.D;  // elements of one (B, chunks, D) slice
  if (NORM) {
    store_row(part, c, acc_shift);
    store_row(part + slice, c, acc_scale);
  }
  if (RES) store_row(part + (NORM ? 2 : 0) * slice, c, acc_gate);
}

// sums[k, d] = partial[k, 0, d] + partial[k, 1, d] + ... in chunk order, for rows k < n_rows:
// blocks along x cover the D columns, along y the rows.
__device__ __forceinline__ void sum_chunks(const float* partial, float* sums, int64_t n_rows, int chunks, int D) {
  const int d = blockIdx.x * blockDim.x + threadIdx.x;
  if (d >= D) return;
  for (int64_t k = blockIdx.y; k < n_rows; k += gridDim.y) {
    const float* col = partial + k * chunks * D + d;
    float s = col[0];
    for (int c = 1; c < chunks; ++c) s += col[int64_t(c) * D];
    sums[k * D + d] = s;
  }
}

// ---- kernels, by op --------------------------------------------------------------------------

template <typename TA, bool VEC>
__global__ void __launch_bounds__(kMaxThreads, 1) modulate_layer_norm_fwd_kernel(const FwdParams p) {
  rows_fwd<false, true, TA, VEC>(p);
}
template <typename TA, bool VEC>
__global__ void __launch_bounds__(kMaxThreads, 1) modulate_layer_norm_bwd_kernel(const BwdParams p) {
  rows_bwd<false, true, TA, VEC>(p);
}
template <typename TA, bool VEC>
__global__ void __launch_bounds__(kMaxThreads, 1) gated_residual_fwd_kernel(const FwdParams p) {
  rows_fwd<true, false, TA, VEC>(p);
}
template <typename TA, bool VEC>
__global__ void __launch_bounds__(kMaxThreads, 1) gated_residual_bwd_kernel(const BwdParams p) {
  rows_bwd<true, false, TA, VEC>(p);
}
template <typename TA, bool VEC>
__global__ void __launch_bounds__(kMaxThreads, 1) gated_residual_modulate_layer_norm_fwd_kernel(const FwdParams p) {
  rows_fwd<true, true, TA, VEC>(p);
}
template <typename TA, bool VEC>
__global__ void __launch_bounds__(kMaxThreads, 1) gated_residual_modulate_layer_norm_bwd_kernel(const BwdParams p) {
  rows_bwd<true, true, TA, VEC>(p);
}

// The backward's second stage, under each op's name.
__global__ void modulate_layer_norm_bwd_reduce_kernel(const float* partial, float* sums, int64_t n_rows, int chunks,
                                                      int D) {
  sum_chunks(partial, sums, n_rows, chunks, D);
}
__global__ void gated_residual_bwd_reduce_kernel(const float* partial, float* sums, int64_t n_rows, int chunks, int D) {
  sum_chunks(partial, sums, n_rows, chunks, D);
}
__global__ void gated_residual_modulate_layer_norm_bwd_reduce_kernel(const float* partial, float* sums,
                                                                     int64_t n_rows, int chunks, int D) {
  sum_chunks(partial, sums, n_rows, chunks, D);
}

// ---- host ----------------------------------------------------------------------------------

// Kernel families, so one selector serves both directions: the kernel of the op that the flags name.
struct Forward {
  template <bool RES, bool NORM, typename TA, bool VEC>
  static constexpr void (*kernel)(FwdParams) =
      !RES ? modulate_layer_norm_fwd_kernel<TA, VEC>
           : !NORM ? gated_residual_fwd_kernel<TA, VEC> : gated_residual_modulate_layer_norm_fwd_kernel<TA, VEC>;
};
struct Backward {
  template <bool RES, bool NORM, typename TA, bool VEC>
  static constexpr void (*kernel)(BwdParams) =
      !RES ? modulate_layer_norm_bwd_kernel<TA, VEC>
           : !NORM ? gated_residual_bwd_kernel<TA, VEC> : gated_residual_modulate_layer_norm_bwd_kernel<TA, VEC>;
};

using ReduceKernel = void (*)(const float*, float*, int64_t, int, int);
ReduceKernel reduce_kernel(bool res, bool norm) {
  if (!res) return modulate_layer_norm_bwd_reduce_kernel;
  return norm ? gated_residual_modulate_layer_norm_bwd_reduce_kernel : gated_residual_bwd_reduce_kernel;
}

template <typename K, bool RES, bool NORM, typename TA>
auto by_alignment(bool vec) {
  return vec ? K::template kernel<RES, NORM, TA, true> : K::template kernel<RES, NORM, TA, false>;
}

template <typename K, bool RES, bool NORM>
auto by_dtype(int32_t dtype, bool vec) {
  switch (dtype) {
    case FASTDIT_F16: return by_alignment<K, RES, NORM, __half>(vec);
    case FASTDIT_BF16: return by_alignment<K, RES, NORM, __nv_bfloat16>(vec);
    default: return by_alignment<K, RES, NORM, float>(vec);
  }
}

template <typename K>
auto select_kernel(bool res, bool norm, int32_t dtype, bool vec) {
  if (res && norm) return by_dtype<K, true, true>(dtype, vec);
  return res ? by_dtype<K, true, false>(dtype, vec) : by_dtype<K, false, true>(dtype, vec);
}

int threads_for(int64_t D) { return static_cast<int>(round_up(ceil_div(D, kCols), kWarp)); }

// Chunks of tokens per batch element: enough blocks to fill every multiprocessor once
// (B * chunks ~ SMs x resident blocks), each chunk at least min_rows tokens long.
struct Chunking {
  int64_t chunks, rows;
};
Chunking chunking(const void* kernel, int64_t B, int64_t T, int64_t D, int64_t min_rows) {
  const int64_t target = int64_t(sm_count()) * blocks_per_sm(kernel, threads_for(D), 0);
  const int64_t most = std::max<int64_t>(1, T / min_rows);
  const int64_t chunks = std::min(std::max<int64_t>(1, ceil_div(target, B)), most);
  const int64_t rows = round_up(ceil_div(T, chunks), kRows);
  return {ceil_div(T, rows), rows};
}

bool present(const fastdit_rows_tensor* t) { return t != nullptr && t->data != nullptr; }

// A (B, T, D) tensor whose rows take 16-byte accesses (absent tensors qualify).
bool vector_ready(const fastdit_rows_tensor* t) {
  if (!present(t)) return true;
  const int64_t s = dtype_size(t->dtype);
  return reinterpret_cast<uintptr_t>(t->data) % 16 == 0 && t->stride_b * s % 16 == 0 && t->stride_t * s % 16 == 0;
}

bool dtypes_valid(std::initializer_list<const fastdit_rows_tensor*> ts) {
  for (const auto* t : ts)
    if (present(t) && !valid_dtype(t->dtype)) return false;
  return true;
}

fastdit_rows_tensor or_empty(const fastdit_rows_tensor* t) { return present(t) ? *t : fastdit_rows_tensor{}; }

int check_sizes(int64_t B, int64_t T, int64_t D) {
  if (B < 1 || T < 1 || D < 1) return FASTDIT_ERR_ARGS;
  if (D > FASTDIT_ROWS_MAX_D) return FASTDIT_ERR_WIDTH;
  return 0;
}

}  // namespace
}  // namespace fastdit

using namespace fastdit;

extern "C" int fastdit_rows_forward(const fastdit_rows_tensor* x, const fastdit_rows_tensor* y,
                                    const fastdit_rows_tensor* gate, const fastdit_rows_tensor* shift,
                                    const fastdit_rows_tensor* scale, const fastdit_rows_tensor* r,
                                    const fastdit_rows_tensor* out, float* mean, float* rstd, int64_t B, int64_t T,
                                    int64_t D, float eps, void* stream) {
  const bool res = present(y), norm = present(shift);
  if (const int err = check_sizes(B, T, D)) return err;
  if (!present(x) || !(res || norm) || (res && !(present(gate) && present(r))) ||
      (norm && !(present(scale) && present(out) && mean && rstd)))
    return FASTDIT_ERR_ARGS;
  if (!dtypes_valid({x, y, gate, shift, scale, r, out}) || (res && y->dtype != x->dtype)) return FASTDIT_ERR_DTYPE;
  const bool vec = D % kCols == 0 && vector_ready(x) && vector_ready(y) && vector_ready(r) && vector_ready(out);
  const auto kernel = select_kernel<Forward>(res, norm, x->dtype, vec);
  const Chunking ck = chunking(reinterpret_cast<const void*>(kernel), B, T, D, kRows);
  if (B * ck.chunks > INT32_MAX) return FASTDIT_ERR_ARGS;
  const FwdParams params{*x, or_empty(y), or_empty(gate), or_empty(shift), or_empty(scale), or_empty(r), or_empty(out),
                         mean, rstd, T, ck.rows, static_cast<int>(ck.chunks), static_cast<int>(D), 1.f / D, eps};
  launch(kernel, unsigned(B * ck.chunks), threads_for(D), 0, stream, params);
  return launch_status();
}

extern "C" int fastdit_rows_backward_chunks(int64_t B, int64_t T, int64_t D, int32_t dtype, int has_residual,
                                            int has_norm, int64_t* chunks) {
  if (const int err = check_sizes(B, T, D)) return err;
  if (!valid_dtype(dtype)) return FASTDIT_ERR_DTYPE;
  if (!(has_residual || has_norm) || chunks == nullptr) return FASTDIT_ERR_ARGS;
  const auto kernel = select_kernel<Backward>(has_residual, has_norm, dtype, true);
  *chunks = chunking(reinterpret_cast<const void*>(kernel), B, T, D, kBwdMinRows).chunks;
  return 0;
}

extern "C" int fastdit_rows_backward(const fastdit_rows_tensor* grad_out, const fastdit_rows_tensor* r,
                                     const fastdit_rows_tensor* scale, const float* mean, const float* rstd,
                                     const fastdit_rows_tensor* grad_r, const fastdit_rows_tensor* y,
                                     const fastdit_rows_tensor* gate, const fastdit_rows_tensor* dx,
                                     const fastdit_rows_tensor* dy, float* partial, int64_t chunks, float* sums,
                                     int64_t B, int64_t T, int64_t D, int recompute_r, void* stream) {
  const bool res = present(y), norm = present(grad_out);
  if (const int err = check_sizes(B, T, D)) return err;
  if (!(res || norm) || !partial || !sums || (norm && !(present(r) && present(scale) && mean && rstd && present(dx))) ||
      (res && !(present(grad_r) && present(gate) && present(dy))) || (recompute_r && !(res && norm)))
    return FASTDIT_ERR_ARGS;
  if (!dtypes_valid({grad_out, r, scale, grad_r, y, gate, dx, dy})) return FASTDIT_ERR_DTYPE;
  const fastdit_rows_tensor* loaded = norm ? grad_out : grad_r;  // the kernel's load dtype
  for (const auto* t : {grad_out, r, grad_r, y})
    if (present(t) && t->dtype != loaded->dtype) return FASTDIT_ERR_DTYPE;
  const bool vec = D % kCols == 0 && vector_ready(grad_out) && vector_ready(r) && vector_ready(grad_r) &&
                   vector_ready(y) && vector_ready(dx) && vector_ready(dy);
  const auto kernel = select_kernel<Backward>(res, norm, loaded->dtype, vec);
  // The chunking of the aligned kernel, whichever runs: fastdit_rows_backward_chunks' answer.
  const Chunking ck = chunking(reinterpret_cast<const void*>(select_kernel<Backward>(res, norm, loaded->dtype, true)),
                               B, T, D, kBwdMinRows);
  if (chunks != ck.chunks) return FASTDIT_ERR_CHUNKS;
  if (B * chunks > INT32_MAX) return FASTDIT_ERR_ARGS;
  const int64_t rows = ck.rows;
  const BwdParams params{or_empty(grad_out), or_empty(r), or_empty(scale), or_empty(grad_r), or_empty(y), or_empty(gate),
                         or_empty(dx), or_empty(dy), mean, rstd, partial, B, T, rows, static_cast<int>(chunks),
                         static_cast<int>(D), 1.f / D, recompute_r != 0};
  launch(kernel, unsigned(B * chunks), threads_for(D), 0, stream, params);
  if (const int err = launch_status()) return err;
  const int64_t n_rows = ((norm ? 2 : 0) + (res ? 1 : 0)) * B;
  constexpr int kThreads = 128;
  const dim3 grid(static_cast<unsigned>(ceil_div(D, kThreads)), static_cast<unsigned>(std::min<int64_t>(n_rows, 65535)));
  launch(reduce_kernel(res, norm), grid, kThreads, 0, stream, partial, sums, n_rows, static_cast<int>(chunks),
         static_cast<int>(D));
  return launch_status();
}
