// Decoder-LLM ops (ipex_lite.llm): schemas, input checks and work splitting around
// csrc/kernels/llm_kernel.cpp.  Inference only: each op raises when a gradient is asked of it.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/csrc/autograd/autograd_not_implemented_fallback.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <optional>

#include "dispatch/isa.h"
#include "kernels/llm_kernel.h"
#include "ops/attention.h"

IPEX_LITE_DECLARE_KERNEL_TABLE(LlmKernels, llm_kernels)

namespace ipex_lite {
namespace {

void check_cpu_dense(const char* op, const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.defined(), op, ": ", name, " is undefined");
  TORCH_CHECK(t.device().is_cpu(), op, ": ", name, " is on ", t.device(), "; only CPU tensors are supported");
  TORCH_CHECK(t.layout() == at::kStrided, op, ": ", name, " must be a dense (strided) tensor, got ", t.layout());
}

void check_float_or_bf16(const char* op, const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.scalar_type() == at::kFloat || t.scalar_type() == at::kBFloat16, op, ": ", name, " has dtype ",
              t.scalar_type(), "; expected float32 or bfloat16");
}

kernels::KernelDtype kernel_dtype(const at::Tensor& t) {
  return t.scalar_type() == at::kFloat ? kernels::kF32 : kernels::kBF16;
}

// ---------------------------------------------------------------- small-M linear on bf16 weights

at::Tensor linear_small_m(const at::Tensor& input, const at::Tensor& weight, const std::optional<at::Tensor>& bias) {
  const char* op = "linear_small_m";
  check_cpu_dense(op, input, "input");
  check_cpu_dense(op, weight, "weight");
  check_float_or_bf16(op, input, "input");
  TORCH_CHECK(weight.scalar_type() == at::kBFloat16, op, ": weight must be bfloat16, got ", weight.scalar_type());
  TORCH_CHECK(weight.dim() == 2, op, ": weight must be 2-D (out_features, in_features), got shape ", weight.sizes());
  TORCH_CHECK(input.dim() >= 1, op, ": input must have at least one dimension");
  const int64_t n = weight.size(0), k = weight.size(1);
  TORCH_CHECK(input.size(-1) == k, op, ": input has ", input.size(-1), " features but weight expects ", k,
              " (weight shape ", weight.sizes(), ")");
  const bool has_bias = bias.has_value() && bias->defined();
  if (has_bias) {
    check_cpu_dense(op, *bias, "bias");
    check_float_or_bf16(op, *bias, "bias");
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) == n, op, ": bias must have shape (", n, "), got ",
                bias->sizes());
  }
  auto out_shape = input.sizes().vec();
  out_shape.back() = n;
  at::Tensor out = at::empty(out_shape, input.options());
  const int64_t m = k == 0 ? input.numel() : input.numel() / k;
  if (out.numel() == 0) return out;
  if (k == 0) return has_bias ? out.copy_(bias->expand_as(out)) : out.zero_();
  const at::Tensor x = input.reshape({m, k}).to(at::kFloat).contiguous();
  const at::Tensor xb = input.scalar_type() == at::kBFloat16 ? input.reshape({m, k}).contiguous() : at::Tensor();
  const at::Tensor w = weight.stride(1) == 1 ? weight : weight.contiguous();
  const at::Tensor b = has_bias ? bias->to(at::kFloat).contiguous() : at::Tensor();
  kernels::SmallMArgs a{};
  a.x = x.data_ptr<float>();
  a.x_bf16 = xb.defined() ? reinterpret_cast<const uint16_t*>(xb.data_ptr<at::BFloat16>()) : nullptr;
  a.m = m;
  a.k = k;
  a.w = reinterpret_cast<const uint16_t*>(w.data_ptr<at::BFloat16>());
  a.ldw = w.stride(0);
  a.bias = has_bias ? b.data_ptr<float>() : nullptr;
  a.y = out.data_ptr();
  a.ldy = n;
  a.y_bf16 = out.scalar_type() == at::kBFloat16;
  const auto fn = IPEX_LITE_KERNEL_TABLE(llm_kernels).linear_small_m;
  // Tasks are blocks of 4 weight rows; each thread streams one contiguous run of them.
  const int64_t blocks = (n + 3) / 4;
  at::parallel_for(0, blocks, 16, [&](int64_t begin, int64_t end) { fn(a, 4 * begin, std::min(n, 4 * end)); });
  return out;
}

// ---------------------------------------------------------------- RMSNorm

at::Tensor rms_norm_impl(const char* op, const at::Tensor& input, const at::Tensor* residual, const at::Tensor& weight,
                         double eps) {
  check_cpu_dense(op, input, "input");
  check_cpu_dense(op, weight, "weight");
  check_float_or_bf16(op, input, "input");
  TORCH_CHECK(input.dim() >= 1 && input.size(-1) > 0, op, ": input must have a non-empty last dimension, got shape ",
              input.sizes());
  const int64_t n = input.size(-1);
  TORCH_CHECK(weight.dim() == 1 && weight.size(0) == n, op, ": weight must have shape (", n, "), got ",
              weight.sizes());
  TORCH_CHECK(weight.scalar_type() == input.scalar_type(), op, ": weight has dtype ", weight.scalar_type(),
              " but input has ", input.scalar_type());
  TORCH_CHECK(std::isfinite(eps) && eps >= 0, op, ": eps must be finite and non-negative, got ", eps);
  if (residual != nullptr) {
    check_cpu_dense(op, *residual, "residual");
    TORCH_CHECK(residual->sizes() == input.sizes(), op, ": residual has shape ", residual->sizes(),
                " but input has ", input.sizes());
    TORCH_CHECK(residual->scalar_type() == input.scalar_type(), op, ": residual has dtype ",
                residual->scalar_type(), " but input has ", input.scalar_type());
    TORCH_CHECK(residual->is_contiguous(), op, ": residual is updated in place and must be contiguous");
  }
  const at::Tensor x = input.is_contiguous() ? input : input.contiguous();
  const at::Tensor w = weight.contiguous();
  at::Tensor out = at::empty(x.sizes(), x.options());
  const int64_t rows = x.numel() / n;
  if (rows == 0) return out;
  kernels::RmsNormArgs a{};
  a.x = x.data_ptr();
  a.ldx = n;
  a.residual = residual != nullptr ? residual->data_ptr() : nullptr;
  a.ldr = n;
  a.w = w.data_ptr();
  a.out = out.data_ptr();
  a.ldo = n;
  a.n = n;
  a.eps = static_cast<float>(eps);
  const auto fn = IPEX_LITE_KERNEL_TABLE(llm_kernels).rms_norm[kernel_dtype(x)];
  at::parallel_for(0, rows, std::max<int64_t>(1, 16384 / n), [&](int64_t b, int64_t e) { fn(a, b, e); });
  return out;
}

at::Tensor rms_norm(const at::Tensor& input, const at::Tensor& weight, double eps) {
  return rms_norm_impl("rms_norm", input, nullptr, weight, eps);
}

at::Tensor add_rms_norm(const at::Tensor& input, at::Tensor& residual, const at::Tensor& weight, double eps) {
  return rms_norm_impl("add_rms_norm", input, &residual, weight, eps);
}

// ---------------------------------------------------------------- rotary embedding

void rotary_embedding_(at::Tensor& input, const at::Tensor& cos, const at::Tensor& sin) {
  const char* op = "rotary_embedding_";
  check_cpu_dense(op, input, "input");
  check_cpu_dense(op, cos, "cos");
  check_cpu_dense(op, sin, "sin");
  check_float_or_bf16(op, input, "input");
  TORCH_CHECK(input.dim() == 4, op, ": input must be 4-D (batch, sequence, heads, head_dim), got shape ",
              input.sizes());
  const int64_t batch = input.size(0), seq = input.size(1), heads = input.size(2), d = input.size(3);
  TORCH_CHECK(input.stride(3) == 1 || d <= 1, op, ": input must have unit stride along head_dim");
  TORCH_CHECK(cos.sizes() == sin.sizes(), op, ": cos has shape ", cos.sizes(), " but sin has ", sin.sizes());
  TORCH_CHECK(cos.scalar_type() == input.scalar_type() && sin.scalar_type() == input.scalar_type(), op,
              ": cos and sin must have the dtype of input (", input.scalar_type(), "), got ", cos.scalar_type(),
              " and ", sin.scalar_type());
  TORCH_CHECK(cos.dim() == 2 || cos.dim() == 3, op,
              ": cos and sin must be (sequence, rotary_dim) or (batch, sequence, rotary_dim), got shape ",
              cos.sizes());
  const at::Tensor c3 = cos.dim() == 2 ? cos.unsqueeze(0) : cos, s3 = sin.dim() == 2 ? sin.unsqueeze(0) : sin;
  const int64_t rd = c3.size(2);
  TORCH_CHECK(c3.size(0) == batch || c3.size(0) == 1, op, ": cos has batch ", c3.size(0), " but input has ", batch);
  TORCH_CHECK(c3.size(1) == seq, op, ": cos covers ", c3.size(1), " positions but input has ", seq);
  TORCH_CHECK(rd % 2 == 0 && rd <= d, op, ": the rotary dimension (", rd, ") must be even and at most head_dim (",
              d, ")");
  if (input.numel() == 0 || rd == 0) return;
  const at::Tensor cc = c3.contiguous(), sc = s3.contiguous();
  kernels::RotaryArgs a{};
  a.t = input.data_ptr();
  for (int i = 0; i < 3; ++i) a.t_strides[i] = input.stride(i);
  a.seq = seq;
  a.heads = heads;
  a.rd = rd;
  a.cos = cc.data_ptr();
  a.sin = sc.data_ptr();
  a.cs_strides[0] = cc.size(0) == 1 ? 0 : cc.stride(0);
  a.cs_strides[1] = cc.stride(1);
  const auto fn = IPEX_LITE_KERNEL_TABLE(llm_kernels).rotary[kernel_dtype(input)];
  at::parallel_for(0, batch * seq, std::max<int64_t>(1, 8192 / std::max<int64_t>(1, heads * rd)),
                   [&](int64_t b, int64_t e) { fn(a, b, e); });
}

// ---------------------------------------------------------------- SiLU gate

// The row stride of t seen as (numel / n, n) rows with unit stride along n, or -1 when its leading
// dimensions do not collapse into one stride (the caller copies it then).
int64_t row_stride(const at::Tensor& t) {
  const int64_t n = t.size(-1);
  if (n > 1 && t.stride(-1) != 1) return -1;
  if (t.dim() == 1) return n;
  for (int64_t d = t.dim() - 2; d >= 1; --d)
    if (t.size(d - 1) > 1 && t.stride(d - 1) != t.stride(d) * t.size(d)) return -1;
  return t.stride(-2);
}

at::Tensor silu_mul(const at::Tensor& x, const at::Tensor& y) {
  const char* op = "silu_mul";
  check_cpu_dense(op, x, "x");
  check_cpu_dense(op, y, "y");
  check_float_or_bf16(op, x, "x");
  TORCH_CHECK(x.sizes() == y.sizes(), op, ": x has shape ", x.sizes(), " but y has ", y.sizes());
  TORCH_CHECK(x.scalar_type() == y.scalar_type(), op, ": x has dtype ", x.scalar_type(), " but y has ",
              y.scalar_type());
  TORCH_CHECK(x.dim() >= 1, op, ": x and y need at least one dimension");
  at::Tensor out = at::empty(x.sizes(), x.options());
  if (out.numel() == 0) return out;
  const at::Tensor g = row_stride(x) < 0 ? x.contiguous() : x, u = row_stride(y) < 0 ? y.contiguous() : y;
  const int64_t n = x.size(-1), rows = out.numel() / n, ldg = row_stride(g), ldu = row_stride(u);
  const auto fn = IPEX_LITE_KERNEL_TABLE(llm_kernels).silu_mul[kernel_dtype(g)];
  const void* gp = g.data_ptr();
  const void* up = u.data_ptr();
  void* dst = out.data_ptr();
  at::parallel_for(0, rows, std::max<int64_t>(1, 16384 / n),
                   [&](int64_t b, int64_t e) { fn(gp, ldg, up, ldu, dst, n, n, b, e); });
  return out;
}

// ---------------------------------------------------------------- attention over a KV cache

template <typename T>
void merge_chunks(const float* partial, int64_t chunks, int64_t rows, int64_t ev, T* out, const int64_t* ostr,
                  int64_t b, int64_t head0, int64_t lq) {
  const int64_t width = ev + 2;
  for (int64_t r = 0; r < rows; ++r) {
    const int64_t g = r / lq, i = r % lq;
    float mx = -std::numeric_limits<float>::infinity();
    for (int64_t c = 0; c < chunks; ++c) mx = std::max(mx, partial[(c * rows + r) * width + ev]);
    T* o = out + b * ostr[0] + (head0 + g) * ostr[1] + i * ostr[2];
    if (mx == -std::numeric_limits<float>::infinity()) {  // every key masked out: zeros, not NaN
      for (int64_t d = 0; d < ev; ++d) o[d] = T(0.f);
      continue;
    }
    float total = 0.f;
    for (int64_t c = 0; c < chunks; ++c) {
      const float* p = partial + (c * rows + r) * width;
      total += p[ev + 1] * std::exp(p[ev] - mx);
    }
    for (int64_t d = 0; d < ev; ++d) {
      float acc = 0.f;
      for (int64_t c = 0; c < chunks; ++c) {
        const float* p = partial + (c * rows + r) * width;
        if (p[ev + 1] > 0.f) acc += p[d] * std::exp(p[ev] - mx);
      }
      o[d] = T(acc / total);
    }
  }
}

at::Tensor decode_attention(const at::Tensor& query, const at::Tensor& key, const at::Tensor& value,
                            const std::optional<at::Tensor>& attn_mask, bool is_causal, std::optional<double> scale) {
  const char* op = "decode_attention";
  for (auto [t, name] : {std::pair<const at::Tensor&, const char*>{query, "query"}, {key, "key"}, {value, "value"}}) {
    check_cpu_dense(op, t, name);
    check_float_or_bf16(op, t, name);
    TORCH_CHECK(t.dim() == 4, op, ": ", name, " must be 4-D (batch, heads, length, head_dim), got shape ",
                t.sizes());
  }
  const auto dtype = query.scalar_type();
  TORCH_CHECK(key.scalar_type() == dtype && value.scalar_type() == dtype, op,
              ": query, key and value must share one dtype, got ", dtype, ", ", key.scalar_type(), ", ",
              value.scalar_type());
  const int64_t batch = query.size(0), heads = query.size(1), lq = query.size(2), e = query.size(3);
  const int64_t kv_heads = key.size(1), lk = key.size(2), ev = value.size(3);
  TORCH_CHECK(key.size(0) == batch && key.size(3) == e, op, ": key must have shape (", batch,
              ", kv_heads, key length, ", e, "), got ", key.sizes());
  TORCH_CHECK(kv_heads > 0 && heads % kv_heads == 0, op, ": the ", heads,
              " query heads must be a multiple of the key/value heads (", kv_heads, ")");
  TORCH_CHECK(value.size(0) == batch && value.size(1) == kv_heads && value.size(2) == lk, op,
              ": value must have shape (", batch, ", ", kv_heads, ", ", lk, ", value dim), got ", value.sizes());
  TORCH_CHECK(e > 0, op, ": query, key and value need a positive head_dim");
  TORCH_CHECK(!is_causal || lq <= lk, op, ": a causal call needs at least as many keys (", lk, ") as queries (",
              lq, ")");
  const bool has_mask = attn_mask.has_value() && attn_mask->defined();
  const double sc = scale.has_value() ? *scale : 1.0 / std::sqrt(static_cast<double>(e));
  TORCH_CHECK(std::isfinite(sc), op, ": scale must be finite, got ", sc);
  at::Tensor out = at::empty({batch, lq, heads, ev}, query.options()).permute({0, 2, 1, 3});
  if (out.numel() == 0) return out;
  if (lk == 0) return out.zero_();
  auto unit = [](const at::Tensor& t) { return t.size(3) > 1 && t.stride(3) != 1 ? t.contiguous() : t; };
  const at::Tensor q = unit(query), k = unit(key), v = unit(value);
  const at::Tensor mask = has_mask ? additive_mask(op, *attn_mask, {batch, heads, lq, lk}) : at::Tensor();

  const int64_t groups = heads / kv_heads, rows = groups * lq;
  // Long caches are split so every thread gets work: chunks of at least 256 keys.
  const int64_t threads = at::get_num_threads();
  const int64_t want = (2 * threads + batch * kv_heads - 1) / (batch * kv_heads);
  const int64_t chunks = std::max<int64_t>(1, std::min(want, (lk + 255) / 256));
  const int64_t chunk = (lk + chunks - 1) / chunks;
  const int64_t tasks = batch * kv_heads * chunks;
  at::Tensor partial = at::empty({tasks, rows, ev + 2}, query.options().dtype(at::kFloat));

  kernels::DecodeAttentionArgs a{};
  a.q = q.data_ptr();
  a.k = k.data_ptr();
  a.v = v.data_ptr();
  for (int d = 0; d < 3; ++d) {
    a.q_strides[d] = q.stride(d);
    a.k_strides[d] = k.stride(d);
    a.v_strides[d] = v.stride(d);
  }
  if (has_mask) {
    a.mask = mask.data_ptr<float>();
    for (int d = 0; d < 4; ++d) a.mask_strides[d] = mask.size(d) > 1 ? mask.stride(d) : 0;
  }
  a.kv_heads = kv_heads;
  a.groups = groups;
  a.lq = lq;
  a.lk = lk;
  a.e = e;
  a.ev = ev;
  a.chunk = chunk;
  a.scale = static_cast<float>(sc);
  a.causal = is_causal;
  a.partial = partial.data_ptr<float>();
  const auto fn = IPEX_LITE_KERNEL_TABLE(llm_kernels).decode_attention[kernel_dtype(q)];
  const int64_t scratch_bytes = kernels::decode_attention_scratch_bytes(rows, chunk, e);
  at::parallel_for(0, tasks, 1, [&](int64_t begin, int64_t end) {
    at::Tensor scratch = at::empty({scratch_bytes}, at::TensorOptions().dtype(at::kByte));
    fn(a, begin, end, scratch.data_ptr());
  });
  const int64_t ostr[3] = {out.stride(0), out.stride(1), out.stride(2)};
  const float* part = partial.data_ptr<float>();
  at::parallel_for(0, batch * kv_heads, 1, [&](int64_t begin, int64_t end) {
    for (int64_t bh = begin; bh < end; ++bh) {
      const int64_t b = bh / kv_heads, kh = bh % kv_heads;
      const float* p = part + bh * chunks * rows * (ev + 2);
      if (dtype == at::kFloat) {
        merge_chunks(p, chunks, rows, ev, out.data_ptr<float>(), ostr, b, kh * groups, lq);
      } else {
        merge_chunks(p, chunks, rows, ev, out.data_ptr<at::BFloat16>(), ostr, b, kh * groups, lq);
      }
    }
  });
  return out;
}

}  // namespace
}  // namespace ipex_lite

TORCH_LIBRARY_FRAGMENT(ipex_lite, m) {
  m.def("linear_small_m(Tensor input, Tensor weight, Tensor? bias=None) -> Tensor");
  m.def("rms_norm(Tensor input, Tensor weight, float eps) -> Tensor");
  m.def("add_rms_norm(Tensor input, Tensor(a!) residual, Tensor weight, float eps) -> Tensor");
  m.def("rotary_embedding_(Tensor(a!) input, Tensor cos, Tensor sin) -> ()");
  m.def("silu_mul(Tensor x, Tensor y) -> Tensor");
  m.def(
      "decode_attention(Tensor query, Tensor key, Tensor value, Tensor? attn_mask=None, bool is_causal=False, "
      "float? scale=None) -> Tensor");
}

TORCH_LIBRARY_IMPL(ipex_lite, CPU, m) {
  m.impl("linear_small_m", &ipex_lite::linear_small_m);
  m.impl("rms_norm", &ipex_lite::rms_norm);
  m.impl("add_rms_norm", &ipex_lite::add_rms_norm);
  m.impl("rotary_embedding_", &ipex_lite::rotary_embedding_);
  m.impl("silu_mul", &ipex_lite::silu_mul);
  m.impl("decode_attention", &ipex_lite::decode_attention);
}

// Inference only: a gradient through these raises instead of being silently zero.
TORCH_LIBRARY_IMPL(ipex_lite, Autograd, m) {
  for (const char* name :
       {"linear_small_m", "rms_norm", "add_rms_norm", "rotary_embedding_", "silu_mul", "decode_attention"}) {
    m.impl(name, torch::autograd::autogradNotImplementedFallback());
  }
}
