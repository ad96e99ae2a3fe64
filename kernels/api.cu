// The library's entry points that are not kernels: ABI version, error messages, launch-shape queries.
#include <map>
#include <mutex>
#include <tuple>

#include "common.cuh"

namespace fastdit {

int sm_count() {
  int device = 0, sms = 0;
  cudaGetDevice(&device);
  cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device);
  return sms > 0 ? sms : 1;
}

int blocks_per_sm(const void* kernel, int threads, size_t dynamic_smem) {
  // Asked once per (device, kernel, block shape): the answer never changes within a process.
  static std::mutex mutex;
  static std::map<std::tuple<int, const void*, int, size_t>, int> cache;
  int device = 0;
  cudaGetDevice(&device);
  const auto key = std::make_tuple(device, kernel, threads, dynamic_smem);
  std::lock_guard<std::mutex> lock(mutex);
  auto it = cache.find(key);
  if (it != cache.end()) return it->second;
  int blocks = 0;
  if (cudaOccupancyMaxActiveBlocksPerMultiprocessor(&blocks, kernel, threads, dynamic_smem) != cudaSuccess) {
    cudaGetLastError();  // a failed query is not the launch's error: assume one block
    blocks = 0;
  }
  return cache[key] = blocks > 0 ? blocks : 1;
}

}  // namespace fastdit

extern "C" int fastdit_abi_version(void) { return FASTDIT_ABI_VERSION; }

extern "C" const char* fastdit_error_string(int code) {
  switch (code) {
    case 0: return "no error";
    case FASTDIT_ERR_DTYPE: return "unsupported dtype code, or tensors that must share a dtype do not";
    case FASTDIT_ERR_WIDTH: return "row width D or features per token C*p*p beyond the native kernels' maximum";
    case FASTDIT_ERR_ARGS: return "a required tensor is missing or a size is < 1";
    case FASTDIT_ERR_CHUNKS: return "partial-sum chunks differ from fastdit_rows_backward_chunks()";
    default: return code > 0 ? cudaGetErrorString(static_cast<cudaError_t>(code)) : "unknown fastdit error code";
  }
}
