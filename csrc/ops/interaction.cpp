// ipex_lite::interaction_forward / interaction_backward: schema, input
// checks, CPU and AutocastCPU implementations.  The loops live in
// csrc/kernels/interaction_kernel.cpp (one copy per ISA level).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/autocast_mode.h>
#include <torch/csrc/autograd/autograd_not_implemented_fallback.h>
#include <torch/library.h>

#include <algorithm>
#include <vector>

#include "dispatch/isa.h"
#include "kernels/interaction_kernel.h"

IPEX_LITE_DECLARE_KERNEL_TABLE(InteractionKernels, interaction_kernels)

namespace ipex_lite {
namespace {

using kernels::KernelDtype;

KernelDtype kernel_dtype(at::ScalarType t) {
  switch (t) {
    case at::kFloat: return kernels::kF32;
    case at::kBFloat16: return kernels::kBF16;
    case at::kDouble: return kernels::kF64;
    default: TORCH_CHECK(false, "unreachable dtype ", t);
  }
}

// Checks the list and returns the tensors with unit stride along D (a copy
// only for inputs whose last dimension is strided; row strides are free).
std::vector<at::Tensor> checked_inputs(const char* op, at::TensorList inputs) {
  TORCH_CHECK(!inputs.empty(), op, ": inputs must hold at least one tensor");
  const at::Tensor& first = inputs[0];
  std::vector<at::Tensor> out;
  out.reserve(inputs.size());
  for (size_t i = 0; i < inputs.size(); ++i) {
    const at::Tensor& t = inputs[i];
    TORCH_CHECK(t.defined(), op, ": inputs[", i, "] is undefined");
    TORCH_CHECK(t.device().is_cpu(), op, ": inputs[", i, "] is on ", t.device(), "; only CPU tensors are supported");
    TORCH_CHECK(t.layout() == at::kStrided, op, ": inputs[", i, "] must be a dense (strided) tensor, got ",
                t.layout());
    TORCH_CHECK(t.dim() == 2, op, ": inputs[", i, "] must be 2-D (batch, dim), got shape ", t.sizes());
    const auto dt = t.scalar_type();
    TORCH_CHECK(dt == at::kFloat || dt == at::kBFloat16 || dt == at::kDouble, op, ": inputs[", i,
                "] has dtype ", dt, "; expected float32, bfloat16 or float64");
    TORCH_CHECK(dt == first.scalar_type(), op, ": inputs[", i, "] has dtype ", dt, " but inputs[0] has ",
                first.scalar_type(), "; all inputs must share one dtype");
    TORCH_CHECK(t.size(0) == first.size(0), op, ": inputs[", i, "] has batch size ", t.size(0),
                " but inputs[0] has ", first.size(0));
    TORCH_CHECK(t.size(1) == first.size(1), op, ": inputs[", i, "] has dim ", t.size(1), " but inputs[0] has ",
                first.size(1));
    out.push_back(t.size(1) > 1 && t.stride(1) != 1 ? t.contiguous() : t);
  }
  return out;
}

struct RowPointers {
  std::vector<const void*> data;
  std::vector<int64_t> strides;
  explicit RowPointers(const std::vector<at::Tensor>& ts) {
    for (const auto& t : ts) {
      data.push_back(t.data_ptr());
      strides.push_back(t.size(0) > 1 ? t.stride(0) : 0);
    }
  }
};

// Samples per task: enough work to amortise the scratch allocation.
constexpr int64_t kGrain = 16;

at::Tensor interaction_forward_cpu(at::TensorList inputs_in) {
  const auto inputs = checked_inputs("interaction_forward", inputs_in);
  const int64_t n = static_cast<int64_t>(inputs.size());
  const int64_t batch = inputs[0].size(0), d = inputs[0].size(1);
  at::Tensor out = at::empty({batch, d + n * (n - 1) / 2}, inputs[0].options());
  if (batch == 0 || out.numel() == 0) return out;
  if (d == 0) return out.zero_();  // empty dot products; the inputs hold no data to read

  const RowPointers rp(inputs);
  kernels::InteractionFwdArgs args{rp.data.data(), rp.strides.data(), n, d, out.data_ptr()};
  const auto fn = IPEX_LITE_KERNEL_TABLE(interaction_kernels).forward[kernel_dtype(out.scalar_type())];
  const int64_t scratch_bytes = kernels::interaction_fwd_scratch_bytes(n, d);
  at::parallel_for(0, batch, kGrain, [&](int64_t begin, int64_t end) {
    at::Tensor scratch = at::empty({scratch_bytes}, at::TensorOptions().dtype(at::kByte));
    fn(args, begin, end, scratch.data_ptr());
  });
  return out;
}

// Writes the N input gradients through grad_ptrs (each a contiguous (B, D) block).
void interaction_backward_into(const at::Tensor& grad_out_in, const std::vector<at::Tensor>& inputs,
                               const std::vector<void*>& grad_ptrs) {
  const int64_t n = static_cast<int64_t>(inputs.size());
  const int64_t batch = inputs[0].size(0), d = inputs[0].size(1);
  if (batch == 0 || d == 0) return;
  const int64_t cols = d + n * (n - 1) / 2;
  const at::Tensor grad_out = cols > 1 && grad_out_in.stride(1) != 1 ? grad_out_in.contiguous() : grad_out_in;
  const RowPointers rp(inputs);
  // As in the embedding forward: once each thread's share of the gradients
  // outgrows half its L2, skip reading their lines before overwriting them.
  const int64_t grad_bytes = n * batch * d * static_cast<int64_t>(inputs[0].element_size());
  const bool stream = grad_bytes / std::max<int64_t>(1, at::get_num_threads()) > (int64_t(1) << 20);
  kernels::InteractionBwdArgs args{grad_out.data_ptr(), batch > 1 ? grad_out.stride(0) : 0, rp.data.data(),
                                   rp.strides.data(), grad_ptrs.data(), n, d, stream};
  const auto fn = IPEX_LITE_KERNEL_TABLE(interaction_kernels).backward[kernel_dtype(grad_out.scalar_type())];
  const int64_t scratch_bytes = kernels::interaction_bwd_scratch_bytes(n, d);
  at::parallel_for(0, batch, kGrain, [&](int64_t begin, int64_t end) {
    at::Tensor scratch = at::empty({scratch_bytes}, at::TensorOptions().dtype(at::kByte));
    fn(args, begin, end, scratch.data_ptr());
  });
}

std::vector<at::Tensor> checked_backward_inputs(const at::Tensor& grad_out, at::TensorList inputs_in, const char* op) {
  auto inputs = checked_inputs(op, inputs_in);
  const int64_t n = static_cast<int64_t>(inputs.size());
  const int64_t batch = inputs[0].size(0), cols = inputs[0].size(1) + n * (n - 1) / 2;
  TORCH_CHECK(grad_out.defined() && grad_out.device().is_cpu() && grad_out.layout() == at::kStrided, op,
              ": grad_out must be a dense CPU tensor");
  TORCH_CHECK(grad_out.dim() == 2 && grad_out.size(0) == batch && grad_out.size(1) == cols, op,
              ": grad_out must have shape (", batch, ", ", cols, "), got ", grad_out.sizes());
  TORCH_CHECK(grad_out.scalar_type() == inputs[0].scalar_type(), op, ": grad_out has dtype ",
              grad_out.scalar_type(), " but the inputs have ", inputs[0].scalar_type());
  return inputs;
}

std::vector<at::Tensor> interaction_backward_cpu(const at::Tensor& grad_out, at::TensorList inputs_in) {
  const auto inputs = checked_backward_inputs(grad_out, inputs_in, "interaction_backward");
  std::vector<at::Tensor> grads;
  std::vector<void*> grad_ptrs;
  for (const auto& t : inputs) {
    grads.push_back(at::empty(t.sizes(), t.options()));
    grad_ptrs.push_back(grads.back().data_ptr());
  }
  interaction_backward_into(grad_out, inputs, grad_ptrs);
  return grads;
}

// All N gradients in one (N, B, D) tensor; autograd hands out its rows as
// views. N separate ~1 MB blocks leave glibc's trim threshold at ~2 MB, so
// the heap top goes back to the OS after each step and the next step
// page-faults every gradient in again (measured: 4.2 ms steps becoming 13 ms).
// A separate op because a Tensor[] return may not hold aliasing views.
at::Tensor interaction_backward_stacked_cpu(const at::Tensor& grad_out, at::TensorList inputs_in) {
  const auto inputs = checked_backward_inputs(grad_out, inputs_in, "interaction_backward_stacked");
  const int64_t n = static_cast<int64_t>(inputs.size());
  at::Tensor grads = at::empty({n, inputs[0].size(0), inputs[0].size(1)}, inputs[0].options());
  std::vector<void*> grad_ptrs;
  const int64_t block_bytes = grads.numel() / std::max<int64_t>(n, 1) * grads.element_size();
  for (int64_t i = 0; i < n; ++i) grad_ptrs.push_back(static_cast<char*>(grads.data_ptr()) + i * block_bytes);
  interaction_backward_into(grad_out, inputs, grad_ptrs);
  return grads;
}

// Under autocast(cpu, bf16) the interaction runs in the autocast dtype, as in
// IPEX: the op is memory-bound, so halving the bytes is the win.
at::Tensor interaction_forward_autocast(at::TensorList inputs) {
  c10::impl::ExcludeDispatchKeyGuard no_autocast(c10::DispatchKey::AutocastCPU);
  const auto dtype = at::autocast::get_autocast_dtype(at::kCPU);
  std::vector<at::Tensor> cast;
  cast.reserve(inputs.size());
  // The kernels have no fp16 path: under an fp16 autocast the inputs pass as they are.
  for (const auto& t : inputs)
    cast.push_back(dtype == at::kBFloat16 ? at::autocast::cached_cast(dtype, t, c10::DeviceType::CPU) : t);
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("ipex_lite::interaction_forward", "")
                             .typed<at::Tensor(at::TensorList)>();
  return op.call(cast);
}

}  // namespace
}  // namespace ipex_lite

TORCH_LIBRARY_FRAGMENT(ipex_lite, m) {
  m.def("interaction_forward(Tensor[] inputs) -> Tensor");
  m.def("interaction_backward(Tensor grad_out, Tensor[] inputs) -> Tensor[]");
  m.def("interaction_backward_stacked(Tensor grad_out, Tensor[] inputs) -> Tensor");
}

// CompositeExplicitAutograd serves CPU tensors, and also an empty list (no
// dispatch key: the dispatcher would report a missing fallback instead of our
// argument error) and tensors on other devices ("only CPU tensors" error).
TORCH_LIBRARY_IMPL(ipex_lite, CompositeExplicitAutograd, m) {
  m.impl("interaction_forward", &ipex_lite::interaction_forward_cpu);
  m.impl("interaction_backward", &ipex_lite::interaction_backward_cpu);
  m.impl("interaction_backward_stacked", &ipex_lite::interaction_backward_stacked_cpu);
}

// Double backward is not implemented: raise instead of autograd's default of
// warning and treating the gradient as constant (silently wrong 2nd order).
TORCH_LIBRARY_IMPL(ipex_lite, Autograd, m) {
  m.impl("interaction_backward", torch::autograd::autogradNotImplementedFallback());
  m.impl("interaction_backward_stacked", torch::autograd::autogradNotImplementedFallback());
}

TORCH_LIBRARY_IMPL(ipex_lite, AutocastCPU, m) {
  m.impl("interaction_forward", &ipex_lite::interaction_forward_autocast);
}
