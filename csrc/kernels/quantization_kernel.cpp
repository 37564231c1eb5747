// Per-tensor quantize / dequantize and per-row symmetric quantize, compiled once per ISA level.  Written as
// plain loops over __restrict pointers: the clamps are `a > b ? a : b`
// (maxps/minps semantics, NaN -> the bound) so the compiler vectorises them.
#include "kernels/quantization_kernel.h"

#include "kernels/kernel_common.h"

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

void quantize_rows_u8_impl(const float* __restrict src, uint8_t* __restrict dst, float* __restrict scales, int64_t k,
                           int64_t row_begin, int64_t row_end) {
  for (int64_t r = row_begin; r < row_end; ++r) {
    const float* __restrict x = src + r * k;
    // max(|x|, m) keeps m when x is NaN (maxps returns its second operand), so a NaN never sets the
    // row's scale
    float amax = 0.f;
    int64_t i = 0;
#if defined(__AVX512F__)
    __m512 m = _mm512_setzero_ps();
    for (; i + 16 <= k; i += 16) m = _mm512_max_ps(_mm512_abs_ps(_mm512_loadu_ps(x + i)), m);
    amax = _mm512_reduce_max_ps(m);
#elif defined(__AVX2__)
    const __m256 sign = _mm256_set1_ps(-0.f);
    __m256 m = _mm256_setzero_ps();
    for (; i + 8 <= k; i += 8) m = _mm256_max_ps(_mm256_andnot_ps(sign, _mm256_loadu_ps(x + i)), m);
    alignas(32) float lanes[8];
    _mm256_store_ps(lanes, m);
    for (float v : lanes) amax = v > amax ? v : amax;
#endif
    for (; i < k; ++i) {
      const float a = __builtin_fabsf(x[i]);
      amax = a > amax ? a : amax;
    }
    const float scale = amax > 0.f ? amax / 127.f : 1.f;
    scales[r] = scale;
    quantize_impl<uint8_t, 1, 255>(x, dst + r * k, 1.f / scale, 128.f, 0, k);
  }
}

void lookup_u8_impl(const uint8_t* __restrict src, uint8_t* __restrict dst, const uint8_t* __restrict table,
                    int64_t begin, int64_t end) {
  uint8_t t[256];  // a local copy: the compiler knows it aliases neither src nor dst
  for (int i = 0; i < 256; ++i) t[i] = table[i];
  for (int64_t i = begin; i < end; ++i) dst[i] = t[src[i]];
}

}  // namespace

const QuantizationKernels& quantization_kernels() {
  static const QuantizationKernels table = {
      &quantize_impl<uint8_t, 0, 255>,
      &quantize_impl<int8_t, -128, 127>,
      &dequantize_impl<uint8_t>,
      &dequantize_impl<int8_t>,
      &quantize_rows_u8_impl,
      &lookup_u8_impl,
  };
  return table;
}

}  // namespace IPEX_LITE_ISA_NS
}  // namespace kernels
}  // namespace ipex_lite
