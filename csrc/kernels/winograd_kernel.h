// Winograd F(2x2, 3x3) convolution for inference: 3x3 kernels, stride 1,
// dilation 1, one group, fp32, channels-last.  Each 2x2 output tile comes
// from a 4x4 input tile through 16 element-wise products in the transformed
// domain, so the multiply count is 16/36 of direct convolution's.
// Torch-free interface between csrc/ops/winograd.cpp and the per-ISA kernels.
#pragma once

#include <cstdint>

#include "kernels/kernel_common.h"

namespace ipex_lite {
namespace kernels {

struct WinogradArgs {
  const float* x;     // (N, H, W, C), contiguous
  const float* u;     // (16, ceil(K / 64), C, 64): G g G^T of every (k, c) filter, element e = 4 * row + column,
                      // output channels in zero-padded panels of 64 that the GEMM streams contiguously
  const float* bias;  // (K) or null
  float* out;         // (N, OH, OW, K), contiguous
  int64_t n, h, w, c, k;
  int64_t pad_h, pad_w, out_h, out_w;
  int64_t tile_block;  // output tiles per task
  int64_t k_chunk;     // output channels per task: a multiple of 64, or all of them
  bool relu;
};

// Tasks are (tile block, output channel chunk), block-major; one call runs
// tasks [begin, end) with `scratch` of winograd_scratch_bytes() bytes.
using WinogradFn = void (*)(const WinogradArgs&, int64_t begin, int64_t end, void* scratch);

struct WinogradKernels {
  WinogradFn forward;
};

static inline int64_t winograd_scratch_bytes(int64_t tile_block, int64_t c, int64_t k_chunk) {
  // the block's transformed input (16 x tiles x C) and its products for one chunk (16 x tiles x k_chunk)
  return 4 * 16 * tile_block * (c + k_chunk) + 2 * 64;
}

}  // namespace kernels
}  // namespace ipex_lite
