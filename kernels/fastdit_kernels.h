/* fastdit's native kernels: the C ABI that fastdit/ops/_native.py loads with ctypes.
 *
 * Plain C types only (pointers, int64 sizes and strides in elements, dtype codes, a cudaStream_t
 * passed as void*), so the library works with any CUDA build of torch and needs no torch headers.
 * Every function launches asynchronously on the given stream, never synchronises and never
 * allocates: the caller (torch) owns every buffer, so CUDA graphs can capture the launches.
 * Each returns 0, a cudaError_t (> 0) from the launch, or a FASTDIT_ERR_* code (< 0);
 * fastdit_error_string() turns either into a message.
 */
#ifndef FASTDIT_KERNELS_H
#define FASTDIT_KERNELS_H

#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

#define FASTDIT_API __attribute__((visibility("default")))

/* Bumped whenever a signature or struct below changes: the loader refuses a stale library. */
#define FASTDIT_ABI_VERSION 2

enum { FASTDIT_F32 = 0, FASTDIT_F16 = 1, FASTDIT_BF16 = 2 };

enum {
  FASTDIT_ERR_DTYPE = -1,     /* a dtype code outside FASTDIT_F32..FASTDIT_BF16, or loads of mixed dtypes */
  FASTDIT_ERR_WIDTH = -2,     /* D (row ops) or C*p*p (layout ops) beyond what the kernels hold */
  FASTDIT_ERR_ARGS = -3,      /* a missing tensor, or a size < 1 */
  FASTDIT_ERR_CHUNKS = -4,    /* the backward's chunks differ from fastdit_rows_backward_chunks() */
};

/* Row ops: D at most this many columns (a thread holds 8 columns of every row, 512 threads a row). */
#define FASTDIT_ROWS_MAX_D 4096
/* Layout ops: features per token (C*p*p) at most this many. */
#define FASTDIT_LAYOUT_MAX_F 16384

/* A (B, T, D) tensor, or a (B, D) one (stride_t unused), with a unit stride along D. */
typedef struct {
  void* data;
  int64_t stride_b;
  int64_t stride_t;
  int32_t dtype;
} fastdit_rows_tensor;

FASTDIT_API int fastdit_abi_version(void);
FASTDIT_API const char* fastdit_error_string(int code);

/* Forward of the three row ops; a NULL tensor is absent.
 *   residual (y, gate, r):      r = x + gate * y, rounded to r's dtype
 *   norm (shift, scale, out):   out = (v - mean) * rstd * (1 + scale) + shift, v = r (or x without
 *                               a residual); mean, rstd (B, T) fp32 contiguous
 * x and y share one dtype; gate, shift, scale, r and out may each have their own. */
FASTDIT_API int fastdit_rows_forward(
    const fastdit_rows_tensor* x, const fastdit_rows_tensor* y, const fastdit_rows_tensor* gate,
    const fastdit_rows_tensor* shift, const fastdit_rows_tensor* scale,
    const fastdit_rows_tensor* r, const fastdit_rows_tensor* out, float* mean, float* rstd,
    int64_t B, int64_t T, int64_t D, float eps, void* stream);

/* Chunks of tokens per batch element the backward uses on the current device: the caller
 * allocates partial = (n_sums, B, chunks, D) fp32 for fastdit_rows_backward. */
FASTDIT_API int fastdit_rows_backward_chunks(
    int64_t B, int64_t T, int64_t D, int32_t dtype, int has_residual, int has_norm, int64_t* chunks);

/* Backward of the three row ops; a NULL tensor is absent.
 *   norm (grad_out, r, scale, mean, rstd, dx):  r is what the forward normalised (x or r)
 *   residual (grad_r, y, gate, dy)
 * recompute_r (both parts): `r` holds the residual's x and the kernel recomputes r = x + gate * y,
 * rounded to r's dtype as the forward rounded it.
 * sums (n_sums, B, D) fp32 receives [d-shift, d-scale] with a norm, then [d-gate] with a
 * residual: per-chunk partial sums in `partial`, reduced over the chunks in a fixed order.
 * grad_out, r, grad_r and y share one dtype; scale, gate, dx and dy may each have their own. */
FASTDIT_API int fastdit_rows_backward(
    const fastdit_rows_tensor* grad_out, const fastdit_rows_tensor* r, const fastdit_rows_tensor* scale,
    const float* mean, const float* rstd, const fastdit_rows_tensor* grad_r, const fastdit_rows_tensor* y,
    const fastdit_rows_tensor* gate, const fastdit_rows_tensor* dx, const fastdit_rows_tensor* dy,
    float* partial, int64_t chunks, float* sums, int64_t B, int64_t T, int64_t D, int recompute_r, void* stream);

/* Images (B, C, H, W) <-> patch tokens (B, T = (H/p)(W/p), F = C*p*p), either direction.
 * Features (i, j, c) if channels_last else (c, i, j). image_strides: 4 strides in elements (any);
 * token_strides: batch and token strides (the feature stride is 1). */
FASTDIT_API int fastdit_layout(
    void* image, const int64_t* image_strides, void* tokens, const int64_t* token_strides,
    int64_t B, int64_t C, int64_t H, int64_t W, int64_t p, int32_t dtype, int channels_last, int to_image,
    void* stream);

#ifdef __cplusplus
}
#endif

#endif /* FASTDIT_KERNELS_H */
