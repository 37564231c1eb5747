// Detection helpers: FrozenBatchNorm2d (per-channel affine) and ROIAlign.
// Torch-free interface between csrc/ops/vision.cpp and the per-ISA kernels.
#pragma once

#include <cstdint>

#include "kernels/kernel_common.h"

namespace ipex_lite {
namespace kernels {

struct RoiAlignShape {
  int64_t channels, height, width;
  int64_t pooled_h, pooled_w;
  int64_t sampling_ratio;  // <= 0: ceil(roi size / pooled size) samples per bin side
  double spatial_scale;
  bool aligned;        // half-pixel offset (torchvision's aligned=True)
  bool channels_last;  // input / grad_input are N,H,W,C in memory, output / grad_output K,PH,PW,C
};

template <typename T>
struct RoiAlignFns {
  // rois: K x 5 (batch index, x1, y1, x2, y2); output rows [begin, end) of K
  void (*forward)(const T* input, const T* rois, T* output, const RoiAlignShape& s, int64_t begin, int64_t end);
  // grad_input += d(output)/d(input) . grad_output for channels [c_begin, c_end) over all num_rois rois
  void (*backward)(const T* grad_output, const T* rois, T* grad_input, const RoiAlignShape& s, int64_t num_rois,
                   int64_t c_begin, int64_t c_end);
};

struct VisionKernels {
  RoiAlignFns<float> roi_align_f32;
  RoiAlignFns<double> roi_align_f64;
  // y = x * scale[c] + shift[c] over planes [begin, end): a plane is (n, c) of HW values (NCHW)
  // or, channels_last, one pixel of C values; dtype 0 = fp32, 1 = bf16 (raw bits)
  void (*affine_nchw[2])(const void* x, void* y, const float* scale, const float* shift, int64_t channels,
                         int64_t hw, int64_t begin, int64_t end);
  void (*affine_nhwc[2])(const void* x, void* y, const float* scale, const float* shift, int64_t channels,
                         int64_t begin, int64_t end);
};

}  // namespace kernels
}  // namespace ipex_lite
