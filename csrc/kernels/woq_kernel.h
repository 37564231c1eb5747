// Weight-only quantized Linear: int8 or packed int4 weights with group-wise scales (and int4 zero points),
// dequantized in registers next to the FMA.  Torch-free interface between csrc/ops/woq.cpp and the per-ISA
// kernels.
//
// Layout (made by the op quantize_woq, read here):
//   int8: (n, kp) int8, w = q * scale[n, g]
//   int4: (n, kp / 2) uint8; in each block of 32 inputs, byte j holds input j (low nibble) and input j + 16
//         (high nibble), so one 16-byte load widens into two 16-lane vectors of consecutive inputs;
//         w = (q - zero[n, g]) * scale[n, g], or codebook[q] * scale[n, g] (NF4)
// kp is the input size rounded up to 32 (padding weights are 0, padding inputs too); groups are `group`
// inputs (a multiple of 32 dividing kp) and there are kp / group of them per row.
#pragma once

#include <cstdint>

#include "kernels/kernel_common.h"

namespace ipex_lite {
namespace kernels {

enum WoqBits : int { kWoqInt8 = 0, kWoqInt4 = 1 };

struct WoqArgs {
  const float* x;     // (m, kp), zero-padded
  const float* xsum;  // (m, kp / group): sum of x over each group (zero points; the bf16 path), or null
  // The same activations in bf16 when the input was bf16 (exact), else null.  x_bf16 is in input order;
  // x_bf16_lanes in the lane order of the bf16 kernel for the layer (null where that kernel reads x_bf16):
  //   int8, group % 64 == 0, one activation row: per 64 inputs, the even inputs then the odd ones (the two
  //     bytes of a 16-bit lane);
  //   int4, group % 128 == 0: per 128 inputs, 4 x 32 lanes, nibble v (bits 4v..4v+3) of 16-bit word j of the
  //     64 weight bytes: input 32 (j / 8) + 2 (j % 8) + (v >> 1) + 16 (v & 1);
  //   int4, other groups: per 64 inputs [0, 16) [32, 48) (low nibbles) then [16, 32) [48, 64) (high
  //     nibbles), the 32 inputs past the last whole 64 as they are.
  const uint16_t* x_bf16;
  const uint16_t* x_bf16_lanes;
  // lowp INT8 (activations quantized per row, symmetric): x_q in the weights' byte-lane order (int4: per
  // 128 inputs, the low nibbles' 64 lanes then the high nibbles'; int8: input order), x_scale per row and
  // the per-group sums of x_q; null when the call computes with bf16/fp32 activations
  const int8_t* x_q;
  const float* x_scale;
  const float* x_q_sum;  // exact: |sum| <= 127 * group < 2^24
  int64_t m, kp, group;
  const uint8_t* w;  // the layout above; row stride ldw bytes
  int64_t ldw;
  const float* scales;  // (n, kp / group)
  const float* zeros;   // (n, kp / group) or null (symmetric)
  // int4 only: 16 values a nibble stands for (NF4's code book, each exact in bf16), w = codebook[q] * scale
  // (no zero points); null: w = (q - zero) * scale
  const float* codebook;
  const float* bias;    // (n) or null
  void* y;              // (m, n) fp32 or bf16, row stride ldy
  int64_t ldy;
  bool y_bf16;
};
using WoqGemvFn = void (*)(const WoqArgs&, int64_t n_begin, int64_t n_end);
// rows [n_begin, n_end) of the weight as bf16 (n, k): the prefill path hands them to a GEMM
using WoqDequantFn = void (*)(const WoqArgs&, int64_t k, uint16_t* out, int64_t n_begin, int64_t n_end);

struct WoqKernels {
  WoqGemvFn gemv[2];        // kWoqInt8, kWoqInt4
  bool has_vnni;            // gemv serves x_q (AVX512-VNNI); otherwise the op never passes it
  WoqDequantFn dequant[2];  // kWoqInt8, kWoqInt4
};

}  // namespace kernels
}  // namespace ipex_lite
