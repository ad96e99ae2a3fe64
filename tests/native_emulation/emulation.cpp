// The CPU side of emulation.h: block execution, barriers, shuffles, and the few CUDA runtime
// calls the kernels' launchers make (an emulated device of FASTDIT_EMULATED_SMS multiprocessors).
#include <barrier>
#include <cstdlib>
#include <memory>
#include <thread>
#include <vector>

#include "emulation.h"

namespace fastdit_emulation {
namespace {

constexpr int kWarp = 32;

struct Block {
  explicit Block(unsigned threads, size_t smem) : all(threads), shuffle(threads), smem(smem + 16) {
    for (unsigned first = 0; first < threads; first += kWarp)
      warps.emplace_back(std::make_unique<std::barrier<>>(std::min<unsigned>(kWarp, threads - first)));
  }
  std::barrier<> all;
  std::vector<std::unique_ptr<std::barrier<>>> warps;
  std::vector<float> shuffle;
  std::vector<unsigned char> smem;
};

Block* current = nullptr;

}  // namespace

void sync_threads() { current->all.arrive_and_wait(); }

float shfl_xor(float v, int lane_mask) {
  const unsigned t = thread_idx.x, lane = t % kWarp;
  auto& warp = *current->warps[t / kWarp];
  current->shuffle[t] = v;
  warp.arrive_and_wait();
  const float other = current->shuffle[t - lane + (lane ^ unsigned(lane_mask))];
  warp.arrive_and_wait();  // nobody overwrites the buffer before every lane has read it
  return other;
}

unsigned char* dynamic_shared() {
  auto* p = current->smem.data();
  return p + (16 - reinterpret_cast<uintptr_t>(p) % 16) % 16;
}

void run(const std::function<void()>& body, dim3 grid, dim3 block, size_t dynamic_smem) {
  grid_dim = grid;
  block_dim = block;
  const unsigned threads = block.x * block.y * block.z;
  for (unsigned bz = 0; bz < grid.z; ++bz)
    for (unsigned by = 0; by < grid.y; ++by)
      for (unsigned bx = 0; bx < grid.x; ++bx) {
        Block state(threads, dynamic_smem);
        current = &state;
        std::vector<std::thread> pool;
        for (unsigned t = 0; t < threads; ++t)
          pool.emplace_back([&, t] {
            thread_idx = {t % block.x, t / block.x % block.y, t / (block.x * block.y)};
            block_idx = {bx, by, bz};
            body();
          });
        for (auto& th : pool) th.join();
      }
}

}  // namespace fastdit_emulation

extern "C" {
cudaError_t cudaGetDevice(int* device) {
  *device = 0;
  return cudaSuccess;
}
cudaError_t cudaDeviceGetAttribute(int* value, cudaDeviceAttr attr, int) {
  const char* sms = std::getenv("FASTDIT_EMULATED_SMS");
  *value = attr == cudaDevAttrMultiProcessorCount && sms ? std::atoi(sms) : 4;
  return cudaSuccess;
}
cudaError_t cudaOccupancyMaxActiveBlocksPerMultiprocessor(int* blocks, const void*, int, size_t) {
  *blocks = 1;
  return cudaSuccess;
}
cudaError_t cudaFuncSetAttribute(const void*, cudaFuncAttribute, int) { return cudaSuccess; }
cudaError_t cudaGetLastError() { return cudaSuccess; }
const char* cudaGetErrorString(cudaError_t) { return "emulated CUDA error"; }
}
