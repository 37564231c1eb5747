// Fused dot interaction (DLRM "dot"): N rows of D per sample ->
// [row 0, strict lower triangle of the N x N Gram matrix, row-major].
// Torch-free interface between csrc/ops/interaction.cpp and the per-ISA kernels.
#pragma once

#include <cstdint>

#include "kernels/kernel_common.h"

namespace ipex_lite {
namespace kernels {

struct InteractionFwdArgs {
  const void* const* inputs;  // num_inputs base pointers; each row has `dim` contiguous elements
  const int64_t* row_strides;  // per input, in elements (0 for a broadcast row)
  int64_t num_inputs;
  int64_t dim;
  void* out;  // contiguous (B, dim + num_inputs * (num_inputs - 1) / 2)
};

struct InteractionBwdArgs {
  const void* grad_out;  // rows of dim + P contiguous elements
  int64_t grad_row_stride;
  const void* const* inputs;
  const int64_t* row_strides;
  void* const* grad_inputs;  // num_inputs contiguous (B, dim)
  int64_t num_inputs;
  int64_t dim;
  bool stream_grads;  // write whole aligned lines of grad_inputs with non-temporal stores
};

// Each call handles samples [begin, end) and uses `scratch`, which holds at
// least interaction_*_scratch_bytes() bytes, 64-byte aligned.
using InteractionFwdFn = void (*)(const InteractionFwdArgs&, int64_t begin, int64_t end, void* scratch);
using InteractionBwdFn = void (*)(const InteractionBwdArgs&, int64_t begin, int64_t end, void* scratch);

struct InteractionKernels {
  InteractionFwdFn forward[kNumKernelDtypes];
  InteractionBwdFn backward[kNumKernelDtypes];
};

static inline int64_t interaction_fwd_scratch_bytes(int64_t n, int64_t d) {
  // row pointers, rows widened to the accumulation type, the triangle
  return 8 * n + 8 * n * d + 8 * (n * (n - 1) / 2) + 4 * 64;
}

static inline int64_t interaction_bwd_scratch_bytes(int64_t n, int64_t d) {
  // row pointers, widened rows, the widened triangle of grad_out and a zero row (n + 4 rows of n
  // bound them), the first gradient row
  return 8 * n + 8 * n * d + 8 * (n + 4) * n + 8 * d + 5 * 64;
}

}  // namespace kernels
}  // namespace ipex_lite
