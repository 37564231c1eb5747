// Weight-only quantized Linear (ipex_lite.quantization's WoqLinear): schema, checks, and the split between
// the decode kernel (few rows: the packed weights are streamed once and dequantized in registers) and the
// prefill path (many rows: rows of the weight are dequantized to bf16 and handed to oneDNN's GEMM).
// Loops in csrc/kernels/woq_kernel.cpp.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/csrc/autograd/autograd_not_implemented_fallback.h>
#include <torch/library.h>

#include <algorithm>
#include <optional>

#include "dispatch/isa.h"
#include "kernels/woq_kernel.h"

IPEX_LITE_DECLARE_KERNEL_TABLE(WoqKernels, woq_kernels)

namespace ipex_lite {
namespace {

// Rows up to which the GEMV kernel runs; above, a dequantized GEMM.
constexpr int64_t kMaxGemvRows = 8;

struct Packed {
  int64_t n, k, kp, group, groups, bits;
};

Packed check_packed(const char* op, const at::Tensor& qweight, const at::Tensor& scales,
                    const std::optional<at::Tensor>& zeros, int64_t bits, int64_t in_features, int64_t group_size) {
  TORCH_CHECK(bits == 4 || bits == 8, op, ": bits must be 4 or 8, got ", bits);
  TORCH_CHECK(in_features > 0, op, ": in_features must be positive, got ", in_features);
  Packed p{};
  p.bits = bits;
  p.k = in_features;
  p.kp = (in_features + 31) / 32 * 32;
  p.group = group_size <= 0 ? p.kp : group_size;
  TORCH_CHECK(p.group % 32 == 0 && p.kp % p.group == 0, op, ": group_size ", group_size,
              " must be a multiple of 32 dividing the padded input size ", p.kp, " (or -1 for one group per row)");
  p.groups = p.kp / p.group;
  for (auto [t, name] : {std::pair<const at::Tensor&, const char*>{qweight, "qweight"}, {scales, "scales"}}) {
    TORCH_CHECK(t.device().is_cpu() && t.layout() == at::kStrided, op, ": ", name, " must be a dense CPU tensor");
  }
  const auto want_dtype = bits == 8 ? at::kChar : at::kByte;
  TORCH_CHECK(qweight.scalar_type() == want_dtype, op, ": qweight of ", bits, "-bit weights must be ",
              want_dtype, ", got ", qweight.scalar_type());
  TORCH_CHECK(qweight.dim() == 2, op, ": qweight must be 2-D, got shape ", qweight.sizes());
  p.n = qweight.size(0);
  const int64_t row_bytes = bits == 8 ? p.kp : p.kp / 2;
  TORCH_CHECK(qweight.size(1) == row_bytes, op, ": qweight has ", qweight.size(1), " bytes per row but ", in_features,
              " inputs at ", bits, " bits need ", row_bytes);
  TORCH_CHECK(scales.scalar_type() == at::kFloat && scales.dim() == 2 && scales.size(0) == p.n &&
                  scales.size(1) == p.groups,
              op, ": scales must be float32 of shape (", p.n, ", ", p.groups, "), got ", scales.scalar_type(), " ",
              scales.sizes());
  if (zeros.has_value() && zeros->defined()) {
    TORCH_CHECK(zeros->scalar_type() == at::kFloat && zeros->sizes() == scales.sizes(), op,
                ": zeros must be float32 of the scales' shape ", scales.sizes(), ", got ", zeros->scalar_type(), " ",
                zeros->sizes());
  }
  return p;
}

kernels::WoqArgs make_args(const Packed& p, const at::Tensor& qw, const at::Tensor& sc, const at::Tensor& zp) {
  kernels::WoqArgs a{};
  a.kp = p.kp;
  a.group = p.group;
  a.w = reinterpret_cast<const uint8_t*>(qw.data_ptr());
  a.ldw = qw.stride(0);
  a.scales = sc.data_ptr<float>();
  a.zeros = zp.defined() ? zp.data_ptr<float>() : nullptr;
  return a;
}

at::Tensor woq_dequantize(const at::Tensor& qweight, const at::Tensor& scales, const std::optional<at::Tensor>& zeros,
                          int64_t bits, int64_t in_features, int64_t group_size) {
  const Packed p = check_packed("woq_dequantize", qweight, scales, zeros, bits, in_features, group_size);
  const at::Tensor qw = qweight.stride(1) == 1 ? qweight : qweight.contiguous();
  const at::Tensor sc = scales.contiguous();
  const at::Tensor zp = zeros.has_value() && zeros->defined() ? zeros->contiguous() : at::Tensor();
  at::Tensor out = at::empty({p.n, p.k}, qweight.options().dtype(at::kBFloat16));
  const kernels::WoqArgs a = make_args(p, qw, sc, zp);
  const auto fn = IPEX_LITE_KERNEL_TABLE(woq_kernels).dequant[bits == 8 ? kernels::kWoqInt8 : kernels::kWoqInt4];
  auto* dst = reinterpret_cast<uint16_t*>(out.data_ptr<at::BFloat16>());
  at::parallel_for(0, p.n, 16, [&](int64_t b, int64_t e) { fn(a, p.k, dst, b, e); });
  return out;
}

at::Tensor woq_linear(const at::Tensor& input, const at::Tensor& qweight, const at::Tensor& scales,
                      const std::optional<at::Tensor>& zeros, const std::optional<at::Tensor>& bias, int64_t bits,
                      int64_t in_features, int64_t group_size) {
  const char* op = "woq_linear";
  const Packed p = check_packed(op, qweight, scales, zeros, bits, in_features, group_size);
  TORCH_CHECK(input.device().is_cpu() && input.layout() == at::kStrided, op, ": input must be a dense CPU tensor");
  TORCH_CHECK(input.scalar_type() == at::kFloat || input.scalar_type() == at::kBFloat16, op,
              ": input must be float32 or bfloat16, got ", input.scalar_type());
  TORCH_CHECK(input.dim() >= 1 && input.size(-1) == p.k, op, ": input has ", input.dim() ? input.size(-1) : 0,
              " features but the layer takes ", p.k);
  const bool has_bias = bias.has_value() && bias->defined();
  if (has_bias) {
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) == p.n && bias->is_floating_point(), op,
                ": bias must be a floating-point tensor of shape (", p.n, "), got ", bias->sizes());
  }
  auto out_shape = input.sizes().vec();
  out_shape.back() = p.n;
  const int64_t m = input.numel() / p.k;
  if (m > kMaxGemvRows) {  // prefill: a GEMM on the dequantized weight
    at::Tensor w = woq_dequantize(qweight, scales, zeros, bits, in_features, group_size);
    if (input.scalar_type() == at::kFloat) w = w.to(at::kFloat);
    const at::Tensor b = has_bias ? bias->to(input.scalar_type()) : at::Tensor();
    return at::linear(input, w, has_bias ? std::optional<at::Tensor>(b) : std::nullopt);
  }
  at::Tensor out = at::empty(out_shape, input.options());
  if (m == 0) return out;
  at::Tensor x = input.reshape({m, p.k}).to(at::kFloat);
  if (p.kp != p.k) x = at::constant_pad_nd(x, {0, p.kp - p.k});
  x = x.contiguous();
  const at::Tensor qw = qweight.stride(1) == 1 ? qweight : qweight.contiguous();
  const at::Tensor sc = scales.contiguous();
  const at::Tensor zp = zeros.has_value() && zeros->defined() ? zeros->contiguous() : at::Tensor();
  // bf16 activations (exact in bf16) take the vdpbf16ps path where the CPU has it; it needs the per-group
  // sums of x for int8 too
  const bool bf16_path = input.scalar_type() == at::kBFloat16 &&
                         dispatch::active_isa_level() >= dispatch::IsaLevel::kAvx512Bf16;
  const at::Tensor xsum = zp.defined() || bf16_path ? x.view({m, p.groups, p.group}).sum(-1).contiguous()
                                                    : at::Tensor();
  at::Tensor xb, xb4;
  if (bf16_path) {
    xb = x.to(at::kBFloat16).contiguous();
    if (bits == 4) {
      const int64_t k64 = p.kp / 64 * 64;
      xb4 = xb.clone();
      xb4.narrow(1, 0, k64).copy_(
          xb.narrow(1, 0, k64).view({m, k64 / 64, 2, 2, 16}).permute({0, 1, 3, 2, 4}).reshape({m, k64}));
    }
  }
  const at::Tensor bf = has_bias ? bias->to(at::kFloat).contiguous() : at::Tensor();
  kernels::WoqArgs a = make_args(p, qw, sc, zp);
  a.x = x.data_ptr<float>();
  a.xsum = xsum.defined() ? xsum.data_ptr<float>() : nullptr;
  a.x_bf16 = xb.defined() ? reinterpret_cast<const uint16_t*>(xb.data_ptr<at::BFloat16>()) : nullptr;
  a.x_bf16_int4 = xb4.defined() ? reinterpret_cast<const uint16_t*>(xb4.data_ptr<at::BFloat16>()) : nullptr;
  a.m = m;
  a.bias = has_bias ? bf.data_ptr<float>() : nullptr;
  a.y = out.data_ptr();
  a.ldy = p.n;
  a.y_bf16 = out.scalar_type() == at::kBFloat16;
  const auto fn = IPEX_LITE_KERNEL_TABLE(woq_kernels).gemv[bits == 8 ? kernels::kWoqInt8 : kernels::kWoqInt4];
  at::parallel_for(0, p.n, 16, [&](int64_t b, int64_t e) { fn(a, b, e); });
  return out;
}

}  // namespace
}  // namespace ipex_lite

TORCH_LIBRARY_FRAGMENT(ipex_lite, m) {
  m.def(
      "woq_linear(Tensor input, Tensor qweight, Tensor scales, Tensor? zeros, Tensor? bias, int bits, "
      "int in_features, int group_size) -> Tensor");
  m.def(
      "woq_dequantize(Tensor qweight, Tensor scales, Tensor? zeros, int bits, int in_features, int group_size) "
      "-> Tensor");
}

TORCH_LIBRARY_IMPL(ipex_lite, CPU, m) {
  m.impl("woq_linear", &ipex_lite::woq_linear);
  m.impl("woq_dequantize", &ipex_lite::woq_dequantize);
}

TORCH_LIBRARY_IMPL(ipex_lite, Autograd, m) {
  m.impl("woq_linear", torch::autograd::autogradNotImplementedFallback());
  m.impl("woq_dequantize", torch::autograd::autogradNotImplementedFallback());
}
