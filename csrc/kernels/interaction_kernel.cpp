// Fused dot interaction kernels, compiled once per ISA level (see setup.py).
//
// Forward, per sample: copy row 0, then the strict lower triangle of the Gram
// matrix.  The AVX-512 path computes 4x4 blocks of dot products with 16 zmm
// accumulators and folds the 16 accumulators into one vector with a shuffle
// tree, so each dot costs its FMAs plus ~2 shuffles.
//
// Backward, per sample: with S the symmetric N x N matrix holding the
// triangle of grad_out (zero diagonal), dX = S X, plus grad_out[:, :D] for
// row 0.  All input gradients come out of one pass over the sample, which
// stays in L1 (27 x 128 fp32 = 13.5 KB).
#include "kernels/interaction_kernel.h"

#include <type_traits>

namespace ipex_lite {
namespace kernels {
namespace IPEX_LITE_ISA_NS {
namespace {

inline int64_t tri_offset(int64_t i) { return i * (i - 1) / 2; }

template <typename T>
struct Elem {  // float and double: computed in their own type
  using Acc = T;
  static Acc load(T v) { return v; }
  static T store(Acc v) { return v; }
};
template <>
struct Elem<uint16_t> {  // bf16: computed in fp32
  using Acc = float;
  static float load(uint16_t v) { return bf16_to_f32(v); }
  static uint16_t store(float v) { return f32_to_bf16(v); }
};

// Rows of sample b as Acc pointers: the input itself when it already has the
// accumulation type, otherwise a widened copy in `buf`.
template <typename T>
void gather_rows(const void* const* inputs, const int64_t* strides, int64_t n, int64_t d, int64_t b,
                 typename Elem<T>::Acc* buf, const typename Elem<T>::Acc** rows) {
  using Acc = typename Elem<T>::Acc;
  for (int64_t i = 0; i < n; ++i) {
    const T* src = static_cast<const T*>(inputs[i]) + b * strides[i];
    if constexpr (std::is_same<T, Acc>::value) {
      rows[i] = src;
    } else {
      Acc* dst = buf + i * d;
      for (int64_t k = 0; k < d; ++k) dst[k] = Elem<T>::load(src[k]);
      rows[i] = dst;
    }
  }
}

// Sixteen independent partial sums let the compiler vectorise the dot
// without reassociating (no -ffast-math).
template <typename A>
A dot_generic(const A* a, const A* b, int64_t d) {
  A part[16] = {};
  int64_t k = 0;
  for (; k + 16 <= d; k += 16)
    for (int l = 0; l < 16; ++l) part[l] += a[k + l] * b[k + l];
  A s = 0;
  for (; k < d; ++k) s += a[k] * b[k];
  for (int l = 0; l < 16; ++l) s += part[l];
  return s;
}

template <typename T>
void forward_generic(const InteractionFwdArgs& a, int64_t begin, int64_t end, void* scratch) {
  using Acc = typename Elem<T>::Acc;
  const int64_t n = a.num_inputs, d = a.dim, cols = d + n * (n - 1) / 2;
  Arena arena(scratch);
  const Acc** rows = arena.take<const Acc*>(n);
  Acc* buf = arena.take<Acc>(n * d);
  for (int64_t b = begin; b < end; ++b) {
    gather_rows<T>(a.inputs, a.row_strides, n, d, b, buf, rows);
    T* out = static_cast<T*>(a.out) + b * cols;
    std::memcpy(out, static_cast<const T*>(a.inputs[0]) + b * a.row_strides[0], sizeof(T) * d);
    T* tri = out + d;
    for (int64_t i = 1; i < n; ++i)
      for (int64_t j = 0; j < i; ++j) tri[tri_offset(i) + j] = Elem<T>::store(dot_generic(rows[i], rows[j], d));
  }
}

// S: n x n symmetric, zero diagonal, from the triangle part of one grad row.
template <typename T, typename Acc>
void build_s(const T* g_tri, int64_t n, Acc* s) {
  for (int64_t i = 0; i < n; ++i) {
    s[i * n + i] = 0;
    for (int64_t j = 0; j < i; ++j) s[i * n + j] = s[j * n + i] = Elem<T>::load(g_tri[tri_offset(i) + j]);
  }
}

template <typename T>
void backward_generic(const InteractionBwdArgs& a, int64_t begin, int64_t end, void* scratch) {
  using Acc = typename Elem<T>::Acc;
  const int64_t n = a.num_inputs, d = a.dim;
  Arena arena(scratch);
  const Acc** rows = arena.take<const Acc*>(n);
  Acc* buf = arena.take<Acc>(n * d);
  Acc* s = arena.take<Acc>(n * n);
  Acc* acc = arena.take<Acc>(d);
  for (int64_t b = begin; b < end; ++b) {
    gather_rows<T>(a.inputs, a.row_strides, n, d, b, buf, rows);
    const T* g = static_cast<const T*>(a.grad_out) + b * a.grad_row_stride;
    build_s(g + d, n, s);
    for (int64_t i = 0; i < n; ++i) {
      for (int64_t k = 0; k < d; ++k) acc[k] = i == 0 ? Elem<T>::load(g[k]) : Acc(0);
      for (int64_t j = 0; j < n; ++j) {
        if (j == i) continue;
        const Acc sij = s[i * n + j];
        const Acc* x = rows[j];
        for (int64_t k = 0; k < d; ++k) acc[k] += sij * x[k];
      }
      T* out = static_cast<T*>(a.grad_inputs[i]) + b * d;
      for (int64_t k = 0; k < d; ++k) out[k] = Elem<T>::store(acc[k]);
    }
  }
}

#if defined(__AVX512F__)

// Lane k of the result is the sum of the 16 lanes of v[k].
inline __m512 reduce16(const __m512 (&v)[16]) {
  __m512 s1[8];
#pragma GCC unroll 8
  for (int p = 0; p < 8; ++p)
    s1[p] = _mm512_add_ps(_mm512_unpacklo_ps(v[2 * p], v[2 * p + 1]),
                          _mm512_unpackhi_ps(v[2 * p], v[2 * p + 1]));
  __m512 s2[4];
#pragma GCC unroll 4
  for (int q = 0; q < 4; ++q) {
    const __m512d c = _mm512_castps_pd(s1[2 * q]), e = _mm512_castps_pd(s1[2 * q + 1]);
    s2[q] = _mm512_add_ps(_mm512_castpd_ps(_mm512_unpacklo_pd(c, e)),
                          _mm512_castpd_ps(_mm512_unpackhi_pd(c, e)));
  }
  // Each 128-bit lane of s2[q] now holds partial sums of v[4q .. 4q+3].
  const __m512 v01 = _mm512_add_ps(_mm512_shuffle_f32x4(s2[0], s2[1], 0x88),
                                   _mm512_shuffle_f32x4(s2[0], s2[1], 0xdd));
  const __m512 v23 = _mm512_add_ps(_mm512_shuffle_f32x4(s2[2], s2[3], 0x88),
                                   _mm512_shuffle_f32x4(s2[2], s2[3], 0xdd));
  return _mm512_add_ps(_mm512_shuffle_f32x4(v01, v23, 0x88), _mm512_shuffle_f32x4(v01, v23, 0xdd));
}

struct F32Dot {
  using T = float;
  static constexpr int64_t kStep = 16;
  static __mmask16 mask(int64_t count) { return tail_mask16(count); }
  template <int R>
  static inline void step(__m512 (&acc)[16], const float* const (&a)[4], const float* const (&c)[4],
                          int64_t k, __mmask16 m) {
    __m512 va[R], vc[4];
#pragma GCC unroll 4
    for (int r = 0; r < R; ++r) va[r] = _mm512_maskz_loadu_ps(m, a[r] + k);
#pragma GCC unroll 4
    for (int q = 0; q < 4; ++q) vc[q] = _mm512_maskz_loadu_ps(m, c[q] + k);
#pragma GCC unroll 4
    for (int r = 0; r < R; ++r)
#pragma GCC unroll 4
      for (int q = 0; q < 4; ++q) acc[4 * r + q] = _mm512_fmadd_ps(va[r], vc[q], acc[4 * r + q]);
  }
};


// One R x 4 block of dot products: rows ib..ib+R-1 against rows jb..jb+3,
// written to the triangle where j < i.  Rows past the end alias row n-1 and
// their results are dropped.
template <typename Dot, int R>
inline void gram_block(const typename Dot::T* const* rows, int64_t n, int64_t d, int64_t ib, int64_t jb,
                       float* tri) {
  using T = typename Dot::T;
  const T* a[4];
  const T* c[4];
#pragma GCC unroll 4
  for (int r = 0; r < 4; ++r) a[r] = rows[min64(ib + r, n - 1)];
#pragma GCC unroll 4
  for (int q = 0; q < 4; ++q) c[q] = rows[min64(jb + q, n - 1)];
  __m512 acc[16];
#pragma GCC unroll 16
  for (int l = 0; l < 16; ++l) acc[l] = _mm512_setzero_ps();
  int64_t k = 0;
  for (; k + Dot::kStep <= d; k += Dot::kStep) Dot::template step<R>(acc, a, c, k, Dot::mask(Dot::kStep));
  if (k < d) Dot::template step<R>(acc, a, c, k, Dot::mask(d - k));
  alignas(64) float sums[16];  // sums[4r .. 4r+3] = dots (ib + r, jb .. jb + 3)
  _mm512_store_ps(sums, reduce16(acc));
#pragma GCC unroll 4
  for (int r = 0; r < R; ++r) {
    const int64_t i = ib + r;
    const int64_t count = min64(4, i - jb);
    if (i >= n || count <= 0) continue;
    _mm_mask_storeu_ps(tri + tri_offset(i) + jb, static_cast<__mmask8>((1u << count) - 1u),
                       _mm_load_ps(sums + 4 * r));
  }
}

// The diagonal block of rows ib..ib+R-1: its columns ib-1..ib+2 overlap the
// rows, so the block touches only R + 1 distinct rows and needs 1 + ... + R
// of its dots (10 of 16 for R = 4): R + 1 loads and that many FMAs per step
// instead of 8 and 16.  Same output layout as gram_block's.
template <int R>
inline void gram_diag(const float* const* rows, int64_t d, int64_t ib, float* tri) {
  const float* z[R + 1];
#pragma GCC unroll 5
  for (int t = 0; t <= R; ++t) z[t] = rows[ib - 1 + t];
  __m512 acc[16];
#pragma GCC unroll 16
  for (int l = 0; l < 16; ++l) acc[l] = _mm512_setzero_ps();
  for (int64_t k = 0; k < d; k += 16) {
    const __mmask16 m = tail_mask16(d - k);
    __m512 v[R + 1];
#pragma GCC unroll 5
    for (int t = 0; t <= R; ++t) v[t] = _mm512_maskz_loadu_ps(m, z[t] + k);
#pragma GCC unroll 4
    for (int r = 0; r < R; ++r)
#pragma GCC unroll 4
      for (int q = 0; q <= r; ++q) acc[4 * r + q] = _mm512_fmadd_ps(v[r + 1], v[q], acc[4 * r + q]);
  }
  alignas(64) float sums[16];  // sums[4r + q] = dot(ib + r, ib - 1 + q) for q <= r
  _mm512_store_ps(sums, reduce16(acc));
#pragma GCC unroll 4
  for (int r = 0; r < R; ++r)
    _mm_mask_storeu_ps(tri + tri_offset(ib + r) + ib - 1, static_cast<__mmask8>((2u << r) - 1u),
                       _mm_load_ps(sums + 4 * r));
}

// Rows of the next sample, prefetched one row per block of the current one
// so that the requests spread over the computation: forward fp32 1.47 ->
// 1.32 us/sample (one thread, rows in L3).  All N rows at once, 1-12 samples
// ahead, was slower (the requests queue behind each other), and the spread
// form did not help the backward, whose stores keep the queues busy.
struct NextRows {
  const void* const* inputs;
  const int64_t* strides;
  int64_t sample;  // -1: none
  int64_t dim, elem_bytes, n;
  int64_t next = 0;
  inline void one() {
    if (sample < 0 || next >= n) return;
    const char* p = static_cast<const char*>(inputs[next]) + sample * strides[next] * elem_bytes;
    prefetch_lines<Cache::kL1>(p, dim * elem_bytes);
    ++next;
  }
  inline void rest() {
    while (sample >= 0 && next < n) one();
  }
};

// Strict lower triangle of rows * rows^T into tri (row-major, i > j).
template <typename Dot>
void gram_lower(const typename Dot::T* const* rows, int64_t n, int64_t d, float* tri, NextRows& pf) {
  for (int64_t ib = 1; ib < n; ib += 4) {
    pf.one();
    const int64_t rows_left = n - ib;
    // full blocks left of the diagonal one, which starts at column ib - 1
    for (int64_t jb = 0; jb < ib - 1; jb += 4) {
      pf.one();
      switch (rows_left >= 4 ? 4 : rows_left) {
        case 1: gram_block<Dot, 1>(rows, n, d, ib, jb, tri); break;
        case 2: gram_block<Dot, 2>(rows, n, d, ib, jb, tri); break;
        case 3: gram_block<Dot, 3>(rows, n, d, ib, jb, tri); break;
        default: gram_block<Dot, 4>(rows, n, d, ib, jb, tri); break;
      }
    }
    switch (rows_left >= 4 ? 4 : rows_left) {
      case 1: gram_diag<1>(rows, d, ib, tri); break;
      case 2: gram_diag<2>(rows, d, ib, tri); break;
      case 3: gram_diag<3>(rows, d, ib, tri); break;
      default: gram_diag<4>(rows, d, ib, tri); break;
    }
  }
  pf.rest();
}

// Prefetching all N rows of a later sample at once (1-4 samples ahead) was
// 10-25% slower (bench/micro, one thread: fp32 forward 1.51 vs 1.73
// us/sample, backward 2.45 vs 3.12); the forward spreads the next sample's
// rows over its blocks instead (NextRows).
//
// Copies (widening bf16) the rows of sample b into one contiguous block:
// the N rows of a sample sit in N tensors whose addresses usually agree in
// their low 12 bits, which makes them fight over the same L1 sets and
// 4K-alias with the stores of the outputs.
template <typename T>
inline void pack_rows_f32(const void* const* inputs, const int64_t* strides, int64_t n, int64_t d, int64_t b,
                          float* dst) {
  for (int64_t i = 0; i < n; ++i) {
    const T* src = static_cast<const T*>(inputs[i]) + b * strides[i];
    for (int64_t k = 0; k < d; k += 16) {
      const __mmask16 m = tail_mask16(d - k);
      _mm512_mask_storeu_ps(dst + i * d + k, m, load16(src + k, m));
    }
  }
}

void forward_f32_avx512(const InteractionFwdArgs& a, int64_t begin, int64_t end, void* scratch) {
  const int64_t n = a.num_inputs, d = a.dim, cols = d + n * (n - 1) / 2;
  Arena arena(scratch);
  const float** rows = arena.take<const float*>(n);
  float* packed = arena.take<float>(n * d);
  for (int64_t i = 0; i < n; ++i) rows[i] = packed + i * d;
  for (int64_t b = begin; b < end; ++b) {
    pack_rows_f32<float>(a.inputs, a.row_strides, n, d, b, packed);
    float* out = static_cast<float*>(a.out) + b * cols;
    std::memcpy(out, packed, sizeof(float) * d);
    NextRows pf{a.inputs, a.row_strides, b + 1 < end ? b + 1 : -1, d, 4, n};
    gram_lower<F32Dot>(rows, n, d, out + d, pf);
  }
}

// bf16 rows are widened to fp32 once per sample and share the fp32 block
// kernel: bf16 products are exact in fp32, and on the machines measured
// (Sapphire/Emerald Rapids) widening + vfmadd231ps beat vdpbf16ps on the
// same 4x4 blocks (1.3 vs 1.8 us per 27x128 sample, bench/micro).  The
// avx512_bf16 level still gains vcvtneps2bf16 for the output.
void forward_bf16_avx512(const InteractionFwdArgs& a, int64_t begin, int64_t end, void* scratch) {
  const int64_t n = a.num_inputs, d = a.dim, p = n * (n - 1) / 2, cols = d + p;
  Arena arena(scratch);
  float* tri = arena.take<float>(p);
  const float** rows = arena.take<const float*>(n);
  float* packed = arena.take<float>(n * d);
  for (int64_t i = 0; i < n; ++i) rows[i] = packed + i * d;
  for (int64_t b = begin; b < end; ++b) {
    pack_rows_f32<uint16_t>(a.inputs, a.row_strides, n, d, b, packed);
    NextRows pf{a.inputs, a.row_strides, b + 1 < end ? b + 1 : -1, d, 2, n};
    gram_lower<F32Dot>(rows, n, d, tri, pf);
    uint16_t* out = static_cast<uint16_t*>(a.out) + b * cols;
    std::memcpy(out, static_cast<const uint16_t*>(a.inputs[0]) + b * a.row_strides[0], sizeof(uint16_t) * d);
    for (int64_t k = 0; k < p; k += 16) {
      const __mmask16 m = tail_mask16(p - k);
      _mm256_mask_storeu_epi16(out + d + k, m, f32x16_to_bf16(_mm512_maskz_loadu_ps(m, tri + k)));
    }
  }
}

#ifndef IPEX_LITE_BWD_ROWS
#define IPEX_LITE_BWD_ROWS 4
#endif
#ifndef IPEX_LITE_BWD_VECS
#define IPEX_LITE_BWD_VECS 4
#endif
constexpr int kBwdRows = IPEX_LITE_BWD_ROWS;  // rows of S X per register block
constexpr int kBwdVecs = IPEX_LITE_BWD_VECS;  // 16-float vectors along D per register block
// sx_block's four-row reads of the triangle and sx_all's tail switch assume these bounds.
static_assert(kBwdRows >= 1 && kBwdRows <= 4 && kBwdVecs >= 1 && kBwdVecs <= 4, "register block too large");

// One j step of a row block: acc[r] += s[r] * x_j, x_j = rows[j][k, k + 16 * NV).
template <int NV>
inline void sx_step(__m512 (&acc)[kBwdRows][NV], const float* xj, const float (&s)[kBwdRows], __mmask16 last) {
  __m512 x[NV];
#pragma GCC unroll 8
  for (int v = 0; v < NV; ++v) x[v] = _mm512_maskz_loadu_ps(v == NV - 1 ? last : 0xffff, xj + 16 * v);
#pragma GCC unroll 8
  for (int r = 0; r < kBwdRows; ++r) {
    const __m512 sv = _mm512_set1_ps(s[r]);
#pragma GCC unroll 8
    for (int v = 0; v < NV; ++v) acc[r][v] = _mm512_fmadd_ps(sv, x[v], acc[r][v]);
  }
}

// Rows i0..i0+kBwdRows-1 of S X over columns [k, k + 16 * NV), the last
// vector masked by `last`.  S is read straight from the triangle `tri`
// (S[i][j] = tri[i(i-1)/2 + j] for i > j, S[j][i] above the diagonal, 0 on
// it): columns left of the block read each row's own triangle row, columns
// right of it read four neighbours of a later row, and only the diagonal
// block is assembled entry by entry.  Rows past n read `zeros` (n floats).
template <int NV, typename Store>
inline void sx_block(const float* tri, const float* zeros, int64_t n, const float* const* rows, int64_t i0,
                     int64_t k, __mmask16 last, const Store& store) {
  constexpr int R = kBwdRows;
  __m512 acc[R][NV];
#pragma GCC unroll 8
  for (int r = 0; r < R; ++r)
#pragma GCC unroll 8
    for (int v = 0; v < NV; ++v) acc[r][v] = _mm512_setzero_ps();
  const float* own[R];  // own[r][j] = S[i0 + r][j] for j < i0 + r
#pragma GCC unroll 4
  for (int r = 0; r < R; ++r) own[r] = i0 + r < n ? tri + tri_offset(i0 + r) : zeros;
  float sv[R];
  for (int64_t j = 0; j < i0; ++j) {
#pragma GCC unroll 4
    for (int r = 0; r < R; ++r) sv[r] = own[r][j];
    sx_step<NV>(acc, rows[j] + k, sv, last);
  }
  const int64_t diag_end = min64(i0 + R, n);
  for (int64_t j = i0; j < diag_end; ++j) {
#pragma GCC unroll 4
    for (int r = 0; r < R; ++r) {
      const int64_t i = i0 + r;
      sv[r] = i >= n || i == j ? 0.f : (i > j ? own[r][j] : tri[tri_offset(j) + i]);
    }
    sx_step<NV>(acc, rows[j] + k, sv, last);
  }
  for (int64_t j = diag_end; j < n; ++j) {  // i0 + r < j here
    const float* later = tri + tri_offset(j) + i0;
#pragma GCC unroll 4
    for (int r = 0; r < R; ++r) sv[r] = later[r];
    sx_step<NV>(acc, rows[j] + k, sv, last);
  }
#pragma GCC unroll 8
  for (int r = 0; r < R; ++r) store(i0 + r, k, acc[r], last);
}

template <typename Store>
void sx_all(const float* tri, const float* zeros, int64_t n, int64_t d, const float* const* rows, const Store& store) {
  constexpr int64_t kChunk = 16 * kBwdVecs;
  for (int64_t i0 = 0; i0 < n; i0 += kBwdRows) {
    int64_t k = 0;
    for (; k + kChunk <= d; k += kChunk) sx_block<kBwdVecs>(tri, zeros, n, rows, i0, k, 0xffff, store);
    const int64_t rem = d - k;
    if (rem <= 0) continue;
    const int64_t nv = (rem + 15) / 16;
    const __mmask16 last = tail_mask16(rem - 16 * (nv - 1));
    switch (nv) {
      case 1: sx_block<1>(tri, zeros, n, rows, i0, k, last, store); break;
      case 2: sx_block<2>(tri, zeros, n, rows, i0, k, last, store); break;
      case 3: sx_block<3>(tri, zeros, n, rows, i0, k, last, store); break;
      default: sx_block<4>(tri, zeros, n, rows, i0, k, last, store); break;
    }
  }
}

template <typename T>
void backward_avx512(const InteractionBwdArgs& a, int64_t begin, int64_t end, void* scratch) {
  const int64_t n = a.num_inputs, d = a.dim, p = n * (n - 1) / 2;
  Arena arena(scratch);
  const float** rows = arena.take<const float*>(n);
  float* packed = arena.take<float>(n * d);
  float* tri32 = arena.take<float>(p);  // the triangle of grad_out, widened (bf16 only)
  float* zeros = arena.take<float>(n);
  float* g0 = arena.take<float>(d);
  for (int64_t i = 0; i < n; ++i) rows[i] = packed + i * d;
  for (int64_t i = 0; i < n; ++i) zeros[i] = 0.f;
  for (int64_t b = begin; b < end; ++b) {
    const T* g = static_cast<const T*>(a.grad_out) + b * a.grad_row_stride;
    const float* tri;
    if constexpr (std::is_same<T, float>::value) {
      tri = g + d;
    } else {
      const void* tri_ptr = g + d;
      pack_rows_f32<T>(&tri_ptr, &p, 1, p, 0, tri32);
      tri = tri32;
    }
    pack_rows_f32<T>(a.inputs, a.row_strides, n, d, b, packed);
    const void* g_first_ptr = g;
    pack_rows_f32<T>(&g_first_ptr, &d, 1, d, 0, g0);
    // Row i of S X over columns [k, k + 16 * NV), the last vector masked by `last`.
    auto store = [&](int64_t i, int64_t k, auto& v, __mmask16 last) {
      constexpr int NV = sizeof(v) / sizeof(__m512);
      if (i >= n) return;
      if (i == 0) {
#pragma GCC unroll 8
        for (int q = 0; q < NV; ++q)
          v[q] = _mm512_add_ps(v[q], _mm512_maskz_loadu_ps(q == NV - 1 ? last : 0xffff, g0 + k + 16 * q));
      }
      store_vectors<NV>(static_cast<T*>(a.grad_inputs[i]) + b * d + k, v, last, a.stream_grads);
    };
    sx_all(tri, zeros, n, d, rows, store);
  }
  if (a.stream_grads) _mm_sfence();  // non-temporal stores are weakly ordered: publish them before the task ends
}

#endif  // __AVX512F__

}  // namespace

const InteractionKernels& interaction_kernels() {
#if defined(__AVX512F__)
  static const InteractionKernels table = {
      {&forward_f32_avx512, &forward_bf16_avx512, &forward_generic<double>},
      {&backward_avx512<float>, &backward_avx512<uint16_t>, &backward_generic<double>},
  };
#else
  static const InteractionKernels table = {
      {&forward_generic<float>, &forward_generic<uint16_t>, &forward_generic<double>},
      {&backward_generic<float>, &backward_generic<uint16_t>, &backward_generic<double>},
  };
#endif
  return table;
}

}  // namespace IPEX_LITE_ISA_NS
}  // namespace kernels
}  // namespace ipex_lite
