// ipex_lite::winograd_conv2d: 3x3, stride-1 convolution through Winograd
// F(2x2, 3x3), fp32, inference.  Schema, input checks and the task split;
// the loops live in csrc/kernels/winograd_kernel.cpp.  The weight arrives
// already transformed (ipex_lite.nn.prepacked.winograd_weight), so a traced
// and frozen graph holds it as a plain constant.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/csrc/autograd/autograd_not_implemented_fallback.h>
#include <torch/library.h>

#include <optional>

#include "dispatch/isa.h"
#include "kernels/winograd_kernel.h"

IPEX_LITE_DECLARE_KERNEL_TABLE(WinogradKernels, winograd_kernels)

namespace ipex_lite {
namespace {

constexpr const char* kOp = "winograd_conv2d";

at::Tensor winograd_conv2d_cpu(const at::Tensor& input, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                               at::IntArrayRef padding, int64_t out_channels, c10::string_view attr) {
  TORCH_CHECK(input.device().is_cpu() && input.layout() == at::kStrided && weight.device().is_cpu() &&
                  weight.layout() == at::kStrided,
              kOp, ": input and weight must be dense CPU tensors");
  TORCH_CHECK(input.scalar_type() == at::kFloat && weight.scalar_type() == at::kFloat, kOp,
              ": input and weight must be float32, got ", input.scalar_type(), " and ", weight.scalar_type());
  TORCH_CHECK(input.dim() == 4, kOp, ": input must be 4-D (N, C, H, W), got shape ", input.sizes());
  TORCH_CHECK(out_channels > 0, kOp, ": out_channels must be positive, got ", out_channels);
  TORCH_CHECK(weight.dim() == 4 && weight.size(0) == 16 && weight.size(1) == (out_channels + 63) / 64 &&
                  weight.size(2) == input.size(1) && weight.size(3) == 64,
              kOp, ": weight must be the (16, ", (out_channels + 63) / 64, ", ", input.size(1),
              ", 64) Winograd transform (ipex_lite.nn.prepacked.winograd_weight), got shape ", weight.sizes());
  TORCH_CHECK(padding.size() == 2 && padding[0] >= 0 && padding[1] >= 0, kOp,
              ": padding must be two non-negative values, got ", padding);
  TORCH_CHECK(attr == "none" || attr == "relu", kOp, ": attr must be \"none\" or \"relu\", got \"", attr, "\"");
  const int64_t n = input.size(0), c = input.size(1), h = input.size(2), w = input.size(3), k = out_channels;
  const int64_t out_h = h + 2 * padding[0] - 2, out_w = w + 2 * padding[1] - 2;
  TORCH_CHECK(out_h > 0 && out_w > 0, kOp, ": input of spatial size ", h, "x", w, " with padding ", padding,
              " is smaller than the 3x3 kernel");
  const bool has_bias = bias.has_value() && bias->defined();
  if (has_bias)
    TORCH_CHECK(bias->device().is_cpu() && bias->scalar_type() == at::kFloat && bias->dim() == 1 &&
                    bias->size(0) == k,
                kOp, ": bias must be a float32 CPU tensor of shape (", k, "), got ", bias->sizes());

  at::Tensor out = at::empty({n, k, out_h, out_w}, input.options().memory_format(at::MemoryFormat::ChannelsLast));
  if (out.numel() == 0) return out;
  if (c == 0) {  // no input channels: every output pixel is the bias
    if (!has_bias) return out.zero_();
    out.copy_(bias->view({1, k, 1, 1}).expand_as(out));
    return attr == "relu" ? out.relu_() : out;
  }
  const at::Tensor x = input.contiguous(at::MemoryFormat::ChannelsLast);
  const at::Tensor u = weight.contiguous();
  const at::Tensor b = has_bias ? bias->contiguous() : at::Tensor();

  kernels::WinogradArgs a{};
  a.x = x.data_ptr<float>();
  a.u = u.data_ptr<float>();
  a.bias = has_bias ? b.data_ptr<float>() : nullptr;
  a.out = out.data_ptr<float>();
  a.n = n;
  a.h = h;
  a.w = w;
  a.c = c;
  a.k = k;
  a.pad_h = padding[0];
  a.pad_w = padding[1];
  a.out_h = out_h;
  a.out_w = out_w;
  a.relu = attr == "relu";
  // Blocking.  U (16 x C x K floats) is read once per block of tiles.  While it fits in L2
  // (<= 1 MB: ResNet's 64- and 128-channel layers) blocks of up to 48 tiles keep every
  // operand there.  Larger U would be streamed from L3 once per block (at 48 tiles, 9 and 3
  // times per call on ResNet-50's layer3/layer4, slower than oneDNN on layer4), so those
  // layers take few large blocks (<= 256 tiles) and split the output channels instead.
  // Tiles spread evenly over the blocks; ~2 tasks per thread.
  const int64_t tiles = n * ((out_h + 1) / 2) * ((out_w + 1) / 2);
  const int64_t threads = at::get_num_threads();
  const bool u_in_l2 = 16 * c * k * 4 <= (int64_t(1) << 20);
  const int64_t blocks = (tiles + (u_in_l2 ? 47 : 255)) / (u_in_l2 ? 48 : 256);
  a.tile_block = (tiles + blocks - 1) / blocks;
  const int64_t chunks_wanted = std::max<int64_t>(1, (2 * threads + blocks - 1) / blocks);
  a.k_chunk = std::max<int64_t>(64, ((k + chunks_wanted - 1) / chunks_wanted + 63) / 64 * 64);
  // and the chunk's products (16 x tiles x k_chunk floats) within ~2 MB of scratch
  a.k_chunk = std::min(a.k_chunk, std::max<int64_t>(64, (int64_t(1) << 21) / (64 * a.tile_block) / 64 * 64));
  if (a.k_chunk >= k) a.k_chunk = k;
  const int64_t tasks = blocks * ((k + a.k_chunk - 1) / a.k_chunk);
  const auto fn = IPEX_LITE_KERNEL_TABLE(winograd_kernels).forward;
  const int64_t scratch_bytes = kernels::winograd_scratch_bytes(a.tile_block, c, a.k_chunk);
  // grain 1: each thread gets one contiguous run of tasks, so the output
  // channel chunks of a block reuse its transformed input.
  at::parallel_for(0, tasks, 1, [&](int64_t begin, int64_t end) {
    at::Tensor scratch = at::empty({scratch_bytes}, at::TensorOptions().dtype(at::kByte));
    fn(a, begin, end, scratch.data_ptr());
  });
  return out;
}

}  // namespace
}  // namespace ipex_lite

TORCH_LIBRARY_FRAGMENT(ipex_lite, m) {
  m.def("winograd_conv2d(Tensor input, Tensor weight, Tensor? bias, int[2] padding, int out_channels, str attr) -> Tensor");
}

TORCH_LIBRARY_IMPL(ipex_lite, CompositeExplicitAutograd, m) {
  m.impl("winograd_conv2d", &ipex_lite::winograd_conv2d_cpu);
}

// Inference only: a gradient through it raises instead of being silently zero.
TORCH_LIBRARY_IMPL(ipex_lite, Autograd, m) {
  m.impl("winograd_conv2d", torch::autograd::autogradNotImplementedFallback());
}
