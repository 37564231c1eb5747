// Shared by the attention ops (attention.cpp, llm.cpp).
#pragma once

#include <ATen/ATen.h>

namespace ipex_lite {

// `mask` (bool: true takes part; or float32 / bfloat16 additive values) as fp32 additive values expanded
// (stride 0) to `shape` = (batch, heads, query length, key length); errors name `op`.
at::Tensor additive_mask(const char* op, const at::Tensor& mask, at::IntArrayRef shape);

}  // namespace ipex_lite
