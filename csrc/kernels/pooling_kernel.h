// Max pooling for inference, channels-last: no indices are written.
// Torch-free interface between csrc/ops/pooling.cpp and the per-ISA kernels.
#pragma once

#include <cstdint>

#include "kernels/kernel_common.h"

namespace ipex_lite {
namespace kernels {

struct MaxPoolArgs {
  const void* x;  // (N, H, W, C), contiguous
  void* out;      // (N, OH, OW, C), contiguous
  int64_t h, w, c, out_h, out_w;
  int64_t kernel[2], stride[2], padding[2], dilation[2];
};

// One call pools output rows [begin, end) of the flattened (N, OH) range.
using MaxPoolFn = void (*)(const MaxPoolArgs&, int64_t begin, int64_t end);

struct PoolingKernels {
  MaxPoolFn max_pool2d[kNumKernelDtypes];  // kF32 and kBF16 (kF64 unused)
};

}  // namespace kernels
}  // namespace ipex_lite
