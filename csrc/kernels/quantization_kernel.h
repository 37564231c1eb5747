// Per-tensor affine and per-row symmetric quantization between fp32 and 8-bit integers.
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
  // rows [row_begin, row_end) of a (rows, k) matrix, each symmetric with its own scale, stored as uint8
  // with zero point 128: scales[r] = max|x_r| / 127 (1 for an all-zero row),
  // q = clamp(nearbyint(x / scales[r]), -127, 127) + 128
  void (*quantize_rows_u8)(const float* src, uint8_t* dst, float* scales, int64_t k, int64_t row_begin,
                           int64_t row_end);
  // dst[i] = table[src[i]] on [begin, end): an elementwise function of a uint8 tensor, requantization included
  void (*lookup_u8)(const uint8_t* src, uint8_t* dst, const uint8_t* table, int64_t begin, int64_t end);
};

}  // namespace kernels
}  // namespace ipex_lite
