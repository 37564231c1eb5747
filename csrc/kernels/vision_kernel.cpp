// ROIAlign (torchvision's semantics) and the FrozenBatchNorm affine, compiled once per ISA level.
//
// ROIAlign: for every output bin, the average of sampling_ratio^2 bilinear
// samples.  The four taps and weights of every sample depend only on the
// roi, so they are computed once per roi and reused for every channel; with
// channels_last input the channel loop is innermost and contiguous (vectorised).
// The backward scatters into grad_input split by channel ranges, so threads
// never write the same element and the sum order is fixed (deterministic).
#include "kernels/vision_kernel.h"

#include <cmath>
#include <vector>

namespace ipex_lite {
namespace kernels {
namespace IPEX_LITE_ISA_NS {
namespace {

template <typename T>
struct Tap {
  int64_t o1, o2, o3, o4;  // spatial offsets (y * W + x) of the four neighbours
  T w1, w2, w3, w4;
};

// One sample point -> its taps (all zero weights when outside the feature map).
template <typename T>
Tap<T> bilinear_tap(int64_t height, int64_t width, T y, T x) {
  if (y < T(-1) || y > T(height) || x < T(-1) || x > T(width)) return {0, 0, 0, 0, T(0), T(0), T(0), T(0)};
  if (y <= T(0)) y = T(0);
  if (x <= T(0)) x = T(0);
  int64_t y_low = static_cast<int64_t>(y), x_low = static_cast<int64_t>(x), y_high, x_high;
  if (y_low >= height - 1) {
    y_high = y_low = height - 1;
    y = T(y_low);
  } else {
    y_high = y_low + 1;
  }
  if (x_low >= width - 1) {
    x_high = x_low = width - 1;
    x = T(x_low);
  } else {
    x_high = x_low + 1;
  }
  const T ly = y - T(y_low), lx = x - T(x_low), hy = T(1) - ly, hx = T(1) - lx;
  return {y_low * width + x_low, y_low * width + x_high, y_high * width + x_low, y_high * width + x_high,
          hy * hx, hy * lx, ly * hx, ly * lx};
}

// Taps of every sample of every bin of one roi, in bin-major order; returns samples per bin.
template <typename T>
int64_t roi_taps(const T* roi, const RoiAlignShape& s, std::vector<Tap<T>>& taps) {
  const T offset = s.aligned ? T(0.5) : T(0);
  const T scale = static_cast<T>(s.spatial_scale);
  const T x1 = roi[1] * scale - offset, y1 = roi[2] * scale - offset;
  T roi_w = roi[3] * scale - offset - x1, roi_h = roi[4] * scale - offset - y1;
  if (!s.aligned) {  // legacy behaviour: a degenerate roi covers one pixel
    roi_w = roi_w > T(1) ? roi_w : T(1);
    roi_h = roi_h > T(1) ? roi_h : T(1);
  }
  const T bin_h = roi_h / T(s.pooled_h), bin_w = roi_w / T(s.pooled_w);
  const int64_t gh = s.sampling_ratio > 0 ? s.sampling_ratio : static_cast<int64_t>(std::ceil(roi_h / T(s.pooled_h)));
  const int64_t gw = s.sampling_ratio > 0 ? s.sampling_ratio : static_cast<int64_t>(std::ceil(roi_w / T(s.pooled_w)));
  taps.clear();
  for (int64_t ph = 0; ph < s.pooled_h; ++ph)
    for (int64_t pw = 0; pw < s.pooled_w; ++pw)
      for (int64_t iy = 0; iy < gh; ++iy) {
        const T y = y1 + T(ph) * bin_h + (T(iy) + T(0.5)) * bin_h / T(gh);
        for (int64_t ix = 0; ix < gw; ++ix) {
          const T x = x1 + T(pw) * bin_w + (T(ix) + T(0.5)) * bin_w / T(gw);
          taps.push_back(bilinear_tap<T>(s.height, s.width, y, x));
        }
      }
  return gh * gw;
}

template <typename T>
void roi_align_forward(const T* __restrict input, const T* __restrict rois, T* __restrict output,
                       const RoiAlignShape& s, int64_t begin, int64_t end) {
  const int64_t C = s.channels, HW = s.height * s.width, bins = s.pooled_h * s.pooled_w;
  std::vector<Tap<T>> taps;
  std::vector<T> acc(s.channels_last ? C : 0);
  for (int64_t k = begin; k < end; ++k) {
    const T* roi = rois + k * 5;
    const int64_t n = static_cast<int64_t>(roi[0]);
    const int64_t per_bin = roi_taps<T>(roi, s, taps);
    const T inv_count = T(1) / T(per_bin > 0 ? per_bin : 1);
    T* out = output + k * C * bins;
    if (s.channels_last) {
      const T* img = input + n * HW * C;
      for (int64_t b = 0; b < bins; ++b) {
        for (int64_t c = 0; c < C; ++c) acc[c] = T(0);
        for (int64_t i = b * per_bin; i < (b + 1) * per_bin; ++i) {
          const Tap<T>& t = taps[i];
          const T* __restrict p1 = img + t.o1 * C;
          const T* __restrict p2 = img + t.o2 * C;
          const T* __restrict p3 = img + t.o3 * C;
          const T* __restrict p4 = img + t.o4 * C;
          T* __restrict a = acc.data();
          for (int64_t c = 0; c < C; ++c) a[c] += t.w1 * p1[c] + t.w2 * p2[c] + t.w3 * p3[c] + t.w4 * p4[c];
        }
        for (int64_t c = 0; c < C; ++c) out[b * C + c] = acc[c] * inv_count;
      }
    } else {
      for (int64_t c = 0; c < C; ++c) {
        const T* plane = input + (n * C + c) * HW;
        for (int64_t b = 0; b < bins; ++b) {
          T v = T(0);
          for (int64_t i = b * per_bin; i < (b + 1) * per_bin; ++i) {
            const Tap<T>& t = taps[i];
            v += t.w1 * plane[t.o1] + t.w2 * plane[t.o2] + t.w3 * plane[t.o3] + t.w4 * plane[t.o4];
          }
          out[c * bins + b] = v * inv_count;
        }
      }
    }
  }
}

template <typename T>
void roi_align_backward(const T* __restrict grad_output, const T* __restrict rois, T* __restrict grad_input,
                        const RoiAlignShape& s, int64_t num_rois, int64_t c_begin, int64_t c_end) {
  const int64_t C = s.channels, HW = s.height * s.width, bins = s.pooled_h * s.pooled_w;
  std::vector<Tap<T>> taps;
  for (int64_t k = 0; k < num_rois; ++k) {
    const T* roi = rois + k * 5;
    const int64_t n = static_cast<int64_t>(roi[0]);
    const int64_t per_bin = roi_taps<T>(roi, s, taps);
    const T inv_count = T(1) / T(per_bin > 0 ? per_bin : 1);
    const T* g = grad_output + k * C * bins;
    for (int64_t b = 0; b < bins; ++b) {
      for (int64_t i = b * per_bin; i < (b + 1) * per_bin; ++i) {
        const Tap<T>& t = taps[i];
        if (s.channels_last) {
          T* img = grad_input + n * HW * C;
          for (int64_t c = c_begin; c < c_end; ++c) {
            const T v = g[b * C + c] * inv_count;
            img[t.o1 * C + c] += t.w1 * v;
            img[t.o2 * C + c] += t.w2 * v;
            img[t.o3 * C + c] += t.w3 * v;
            img[t.o4 * C + c] += t.w4 * v;
          }
        } else {
          for (int64_t c = c_begin; c < c_end; ++c) {
            T* plane = grad_input + (n * C + c) * HW;
            const T v = g[c * bins + b] * inv_count;
            plane[t.o1] += t.w1 * v;
            plane[t.o2] += t.w2 * v;
            plane[t.o3] += t.w3 * v;
            plane[t.o4] += t.w4 * v;
          }
        }
      }
    }
  }
}

template <bool BF16>
inline void store(void* p, int64_t i, float v) {
  if constexpr (BF16) {
    static_cast<uint16_t*>(p)[i] = f32_to_bf16(v);
  } else {
    static_cast<float*>(p)[i] = v;
  }
}

template <bool BF16>
void affine_nchw(const void* __restrict x, void* __restrict y, const float* __restrict scale,
                 const float* __restrict shift, int64_t channels, int64_t hw, int64_t begin, int64_t end) {
  for (int64_t plane = begin; plane < end; ++plane) {
    const float a = scale[plane % channels], b = shift[plane % channels];
    const int64_t base = plane * hw;
    for (int64_t i = base; i < base + hw; ++i) store<BF16>(y, i, load_f32<BF16>(x, i) * a + b);
  }
}

template <bool BF16>
void affine_nhwc(const void* __restrict x, void* __restrict y, const float* __restrict scale,
                 const float* __restrict shift, int64_t channels, int64_t begin, int64_t end) {
  for (int64_t pixel = begin; pixel < end; ++pixel) {
    const int64_t base = pixel * channels;
    for (int64_t c = 0; c < channels; ++c) store<BF16>(y, base + c, load_f32<BF16>(x, base + c) * scale[c] + shift[c]);
  }
}

}  // namespace

const VisionKernels& vision_kernels() {
  static const VisionKernels table = {
      {&roi_align_forward<float>, &roi_align_backward<float>},
      {&roi_align_forward<double>, &roi_align_backward<double>},
      {&affine_nchw<false>, &affine_nchw<true>},
      {&affine_nhwc<false>, &affine_nhwc<true>},
  };
  return table;
}

}  // namespace IPEX_LITE_ISA_NS
}  // namespace kernels
}  // namespace ipex_lite
