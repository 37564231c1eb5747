// Helpers shared by kernel files.  Included by files that are compiled once
// per ISA level: everything here has internal linkage (static / anonymous
// namespace) so that no weak symbol compiled with one level's flags can be
// picked by the linker for another level.  No torch or std templates here.
#pragma once

#include <cstdint>
#include <cstring>
#include <type_traits>

#if defined(__AVX512F__) || defined(__AVX2__)
#include <immintrin.h>
#endif

namespace ipex_lite {
namespace kernels {

// Element types the kernels know; bf16 travels as its raw 16 bits.
enum KernelDtype : int { kF32 = 0, kBF16 = 1, kF64 = 2, kNumKernelDtypes = 3 };

}  // namespace kernels
}  // namespace ipex_lite

#ifdef IPEX_LITE_ISA_NS
namespace ipex_lite {
namespace kernels {
namespace IPEX_LITE_ISA_NS {
namespace {

inline float bits_to_f32(uint32_t b) {
  float f;
  std::memcpy(&f, &b, sizeof(f));
  return f;
}

inline uint32_t f32_to_bits(float f) {
  uint32_t b;
  std::memcpy(&b, &f, sizeof(b));
  return b;
}

inline float bf16_to_f32(uint16_t v) { return bits_to_f32(static_cast<uint32_t>(v) << 16); }

// Element i of an untyped fp32 (BF16 = false) or bf16 (BF16 = true) buffer, as fp32.
template <bool BF16>
inline float load_f32(const void* p, int64_t i) {
  if constexpr (BF16) {
    return bf16_to_f32(static_cast<const uint16_t*>(p)[i]);
  } else {
    return static_cast<const float*>(p)[i];
  }
}

// Split-BF16: fp32 = (top << 16) | trail, exactly.
inline float join_halves(uint16_t top, uint16_t trail) {
  return bits_to_f32((static_cast<uint32_t>(top) << 16) | trail);
}
inline void split_halves(float w, uint16_t* top, uint16_t* trail) {
  const uint32_t b = f32_to_bits(w);
  *top = static_cast<uint16_t>(b >> 16);
  *trail = static_cast<uint16_t>(b & 0xffffu);
}

// Round to nearest even, NaN stays a (quiet) NaN.
inline uint16_t f32_to_bf16(float f) {
  uint32_t bits = f32_to_bits(f);
  if ((bits & 0x7fffffffu) > 0x7f800000u) return static_cast<uint16_t>((bits >> 16) | 0x40u);
  bits += 0x7fffu + ((bits >> 16) & 1u);
  return static_cast<uint16_t>(bits >> 16);
}

// One element of an fp32 or bf16 (uint16_t) buffer, computed with in fp32.
inline float load_elem(const float* p) { return *p; }
inline float load_elem(const uint16_t* p) { return bf16_to_f32(*p); }
inline void store_elem(float* p, float v) { *p = v; }
inline void store_elem(uint16_t* p, float v) { *p = f32_to_bf16(v); }

inline int64_t min64(int64_t a, int64_t b) { return a < b ? a : b; }

// y[at] = v + bias (bias may be null: nothing added) in an fp32 or bf16 (bf16 = true) output.
inline void store_biased(void* y, bool bf16, int64_t at, float v, const float* bias, int64_t n) {
  v += bias != nullptr ? bias[n] : 0.f;
  if (bf16) {
    static_cast<uint16_t*>(y)[at] = f32_to_bf16(v);
  } else {
    static_cast<float*>(y)[at] = v;
  }
}

// Software prefetch that the optimiser cannot delete.  GCC 12 splits a small
// prefetch helper (partial inlining), judges the outlined part free of side
// effects because __builtin_prefetch is, and drops the call: that once
// silently removed every prefetch of the embedding forward.  A volatile asm
// statement always stays.
enum class Cache { kL1, kL2 };

template <Cache C = Cache::kL2>
inline void prefetch_line(const void* p) {
#if defined(__x86_64__)
  if constexpr (C == Cache::kL1) {
    asm volatile("prefetcht0 %0" : : "m"(*static_cast<const char*>(p)));
  } else {
    asm volatile("prefetcht1 %0" : : "m"(*static_cast<const char*>(p)));
  }
#else
  __builtin_prefetch(p, 0, C == Cache::kL1 ? 3 : 2);
#endif
}

// Every 64-byte line of [p, p + bytes).
template <Cache C = Cache::kL2>
inline void prefetch_lines(const void* p, int64_t bytes) {
  for (int64_t off = 0; off < bytes; off += 64) prefetch_line<C>(static_cast<const char*>(p) + off);
}

// Carves 64-byte-aligned pieces out of a caller-provided scratch buffer.
struct Arena {
  char* cur;
  explicit Arena(void* base) : cur(static_cast<char*>(base)) {}
  template <typename T>
  T* take(int64_t count) {
    T* p = reinterpret_cast<T*>(cur);
    cur += (static_cast<int64_t>(sizeof(T)) * count + 63) & ~int64_t(63);
    return p;
  }
};

#if defined(__AVX512F__)
inline __m512 bf16x16_to_f32(const uint16_t* src, __mmask16 m) {
  const __m256i raw = _mm256_maskz_loadu_epi16(m, src);
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(raw), 16));
}

// 16 lanes (those in m) of an fp32 or bf16 buffer as fp32.
inline __m512 load16(const float* p, __mmask16 m) { return _mm512_maskz_loadu_ps(m, p); }
inline __m512 load16(const uint16_t* p, __mmask16 m) { return bf16x16_to_f32(p, m); }

// Round to nearest even.  vcvtneps2bf16 flushes denormal results to zero
// while the software path (and torch's .bfloat16()) keeps them, so the
// avx512_bf16 level differs from the others for |x| < 2^-126 only.
inline __m256i f32x16_to_bf16(__m512 v) {
#if defined(__AVX512BF16__)
  return (__m256i)_mm512_cvtneps_pbh(v);
#else
  const __m512i bits = _mm512_castps_si512(v);
  const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(bits, 16), _mm512_set1_epi32(1));
  const __m512i rounded = _mm512_add_epi32(bits, _mm512_add_epi32(lsb, _mm512_set1_epi32(0x7fff)));
  const __mmask16 nan = _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q);
  const __m512i quiet = _mm512_or_si512(_mm512_srli_epi32(bits, 16), _mm512_set1_epi32(0x40));
  const __m512i out = _mm512_mask_blend_epi32(nan, _mm512_srli_epi32(rounded, 16), quiet);
  return _mm512_cvtepi32_epi16(out);
#endif
}

// exp for x <= 0 (softmax arguments): 2^n * p(r), r = x - n ln2 in [-ln2/2, ln2/2],
// p the degree-6 Taylor polynomial (relative error ~1e-7).  Below -87 (and
// -inf) the result is 0: the softmax term is < 2^-125 of the row's largest,
// and letting scalef underflow into denormals costs a microcode assist per
// vector (a padding mask made the whole op 40% slower).
inline __m512 exp_nonpositive(__m512 x) {
  const __mmask16 normal = _mm512_cmp_ps_mask(x, _mm512_set1_ps(-87.f), _CMP_GE_OQ);
  x = _mm512_max_ps(x, _mm512_set1_ps(-87.f));
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);
  __m512 p = _mm512_set1_ps(1.f / 720);
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.f / 120));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.f / 24));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.f / 6));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(0.5f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.f));
  return _mm512_maskz_mov_ps(normal, _mm512_scalef_ps(p, n));
}

// Lanes [0, count) set; count may be <= 0 (no lanes) or past the vector.
inline __mmask16 tail_mask16(int64_t count) {
  if (count <= 0) return 0;
  return count >= 16 ? static_cast<__mmask16>(0xffff) : static_cast<__mmask16>((1u << count) - 1u);
}

// Full, aligned vectors may go out as non-temporal stores (stream).
template <typename T>
inline void store16(T* p, __m512 v, __mmask16 m, bool stream) {
  const auto addr = reinterpret_cast<uintptr_t>(p);
  if constexpr (std::is_same<T, float>::value) {
    if (stream && m == 0xffff && (addr & 63) == 0) {
      _mm512_stream_ps(p, v);
    } else {
      _mm512_mask_storeu_ps(p, m, v);
    }
  } else {
    if (stream && m == 0xffff && (addr & 31) == 0) {
      _mm256_stream_si256(reinterpret_cast<__m256i*>(p), f32x16_to_bf16(v));
    } else {
      _mm256_mask_storeu_epi16(p, m, f32x16_to_bf16(v));
    }
  }
}

// NV vectors to p[0, 16 * NV), the last one masked.  bf16 pairs fill whole
// lines, so a streamed row goes out as one 64-byte store per line (two
// half-line ones left the 1-index bf16 embedding forward store-bound).
template <int NV, typename T>
inline void store_vectors(T* p, const __m512 (&v)[NV], __mmask16 last, bool stream) {
  if constexpr (!std::is_same<T, float>::value && NV % 2 == 0) {
    if (stream && last == 0xffff && (reinterpret_cast<uintptr_t>(p) & 63) == 0) {
#pragma GCC unroll 4
      for (int i = 0; i < NV; i += 2) {
        const __m512i line =
            _mm512_inserti64x4(_mm512_castsi256_si512(f32x16_to_bf16(v[i])), f32x16_to_bf16(v[i + 1]), 1);
        _mm512_stream_si512(reinterpret_cast<__m512i*>(p + 16 * i), line);
      }
      return;
    }
  }
#pragma GCC unroll 8
  for (int i = 0; i < NV; ++i) store16(p + 16 * i, v[i], i == NV - 1 ? last : 0xffff, stream);
}
#endif

}  // namespace
}  // namespace IPEX_LITE_ISA_NS
}  // namespace kernels
}  // namespace ipex_lite
#endif  // IPEX_LITE_ISA_NS
