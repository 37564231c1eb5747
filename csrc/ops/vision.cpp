// Detection ops: FrozenBatchNorm2d's affine and ROIAlign (torchvision's
// semantics).  Checks and work split here; loops in csrc/kernels/vision_kernel.cpp.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cmath>
#include <vector>

#include "dispatch/isa.h"
#include "kernels/vision_kernel.h"

IPEX_LITE_DECLARE_KERNEL_TABLE(VisionKernels, vision_kernels)

namespace ipex_lite {
namespace {

namespace k = kernels;

void check_cpu(const at::Tensor& t, const char* op, const char* name) {
  TORCH_CHECK(t.defined(), op, ": ", name, " is undefined");
  TORCH_CHECK(t.device().is_cpu(), op, ": ", name, " must be a CPU tensor, got ", t.device());
  TORCH_CHECK(t.layout() == at::kStrided, op, ": ", name, " must be dense, got ", t.layout());
}

// ---------------------------------------------------------------- FrozenBatchNorm2d
at::Tensor frozen_batch_norm(const at::Tensor& input, const at::Tensor& weight, const at::Tensor& bias,
                             const at::Tensor& running_mean, const at::Tensor& running_var, double eps) {
  const char* op = "frozen_batch_norm";
  check_cpu(input, op, "input");
  TORCH_CHECK(input.dim() >= 2, op, ": input must have a channel dimension (N, C, ...), got shape ", input.sizes());
  TORCH_CHECK(input.scalar_type() == at::kFloat || input.scalar_type() == at::kBFloat16 ||
              input.scalar_type() == at::kDouble, op, ": input must be float32, bfloat16 or float64, got ",
              input.scalar_type());
  const int64_t C = input.size(1);
  for (const auto& [t, name] : {std::pair{&weight, "weight"}, std::pair{&bias, "bias"},
                                std::pair{&running_mean, "running_mean"}, std::pair{&running_var, "running_var"}}) {
    check_cpu(*t, op, name);
    TORCH_CHECK(t->dim() == 1 && t->numel() == C, op, ": ", name, " must have shape (", C, "), got ", t->sizes());
    TORCH_CHECK(t->is_floating_point(), op, ": ", name, " must be floating point, got ", t->scalar_type());
  }
  TORCH_CHECK(std::isfinite(eps) && eps >= 0, op, ": eps must be finite and >= 0, got ", eps);
  // per-channel y = x * scale + shift, in fp32 (torchvision computes the same two vectors)
  const at::Tensor scale = (weight.to(at::kFloat) * (running_var.to(at::kFloat) + eps).rsqrt()).contiguous();
  const at::Tensor shift = (bias.to(at::kFloat) - running_mean.to(at::kFloat) * scale).contiguous();
  if (input.scalar_type() == at::kDouble) {  // gradcheck precision: plain ATen arithmetic
    std::vector<int64_t> shape(input.dim(), 1);
    shape[1] = C;
    const at::Tensor sc = weight.to(at::kDouble) * (running_var.to(at::kDouble) + eps).rsqrt();
    return input * sc.view(shape) + (bias.to(at::kDouble) - running_mean.to(at::kDouble) * sc).view(shape);
  }
  const bool cl = input.dim() == 4 && !input.is_contiguous() && input.is_contiguous(at::MemoryFormat::ChannelsLast);
  const at::Tensor x = cl ? input : input.contiguous();
  at::Tensor y = at::empty_like(x, cl ? at::MemoryFormat::ChannelsLast : at::MemoryFormat::Contiguous);
  if (x.numel() == 0) return y;
  const auto& kt = IPEX_LITE_KERNEL_TABLE(vision_kernels);
  const int bf16 = x.scalar_type() == at::kBFloat16;
  const float* a = scale.data_ptr<float>();
  const float* b = shift.data_ptr<float>();
  const void* xp = x.data_ptr();
  void* yp = y.data_ptr();
  if (cl) {
    const int64_t pixels = x.numel() / C;
    at::parallel_for(0, pixels, std::max<int64_t>(1, 16384 / C), [&](int64_t p0, int64_t p1) {
      kt.affine_nhwc[bf16](xp, yp, a, b, C, p0, p1);
    });
  } else {
    const int64_t hw = x.numel() / (x.size(0) * C);
    at::parallel_for(0, x.size(0) * C, std::max<int64_t>(1, 16384 / std::max<int64_t>(hw, 1)),
                     [&](int64_t p0, int64_t p1) { kt.affine_nchw[bf16](xp, yp, a, b, C, hw, p0, p1); });
  }
  return y;
}

// ---------------------------------------------------------------- ROIAlign
k::RoiAlignShape roi_shape(const char* op, int64_t C, int64_t H, int64_t W, double spatial_scale, int64_t pooled_h,
                           int64_t pooled_w, int64_t sampling_ratio, bool aligned, bool channels_last) {
  TORCH_CHECK(pooled_h > 0 && pooled_w > 0, op, ": output_size must be positive, got (", pooled_h, ", ",
              pooled_w, ")");
  TORCH_CHECK(std::isfinite(spatial_scale) && spatial_scale > 0, op, ": spatial_scale must be positive and finite, "
              "got ", spatial_scale);
  return {C, H, W, pooled_h, pooled_w, sampling_ratio, spatial_scale, aligned, channels_last};
}

// rois (K, 5) in the compute dtype, with batch indices and coordinates validated.
at::Tensor checked_rois(const char* op, const at::Tensor& rois, at::ScalarType dtype, int64_t batch) {
  check_cpu(rois, op, "rois");
  TORCH_CHECK(rois.dim() == 2 && rois.size(1) == 5, op, ": rois must have shape (K, 5) = (batch index, x1, y1, x2, "
              "y2), got ", rois.sizes());
  TORCH_CHECK(rois.is_floating_point(), op, ": rois must be floating point, got ", rois.scalar_type());
  at::Tensor r = rois.to(dtype).contiguous();
  if (r.size(0) == 0) return r;
  TORCH_CHECK(at::isfinite(r).all().item<bool>(), op, ": rois contain NaN or infinite values");
  const at::Tensor idx = r.select(1, 0);
  TORCH_CHECK((idx == idx.floor()).all().item<bool>(), op, ": rois[:, 0] (batch index) must be whole numbers");
  const double lo = idx.min().item<double>(), hi = idx.max().item<double>();
  TORCH_CHECK(lo >= 0 && hi < static_cast<double>(batch), op, ": rois[:, 0] (batch index) must lie in [0, ", batch,
              "), got values in [", lo, ", ", hi, "]");
  return r;
}

at::ScalarType compute_type(const at::Tensor& t) {
  return t.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}

at::Tensor roi_align_forward(const at::Tensor& input, const at::Tensor& rois, double spatial_scale,
                             int64_t pooled_height, int64_t pooled_width, int64_t sampling_ratio, bool aligned) {
  const char* op = "roi_align_forward";
  check_cpu(input, op, "input");
  TORCH_CHECK(input.dim() == 4, op, ": input must be (N, C, H, W), got shape ", input.sizes());
  const auto st = input.scalar_type();
  TORCH_CHECK(st == at::kFloat || st == at::kDouble || st == at::kBFloat16, op,
              ": input must be float32, float64 or bfloat16, got ", st);
  const auto ct = compute_type(input);
  const bool cl = !input.is_contiguous() && input.is_contiguous(at::MemoryFormat::ChannelsLast);
  const at::Tensor x = input.to(ct).contiguous(cl ? at::MemoryFormat::ChannelsLast : at::MemoryFormat::Contiguous);
  const at::Tensor r = checked_rois(op, rois, ct, input.size(0));
  const auto s = roi_shape(op, input.size(1), input.size(2), input.size(3), spatial_scale, pooled_height,
                           pooled_width, sampling_ratio, aligned, cl);
  // a channels_last input gives a channels_last output, as torchvision's and IPEX's do
  at::Tensor out = at::empty({r.size(0), s.channels, pooled_height, pooled_width}, x.options(),
                             cl ? at::MemoryFormat::ChannelsLast : at::MemoryFormat::Contiguous).zero_();
  if (r.size(0) > 0 && s.channels > 0 && s.height > 0 && s.width > 0) {
    const auto& kt = IPEX_LITE_KERNEL_TABLE(vision_kernels);
    if (ct == at::kDouble) {
      const auto fn = kt.roi_align_f64.forward;
      at::parallel_for(0, r.size(0), 1, [&](int64_t b, int64_t e) {
        fn(x.data_ptr<double>(), r.data_ptr<double>(), out.data_ptr<double>(), s, b, e);
      });
    } else {
      const auto fn = kt.roi_align_f32.forward;
      at::parallel_for(0, r.size(0), 1, [&](int64_t b, int64_t e) {
        fn(x.data_ptr<float>(), r.data_ptr<float>(), out.data_ptr<float>(), s, b, e);
      });
    }
  }
  return st == ct ? out : out.to(st);
}

at::Tensor roi_align_backward(const at::Tensor& grad, const at::Tensor& rois, double spatial_scale,
                              int64_t pooled_height, int64_t pooled_width, int64_t batch_size, int64_t channels,
                              int64_t height, int64_t width, int64_t sampling_ratio, bool aligned,
                              bool channels_last) {
  const char* op = "roi_align_backward";
  check_cpu(grad, op, "grad");
  TORCH_CHECK(batch_size >= 0 && channels >= 0 && height >= 0 && width >= 0, op, ": negative input size");
  TORCH_CHECK(grad.dim() == 4 && grad.size(1) == channels && grad.size(2) == pooled_height &&
              grad.size(3) == pooled_width, op, ": grad must be (K, ", channels, ", ", pooled_height, ", ",
              pooled_width, "), got ", grad.sizes());
  const auto st = grad.scalar_type();
  const auto ct = compute_type(grad);
  const at::Tensor g =
      grad.to(ct).contiguous(channels_last ? at::MemoryFormat::ChannelsLast : at::MemoryFormat::Contiguous);
  const at::Tensor r = checked_rois(op, rois, ct, batch_size);
  TORCH_CHECK(r.size(0) == g.size(0), op, ": grad has ", g.size(0), " rows but there are ", r.size(0), " rois");
  const auto s = roi_shape(op, channels, height, width, spatial_scale, pooled_height, pooled_width, sampling_ratio,
                           aligned, channels_last);
  at::Tensor gin = at::empty({batch_size, channels, height, width}, g.options(),
                             channels_last ? at::MemoryFormat::ChannelsLast : at::MemoryFormat::Contiguous).zero_();
  if (r.size(0) > 0 && channels > 0 && height > 0 && width > 0) {
    const auto& kt = IPEX_LITE_KERNEL_TABLE(vision_kernels);
    // split by channels: each thread owns its channels of grad_input (no races, fixed sum order)
    const int64_t grain = std::max<int64_t>(1, channels_last ? 16 : 1);
    if (ct == at::kDouble) {
      const auto fn = kt.roi_align_f64.backward;
      at::parallel_for(0, channels, grain, [&](int64_t b, int64_t e) {
        fn(g.data_ptr<double>(), r.data_ptr<double>(), gin.data_ptr<double>(), s, r.size(0), b, e);
      });
    } else {
      const auto fn = kt.roi_align_f32.backward;
      at::parallel_for(0, channels, grain, [&](int64_t b, int64_t e) {
        fn(g.data_ptr<float>(), r.data_ptr<float>(), gin.data_ptr<float>(), s, r.size(0), b, e);
      });
    }
  }
  return st == ct ? gin : gin.to(st);
}

}  // namespace
}  // namespace ipex_lite

TORCH_LIBRARY_FRAGMENT(ipex_lite, m) {
  m.def(
      "frozen_batch_norm(Tensor input, Tensor weight, Tensor bias, Tensor running_mean, Tensor running_var, "
      "float eps) -> Tensor");
  m.def(
      "roi_align_forward(Tensor input, Tensor rois, float spatial_scale, int pooled_height, int pooled_width, "
      "int sampling_ratio, bool aligned) -> Tensor");
  m.def(
      "roi_align_backward(Tensor grad, Tensor rois, float spatial_scale, int pooled_height, int pooled_width, "
      "int batch_size, int channels, int height, int width, int sampling_ratio, bool aligned, bool channels_last) "
      "-> Tensor");
}

TORCH_LIBRARY_IMPL(ipex_lite, CPU, m) {
  m.impl("frozen_batch_norm", &ipex_lite::frozen_batch_norm);
  m.impl("roi_align_forward", &ipex_lite::roi_align_forward);
  m.impl("roi_align_backward", &ipex_lite::roi_align_backward);
}
