// ipex_lite::max_pool2d: inference max pooling on channels-last fp32/bf16
// tensors without the int64 indices torch's CPU kernel always writes (for
// ResNet-50's stem pool, indices are twice the fp32 output's bytes).
// Schema, input checks and the row split; loops in csrc/kernels/pooling_kernel.cpp.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/csrc/autograd/autograd_not_implemented_fallback.h>
#include <torch/library.h>

#include "dispatch/isa.h"
#include "kernels/pooling_kernel.h"

IPEX_LITE_DECLARE_KERNEL_TABLE(PoolingKernels, pooling_kernels)

namespace ipex_lite {
namespace {

constexpr const char* kOp = "max_pool2d";

// torch's pooling output size (floor, or ceil with the last window starting inside the input).
int64_t pooled_size(int64_t in, int64_t k, int64_t s, int64_t p, int64_t d, bool ceil_mode) {
  const int64_t num = in + 2 * p - d * (k - 1) - 1 + (ceil_mode ? s - 1 : 0);
  int64_t out = (num >= 0 ? num / s : -((-num + s - 1) / s)) + 1;
  if (ceil_mode && (out - 1) * s >= in + p) --out;
  return out;
}

at::Tensor max_pool2d_cpu(const at::Tensor& input, at::IntArrayRef kernel_size, at::IntArrayRef stride,
                          at::IntArrayRef padding, at::IntArrayRef dilation, bool ceil_mode) {
  TORCH_CHECK(input.device().is_cpu() && input.layout() == at::kStrided, kOp, ": input must be a dense CPU tensor");
  TORCH_CHECK(input.scalar_type() == at::kFloat || input.scalar_type() == at::kBFloat16, kOp,
              ": input must be float32 or bfloat16, got ", input.scalar_type());
  TORCH_CHECK(input.dim() == 4, kOp, ": input must be 4-D (N, C, H, W), got shape ", input.sizes());
  for (auto [name, v] : {std::pair<const char*, at::IntArrayRef>{"kernel_size", kernel_size}, {"stride", stride},
                         {"padding", padding}, {"dilation", dilation}})
    TORCH_CHECK(v.size() == 2, kOp, ": ", name, " must hold 2 values, got ", v);
  for (int i = 0; i < 2; ++i) {
    TORCH_CHECK(kernel_size[i] > 0 && stride[i] > 0 && dilation[i] > 0, kOp,
                ": kernel_size, stride and dilation must be positive, got ", kernel_size, ", ", stride, ", ", dilation);
    TORCH_CHECK(padding[i] >= 0 && padding[i] <= kernel_size[i] / 2, kOp,
                ": padding must be non-negative and at most half the kernel size, got ", padding, " for kernel ",
                kernel_size);
  }
  const int64_t n = input.size(0), c = input.size(1), h = input.size(2), w = input.size(3);
  const int64_t out_h = pooled_size(h, kernel_size[0], stride[0], padding[0], dilation[0], ceil_mode);
  const int64_t out_w = pooled_size(w, kernel_size[1], stride[1], padding[1], dilation[1], ceil_mode);
  TORCH_CHECK(out_h > 0 && out_w > 0, kOp, ": input of spatial size ", h, "x", w, " is too small for kernel ",
              kernel_size, " with dilation ", dilation, " and padding ", padding);
  at::Tensor out = at::empty({n, c, out_h, out_w}, input.options().memory_format(at::MemoryFormat::ChannelsLast));
  if (out.numel() == 0) return out;
  const at::Tensor x = input.contiguous(at::MemoryFormat::ChannelsLast);
  kernels::MaxPoolArgs a{x.data_ptr(), out.data_ptr(), h, w, c, out_h, out_w,
                         {kernel_size[0], kernel_size[1]}, {stride[0], stride[1]},
                         {padding[0], padding[1]}, {dilation[0], dilation[1]}};
  const auto fn = IPEX_LITE_KERNEL_TABLE(pooling_kernels)
                      .max_pool2d[input.scalar_type() == at::kFloat ? kernels::kF32 : kernels::kBF16];
  at::parallel_for(0, n * out_h, 1, [&](int64_t begin, int64_t end) { fn(a, begin, end); });
  return out;
}

}  // namespace
}  // namespace ipex_lite

TORCH_LIBRARY_FRAGMENT(ipex_lite, m) {
  m.def("max_pool2d(Tensor input, int[2] kernel_size, int[2] stride, int[2] padding, int[2] dilation, "
        "bool ceil_mode) -> Tensor");
}

TORCH_LIBRARY_IMPL(ipex_lite, CompositeExplicitAutograd, m) {
  m.impl("max_pool2d", &ipex_lite::max_pool2d_cpu);
}

// Inference only: a gradient through it raises instead of being silently zero.
TORCH_LIBRARY_IMPL(ipex_lite, Autograd, m) {
  m.impl("max_pool2d", torch::autograd::autogradNotImplementedFallback());
}
