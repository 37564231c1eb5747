// Per-tensor affine quantization between fp32 and 8-bit integers.
// Torch-free interface between csrc/ops/quantization.cpp and the per-ISA kernels.
#pragma once

#include <cstdint>

#include "kernels/kernel_common.h"

namespace ipex_lite {
namespace kernels {

struct QuantizationKernels {
  // q = clamp(nearbyint(x * inv_scale) + zero_point, qmin, qmax) on [begin, end); NaN -> qmin
  void (*quantize_u8)(const float* src, uint8_t* dst, float inv_scale, float zero_point, int64_t begin,
                      int64_t end);
  void (*quantize_s8)(const float* src, int8_t* dst, float inv_scale, float zero_point, int64_t begin,
                      int64_t end);
  // x = (q - zero_point) * scale
  void (*dequantize_u8)(const uint8_t* src, float* dst, float scale, float zero_point, int64_t begin, int64_t end);
  void (*dequantize_s8)(const int8_t* src, float* dst, float scale, float zero_point, int64_t begin, int64_t end);
};

}  // namespace kernels
}  // namespace ipex_lite
