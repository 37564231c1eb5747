// Merged embedding bags: pooled lookups over many tables, their gradients and
// fused optimizer updates.  Torch-free interface between
// csrc/ops/embedding_bag.cpp and the per-ISA kernels.
#pragma once

#include <cstdint>

#include "kernels/kernel_common.h"

namespace ipex_lite {
namespace kernels {

enum PoolingMode : int { kPoolSum = 0, kPoolMean = 1, kPoolMax = 2 };

// One table's lookups.  Indices and offsets share one integer type.
struct EmbBagTable {
  const void* weight;  // (num_rows, dim), rows `w_stride` elements apart, unit stride along dim
  int64_t num_rows;
  int64_t w_stride;
  const void* indices;  // nnz
  const void* offsets;  // batch (+1 with include_last_offset) bag starts
  const void* per_sample_weights;  // nnz, weight dtype; null when absent (sum mode only)
  int64_t nnz;
  void* out;  // pooled (batch, dim) rows, `out_stride` elements apart
  int64_t out_stride;
};

struct EmbBagFwdArgs {
  const EmbBagTable* tables;
  int64_t dim;
  int64_t batch;
  int mode;
  bool include_last_offset;
  // Write the pooled rows with non-temporal stores: for outputs too big to
  // stay in cache this skips the read-for-ownership of every output line.
  bool stream_out;
};

// Pools bags [begin, end) of table t.  Returns -1, or the position of the
// first index outside [0, num_rows) (nothing past it is trusted).
using EmbBagFwdFn = int64_t (*)(const EmbBagFwdArgs&, int64_t t, int64_t begin, int64_t end);

// Backward and updates work on rows: the positions of one table's indices
// grouped by row (stable, so a row's contributions are summed in position
// order: deterministic), with a per-position coefficient (1, 1/bag size or
// the per-sample weight) and the bag each position belongs to (-1: none).
struct EmbBagRowGroups {
  const int64_t* sorted_pos;  // nnz, positions grouped by row
  const int64_t* seg_start;   // num_segments + 1 offsets into sorted_pos
  const int64_t* seg_row;     // row of each segment
  const int64_t* bag_of_pos;  // nnz
  const float* coef;          // nnz
  int64_t num_segments;
};

enum RowUpdate : int { kWriteDense = 0, kWriteSparse = 1, kSgd = 2, kAdagrad = 3 };

struct EmbBagUpdateArgs {
  const void* grad;  // (batch, dim) gradient of the pooled output, weight dtype
  int64_t grad_stride;
  EmbBagRowGroups groups;
  int64_t dim;
  int kind;  // RowUpdate
  // kWriteDense: dense (num_rows, dim) gradient, zero-filled by the caller.
  // kWriteSparse: values (num_segments, dim) of the coalesced COO gradient.
  void* out;
  // kSgd / kAdagrad: the table (w_stride apart), its bf16 trail (split mode,
  // else null) and the Adagrad state sum (fp32, state_stride apart).
  void* weight;
  void* trail;
  int64_t w_stride;
  float* state;
  int64_t state_stride;
  float lr, weight_decay, eps;
};

// Handles segments [begin, end).  Distinct segments touch distinct rows, so
// chunks run in parallel without atomics.
using EmbBagUpdateFn = void (*)(const EmbBagUpdateArgs&, int64_t begin, int64_t end);

// Max pooling backward (recomputes each bag's arg-max per column) into a
// zero-filled dense gradient of table t; bags [begin, end) in order.
using EmbBagMaxBwdFn = void (*)(const EmbBagFwdArgs&, const void* grad, int64_t grad_stride, int64_t t,
                                void* dense_out, int64_t begin, int64_t end);

struct EmbBagKernels {
  EmbBagFwdFn forward[2][2];  // [weight dtype: kF32, kBF16][int64 indices]
  EmbBagUpdateFn update[2];   // [weight dtype]
  EmbBagMaxBwdFn max_backward[2][2];
};

}  // namespace kernels
}  // namespace ipex_lite
