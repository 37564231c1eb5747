// ipex_lite::scaled_dot_product_attention: schema, input checks, CPU and
// AutocastCPU implementations of inference attention (no dropout, no
// gradient).  The loops live in csrc/kernels/attention_kernel.cpp.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/autocast_mode.h>
#include <torch/csrc/autograd/autograd_not_implemented_fallback.h>
#include <torch/library.h>

#include <cmath>
#include <limits>
#include <optional>

#include "dispatch/isa.h"
#include "kernels/attention_kernel.h"
#include "ops/attention.h"

IPEX_LITE_DECLARE_KERNEL_TABLE(AttentionKernels, attention_kernels)

namespace ipex_lite {
namespace {

constexpr const char* kOp = "scaled_dot_product_attention";

void check_operand(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.defined(), kOp, ": ", name, " is undefined");
  TORCH_CHECK(t.device().is_cpu(), kOp, ": ", name, " is on ", t.device(), "; only CPU tensors are supported");
  TORCH_CHECK(t.layout() == at::kStrided, kOp, ": ", name, " must be a dense (strided) tensor, got ", t.layout());
  TORCH_CHECK(t.dim() == 4, kOp, ": ", name, " must be 4-D (batch, heads, length, dim), got shape ", t.sizes());
  TORCH_CHECK(t.scalar_type() == at::kFloat || t.scalar_type() == at::kBFloat16, kOp, ": ", name, " has dtype ",
              t.scalar_type(), "; expected float32 or bfloat16");
}

at::Tensor unit_last_stride(const at::Tensor& t) { return t.size(3) > 1 && t.stride(3) != 1 ? t.contiguous() : t; }

at::Tensor sdpa_cpu(const at::Tensor& query_in, const at::Tensor& key_in, const at::Tensor& value_in,
                    const std::optional<at::Tensor>& attn_mask, bool is_causal, std::optional<double> scale) {
  check_operand(query_in, "query");
  check_operand(key_in, "key");
  check_operand(value_in, "value");
  const auto dtype = query_in.scalar_type();
  TORCH_CHECK(key_in.scalar_type() == dtype && value_in.scalar_type() == dtype, kOp,
              ": query, key and value must share one dtype, got ", dtype, ", ", key_in.scalar_type(), ", ",
              value_in.scalar_type());
  const int64_t batch = query_in.size(0), heads = query_in.size(1), lq = query_in.size(2), e = query_in.size(3);
  const int64_t lk = key_in.size(2), ev = value_in.size(3);
  TORCH_CHECK(key_in.size(0) == batch && key_in.size(1) == heads && key_in.size(3) == e, kOp,
              ": key must have shape (", batch, ", ", heads, ", key length, ", e, "), got ", key_in.sizes());
  TORCH_CHECK(value_in.size(0) == batch && value_in.size(1) == heads && value_in.size(2) == lk, kOp,
              ": value must have shape (", batch, ", ", heads, ", ", lk, ", value dim), got ", value_in.sizes());
  TORCH_CHECK(e > 0, kOp, ": query, key and value need a positive last dimension for the default scale");
  const bool has_mask = attn_mask.has_value() && attn_mask->defined();
  TORCH_CHECK(!(has_mask && is_causal), kOp, ": pass attn_mask or is_causal, not both");
  const double sc = scale.has_value() ? *scale : 1.0 / std::sqrt(static_cast<double>(e));
  TORCH_CHECK(std::isfinite(sc), kOp, ": scale must be finite, got ", sc);

  at::Tensor out = at::empty({batch, lq, heads, ev}, query_in.options()).permute({0, 2, 1, 3});
  if (out.numel() == 0) return out;
  if (lk == 0) return out.zero_();  // no keys: the weighted sum of nothing
  const at::Tensor q = unit_last_stride(query_in), k = unit_last_stride(key_in), v = unit_last_stride(value_in);
  const at::Tensor mask = has_mask ? additive_mask(kOp, *attn_mask, {batch, heads, lq, lk}) : at::Tensor();

  kernels::AttentionArgs a{};
  a.q = q.data_ptr();
  a.k = k.data_ptr();
  a.v = v.data_ptr();
  a.out = out.data_ptr();
  for (int d = 0; d < 3; ++d) {
    a.q_strides[d] = q.stride(d);
    a.k_strides[d] = k.stride(d);
    a.v_strides[d] = v.stride(d);
    a.out_strides[d] = out.stride(d);
  }
  if (has_mask) {
    a.mask = mask.data_ptr<float>();
    for (int d = 0; d < 4; ++d) a.mask_strides[d] = mask.size(d) > 1 ? mask.stride(d) : 0;
  }
  a.heads = heads;
  a.lq = lq;
  a.lk = lk;
  a.e = e;
  a.ev = ev;
  a.scale = static_cast<float>(sc);
  a.causal = is_causal;
  // 64 query rows per task, fewer when that leaves threads without ~4 tasks each.
  const int64_t want_tasks = 4 * static_cast<int64_t>(at::get_num_threads());
  int64_t q_block = 64;
  while (q_block > 8 && batch * heads * ((lq + q_block - 1) / q_block) < want_tasks) q_block /= 2;
  a.q_block = std::min(q_block, lq);
  const int64_t tasks = batch * heads * ((lq + a.q_block - 1) / a.q_block);
  const auto fn = IPEX_LITE_KERNEL_TABLE(attention_kernels).forward[dtype == at::kFloat ? kernels::kF32 : kernels::kBF16];
  const int64_t scratch_bytes = kernels::attention_scratch_bytes(a.q_block, lk, e, ev);
  // grain 1: parallel_for hands each thread one contiguous run of tasks, so
  // consecutive query blocks of a head reuse its widened K^T.
  at::parallel_for(0, tasks, 1, [&](int64_t begin, int64_t end) {
    at::Tensor scratch = at::empty({scratch_bytes}, at::TensorOptions().dtype(at::kByte));
    fn(a, begin, end, scratch.data_ptr());
  });
  return out;
}

// Under autocast(cpu, bf16) attention runs in bf16, as torch's own SDPA does.
at::Tensor sdpa_autocast(const at::Tensor& query, const at::Tensor& key, const at::Tensor& value,
                         const std::optional<at::Tensor>& attn_mask, bool is_causal, std::optional<double> scale) {
  c10::impl::ExcludeDispatchKeyGuard no_autocast(c10::DispatchKey::AutocastCPU);
  const auto dtype = at::autocast::get_autocast_dtype(at::kCPU);
  auto cast = [&](const at::Tensor& t) {
    return dtype == at::kBFloat16 ? at::autocast::cached_cast(dtype, t, c10::DeviceType::CPU) : t;
  };
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("ipex_lite::scaled_dot_product_attention", "")
                             .typed<decltype(sdpa_cpu)>();
  return op.call(cast(query), cast(key), cast(value), attn_mask, is_causal, scale);
}

}  // namespace

at::Tensor additive_mask(const char* kOp, const at::Tensor& mask, at::IntArrayRef shape) {
  TORCH_CHECK(mask.device().is_cpu() && mask.layout() == at::kStrided, kOp,
              ": attn_mask must be a dense CPU tensor");
  const auto dt = mask.scalar_type();
  TORCH_CHECK(dt == at::kBool || dt == at::kFloat || dt == at::kBFloat16, kOp, ": attn_mask has dtype ", dt,
              "; expected bool, float32 or bfloat16");
  TORCH_CHECK(mask.dim() <= 4, kOp, ": attn_mask must have at most 4 dimensions, got shape ", mask.sizes());
  for (int64_t i = 1; i <= mask.dim(); ++i) {
    const int64_t m = mask.size(-i), want = shape[4 - i];
    TORCH_CHECK(m == want || m == 1, kOp, ": attn_mask of shape ", mask.sizes(),
                " does not broadcast to (batch, heads, query length, key length) = ", shape);
  }
  at::Tensor add;
  if (dt == at::kBool) {  // true: take part; false: masked out
    add = at::zeros(mask.sizes(), mask.options().dtype(at::kFloat))
              .masked_fill_(mask.logical_not(), -std::numeric_limits<float>::infinity());
  } else {
    add = mask.to(at::kFloat);
  }
  add = add.expand(shape);
  return add.size(3) > 1 && add.stride(3) > 1 ? add.contiguous() : add;
}

}  // namespace ipex_lite

TORCH_LIBRARY_FRAGMENT(ipex_lite, m) {
  m.def(
      "scaled_dot_product_attention(Tensor query, Tensor key, Tensor value, Tensor? attn_mask=None, "
      "bool is_causal=False, float? scale=None) -> Tensor");
}

TORCH_LIBRARY_IMPL(ipex_lite, CompositeExplicitAutograd, m) {
  m.impl("scaled_dot_product_attention", &ipex_lite::sdpa_cpu);
}

// Inference only: a gradient through it raises instead of being silently zero.
TORCH_LIBRARY_IMPL(ipex_lite, Autograd, m) {
  m.impl("scaled_dot_product_attention", torch::autograd::autogradNotImplementedFallback());
}

TORCH_LIBRARY_IMPL(ipex_lite, AutocastCPU, m) {
  m.impl("scaled_dot_product_attention", &ipex_lite::sdpa_autocast);
}
