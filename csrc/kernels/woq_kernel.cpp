// Weight-only quantized GEMV / dequantization, compiled once per ISA level (see woq_kernel.h for the layout).
//
// One weight row at a time (a single sequential stream per thread, as the bf16 decode kernel), up to four
// activation rows per pass over it.  Per group the integer weights are widened to fp32 and FMA'd into two
// accumulator chains; the group's scale multiplies the chain sum once, and the zero point enters as
// scale * zero * sum(x over the group), so the inner loop never subtracts it.
#include "kernels/woq_kernel.h"

#include <type_traits>

namespace ipex_lite {
namespace kernels {
namespace IPEX_LITE_ISA_NS {
namespace {

template <int BITS>
inline float weight_at(const uint8_t* row, int64_t k, const float* codebook) {
  if constexpr (BITS == kWoqInt8) {
    return static_cast<float>(static_cast<int8_t>(row[k]));
  } else {
    const int64_t j = k & 31;
    const uint8_t byte = row[(k >> 5) * 16 + (j & 15)];
    const int q = j < 16 ? (byte & 15) : (byte >> 4);
    return codebook != nullptr ? codebook[q] : static_cast<float>(q);
  }
}

inline void store_out(const WoqArgs& a, int64_t i, int64_t n, float v) {
  store_biased(a.y, a.y_bf16, i * a.ldy + n, v, a.bias, n);
}

#if defined(__AVX512F__)
// 16 nibbles (one per 32-bit lane) as fp32: the integer, or its code book entry (vpermps reads 4 index bits)
inline __m512 int4_values(__m512i q, const float* codebook) {
  return codebook != nullptr ? _mm512_permutexvar_ps(q, _mm512_loadu_ps(codebook)) : _mm512_cvtepi32_ps(q);
}
#endif

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
        w0 = int4_values(_mm512_and_si512(raw, _mm512_set1_epi32(15)), a.codebook);
        w1 = int4_values(_mm512_srli_epi32(raw, 4), a.codebook);
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
      const float w = weight_at<BITS>(row, k, a.codebook);
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

#if defined(__AVX512F__)
// sum over groups of sc[g] (off + zp[g]) xsum[g]: the offset and zero-point term of one weight row against
// one activation row, 16 groups per step
inline float offset_term(const float* sc, const float* zp, const float* xsum, int64_t groups, float off) {
  __m512 acc = _mm512_setzero_ps();
  for (int64_t g = 0; g < groups; g += 16) {
    const __mmask16 mk = groups - g >= 16 ? __mmask16(0xffff) : __mmask16((1u << (groups - g)) - 1);
    __m512 o = _mm512_set1_ps(off);
    if (zp != nullptr) o = _mm512_add_ps(o, _mm512_maskz_loadu_ps(mk, zp + g));
    const __m512 so = _mm512_mul_ps(_mm512_maskz_loadu_ps(mk, sc + g), o);
    acc = _mm512_fmadd_ps(so, _mm512_maskz_loadu_ps(mk, xsum + g), acc);
  }
  return _mm512_reduce_add_ps(acc);
}
#endif

#if defined(__AVX512BF16__)
// vpternlog immediates: (a & b) | c and (a & b) ^ c
constexpr int kAndOr = 0xEA, kAndXor = 0x6A;
// int4 rows are short streams (1 KB for 2048 inputs): a software prefetch 2 KB ahead made the DRAM-resident
// GEMV 12-15% faster on Zen 4; for int8 it measured slower, so only the int4 kernel issues it
constexpr int64_t kPrefetchBytes = 2048;

// bf16 activations (exact) against 4-bit pieces of the weights, 32 products per vdpbf16ps.  A value v < 16
// in a 16-bit lane OR 0x4300 is the bf16 number 128 + v exactly, so widening needs no conversion; the
// 128 offsets come back out through the per-group sums of x.  This halves the instructions per weight
// byte of the fp32 path, which could not keep up with memory (int8 ran at 19 GB/s against bf16's 47).


inline __m512bh offset_bf16(__m512i v) { return (__m512bh)_mm512_or_si512(v, _mm512_set1_epi16(0x4300)); }

// int4: 32 bytes are two 32-input blocks; widened to 16-bit lanes their low nibbles are inputs
// [0, 16) [32, 48) and their high nibbles [16, 32) [48, 64) -- x_bf16_lanes' order for these groups.
// fp32 lanes 0-7 then hold the first block's products, 8-15 the second's, so a block pair may straddle
// two groups (group 32 or 64; larger groups take gemv_row_int4_lanes).
// sum x (q - z) = sum x (128 + q) - (128 + z) sum x.
template <int MB>
void gemv_row_int4_bf16(const WoqArgs& a, int64_t i0, int64_t n, float* res) {
  const int64_t groups = a.kp / a.group, k64 = a.kp / 64 * 64;
  const uint8_t* row = a.w + n * a.ldw;
  const float* sc = a.scales + n * groups;
  const float* zp = a.zeros != nullptr ? a.zeros + n * groups : nullptr;
  // two accumulator chains (even / odd 64-input blocks, unrolled so they stay in registers): one chain's
  // FMA latency would bound a core below memory speed
  __m512 tot[MB], tot1[MB];
  for (int i = 0; i < MB; ++i) tot[i] = tot1[i] = _mm512_setzero_ps();
  int64_t ga = 0, end_a = a.group;  // the group of a block's first 32 inputs, and where that group ends
  auto block = [&](int64_t k0, __m512* acc_out) {
    while (k0 >= end_a) {  // no division in the loop
      ++ga;
      end_a += a.group;
    }
    const __m512i u = _mm512_cvtepu8_epi16(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(row + k0 / 2)));
    const __m512bh wl = offset_bf16(_mm512_and_si512(u, _mm512_set1_epi16(15)));
    const __m512bh wh = offset_bf16(_mm512_srli_epi16(u, 4));
    const __m512 s = k0 + 32 < end_a ? _mm512_set1_ps(sc[ga])
                                     : _mm512_mask_blend_ps(0xff00, _mm512_set1_ps(sc[ga]), _mm512_set1_ps(sc[ga + 1]));
#pragma GCC unroll 4
    for (int i = 0; i < MB; ++i) {
      const uint16_t* x4 = a.x_bf16_lanes + (i0 + i) * a.kp + k0;
      __m512 acc = _mm512_dpbf16_ps(_mm512_setzero_ps(), (__m512bh)_mm512_loadu_si512(x4), wl);
      acc = _mm512_dpbf16_ps(acc, (__m512bh)_mm512_loadu_si512(x4 + 32), wh);
      acc_out[i] = _mm512_fmadd_ps(acc, s, acc_out[i]);
    }
  };
  int64_t k0 = 0;
  for (; k0 + 128 <= k64; k0 += 128) {
    block(k0, tot);
    block(k0 + 64, tot1);
  }
  if (k0 < k64) block(k0, tot);
  for (int i = 0; i < MB; ++i) tot[i] = _mm512_add_ps(tot[i], tot1[i]);
  if (k64 < a.kp) {  // a last 32-input block: widened to fp32 like the portable path, with the same +128
    const __m512i raw = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(row + k64 / 2)));
    const __m512 off = _mm512_set1_ps(128.f);
    const __m512 w0 = _mm512_add_ps(_mm512_cvtepi32_ps(_mm512_and_si512(raw, _mm512_set1_epi32(15))), off);
    const __m512 w1 = _mm512_add_ps(_mm512_cvtepi32_ps(_mm512_srli_epi32(raw, 4)), off);
    const __m512 s = _mm512_set1_ps(sc[k64 / a.group]);
    for (int i = 0; i < MB; ++i) {
      const float* x = a.x + (i0 + i) * a.kp + k64;
      const __m512 acc = _mm512_fmadd_ps(w1, _mm512_loadu_ps(x + 16), _mm512_mul_ps(w0, _mm512_loadu_ps(x)));
      tot[i] = _mm512_fmadd_ps(acc, s, tot[i]);
    }
  }
  for (int i = 0; i < MB; ++i)
    res[i] = _mm512_reduce_add_ps(tot[i]) - offset_term(sc, zp, a.xsum + (i0 + i) * groups, groups, 128.f);
}

// int4, groups of a multiple of 128: a 64-byte load is 32 16-bit lanes of four nibbles each, and nibble v
// of every lane, masked and ORed with 0x4300 in one ternary-logic instruction, is a bf16 vector of 32
// inputs (x_bf16_lanes' order): no widening shuffle, 7 integer instructions per 128 weights.  One
// accumulator chain per nibble, so no chain waits on another's vdpbf16ps.
template <int MB, bool CODEBOOK>
void gemv_row_int4_lanes(const WoqArgs& a, int64_t i0, int64_t n, float* res) {
  const int64_t groups = a.kp / a.group;
  const uint8_t* row = a.w + n * a.ldw;
  const float* sc = a.scales + n * groups;
  const float* zp = a.zeros != nullptr ? a.zeros + n * groups : nullptr;
  const __m512i nib = _mm512_set1_epi16(15), off = _mm512_set1_epi16(0x4300);
  __m512i table = nib;
  if constexpr (CODEBOOK) {
    const __m256i half = f32x16_to_bf16(_mm512_loadu_ps(a.codebook));
    table = _mm512_inserti64x4(_mm512_castsi256_si512(half), half, 1);
  }
  __m512 tot[MB];
  for (int i = 0; i < MB; ++i) tot[i] = _mm512_setzero_ps();
  for (int64_t g = 0; g < groups; ++g) {
    __m512 acc[MB][4];
    for (int i = 0; i < MB; ++i) acc[i][0] = acc[i][1] = acc[i][2] = acc[i][3] = _mm512_setzero_ps();
    for (int64_t k = g * a.group; k < (g + 1) * a.group; k += 128) {
      _mm_prefetch(reinterpret_cast<const char*>(row + k / 2) + kPrefetchBytes, _MM_HINT_T0);
      const __m512i w = _mm512_loadu_si512(row + k / 2);
      __m512bh p0, p1, p2, p3;
      if constexpr (CODEBOOK) {  // vpermw reads 5 index bits: the table holds the code book twice
        p0 = (__m512bh)_mm512_permutexvar_epi16(w, table);
        p1 = (__m512bh)_mm512_permutexvar_epi16(_mm512_srli_epi16(w, 4), table);
        p2 = (__m512bh)_mm512_permutexvar_epi16(_mm512_srli_epi16(w, 8), table);
        p3 = (__m512bh)_mm512_permutexvar_epi16(_mm512_srli_epi16(w, 12), table);
      } else {
        p0 = (__m512bh)_mm512_ternarylogic_epi32(w, nib, off, kAndOr);
        p1 = (__m512bh)_mm512_ternarylogic_epi32(_mm512_srli_epi16(w, 4), nib, off, kAndOr);
        p2 = (__m512bh)_mm512_ternarylogic_epi32(_mm512_srli_epi16(w, 8), nib, off, kAndOr);
        p3 = (__m512bh)_mm512_or_si512(_mm512_srli_epi16(w, 12), off);
      }
#pragma GCC unroll 4
      for (int i = 0; i < MB; ++i) {
        const uint16_t* x = a.x_bf16_lanes + (i0 + i) * a.kp + k;
        acc[i][0] = _mm512_dpbf16_ps(acc[i][0], (__m512bh)_mm512_loadu_si512(x), p0);
        acc[i][1] = _mm512_dpbf16_ps(acc[i][1], (__m512bh)_mm512_loadu_si512(x + 32), p1);
        acc[i][2] = _mm512_dpbf16_ps(acc[i][2], (__m512bh)_mm512_loadu_si512(x + 64), p2);
        acc[i][3] = _mm512_dpbf16_ps(acc[i][3], (__m512bh)_mm512_loadu_si512(x + 96), p3);
      }
    }
    const __m512 s = _mm512_set1_ps(sc[g]);
    for (int i = 0; i < MB; ++i) {
      const __m512 sum = _mm512_add_ps(_mm512_add_ps(acc[i][0], acc[i][1]), _mm512_add_ps(acc[i][2], acc[i][3]));
      tot[i] = _mm512_fmadd_ps(sum, s, tot[i]);
    }
  }
  for (int i = 0; i < MB; ++i) {
    res[i] = _mm512_reduce_add_ps(tot[i]);
    if constexpr (!CODEBOOK) res[i] -= offset_term(sc, zp, a.xsum + (i0 + i) * groups, groups, 128.f);
  }
}

// int8, one activation row, groups of a multiple of 64: a 64-byte load is 32 16-bit lanes holding an even
// and an odd input's weight; the low and high nibbles of u = q + 128 come out as bf16 (128 + nibble) by one
// shift and one ternary-logic instruction each (u's high nibble is the stored byte's XOR 8, folded into the same
// instruction).  sum x q = sum x (128 + lo) + 16 sum x (128 + hi) - 2304 sum x.
void gemv_row_int8_lanes(const WoqArgs& a, int64_t i0, int64_t n, float* res) {
  const int64_t groups = a.kp / a.group;
  const uint8_t* row = a.w + n * a.ldw;
  const float* sc = a.scales + n * groups;
  const uint16_t* x = a.x_bf16_lanes + i0 * a.kp;
  const __m512i nib = _mm512_set1_epi16(15), off = _mm512_set1_epi16(0x4300), off_hi = _mm512_set1_epi16(0x4308);
  __m512 tot = _mm512_setzero_ps();
  // two 64-input blocks per step into separate chains: with one, each of the four vdpbf16ps chains waits a
  // full latency per block, below memory speed
  __m512 lo[2][2], hi[2][2];  // [block of the step][even, odd inputs]
  auto block = [&](int64_t k, auto u) {
    const __m512i w = _mm512_loadu_si512(row + k);
    const __m512bh l0 = (__m512bh)_mm512_ternarylogic_epi32(w, nib, off, kAndOr);
    const __m512bh h0 = (__m512bh)_mm512_ternarylogic_epi32(_mm512_srli_epi16(w, 4), nib, off_hi, kAndXor);
    const __m512bh l1 = (__m512bh)_mm512_ternarylogic_epi32(_mm512_srli_epi16(w, 8), nib, off, kAndOr);
    const __m512bh h1 = (__m512bh)_mm512_xor_si512(_mm512_srli_epi16(w, 12), off_hi);
    const __m512bh xe = (__m512bh)_mm512_loadu_si512(x + k), xo = (__m512bh)_mm512_loadu_si512(x + k + 32);
    lo[u][0] = _mm512_dpbf16_ps(lo[u][0], xe, l0);
    hi[u][0] = _mm512_dpbf16_ps(hi[u][0], xe, h0);
    lo[u][1] = _mm512_dpbf16_ps(lo[u][1], xo, l1);
    hi[u][1] = _mm512_dpbf16_ps(hi[u][1], xo, h1);
  };
  for (int64_t g = 0; g < groups; ++g) {
    for (int u = 0; u < 2; ++u) lo[u][0] = lo[u][1] = hi[u][0] = hi[u][1] = _mm512_setzero_ps();
    const int64_t end = (g + 1) * a.group;
    int64_t k = g * a.group;
    for (; k + 128 <= end; k += 128) {
      block(k, std::integral_constant<int, 0>{});
      block(k + 64, std::integral_constant<int, 1>{});
    }
    if (k < end) block(k, std::integral_constant<int, 0>{});
    const __m512 l = _mm512_add_ps(_mm512_add_ps(lo[0][0], lo[0][1]), _mm512_add_ps(lo[1][0], lo[1][1]));
    const __m512 h = _mm512_add_ps(_mm512_add_ps(hi[0][0], hi[0][1]), _mm512_add_ps(hi[1][0], hi[1][1]));
    tot = _mm512_fmadd_ps(_mm512_fmadd_ps(h, _mm512_set1_ps(16.f), l), _mm512_set1_ps(sc[g]), tot);
  }
  res[0] = _mm512_reduce_add_ps(tot) - offset_term(sc, nullptr, a.xsum + i0 * groups, groups, 2304.f);
}

// int8 with two or more activation rows (or groups of 32): the nibble kernel spends two vdpbf16ps per
// weight pair and row, which bounds it there; int8 values are exact in bf16, so widening once (vcvtdq2ps
// + vcvtne2ps2bf16) and one vdpbf16ps per 32 weights and row is cheaper.  x_bf16 in input order.
template <int MB>
void gemv_row_int8_widened(const WoqArgs& a, int64_t i0, int64_t n, float* res) {
  const int64_t groups = a.kp / a.group;
  const uint8_t* row = a.w + n * a.ldw;
  const float* sc = a.scales + n * groups;
  auto widen = [&](int64_t k) {
    const auto* p = reinterpret_cast<const __m128i*>(row + k);
    const __m512 w0 = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(p)));
    const __m512 w1 = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(p + 1)));
    return _mm512_cvtne2ps_pbh(w1, w0);
  };
  __m512 tot[MB];
  for (int i = 0; i < MB; ++i) tot[i] = _mm512_setzero_ps();
  for (int64_t g = 0; g < groups; ++g) {
    __m512 acc[MB][2];  // two chains per row: 2 x MB independent vdpbf16ps in flight
    for (int i = 0; i < MB; ++i) acc[i][0] = acc[i][1] = _mm512_setzero_ps();
    const int64_t end = (g + 1) * a.group;
    int64_t k = g * a.group;
    for (; k + 64 <= end; k += 64) {
      const __m512bh w0 = widen(k), w1 = widen(k + 32);
#pragma GCC unroll 4
      for (int i = 0; i < MB; ++i) {
        const uint16_t* x = a.x_bf16 + (i0 + i) * a.kp + k;
        acc[i][0] = _mm512_dpbf16_ps(acc[i][0], (__m512bh)_mm512_loadu_si512(x), w0);
        acc[i][1] = _mm512_dpbf16_ps(acc[i][1], (__m512bh)_mm512_loadu_si512(x + 32), w1);
      }
    }
    if (k < end) {  // groups of 32
      const __m512bh w0 = widen(k);
      for (int i = 0; i < MB; ++i)
        acc[i][0] = _mm512_dpbf16_ps(acc[i][0], (__m512bh)_mm512_loadu_si512(a.x_bf16 + (i0 + i) * a.kp + k), w0);
    }
    const __m512 s = _mm512_set1_ps(sc[g]);
    for (int i = 0; i < MB; ++i) tot[i] = _mm512_fmadd_ps(_mm512_add_ps(acc[i][0], acc[i][1]), s, tot[i]);
  }
  for (int i = 0; i < MB; ++i) res[i] = _mm512_reduce_add_ps(tot[i]);
}

template <int BITS, int MB>
inline void gemv_row_bf16(const WoqArgs& a, int64_t i0, int64_t n, float* res) {
  if constexpr (BITS == kWoqInt8) {
    if (MB == 1 && a.x_bf16_lanes != nullptr) {
      gemv_row_int8_lanes(a, i0, n, res);
    } else {
      gemv_row_int8_widened<MB>(a, i0, n, res);
    }
  } else if (a.codebook != nullptr) {  // the op sends code book layers here only for groups of 128k
    gemv_row_int4_lanes<MB, true>(a, i0, n, res);
  } else if (a.group % 128 == 0) {
    gemv_row_int4_lanes<MB, false>(a, i0, n, res);
  } else {
    gemv_row_int4_bf16<MB>(a, i0, n, res);
  }
}
#endif

#if defined(__AVX512VNNI__)
// lowp INT8: unsigned weight bytes against int8 activations with vpdpbusd, 64 products per instruction and
// exact int32 sums.  int4: q in [0, 15] as is; int8: u = q + 128, and sum u x_q = sum q x_q + 128 sum x_q.
// Groups are multiples of 128 (int4) / 64 (int8) inputs, so one load never straddles two groups.
template <int BITS, int MB>
void gemv_row_vnni(const WoqArgs& a, int64_t i0, int64_t n, float* res) {
  const int64_t groups = a.kp / a.group;
  constexpr int64_t kStep = BITS == kWoqInt4 ? 128 : 64;  // inputs per 64-byte load
  const uint8_t* row = a.w + n * a.ldw;
  const float* sc = a.scales + n * groups;
  const float* zp = a.zeros != nullptr ? a.zeros + n * groups : nullptr;
  __m512 tot[MB];
  for (int i = 0; i < MB; ++i) tot[i] = _mm512_setzero_ps();
  for (int64_t g = 0; g < groups; ++g) {
    __m512i acc[MB], acc1[MB];
    for (int i = 0; i < MB; ++i) acc[i] = acc1[i] = _mm512_setzero_si512();
    for (int64_t k = g * a.group; k < (g + 1) * a.group; k += kStep) {
      if constexpr (BITS == kWoqInt4) {
        const __m512i v = _mm512_loadu_si512(row + k / 2);
        const __m512i lo = _mm512_and_si512(v, _mm512_set1_epi8(15));
        const __m512i hi = _mm512_and_si512(_mm512_srli_epi16(v, 4), _mm512_set1_epi8(15));
#pragma GCC unroll 4
        for (int i = 0; i < MB; ++i) {
          const int8_t* xq = a.x_q + (i0 + i) * a.kp + k;
          acc[i] = _mm512_dpbusd_epi32(acc[i], lo, _mm512_loadu_si512(xq));
          acc1[i] = _mm512_dpbusd_epi32(acc1[i], hi, _mm512_loadu_si512(xq + 64));
        }
      } else {
        const __m512i u = _mm512_xor_si512(_mm512_loadu_si512(row + k), _mm512_set1_epi8(static_cast<char>(0x80)));
#pragma GCC unroll 4
        for (int i = 0; i < MB; ++i)
          acc[i] = _mm512_dpbusd_epi32(acc[i], u, _mm512_loadu_si512(a.x_q + (i0 + i) * a.kp + k));
      }
    }
    const __m512 s = _mm512_set1_ps(sc[g]);
    for (int i = 0; i < MB; ++i)
      tot[i] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_add_epi32(acc[i], acc1[i])), s, tot[i]);
  }
  // int4: zero points (none: 0); int8: the 128 of u = q + 128
  const float off = BITS == kWoqInt4 ? 0.f : 128.f;
  for (int i = 0; i < MB; ++i) {
    const float zterm = offset_term(sc, BITS == kWoqInt4 ? zp : nullptr, a.x_q_sum + (i0 + i) * groups, groups, off);
    res[i] = (_mm512_reduce_add_ps(tot[i]) - zterm) * a.x_scale[i0 + i];
  }
}
#endif

template <int BITS>
void gemv(const WoqArgs& a, int64_t n_begin, int64_t n_end) {
#if defined(__AVX512VNNI__)
  if (a.x_q != nullptr) {
    float res[4];
    for (int64_t n = n_begin; n < n_end; ++n)
      for (int64_t i0 = 0; i0 < a.m; i0 += 4) {
        const int64_t mb = min64(4, a.m - i0);
        switch (mb) {
          case 4: gemv_row_vnni<BITS, 4>(a, i0, n, res); break;
          case 3: gemv_row_vnni<BITS, 3>(a, i0, n, res); break;
          case 2: gemv_row_vnni<BITS, 2>(a, i0, n, res); break;
          default: gemv_row_vnni<BITS, 1>(a, i0, n, res); break;
        }
        for (int64_t i = 0; i < mb; ++i) store_out(a, i0 + i, n, res[i]);
      }
    return;
  }
#endif
#if defined(__AVX512BF16__)
  if (a.x_bf16 != nullptr) {
    float res[4];
    for (int64_t n = n_begin; n < n_end; ++n)
      for (int64_t i0 = 0; i0 < a.m; i0 += 4) {
        const int64_t mb = min64(4, a.m - i0);
        switch (mb) {
          case 4: gemv_row_bf16<BITS, 4>(a, i0, n, res); break;
          case 3: gemv_row_bf16<BITS, 3>(a, i0, n, res); break;
          case 2: gemv_row_bf16<BITS, 2>(a, i0, n, res); break;
          default: gemv_row_bf16<BITS, 1>(a, i0, n, res); break;
        }
        for (int64_t i = 0; i < mb; ++i) store_out(a, i0 + i, n, res[i]);
      }
    return;
  }
#endif
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
    const float* sc = a.scales + n * groups;
    const float* zp = a.zeros != nullptr ? a.zeros + n * groups : nullptr;
    int64_t c = 0;
#if defined(__AVX512F__)
    // whole 32-input blocks inside [0, k): groups are multiples of 32, so a block has one scale
    for (int64_t g = 0; g < groups; ++g) {
      const __m512 s = _mm512_set1_ps(sc[g]);
      const __m512 zs = _mm512_set1_ps(zp != nullptr ? zp[g] * sc[g] : 0.f);
      const int64_t end = min64((g + 1) * a.group, k / 32 * 32);
      for (c = g * a.group; c < end; c += 32) {
        __m512 w0, w1;
        if constexpr (BITS == kWoqInt8) {
          w0 = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(row + c))));
          w1 = _mm512_cvtepi32_ps(
              _mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(row + c + 16))));
        } else {
          const __m512i raw = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(row + c / 2)));
          w0 = int4_values(_mm512_and_si512(raw, _mm512_set1_epi32(15)), a.codebook);
          w1 = int4_values(_mm512_srli_epi32(raw, 4), a.codebook);
        }
        // (q - z) s as q s - z s: the same rounding as the scalar tail below would differ in the last bit
        // only through the FMA, and both round to bf16 afterwards
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(o + c), f32x16_to_bf16(_mm512_fmsub_ps(w0, s, zs)));
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(o + c + 16), f32x16_to_bf16(_mm512_fmsub_ps(w1, s, zs)));
      }
      if (end < (g + 1) * a.group) break;  // the rest of the row is the tail
    }
    c = k / 32 * 32;
#endif
    for (; c < k; ++c) {
      const int64_t g = c / a.group;
      const float z = zp != nullptr ? zp[g] : 0.f;
      o[c] = f32_to_bf16(weight_at<BITS>(row, c, a.codebook) * sc[g] - z * sc[g]);
    }
  }
}

}  // namespace

const WoqKernels& woq_kernels() {
  static const WoqKernels table = {
      {&gemv<kWoqInt8>, &gemv<kWoqInt4>},
#if defined(__AVX512VNNI__)
      true,
#else
      false,
#endif
      {&dequant<kWoqInt8>, &dequant<kWoqInt4>},
  };
  return table;
}

}  // namespace IPEX_LITE_ISA_NS
}  // namespace kernels
}  // namespace ipex_lite
