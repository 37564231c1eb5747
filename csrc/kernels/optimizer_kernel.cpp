// Fused optimizer steps, compiled once per ISA level (see setup.py).
//
// Each step reads the parameter (and its trail or copy), the gradient and
// the state once and writes them once.  The loops are written element-wise
// over __restrict pointers with the storage mode and gradient type as
// template parameters, so every instantiation is a branch-free loop that the
// compiler vectorises with the level's -m flags (zmm at the AVX-512 levels).
#include "kernels/optimizer_kernel.h"

namespace ipex_lite {
namespace kernels {
namespace IPEX_LITE_ISA_NS {
namespace {

template <int MODE>
inline float load_param(const void* p, const void* p2, int64_t i) {
  if constexpr (MODE == kModeSplit) {
    return join_halves(static_cast<const uint16_t*>(p)[i], static_cast<const uint16_t*>(p2)[i]);
  } else {
    return static_cast<const float*>(p)[i];
  }
}

template <int MODE>
inline void store_param(void* p, void* p2, int64_t i, float w) {
  if constexpr (MODE == kModeSplit) {
    split_halves(w, static_cast<uint16_t*>(p) + i, static_cast<uint16_t*>(p2) + i);
  } else {
    static_cast<float*>(p)[i] = w;
    if constexpr (MODE == kModeCopy) static_cast<uint16_t*>(p2)[i] = f32_to_bf16(w);
  }
}

// torch.optim.SGD (foreach=False) arithmetic, in fp32.
template <int MODE, bool GB16>
void sgd_impl(const OptStepArgs& a, int64_t begin, int64_t end) {
  void* __restrict p = a.param;
  void* __restrict p2 = a.param2;
  const void* __restrict g = a.grad;
  float* __restrict buf = a.state1;
  const float lr = a.lr, wd = a.weight_decay, mom = a.momentum, damp = 1.0f - a.dampening;
  if (mom == 0.0f) {
    for (int64_t i = begin; i < end; ++i) {
      const float w = load_param<MODE>(p, p2, i);
      const float d = (wd != 0.0f ? load_f32<GB16>(g, i) + wd * w : load_f32<GB16>(g, i));
      store_param<MODE>(p, p2, i, w - lr * d);
    }
  } else if (a.first_step) {
    for (int64_t i = begin; i < end; ++i) {
      const float w = load_param<MODE>(p, p2, i);
      const float d = (wd != 0.0f ? load_f32<GB16>(g, i) + wd * w : load_f32<GB16>(g, i));
      buf[i] = d;
      store_param<MODE>(p, p2, i, w - lr * (a.nesterov ? d + mom * d : d));
    }
  } else {
    for (int64_t i = begin; i < end; ++i) {
      const float w = load_param<MODE>(p, p2, i);
      const float d = (wd != 0.0f ? load_f32<GB16>(g, i) + wd * w : load_f32<GB16>(g, i));
      const float b = mom * buf[i] + damp * d;
      buf[i] = b;
      store_param<MODE>(p, p2, i, w - lr * (a.nesterov ? d + mom * b : b));
    }
  }
}

// torch.optim.Adam / AdamW (foreach=False) arithmetic, in fp32.
template <int MODE, bool GB16>
void adam_impl(const OptStepArgs& a, int64_t begin, int64_t end) {
  void* __restrict p = a.param;
  void* __restrict p2 = a.param2;
  const void* __restrict g = a.grad;
  float* __restrict m = a.state1;
  float* __restrict v = a.state2;
  float* __restrict vmax = a.state3;
  const float lr = a.lr, wd = a.weight_decay, b1 = a.beta1, b2 = a.beta2, eps = a.eps;
  const float step_size = a.step_size, bc2s = a.bias_correction2_sqrt;
  const float decay = a.decoupled_weight_decay ? 1.0f - lr * wd : 1.0f;
  const float l2 = a.decoupled_weight_decay ? 0.0f : wd;
  for (int64_t i = begin; i < end; ++i) {
    const float w = load_param<MODE>(p, p2, i) * decay;
    const float d = (l2 != 0.0f ? load_f32<GB16>(g, i) + l2 * w : load_f32<GB16>(g, i));
    const float mi = m[i] + (1.0f - b1) * (d - m[i]);  // torch's lerp form
    const float vi = b2 * v[i] + (1.0f - b2) * d * d;
    m[i] = mi;
    v[i] = vi;
    float vv = vi;
    if (a.amsgrad) {
      vv = vmax[i] > vi ? vmax[i] : vi;
      vmax[i] = vv;
    }
    const float denom = __builtin_sqrtf(vv) / bc2s + eps;
    store_param<MODE>(p, p2, i, w - step_size * (mi / denom));
  }
}

// torch.optim.Adagrad (foreach=False) arithmetic; lr is the decayed clr.
template <int MODE, bool GB16>
void adagrad_impl(const OptStepArgs& a, int64_t begin, int64_t end) {
  void* __restrict p = a.param;
  void* __restrict p2 = a.param2;
  const void* __restrict g = a.grad;
  float* __restrict sum = a.state1;
  const float clr = a.lr, wd = a.weight_decay, eps = a.eps;
  for (int64_t i = begin; i < end; ++i) {
    const float w = load_param<MODE>(p, p2, i);
    const float d = (wd != 0.0f ? load_f32<GB16>(g, i) + wd * w : load_f32<GB16>(g, i));
    const float s = sum[i] + d * d;
    sum[i] = s;
    store_param<MODE>(p, p2, i, w - clr * (d / (__builtin_sqrtf(s) + eps)));
  }
}

// Lamb (IPEX's Lamb arithmetic): u = (m / bc1) / (sqrt(v / bc2) + eps) + wd * w.
inline float lamb_direction(const OptStepArgs& a, float m, float v, float w) {
  return (m / a.bias_correction1) / (__builtin_sqrtf(v / a.bias_correction2) + a.eps) + a.weight_decay * w;
}

// Sums of squares go through 16 fixed lanes so that the loop vectorises
// without reassociation flags and the result does not depend on the ISA.
constexpr int kLanes = 16;

template <int MODE, bool GB16>
void lamb_moments_impl(const OptStepArgs& a, int64_t begin, int64_t end, double* sq) {
  const void* __restrict p = a.param;
  const void* __restrict p2 = a.param2;
  const void* __restrict g = a.grad;
  float* __restrict m = a.state1;
  float* __restrict v = a.state2;
  const float b1 = a.beta1, b2 = a.beta2;
  float wsq[kLanes] = {}, usq[kLanes] = {};
  auto one = [&](int64_t i, int lane) {
    const float d = load_f32<GB16>(g, i);
    const float mi = b1 * m[i] + (1.0f - b1) * d;
    const float vi = b2 * v[i] + (1.0f - b2) * d * d;
    m[i] = mi;
    v[i] = vi;
    const float w = load_param<MODE>(p, p2, i);
    const float u = lamb_direction(a, mi, vi, w);
    wsq[lane] += w * w;
    usq[lane] += u * u;
  };
  int64_t i = begin;
  for (; i + kLanes <= end; i += kLanes)
    for (int j = 0; j < kLanes; ++j) one(i + j, j);
  for (int j = 0; i < end; ++i, ++j) one(i, j);
  double ws = 0, us = 0;
  for (int j = 0; j < kLanes; ++j) {
    ws += wsq[j];
    us += usq[j];
  }
  sq[0] = ws;
  sq[1] = us;
}

template <int MODE>
void lamb_update_impl(const OptStepArgs& a, int64_t begin, int64_t end) {
  void* __restrict p = a.param;
  void* __restrict p2 = a.param2;
  const float* __restrict m = a.state1;
  const float* __restrict v = a.state2;
  const float step = a.step_size;
  for (int64_t i = begin; i < end; ++i) {
    const float w = load_param<MODE>(p, p2, i);
    store_param<MODE>(p, p2, i, w - step * lamb_direction(a, m[i], v[i], w));
  }
}

template <bool GB16>
void packed_add_impl(uint16_t* __restrict top, uint16_t* __restrict trail, const void* __restrict g, float alpha,
                     int64_t begin, int64_t end) {
  for (int64_t i = begin; i < end; ++i)
    split_halves(join_halves(top[i], trail[i]) + alpha * load_f32<GB16>(g, i), top + i, trail + i);
}

void split_impl(const float* __restrict src, uint16_t* __restrict top, uint16_t* __restrict trail, int64_t begin,
                int64_t end) {
  for (int64_t i = begin; i < end; ++i) split_halves(src[i], top + i, trail + i);
}

void join_impl(const uint16_t* __restrict top, const uint16_t* __restrict trail, float* __restrict dst, int64_t begin,
               int64_t end) {
  for (int64_t i = begin; i < end; ++i) dst[i] = join_halves(top[i], trail[i]);
}

}  // namespace

const OptimizerKernels& optimizer_kernels() {
  static const OptimizerKernels table = {
      {{&sgd_impl<kModeFp32, false>, &sgd_impl<kModeFp32, true>},
       {&sgd_impl<kModeCopy, false>, &sgd_impl<kModeCopy, true>},
       {&sgd_impl<kModeSplit, false>, &sgd_impl<kModeSplit, true>}},
      {{&adam_impl<kModeFp32, false>, &adam_impl<kModeFp32, true>},
       {&adam_impl<kModeCopy, false>, &adam_impl<kModeCopy, true>},
       {&adam_impl<kModeSplit, false>, &adam_impl<kModeSplit, true>}},
      {{&adagrad_impl<kModeFp32, false>, &adagrad_impl<kModeFp32, true>},
       {&adagrad_impl<kModeCopy, false>, &adagrad_impl<kModeCopy, true>},
       {&adagrad_impl<kModeSplit, false>, &adagrad_impl<kModeSplit, true>}},
      {{&lamb_moments_impl<kModeFp32, false>, &lamb_moments_impl<kModeFp32, true>},
       {&lamb_moments_impl<kModeCopy, false>, &lamb_moments_impl<kModeCopy, true>},
       {&lamb_moments_impl<kModeSplit, false>, &lamb_moments_impl<kModeSplit, true>}},
      {&lamb_update_impl<kModeFp32>, &lamb_update_impl<kModeCopy>, &lamb_update_impl<kModeSplit>},
      {&packed_add_impl<false>, &packed_add_impl<true>},
      &split_impl,
      &join_impl,
  };
  return table;
}

}  // namespace IPEX_LITE_ISA_NS
}  // namespace kernels
}  // namespace ipex_lite
