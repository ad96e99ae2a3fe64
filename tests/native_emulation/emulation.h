// Runs fastdit's CUDA kernels (kernels/*.cu) as plain C++ on the CPU, so the tests check the
// kernels' own logic on machines without a GPU. Force-included (g++ -include) before the kernel
// sources, which then compile without nvcc: each block's threads run as std::threads, blocks one
// after another; __syncthreads() is a barrier; warp shuffles exchange through memory; __shared__
// variables become statics (one block runs at a time). Numbers match the GPU's up to fp32
// rounding (no fused multiply-adds, exact rsqrt). Not a performance model.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <functional>

namespace fastdit_emulation {
inline thread_local uint3 thread_idx, block_idx;
inline dim3 block_dim, grid_dim;
void sync_threads();
float shfl_xor(float v, int lane_mask);
unsigned char* dynamic_shared();
void run(const std::function<void()>& body, dim3 grid, dim3 block, size_t dynamic_smem);
}  // namespace fastdit_emulation

#undef __shared__
#define __shared__ static
#undef __launch_bounds__
#define __launch_bounds__(...)
#define threadIdx (fastdit_emulation::thread_idx)
#define blockIdx (fastdit_emulation::block_idx)
#define blockDim (fastdit_emulation::block_dim)
#define gridDim (fastdit_emulation::grid_dim)
#define __syncthreads() fastdit_emulation::sync_threads()

inline float __shfl_xor_sync(unsigned, float v, int lane_mask) { return fastdit_emulation::shfl_xor(v, lane_mask); }
inline float rsqrtf(float x) { return 1.f / std::sqrt(x); }
using std::isfinite;
using std::isinf;
using std::max;
using std::min;

inline unsigned char* fastdit_emulated_dynamic_shared() { return fastdit_emulation::dynamic_shared(); }

template <typename... Params, typename... Args>
void fastdit_emulated_launch(void (*kernel)(Params...), dim3 grid, dim3 block, size_t dynamic_smem, Args... args) {
  fastdit_emulation::run([&] { kernel(args...); }, grid, block, dynamic_smem);
}
