// ipex_lite::packed_conv / packed_linear (+ _add variants, + packed_linear_mkl):
// torch's oneDNN convolution / linear ops (or MKL's packed sgemm) on a plain
// weight, packed on first use and kept in a process-wide cache.
//
// They exist for graphs: torch.jit.trace cannot hold oneDNN's opaque packed
// tensors as constants, so a traced (and frozen) optimized model holds the
// plain folded weights and calls these ops, and the packing happens here,
// on the machine that runs the graph (a saved graph loads anywhere).  The
// graph then runs without Python, so streams (ipex_lite.cpu.runtime) do not
// contend for the GIL either.  Eager modules keep their own per-module cache
// (ipex_lite/nn/prepacked.py).
//
// Cache key: the weight's storage (held weakly: a dead storage's entry is
// dropped), its offset and version (an in-place edit repacks), the calling
// thread's OpenMP team size and the input shape, both of which decide the
// layout oneDNN picks.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/core/stack.h>
#include <torch/csrc/autograd/autograd_not_implemented_fallback.h>
#include <torch/library.h>

#include <cstring>
#include <list>
#include <mutex>
#include <vector>

namespace ipex_lite {
namespace {

struct PackKey {
  const c10::StorageImpl* storage;
  int64_t offset;
  int64_t version;
  std::vector<int64_t> geometry;  // the weight's dtype, sizes and strides: views of one storage differ
  int threads;
  std::vector<int64_t> shape;  // input shape (conv) or {rows} (linear)
  bool operator==(const PackKey& o) const {
    return storage == o.storage && offset == o.offset && version == o.version && threads == o.threads &&
           geometry == o.geometry && shape == o.shape;
  }
};

struct PackEntry {
  PackKey key;
  c10::weak_intrusive_ptr<c10::StorageImpl> alive;
  at::Tensor packed;
};

class PackCache {
 public:
  // Entries beyond this are dropped oldest first: every weight of a model at
  // one or two shapes and team sizes fits.
  static constexpr size_t kMax = 1024;

  template <typename Build>
  at::Tensor get(const at::Tensor& weight, std::vector<int64_t> shape, const Build& build) {
    const auto& storage = weight.storage();
    std::vector<int64_t> geometry{static_cast<int64_t>(weight.scalar_type())};
    geometry.insert(geometry.end(), weight.sizes().begin(), weight.sizes().end());
    geometry.insert(geometry.end(), weight.strides().begin(), weight.strides().end());
    PackKey key{storage.unsafeGetStorageImpl(), weight.storage_offset(), weight._version(), std::move(geometry),
                at::get_num_threads(), std::move(shape)};
    {
      std::lock_guard<std::mutex> lock(mu_);
      for (auto it = entries_.begin(); it != entries_.end();) {
        if (it->alive.expired()) {  // its weight is gone: free the packed copy now
          it = entries_.erase(it);
        } else if (it->key == key) {
          entries_.splice(entries_.begin(), entries_, it);  // most recently used first
          return it->packed;
        } else {
          ++it;
        }
      }
    }
    at::Tensor packed = build();  // outside the lock: packing a large weight takes a while
    std::lock_guard<std::mutex> lock(mu_);
    while (entries_.size() >= kMax) entries_.pop_back();
    entries_.push_front(PackEntry{std::move(key), storage.getWeakStorageImpl(), packed});
    return packed;
  }

 private:
  std::mutex mu_;
  std::list<PackEntry> entries_;
};

PackCache& cache() {
  static PackCache c;
  return c;
}

// Boxed calls into torch's mkldnn / mkl ops: the argument IValues pass through as they came.
// Call sites look each handle up once (function-local statics): these ops run per layer call.
c10::OperatorHandle find(const char* name, const char* overload = "") {
  return c10::Dispatcher::singleton().findSchemaOrThrow(name, overload);
}

c10::IValue call(const c10::OperatorHandle& op, torch::jit::Stack stack) {
  op.callBoxed(&stack);
  return stack.empty() ? c10::IValue() : std::move(stack[0]);
}

void check_weight(const char* op, const at::Tensor& x, const at::Tensor& w, int64_t dim) {
  TORCH_CHECK(w.layout() == at::kStrided && w.device().is_cpu() && w.dim() == dim, op,
              ": weight must be a dense CPU tensor with ", dim, " dims, got ", w.sizes());
  TORCH_CHECK(x.device().is_cpu() && x.layout() == at::kStrided, op, ": input must be a dense CPU tensor");
  TORCH_CHECK(x.scalar_type() == w.scalar_type() && (w.scalar_type() == at::kFloat || w.scalar_type() == at::kBFloat16),
              op, ": input and weight must both be float32 or both bfloat16, got ", x.scalar_type(), " and ",
              w.scalar_type());
}

at::Tensor packed_conv_weight(const char* op, const at::Tensor& x, const at::Tensor& w, const c10::IValue& padding,
                              const c10::IValue& stride, const c10::IValue& dilation, int64_t groups) {
  check_weight(op, x, w, x.dim());
  TORCH_CHECK(x.dim() == 4 || x.dim() == 5, op, ": input must be 4-D or 5-D, got ", x.sizes());
  TORCH_CHECK(x.size(1) == w.size(1) * groups, op, ": input has ", x.size(1), " channels, the weight expects ",
              w.size(1) * groups);
  return cache().get(w, x.sizes().vec(), [&] {
    static const auto reorder = find("mkldnn::_reorder_convolution_weight");
    return call(reorder,
                {w.contiguous(), padding, stride, dilation, groups, c10::IValue(x.sizes().vec())})
        .toTensor();
  });
}

// The graph ops take their post-op scalars as float[] (the tracer cannot
// record Scalar?[]); torch's ops take Scalar?[].
c10::IValue scalars(const c10::IValue& v) {
  c10::List<std::optional<at::Scalar>> out;
  for (double s : v.toDoubleVector()) out.push_back(at::Scalar(s));
  return out;
}

enum class ConvAdd { kNone, kOut, kInPlace };

// packed_conv:      X, W, B, padding, stride, dilation, groups, attr, scalars, algorithm
// packed_conv_add:  X, other, W, B, padding, stride, dilation, groups, unary_attr, unary_scalars, unary_algorithm
// packed_conv_add_: other, X, W, ... as packed_conv_add; the sum is written into other and
//                   nothing returned (functionalization takes no aliased outputs of custom ops)
void packed_conv(torch::jit::Stack* stack, ConvAdd add) {
  const char* op = add == ConvAdd::kNone ? "packed_conv" : add == ConvAdd::kOut ? "packed_conv_add" : "packed_conv_add_";
  auto args = torch::jit::pop(*stack, add == ConvAdd::kNone ? 10 : 11);
  const size_t w_at = add == ConvAdd::kNone ? 1 : 2;
  const size_t x_at = add == ConvAdd::kInPlace ? 1 : 0;
  const at::Tensor x = args[x_at].toTensor();
  args[w_at] = packed_conv_weight(op, x, args[w_at].toTensor(), args[w_at + 2], args[w_at + 3], args[w_at + 4],
                                  args[w_at + 5].toInt());
  args[w_at + 7] = scalars(args[w_at + 7]);
  if (add != ConvAdd::kNone) {
    TORCH_CHECK(args[1 - x_at].toTensor().scalar_type() == x.scalar_type(), op, ": other must have the input's dtype");
    // torch's binary form: ..., groups, binary_attr, alpha, unary_attr, unary_scalars, unary_algorithm
    args.insert(args.begin() + w_at + 6, {c10::IValue("add"), c10::IValue()});
  }
  if (add == ConvAdd::kInPlace) {
    static const auto conv_add_ = find("mkldnn::_convolution_pointwise_", "binary");
    call(conv_add_, std::move(args));  // returns nothing: see the schema
    return;
  }
  static const auto conv = find("mkldnn::_convolution_pointwise");
  static const auto conv_add = find("mkldnn::_convolution_pointwise", "binary");
  torch::jit::push(*stack, call(add == ConvAdd::kNone ? conv : conv_add, std::move(args)));
}

void packed_conv_boxed(const c10::OperatorHandle&, torch::jit::Stack* s) { packed_conv(s, ConvAdd::kNone); }
void packed_conv_add_boxed(const c10::OperatorHandle&, torch::jit::Stack* s) { packed_conv(s, ConvAdd::kOut); }
void packed_conv_add__boxed(const c10::OperatorHandle&, torch::jit::Stack* s) { packed_conv(s, ConvAdd::kInPlace); }

// packed_linear:     X, W, B, attr, scalars, algorithm
// packed_linear_add: X, other, W, B (torch's binary form adds binary_attr "add")
void packed_linear(torch::jit::Stack* stack, bool add) {
  const char* op = add ? "packed_linear_add" : "packed_linear";
  auto args = torch::jit::pop(*stack, add ? 4 : 6);
  const size_t w_at = add ? 2 : 1;
  const at::Tensor x = args[0].toTensor();
  const at::Tensor w = args[w_at].toTensor();
  check_weight(op, x, w, 2);
  TORCH_CHECK(x.dim() >= 1 && x.size(-1) == w.size(1), op, ": input's last dimension is ",
              x.dim() ? x.size(-1) : 0, ", the weight expects ", w.size(1));
  const int64_t rows = x.size(-1) ? x.numel() / x.size(-1) : 0;
  args[w_at] = cache().get(w, {rows}, [&] {
    static const auto reorder = find("mkldnn::_reorder_linear_weight");
    return call(reorder, {w.contiguous(), std::max<int64_t>(1, rows)}).toTensor();
  });
  if (!x.is_contiguous()) args[0] = x.contiguous();
  if (add) {
    args.emplace_back("add");
  } else {
    args[4] = scalars(args[4]);
  }
  static const auto linear = find("mkldnn::_linear_pointwise");
  static const auto linear_add = find("mkldnn::_linear_pointwise", "binary");
  torch::jit::push(*stack, call(add ? linear_add : linear, std::move(args)));
}

// packed_linear_mkl: X, W, B (fp32): MKL's packed sgemm, which some shapes run faster
// than oneDNN (optimize's auto_kernel_selection picks it per layer).
void packed_linear_mkl(const c10::OperatorHandle&, torch::jit::Stack* stack) {
  auto args = torch::jit::pop(*stack, 3);
  const at::Tensor x = args[0].toTensor();
  const at::Tensor w = args[1].toTensor();
  check_weight("packed_linear_mkl", x, w, 2);
  TORCH_CHECK(w.scalar_type() == at::kFloat, "packed_linear_mkl: MKL's packed GEMM is float32 only, got ",
              w.scalar_type());
  TORCH_CHECK(x.dim() >= 1 && x.size(-1) == w.size(1), "packed_linear_mkl: input's last dimension is ",
              x.dim() ? x.size(-1) : 0, ", the weight expects ", w.size(1));
  const int64_t rows = std::max<int64_t>(1, x.size(-1) ? x.numel() / x.size(-1) : 0);
  const at::Tensor plain = w.contiguous();
  // {rows, -1}: never the key of a oneDNN pack of the same weight ({rows})
  const at::Tensor packed = cache().get(w, {rows, -1}, [&] {
    static const auto reorder = find("mkl::_mkl_reorder_linear_weight");
    return call(reorder, {plain, rows}).toTensor();
  });
  static const auto linear = find("mkl::_mkl_linear");
  torch::jit::push(*stack, call(linear, {x.contiguous(), packed, plain, args[2], rows}));
}

// ---- int8: torch's oneDNN int8 ops on plain int8 weights, for traced graphs of ipex_lite's
// QuantizedConv / QuantizedLinear (torch.jit.trace cannot record oneDNN's Scalar?[] arguments, and a
// prepacked int8 weight is no graph constant).  The weight is packed here on first use.

int64_t float_bits(double v) {
  float f = static_cast<float>(v);
  int32_t b;
  std::memcpy(&b, &f, sizeof(b));
  return b;
}

void check_qweight(const char* op, const at::Tensor& qx, const at::Tensor& qw, int64_t dim) {
  TORCH_CHECK(qw.device().is_cpu() && qw.layout() == at::kStrided && qw.scalar_type() == at::kChar && qw.dim() == dim,
              op, ": weight must be a dense int8 CPU tensor with ", dim, " dims, got ", qw.scalar_type(), " ",
              qw.sizes());
  TORCH_CHECK(qx.device().is_cpu() && qx.layout() == at::kStrided && qx.scalar_type() == at::kByte, op,
              ": input must be a dense uint8 CPU tensor, got ", qx.scalar_type());
}

// packed_qconv:     qx, x_scale, x_zp, qw, w_scales, w_zps, B, stride, padding, dilation, groups,
//                   out_scale, out_zp, out_dtype, attr, scalars, algorithm
// packed_qconv_add: qx, x_scale, x_zp, qw, w_scales, w_zps, accum, B, stride, padding, dilation, groups,
//                   out_scale, out_zp, out_dtype, accum_scale, accum_zp, unary_attr, unary_scalars,
//                   unary_algorithm (the sum goes into a copy of accum: no aliased output)
void packed_qconv(torch::jit::Stack* stack, bool add) {
  const char* op = add ? "packed_qconv_add" : "packed_qconv";
  auto args = torch::jit::pop(*stack, add ? 20 : 17);
  const size_t geo = add ? 8 : 7;  // index of stride
  const at::Tensor qx = args[0].toTensor();
  const at::Tensor qw = args[3].toTensor();
  check_qweight(op, qx, qw, qx.dim());
  TORCH_CHECK(qx.dim() == 3 || qx.dim() == 4, op, ": input must be 3-D or 4-D, got ", qx.sizes());
  const int64_t groups = args[geo + 3].toInt();
  TORCH_CHECK(qx.size(1) == qw.size(1) * groups, op, ": input has ", qx.size(1), " channels, the weight expects ",
              qw.size(1) * groups);
  const double x_scale = args[1].toDouble();
  const int64_t x_zp = args[2].toInt();
  std::vector<int64_t> key = qx.sizes().vec();
  key.insert(key.end(), {float_bits(x_scale), x_zp, -3});  // the int8 prepack bakes the input's qparams in
  const auto fmt = qx.dim() == 4 ? at::MemoryFormat::ChannelsLast : at::MemoryFormat::Contiguous;
  const at::Tensor x = qx.contiguous(fmt);
  args[0] = x;
  args[3] = cache().get(qw, std::move(key), [&] {
    static const auto prepack = find("onednn::qconv_prepack");
    return call(prepack, {qw.contiguous(), args[4], x_scale, x_zp, args[geo], args[geo + 1], args[geo + 2], groups,
                          c10::IValue(x.sizes().vec())})
        .toTensor();
  });
  if (add) {
    args[6] = args[6].toTensor().clone(fmt);
    args[18] = scalars(args[18]);
    // torch's binary form: ..., accum_scale, accum_zp, binary_attr, alpha, unary_attr, unary_scalars, unary_algorithm
    args.insert(args.begin() + 17, {c10::IValue("sum"), c10::IValue(at::Scalar(1.0))});
    static const auto qconv_add = find("onednn::qconv2d_pointwise", "binary");
    torch::jit::push(*stack, call(qconv_add, std::move(args)));
    return;
  }
  args[15] = scalars(args[15]);
  static const auto qconv = find("onednn::qconv_pointwise");
  torch::jit::push(*stack, call(qconv, std::move(args)));
}

void packed_qconv_boxed(const c10::OperatorHandle&, torch::jit::Stack* s) { packed_qconv(s, false); }
void packed_qconv_add_boxed(const c10::OperatorHandle&, torch::jit::Stack* s) { packed_qconv(s, true); }

// packed_qlinear: qx (2-D), x_scale, x_zp, qw, w_scales, w_zps, other (fp32, 2-D) or None, B, out_scale, out_zp,
//                 out_dtype, attr, scalars, algorithm
void packed_qlinear(const c10::OperatorHandle&, torch::jit::Stack* stack) {
  const char* op = "packed_qlinear";
  auto args = torch::jit::pop(*stack, 14);
  const at::Tensor qx = args[0].toTensor();
  const at::Tensor qw = args[3].toTensor();
  check_qweight(op, qx, qw, 2);
  TORCH_CHECK(qx.dim() == 2 && qx.size(1) == qw.size(1), op, ": input must be (rows, ", qw.size(1), "), got ",
              qx.sizes());
  const int64_t rows = qx.size(0);
  args[0] = qx.contiguous();
  args[3] = cache().get(qw, {rows, -4}, [&] {
    static const auto prepack = find("onednn::qlinear_prepack");
    return call(prepack, {qw.contiguous(), c10::IValue(std::vector<int64_t>{std::max<int64_t>(1, rows), qw.size(1)})})
        .toTensor();
  });
  args[12] = scalars(args[12]);
  const c10::IValue other = args[6];
  if (other.isNone()) {
    args.erase(args.begin() + 6);
    static const auto qlinear = find("onednn::qlinear_pointwise");
    torch::jit::push(*stack, call(qlinear, std::move(args)));
    return;
  }
  // torch's binary form: ..., out_dtype, other_scale, other_zp, binary_post_op, binary_alpha, unary_post_op, ...
  args.insert(args.begin() + 11, {c10::IValue(1.0), c10::IValue(int64_t{0}), c10::IValue("add"), c10::IValue(1.0)});
  static const auto qlinear_add = find("onednn::qlinear_pointwise", "binary");
  torch::jit::push(*stack, call(qlinear_add, std::move(args)));
}

void packed_linear_boxed(const c10::OperatorHandle&, torch::jit::Stack* s) { packed_linear(s, false); }
void packed_linear_add_boxed(const c10::OperatorHandle&, torch::jit::Stack* s) { packed_linear(s, true); }

}  // namespace
}  // namespace ipex_lite

TORCH_LIBRARY_FRAGMENT(ipex_lite, m) {
  m.def("packed_conv(Tensor X, Tensor W, Tensor? B, int[] padding, int[] stride, int[] dilation, int groups, "
        "str attr, float[] scalars, str? algorithm) -> Tensor");
  m.def("packed_conv_add(Tensor X, Tensor other, Tensor W, Tensor? B, int[] padding, int[] stride, int[] dilation, "
        "int groups, str? unary_attr, float[] unary_scalars, str? unary_algorithm) -> Tensor");
  m.def("packed_conv_add_(Tensor(a!) other, Tensor X, Tensor W, Tensor? B, int[] padding, int[] stride, "
        "int[] dilation, int groups, str? unary_attr, float[] unary_scalars, str? unary_algorithm) -> ()");
  m.def("packed_linear(Tensor X, Tensor W, Tensor? B, str attr, float[] scalars, str? algorithm) -> Tensor");
  m.def("packed_linear_add(Tensor X, Tensor other, Tensor W, Tensor? B) -> Tensor");
  m.def("packed_linear_mkl(Tensor X, Tensor W, Tensor? B) -> Tensor");
  m.def("packed_qconv(Tensor qx, float x_scale, int x_zp, Tensor qw, Tensor w_scales, Tensor w_zps, Tensor? B, "
        "int[] stride, int[] padding, int[] dilation, int groups, float out_scale, int out_zp, ScalarType out_dtype, "
        "str attr, float[] scalars, str algorithm) -> Tensor");
  m.def("packed_qconv_add(Tensor qx, float x_scale, int x_zp, Tensor qw, Tensor w_scales, Tensor w_zps, "
        "Tensor accum, Tensor? B, int[] stride, int[] padding, int[] dilation, int groups, float out_scale, "
        "int out_zp, ScalarType out_dtype, float accum_scale, int accum_zp, str? unary_attr, float[] unary_scalars, "
        "str? unary_algorithm) -> Tensor");
  m.def("packed_qlinear(Tensor qx, float x_scale, int x_zp, Tensor qw, Tensor w_scales, Tensor w_zps, "
        "Tensor? other, Tensor? B, float out_scale, int out_zp, ScalarType out_dtype, str attr, float[] scalars, "
        "str algorithm) -> Tensor");
}

TORCH_LIBRARY_IMPL(ipex_lite, CPU, m) {
  m.impl("packed_conv", torch::CppFunction::makeFromBoxedFunction<&ipex_lite::packed_conv_boxed>());
  m.impl("packed_conv_add", torch::CppFunction::makeFromBoxedFunction<&ipex_lite::packed_conv_add_boxed>());
  m.impl("packed_conv_add_", torch::CppFunction::makeFromBoxedFunction<&ipex_lite::packed_conv_add__boxed>());
  m.impl("packed_linear", torch::CppFunction::makeFromBoxedFunction<&ipex_lite::packed_linear_boxed>());
  m.impl("packed_linear_add", torch::CppFunction::makeFromBoxedFunction<&ipex_lite::packed_linear_add_boxed>());
  m.impl("packed_linear_mkl", torch::CppFunction::makeFromBoxedFunction<&ipex_lite::packed_linear_mkl>());
  m.impl("packed_qconv", torch::CppFunction::makeFromBoxedFunction<&ipex_lite::packed_qconv_boxed>());
  m.impl("packed_qconv_add", torch::CppFunction::makeFromBoxedFunction<&ipex_lite::packed_qconv_add_boxed>());
  m.impl("packed_qlinear", torch::CppFunction::makeFromBoxedFunction<&ipex_lite::packed_qlinear>());
}

// Inference ops: calling them on tensors that need gradients is an error, not a silent detach.
TORCH_LIBRARY_IMPL(ipex_lite, Autograd, m) {
  for (const char* name :
       {"packed_conv", "packed_conv_add", "packed_conv_add_", "packed_linear", "packed_linear_add", "packed_linear_mkl",
        "packed_qconv", "packed_qconv_add", "packed_qlinear"})
    m.impl(name, torch::autograd::autogradNotImplementedFallback());
}
