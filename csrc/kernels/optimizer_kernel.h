// Fused optimizer steps and split-BF16 helpers.  Torch-free interface
// between csrc/ops/optimizer.cpp and the per-ISA kernels.
//
// One argument convention for the three storage modes of a parameter:
//   kFp32:  param fp32, no param2
//   kCopy:  param fp32 master, param2 its bf16 copy (rewritten after the step)
//   kSplit: param bf16 top half, param2 bf16 trail: fp32 = (top << 16) | trail
#pragma once

#include <cstdint>

#include "kernels/kernel_common.h"

namespace ipex_lite {
namespace kernels {

enum ParamMode : int { kModeFp32 = 0, kModeCopy = 1, kModeSplit = 2 };

struct OptStepArgs {
  void* param;
  void* param2;
  const void* grad;  // fp32 or bf16 (grad_bf16)
  float* state1;     // SGD momentum / Adam exp_avg / Adagrad sum
  float* state2;     // Adam exp_avg_sq
  float* state3;     // Adam max_exp_avg_sq (amsgrad)
  float lr, weight_decay;
  float momentum, dampening;  // SGD
  bool nesterov, first_step;  // SGD (first_step: momentum buffer starts as the gradient)
  float beta1, beta2, eps;    // Adam / Adagrad (eps)
  float bias_correction1, bias_correction2_sqrt, step_size;
  bool amsgrad, decoupled_weight_decay;  // AdamW
  float bias_correction2;                // Lamb
};

// Elements [begin, end) of one parameter.
using OptStepFn = void (*)(const OptStepArgs&, int64_t begin, int64_t end);

struct OptimizerKernels {
  OptStepFn sgd[3][2];  // [ParamMode][grad is bf16]
  OptStepFn adam[3][2];
  OptStepFn adagrad[3][2];
  // Lamb, two passes over [begin, end): moments updates exp_avg / exp_avg_sq
  // and writes sq[0] = sum(w^2), sq[1] = sum(u^2) of the Adam direction u;
  // update recomputes u from the new moments and applies w -= step_size * u.
  void (*lamb_moments[3][2])(const OptStepArgs&, int64_t begin, int64_t end, double* sq);
  OptStepFn lamb_update[3];
  // top/trail += alpha * grad (grad fp32 or bf16) on elements [begin, end)
  void (*packed_add[2])(uint16_t* top, uint16_t* trail, const void* grad, float alpha, int64_t begin, int64_t end);
  void (*split)(const float* src, uint16_t* top, uint16_t* trail, int64_t begin, int64_t end);
  void (*join)(const uint16_t* top, const uint16_t* trail, float* dst, int64_t begin, int64_t end);
};

}  // namespace kernels
}  // namespace ipex_lite
