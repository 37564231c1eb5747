// Scaled dot-product attention for inference: softmax(Q K^T * scale + mask) V
// per (batch, head), fp32 or bf16 tensors, fp32 arithmetic.
// Torch-free interface between csrc/ops/attention.cpp and the per-ISA kernels.
#pragma once

#include <cstdint>

#include "kernels/kernel_common.h"

namespace ipex_lite {
namespace kernels {

struct AttentionArgs {
  const void* q;  // (B, H, Lq, E), unit stride along E
  const void* k;  // (B, H, Lk, E)
  const void* v;  // (B, H, Lk, Ev)
  void* out;      // (B, H, Lq, Ev)
  int64_t q_strides[3], k_strides[3], v_strides[3], out_strides[3];  // batch, head, row; in elements
  const float* mask;          // additive, or null; broadcast dimensions have stride 0
  int64_t mask_strides[4];    // batch, head, row, column; column stride is 0 or 1
  int64_t heads, lq, lk, e, ev;
  int64_t q_block;  // query rows per task
  float scale;
  bool causal;  // key j is seen by query i only when j <= i
};

// Tasks are (batch, head, query block) in row-major order; one call runs
// tasks [begin, end) with `scratch` of attention_scratch_bytes() bytes.
using AttentionFn = void (*)(const AttentionArgs&, int64_t begin, int64_t end, void* scratch);

struct AttentionKernels {
  AttentionFn forward[kNumKernelDtypes];  // kF32 and kBF16 (kF64 unused)
};

static inline int64_t attention_scratch_bytes(int64_t q_block, int64_t lk, int64_t e, int64_t ev) {
  // K^T, V widened to fp32, the scaled query block, scores, the output block, 1/row sums
  return 4 * (e * lk + lk * ev + q_block * e + q_block * lk + q_block * ev + q_block) + 7 * 64;
}

}  // namespace kernels
}  // namespace ipex_lite
