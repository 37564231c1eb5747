// Merged embedding bag kernels, compiled once per ISA level (see setup.py).
//
// Forward: each bag accumulates its rows in fp32 registers (16 * NV columns
// at a time), prefetching the rows a few positions ahead: the lookups are
// random rows of large tables, so the time is memory latency unless several
// rows are in flight.  Backward / updates walk the positions grouped by row
// and apply one update per distinct row.
#include "kernels/embedding_bag_kernel.h"

#include <cmath>  // INFINITY
#include <type_traits>

namespace ipex_lite {
namespace kernels {
namespace IPEX_LITE_ISA_NS {
namespace {

constexpr int64_t kChunk = 128;          // columns held in registers per pass
#ifndef IPEX_LITE_EMB_PREFETCH
#define IPEX_LITE_EMB_PREFETCH 24
#endif
// Positions ahead, into L2: rows are random, so only software prefetch puts
// several of them in flight.  26 tables x 2048 bags x 20 rows, bf16: 22.6 ms
// with none, 17 at 8, 14.5 at 24 or 32; fp32 flat from 8 to 32.
constexpr int64_t kRowPrefetch = IPEX_LITE_EMB_PREFETCH;

template <typename I>
inline int64_t bag_end(const I* off, int64_t b, int64_t batch, bool include_last, int64_t nnz) {
  return (include_last || b + 1 < batch) ? static_cast<int64_t>(off[b + 1]) : nnz;
}

inline bool out_of_range(int64_t row, int64_t num_rows) {
  return static_cast<uint64_t>(row) >= static_cast<uint64_t>(num_rows);
}

template <typename T>
inline void prefetch_row(const T* w, int64_t w_stride, int64_t row, int64_t num_rows, int64_t k0, int64_t len) {
  if (out_of_range(row, num_rows)) return;
  prefetch_lines(w + row * w_stride + k0, len * static_cast<int64_t>(sizeof(T)));
}

#if defined(__AVX512F__)

// Pools columns [k0, k0 + 16 * NV) of one bag; the last vector is masked.
template <int NV, typename T, typename I>
inline int64_t pool_chunk(const EmbBagTable& tb, const I* idx, const T* psw, int64_t s, int64_t e, int64_t pf_end,
                          int mode, int64_t k0, __mmask16 last, T* out, bool stream) {
  const T* w = static_cast<const T*>(tb.weight);
  __m512 acc[NV];
  const __m512 init = mode == kPoolMax ? _mm512_set1_ps(-INFINITY) : _mm512_setzero_ps();
#pragma GCC unroll 8
  for (int v = 0; v < NV; ++v) acc[v] = init;
  const int64_t len = 16 * (NV - 1) + __builtin_popcount(last);
  for (int64_t p = s; p < e; ++p) {
    if (p + kRowPrefetch < pf_end) prefetch_row(w, tb.w_stride, idx[p + kRowPrefetch], tb.num_rows, k0, len);
    const int64_t row = idx[p];
    if (out_of_range(row, tb.num_rows)) return p;
    const T* src = w + row * tb.w_stride + k0;
    if (mode == kPoolMax) {
#pragma GCC unroll 8
      for (int v = 0; v < NV; ++v) acc[v] = _mm512_max_ps(acc[v], load16(src + 16 * v, v == NV - 1 ? last : 0xffff));
    } else if (psw != nullptr) {
      const __m512 c = _mm512_set1_ps(load_elem(psw + p));
#pragma GCC unroll 8
      for (int v = 0; v < NV; ++v)
        acc[v] = _mm512_fmadd_ps(c, load16(src + 16 * v, v == NV - 1 ? last : 0xffff), acc[v]);
    } else {
#pragma GCC unroll 8
      for (int v = 0; v < NV; ++v) acc[v] = _mm512_add_ps(acc[v], load16(src + 16 * v, v == NV - 1 ? last : 0xffff));
    }
  }
  if (e == s) {
#pragma GCC unroll 8
    for (int v = 0; v < NV; ++v) acc[v] = _mm512_setzero_ps();
  } else if (mode == kPoolMean) {
    const __m512 scale = _mm512_set1_ps(1.0f / static_cast<float>(e - s));
#pragma GCC unroll 8
    for (int v = 0; v < NV; ++v) acc[v] = _mm512_mul_ps(acc[v], scale);
  }
  store_vectors<NV>(out + k0, acc, last, stream);
  return -1;
}

// pf_end: prefetching may run past this bag up to here (the end of the task's
// positions), so short bags (1 index each) still keep rows in flight.
template <typename T, typename I>
int64_t pool_bag(const EmbBagTable& tb, const I* idx, const T* psw, int64_t s, int64_t e, int64_t pf_end, int mode,
                 int64_t dim, T* out, bool stream) {
  int64_t k0 = 0;
  for (; k0 + kChunk <= dim; k0 += kChunk) {
    const int64_t bad = pool_chunk<8>(tb, idx, psw, s, e, pf_end, mode, k0, 0xffff, out, stream);
    if (bad >= 0) return bad;
  }
  const int64_t rem = dim - k0;
  if (rem <= 0) return -1;
  const int64_t nv = (rem + 15) / 16;
  const __mmask16 last = tail_mask16(rem - 16 * (nv - 1));
  switch (nv) {
    case 1: return pool_chunk<1>(tb, idx, psw, s, e, pf_end, mode, k0, last, out, stream);
    case 2: return pool_chunk<2>(tb, idx, psw, s, e, pf_end, mode, k0, last, out, stream);
    case 3: return pool_chunk<3>(tb, idx, psw, s, e, pf_end, mode, k0, last, out, stream);
    case 4: return pool_chunk<4>(tb, idx, psw, s, e, pf_end, mode, k0, last, out, stream);
    case 5: return pool_chunk<5>(tb, idx, psw, s, e, pf_end, mode, k0, last, out, stream);
    case 6: return pool_chunk<6>(tb, idx, psw, s, e, pf_end, mode, k0, last, out, stream);
    case 7: return pool_chunk<7>(tb, idx, psw, s, e, pf_end, mode, k0, last, out, stream);
    default: return pool_chunk<8>(tb, idx, psw, s, e, pf_end, mode, k0, last, out, stream);
  }
}

// A bag of one row is that row: copied as it is stored (no widening and
// rounding back), 64 bytes per vector.  Sum and mean start from +0, so a -0
// becomes +0 as in the pooled path; max keeps it.
template <typename T>
inline void copy_row(const T* src, T* dst, int64_t dim, bool plus_zero, bool stream) {
  constexpr int64_t kPer = 64 / sizeof(T);
  for (int64_t k = 0; k < dim; k += kPer) {
    const int64_t n = min64(kPer, dim - k);
    if constexpr (std::is_same<T, float>::value) {
      const __mmask16 m = tail_mask16(n);
      __m512 v = _mm512_maskz_loadu_ps(m, src + k);
      if (plus_zero) v = _mm512_add_ps(v, _mm512_setzero_ps());
      store16(dst + k, v, m, stream);
    } else {
      const __mmask32 m = n >= 32 ? ~__mmask32(0) : (__mmask32(1) << n) - 1;
      __m512i v = _mm512_maskz_loadu_epi16(m, src + k);
      if (plus_zero) v = _mm512_mask_blend_epi16(_mm512_cmpeq_epi16_mask(v, _mm512_set1_epi16(-32768)), v,
                                                 _mm512_setzero_si512());
      if (stream && n == 32 && (reinterpret_cast<uintptr_t>(dst + k) & 63) == 0) {
        _mm512_stream_si512(reinterpret_cast<__m512i*>(dst + k), v);
      } else {
        _mm512_mask_storeu_epi16(dst + k, m, v);
      }
    }
  }
}

#else  // portable path: the compiler vectorises the column loops

template <typename T, typename I>
int64_t pool_bag(const EmbBagTable& tb, const I* idx, const T* psw, int64_t s, int64_t e, int64_t pf_end, int mode,
                 int64_t dim, T* out, bool stream) {
  const T* w = static_cast<const T*>(tb.weight);
  float acc[kChunk];
  for (int64_t k0 = 0; k0 < dim; k0 += kChunk) {
    const int64_t len = min64(kChunk, dim - k0);
    for (int64_t k = 0; k < len; ++k) acc[k] = mode == kPoolMax ? -INFINITY : 0.f;
    for (int64_t p = s; p < e; ++p) {
      if (p + kRowPrefetch < pf_end) prefetch_row(w, tb.w_stride, idx[p + kRowPrefetch], tb.num_rows, k0, len);
      const int64_t row = idx[p];
      if (out_of_range(row, tb.num_rows)) return p;
      const T* src = w + row * tb.w_stride + k0;
      if (mode == kPoolMax) {
        for (int64_t k = 0; k < len; ++k) {
          const float v = load_elem(src + k);
          acc[k] = v > acc[k] ? v : acc[k];
        }
      } else {
        const float c = psw != nullptr ? load_elem(psw + p) : 1.f;
        for (int64_t k = 0; k < len; ++k) acc[k] += c * load_elem(src + k);
      }
    }
    const float scale = (e == s) ? 0.f : (mode == kPoolMean ? 1.f / static_cast<float>(e - s) : 1.f);
    for (int64_t k = 0; k < len; ++k) store_elem(out + k0 + k, e == s ? 0.f : acc[k] * scale);
  }
  return -1;
}

#endif

template <typename T, typename I>
int64_t forward_impl(const EmbBagFwdArgs& a, int64_t t, int64_t begin, int64_t end) {
  const EmbBagTable& tb = a.tables[t];
  const I* idx = static_cast<const I*>(tb.indices);
  const I* off = static_cast<const I*>(tb.offsets);
  const T* psw = static_cast<const T*>(tb.per_sample_weights);
  const int64_t pf_end = begin < end ? bag_end(off, end - 1, a.batch, a.include_last_offset, tb.nnz) : 0;
  // The loop prefetches kRowPrefetch positions ahead; start the first ones
  // here, or with 1 index per bag a third of a 64-bag task goes unprefetched.
  const T* w = static_cast<const T*>(tb.weight);
  const int64_t p0 = begin < end ? static_cast<int64_t>(off[begin]) : 0;
  for (int64_t p = p0; p < min64(p0 + kRowPrefetch, pf_end); ++p)
    prefetch_row(w, tb.w_stride, idx[p], tb.num_rows, 0, min64(a.dim, kChunk));
  int64_t bad = -1;
  for (int64_t b = begin; b < end; ++b) {
    const int64_t s = off[b], e = bag_end(off, b, a.batch, a.include_last_offset, tb.nnz);
    T* out = static_cast<T*>(tb.out) + b * tb.out_stride;
#if defined(__AVX512F__)
    if (e == s + 1 && psw == nullptr) {  // DLRM's common case: one index per bag
      if (s + kRowPrefetch < pf_end) prefetch_row(w, tb.w_stride, idx[s + kRowPrefetch], tb.num_rows, 0, a.dim);
      const int64_t row = idx[s];
      if (out_of_range(row, tb.num_rows)) {
        bad = s;
        break;
      }
      copy_row(w + row * tb.w_stride, out, a.dim, a.mode != kPoolMax, a.stream_out);
      continue;
    }
#endif
    bad = pool_bag<T, I>(tb, idx, psw, s, e, pf_end, a.mode, a.dim, out, a.stream_out);
    if (bad >= 0) break;
  }
#if defined(__AVX512F__)
  if (a.stream_out) _mm_sfence();  // non-temporal stores are weakly ordered: publish them before the task ends
#endif
  return bad;
}

// Applies the accumulated gradient `g` (len columns starting at k0) of one row.
template <typename T>
inline void apply_row(const EmbBagUpdateArgs& a, int64_t seg, int64_t row, int64_t k0, int64_t len, float* g) {
  switch (a.kind) {
    case kWriteDense: {
      T* dst = static_cast<T*>(a.out) + row * a.dim + k0;
      for (int64_t k = 0; k < len; ++k) store_elem(dst + k, g[k]);
      break;
    }
    case kWriteSparse: {
      T* dst = static_cast<T*>(a.out) + seg * a.dim + k0;
      for (int64_t k = 0; k < len; ++k) store_elem(dst + k, g[k]);
      break;
    }
    default: {
      T* w = static_cast<T*>(a.weight) + row * a.w_stride + k0;
      uint16_t* trail = a.trail == nullptr ? nullptr : static_cast<uint16_t*>(a.trail) + row * a.w_stride + k0;
      float* st = a.kind == kAdagrad ? a.state + row * a.state_stride + k0 : nullptr;
      for (int64_t k = 0; k < len; ++k) {
        float wv;
        if constexpr (std::is_same<T, float>::value) {
          wv = w[k];
        } else {
          wv = join_halves(w[k], trail != nullptr ? trail[k] : uint16_t(0));
        }
        if (a.kind == kSgd) {
          wv -= a.lr * (g[k] + a.weight_decay * wv);
        } else {
          const float s = st[k] + g[k] * g[k];
          st[k] = s;
          wv -= a.lr * g[k] / (__builtin_sqrtf(s) + a.eps);
        }
        if constexpr (std::is_same<T, float>::value) {
          w[k] = wv;
        } else if (trail != nullptr) {
          split_halves(wv, w + k, trail + k);
        } else {
          w[k] = f32_to_bf16(wv);
        }
      }
    }
  }
}

template <typename T>
void update_impl(const EmbBagUpdateArgs& a, int64_t begin, int64_t end) {
  const EmbBagRowGroups& gr = a.groups;
  const T* grad = static_cast<const T*>(a.grad);
  alignas(64) float g[kChunk];
  const bool in_place = a.kind == kSgd || a.kind == kAdagrad;
  const int64_t row_bytes = a.dim * static_cast<int64_t>(sizeof(T));
  for (int64_t seg = begin; seg < end; ++seg) {
    const int64_t row = gr.seg_row[seg];
    if (in_place && seg + kRowPrefetch < end) {
      // distinct rows of a big table: the read-modify-write is latency-bound without this
      const int64_t ahead = gr.seg_row[seg + kRowPrefetch];
      prefetch_lines(static_cast<const T*>(a.weight) + ahead * a.w_stride, row_bytes);
      if (a.trail != nullptr) prefetch_lines(static_cast<const uint16_t*>(a.trail) + ahead * a.w_stride, a.dim * 2);
      if (a.kind == kAdagrad) prefetch_lines(a.state + ahead * a.state_stride, a.dim * 4);
    }
    for (int64_t k0 = 0; k0 < a.dim; k0 += kChunk) {
      const int64_t len = min64(kChunk, a.dim - k0);
#if defined(__AVX512F__)
      __m512 acc[8];
#pragma GCC unroll 8
      for (int v = 0; v < 8; ++v) acc[v] = _mm512_setzero_ps();
      __mmask16 m[8];
#pragma GCC unroll 8
      for (int v = 0; v < 8; ++v) m[v] = tail_mask16(len - 16 * v);
      for (int64_t q = gr.seg_start[seg]; q < gr.seg_start[seg + 1]; ++q) {
        const int64_t p = gr.sorted_pos[q];
        const int64_t bag = gr.bag_of_pos[p];
        if (bag < 0) continue;
        const __m512 c = _mm512_set1_ps(gr.coef[p]);
        const T* src = grad + bag * a.grad_stride + k0;
#pragma GCC unroll 8
        for (int v = 0; v < 8; ++v) acc[v] = _mm512_fmadd_ps(c, load16(src + 16 * v, m[v]), acc[v]);
      }
#pragma GCC unroll 8
      for (int v = 0; v < 8; ++v) _mm512_store_ps(g + 16 * v, acc[v]);
#else
      for (int64_t k = 0; k < len; ++k) g[k] = 0.f;
      for (int64_t q = gr.seg_start[seg]; q < gr.seg_start[seg + 1]; ++q) {
        const int64_t p = gr.sorted_pos[q];
        const int64_t bag = gr.bag_of_pos[p];
        if (bag < 0) continue;
        const float c = gr.coef[p];
        const T* src = grad + bag * a.grad_stride + k0;
        for (int64_t k = 0; k < len; ++k) g[k] += c * load_elem(src + k);
      }
#endif
      apply_row<T>(a, seg, row, k0, len, g);
    }
  }
}

template <typename T, typename I>
void max_backward_impl(const EmbBagFwdArgs& a, const void* grad_v, int64_t grad_stride, int64_t t, void* dense_v,
                       int64_t begin, int64_t end) {
  const EmbBagTable& tb = a.tables[t];
  const I* idx = static_cast<const I*>(tb.indices);
  const I* off = static_cast<const I*>(tb.offsets);
  const T* w = static_cast<const T*>(tb.weight);
  const T* grad = static_cast<const T*>(grad_v);
  T* dense = static_cast<T*>(dense_v);
  for (int64_t b = begin; b < end; ++b) {
    const int64_t s = off[b], e = bag_end(off, b, a.batch, a.include_last_offset, tb.nnz);
    if (e <= s) continue;
    for (int64_t k = 0; k < a.dim; ++k) {
      int64_t best_row = idx[s];
      float best = load_elem(w + best_row * tb.w_stride + k);
      for (int64_t p = s + 1; p < e; ++p) {
        const float v = load_elem(w + static_cast<int64_t>(idx[p]) * tb.w_stride + k);
        if (v > best) {
          best = v;
          best_row = idx[p];
        }
      }
      T* dst = dense + best_row * a.dim + k;
      store_elem(dst, load_elem(dst) + load_elem(grad + b * grad_stride + k));
    }
  }
}

}  // namespace

const EmbBagKernels& embedding_bag_kernels() {
  static const EmbBagKernels table = {
      {{&forward_impl<float, int32_t>, &forward_impl<float, int64_t>},
       {&forward_impl<uint16_t, int32_t>, &forward_impl<uint16_t, int64_t>}},
      {&update_impl<float>, &update_impl<uint16_t>},
      {{&max_backward_impl<float, int32_t>, &max_backward_impl<float, int64_t>},
       {&max_backward_impl<uint16_t, int32_t>, &max_backward_impl<uint16_t, int64_t>}},
  };
  return table;
}

}  // namespace IPEX_LITE_ISA_NS
}  // namespace kernels
}  // namespace ipex_lite
