// The layout kernel behind patchify and unpatchify: images (B, C, H, W) <-> tokens (B, T, F).
//
// Token t = (th, tw) of the (h, w) = (H/p, W/p) grid holds the p x p patch at image rows th*p + i,
// columns tw*p + j, over the C channels: F = C*p*p features ordered (c, i, j) or, channels_last,
// (i, j, c) (fastdit/ops/_layout.py). The move is a permutation of elements, so the kernel copies
// bits (2- or 4-byte words) and serves every dtype and both directions.
//
// A block moves a tile: NH grid rows x TW grid columns of one image, i.e. C x (NH p) x (TW p) image
// elements, through shared memory, so both global sides are read and written in their own order:
// the image side along image rows, the token side along each token's features (16-byte accesses
// where alignment allows, else element by element; images may have any strides).
//
// Each op's direction compiles under its name (as the Triton kernels do, fastdit/ops/_layout.py),
// so a profiler trace says which op ran: patchify = to tokens, features (c, i, j), its backward to
// the image; unpatchify = to the image, features (i, j, c), its backward to tokens.
#include <algorithm>

#include "common.cuh"

namespace fastdit {
namespace {

constexpr int kThreads = 256;
constexpr int kTileBytes = 16384;   // shared memory a tile aims at (a single token may need up to F words)
constexpr int kBlocksPerSm = 8;     // blocks of <= 256 threads per multiprocessor the grid aims at

struct LayoutParams {
  void* image;
  int64_t si_b, si_c, si_h, si_w;
  void* tokens;
  int64_t st_b, st_t;
  int C, p, w, F;
  int NH, TW, tiles_h, tiles_w;  // tile extent in grid rows and columns; tiles per image
  bool vec_image, vec_tokens;
};

// The tile's geometry for this block.
struct Tile {
  int64_t b;
  int th0, tw0, nh, ntw, rows, cols;  // grid origin and extent; image rows per channel and columns
};

__device__ __forceinline__ Tile tile_of_block(const LayoutParams& q, int h) {
  const int per_image = q.tiles_h * q.tiles_w, block = static_cast<int>(blockIdx.x);  // 32-bit division
  Tile t;
  t.b = block / per_image;
  const int rem = block % per_image;
  t.th0 = rem / q.tiles_w * q.NH;
  t.tw0 = rem % q.tiles_w * q.TW;
  t.nh = min(q.NH, h - t.th0);
  t.ntw = min(q.TW, q.w - t.tw0);
  t.rows = t.nh * q.p;
  t.cols = t.ntw * q.p;
  return t;
}

// Between the image and the tile, laid out [c][row][col] with row length t.cols. WIDTH words per
// access: 16 bytes along an image row (unit column stride), or 1.
template <bool TO_IMAGE, int WIDTH, typename E>
__device__ __forceinline__ void image_side(E* tile, E* img, const LayoutParams& q, const Tile& t) {
  using Access = typename std::conditional<WIDTH == 1, E, uint4>::type;
  const int per_row = t.cols / WIDTH, n = q.C * t.rows * per_row;
  for (int k = threadIdx.x; k < n; k += blockDim.x) {
    const int row = k / per_row, x = k % per_row * WIDTH;  // row = c * t.rows + image row in the tile
    const int c = row / t.rows, y = row % t.rows;
    auto* g = reinterpret_cast<Access*>(img + c * q.si_c + y * q.si_h + x * q.si_w);
    auto* s = reinterpret_cast<Access*>(tile + row * t.cols + x);
    if (TO_IMAGE)
      *g = *s;
    else
      *s = *g;
  }
}

// Between the tokens and the tile: each access covers WIDTH consecutive features of one token,
// whose (c, i, j) are stepped along instead of divided out per word.
template <bool TO_IMAGE, bool CHANNELS_LAST, int WIDTH, typename E>
__device__ __forceinline__ void token_side(E* tile, E* tok, const LayoutParams& q, const Tile& t) {
  using Access = typename std::conditional<WIDTH == 1, E, uint4>::type;
  const int per_token = q.F / WIDTH, n = t.nh * t.ntw * per_token, p = q.p;
  for (int k = threadIdx.x; k < n; k += blockDim.x) {
    const int token = k / per_token, f = k % per_token * WIDTH;
    const int hh = token / t.ntw, tw = token % t.ntw;
    auto* g = reinterpret_cast<Access*>(tok + (int64_t(hh) * q.w + tw) * q.st_t + f);
    int c, i, j;
    if (CHANNELS_LAST) {
      c = f % q.C; j = f / q.C % p; i = f / (q.C * p);
    } else {
      c = f / (p * p); i = f / p % p; j = f % p;
    }
    Access words;
    E* word = reinterpret_cast<E*>(&words);
    if (TO_IMAGE) words = *g;
#pragma unroll
    for (int e = 0; e < WIDTH; ++e) {
      E& s = tile[(c * t.rows + hh * p + i) * t.cols + tw * p + j];
      if (TO_IMAGE)
        s = word[e];
      else
        word[e] = s;
      if (CHANNELS_LAST) {
        if (++c == q.C) { c = 0; if (++j == p) { j = 0; ++i; } }
      } else {
        if (++j == p) { j = 0; if (++i == p) { i = 0; ++c; } }
      }
    }
    if (!TO_IMAGE) *g = words;
  }
}

template <bool TO_IMAGE, bool CHANNELS_LAST, typename E>
__device__ __forceinline__ void move(E* tile, E* img, E* tok, const LayoutParams& q, const Tile& t) {
  constexpr int kVec = 16 / sizeof(E);
  if (TO_IMAGE) {
    if (q.vec_tokens)
      token_side<true, CHANNELS_LAST, kVec>(tile, tok, q, t);
    else
      token_side<true, CHANNELS_LAST, 1>(tile, tok, q, t);
    __syncthreads();
    if (q.vec_image) image_side<true, kVec>(tile, img, q, t); else image_side<true, 1>(tile, img, q, t);
  } else {
    if (q.vec_image) image_side<false, kVec>(tile, img, q, t); else image_side<false, 1>(tile, img, q, t);
    __syncthreads();
    if (q.vec_tokens)
      token_side<false, CHANNELS_LAST, kVec>(tile, tok, q, t);
    else
      token_side<false, CHANNELS_LAST, 1>(tile, tok, q, t);
  }
}

template <bool TO_IMAGE, bool CHANNELS_LAST, typename E>
__device__ __forceinline__ void layout(const LayoutParams& q, int h) {
  FASTDIT_DYNAMIC_SHARED(smem);
  const Tile t = tile_of_block(q, h);
  E* img = static_cast<E*>(q.image) + t.b * q.si_b + int64_t(t.th0) * q.p * q.si_h + int64_t(t.tw0) * q.p * q.si_w;
  E* tok = static_cast<E*>(q.tokens) + t.b * q.st_b + (int64_t(t.th0) * q.w + t.tw0) * q.st_t;
  move<TO_IMAGE, CHANNELS_LAST>(reinterpret_cast<E*>(smem), img, tok, q, t);
}

// The kernels, by op (E: the 2- or 4-byte word every dtype is moved as).
template <typename E>
__global__ void __launch_bounds__(kThreads) patchify_fwd_kernel(const LayoutParams q, int h) {
  layout<false, false, E>(q, h);
}
template <typename E>
__global__ void __launch_bounds__(kThreads) patchify_bwd_kernel(const LayoutParams q, int h) {
  layout<true, false, E>(q, h);
}
template <typename E>
__global__ void __launch_bounds__(kThreads) unpatchify_fwd_kernel(const LayoutParams q, int h) {
  layout<true, true, E>(q, h);
}
template <typename E>
__global__ void __launch_bounds__(kThreads) unpatchify_bwd_kernel(const LayoutParams q, int h) {
  layout<false, true, E>(q, h);
}

using LayoutKernel = void (*)(LayoutParams, int);

// The kernel of the op whose direction and feature order these are, for E.
template <typename E>
LayoutKernel op_kernel(bool to_image, bool channels_last) {
  if (channels_last) return to_image ? unpatchify_fwd_kernel<E> : unpatchify_bwd_kernel<E>;
  return to_image ? patchify_bwd_kernel<E> : patchify_fwd_kernel<E>;
}

bool aligned16(const void* p, std::initializer_list<int64_t> strides, int esize) {
  if (reinterpret_cast<uintptr_t>(p) % 16) return false;
  for (int64_t s : strides)
    if (s * esize % 16) return false;
  return true;
}

}  // namespace
}  // namespace fastdit

using namespace fastdit;

extern "C" int fastdit_layout(void* image, const int64_t* si, void* tokens, const int64_t* st, int64_t B, int64_t C,
                              int64_t H, int64_t W, int64_t p, int32_t dtype, int channels_last, int to_image,
                              void* stream) {
  if (!image || !tokens || !si || !st || B < 1 || C < 1 || p < 1 || H < p || W < p || H % p || W % p)
    return FASTDIT_ERR_ARGS;
  if (!valid_dtype(dtype)) return FASTDIT_ERR_DTYPE;
  const int64_t F = C * p * p, h = H / p, w = W / p;
  if (F > FASTDIT_LAYOUT_MAX_F) return FASTDIT_ERR_WIDTH;
  const int esize = dtype_size(dtype), words = 16 / esize;
  const int64_t budget = kTileBytes / esize;  // words

  // Tile: whole grid rows when one fits, else TW grid columns (a multiple of 16 bytes of image
  // row where that is possible), then as many grid rows as fit while the grid keeps every
  // multiprocessor busy (B * tiles >= SMs * kBlocksPerSm where possible).
  int64_t TW = w;
  if (C * p * W > budget) {
    TW = std::max<int64_t>(1, budget / F);
    if (TW >= words) TW -= TW % words;
  }
  const int64_t tiles_w = ceil_div(w, TW);
  const bool vec_image = si[3] == 1 && W % words == 0 && (TW == w || TW * p % words == 0) &&
                         aligned16(image, {si[0], si[1], si[2]}, esize);
  const bool vec_tokens = F % words == 0 && aligned16(tokens, {st[0], st[1]}, esize);
  const int64_t fit = std::max<int64_t>(1, budget / (C * p * TW * p));
  const int64_t spare = B * h * tiles_w / (int64_t(sm_count()) * kBlocksPerSm);
  int64_t NH = std::max<int64_t>(1, std::min({fit, h, spare}));
  const int64_t tiles_h = ceil_div(h, NH);
  NH = ceil_div(h, tiles_h);  // even tiles: 16 rows in 3 tiles are 6 + 6 + 4, not 7 + 7 + 2
  const int64_t blocks = B * tiles_h * tiles_w, tile_words = C * NH * p * TW * p;
  if (blocks > INT32_MAX) return FASTDIT_ERR_ARGS;

  const LayoutParams q{image, si[0], si[1], si[2], si[3], tokens, st[0], st[1],
                       int(C), int(p), int(w), int(F), int(NH), int(TW), int(tiles_h), int(tiles_w),
                       vec_image, vec_tokens};
  const size_t smem = tile_words * esize;
  const int threads = static_cast<int>(std::min<int64_t>(kThreads, round_up(ceil_div(tile_words, words), kWarp)));
  const LayoutKernel kernel = esize == 4 ? op_kernel<uint32_t>(to_image, channels_last)
                                         : op_kernel<uint16_t>(to_image, channels_last);
  if (smem > 48 * 1024) {  // one token of more than 48 KB (F up to 16384 fp32 words): ask for it
    const auto attribute = cudaFuncAttributeMaxDynamicSharedMemorySize;
    if (cudaFuncSetAttribute(reinterpret_cast<const void*>(kernel), attribute, int(smem)) != cudaSuccess)
      return launch_status();
  }
  launch(kernel, unsigned(blocks), threads, smem, stream, q, int(h));
  return launch_status();
}
