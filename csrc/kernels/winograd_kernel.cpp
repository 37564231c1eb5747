// Winograd F(2x2, 3x3) kernels, compiled once per ISA level (see setup.py).
//
// Per task: the block's input tiles are transformed once (V = B^T d B, adds
// only, 16 channels per vector) into 16 matrices of tiles x C; then, 64
// output channels at a time, 16 GEMMs M_e = V_e U_e (gemm_tile.h, operands
// in L1/L2) and the output transform Y = A^T M A with bias and ReLU, written
// straight to the output pixels.
//   B^T = [1 0 -1 0; 0 1 1 0; 0 -1 1 0; 0 1 0 -1]   A^T = [1 1 1 0; 0 1 -1 -1]
#include "kernels/winograd_kernel.h"

#include "kernels/gemm_tile.h"

namespace ipex_lite {
namespace kernels {
namespace IPEX_LITE_ISA_NS {
namespace {

struct Tile {
  int64_t img, y0, x0;  // image and the tile's top-left output pixel
};

inline Tile tile_at(const WinogradArgs& a, int64_t t) {
  const int64_t tw = (a.out_w + 1) / 2, per_img = ((a.out_h + 1) / 2) * tw;
  const int64_t rem = t % per_img;
  return {t / per_img, 2 * (rem / tw), 2 * (rem % tw)};
}

#if defined(__AVX512F__)
using Vec = __m512;
constexpr int64_t kLanes = 16;
inline Vec vzero() { return _mm512_setzero_ps(); }
inline Vec vadd(Vec x, Vec y) { return _mm512_add_ps(x, y); }
inline Vec vsub(Vec x, Vec y) { return _mm512_sub_ps(x, y); }
inline Vec vrelu(Vec x) { return _mm512_max_ps(x, _mm512_setzero_ps()); }
inline Vec vload(const float* p, int64_t count) { return _mm512_maskz_loadu_ps(tail_mask16(count), p); }
inline void vstore(float* p, Vec x, int64_t count) { _mm512_mask_storeu_ps(p, tail_mask16(count), x); }
#else
using Vec = float;
constexpr int64_t kLanes = 1;
inline Vec vzero() { return 0.f; }
inline Vec vadd(Vec x, Vec y) { return x + y; }
inline Vec vsub(Vec x, Vec y) { return x - y; }
inline Vec vrelu(Vec x) { return x > 0.f ? x : 0.f; }
inline Vec vload(const float* p, int64_t) { return *p; }
inline void vstore(float* p, Vec x, int64_t) { *p = x; }
#endif

// v[e * tb * C + t * C + c] for the block's tiles [t0, t0 + tb).
void input_tiles(const WinogradArgs& a, int64_t t0, int64_t tb, float* v) {
  const int64_t plane = tb * a.c;
  for (int64_t t = 0; t < tb; ++t) {
    const Tile tl = tile_at(a, t0 + t);
    const int64_t iy = tl.y0 - a.pad_h, ix = tl.x0 - a.pad_w;
    const float* px[4][4];  // input pixels of the 4x4 tile, null where it hangs over the padding
    for (int r = 0; r < 4; ++r)
      for (int s = 0; s < 4; ++s) {
        const bool in = iy + r >= 0 && iy + r < a.h && ix + s >= 0 && ix + s < a.w;
        px[r][s] = in ? a.x + ((tl.img * a.h + iy + r) * a.w + ix + s) * a.c : nullptr;
      }
    float* dst = v + t * a.c;
    for (int64_t c0 = 0; c0 < a.c; c0 += kLanes) {
      const int64_t count = a.c - c0;
      Vec d[4][4];
      for (int r = 0; r < 4; ++r)
        for (int s = 0; s < 4; ++s) d[r][s] = px[r][s] != nullptr ? vload(px[r][s] + c0, count) : vzero();
      Vec bt[4][4];  // B^T d
      for (int s = 0; s < 4; ++s) {
        bt[0][s] = vsub(d[0][s], d[2][s]);
        bt[1][s] = vadd(d[1][s], d[2][s]);
        bt[2][s] = vsub(d[2][s], d[1][s]);
        bt[3][s] = vsub(d[1][s], d[3][s]);
      }
      for (int r = 0; r < 4; ++r) {  // (B^T d) B
        float* row = dst + 4 * r * plane + c0;
        vstore(row, vsub(bt[r][0], bt[r][2]), count);
        vstore(row + plane, vadd(bt[r][1], bt[r][2]), count);
        vstore(row + 2 * plane, vsub(bt[r][2], bt[r][1]), count);
        vstore(row + 3 * plane, vsub(bt[r][1], bt[r][3]), count);
      }
    }
  }
}

// Output channels [k0, k0 + kw) of the block's tiles from m[e * tb * kw + t * kw + j].
void output_tiles(const WinogradArgs& a, int64_t t0, int64_t tb, const float* m, int64_t k0, int64_t kw) {
  const int64_t plane = tb * kw;
  for (int64_t t = 0; t < tb; ++t) {
    const Tile tl = tile_at(a, t0 + t);
    const bool right = tl.x0 + 1 < a.out_w, below = tl.y0 + 1 < a.out_h;
    float* out = a.out + ((tl.img * a.out_h + tl.y0) * a.out_w + tl.x0) * a.k + k0;
    const int64_t row = a.out_w * a.k;
    for (int64_t j0 = 0; j0 < kw; j0 += kLanes) {
      const int64_t count = kw - j0;
      const float* src = m + t * kw + j0;
      Vec s[2][4];  // A^T M
      for (int q = 0; q < 4; ++q) {
        const Vec m0 = vload(src + q * plane, count), m1 = vload(src + (4 + q) * plane, count);
        const Vec m2 = vload(src + (8 + q) * plane, count), m3 = vload(src + (12 + q) * plane, count);
        s[0][q] = vadd(vadd(m0, m1), m2);
        s[1][q] = vsub(vsub(m1, m2), m3);
      }
      const Vec b = a.bias != nullptr ? vload(a.bias + k0 + j0, count) : vzero();
      for (int i = 0; i < 2; ++i) {
        if (i == 1 && !below) break;
        Vec y0 = vadd(vadd(vadd(s[i][0], s[i][1]), s[i][2]), b);  // (A^T M) A
        Vec y1 = vadd(vsub(vsub(s[i][1], s[i][2]), s[i][3]), b);
        if (a.relu) {
          y0 = vrelu(y0);
          y1 = vrelu(y1);
        }
        vstore(out + i * row + j0, y0, count);
        if (right) vstore(out + i * row + a.k + j0, y1, count);
      }
    }
  }
}

void forward(const WinogradArgs& a, int64_t begin, int64_t end, void* scratch) {
  const int64_t tiles = a.n * ((a.out_h + 1) / 2) * ((a.out_w + 1) / 2);
  const int64_t chunks = (a.k + a.k_chunk - 1) / a.k_chunk;
  const int64_t panels = (a.k + 63) / 64;
  Arena arena(scratch);
  float* v = arena.take<float>(16 * a.tile_block * a.c);
  float* m = arena.take<float>(16 * a.tile_block * a.k_chunk);
  int64_t have = -1;  // the block whose transformed input is in v
  for (int64_t task = begin; task < end; ++task) {
    const int64_t block = task / chunks, t0 = block * a.tile_block;
    const int64_t tb = min64(a.tile_block, tiles - t0);
    if (block != have) {
      input_tiles(a, t0, tb, v);
      have = block;
    }
    const int64_t k_begin = (task % chunks) * a.k_chunk, kw = min64(a.k, k_begin + a.k_chunk) - k_begin;
    // e outermost: V_e stays in L2 across the chunk's panels of U_e, each read once per block
    for (int e = 0; e < 16; ++e)
      for (int64_t j = 0; j < kw; j += 64)
        gemm(v + e * tb * a.c, a.c, a.u + (e * panels + (k_begin + j) / 64) * a.c * 64, 64, tb, min64(64, kw - j),
             a.c, m + e * tb * kw + j, kw);
    output_tiles(a, t0, tb, m, k_begin, kw);
  }
}

}  // namespace

const WinogradKernels& winograd_kernels() {
  static const WinogradKernels table = {&forward};
  return table;
}

}  // namespace IPEX_LITE_ISA_NS
}  // namespace kernels
}  // namespace ipex_lite
