// Weight-only quantized GEMV / dequantization, compiled once per ISA level (see woq_kernel.h for the layout).
//
// One weight row at a time (a single sequential stream per thread, as the bf16 decode kernel), up to four
// activation rows per pass over it.  Per group the integer weights are widened to fp32 and FMA'd into two
// accumulator chains; the group's scale multiplies the chain sum once, and the zero point enters as
// scale * zero * sum(x over the group), so the inner loop never subtracts it.
#include "kernels/woq_kernel.h"

namespace ipex_lite {
namespace kernels {
namespace IPEX_LITE_ISA_NS {
namespace {

template <int BITS>
inline float weight_at(const uint8_t* row, int64_t k) {
  if constexpr (BITS == kWoqInt8) {
    return static_cast<float>(static_cast<int8_t>(row[k]));
  } else {
    const int64_t j = k & 31;
    const uint8_t byte = row[(k >> 5) * 16 + (j & 15)];
    return static_cast<float>(j < 16 ? (byte & 15) : (byte >> 4));
  }
}

inline void store_out(const WoqArgs& a, int64_t i, int64_t n, float v) {
  v += a.bias != nullptr ? a.bias[n] : 0.f;
  if (a.y_bf16) {
    static_cast<uint16_t*>(a.y)[i * a.ldy + n] = f32_to_bf16(v);
  } else {
    static_cast<float*>(a.y)[i * a.ldy + n] = v;
  }
}

// res[i] = sum_k x[i, k] w[n, k] for the MB activation rows at x.
template <int BITS, int MB>
void gemv_row(const WoqArgs& a, const float* x, const float* xsum, int64_t n, float* res) {
  const int64_t groups = a.kp / a.group;
  const uint8_t* row = a.w + n * a.ldw;
  const float* sc = a.scales + n * groups;
  const float* zp = a.zeros != nullptr ? a.zeros + n * groups : nullptr;
  float zterm[MB] = {};
#if defined(__AVX512F__)
  __m512 tot[MB];
  for (int i = 0; i < MB; ++i) tot[i] = _mm512_setzero_ps();
  for (int64_t g = 0; g < groups; ++g) {
    __m512 acc[MB][2];
    for (int i = 0; i < MB; ++i) acc[i][0] = acc[i][1] = _mm512_setzero_ps();
    for (int64_t k = g * a.group; k < (g + 1) * a.group; k += 32) {
      __m512 w0, w1;
      if constexpr (BITS == kWoqInt8) {
        w0 = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(row + k))));
        w1 = _mm512_cvtepi32_ps(
            _mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(row + k + 16))));
      } else {
        const __m512i raw = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(row + k / 2)));
        w0 = _mm512_cvtepi32_ps(_mm512_and_si512(raw, _mm512_set1_epi32(15)));
        w1 = _mm512_cvtepi32_ps(_mm512_srli_epi32(raw, 4));
      }
#pragma GCC unroll 4
      for (int i = 0; i < MB; ++i) {
        acc[i][0] = _mm512_fmadd_ps(w0, _mm512_loadu_ps(x + i * a.kp + k), acc[i][0]);
        acc[i][1] = _mm512_fmadd_ps(w1, _mm512_loadu_ps(x + i * a.kp + k + 16), acc[i][1]);
      }
    }
    const __m512 s = _mm512_set1_ps(sc[g]);
    for (int i = 0; i < MB; ++i) {
      tot[i] = _mm512_fmadd_ps(_mm512_add_ps(acc[i][0], acc[i][1]), s, tot[i]);
      if (zp != nullptr) zterm[i] += sc[g] * zp[g] * xsum[i * groups + g];
    }
  }
  for (int i = 0; i < MB; ++i) res[i] = _mm512_reduce_add_ps(tot[i]) - zterm[i];
#else
  for (int i = 0; i < MB; ++i) res[i] = 0.f;
  for (int64_t g = 0; g < groups; ++g) {
    float acc[MB] = {};
    for (int64_t k = g * a.group; k < (g + 1) * a.group; ++k) {
      const float w = weight_at<BITS>(row, k);
      for (int i = 0; i < MB; ++i) acc[i] += w * x[i * a.kp + k];
    }
    for (int i = 0; i < MB; ++i) {
      res[i] += sc[g] * acc[i];
      if (zp != nullptr) zterm[i] += sc[g] * zp[g] * xsum[i * groups + g];
    }
  }
  for (int i = 0; i < MB; ++i) res[i] -= zterm[i];
#endif
}

template <int BITS>
void gemv(const WoqArgs& a, int64_t n_begin, int64_t n_end) {
  const int64_t groups = a.kp / a.group;
  float res[4];
  for (int64_t n = n_begin; n < n_end; ++n) {
    for (int64_t i0 = 0; i0 < a.m; i0 += 4) {
      const int64_t mb = min64(4, a.m - i0);
      const float* x = a.x + i0 * a.kp;
      const float* xs = a.xsum != nullptr ? a.xsum + i0 * groups : nullptr;
      switch (mb) {
        case 4: gemv_row<BITS, 4>(a, x, xs, n, res); break;
        case 3: gemv_row<BITS, 3>(a, x, xs, n, res); break;
        case 2: gemv_row<BITS, 2>(a, x, xs, n, res); break;
        default: gemv_row<BITS, 1>(a, x, xs, n, res); break;
      }
      for (int64_t i = 0; i < mb; ++i) store_out(a, i0 + i, n, res[i]);
    }
  }
}

template <int BITS>
void dequant(const WoqArgs& a, int64_t k, uint16_t* out, int64_t n_begin, int64_t n_end) {
  const int64_t groups = a.kp / a.group;
  for (int64_t n = n_begin; n < n_end; ++n) {
    const uint8_t* row = a.w + n * a.ldw;
    uint16_t* o = out + n * k;
    for (int64_t c = 0; c < k; ++c) {
      const int64_t g = c / a.group;
      const float z = a.zeros != nullptr ? a.zeros[n * groups + g] : 0.f;
      o[c] = f32_to_bf16((weight_at<BITS>(row, c) - z) * a.scales[n * groups + g]);
    }
  }
}

}  // namespace

const WoqKernels& woq_kernels() {
  static const WoqKernels table = {
      {&gemv<kWoqInt8>, &gemv<kWoqInt4>},
      {&dequant<kWoqInt8>, &dequant<kWoqInt4>},
  };
  return table;
}

}  // namespace IPEX_LITE_ISA_NS
}  // namespace kernels
}  // namespace ipex_lite
