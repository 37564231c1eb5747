// Per-tensor quantize / dequantize, compiled once per ISA level.  Written as
// plain loops over __restrict pointers: the clamps are `a > b ? a : b`
// (maxps/minps semantics, NaN -> the bound) so the compiler vectorises them.
#include "kernels/quantization_kernel.h"

namespace ipex_lite {
namespace kernels {
namespace IPEX_LITE_ISA_NS {
namespace {

template <typename Q, int QMIN, int QMAX>
void quantize_impl(const float* __restrict src, Q* __restrict dst, float inv_scale, float zero_point, int64_t begin,
                   int64_t end) {
  const float lo = static_cast<float>(QMIN), hi = static_cast<float>(QMAX);
  for (int64_t i = begin; i < end; ++i) {
    float v = __builtin_nearbyintf(src[i] * inv_scale) + zero_point;
    v = v > lo ? v : lo;
    v = v < hi ? v : hi;
    dst[i] = static_cast<Q>(static_cast<int32_t>(v));
  }
}

template <typename Q>
void dequantize_impl(const Q* __restrict src, float* __restrict dst, float scale, float zero_point, int64_t begin,
                     int64_t end) {
  for (int64_t i = begin; i < end; ++i) dst[i] = (static_cast<float>(src[i]) - zero_point) * scale;
}

}  // namespace

const QuantizationKernels& quantization_kernels() {
  static const QuantizationKernels table = {
      &quantize_impl<uint8_t, 0, 255>,
      &quantize_impl<int8_t, -128, 127>,
      &dequantize_impl<uint8_t>,
      &dequantize_impl<int8_t>,
  };
  return table;
}

}  // namespace IPEX_LITE_ISA_NS
}  // namespace kernels
}  // namespace ipex_lite
