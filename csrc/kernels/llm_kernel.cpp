// Decoder-LLM kernels, compiled once per ISA level (see setup.py and llm_kernel.h).
//
// The small-M GEMM widens bf16 weights to fp32 in registers (a shift) and FMAs them with fp32
// activations: per 16 weights that is one load, two integer ops and m FMAs, far below what two
// cores can issue while memory delivers ~30 bytes a nanosecond, so the loop runs at the read
// bandwidth without AVX512_BF16's dot-product instruction (which would round x to bf16 pairs).
#include "kernels/llm_kernel.h"

#include <cmath>
#include <limits>

namespace ipex_lite {
namespace kernels {
namespace IPEX_LITE_ISA_NS {
namespace {

template <typename T>
inline float round_to(float v) {
  if constexpr (std::is_same<T, float>::value) {
    return v;
  } else {
    return bf16_to_f32(f32_to_bf16(v));
  }
}

#if defined(__AVX512F__)
template <typename T>
inline __m512 round_to(__m512 v) {
  if constexpr (std::is_same<T, float>::value) {
    return v;
  } else {
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(f32x16_to_bf16(v)), 16));
  }
}
#endif

// ---------------------------------------------------------------- small-M GEMM on bf16 weights

#if defined(__AVX512F__)
constexpr int kLanes = 16, kMaxRowsX = 4;
using Vec = __m512;
inline Vec vzero() { return _mm512_setzero_ps(); }
inline Vec load_w(const uint16_t* p) {
  return _mm512_castsi512_ps(
      _mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p))), 16));
}
inline Vec load_x(const float* p) { return _mm512_loadu_ps(p); }
inline Vec fma(Vec a, Vec b, Vec c) { return _mm512_fmadd_ps(a, b, c); }
inline Vec vadd(Vec a, Vec b) { return _mm512_add_ps(a, b); }
inline float hsum(Vec v) { return _mm512_reduce_add_ps(v); }
#elif defined(__AVX2__)
constexpr int kLanes = 8, kMaxRowsX = 2;
using Vec = __m256;
inline Vec vzero() { return _mm256_setzero_ps(); }
inline Vec load_w(const uint16_t* p) {
  return _mm256_castsi256_ps(
      _mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))), 16));
}
inline Vec load_x(const float* p) { return _mm256_loadu_ps(p); }
inline Vec fma(Vec a, Vec b, Vec c) { return _mm256_fmadd_ps(a, b, c); }
inline Vec vadd(Vec a, Vec b) { return _mm256_add_ps(a, b); }
inline float hsum(Vec v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}
#else
constexpr int kMaxRowsX = 4;
#endif

// res[i * RB + r] = sum_k x[i, k] w[r, k] for i < MB, r < RB.
template <int MB, int RB>
void dot_block(const float* x, int64_t k, const uint16_t* w, int64_t ldw, float* res) {
  int64_t c = 0;
#if defined(__AVX512F__) || defined(__AVX2__)
  Vec acc[MB][RB];
#pragma GCC unroll 4
  for (int i = 0; i < MB; ++i)
#pragma GCC unroll 4
    for (int r = 0; r < RB; ++r) acc[i][r] = vzero();
  for (; c + kLanes <= k; c += kLanes) {
    Vec wv[RB];
#pragma GCC unroll 4
    for (int r = 0; r < RB; ++r) wv[r] = load_w(w + r * ldw + c);
#pragma GCC unroll 4
    for (int i = 0; i < MB; ++i) {
      const Vec xv = load_x(x + i * k + c);
#pragma GCC unroll 4
      for (int r = 0; r < RB; ++r) acc[i][r] = fma(wv[r], xv, acc[i][r]);
    }
  }
  for (int i = 0; i < MB; ++i)
    for (int r = 0; r < RB; ++r) res[i * RB + r] = hsum(acc[i][r]);
#else
  for (int i = 0; i < MB * RB; ++i) res[i] = 0.f;
#endif
  for (; c < k; ++c)
    for (int i = 0; i < MB; ++i)
      for (int r = 0; r < RB; ++r) res[i * RB + r] += x[i * k + c] * bf16_to_f32(w[r * ldw + c]);
}

#if defined(__AVX512BF16__)
// dot_block on bf16 activations: vdpbf16ps multiplies 32 bf16 pairs exactly and adds them in fp32, half
// the instructions of widening both operands and half the activation bytes read per weight.
template <int MB, int RB>
void dot_block_bf16(const uint16_t* x, int64_t k, const uint16_t* w, int64_t ldw, float* res) {
  __m512 acc[MB][RB];
#pragma GCC unroll 4
  for (int i = 0; i < MB; ++i)
#pragma GCC unroll 4
    for (int r = 0; r < RB; ++r) acc[i][r] = _mm512_setzero_ps();
  int64_t c = 0;
  for (; c + 32 <= k; c += 32) {
    __m512bh wv[RB];
#pragma GCC unroll 4
    for (int r = 0; r < RB; ++r) wv[r] = (__m512bh)_mm512_loadu_si512(w + r * ldw + c);
#pragma GCC unroll 4
    for (int i = 0; i < MB; ++i) {
      const __m512bh xv = (__m512bh)_mm512_loadu_si512(x + i * k + c);
#pragma GCC unroll 4
      for (int r = 0; r < RB; ++r) acc[i][r] = _mm512_dpbf16_ps(acc[i][r], xv, wv[r]);
    }
  }
  for (int i = 0; i < MB; ++i)
    for (int r = 0; r < RB; ++r) {
      float v = _mm512_reduce_add_ps(acc[i][r]);
      for (int64_t cc = c; cc < k; ++cc) v += bf16_to_f32(x[i * k + cc]) * bf16_to_f32(w[r * ldw + cc]);
      res[i * RB + r] = v;
    }
}
#endif

inline void store_y(const SmallMArgs& a, int64_t i, int64_t n, float v) {
  store_biased(a.y, a.y_bf16, i * a.ldy + n, v, a.bias, n);
}

// One weight row at a time, U vectors per step in independent chains: each thread reads a single
// sequential stream (the 2-core host's DRAM gives 32 GB/s to it against 28 for four interleaved rows).
template <int MB>
void dot_row(const float* x, int64_t k, const uint16_t* w, float* res) {
  int64_t c = 0;
#if defined(__AVX512F__) || defined(__AVX2__)
  constexpr int U = 4;
  Vec acc[MB][U];
#pragma GCC unroll 4
  for (int i = 0; i < MB; ++i)
#pragma GCC unroll 4
    for (int u = 0; u < U; ++u) acc[i][u] = vzero();
  for (; c + U * kLanes <= k; c += U * kLanes) {
    Vec wv[U];
#pragma GCC unroll 4
    for (int u = 0; u < U; ++u) wv[u] = load_w(w + c + u * kLanes);
#pragma GCC unroll 4
    for (int i = 0; i < MB; ++i)
#pragma GCC unroll 4
      for (int u = 0; u < U; ++u) acc[i][u] = fma(wv[u], load_x(x + i * k + c + u * kLanes), acc[i][u]);
  }
  for (int i = 0; i < MB; ++i) {
    Vec t = acc[i][0];
    for (int u = 1; u < U; ++u) t = vadd(t, acc[i][u]);
    res[i] = hsum(t);
  }
#else
  for (int i = 0; i < MB; ++i) res[i] = 0.f;
#endif
  for (; c < k; ++c)
    for (int i = 0; i < MB; ++i) res[i] += x[i * k + c] * bf16_to_f32(w[c]);
}

template <int RB>
void rows_all_m(const SmallMArgs& a, int64_t n) {
  constexpr int MB = kMaxRowsX;
  float res[MB * RB];
  for (int64_t i0 = 0; i0 < a.m; i0 += MB) {
    const int64_t mb = min64(MB, a.m - i0);
    const float* x = a.x + i0 * a.k;
    const uint16_t* w = a.w + n * a.ldw;
#if defined(__AVX512BF16__)
    if (a.x_bf16 != nullptr) {
      const uint16_t* xb = a.x_bf16 + i0 * a.k;
      if (mb == MB) {
        dot_block_bf16<MB, RB>(xb, a.k, w, a.ldw, res);
      } else {
        for (int64_t i = 0; i < mb; ++i) dot_block_bf16<1, RB>(xb + i * a.k, a.k, w, a.ldw, res + i * RB);
      }
    } else
#endif
    if (mb == MB) {
      dot_block<MB, RB>(x, a.k, w, a.ldw, res);
    } else {  // the last rows of x: the RB weight rows are in cache by now
      for (int64_t i = 0; i < mb; ++i) dot_block<1, RB>(x + i * a.k, a.k, w, a.ldw, res + i * RB);
    }
    for (int64_t i = 0; i < mb; ++i)
      for (int r = 0; r < RB; ++r) store_y(a, i0 + i, n + r, res[i * RB + r]);
  }
}

void linear_small_m(const SmallMArgs& a, int64_t n_begin, int64_t n_end) {
  if (a.m == 1) {  // decode: one sequential stream per thread (4 interleaved rows measured 15% slower)
    for (int64_t n = n_begin; n < n_end; ++n) {
      float v;
      dot_row<1>(a.x, a.k, a.w + n * a.ldw, &v);
      store_y(a, 0, n, v);
    }
    return;
  }
  int64_t n = n_begin;
  for (; n + 4 <= n_end; n += 4) rows_all_m<4>(a, n);
  for (; n < n_end; ++n) rows_all_m<1>(a, n);
}

// ---------------------------------------------------------------- RMSNorm (+ residual)

template <typename T>
void rms_norm(const RmsNormArgs& a, int64_t begin, int64_t end) {
  const int64_t n = a.n;
  const T* w = static_cast<const T*>(a.w);
  for (int64_t r = begin; r < end; ++r) {
    const T* x = static_cast<const T*>(a.x) + r * a.ldx;
    T* res = a.residual != nullptr ? static_cast<T*>(a.residual) + r * a.ldr : nullptr;
    T* out = static_cast<T*>(a.out) + r * a.ldo;
    const T* h = res != nullptr ? res : x;  // the values normalised, after the add is stored
    float ss = 0.f;
    int64_t i = 0;
#if defined(__AVX512F__)
    __m512 acc = _mm512_setzero_ps();
    for (; i < n; i += 16) {
      const __mmask16 m = tail_mask16(n - i);
      __m512 v = load16(x + i, m);
      if (res != nullptr) {
        v = round_to<T>(_mm512_add_ps(v, load16(res + i, m)));  // the sum as stored
        store16(res + i, v, m, false);
      }
      acc = _mm512_fmadd_ps(v, v, acc);
    }
    ss = _mm512_reduce_add_ps(acc);
#endif
    for (; i < n; ++i) {
      float v = load_elem(x + i);
      if (res != nullptr) {
        v = round_to<T>(v + load_elem(res + i));
        store_elem(res + i, v);
      }
      ss += v * v;
    }
    const float inv = 1.f / std::sqrt(ss / static_cast<float>(n) + a.eps);
    i = 0;
#if defined(__AVX512F__)
    const __m512 vinv = _mm512_set1_ps(inv);
    for (; i < n; i += 16) {
      const __mmask16 m = tail_mask16(n - i);
      const __m512 v = round_to<T>(_mm512_mul_ps(load16(h + i, m), vinv));
      store16(out + i, _mm512_mul_ps(load16(w + i, m), v), m, false);
    }
#endif
    for (; i < n; ++i) store_elem(out + i, load_elem(w + i) * round_to<T>(load_elem(h + i) * inv));
  }
}

// ---------------------------------------------------------------- rotary embedding in place

template <typename T>
void rotary(const RotaryArgs& a, int64_t begin, int64_t end) {
  const int64_t half = a.rd / 2;
  for (int64_t row = begin; row < end; ++row) {
    const int64_t b = row / a.seq, s = row % a.seq;
    const T* c = static_cast<const T*>(a.cos) + b * a.cs_strides[0] + s * a.cs_strides[1];
    const T* sn = static_cast<const T*>(a.sin) + b * a.cs_strides[0] + s * a.cs_strides[1];
    for (int64_t h = 0; h < a.heads; ++h) {
      T* t = static_cast<T*>(a.t) + b * a.t_strides[0] + s * a.t_strides[1] + h * a.t_strides[2];
      int64_t i = 0;
#if defined(__AVX512F__)
      for (; i < half; i += 16) {
        const __mmask16 m = tail_mask16(half - i);
        const __m512 x1 = load16(t + i, m), x2 = load16(t + half + i, m);
        const __m512 lo = _mm512_fmsub_ps(x1, load16(c + i, m), _mm512_mul_ps(x2, load16(sn + i, m)));
        const __m512 hi = _mm512_fmadd_ps(x2, load16(c + half + i, m), _mm512_mul_ps(x1, load16(sn + half + i, m)));
        store16(t + i, lo, m, false);
        store16(t + half + i, hi, m, false);
      }
#endif
      for (; i < half; ++i) {
        const float x1 = load_elem(t + i), x2 = load_elem(t + half + i);
        store_elem(t + i, x1 * load_elem(c + i) - x2 * load_elem(sn + i));
        store_elem(t + half + i, x2 * load_elem(c + half + i) + x1 * load_elem(sn + half + i));
      }
    }
  }
}

// ---------------------------------------------------------------- SiLU gate

inline float silu(float g) { return g / (1.f + std::exp(-g)); }

template <typename T>
void silu_mul(const void* g_v, int64_t ldg, const void* u_v, int64_t ldu, void* out_v, int64_t ldo, int64_t n,
              int64_t begin, int64_t end) {
  for (int64_t r = begin; r < end; ++r) {
    const T* g = static_cast<const T*>(g_v) + r * ldg;
    const T* u = static_cast<const T*>(u_v) + r * ldu;
    T* out = static_cast<T*>(out_v) + r * ldo;
    int64_t i = 0;
#if defined(__AVX512F__)
    const __m512 one = _mm512_set1_ps(1.f);
    for (; i < n; i += 16) {
      const __mmask16 m = tail_mask16(n - i);
      const __m512 x = load16(g + i, m);
      // sigmoid from e = exp(-|x|) <= 1: 1 / (1 + e) for x >= 0, e / (1 + e) below
      const __m512 e = exp_nonpositive(_mm512_sub_ps(_mm512_setzero_ps(), _mm512_abs_ps(x)));
      const __m512 num = _mm512_mask_blend_ps(_mm512_cmp_ps_mask(x, _mm512_setzero_ps(), _CMP_LT_OQ), one, e);
      const __m512 act = round_to<T>(_mm512_mul_ps(x, _mm512_div_ps(num, _mm512_add_ps(one, e))));
      store16(out + i, _mm512_mul_ps(act, load16(u + i, m)), m, false);
    }
#endif
    for (; i < n; ++i) store_elem(out + i, round_to<T>(silu(load_elem(g + i))) * load_elem(u + i));
  }
}

// ---------------------------------------------------------------- attention over a KV cache

template <typename T>
inline float dot(const float* q, const T* k, int64_t e) {
  int64_t i = 0;
  float s = 0.f;
#if defined(__AVX512F__)
  __m512 acc = _mm512_setzero_ps();
  for (; i < e; i += 16) {
    const __mmask16 m = tail_mask16(e - i);
    acc = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(m, q + i), load16(k + i, m), acc);
  }
  s = _mm512_reduce_add_ps(acc);
#endif
  for (; i < e; ++i) s += q[i] * load_elem(k + i);
  return s;
}

template <typename T>
inline void axpy(float* o, float p, const T* v, int64_t ev) {
  int64_t i = 0;
#if defined(__AVX512F__)
  const __m512 vp = _mm512_set1_ps(p);
  for (; i < ev; i += 16) {
    const __mmask16 m = tail_mask16(ev - i);
    _mm512_mask_storeu_ps(o + i, m, _mm512_fmadd_ps(vp, load16(v + i, m), _mm512_maskz_loadu_ps(m, o + i)));
  }
#endif
  for (; i < ev; ++i) o[i] += p * load_elem(v + i);
}

// s[j] = exp(s[j] - max) over [0, n); returns the max (-inf when every score is -inf), adds the sum.
float exp_row(float* s, int64_t n, float* sum) {
  float mx = -std::numeric_limits<float>::infinity();
  for (int64_t j = 0; j < n; ++j) mx = s[j] > mx ? s[j] : mx;
  if (mx == -std::numeric_limits<float>::infinity()) {
    for (int64_t j = 0; j < n; ++j) s[j] = 0.f;
    return mx;
  }
  float total = 0.f;
  int64_t j = 0;
#if defined(__AVX512F__)
  const __m512 vmx = _mm512_set1_ps(mx);
  __m512 acc = _mm512_setzero_ps();
  for (; j < n; j += 16) {
    const __mmask16 m = tail_mask16(n - j);
    const __m512 e = exp_nonpositive(_mm512_sub_ps(_mm512_maskz_loadu_ps(m, s + j), vmx));
    _mm512_mask_storeu_ps(s + j, m, e);
    acc = _mm512_mask_add_ps(acc, m, acc, e);
  }
  total = _mm512_reduce_add_ps(acc);
#endif
  for (; j < n; ++j) {
    s[j] = std::exp(s[j] - mx);
    total += s[j];
  }
  *sum = total;
  return mx;
}

template <typename T>
void decode_attention(const DecodeAttentionArgs& a, int64_t begin, int64_t end, void* scratch) {
  const int64_t rows = a.groups * a.lq, chunks = (a.lk + a.chunk - 1) / a.chunk, width = a.ev + 2;
  Arena arena(scratch);
  float* s = arena.take<float>(rows * a.chunk);
  float* qf = arena.take<float>(rows * a.e);
  for (int64_t t = begin; t < end; ++t) {
    const int64_t c = t % chunks, bh = t / chunks, b = bh / a.kv_heads, kh = bh % a.kv_heads;
    const int64_t j0 = c * a.chunk, n = min64(a.chunk, a.lk - j0);
    for (int64_t r = 0; r < rows; ++r) {
      const int64_t g = r / a.lq, i = r % a.lq;
      const T* q = static_cast<const T*>(a.q) + b * a.q_strides[0] + (kh * a.groups + g) * a.q_strides[1] +
                   i * a.q_strides[2];
      for (int64_t d = 0; d < a.e; ++d) qf[r * a.e + d] = load_elem(q + d) * a.scale;
    }
    const T* kb = static_cast<const T*>(a.k) + b * a.k_strides[0] + kh * a.k_strides[1];
    const T* vb = static_cast<const T*>(a.v) + b * a.v_strides[0] + kh * a.v_strides[1];
    for (int64_t j = 0; j < n; ++j) {
      const T* kr = kb + (j0 + j) * a.k_strides[2];
      for (int64_t r = 0; r < rows; ++r) s[r * a.chunk + j] = dot(qf + r * a.e, kr, a.e);
    }
    for (int64_t r = 0; r < rows; ++r) {
      const int64_t g = r / a.lq, i = r % a.lq;
      float* sr = s + r * a.chunk;
      if (a.mask != nullptr) {
        const float* m = a.mask + b * a.mask_strides[0] + (kh * a.groups + g) * a.mask_strides[1] +
                         i * a.mask_strides[2] + j0 * a.mask_strides[3];
        for (int64_t j = 0; j < n; ++j) sr[j] += m[j * a.mask_strides[3]];
      }
      if (a.causal) {
        const int64_t last = a.lk - a.lq + i;  // the last key this row sees
        for (int64_t j = (last + 1 - j0 > 0 ? last + 1 - j0 : 0); j < n; ++j)
          sr[j] = -std::numeric_limits<float>::infinity();
      }
      float* part = a.partial + (t * rows + r) * width;
      float sum = 0.f;
      const float mx = exp_row(sr, n, &sum);
      for (int64_t d = 0; d < a.ev; ++d) part[d] = 0.f;
      part[a.ev] = mx;
      part[a.ev + 1] = sum;
    }
    for (int64_t j = 0; j < n; ++j) {
      const T* vr = vb + (j0 + j) * a.v_strides[2];
      for (int64_t r = 0; r < rows; ++r) {
        const float p = s[r * a.chunk + j];
        if (p != 0.f) axpy(a.partial + (t * rows + r) * width, p, vr, a.ev);
      }
    }
  }
}

}  // namespace

const LlmKernels& llm_kernels() {
  static const LlmKernels table = {
      &linear_small_m,
      {&rms_norm<float>, &rms_norm<uint16_t>, nullptr},
      {&rotary<float>, &rotary<uint16_t>, nullptr},
      {&silu_mul<float>, &silu_mul<uint16_t>, nullptr},
      {&decode_attention<float>, &decode_attention<uint16_t>, nullptr},
  };
  return table;
}

}  // namespace IPEX_LITE_ISA_NS
}  // namespace kernels
}  // namespace ipex_lite
