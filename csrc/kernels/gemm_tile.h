// A small fp32 GEMM for kernels whose operands sit in L1/L2 (attention,
// Winograd convolution): C (m x n) = A (m x k) B (k x n), all row-major with
// unit column stride.  Included by kernel files compiled once per ISA level;
// internal linkage like kernel_common.h.
#pragma once

#include "kernels/kernel_common.h"

#ifdef IPEX_LITE_ISA_NS
namespace ipex_lite {
namespace kernels {
namespace IPEX_LITE_ISA_NS {
namespace {

#if defined(__AVX512F__)

// C[R x 16 NV] (+)= A[R x k] B[k x 16 NV]; the last vector of B and C is masked.
template <int R, int NV>
void tile(const float* a, int64_t lda, const float* b, int64_t ldb, int64_t k, float* c, int64_t ldc,
          __mmask16 last, bool accumulate) {
  __m512 acc[R][NV];
#pragma GCC unroll 8
  for (int r = 0; r < R; ++r)
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v)
      acc[r][v] = !accumulate ? _mm512_setzero_ps()
                  : v == NV - 1 ? _mm512_maskz_loadu_ps(last, c + r * ldc + 16 * v)
                                : _mm512_loadu_ps(c + r * ldc + 16 * v);
  for (int64_t p = 0; p < k; ++p) {
    __m512 bv[NV];
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v)
      bv[v] = v == NV - 1 ? _mm512_maskz_loadu_ps(last, b + p * ldb + 16 * v) : _mm512_loadu_ps(b + p * ldb + 16 * v);
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r) {
      const __m512 av = _mm512_set1_ps(a[r * lda + p]);
#pragma GCC unroll 4
      for (int v = 0; v < NV; ++v) acc[r][v] = _mm512_fmadd_ps(av, bv[v], acc[r][v]);
    }
  }
#pragma GCC unroll 8
  for (int r = 0; r < R; ++r)
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v) {
      if (v == NV - 1) {
        _mm512_mask_storeu_ps(c + r * ldc + 16 * v, last, acc[r][v]);
      } else {
        _mm512_storeu_ps(c + r * ldc + 16 * v, acc[r][v]);
      }
    }
}

constexpr int kTileRows = 6;  // 6 x 4 accumulators + 4 B vectors + 1 broadcast: 29 of 32 zmm

// Depth of one pass over a B panel: 128 rows x 64 columns = 32 KB, so the
// panel stays in L1 while every row tile streams past it (at C = 512 the
// whole panel, 128 KB, came from L2 once per row tile).
constexpr int64_t kDepthBlock = 128;

template <int NV>
void row_tiles(const float* a, int64_t lda, const float* b, int64_t ldb, int64_t m, int64_t k, float* c,
               int64_t ldc, __mmask16 last) {
  for (int64_t p = 0; p < k; p += kDepthBlock) {
    const int64_t kk = min64(kDepthBlock, k - p);
    const bool acc = p > 0;
    const float* ap = a + p;
    const float* bp = b + p * ldb;
    int64_t i = 0;
    for (; i + kTileRows <= m; i += kTileRows)
      tile<kTileRows, NV>(ap + i * lda, lda, bp, ldb, kk, c + i * ldc, ldc, last, acc);
    const float* ai = ap + i * lda;
    float* ci = c + i * ldc;
    switch (m - i) {
      case 1: tile<1, NV>(ai, lda, bp, ldb, kk, ci, ldc, last, acc); break;
      case 2: tile<2, NV>(ai, lda, bp, ldb, kk, ci, ldc, last, acc); break;
      case 3: tile<3, NV>(ai, lda, bp, ldb, kk, ci, ldc, last, acc); break;
      case 4: tile<4, NV>(ai, lda, bp, ldb, kk, ci, ldc, last, acc); break;
      case 5: tile<5, NV>(ai, lda, bp, ldb, kk, ci, ldc, last, acc); break;
      default: break;
    }
  }
}

// C (m x n, row stride ldc) = A (m x k) B (k x n); B panels of 64 columns by
// kDepthBlock rows are reused across all row tiles.
void gemm(const float* a, int64_t lda, const float* b, int64_t ldb, int64_t m, int64_t n, int64_t k, float* c,
          int64_t ldc) {
  if (k == 0) {
    for (int64_t i = 0; i < m; ++i)
      for (int64_t j = 0; j < n; ++j) c[i * ldc + j] = 0.f;
    return;
  }
  for (int64_t j = 0; j < n; j += 64) {
    const int64_t w = min64(64, n - j);
    const int64_t nv = (w + 15) / 16;
    const __mmask16 last = tail_mask16(w - 16 * (nv - 1));
    switch (nv) {
      case 4: row_tiles<4>(a, lda, b + j, ldb, m, k, c + j, ldc, last); break;
      case 3: row_tiles<3>(a, lda, b + j, ldb, m, k, c + j, ldc, last); break;
      case 2: row_tiles<2>(a, lda, b + j, ldb, m, k, c + j, ldc, last); break;
      default: row_tiles<1>(a, lda, b + j, ldb, m, k, c + j, ldc, last); break;
    }
  }
}

#else  // portable fallback

void gemm(const float* a, int64_t lda, const float* b, int64_t ldb, int64_t m, int64_t n, int64_t k, float* c,
          int64_t ldc) {
  for (int64_t i = 0; i < m; ++i) {
    float* ci = c + i * ldc;
    for (int64_t j = 0; j < n; ++j) ci[j] = 0.f;
    for (int64_t p = 0; p < k; ++p) {
      const float av = a[i * lda + p];
      const float* bp = b + p * ldb;
      for (int64_t j = 0; j < n; ++j) ci[j] += av * bp[j];
    }
  }
}

#endif  // __AVX512F__

}  // namespace
}  // namespace IPEX_LITE_ISA_NS
}  // namespace kernels
}  // namespace ipex_lite
#endif  // IPEX_LITE_ISA_NS
