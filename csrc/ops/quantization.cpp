// Per-tensor affine quantize / dequantize on plain uint8 / int8 tensors (the
// quantized tensor dtypes are deprecated): the glue around oneDNN's int8
// convolutions and GEMMs.  Loops in csrc/kernels/quantization_kernel.cpp.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <tuple>
#include <optional>

#include "dispatch/isa.h"
#include "kernels/quantization_kernel.h"

IPEX_LITE_DECLARE_KERNEL_TABLE(QuantizationKernels, quantization_kernels)

namespace ipex_lite {
namespace {

constexpr int64_t kGrain = 1 << 16;

void check_qparams(const char* op, double scale, int64_t zero_point, at::ScalarType qtype) {
  TORCH_CHECK(std::isfinite(scale) && scale > 0, op, ": scale must be positive and finite, got ", scale);
  const int64_t lo = qtype == at::kByte ? 0 : -128, hi = qtype == at::kByte ? 255 : 127;
  TORCH_CHECK(zero_point >= lo && zero_point <= hi, op, ": zero_point ", zero_point, " is outside the range of ",
              qtype, " [", lo, ", ", hi, "]");
}

// Dense tensors keep their layout (channels_last stays channels_last); others are made contiguous.
at::Tensor dense(const at::Tensor& t) {
  return t.is_non_overlapping_and_dense() ? t : t.contiguous();
}

at::Tensor quantize_per_tensor(const at::Tensor& input, double scale, int64_t zero_point, at::ScalarType dtype) {
  const char* op = "quantize_per_tensor";
  TORCH_CHECK(input.device().is_cpu(), op, ": input must be a CPU tensor, got ", input.device());
  TORCH_CHECK(input.layout() == at::kStrided, op, ": input must be dense, got ", input.layout());
  TORCH_CHECK(dtype == at::kByte || dtype == at::kChar, op, ": dtype must be uint8 or int8, got ", dtype);
  TORCH_CHECK(input.is_floating_point(), op, ": input must be floating point, got ", input.scalar_type());
  check_qparams(op, scale, zero_point, dtype);
  const at::Tensor x = dense(input.scalar_type() == at::kFloat ? input : input.to(at::kFloat));
  at::Tensor out = at::empty_like(x, x.options().dtype(dtype), at::MemoryFormat::Preserve);
  TORCH_INTERNAL_ASSERT(out.strides() == x.strides());
  const auto& kt = IPEX_LITE_KERNEL_TABLE(quantization_kernels);
  const float* src = x.data_ptr<float>();
  const float inv = static_cast<float>(1.0 / scale), zp = static_cast<float>(zero_point);
  if (dtype == at::kByte) {
    auto* dst = out.data_ptr<uint8_t>();
    at::parallel_for(0, x.numel(), kGrain, [&](int64_t b, int64_t e) { kt.quantize_u8(src, dst, inv, zp, b, e); });
  } else {
    auto* dst = out.data_ptr<int8_t>();
    at::parallel_for(0, x.numel(), kGrain, [&](int64_t b, int64_t e) { kt.quantize_s8(src, dst, inv, zp, b, e); });
  }
  return out;
}

at::Tensor dequantize_per_tensor(const at::Tensor& input, double scale, int64_t zero_point) {
  const char* op = "dequantize_per_tensor";
  TORCH_CHECK(input.device().is_cpu(), op, ": input must be a CPU tensor, got ", input.device());
  TORCH_CHECK(input.layout() == at::kStrided, op, ": input must be dense, got ", input.layout());
  const auto qtype = input.scalar_type();
  TORCH_CHECK(qtype == at::kByte || qtype == at::kChar, op, ": input must be uint8 or int8, got ", qtype);
  check_qparams(op, scale, zero_point, qtype);
  const at::Tensor q = dense(input);
  at::Tensor out = at::empty_like(q, q.options().dtype(at::kFloat), at::MemoryFormat::Preserve);
  const auto& kt = IPEX_LITE_KERNEL_TABLE(quantization_kernels);
  float* dst = out.data_ptr<float>();
  const float s = static_cast<float>(scale), zp = static_cast<float>(zero_point);
  if (qtype == at::kByte) {
    const auto* src = q.data_ptr<uint8_t>();
    at::parallel_for(0, q.numel(), kGrain, [&](int64_t b, int64_t e) { kt.dequantize_u8(src, dst, s, zp, b, e); });
  } else {
    const auto* src = q.data_ptr<int8_t>();
    at::parallel_for(0, q.numel(), kGrain, [&](int64_t b, int64_t e) { kt.dequantize_s8(src, dst, s, zp, b, e); });
  }
  return out;
}

// Symmetric 8-bit with one scale per row of the last dimension (per token): the dynamic activation
// quantization of LLM-style int8 GEMMs, whose rows differ in range by orders of magnitude.  Stored as
// uint8 with zero point 128 (one per tensor): oneDNN's fast int8 GEMMs take uint8 sources (an int8
// source falls to its reference kernel), and the per-row scales are applied to the GEMM's output rows.
std::tuple<at::Tensor, at::Tensor> quantize_per_token(const at::Tensor& input) {
  const char* op = "quantize_per_token";
  TORCH_CHECK(input.device().is_cpu(), op, ": input must be a CPU tensor, got ", input.device());
  TORCH_CHECK(input.layout() == at::kStrided, op, ": input must be dense, got ", input.layout());
  TORCH_CHECK(input.is_floating_point(), op, ": input must be floating point, got ", input.scalar_type());
  TORCH_CHECK(input.dim() >= 1, op, ": input must have at least one dimension (the row), got a scalar");
  const at::Tensor x = (input.scalar_type() == at::kFloat ? input : input.to(at::kFloat)).contiguous();
  const int64_t k = x.size(-1), rows = k == 0 ? 0 : x.numel() / k;
  at::Tensor out = at::empty(x.sizes(), x.options().dtype(at::kByte));
  at::Tensor scales = at::ones(x.sizes().slice(0, x.dim() - 1), x.options());
  if (rows == 0) return {out, scales};
  const auto& kt = IPEX_LITE_KERNEL_TABLE(quantization_kernels);
  const float* src = x.data_ptr<float>();
  uint8_t* dst = out.data_ptr<uint8_t>();
  float* sc = scales.data_ptr<float>();
  at::parallel_for(0, rows, std::max<int64_t>(1, kGrain / k),
                   [&](int64_t b, int64_t e) { kt.quantize_rows_u8(src, dst, sc, k, b, e); });
  return {out, scales};
}

// out[i] = table[input[i]]: an activation between two int8 layers applied to the uint8 codes (the
// 256-entry table folds dequantize, activation and requantize), for activations oneDNN's int8
// kernels do not fuse.  The input's layout is kept.
at::Tensor lookup_u8(const at::Tensor& input, const at::Tensor& table) {
  const char* op = "lookup_u8";
  TORCH_CHECK(input.device().is_cpu() && input.layout() == at::kStrided, op, ": input must be a dense CPU tensor");
  TORCH_CHECK(input.scalar_type() == at::kByte, op, ": input must be uint8, got ", input.scalar_type());
  TORCH_CHECK(table.device().is_cpu() && table.scalar_type() == at::kByte && table.dim() == 1 && table.numel() == 256,
              op, ": table must be a 1-D uint8 CPU tensor of 256 entries, got ", table.scalar_type(), " ",
              table.sizes());
  const at::Tensor q = dense(input);
  const at::Tensor t = table.contiguous();
  at::Tensor out = at::empty_like(q, at::MemoryFormat::Preserve);
  TORCH_INTERNAL_ASSERT(out.strides() == q.strides());
  const auto& kt = IPEX_LITE_KERNEL_TABLE(quantization_kernels);
  const uint8_t* src = q.data_ptr<uint8_t>();
  const uint8_t* tab = t.data_ptr<uint8_t>();
  uint8_t* dst = out.data_ptr<uint8_t>();
  at::parallel_for(0, q.numel(), kGrain, [&](int64_t b, int64_t e) { kt.lookup_u8(src, dst, tab, b, e); });
  return out;
}

}  // namespace
}  // namespace ipex_lite

TORCH_LIBRARY_FRAGMENT(ipex_lite, m) {
  m.def("quantize_per_tensor(Tensor input, float scale, int zero_point, ScalarType dtype) -> Tensor");
  m.def("dequantize_per_tensor(Tensor input, float scale, int zero_point) -> Tensor");
  m.def("quantize_per_token(Tensor input) -> (Tensor, Tensor)");
  m.def("lookup_u8(Tensor input, Tensor table) -> Tensor");
}

TORCH_LIBRARY_IMPL(ipex_lite, CPU, m) {
  m.impl("quantize_per_tensor", &ipex_lite::quantize_per_tensor);
  m.impl("dequantize_per_tensor", &ipex_lite::dequantize_per_tensor);
  m.impl("quantize_per_token", &ipex_lite::quantize_per_token);
  m.impl("lookup_u8", &ipex_lite::lookup_u8);
}
