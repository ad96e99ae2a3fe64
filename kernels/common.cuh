// Device and host helpers shared by the row and layout kernels.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <stdint.h>

#include "fastdit_kernels.h"

namespace fastdit {

constexpr int kWarp = 32;

__host__ __device__ constexpr int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }
__host__ __device__ constexpr int64_t round_up(int64_t a, int64_t b) { return ceil_div(a, b) * b; }

inline bool valid_dtype(int32_t dtype) { return dtype == FASTDIT_F32 || dtype == FASTDIT_F16 || dtype == FASTDIT_BF16; }
inline int dtype_size(int32_t dtype) { return dtype == FASTDIT_F32 ? 4 : 2; }

// ---- scalar conversions --------------------------------------------------------------------

__device__ __forceinline__ float to_f32(float v) { return v; }
__device__ __forceinline__ float to_f32(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_f32(__nv_bfloat16 v) { return __bfloat162float(v); }

template <typename T> __device__ __forceinline__ T from_f32(float v);
template <> __device__ __forceinline__ float from_f32<float>(float v) { return v; }
template <> __device__ __forceinline__ __half from_f32<__half>(float v) { return __float2half_rn(v); }
template <> __device__ __forceinline__ __nv_bfloat16 from_f32<__nv_bfloat16>(float v) { return __float2bfloat16_rn(v); }

// v rounded to a runtime dtype and back: the value a store of v in that dtype holds.
__device__ __forceinline__ float round_as(int32_t dtype, float v) {
  switch (dtype) {
    case FASTDIT_F16: return to_f32(from_f32<__half>(v));
    case FASTDIT_BF16: return to_f32(from_f32<__nv_bfloat16>(v));
    default: return v;
  }
}

// ---- 8 consecutive elements as 16-byte accesses (p 16-byte aligned) ----------------------------

// Two 16-bit floats in 32 bits (__half2, __nv_bfloat162) and their conversions.
template <typename T> struct Pair;
template <> struct Pair<__half> {
  using type = __half2;
  static __device__ __forceinline__ float2 to_float2(type v) { return __half22float2(v); }
  static __device__ __forceinline__ type from_floats(float a, float b) { return __floats2half2_rn(a, b); }
};
template <> struct Pair<__nv_bfloat16> {
  using type = __nv_bfloat162;
  static __device__ __forceinline__ float2 to_float2(type v) { return __bfloat1622float2(v); }
  static __device__ __forceinline__ type from_floats(float a, float b) { return __floats2bfloat162_rn(a, b); }
};

// 16-bit T: one 16-byte access; float: two (specialised below).
template <typename T> __device__ __forceinline__ void load8_vec(const T* p, float (&v)[8]) {
  const uint4 u = *reinterpret_cast<const uint4*>(p);
  const auto* pairs = reinterpret_cast<const typename Pair<T>::type*>(&u);
#pragma unroll
  for (int k = 0; k < 4; ++k) {
    const float2 f = Pair<T>::to_float2(pairs[k]);
    v[2 * k] = f.x;
    v[2 * k + 1] = f.y;
  }
}
template <typename T> __device__ __forceinline__ void store8_vec(T* p, const float (&v)[8]) {
  uint4 u;
  auto* pairs = reinterpret_cast<typename Pair<T>::type*>(&u);
#pragma unroll
  for (int k = 0; k < 4; ++k) pairs[k] = Pair<T>::from_floats(v[2 * k], v[2 * k + 1]);
  *reinterpret_cast<uint4*>(p) = u;
}
template <> __device__ __forceinline__ void load8_vec<float>(const float* p, float (&v)[8]) {
  const float4 a = reinterpret_cast<const float4*>(p)[0], b = reinterpret_cast<const float4*>(p)[1];
  v[0] = a.x; v[1] = a.y; v[2] = a.z; v[3] = a.w; v[4] = b.x; v[5] = b.y; v[6] = b.z; v[7] = b.w;
}
template <> __device__ __forceinline__ void store8_vec<float>(float* p, const float (&v)[8]) {
  reinterpret_cast<float4*>(p)[0] = make_float4(v[0], v[1], v[2], v[3]);
  reinterpret_cast<float4*>(p)[1] = make_float4(v[4], v[5], v[6], v[7]);
}

// Calls f(p) with `data` cast to the element type of a runtime dtype code (const kept).
template <typename F>
__device__ __forceinline__ void with_dtype(int32_t dtype, const void* data, F&& f) {
  switch (dtype) {
    case FASTDIT_F16: f(static_cast<const __half*>(data)); break;
    case FASTDIT_BF16: f(static_cast<const __nv_bfloat16*>(data)); break;
    default: f(static_cast<const float*>(data)); break;
  }
}
template <typename F>
__device__ __forceinline__ void with_dtype(int32_t dtype, void* data, F&& f) {
  switch (dtype) {
    case FASTDIT_F16: f(static_cast<__half*>(data)); break;
    case FASTDIT_BF16: f(static_cast<__nv_bfloat16*>(data)); break;
    default: f(static_cast<float*>(data)); break;
  }
}

// The block's dynamic shared memory, 16-byte aligned (declared inside a kernel).
#ifdef __CUDACC__
#define FASTDIT_DYNAMIC_SHARED(name) extern __shared__ __align__(16) unsigned char name[]
#else
#define FASTDIT_DYNAMIC_SHARED(name) unsigned char* name = fastdit_emulated_dynamic_shared()
#endif

// ---- block-wide sums -----------------------------------------------------------------

// Sums each v[k] over the block (blockDim.x a multiple of 32): a butterfly in each warp, then
// every thread folds the warps' results in warp order. Deterministic, and every thread gets the
// same bits (each butterfly step adds the same two values in either lane). Every thread of the
// block must call it, with the same K and scratch.
template <int K>
__device__ __forceinline__ void block_sum(float (&v)[K], float (&buf)[2][kWarp][K], int& parity) {
  const int lane = threadIdx.x % kWarp, warp = threadIdx.x / kWarp, warps = blockDim.x / kWarp;
#pragma unroll
  for (int k = 0; k < K; ++k) {
#pragma unroll
    for (int m = kWarp / 2; m > 0; m /= 2) v[k] += __shfl_xor_sync(0xffffffffu, v[k], m);
  }
  float(&slot)[kWarp][K] = buf[parity];
  if (lane == 0) {
#pragma unroll
    for (int k = 0; k < K; ++k) slot[warp][k] = v[k];
  }
  __syncthreads();
#pragma unroll
  for (int k = 0; k < K; ++k) {
    float s = slot[0][k];
    for (int w = 1; w < warps; ++w) s += slot[w][k];
    v[k] = s;
  }
  parity ^= 1;  // the next reduction writes the other buffer: no second barrier needed
}

// ---- host: launches -------------------------------------------------------------------------

// kernel<<<grid, block, smem, stream>>>(args...). Spelt as a function so that the kernels also
// compile as plain C++: tests/native_emulation runs them on the CPU, where no GPU is at hand.
template <typename... Params, typename... Args>
inline void launch(void (*kernel)(Params...), dim3 grid, dim3 block, size_t smem, void* stream, Args... args) {
#ifdef __CUDACC__
  kernel<<<grid, block, smem, static_cast<cudaStream_t>(stream)>>>(args...);
#else
  fastdit_emulated_launch(kernel, grid, block, smem, args...);
#endif
}


// Multiprocessors of the current device.
int sm_count();
// Blocks of `kernel` that fit on one multiprocessor at `threads` per block (at least 1).
int blocks_per_sm(const void* kernel, int threads, size_t dynamic_smem);

// 0, or the launch's error as a positive cudaError_t.
inline int launch_status() { return static_cast<int>(cudaGetLastError()); }

}  // namespace fastdit
