// Attention kernels, compiled once per ISA level (see setup.py).
//
// One task is a block of query rows of one (batch, head).  It keeps the whole
// key range: S = (scale Q) K^T for the block, an exact softmax per row
// (max, exp, sum), then O = P V scaled by 1/sum.  K^T and V are widened
// into fp32 once per (batch, head) that a call touches, so both products are
// the same small GEMM (gemm_tile.h): broadcast one A element, FMA into 6 rows
// x 4 vectors of accumulators.  At BERT's shapes (128 keys, 64 per head)
// every operand of a task stays in L1/L2.
#include "kernels/attention_kernel.h"
#include "kernels/gemm_tile.h"

#include <cmath>
#include <limits>

namespace ipex_lite {
namespace kernels {
namespace IPEX_LITE_ISA_NS {
namespace {

template <typename T>
void widen(const T* src, float* dst, int64_t n, float scale) {
  for (int64_t i = 0; i < n; ++i) dst[i] = load_elem(src + i) * scale;
}

#if defined(__AVX512F__)

inline __m512 unpack_pd(__m512 a, __m512 b, bool hi) {
  const __m512d x = _mm512_castps_pd(a), y = _mm512_castps_pd(b);
  return _mm512_castpd_ps(hi ? _mm512_unpackhi_pd(x, y) : _mm512_unpacklo_pd(x, y));
}

// In-register 16 x 16 transpose: 32-bit, then 64-bit interleaves, then two
// rounds of 128-bit block shuffles.
inline void transpose16(__m512 (&r)[16]) {
  __m512 t[16];
#pragma GCC unroll 8
  for (int i = 0; i < 8; ++i) {
    t[2 * i] = _mm512_unpacklo_ps(r[2 * i], r[2 * i + 1]);
    t[2 * i + 1] = _mm512_unpackhi_ps(r[2 * i], r[2 * i + 1]);
  }
  __m512 u[16];  // u[4n + c], block q: column 4q + c of rows 4n .. 4n + 3
#pragma GCC unroll 4
  for (int n = 0; n < 4; ++n) {
    u[4 * n] = unpack_pd(t[4 * n], t[4 * n + 2], false);
    u[4 * n + 1] = unpack_pd(t[4 * n], t[4 * n + 2], true);
    u[4 * n + 2] = unpack_pd(t[4 * n + 1], t[4 * n + 3], false);
    u[4 * n + 3] = unpack_pd(t[4 * n + 1], t[4 * n + 3], true);
  }
#pragma GCC unroll 4
  for (int c = 0; c < 4; ++c) {
    const __m512 v88 = _mm512_shuffle_f32x4(u[c], u[4 + c], 0x88), w88 = _mm512_shuffle_f32x4(u[8 + c], u[12 + c], 0x88);
    const __m512 vdd = _mm512_shuffle_f32x4(u[c], u[4 + c], 0xdd), wdd = _mm512_shuffle_f32x4(u[8 + c], u[12 + c], 0xdd);
    r[c] = _mm512_shuffle_f32x4(v88, w88, 0x88);
    r[8 + c] = _mm512_shuffle_f32x4(v88, w88, 0xdd);
    r[4 + c] = _mm512_shuffle_f32x4(vdd, wdd, 0x88);
    r[12 + c] = _mm512_shuffle_f32x4(vdd, wdd, 0xdd);
  }
}

// kt[c * n + j] = k[j * ld + c] for j < n, c < e, widened to fp32.
template <typename T>
void transpose_widen(const T* k, int64_t ld, int64_t n, int64_t e, float* kt) {
  for (int64_t j0 = 0; j0 < n; j0 += 16) {
    const int64_t rows = min64(16, n - j0);
    const __mmask16 row_mask = tail_mask16(rows);
    for (int64_t c0 = 0; c0 < e; c0 += 16) {
      const int64_t cols = min64(16, e - c0);
      const __mmask16 col_mask = tail_mask16(cols);
      __m512 r[16];
#pragma GCC unroll 16
      for (int i = 0; i < 16; ++i) r[i] = i < rows ? load16(k + (j0 + i) * ld + c0, col_mask) : _mm512_setzero_ps();
      transpose16(r);
      for (int64_t c = 0; c < cols; ++c) _mm512_mask_storeu_ps(kt + (c0 + c) * n + j0, row_mask, r[c]);
    }
  }
}

// Scores row -> exp(s - max) in place over [0, valid) and zeros over [valid, lk);
// returns 1 / sum (0 for a row whose every key is masked out: its output is zeros, as
// torch's CPU kernels give, and a NaN never reaches the next layer's keys).  `m` is the additive mask row (null: none), column stride ms.
float softmax_row(float* s, int64_t valid, int64_t lk, const float* m, int64_t ms) {
  __m512 vmax = _mm512_set1_ps(-std::numeric_limits<float>::infinity());
  for (int64_t j = 0; j < valid; j += 16) {
    const __mmask16 mk = tail_mask16(valid - j);
    __m512 x = _mm512_maskz_loadu_ps(mk, s + j);
    if (m != nullptr) {
      x = _mm512_add_ps(x, ms != 0 ? _mm512_maskz_loadu_ps(mk, m + j) : _mm512_set1_ps(m[0]));
      _mm512_mask_storeu_ps(s + j, mk, x);
    }
    vmax = _mm512_mask_max_ps(vmax, mk, vmax, x);
  }
  const float row_max = _mm512_reduce_max_ps(vmax);
  if (row_max == -std::numeric_limits<float>::infinity()) {  // every key masked out: a zero row, not NaN
    for (int64_t j = 0; j < lk; ++j) s[j] = 0.f;
    return 0.f;
  }
  const __m512 mx = _mm512_set1_ps(row_max);
  __m512 vsum = _mm512_setzero_ps();
  for (int64_t j = 0; j < valid; j += 16) {
    const __mmask16 mk = tail_mask16(valid - j);
    const __m512 e = exp_nonpositive(_mm512_sub_ps(_mm512_maskz_loadu_ps(mk, s + j), mx));
    _mm512_mask_storeu_ps(s + j, mk, e);
    vsum = _mm512_mask_add_ps(vsum, mk, vsum, e);
  }
  for (int64_t j = valid; j < lk; ++j) s[j] = 0.f;
  return 1.f / _mm512_reduce_add_ps(vsum);
}

#else  // portable fallback

template <typename T>
void transpose_widen(const T* k, int64_t ld, int64_t n, int64_t e, float* kt) {
  for (int64_t j = 0; j < n; ++j)
    for (int64_t c = 0; c < e; ++c) kt[c * n + j] = load_elem(k + j * ld + c);
}

float softmax_row(float* s, int64_t valid, int64_t lk, const float* m, int64_t ms) {
  float mx = -std::numeric_limits<float>::infinity();
  for (int64_t j = 0; j < valid; ++j) {
    if (m != nullptr) s[j] += m[j * ms];
    mx = s[j] > mx ? s[j] : mx;
  }
  if (mx == -std::numeric_limits<float>::infinity()) {  // every key masked out: a zero row, not NaN
    for (int64_t j = 0; j < lk; ++j) s[j] = 0.f;
    return 0.f;
  }
  float sum = 0.f;
  for (int64_t j = 0; j < valid; ++j) {
    s[j] = std::exp(s[j] - mx);
    sum += s[j];
  }
  for (int64_t j = valid; j < lk; ++j) s[j] = 0.f;
  return 1.f / sum;
}

#endif  // __AVX512F__

template <typename T>
void attention(const AttentionArgs& a, int64_t begin, int64_t end, void* scratch) {
  const int64_t e = a.e, ev = a.ev, lk = a.lk;
  const int64_t blocks = (a.lq + a.q_block - 1) / a.q_block;
  Arena arena(scratch);
  float* kt = arena.take<float>(e * lk);
  float* vf = arena.take<float>(lk * ev);
  float* qf = arena.take<float>(a.q_block * e);
  float* s = arena.take<float>(a.q_block * lk);
  float* o = arena.take<float>(a.q_block * ev);
  float* inv = arena.take<float>(a.q_block);
  int64_t packed = -1;  // the (batch, head) whose K^T / V are in scratch
  for (int64_t t = begin; t < end; ++t) {
    const int64_t bh = t / blocks, i0 = (t % blocks) * a.q_block;
    const int64_t b = bh / a.heads, h = bh % a.heads;
    const int64_t rows = min64(a.q_block, a.lq - i0);
    const T* k = static_cast<const T*>(a.k) + b * a.k_strides[0] + h * a.k_strides[1];
    const T* v = static_cast<const T*>(a.v) + b * a.v_strides[0] + h * a.v_strides[1];
    if (bh != packed) {
      transpose_widen(k, a.k_strides[2], lk, e, kt);
      // V is copied even in fp32: rows of a (B, L, H, E) projection lie H * E
      // apart, and at 3 KB strides they crowd a few L1 sets.
      for (int64_t j = 0; j < lk; ++j) widen(v + j * a.v_strides[2], vf + j * ev, ev, 1.f);
      packed = bh;
    }
    const T* q = static_cast<const T*>(a.q) + b * a.q_strides[0] + h * a.q_strides[1] + i0 * a.q_strides[2];
    for (int64_t r = 0; r < rows; ++r) widen(q + r * a.q_strides[2], qf + r * e, e, a.scale);
    gemm(qf, e, kt, lk, rows, lk, e, s, lk);
    for (int64_t r = 0; r < rows; ++r) {
      const float* m = a.mask == nullptr ? nullptr
                                         : a.mask + b * a.mask_strides[0] + h * a.mask_strides[1] +
                                               (i0 + r) * a.mask_strides[2];
      const int64_t valid = a.causal ? min64(lk, i0 + r + 1) : lk;
      inv[r] = softmax_row(s + r * lk, valid, lk, m, a.mask_strides[3]);
    }
    // Under the causal mask no row of the block sees keys past its last row.
    const int64_t keys = a.causal ? min64(lk, i0 + rows) : lk;
    gemm(s, lk, vf, ev, rows, ev, keys, o, ev);
    T* out = static_cast<T*>(a.out) + b * a.out_strides[0] + h * a.out_strides[1] + i0 * a.out_strides[2];
    for (int64_t r = 0; r < rows; ++r)
      for (int64_t c = 0; c < ev; ++c) store_elem(out + r * a.out_strides[2] + c, o[r * ev + c] * inv[r]);
  }
}

}  // namespace

const AttentionKernels& attention_kernels() {
  static const AttentionKernels table = {{&attention<float>, &attention<uint16_t>, nullptr}};
  return table;
}

}  // namespace IPEX_LITE_ISA_NS
}  // namespace kernels
}  // namespace ipex_lite
