// Split-BF16 helpers and fused optimizer steps: schemas, checks, CPU
// implementations.  Loops in csrc/kernels/optimizer_kernel.cpp.
#include <ATen/ATen.h>
#include <ATen/MemoryOverlap.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <initializer_list>
#include <tuple>
#include <utility>
#include <vector>

#include "dispatch/isa.h"
#include "kernels/optimizer_kernel.h"

IPEX_LITE_DECLARE_KERNEL_TABLE(OptimizerKernels, optimizer_kernels)

namespace ipex_lite {
namespace {

namespace k = kernels;

constexpr int64_t kGrain = 1 << 15;  // elements per task: ~128 KB of fp32 per stream

void check_cpu_dense(const at::Tensor& t, const char* op, const char* name) {
  TORCH_CHECK(t.defined(), op, ": ", name, " is undefined");
  TORCH_CHECK(t.device().is_cpu(), op, ": ", name, " is on ", t.device(), "; only CPU tensors are supported");
  TORCH_CHECK(t.layout() == at::kStrided, op, ": ", name, " must be a dense tensor, got ", t.layout());
}

void check_in_place(const at::Tensor& t, const char* op, const char* name, int64_t numel) {
  check_cpu_dense(t, op, name);
  TORCH_CHECK(t.is_contiguous(), op, ": ", name, " must be contiguous to be updated in place");
  TORCH_CHECK(t.numel() == numel, op, ": ", name, " has ", t.numel(), " elements, expected ", numel);
}

// Storage mode from (param, param2) and the gradient, checked.
struct Step {
  int mode = k::kModeFp32;
  bool grad_bf16 = false;
  at::Tensor grad;
};

Step check_step(const char* op, const at::Tensor& param, const at::Tensor& grad, const at::Tensor& param2) {
  check_cpu_dense(param, op, "param");
  TORCH_CHECK(param.is_contiguous(), op, ": param must be contiguous");
  Step s;
  const auto pt = param.scalar_type();
  check_cpu_dense(param2, op, "param2");
  if (pt == at::kFloat) {
    if (param2.numel() == 0) {
      s.mode = k::kModeFp32;
    } else {
      TORCH_CHECK(param2.scalar_type() == at::kBFloat16, op, ": param2 of an fp32 param is its bf16 copy; got ",
                  param2.scalar_type());
      check_in_place(param2, op, "param2", param.numel());
      s.mode = k::kModeCopy;
    }
  } else {
    TORCH_CHECK(pt == at::kBFloat16, op, ": param must be float32 (optionally with a bf16 copy) or the bf16 top "
                "half of a split weight; got ", pt);
    TORCH_CHECK(param2.scalar_type() == at::kBFloat16, op, ": a bf16 param needs its bf16 trail as param2");
    check_in_place(param2, op, "param2 (trail)", param.numel());
    s.mode = k::kModeSplit;
  }
  check_cpu_dense(grad, op, "grad");
  TORCH_CHECK(grad.sizes() == param.sizes(), op, ": grad has shape ", grad.sizes(), " but param has ",
              param.sizes());
  TORCH_CHECK(grad.scalar_type() == at::kFloat || grad.scalar_type() == at::kBFloat16, op, ": grad has dtype ",
              grad.scalar_type(), "; expected float32 or bfloat16");
  s.grad_bf16 = grad.scalar_type() == at::kBFloat16;
  s.grad = grad.contiguous();
  return s;
}

void check_state(const at::Tensor& t, const char* op, const char* name, int64_t numel) {
  check_in_place(t, op, name, numel);
  TORCH_CHECK(t.scalar_type() == at::kFloat, op, ": ", name, " must be float32, got ", t.scalar_type());
}

// The kernels read and write through __restrict pointers: every tensor a
// step writes must be its own memory, and the gradient must not alias them.
void check_distinct(const char* op, std::initializer_list<std::pair<const char*, const at::Tensor*>> written,
                    const at::Tensor& grad) {
  std::vector<std::pair<const char*, const at::Tensor*>> ts;
  for (const auto& w : written)
    if (w.second->defined() && w.second->numel() > 0) ts.push_back(w);
  for (size_t i = 0; i < ts.size(); ++i) {
    if (grad.defined()) {
      const auto sg = at::get_overlap_status(*ts[i].second, grad);
      TORCH_CHECK(sg != at::MemOverlapStatus::Full && sg != at::MemOverlapStatus::Partial, op, ": ", ts[i].first,
                  " shares memory with grad");
    }
    for (size_t j = 0; j < i; ++j) {
      const auto st = at::get_overlap_status(*ts[i].second, *ts[j].second);
      TORCH_CHECK(st != at::MemOverlapStatus::Full && st != at::MemOverlapStatus::Partial, op, ": ", ts[i].first,
                  " and ", ts[j].first, " share memory");
    }
  }
}

void run(k::OptStepFn fn, const k::OptStepArgs& args, int64_t numel) {
  at::parallel_for(0, numel, kGrain, [&](int64_t begin, int64_t end) { fn(args, begin, end); });
}

void sgd_step(const at::Tensor& param, const at::Tensor& grad, const at::Tensor& momentum_buffer,
              const at::Tensor& param2, double lr, double momentum, double dampening, bool nesterov,
              double weight_decay, bool first_step) {
  const char* op = "sgd_step_";
  Step s = check_step(op, param, grad, param2);
  TORCH_CHECK(!nesterov || (momentum > 0 && dampening == 0), op, ": nesterov needs momentum > 0 and dampening 0");
  k::OptStepArgs a{};
  if (momentum != 0) {
    check_state(momentum_buffer, op, "momentum_buffer", param.numel());
    a.state1 = momentum_buffer.data_ptr<float>();
  }
  check_distinct(op, {{"param", &param}, {"param2", &param2}, {"momentum_buffer", &momentum_buffer}}, s.grad);
  a.param = param.data_ptr();
  a.param2 = param2.numel() ? param2.data_ptr() : nullptr;
  a.grad = s.grad.data_ptr();
  a.lr = static_cast<float>(lr);
  a.weight_decay = static_cast<float>(weight_decay);
  a.momentum = static_cast<float>(momentum);
  a.dampening = static_cast<float>(dampening);
  a.nesterov = nesterov;
  a.first_step = first_step;
  run(IPEX_LITE_KERNEL_TABLE(optimizer_kernels).sgd[s.mode][s.grad_bf16], a, param.numel());
}

// The arguments Adam-family steps share: parameter storage, gradient, both moments, hyperparameters.
void fill_moments(k::OptStepArgs& a, const Step& s, const at::Tensor& param, const at::Tensor& param2,
                  const at::Tensor& exp_avg, const at::Tensor& exp_avg_sq, double beta1, double beta2, double eps,
                  double weight_decay) {
  a.param = param.data_ptr();
  a.param2 = param2.numel() ? param2.data_ptr() : nullptr;
  a.grad = s.grad.data_ptr();
  a.state1 = exp_avg.data_ptr<float>();
  a.state2 = exp_avg_sq.data_ptr<float>();
  a.weight_decay = static_cast<float>(weight_decay);
  a.beta1 = static_cast<float>(beta1);
  a.beta2 = static_cast<float>(beta2);
  a.eps = static_cast<float>(eps);
}

void adam_step(const at::Tensor& param, const at::Tensor& grad, const at::Tensor& exp_avg,
               const at::Tensor& exp_avg_sq, const at::Tensor& max_exp_avg_sq, const at::Tensor& param2, double step,
               double lr, double beta1, double beta2, double eps, double weight_decay, bool amsgrad, bool adamw) {
  const char* op = "adam_step_";
  Step s = check_step(op, param, grad, param2);
  TORCH_CHECK(step >= 1, op, ": step counts from 1, got ", step);
  check_state(exp_avg, op, "exp_avg", param.numel());
  check_state(exp_avg_sq, op, "exp_avg_sq", param.numel());
  k::OptStepArgs a{};
  if (amsgrad) {
    check_state(max_exp_avg_sq, op, "max_exp_avg_sq", param.numel());
    a.state3 = max_exp_avg_sq.data_ptr<float>();
  }
  check_distinct(op, {{"param", &param}, {"param2", &param2}, {"exp_avg", &exp_avg}, {"exp_avg_sq", &exp_avg_sq},
                      {"max_exp_avg_sq", &max_exp_avg_sq}}, s.grad);
  fill_moments(a, s, param, param2, exp_avg, exp_avg_sq, beta1, beta2, eps, weight_decay);
  a.lr = static_cast<float>(lr);
  // Bias corrections and the step size in double, as torch.optim computes them in Python.
  a.bias_correction1 = static_cast<float>(1.0 - std::pow(beta1, step));
  a.step_size = static_cast<float>(lr / (1.0 - std::pow(beta1, step)));
  a.bias_correction2_sqrt = static_cast<float>(std::sqrt(1.0 - std::pow(beta2, step)));
  a.amsgrad = amsgrad;
  a.decoupled_weight_decay = adamw;
  run(IPEX_LITE_KERNEL_TABLE(optimizer_kernels).adam[s.mode][s.grad_bf16], a, param.numel());
}

void adagrad_step(const at::Tensor& param, const at::Tensor& grad, const at::Tensor& state_sum,
                  const at::Tensor& param2, double clr, double eps, double weight_decay) {
  const char* op = "adagrad_step_";
  Step s = check_step(op, param, grad, param2);
  check_state(state_sum, op, "state_sum", param.numel());
  check_distinct(op, {{"param", &param}, {"param2", &param2}, {"state_sum", &state_sum}}, s.grad);
  k::OptStepArgs a{};
  a.param = param.data_ptr();
  a.param2 = param2.numel() ? param2.data_ptr() : nullptr;
  a.grad = s.grad.data_ptr();
  a.state1 = state_sum.data_ptr<float>();
  a.lr = static_cast<float>(clr);
  a.eps = static_cast<float>(eps);
  a.weight_decay = static_cast<float>(weight_decay);
  run(IPEX_LITE_KERNEL_TABLE(optimizer_kernels).adagrad[s.mode][s.grad_bf16], a, param.numel());
}

// IPEX's Lamb: the Adam direction u scaled by the trust ratio ||w|| / ||u||
// (1 when either norm is 0).  Two passes: moments and both norms, then the
// update, which recomputes u rather than storing it.  The norms are summed
// over fixed blocks in block order, so the result does not depend on the
// thread count.
void lamb_step(const at::Tensor& param, const at::Tensor& grad, const at::Tensor& exp_avg,
               const at::Tensor& exp_avg_sq, const at::Tensor& param2, double step, double lr, double beta1,
               double beta2, double eps, double weight_decay) {
  const char* op = "lamb_step_";
  Step s = check_step(op, param, grad, param2);
  TORCH_CHECK(step >= 1, op, ": step counts from 1, got ", step);
  check_state(exp_avg, op, "exp_avg", param.numel());
  check_state(exp_avg_sq, op, "exp_avg_sq", param.numel());
  check_distinct(op, {{"param", &param}, {"param2", &param2}, {"exp_avg", &exp_avg}, {"exp_avg_sq", &exp_avg_sq}},
                 s.grad);
  k::OptStepArgs a{};
  fill_moments(a, s, param, param2, exp_avg, exp_avg_sq, beta1, beta2, eps, weight_decay);
  a.bias_correction1 = static_cast<float>(1.0 - std::pow(beta1, step));
  a.bias_correction2 = static_cast<float>(1.0 - std::pow(beta2, step));
  const int64_t n = param.numel();
  const int64_t blocks = (n + kGrain - 1) / kGrain;
  std::vector<double> sq(2 * blocks, 0.0);
  const auto& kt = IPEX_LITE_KERNEL_TABLE(optimizer_kernels);
  const auto moments = kt.lamb_moments[s.mode][s.grad_bf16];
  at::parallel_for(0, blocks, 1, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) moments(a, b * kGrain, std::min(n, (b + 1) * kGrain), &sq[2 * b]);
  });
  double wsq = 0, usq = 0;
  for (int64_t b = 0; b < blocks; ++b) {
    wsq += sq[2 * b];
    usq += sq[2 * b + 1];
  }
  const double ratio = (wsq > 0 && usq > 0) ? std::sqrt(wsq) / std::sqrt(usq) : 1.0;
  a.step_size = static_cast<float>(lr * ratio);
  run(kt.lamb_update[s.mode], a, n);
}

std::tuple<at::Tensor, at::Tensor> split_float_bfloat16(const at::Tensor& t) {
  const char* op = "split_float_bfloat16";
  check_cpu_dense(t, op, "tensor");
  TORCH_CHECK(t.scalar_type() == at::kFloat, op, ": expected a float32 tensor, got ", t.scalar_type());
  const at::Tensor src = t.contiguous();
  at::Tensor top = at::empty(t.sizes(), t.options().dtype(at::kBFloat16));
  at::Tensor trail = at::empty(t.sizes(), t.options().dtype(at::kBFloat16));
  const auto fn = IPEX_LITE_KERNEL_TABLE(optimizer_kernels).split;
  const float* s = src.data_ptr<float>();
  auto* hi = reinterpret_cast<uint16_t*>(top.data_ptr());
  auto* lo = reinterpret_cast<uint16_t*>(trail.data_ptr());
  at::parallel_for(0, t.numel(), kGrain, [&](int64_t b, int64_t e) { fn(s, hi, lo, b, e); });
  return {top, trail};
}

at::Tensor cat_bfloat16_float(const at::Tensor& top_in, const at::Tensor& trail_in) {
  const char* op = "cat_bfloat16_float";
  check_cpu_dense(top_in, op, "top");
  check_cpu_dense(trail_in, op, "trail");
  TORCH_CHECK(top_in.scalar_type() == at::kBFloat16 && trail_in.scalar_type() == at::kBFloat16, op,
              ": top and trail must be bfloat16, got ", top_in.scalar_type(), " and ", trail_in.scalar_type());
  TORCH_CHECK(top_in.sizes() == trail_in.sizes(), op, ": top has shape ", top_in.sizes(), " but trail has ",
              trail_in.sizes());
  const at::Tensor top = top_in.contiguous(), trail = trail_in.contiguous();
  at::Tensor out = at::empty(top.sizes(), top.options().dtype(at::kFloat));
  const auto fn = IPEX_LITE_KERNEL_TABLE(optimizer_kernels).join;
  const auto* hi = reinterpret_cast<const uint16_t*>(top.data_ptr());
  const auto* lo = reinterpret_cast<const uint16_t*>(trail.data_ptr());
  float* d = out.data_ptr<float>();
  at::parallel_for(0, top.numel(), kGrain, [&](int64_t b, int64_t e) { fn(hi, lo, d, b, e); });
  return out;
}

void packed_add(const at::Tensor& top, const at::Tensor& trail, const at::Tensor& grad_in, double alpha) {
  const char* op = "packed_add";
  check_in_place(top, op, "top", top.numel());
  check_in_place(trail, op, "trail", top.numel());
  TORCH_CHECK(top.scalar_type() == at::kBFloat16 && trail.scalar_type() == at::kBFloat16, op,
              ": top and trail must be bfloat16");
  TORCH_CHECK(top.sizes() == trail.sizes(), op, ": top and trail must have the same shape");
  check_distinct(op, {{"top", &top}, {"trail", &trail}}, grad_in.layout() == at::kStrided ? grad_in : at::Tensor());
  TORCH_CHECK(grad_in.defined() && grad_in.device().is_cpu(), op, ": grad must be a CPU tensor");
  TORCH_CHECK(grad_in.scalar_type() == at::kFloat || grad_in.scalar_type() == at::kBFloat16, op,
              ": grad must be float32 or bfloat16, got ", grad_in.scalar_type());
  TORCH_CHECK(grad_in.sizes() == top.sizes(), op, ": grad has shape ", grad_in.sizes(), " but top has ",
              top.sizes());
  const auto& kt = IPEX_LITE_KERNEL_TABLE(optimizer_kernels);
  auto* hi = reinterpret_cast<uint16_t*>(top.data_ptr());
  auto* lo = reinterpret_cast<uint16_t*>(trail.data_ptr());
  const float a = static_cast<float>(alpha);
  if (grad_in.layout() == at::kSparse) {
    // Row-sparse COO (as nn.Embedding(sparse=True) produces): rows of the
    // coalesced gradient are distinct, so they update in parallel.
    TORCH_CHECK(grad_in.sparse_dim() == 1 && top.dim() >= 1, op, ": sparse grad must be sparse along dim 0 only");
    const at::Tensor g = grad_in.coalesce();
    const at::Tensor rows = g._indices().select(0, 0).contiguous();
    const at::Tensor vals = g._values().contiguous();
    const int64_t row_len = top.numel() / std::max<int64_t>(top.size(0), 1);
    TORCH_CHECK(vals.numel() == rows.numel() * row_len, op, ": sparse grad values must hold one row of ", row_len,
                " elements per index");
    const int64_t* r = rows.data_ptr<int64_t>();
    // A sparse tensor built without invariant checks can carry any index.
    for (int64_t i = 0; i < rows.numel(); ++i)
      TORCH_CHECK(r[i] >= 0 && r[i] < top.size(0), op, ": sparse grad index ", r[i], " is out of range for ",
                  top.size(0), " rows");
    const char* v = static_cast<const char*>(vals.data_ptr());
    const int64_t vstride = row_len * vals.element_size();
    const auto fn = kt.packed_add[vals.scalar_type() == at::kBFloat16];
    at::parallel_for(0, rows.numel(), 64, [&](int64_t b, int64_t e) {
      for (int64_t i = b; i < e; ++i) {
        fn(hi + r[i] * row_len, lo + r[i] * row_len, v + i * vstride, a, 0, row_len);
      }
    });
    return;
  }
  TORCH_CHECK(grad_in.layout() == at::kStrided, op, ": grad must be dense or sparse COO");
  const at::Tensor g = grad_in.contiguous();
  const auto fn = kt.packed_add[g.scalar_type() == at::kBFloat16];
  const void* gp = g.data_ptr();
  at::parallel_for(0, top.numel(), kGrain, [&](int64_t b, int64_t e) { fn(hi, lo, gp, a, b, e); });
}

}  // namespace
}  // namespace ipex_lite

TORCH_LIBRARY_FRAGMENT(ipex_lite, m) {
  m.def("split_float_bfloat16(Tensor tensor) -> (Tensor, Tensor)");
  m.def("cat_bfloat16_float(Tensor top, Tensor trail) -> Tensor");
  m.def("packed_add(Tensor(a!) top, Tensor(b!) trail, Tensor grad, float alpha) -> ()");
  m.def(
      "sgd_step_(Tensor(a!) param, Tensor grad, Tensor(b!) momentum_buffer, Tensor(c!) param2, float lr, "
      "float momentum, float dampening, bool nesterov, float weight_decay, bool first_step) -> ()");
  m.def(
      "adam_step_(Tensor(a!) param, Tensor grad, Tensor(b!) exp_avg, Tensor(c!) exp_avg_sq, "
      "Tensor(d!) max_exp_avg_sq, Tensor(e!) param2, float step, float lr, float beta1, float beta2, float eps, "
      "float weight_decay, bool amsgrad, bool adamw) -> ()");
  m.def(
      "adagrad_step_(Tensor(a!) param, Tensor grad, Tensor(b!) state_sum, Tensor(c!) param2, float clr, float eps, "
      "float weight_decay) -> ()");
  m.def(
      "lamb_step_(Tensor(a!) param, Tensor grad, Tensor(b!) exp_avg, Tensor(c!) exp_avg_sq, Tensor(d!) param2, "
      "float step, float lr, float beta1, float beta2, float eps, float weight_decay) -> ()");
}

TORCH_LIBRARY_IMPL(ipex_lite, CPU, m) {
  m.impl("split_float_bfloat16", &ipex_lite::split_float_bfloat16);
  m.impl("cat_bfloat16_float", &ipex_lite::cat_bfloat16_float);
  m.impl("sgd_step_", &ipex_lite::sgd_step);
  m.impl("adam_step_", &ipex_lite::adam_step);
  m.impl("adagrad_step_", &ipex_lite::adagrad_step);
  m.impl("lamb_step_", &ipex_lite::lamb_step);
}

// packed_add takes dense or sparse gradients: one kernel for both layouts.
TORCH_LIBRARY_IMPL(ipex_lite, CompositeExplicitAutograd, m) {
  m.impl("packed_add", &ipex_lite::packed_add);
}
