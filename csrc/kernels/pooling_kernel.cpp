// Max pooling kernels, compiled once per ISA level (see setup.py).
//
// Channels-last: each output pixel is the element-wise max of the window's
// input pixels, C contiguous values each, so the loop is vector max over
// channels.  NaN propagates as in torch (a NaN in the window wins).
#include "kernels/pooling_kernel.h"

namespace ipex_lite {
namespace kernels {
namespace IPEX_LITE_ISA_NS {
namespace {

// The window's valid input range along one axis for output position o.
inline void window(int64_t o, int64_t size, int64_t k, int64_t s, int64_t p, int64_t d, int64_t* lo, int64_t* hi) {
  const int64_t start = o * s - p;
  int64_t first = 0, last = k;  // taps [first, last)
  while (first < k && start + first * d < 0) ++first;
  while (last > first && start + (last - 1) * d >= size) --last;
  *lo = first;
  *hi = last;
}

template <typename T>
void max_pool(const MaxPoolArgs& a, int64_t begin, int64_t end) {
  const T* x = static_cast<const T*>(a.x);
  T* out = static_cast<T*>(a.out);
  const int64_t c = a.c;
  for (int64_t row = begin; row < end; ++row) {
    const int64_t img = row / a.out_h, oy = row % a.out_h;
    int64_t ky0, ky1;
    window(oy, a.h, a.kernel[0], a.stride[0], a.padding[0], a.dilation[0], &ky0, &ky1);
    const T* base = x + img * a.h * a.w * c;
    for (int64_t ox = 0; ox < a.out_w; ++ox) {
      int64_t kx0, kx1;
      window(ox, a.w, a.kernel[1], a.stride[1], a.padding[1], a.dilation[1], &kx0, &kx1);
      T* dst = out + (row * a.out_w + ox) * c;
      const int64_t iy0 = oy * a.stride[0] - a.padding[0], ix0 = ox * a.stride[1] - a.padding[1];
      int64_t c0 = 0;
#if defined(__AVX512F__)
      for (; c0 < c; c0 += 16) {
        const __mmask16 m = tail_mask16(c - c0);
        __m512 best = _mm512_set1_ps(-__builtin_inff());
        for (int64_t ky = ky0; ky < ky1; ++ky) {
          const T* src = base + ((iy0 + ky * a.dilation[0]) * a.w + ix0) * c + c0;
          for (int64_t kx = kx0; kx < kx1; ++kx) {
            const T* p = src + kx * a.dilation[1] * c;
            const __m512 v = load16(p, m);
            // take v where v > best or v is NaN; a NaN already in best stays
            const __mmask16 take = _mm512_cmp_ps_mask(v, best, _CMP_GT_OQ) | _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q);
            best = _mm512_mask_mov_ps(best, take, v);
          }
        }
        store16(dst + c0, best, m, false);
      }
#else
      for (; c0 < c; ++c0) {
        float best = 0.f;
        T chosen = T();
        bool have = false;
        for (int64_t ky = ky0; ky < ky1; ++ky)
          for (int64_t kx = kx0; kx < kx1; ++kx) {
            const T v = base[((iy0 + ky * a.dilation[0]) * a.w + ix0 + kx * a.dilation[1]) * c + c0];
            const float f = load_elem(&v);
            // a NaN, once taken, stays
            if (!have || (best == best && (f > best || f != f))) {
              best = f;
              chosen = v;
              have = true;
            }
          }
        dst[c0] = chosen;
      }
#endif
    }
  }
}

}  // namespace

const PoolingKernels& pooling_kernels() {
  static const PoolingKernels table = {{&max_pool<float>, &max_pool<uint16_t>, nullptr}};
  return table;
}

}  // namespace IPEX_LITE_ISA_NS
}  // namespace kernels
}  // namespace ipex_lite
