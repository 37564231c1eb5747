// Weight-only quantized Linear (ipex_lite.quantization's WoqLinear): schema, checks, and the split between
// the decode kernel (few rows: the packed weights are streamed once and dequantized in registers) and the
// prefill path (many rows: rows of the weight are dequantized to bf16 and handed to oneDNN's GEMM).
// Loops in csrc/kernels/woq_kernel.cpp.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/csrc/autograd/autograd_not_implemented_fallback.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
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

// A 4-bit code book (NF4): 16 float32 values, each exact in bf16 (the bf16 kernels hold it as bf16), for int4
// weights without zero points.
at::Tensor check_codebook(const char* op, const std::optional<at::Tensor>& codebook, int64_t bits,
                          const std::optional<at::Tensor>& zeros) {
  if (!codebook.has_value() || !codebook->defined()) return at::Tensor();
  const at::Tensor& c = *codebook;
  TORCH_CHECK(bits == 4, op, ": a codebook is for 4-bit weights, got bits=", bits);
  TORCH_CHECK(!(zeros.has_value() && zeros->defined()), op, ": a codebook layer has no zero points");
  TORCH_CHECK(c.device().is_cpu() && c.layout() == at::kStrided && c.scalar_type() == at::kFloat && c.dim() == 1 &&
                  c.size(0) == 16,
              op, ": codebook must be a float32 CPU tensor of 16 values, got ", c.scalar_type(), " ", c.sizes());
  at::Tensor cc = c.contiguous();
  const float* v = cc.data_ptr<float>();
  for (int i = 0; i < 16; ++i) {
    TORCH_CHECK(std::isfinite(v[i]) && static_cast<float>(c10::BFloat16(v[i])) == v[i], op, ": codebook value ", i,
                " (", v[i], ") is not exact in bfloat16");
  }
  return cc;
}

kernels::WoqArgs make_args(const Packed& p, const at::Tensor& qw, const at::Tensor& sc, const at::Tensor& zp,
                           const at::Tensor& cb) {
  kernels::WoqArgs a{};
  a.codebook = cb.defined() ? cb.data_ptr<float>() : nullptr;
  a.kp = p.kp;
  a.group = p.group;
  a.w = reinterpret_cast<const uint8_t*>(qw.data_ptr());
  a.ldw = qw.stride(0);
  a.scales = sc.data_ptr<float>();
  a.zeros = zp.defined() ? zp.data_ptr<float>() : nullptr;
  return a;
}

// The activations in every form the kernels read, made in one pass into one buffer (per call: a decode
// step runs ~100 of these, and a chain of ATen ops here cost more than the int4 GEMV saved): fp32 padded
// to kp, per-group sums, and for the bf16 path the bf16 copy in input order and in the kernel's lane order.
struct ActivationForms {
  at::Tensor storage;
  float* x = nullptr;
  float* xsum = nullptr;
  uint16_t* x_bf16 = nullptr;
  uint16_t* x_bf16_lanes = nullptr;
  int8_t* x_q = nullptr;
  float* x_scale = nullptr;
  float* x_q_sum = nullptr;
};

// lowp INT8: each row of x symmetric int8 (scale max|x| / 127), in the weights' byte-lane order.
void fill_int8(int64_t m, const Packed& p, const ActivationForms& f) {
  for (int64_t i = 0; i < m; ++i) {
    const float* x = f.x + i * p.kp;
    float amax = 0.f;
    for (int64_t c = 0; c < p.kp; ++c) amax = std::max(amax, std::abs(x[c]));
    const float scale = amax > 0.f ? amax / 127.f : 1.f, inv = 1.f / scale;
    f.x_scale[i] = scale;
    int8_t* q = f.x_q + i * p.kp;
    float* qs = f.x_q_sum + i * p.groups;
    for (int64_t g = 0; g < p.groups; ++g) qs[g] = 0.f;
    for (int64_t c = 0; c < p.kp; ++c) {
      const int32_t v = static_cast<int32_t>(std::nearbyint(std::max(-127.f, std::min(127.f, x[c] * inv))));
      qs[c / p.group] += static_cast<float>(v);
      // int4: per 128 inputs, lane b < 64 takes input (b / 16) * 32 + b % 16 (low nibbles), lane 64 + b the
      // input 16 further (high nibbles)
      int64_t d = c;
      if (p.bits == 4) {
        const int64_t r = c & 127, blk = r / 32, j = r % 32;
        d = (c & ~int64_t(127)) + (j < 16 ? blk * 16 + j : 64 + blk * 16 + (j - 16));
      }
      q[d] = static_cast<int8_t>(v);
    }
  }
}

// One row of x_bf16_lanes (woq_kernel.h) from the input-order row xb: the lane order of the bf16 kernel
// the layer's bits and group size select, chosen once per row (not per element: decode calls this ~100 times
// a token).
void fill_lanes(const Packed& p, const uint16_t* xb, uint16_t* xl) {
  if (p.bits == 8) {  // per 64 inputs: the even ones, then the odd ones
    for (int64_t b = 0; b < p.kp; b += 64)
      for (int64_t j = 0; j < 32; ++j) {
        xl[b + j] = xb[b + 2 * j];
        xl[b + 32 + j] = xb[b + 2 * j + 1];
      }
  } else if (p.group % 128 == 0) {  // per 128 inputs: lane v * 32 + j is nibble v of 16-bit weight word j
    for (int64_t b = 0; b < p.kp; b += 128)
      for (int64_t v = 0; v < 4; ++v)
        for (int64_t j = 0; j < 32; ++j) {
          xl[b + v * 32 + j] = xb[b + 32 * (j / 8) + 2 * (j % 8) + (v >> 1) + 16 * (v & 1)];
        }
  } else {  // per 64 inputs [0,16) [32,48) [16,32) [48,64); the last 32 inputs as they are
    const int64_t k64 = p.kp / 64 * 64;
    for (int64_t b = 0; b < k64; b += 64) {
      std::copy_n(xb + b, 16, xl + b);
      std::copy_n(xb + b + 32, 16, xl + b + 16);
      std::copy_n(xb + b + 16, 16, xl + b + 32);
      std::copy_n(xb + b + 48, 16, xl + b + 48);
    }
    std::copy(xb + k64, xb + p.kp, xl + k64);
  }
}

template <typename T>
void fill_forms(const T* src, int64_t m, const Packed& p, const ActivationForms& f) {
  for (int64_t i = 0; i < m; ++i) {
    float* x = f.x + i * p.kp;
    float* xs = f.xsum + i * p.groups;
    for (int64_t g = 0; g < p.groups; ++g) xs[g] = 0.f;
    for (int64_t c = 0; c < p.kp; ++c) {
      const float v = c < p.k ? static_cast<float>(src[i * p.k + c]) : 0.f;
      x[c] = v;
      xs[c / p.group] += v;
    }
    if (f.x_bf16 == nullptr) continue;
    uint16_t* xb = f.x_bf16 + i * p.kp;
    for (int64_t c = 0; c < p.kp; ++c) xb[c] = c10::BFloat16(x[c]).x;  // exact: the input was bf16
    if (f.x_bf16_lanes == nullptr) continue;
    fill_lanes(p, xb, f.x_bf16_lanes + i * p.kp);
  }
}

ActivationForms activation_forms(const at::Tensor& x2d, const Packed& p, bool bf16_path, bool int8_path) {
  const int64_t m = x2d.size(0);
  // each form starts on a 64-byte line: the kernels load 64 bytes of x per step, and a load split across two
  // lines made the 4-row int8 GEMV 35% slower
  auto lines = [](int64_t bytes) { return (bytes + 63) / 64 * 64; };
  const int64_t x_bytes = lines(4 * m * p.kp), sum_bytes = lines(4 * m * p.groups), half_bytes = lines(2 * m * p.kp);
  ActivationForms f;
  const int64_t q_bytes = int8_path ? lines(m * p.kp) + lines(4 * m) + lines(4 * m * p.groups) : 0;
  f.storage = at::empty({x_bytes + sum_bytes + (bf16_path ? 2 * half_bytes : 0) + q_bytes + 64},
                        x2d.options().dtype(at::kByte));
  auto* base = f.storage.data_ptr<uint8_t>();
  base += (64 - reinterpret_cast<uintptr_t>(base) % 64) % 64;
  f.x = reinterpret_cast<float*>(base);
  f.xsum = reinterpret_cast<float*>(base + x_bytes);
  if (bf16_path) {
    f.x_bf16 = reinterpret_cast<uint16_t*>(base + x_bytes + sum_bytes);
    if (p.bits == 4 || (m == 1 && p.group % 64 == 0)) {  // int8 reads them with one activation row only
      f.x_bf16_lanes = reinterpret_cast<uint16_t*>(base + x_bytes + sum_bytes + half_bytes);
    }
  }
  if (int8_path) {
    uint8_t* q = base + x_bytes + sum_bytes + (bf16_path ? 2 * half_bytes : 0);
    f.x_q = reinterpret_cast<int8_t*>(q);
    f.x_scale = reinterpret_cast<float*>(q + lines(m * p.kp));
    f.x_q_sum = reinterpret_cast<float*>(q + lines(m * p.kp) + lines(4 * m));
  }
  if (x2d.scalar_type() == at::kFloat) {
    fill_forms(x2d.data_ptr<float>(), m, p, f);
  } else {
    fill_forms(x2d.data_ptr<at::BFloat16>(), m, p, f);
  }
  if (int8_path) fill_int8(m, p, f);
  return f;
}

at::Tensor woq_dequantize(const at::Tensor& qweight, const at::Tensor& scales, const std::optional<at::Tensor>& zeros,
                          int64_t bits, int64_t in_features, int64_t group_size,
                          const std::optional<at::Tensor>& codebook) {
  const Packed p = check_packed("woq_dequantize", qweight, scales, zeros, bits, in_features, group_size);
  const at::Tensor cb = check_codebook("woq_dequantize", codebook, bits, zeros);
  const at::Tensor qw = qweight.stride(1) == 1 ? qweight : qweight.contiguous();
  const at::Tensor sc = scales.contiguous();
  const at::Tensor zp = zeros.has_value() && zeros->defined() ? zeros->contiguous() : at::Tensor();
  at::Tensor out = at::empty({p.n, p.k}, qweight.options().dtype(at::kBFloat16));
  const kernels::WoqArgs a = make_args(p, qw, sc, zp, cb);
  const auto fn = IPEX_LITE_KERNEL_TABLE(woq_kernels).dequant[bits == 8 ? kernels::kWoqInt8 : kernels::kWoqInt4];
  auto* dst = reinterpret_cast<uint16_t*>(out.data_ptr<at::BFloat16>());
  at::parallel_for(0, p.n, 16, [&](int64_t b, int64_t e) { fn(a, p.k, dst, b, e); });
  return out;
}

at::Tensor woq_linear(const at::Tensor& input, const at::Tensor& qweight, const at::Tensor& scales,
                      const std::optional<at::Tensor>& zeros, const std::optional<at::Tensor>& bias, int64_t bits,
                      int64_t in_features, int64_t group_size, bool lowp_int8,
                      const std::optional<at::Tensor>& codebook) {
  const char* op = "woq_linear";
  const Packed p = check_packed(op, qweight, scales, zeros, bits, in_features, group_size);
  const at::Tensor cb = check_codebook(op, codebook, bits, zeros);
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
    at::Tensor w = woq_dequantize(qweight, scales, zeros, bits, in_features, group_size, codebook);
    if (input.scalar_type() == at::kFloat) w = w.to(at::kFloat);
    const at::Tensor b = has_bias ? bias->to(input.scalar_type()) : at::Tensor();
    return at::linear(input, w, has_bias ? std::optional<at::Tensor>(b) : std::nullopt);
  }
  at::Tensor out = at::empty(out_shape, input.options());
  if (m == 0) return out;
  const at::Tensor qw = qweight.stride(1) == 1 ? qweight : qweight.contiguous();
  const at::Tensor sc = scales.contiguous();
  const at::Tensor zp = zeros.has_value() && zeros->defined() ? zeros->contiguous() : at::Tensor();
  // bf16 activations (exact in bf16) take the vdpbf16ps path where the CPU has it
  // (code book layers: groups of a multiple of 128 inputs; the others take the fp32 path)
  const bool bf16_path = input.scalar_type() == at::kBFloat16 &&
                         dispatch::active_isa_level() >= dispatch::IsaLevel::kAvx512Bf16 &&
                         (!cb.defined() || p.group % 128 == 0);
  // lowp INT8 runs where the kernels have VNNI and a load never straddles groups; elsewhere the activations
  // stay in bf16/fp32 (the result only gets closer to the float one)
  const auto& kt = IPEX_LITE_KERNEL_TABLE(woq_kernels);
  const bool int8_path = lowp_int8 && kt.has_vnni && !cb.defined() && p.group % (bits == 4 ? 128 : 64) == 0;
  const ActivationForms xf = activation_forms(input.reshape({m, p.k}).contiguous(), p, bf16_path && !int8_path,
                                              int8_path);
  const at::Tensor bf = has_bias ? bias->to(at::kFloat).contiguous() : at::Tensor();
  kernels::WoqArgs a = make_args(p, qw, sc, zp, cb);
  a.x = xf.x;
  a.xsum = xf.xsum;
  a.x_bf16 = xf.x_bf16;
  a.x_bf16_lanes = xf.x_bf16_lanes;
  a.x_q = xf.x_q;
  a.x_scale = xf.x_scale;
  a.x_q_sum = xf.x_q_sum;
  a.m = m;
  a.bias = has_bias ? bf.data_ptr<float>() : nullptr;
  a.y = out.data_ptr();
  a.ldy = p.n;
  a.y_bf16 = out.scalar_type() == at::kBFloat16;
  const auto fn = kt.gemv[bits == 8 ? kernels::kWoqInt8 : kernels::kWoqInt4];
  at::parallel_for(0, p.n, 16, [&](int64_t b, int64_t e) { fn(a, b, e); });
  return out;
}

}  // namespace
}  // namespace ipex_lite

TORCH_LIBRARY_FRAGMENT(ipex_lite, m) {
  m.def(
      "woq_linear(Tensor input, Tensor qweight, Tensor scales, Tensor? zeros, Tensor? bias, int bits, "
      "int in_features, int group_size, bool lowp_int8=False, Tensor? codebook=None) -> Tensor");
  m.def(
      "woq_dequantize(Tensor qweight, Tensor scales, Tensor? zeros, int bits, int in_features, int group_size, "
      "Tensor? codebook=None) -> Tensor");
}

TORCH_LIBRARY_IMPL(ipex_lite, CPU, m) {
  m.impl("woq_linear", &ipex_lite::woq_linear);
  m.impl("woq_dequantize", &ipex_lite::woq_dequantize);
}

TORCH_LIBRARY_IMPL(ipex_lite, Autograd, m) {
  m.impl("woq_linear", torch::autograd::autogradNotImplementedFallback());
  m.impl("woq_dequantize", torch::autograd::autogradNotImplementedFallback());
}
