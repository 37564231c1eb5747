// Decoder-LLM kernels: a small-M GEMM on bf16 weights (decode), RMSNorm with the residual add fused,
// rotary embedding in place, SiLU-gate, and attention of a few query rows over a KV cache.
// Torch-free interface between csrc/ops/llm.cpp and the per-ISA kernels.
#pragma once

#include <cstdint>

#include "kernels/kernel_common.h"

namespace ipex_lite {
namespace kernels {

// y[i, n] = bias[n] + sum_k x[i, k] * w[n, k] for i < m, n in [n_begin, n_end).  Every weight row is
// read once per call whatever m is: decoding is bound by the weight bytes, not by the FLOPs.
struct SmallMArgs {
  const float* x;  // (m, k), contiguous
  const uint16_t* x_bf16;  // the same values in bf16 when the input was bf16 (exact), else null
  int64_t m, k;
  const uint16_t* w;  // bf16 (n, k), row stride ldw, unit stride along k
  int64_t ldw;
  const float* bias;  // (n) or null
  void* y;            // (m, n) fp32 or bf16, row stride ldy
  int64_t ldy;
  bool y_bf16;
};
using SmallMFn = void (*)(const SmallMArgs&, int64_t n_begin, int64_t n_end);

// Rows [begin, end): h = x (+ residual, rounded to the element type and stored back into residual),
// out = w * round(h * rsqrt(mean(h^2) + eps)), rounded -- Hugging Face's RMSNorm, operation by operation.
struct RmsNormArgs {
  const void* x;
  int64_t ldx;
  void* residual;  // or null
  int64_t ldr;
  const void* w;  // (n)
  void* out;
  int64_t ldo;
  int64_t n;
  float eps;
};
using RmsNormFn = void (*)(const RmsNormArgs&, int64_t begin, int64_t end);

// Rotary embedding in the rotate-half form, in place on the first rd elements of each (b, s, head) row:
// t[i] = t[i] cos[i] - t[i + rd/2] sin[i], t[i + rd/2] = t[i + rd/2] cos[i + rd/2] + t[i] sin[i + rd/2].
// Tasks are the (b, s) rows.
struct RotaryArgs {
  void* t;
  int64_t t_strides[3];  // b, s, head; unit stride along the head dimension
  int64_t seq, heads, rd;
  const void* cos;
  const void* sin;
  int64_t cs_strides[2];  // b (0 when broadcast), s; same for cos and sin
};
using RotaryFn = void (*)(const RotaryArgs&, int64_t begin, int64_t end);

// out[r, j] = round(round(silu(g[r, j])) * u[r, j]) for rows [begin, end), j < n.
using SiluMulFn = void (*)(const void* g, int64_t ldg, const void* u, int64_t ldu, void* out, int64_t ldo, int64_t n,
                           int64_t begin, int64_t end);

// Attention of lq query rows per head over lk cached keys, grouped-query heads (`groups` query heads per
// key/value head).  A task is (batch, kv head, chunk of `chunk` keys); it writes, per query row of its
// group, the unnormalised output, the row maximum and the sum of exponentials of its chunk into
// partial[(task * rows + r) * (ev + 2)], rows = groups * lq (the op merges the chunks).
struct DecodeAttentionArgs {
  const void* q;  // (B, groups * kv_heads, lq, e)
  int64_t q_strides[3];
  const void* k;  // (B, kv_heads, lk, e)
  int64_t k_strides[3];
  const void* v;  // (B, kv_heads, lk, ev)
  int64_t v_strides[3];
  const float* mask;  // additive (B, heads | 1, lq, lk) or null; broadcast dimensions have stride 0
  int64_t mask_strides[4];
  int64_t kv_heads, groups, lq, lk, e, ev, chunk;
  float scale;
  bool causal;  // query row i sees keys j <= lk - lq + i (its position at the end of the cache)
  float* partial;
};
using DecodeAttentionFn = void (*)(const DecodeAttentionArgs&, int64_t begin, int64_t end, void* scratch);

static inline int64_t decode_attention_scratch_bytes(int64_t rows, int64_t chunk, int64_t e) {
  return 4 * (rows * chunk + rows * e) + 2 * 64;
}

struct LlmKernels {
  SmallMFn linear_small_m;
  RmsNormFn rms_norm[kNumKernelDtypes];  // kF32, kBF16
  RotaryFn rotary[kNumKernelDtypes];
  SiluMulFn silu_mul[kNumKernelDtypes];
  DecodeAttentionFn decode_attention[kNumKernelDtypes];
};

}  // namespace kernels
}  // namespace ipex_lite
