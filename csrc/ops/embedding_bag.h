// Replacement for ATen's CPU embedding bag backward, installed on the aten
// op only on request (csrc/ops/aten_overrides.cpp).  Arguments it does not
// handle go to ATen's own kernel, so it is a drop-in for the CPU key.
#pragma once

#include <ATen/ATen.h>

#include <optional>

namespace ipex_lite {

// aten::_embedding_bag_backward: dense sum/mean gradients of fp32/bf16 tables.
at::Tensor aten_embedding_bag_backward(const at::Tensor& grad, const at::Tensor& indices, const at::Tensor& offsets,
                                       const at::Tensor& offset2bag, const at::Tensor& bag_size,
                                       const at::Tensor& maximum_indices, c10::SymInt num_weights,
                                       bool scale_grad_by_freq, int64_t mode, bool sparse,
                                       const std::optional<at::Tensor>& per_sample_weights, int64_t padding_idx);

}  // namespace ipex_lite
