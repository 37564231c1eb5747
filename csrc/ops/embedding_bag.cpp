// ipex_lite merged embedding bag ops: schemas, input checks, row grouping
// for the backward / fused updates, CPU implementations.  The loops live in
// csrc/kernels/embedding_bag_kernel.cpp (one copy per ISA level).
#include <ATen/ATen.h>
#include <ATen/MemoryOverlap.h>
#include <ATen/Parallel.h>
#include <ATen/ops/_embedding_bag_backward_native.h>
#include <torch/library.h>

#include <string>
#include <tuple>
#include <utility>
#include <vector>

#include "dispatch/isa.h"
#include "kernels/embedding_bag_kernel.h"
#include "ops/embedding_bag.h"

IPEX_LITE_DECLARE_KERNEL_TABLE(EmbBagKernels, embedding_bag_kernels)

namespace ipex_lite {
namespace {

namespace k = kernels;

// Validated view of the lists shared by every op of the family.
struct Lookup {
  int64_t tables = 0, batch = 0, dim = 0;
  int mode = 0;
  bool include_last = false;
  at::ScalarType wdtype = at::kFloat;
  bool idx64 = true;
  std::vector<at::Tensor> weights, indices, offsets, psw;
};

void check_dense_cpu(const at::Tensor& t, const char* op, const char* what, size_t i) {
  TORCH_CHECK(t.defined(), op, ": ", what, "[", i, "] is undefined");
  TORCH_CHECK(t.device().is_cpu(), op, ": ", what, "[", i, "] is on ", t.device(), "; only CPU tensors are supported");
  TORCH_CHECK(t.layout() == at::kStrided, op, ": ", what, "[", i, "] must be a dense tensor, got ", t.layout());
}

// Offsets must start at 0, never decrease and stay within the indices.
template <typename I>
void check_offsets(const at::Tensor& off, int64_t nnz, const char* op, size_t t) {
  const I* o = off.data_ptr<I>();
  const int64_t n = off.numel();
  if (n == 0) return;
  TORCH_CHECK(o[0] == 0, op, ": offsets[", t, "][0] must be 0, got ", static_cast<int64_t>(o[0]));
  for (int64_t b = 1; b < n; ++b)
    TORCH_CHECK(o[b] >= o[b - 1], op, ": offsets[", t, "] must be non-decreasing, but offsets[", t, "][", b,
                "] = ", static_cast<int64_t>(o[b]), " < ", static_cast<int64_t>(o[b - 1]));
  TORCH_CHECK(o[n - 1] <= nnz, op, ": offsets[", t, "] ends at ", static_cast<int64_t>(o[n - 1]),
              ", past the ", nnz, " indices of table ", t);
}

Lookup check_lookup(const char* op, at::TensorList weights, at::TensorList indices, at::TensorList offsets,
                    int64_t mode, bool include_last, at::TensorList psw, bool weights_in_place) {
  Lookup l;
  l.tables = static_cast<int64_t>(weights.size());
  TORCH_CHECK(l.tables > 0, op, ": weights must hold at least one table");
  TORCH_CHECK(indices.size() == weights.size() && offsets.size() == weights.size(), op,
              ": weights, indices and offsets must have one entry per table, got ", weights.size(), ", ",
              indices.size(), " and ", offsets.size());
  TORCH_CHECK(psw.empty() || psw.size() == weights.size(), op,
              ": per_sample_weights must be empty or have one entry per table, got ", psw.size(), " for ",
              weights.size(), " tables");
  TORCH_CHECK(mode >= k::kPoolSum && mode <= k::kPoolMax, op, ": pooling_mode must be 0 (sum), 1 (mean) or 2 (max), got ",
              mode);
  TORCH_CHECK(psw.empty() || mode == k::kPoolSum, op, ": per_sample_weights are only supported with sum pooling");
  l.mode = static_cast<int>(mode);
  l.include_last = include_last;
  for (size_t t = 0; t < weights.size(); ++t) {
    const at::Tensor& w = weights[t];
    check_dense_cpu(w, op, "weights", t);
    TORCH_CHECK(w.dim() == 2, op, ": weights[", t, "] must be 2-D (rows, dim), got shape ", w.sizes());
    TORCH_CHECK(w.scalar_type() == at::kFloat || w.scalar_type() == at::kBFloat16, op, ": weights[", t,
                "] has dtype ", w.scalar_type(), "; expected float32 or bfloat16");
    if (t == 0) {
      l.wdtype = w.scalar_type();
      l.dim = w.size(1);
    }
    TORCH_CHECK(w.scalar_type() == l.wdtype, op, ": weights[", t, "] has dtype ", w.scalar_type(),
                " but weights[0] has ", l.wdtype);
    TORCH_CHECK(w.size(1) == l.dim, op, ": weights[", t, "] has dim ", w.size(1), " but weights[0] has ", l.dim);
    if (w.size(1) > 1 && w.stride(1) != 1) {
      TORCH_CHECK(!weights_in_place, op, ": weights[", t, "] must have unit stride along dim to be updated in place");
      l.weights.push_back(w.contiguous());
    } else {
      l.weights.push_back(w);
    }

    const at::Tensor& ix = indices[t];
    const at::Tensor& of = offsets[t];
    check_dense_cpu(ix, op, "indices", t);
    check_dense_cpu(of, op, "offsets", t);
    TORCH_CHECK(ix.dim() == 1 && of.dim() == 1, op, ": indices[", t, "] and offsets[", t, "] must be 1-D, got ",
                ix.sizes(), " and ", of.sizes());
    TORCH_CHECK(ix.scalar_type() == at::kInt || ix.scalar_type() == at::kLong, op, ": indices[", t,
                "] has dtype ", ix.scalar_type(), "; expected int32 or int64");
    TORCH_CHECK(of.scalar_type() == ix.scalar_type(), op, ": offsets[", t, "] has dtype ", of.scalar_type(),
                " but indices[", t, "] has ", ix.scalar_type());
    if (t == 0) l.idx64 = ix.scalar_type() == at::kLong;
    TORCH_CHECK((ix.scalar_type() == at::kLong) == l.idx64, op, ": indices[", t,
                "] must have the same dtype as indices[0]");
    const int64_t bags = of.numel() - (include_last ? 1 : 0);
    TORCH_CHECK(bags >= 0, op, ": offsets[", t, "] must hold batch + 1 entries with include_last_offset=True");
    if (t == 0) l.batch = bags;
    TORCH_CHECK(bags == l.batch, op, ": table ", t, " has ", bags, " bags but table 0 has ", l.batch);
    l.indices.push_back(ix.contiguous());
    l.offsets.push_back(of.contiguous());
    if (l.idx64) {
      check_offsets<int64_t>(l.offsets.back(), ix.numel(), op, t);
    } else {
      check_offsets<int32_t>(l.offsets.back(), ix.numel(), op, t);
    }
    if (!psw.empty()) {
      const at::Tensor& p = psw[t];
      check_dense_cpu(p, op, "per_sample_weights", t);
      TORCH_CHECK(p.dim() == 1 && p.numel() == ix.numel(), op, ": per_sample_weights[", t,
                  "] must be 1-D with one weight per index (", ix.numel(), "), got shape ", p.sizes());
      TORCH_CHECK(p.scalar_type() == l.wdtype, op, ": per_sample_weights[", t, "] has dtype ", p.scalar_type(),
                  " but the tables have ", l.wdtype);
      l.psw.push_back(p.contiguous());
    }
  }
  return l;
}

// Range check of every index that belongs to a bag, for the paths that
// return before a kernel would have checked (batch or dim 0).
void check_index_range(const char* op, const Lookup& l) {
  for (int64_t t = 0; t < l.tables; ++t) {
    const int64_t rows = l.weights[t].size(0), nnz = l.indices[t].numel();
    const int64_t used = l.batch == 0 ? 0
                         : l.include_last ? (l.idx64 ? l.offsets[t].data_ptr<int64_t>()[l.batch]
                                                     : l.offsets[t].data_ptr<int32_t>()[l.batch])
                                          : nnz;
    for (int64_t p = 0; p < used; ++p) {
      const int64_t r = l.idx64 ? l.indices[t].data_ptr<int64_t>()[p] : l.indices[t].data_ptr<int32_t>()[p];
      TORCH_CHECK(r >= 0 && r < rows, op, ": indices[", t, "][", p, "] = ", r, " is out of range for table ", t,
                  " with ", rows, " rows");
    }
  }
}

std::vector<k::EmbBagTable> table_descs(const Lookup& l, const std::vector<at::Tensor>& outs, int64_t out_col0) {
  std::vector<k::EmbBagTable> d(l.tables);
  for (int64_t t = 0; t < l.tables; ++t) {
    const at::Tensor& w = l.weights[t];
    d[t].weight = w.data_ptr();
    d[t].num_rows = w.size(0);
    d[t].w_stride = w.size(0) > 1 ? w.stride(0) : l.dim;
    d[t].indices = l.indices[t].data_ptr();
    d[t].offsets = l.offsets[t].data_ptr();
    d[t].per_sample_weights = l.psw.empty() ? nullptr : l.psw[t].data_ptr();
    d[t].nnz = l.indices[t].numel();
    if (!outs.empty()) {
      const at::Tensor& o = outs.size() == 1 ? outs[0] : outs[t];
      d[t].out = static_cast<char*>(o.data_ptr()) + (outs.size() == 1 ? (out_col0 + t * l.dim) * o.element_size() : 0);
      d[t].out_stride = o.stride(0);
    }
  }
  return d;
}

int wd_index(at::ScalarType t) { return t == at::kBFloat16 ? 1 : 0; }

// Pools every table into its output (separate tensors, or column blocks of
// one tensor starting at out_col0).  Bags are split into chunks so that the
// tables x chunks tasks keep every thread busy.
void run_forward(const char* op, const Lookup& l, const std::vector<at::Tensor>& outs, int64_t out_col0) {
  if (l.batch == 0 || l.dim == 0) {
    check_index_range(op, l);
    return;
  }
  const auto descs = table_descs(l, outs, out_col0);
  // Stream the output once each thread's share outgrows half its L2 (1 MB on
  // the 2 MB L2 parts): 26 x 2048 x 128 fp32 bags with 1 index each, output
  // 27 MB: 4.2 -> 2.9 ms from DRAM, 3.6 -> 2.4 ms with the rows in L3.
  const int64_t out_bytes = l.tables * l.batch * l.dim * static_cast<int64_t>(at::elementSize(l.wdtype));
  const bool stream = out_bytes / std::max<int64_t>(1, at::get_num_threads()) > (int64_t(1) << 20);
  k::EmbBagFwdArgs args{descs.data(), l.dim, l.batch, l.mode, l.include_last, stream};
  const auto fn = IPEX_LITE_KERNEL_TABLE(embedding_bag_kernels).forward[wd_index(l.wdtype)][l.idx64 ? 1 : 0];
  const int64_t chunk = 64;
  const int64_t chunks = (l.batch + chunk - 1) / chunk;
  std::vector<int64_t> bad(l.tables * chunks, -1);  // one slot per task: no shared writes
  at::parallel_for(0, l.tables * chunks, 1, [&](int64_t begin, int64_t end) {
    for (int64_t task = begin; task < end; ++task) {
      const int64_t t = task / chunks, c = task % chunks;
      bad[task] = fn(args, t, c * chunk, std::min(l.batch, (c + 1) * chunk));
    }
  });
  for (int64_t task = 0; task < l.tables * chunks; ++task) {
    if (bad[task] < 0) continue;
    const int64_t t = task / chunks, p = bad[task];
    const int64_t row = l.idx64 ? l.indices[t].data_ptr<int64_t>()[p] : l.indices[t].data_ptr<int32_t>()[p];
    TORCH_CHECK(false, op, ": indices[", t, "][", p, "] = ", row, " is out of range for table ", t, " with ",
                l.weights[t].size(0), " rows");
  }
}

// Positions of one table grouped by row (stable LSD radix sort), the bag of
// each position and its pooling coefficient.  Also the range check: nothing
// is written to a table before all its indices are known to be valid.
struct RowGroups {
  at::Tensor sorted_pos, seg_start, seg_row, bag_of_pos, coef;
  int64_t segments = 0;
};

template <typename I, typename W>
RowGroups group_rows_impl(const char* op, const Lookup& l, int64_t t) {
  const int64_t nnz = l.indices[t].numel();
  const int64_t rows = l.weights[t].size(0);
  const I* idx = l.indices[t].data_ptr<I>();
  const I* off = l.offsets[t].data_ptr<I>();
  const auto lopt = at::TensorOptions().dtype(at::kLong);
  RowGroups g;
  g.bag_of_pos = at::full({nnz}, -1, lopt);
  g.coef = at::empty({nnz}, at::TensorOptions().dtype(at::kFloat));
  int64_t* bag = g.bag_of_pos.data_ptr<int64_t>();
  float* coef = g.coef.data_ptr<float>();
  const W* psw = l.psw.empty() ? nullptr : l.psw[t].data_ptr<W>();
  for (int64_t b = 0; b < l.batch; ++b) {
    const int64_t s = off[b], e = (l.include_last || b + 1 < l.batch) ? static_cast<int64_t>(off[b + 1]) : nnz;
    const float c = l.mode == k::kPoolMean && e > s ? 1.0f / static_cast<float>(e - s) : 1.0f;
    for (int64_t p = s; p < e; ++p) {
      bag[p] = b;
      coef[p] = psw != nullptr ? static_cast<float>(psw[p]) : c;
    }
  }
  // Indices after the last bag (include_last_offset) are ignored, as in the
  // forward and in nn.EmbeddingBag: not checked, not grouped, not updated.
  std::vector<int64_t> key, pos;
  key.reserve(nnz);
  pos.reserve(nnz);
  for (int64_t p = 0; p < nnz; ++p) {
    if (bag[p] < 0) continue;
    const int64_t r = idx[p];
    TORCH_CHECK(r >= 0 && r < rows, op, ": indices[", t, "][", p, "] = ", r, " is out of range for table ", t,
                " with ", rows, " rows");
    key.push_back(r);
    pos.push_back(p);
  }
  const int64_t used = static_cast<int64_t>(key.size());
  std::vector<int64_t> key2(used), pos2(used);
  constexpr int kBits = 11;
  constexpr int64_t kBuckets = int64_t(1) << kBits;
  for (int shift = 0; rows > 1 && (int64_t(1) << shift) < rows; shift += kBits) {
    std::vector<int64_t> count(kBuckets + 1, 0);
    for (int64_t p = 0; p < used; ++p) ++count[((key[p] >> shift) & (kBuckets - 1)) + 1];
    for (int64_t d = 0; d < kBuckets; ++d) count[d + 1] += count[d];
    for (int64_t p = 0; p < used; ++p) {
      const int64_t dst = count[(key[p] >> shift) & (kBuckets - 1)]++;
      key2[dst] = key[p];
      pos2[dst] = pos[p];
    }
    key.swap(key2);
    pos.swap(pos2);
  }
  int64_t segs = 0;
  for (int64_t q = 0; q < used; ++q) segs += (q == 0 || key[q] != key[q - 1]);
  g.segments = segs;
  g.sorted_pos = at::empty({used}, lopt);
  g.seg_start = at::empty({segs + 1}, lopt);
  g.seg_row = at::empty({segs}, lopt);
  int64_t* sp = g.sorted_pos.data_ptr<int64_t>();
  int64_t* ss = g.seg_start.data_ptr<int64_t>();
  int64_t* sr = g.seg_row.data_ptr<int64_t>();
  int64_t s = 0;
  for (int64_t q = 0; q < used; ++q) {
    sp[q] = pos[q];
    if (q == 0 || key[q] != key[q - 1]) {
      ss[s] = q;
      sr[s] = key[q];
      ++s;
    }
  }
  ss[segs] = used;
  return g;
}

std::vector<RowGroups> group_rows(const char* op, const Lookup& l) {
  std::vector<RowGroups> groups(l.tables);
  at::parallel_for(0, l.tables, 1, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      if (l.idx64) {
        groups[t] = l.wdtype == at::kBFloat16 ? group_rows_impl<int64_t, at::BFloat16>(op, l, t)
                                              : group_rows_impl<int64_t, float>(op, l, t);
      } else {
        groups[t] = l.wdtype == at::kBFloat16 ? group_rows_impl<int32_t, at::BFloat16>(op, l, t)
                                              : group_rows_impl<int32_t, float>(op, l, t);
      }
    }
  });
  return groups;
}

std::vector<at::Tensor> checked_grads(const char* op, const Lookup& l, at::TensorList grads) {
  TORCH_CHECK(static_cast<int64_t>(grads.size()) == l.tables, op, ": grads must have one entry per table, got ",
              grads.size(), " for ", l.tables, " tables");
  std::vector<at::Tensor> out;
  for (size_t t = 0; t < grads.size(); ++t) {
    const at::Tensor& g = grads[t];
    check_dense_cpu(g, op, "grads", t);
    TORCH_CHECK(g.dim() == 2 && g.size(0) == l.batch && g.size(1) == l.dim, op, ": grads[", t, "] must have shape (",
                l.batch, ", ", l.dim, "), got ", g.sizes());
    TORCH_CHECK(g.scalar_type() == l.wdtype, op, ": grads[", t, "] has dtype ", g.scalar_type(), " but the tables have ",
                l.wdtype);
    out.push_back(g.size(1) > 1 && g.stride(1) != 1 ? g.contiguous() : g);
  }
  return out;
}

// Runs one row update kind over every table, in parallel over
// tables x chunks of distinct rows.
void run_updates(const Lookup& l, const std::vector<RowGroups>& groups,
                 const std::vector<k::EmbBagUpdateArgs>& args) {
  const auto fn = IPEX_LITE_KERNEL_TABLE(embedding_bag_kernels).update[wd_index(l.wdtype)];
  constexpr int64_t kSegChunk = 256;
  std::vector<std::pair<int64_t, int64_t>> tasks;  // (table, first segment)
  for (int64_t t = 0; t < l.tables; ++t)
    for (int64_t s = 0; s < groups[t].segments; s += kSegChunk) tasks.emplace_back(t, s);
  at::parallel_for(0, static_cast<int64_t>(tasks.size()), 1, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const auto [t, s] = tasks[i];
      fn(args[t], s, std::min(groups[t].segments, s + kSegChunk));
    }
  });
}

k::EmbBagUpdateArgs update_args(const Lookup& l, const at::Tensor& grad, const RowGroups& g, int kind) {
  k::EmbBagUpdateArgs a{};
  a.grad = grad.data_ptr();
  a.grad_stride = grad.size(0) > 1 ? grad.stride(0) : l.dim;
  a.groups = {g.sorted_pos.data_ptr<int64_t>(), g.seg_start.data_ptr<int64_t>(), g.seg_row.data_ptr<int64_t>(),
              g.bag_of_pos.data_ptr<int64_t>(), g.coef.data_ptr<float>(), g.segments};
  a.dim = l.dim;
  a.kind = kind;
  return a;
}

// One output per table, each its own allocation, as a stock nn.EmbeddingBag
// loop produces.  Under glibc malloc either layout can be page-faulted back
// in, depending on what else allocates between calls; interleaved with the
// stock loop on torch 2.13 the single (T, B, D) block (27 MB for 26 x 2048 x
// 128 fp32) was, on ~1/3 of calls, and per-table buffers were not.  A caching
// allocator (ipex-lite-run's jemalloc) removes the question.
std::vector<at::Tensor> forward_cpu(at::TensorList weights, at::TensorList indices, at::TensorList offsets,
                                    int64_t mode, bool include_last, at::TensorList psw) {
  const char* op = "merged_embedding_bag_forward";
  const Lookup l = check_lookup(op, weights, indices, offsets, mode, include_last, psw, false);
  std::vector<at::Tensor> outs;
  for (int64_t t = 0; t < l.tables; ++t) outs.push_back(at::empty({l.batch, l.dim}, l.weights[0].options()));
  run_forward(op, l, outs, 0);
  return outs;
}

at::Tensor cat_forward_cpu(const at::Tensor& dense, at::TensorList weights, at::TensorList indices,
                           at::TensorList offsets, int64_t mode, bool include_last, at::TensorList psw) {
  const char* op = "merged_embedding_bag_cat_forward";
  const Lookup l = check_lookup(op, weights, indices, offsets, mode, include_last, psw, false);
  check_dense_cpu(dense, op, "dense", 0);
  TORCH_CHECK(dense.dim() == 2 && dense.size(0) == l.batch && dense.size(1) == l.dim, op,
              ": dense must have shape (", l.batch, ", ", l.dim, "), got ", dense.sizes());
  TORCH_CHECK(dense.scalar_type() == l.wdtype, op, ": dense has dtype ", dense.scalar_type(), " but the tables have ",
              l.wdtype);
  at::Tensor out = at::empty({l.batch, (l.tables + 1) * l.dim}, l.weights[0].options());
  out.narrow(1, 0, l.dim).copy_(dense);
  run_forward(op, l, {out}, l.dim);
  return out;
}

std::vector<at::Tensor> dense_backward(const char* op, at::TensorList grads_in, at::TensorList weights,
                                       at::TensorList indices, at::TensorList offsets, int64_t mode,
                                       bool include_last, at::TensorList psw) {
  const Lookup l = check_lookup(op, weights, indices, offsets, mode, include_last, psw, false);
  const auto grads = checked_grads(op, l, grads_in);
  std::vector<at::Tensor> dense;
  for (int64_t t = 0; t < l.tables; ++t) dense.push_back(at::zeros(l.weights[t].sizes(), l.weights[t].options()));
  if (l.batch == 0 || l.dim == 0) {
    check_index_range(op, l);
    return dense;
  }
  if (l.mode == k::kPoolMax) {
    check_index_range(op, l);
    const auto descs = table_descs(l, {}, 0);
    k::EmbBagFwdArgs args{descs.data(), l.dim, l.batch, l.mode, l.include_last, false};
    const auto fn = IPEX_LITE_KERNEL_TABLE(embedding_bag_kernels).max_backward[wd_index(l.wdtype)][l.idx64 ? 1 : 0];
    at::parallel_for(0, l.tables, 1, [&](int64_t begin, int64_t end) {
      for (int64_t t = begin; t < end; ++t)
        fn(args, grads[t].data_ptr(), grads[t].size(0) > 1 ? grads[t].stride(0) : l.dim, t, dense[t].data_ptr(), 0,
           l.batch);
    });
    return dense;
  }
  const auto groups = group_rows(op, l);
  std::vector<k::EmbBagUpdateArgs> args;
  for (int64_t t = 0; t < l.tables; ++t) {
    args.push_back(update_args(l, grads[t], groups[t], k::kWriteDense));
    args.back().out = dense[t].data_ptr();
  }
  run_updates(l, groups, args);
  return dense;
}

std::vector<at::Tensor> backward_cpu(at::TensorList grads, at::TensorList weights, at::TensorList indices,
                                     at::TensorList offsets, int64_t mode, bool include_last, at::TensorList psw) {
  return dense_backward("merged_embedding_bag_backward", grads, weights, indices, offsets, mode, include_last, psw);
}

std::tuple<std::vector<at::Tensor>, std::vector<at::Tensor>> backward_rows_cpu(
    at::TensorList grads_in, at::TensorList weights, at::TensorList indices, at::TensorList offsets, int64_t mode,
    bool include_last, at::TensorList psw) {
  const char* op = "merged_embedding_bag_backward_rows";
  const Lookup l = check_lookup(op, weights, indices, offsets, mode, include_last, psw, false);
  TORCH_CHECK(l.mode != k::kPoolMax, op, ": sparse gradients support sum and mean pooling, not max");
  const auto grads = checked_grads(op, l, grads_in);
  const auto groups = group_rows(op, l);
  std::vector<at::Tensor> rows, values;
  std::vector<k::EmbBagUpdateArgs> args;
  for (int64_t t = 0; t < l.tables; ++t) {
    rows.push_back(groups[t].seg_row.clone());
    values.push_back(at::empty({groups[t].segments, l.dim}, l.weights[t].options()));
    args.push_back(update_args(l, grads[t], groups[t], k::kWriteSparse));
    args.back().out = values.back().data_ptr();
  }
  if (l.dim > 0) run_updates(l, groups, args);
  return {rows, values};
}

// Tensors written in place by parallel tasks must not share memory with
// themselves (expanded) or with each other (one tensor passed twice).
void check_no_overlap(const char* op, const std::vector<std::pair<std::string, at::Tensor>>& written) {
  for (size_t i = 0; i < written.size(); ++i) {
    TORCH_CHECK(at::has_internal_overlap(written[i].second) != at::MemOverlap::Yes, op, ": ", written[i].first,
                " has overlapping memory (expanded?) and cannot be updated in place");
    for (size_t j = 0; j < i; ++j) {
      const auto st = at::get_overlap_status(written[i].second, written[j].second);
      TORCH_CHECK(st != at::MemOverlapStatus::Full && st != at::MemOverlapStatus::Partial, op, ": ",
                  written[i].first, " and ", written[j].first, " share memory; each must be its own tensor");
    }
  }
}

void check_companions(const char* op, const Lookup& l, at::TensorList weights, at::TensorList trails,
                      const char* what_state, at::TensorList states) {
  for (int64_t t = 0; t < l.tables; ++t)
    TORCH_CHECK(weights[t].size(1) <= 1 || weights[t].stride(1) == 1, op, ": weights[", t,
                "] must have unit stride along dim to be updated in place");
  TORCH_CHECK(trails.empty() || static_cast<int64_t>(trails.size()) == l.tables, op,
              ": trails must be empty or have one entry per table");
  TORCH_CHECK(trails.empty() || l.wdtype == at::kBFloat16, op, ": trails (split-BF16) need bfloat16 tables");
  for (size_t t = 0; t < trails.size(); ++t) {
    check_dense_cpu(trails[t], op, "trails", t);
    TORCH_CHECK(trails[t].scalar_type() == at::kBFloat16 && trails[t].sizes() == weights[t].sizes() &&
                    trails[t].strides() == weights[t].strides(),
                op, ": trails[", t, "] must be a bfloat16 tensor with the shape and strides of weights[", t, "]");
  }
  std::vector<std::pair<std::string, at::Tensor>> written;
  for (size_t t = 0; t < weights.size(); ++t) written.emplace_back("weights[" + std::to_string(t) + "]", weights[t]);
  for (size_t t = 0; t < trails.size(); ++t) written.emplace_back("trails[" + std::to_string(t) + "]", trails[t]);
  if (what_state != nullptr)
    for (size_t t = 0; t < states.size(); ++t)
      written.emplace_back(std::string(what_state) + "[" + std::to_string(t) + "]", states[t]);
  if (what_state == nullptr) {
    check_no_overlap(op, written);
    return;
  }
  TORCH_CHECK(static_cast<int64_t>(states.size()) == l.tables, op, ": ", what_state,
              " must have one entry per table");
  for (size_t t = 0; t < states.size(); ++t) {
    check_dense_cpu(states[t], op, what_state, t);
    TORCH_CHECK(states[t].scalar_type() == at::kFloat && states[t].sizes() == weights[t].sizes() &&
                    (states[t].size(1) <= 1 || states[t].stride(1) == 1),
                op, ": ", what_state, "[", t, "] must be a float32 tensor shaped like weights[", t,
                "] with unit stride along dim");
  }
  check_no_overlap(op, written);
}

void update_cpu(const char* op, int kind, at::TensorList grads_in, at::TensorList weights, at::TensorList trails,
                at::TensorList states, at::TensorList indices, at::TensorList offsets, int64_t mode,
                bool include_last, at::TensorList psw, double lr, double weight_decay, double eps) {
  const Lookup l = check_lookup(op, weights, indices, offsets, mode, include_last, psw, true);
  TORCH_CHECK(l.mode != k::kPoolMax, op, ": fused updates support sum and mean pooling, not max");
  check_companions(op, l, weights, trails, kind == k::kAdagrad ? "state_sums" : nullptr, states);
  const auto grads = checked_grads(op, l, grads_in);
  if (l.batch == 0 || l.dim == 0) {
    check_index_range(op, l);
    return;
  }
  const auto groups = group_rows(op, l);  // validates every table before any is written
  std::vector<k::EmbBagUpdateArgs> args;
  for (int64_t t = 0; t < l.tables; ++t) {
    args.push_back(update_args(l, grads[t], groups[t], kind));
    auto& a = args.back();
    a.weight = weights[t].data_ptr();
    a.w_stride = weights[t].size(0) > 1 ? weights[t].stride(0) : l.dim;
    a.trail = trails.empty() ? nullptr : trails[t].data_ptr();
    if (kind == k::kAdagrad) {
      a.state = states[t].data_ptr<float>();
      a.state_stride = states[t].size(0) > 1 ? states[t].stride(0) : l.dim;
    }
    a.lr = static_cast<float>(lr);
    a.weight_decay = static_cast<float>(weight_decay);
    a.eps = static_cast<float>(eps);
  }
  run_updates(l, groups, args);
}

void sgd_update_cpu(at::TensorList grads, at::TensorList weights, at::TensorList trails, at::TensorList indices,
                    at::TensorList offsets, int64_t mode, bool include_last, at::TensorList psw, double lr,
                    double weight_decay) {
  update_cpu("merged_embedding_bag_sgd_", k::kSgd, grads, weights, trails, {}, indices, offsets, mode, include_last,
             psw, lr, weight_decay, 0.0);
}

void adagrad_update_cpu(at::TensorList grads, at::TensorList weights, at::TensorList trails,
                        at::TensorList state_sums, at::TensorList indices, at::TensorList offsets, int64_t mode,
                        bool include_last, at::TensorList psw, double lr, double eps) {
  update_cpu("merged_embedding_bag_adagrad_", k::kAdagrad, grads, weights, trails, state_sums, indices, offsets, mode,
             include_last, psw, lr, 0.0, eps);
}

// Stands in for the table in the lookup checks of the ATen backward
// overrides: they need its row count, width and dtype, never its values.
at::Tensor shape_only_table(int64_t rows, const at::Tensor& grad) {
  return at::empty({1, grad.size(1)}, grad.options()).expand({rows, grad.size(1)});
}

bool supported_dtype(const at::Tensor& t) { return t.scalar_type() == at::kFloat || t.scalar_type() == at::kBFloat16; }

}  // namespace

at::Tensor aten_embedding_bag_backward(const at::Tensor& grad, const at::Tensor& indices, const at::Tensor& offsets,
                                       const at::Tensor& offset2bag, const at::Tensor& bag_size,
                                       const at::Tensor& maximum_indices, c10::SymInt num_weights,
                                       bool scale_grad_by_freq, int64_t mode, bool sparse,
                                       const std::optional<at::Tensor>& per_sample_weights, int64_t padding_idx) {
  const bool has_psw = per_sample_weights.has_value() && per_sample_weights->defined();
  const int64_t bags = grad.dim() == 2 ? grad.size(0) : -1;
  // Everything else (sparse or max-pooled gradients, frequency scaling,
  // mean bags that skip a padding row, other dtypes) stays with ATen.
  const bool ours = !sparse && !scale_grad_by_freq && grad.layout() == at::kStrided && supported_dtype(grad) &&
                    (mode == k::kPoolSum || (mode == k::kPoolMean && padding_idx < 0 && !has_psw)) &&
                    indices.dim() == 1 && offsets.dim() == 1 &&
                    (offsets.numel() == bags || offsets.numel() == bags + 1) &&
                    (!has_psw || per_sample_weights->scalar_type() == grad.scalar_type());
  if (!ours) {
    return at::native::_embedding_bag_backward_symint(grad, indices, offsets, offset2bag, bag_size, maximum_indices,
                                                      std::move(num_weights), scale_grad_by_freq, mode, sparse,
                                                      per_sample_weights, padding_idx);
  }
  const int64_t rows = num_weights.expect_int();
  const bool same = indices.scalar_type() == offsets.scalar_type();
  const at::Tensor ix = same ? indices : indices.to(at::kLong), of = same ? offsets : offsets.to(at::kLong);
  std::vector<at::Tensor> psw;
  if (has_psw) psw.push_back(*per_sample_weights);
  at::Tensor out = dense_backward("_embedding_bag_backward", {grad}, {shape_only_table(rows, grad)}, {ix}, {of}, mode,
                                  offsets.numel() == bags + 1, psw)[0];
  // Sum pooling skips the padding row's entries; no other row changes.
  if (padding_idx >= 0 && padding_idx < rows) out.select(0, padding_idx).zero_();
  return out;
}

}  // namespace ipex_lite

TORCH_LIBRARY_FRAGMENT(ipex_lite, m) {
  m.def(
      "merged_embedding_bag_forward(Tensor[] weights, Tensor[] indices, Tensor[] offsets, int pooling_mode, "
      "bool include_last_offset, Tensor[] per_sample_weights) -> Tensor[]");
  m.def(
      "merged_embedding_bag_cat_forward(Tensor dense, Tensor[] weights, Tensor[] indices, Tensor[] offsets, "
      "int pooling_mode, bool include_last_offset, Tensor[] per_sample_weights) -> Tensor");
  m.def(
      "merged_embedding_bag_backward(Tensor[] grads, Tensor[] weights, Tensor[] indices, Tensor[] offsets, "
      "int pooling_mode, bool include_last_offset, Tensor[] per_sample_weights) -> Tensor[]");
  m.def(
      "merged_embedding_bag_backward_rows(Tensor[] grads, Tensor[] weights, Tensor[] indices, Tensor[] offsets, "
      "int pooling_mode, bool include_last_offset, Tensor[] per_sample_weights) -> (Tensor[], Tensor[])");
  m.def(
      "merged_embedding_bag_sgd_(Tensor[] grads, Tensor(a!)[] weights, Tensor(b!)[] trails, Tensor[] indices, "
      "Tensor[] offsets, int pooling_mode, bool include_last_offset, Tensor[] per_sample_weights, float lr, "
      "float weight_decay) -> ()");
  m.def(
      "merged_embedding_bag_adagrad_(Tensor[] grads, Tensor(a!)[] weights, Tensor(b!)[] trails, "
      "Tensor(c!)[] state_sums, Tensor[] indices, Tensor[] offsets, int pooling_mode, bool include_last_offset, "
      "Tensor[] per_sample_weights, float lr, float eps) -> ()");
}

// CompositeExplicitAutograd serves CPU tensors, and also empty lists (which
// carry no dispatch key) and non-CPU tensors, which get our device error.
TORCH_LIBRARY_IMPL(ipex_lite, CompositeExplicitAutograd, m) {
  m.impl("merged_embedding_bag_forward", &ipex_lite::forward_cpu);
  m.impl("merged_embedding_bag_cat_forward", &ipex_lite::cat_forward_cpu);
  m.impl("merged_embedding_bag_backward", &ipex_lite::backward_cpu);
  m.impl("merged_embedding_bag_backward_rows", &ipex_lite::backward_rows_cpu);
  m.impl("merged_embedding_bag_sgd_", &ipex_lite::sgd_update_cpu);
  m.impl("merged_embedding_bag_adagrad_", &ipex_lite::adagrad_update_cpu);
}
