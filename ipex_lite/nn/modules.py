"""IPEX-compatible modules: merged embedding bags (plain, with fused SGD /
Adagrad updates, with the dense feature concatenated)."""
from typing import List, NamedTuple, Optional, Sequence, Tuple, Union

import torch
import torch.distributed as dist
from torch import nn

from .._ops import _no_psw_grad
from ..distributed import gather_lookups, is_multi_rank

__all__ = ["EmbeddingSpec", "MergedEmbeddingBag", "MergedEmbeddingBagWithSGD", "MergedEmbeddingBagWithAdaGrad",
           "MergedEmbeddingBagWithCat"]

ops = torch.ops.ipex_lite
_split = ops.split_float_bfloat16  # fp32 -> (top, trail): fp32 bits = (top << 16) | trail
_join = ops.cat_bfloat16_float
_MODES = {"sum": 0, "mean": 1, "max": 2}
_MODE_NAMES = {v: k for k, v in _MODES.items()}
# Tables in these dtypes run ipex_lite's kernels; float64 and float16 tables (which IPEX also
# accepts) look up through ATen's embedding_bag, one call per table, with the same checks.
_KERNEL_DTYPES = (torch.float32, torch.bfloat16)
_ATEN_DTYPES = (torch.float64, torch.float16)


class EmbeddingSpec(NamedTuple):
    """One table: rows, embedding size, pooling ('sum'|'mean'|'max'), dtype,
    optional initial weight (copied), sparse gradients (MergedEmbeddingBag only)."""
    num_of_features: int
    feature_size: int
    pooling_modes: str
    dtype: torch.dtype
    weight: Optional[torch.Tensor] = None
    sparse: bool = False


Lists = Union[Sequence[torch.Tensor], torch.Tensor]


def split_table_batched(values: torch.Tensor, offsets: torch.Tensor, num_tables: int,
                        include_last_offset: bool = True,
                        per_sample_weights: Optional[torch.Tensor] = None):
    """torchrec/fbgemm layout -> per-table lists.

    ``values`` holds every table's indices, table-major; ``offsets`` has
    T*B+1 entries (bag starts, then the end).  Returns per-table
    (indices, offsets, per_sample_weights or None) with offsets rebased to 0;
    with include_last_offset the per-table offsets keep their end (B+1
    entries).
    """
    if values.dim() != 1 or offsets.dim() != 1:
        raise ValueError("split_table_batched: values and offsets must be 1-D")
    total = offsets.numel() - 1
    if total < 0 or total % num_tables != 0:
        raise ValueError(f"split_table_batched: offsets must have T*B+1 entries for T={num_tables} tables, "
                         f"got {offsets.numel()}")
    batch = total // num_tables
    bounds = offsets[::batch].tolist() if batch > 0 else [0] * (num_tables + 1)
    if bounds[-1] > values.numel() or any(b > c for b, c in zip(bounds, bounds[1:])):
        raise ValueError("split_table_batched: offsets must be non-decreasing and end within values")
    if per_sample_weights is not None and per_sample_weights.shape != values.shape:
        raise ValueError("split_table_batched: per_sample_weights must have one weight per value")
    indices, offs, psw = [], [], []
    for t in range(num_tables):
        start = bounds[t]
        indices.append(values[start:bounds[t + 1]])
        if per_sample_weights is not None:
            psw.append(per_sample_weights[start:bounds[t + 1]])
        o = offsets[t * batch:(t + 1) * batch + (1 if include_last_offset else 0)] - start
        offs.append(o)
    return indices, offs, (psw if per_sample_weights is not None else None)


class MergedEmbeddingBag(nn.Module):
    """Several embedding bags looked up in one call.

    ``forward(indices, offsets, per_sample_weights=None)`` takes one indices
    and one offsets tensor per table (int32 or int64, nn.EmbeddingBag
    semantics) -- or the flat table-batched layout (one values tensor and T*B+1
    offsets) -- and returns a list of (B, D) tensors.  All tables share the
    embedding size, dtype and pooling mode.  ``weights.<t>`` in the state dict
    is table t's (rows, D) weight, as in ``nn.EmbeddingBag.weight``.
    """

    def __init__(self, embedding_specs: Sequence[EmbeddingSpec], include_last_offset: bool = False):
        super().__init__()
        if not embedding_specs:
            raise ValueError("MergedEmbeddingBag needs at least one EmbeddingSpec")
        first = embedding_specs[0]
        for i, s in enumerate(embedding_specs):
            if s.pooling_modes not in _MODES:
                raise ValueError(f"embedding_specs[{i}]: pooling_modes must be sum, mean or max, got {s.pooling_modes!r}")
            if (s.pooling_modes, s.feature_size, s.dtype, s.sparse) != (first.pooling_modes, first.feature_size,
                                                                         first.dtype, first.sparse):
                raise ValueError(f"embedding_specs[{i}]: all tables must share pooling mode, feature size, dtype "
                                 "and sparse flag")
            if s.dtype not in _KERNEL_DTYPES + _ATEN_DTYPES:
                raise ValueError(f"embedding_specs[{i}]: dtype must be float32, bfloat16, float64 or float16, "
                                 f"got {s.dtype}")
        if first.sparse and first.pooling_modes == "max":
            raise ValueError("sparse gradients support sum and mean pooling, not max")
        self.pooling_mode = _MODES[first.pooling_modes]
        self.aten_lookup = first.dtype in _ATEN_DTYPES
        self.embedding_dim = first.feature_size
        self.sparse = first.sparse
        self.include_last_offset = include_last_offset
        weights = []
        for s in embedding_specs:
            if s.weight is not None and tuple(s.weight.shape) != (s.num_of_features, s.feature_size):
                raise ValueError(f"weight of shape {tuple(s.weight.shape)} does not match "
                                 f"({s.num_of_features}, {s.feature_size})")
            w = torch.empty(s.num_of_features, s.feature_size, dtype=s.dtype)
            if w.device.type == "cpu":  # random-row lookups: ask for huge pages before the first write
                ops.advise_hugepages(w)
            with torch.no_grad():
                if s.weight is not None:
                    w.copy_(s.weight.detach())
                else:
                    w.normal_()
            weights.append(nn.Parameter(w))
        self.weights = nn.ParameterList(weights)

    @classmethod
    def from_embeddingbag_list(cls, tables: Sequence[nn.EmbeddingBag], dtype: Optional[torch.dtype] = None,
                               **kwargs) -> "MergedEmbeddingBag":
        """Builds the merged module from nn.EmbeddingBag modules, copying their weights."""
        specs = []
        include_last = None
        for i, emb in enumerate(tables):
            if not isinstance(emb, nn.EmbeddingBag):
                raise TypeError(f"tables[{i}] is {type(emb).__name__}, expected nn.EmbeddingBag")
            if emb.max_norm is not None or emb.padding_idx is not None or emb.scale_grad_by_freq:
                raise ValueError(f"tables[{i}]: max_norm, padding_idx and scale_grad_by_freq are not supported")
            include_last = emb.include_last_offset if include_last is None else include_last
            if emb.include_last_offset != include_last:
                raise ValueError("all tables must agree on include_last_offset")
            specs.append(EmbeddingSpec(emb.num_embeddings, emb.embedding_dim, emb.mode,
                                       dtype or emb.weight.dtype, emb.weight, bool(emb.sparse)))
        kwargs.setdefault("include_last_offset", bool(include_last))
        return cls(specs, **kwargs)

    def _weight_list(self) -> List[torch.Tensor]:
        # ParameterList indexing costs ~2 us per table (61 us of a 0.85 ms 26-table lookup), so eager
        # calls read its registry; under compile, indexing: torch 2.8's dynamo cannot trace list(ParameterList)
        params = self.weights._parameters
        if not torch.compiler.is_compiling() and len(params) == len(self.weights):
            return list(params.values())
        return [self.weights[i] for i in range(len(self.weights))]

    def _lists(self, indices: Lists, offsets: Lists, per_sample_weights) -> Tuple[list, list, list]:
        t = len(self.weights)
        if isinstance(indices, torch.Tensor):
            if not isinstance(offsets, torch.Tensor):
                raise TypeError("with a flat values tensor, offsets must be one tensor of T*B+1 entries")
            flat_psw = per_sample_weights if isinstance(per_sample_weights, torch.Tensor) else None
            indices, offsets, split_psw = split_table_batched(indices, offsets, t, self.include_last_offset,
                                                              flat_psw)
            if flat_psw is not None:
                per_sample_weights = split_psw
        indices, offsets = list(indices), list(offsets)
        if len(indices) != t or len(offsets) != t:
            raise ValueError(f"expected {t} indices and offsets tensors, got {len(indices)} and {len(offsets)}")
        psw = [] if per_sample_weights is None else list(per_sample_weights)
        return indices, offsets, psw

    def _aten_lookups(self, weights, indices, offsets, psw) -> List[torch.Tensor]:
        """float64 / float16 tables: ATen's embedding_bag per table (its own autograd, sparse
        gradients included), after the checks ipex_lite's kernels make."""
        if psw and len(psw) != len(weights):
            raise ValueError(f"expected {len(weights)} per_sample_weights tensors, got {len(psw)}")
        if psw and self.pooling_mode != _MODES["sum"]:
            raise ValueError("per_sample_weights are only supported with sum pooling")
        out, batch = [], None
        for t, (w, ix, of) in enumerate(zip(weights, indices, offsets)):
            p = psw[t] if psw else None
            bags = _check_lookup(t, w, ix, of, p, self.include_last_offset)
            if batch is None:
                batch = bags
            elif bags != batch:
                raise ValueError(f"table {t} has {bags} bags but table 0 has {batch}")
            out.append(nn.functional.embedding_bag(ix, w, of, mode=_MODE_NAMES[self.pooling_mode], sparse=self.sparse,
                                                   per_sample_weights=p, include_last_offset=self.include_last_offset))
        return out

    def forward(self, indices: Lists, offsets: Lists,
                per_sample_weights: Optional[Lists] = None) -> List[torch.Tensor]:
        indices, offsets, psw = self._lists(indices, offsets, per_sample_weights)
        weights = self._weight_list()
        if self.aten_lookup:
            return self._aten_lookups(weights, indices, offsets, psw)
        if self.sparse and torch.is_grad_enabled() and any(w.requires_grad for w in weights):
            return list(_SparseGradLookup.apply(self.pooling_mode, self.include_last_offset, len(weights),
                                                *weights, *indices, *offsets, *psw))
        return list(ops.merged_embedding_bag_forward(weights, indices, offsets, self.pooling_mode,
                                                     self.include_last_offset, psw))

    def extra_repr(self) -> str:
        rows = [w.shape[0] for w in self.weights]
        return (f"tables={len(rows)}, rows={rows}, dim={self.embedding_dim}, mode={_MODE_NAMES[self.pooling_mode]}, "
                f"sparse={self.sparse}")


def _check_lookup(t: int, weight: torch.Tensor, indices: torch.Tensor, offsets: torch.Tensor,
                  psw: Optional[torch.Tensor], include_last: bool) -> int:
    """The checks ipex_lite's lookup kernels make (ATen's embedding_bag skips some: a decreasing
    offset is not an error there); returns the number of bags."""
    if not isinstance(indices, torch.Tensor) or not isinstance(offsets, torch.Tensor):
        raise TypeError(f"indices[{t}] and offsets[{t}] must be tensors")
    if indices.dim() != 1 or offsets.dim() != 1:
        raise ValueError(f"indices[{t}] and offsets[{t}] must be 1-D, got shapes {tuple(indices.shape)} and "
                         f"{tuple(offsets.shape)}")
    if indices.dtype not in (torch.int32, torch.int64) or offsets.dtype != indices.dtype:
        raise ValueError(f"indices[{t}] and offsets[{t}] must both be int32 or both int64, got {indices.dtype} and "
                         f"{offsets.dtype}")
    bags = offsets.numel() - (1 if include_last else 0)
    if bags < 0:
        raise ValueError(f"offsets[{t}] must hold batch + 1 entries with include_last_offset=True")
    if offsets.numel() > 0:
        if int(offsets[0]) != 0:
            raise ValueError(f"offsets[{t}][0] must be 0, got {int(offsets[0])}")
        if offsets.numel() > 1 and bool((offsets[1:] < offsets[:-1]).any()):
            raise ValueError(f"offsets[{t}] must be non-decreasing")
        if int(offsets[-1]) > indices.numel():
            raise ValueError(f"offsets[{t}] ends at {int(offsets[-1])} but indices[{t}] has {indices.numel()} entries")
    if indices.numel() > 0:
        lo, hi = int(indices.min()), int(indices.max())
        if lo < 0 or hi >= weight.shape[0]:
            bad = lo if lo < 0 else hi
            p = int((indices == bad).nonzero()[0, 0])
            raise IndexError(f"indices[{t}][{p}] = {bad} is out of range for table {t} with {weight.shape[0]} rows")
    if psw is not None and (psw.shape != indices.shape or psw.dtype != weight.dtype):
        raise ValueError(f"per_sample_weights[{t}] must have one {weight.dtype} weight per index, got "
                         f"{psw.dtype} of shape {tuple(psw.shape)}")
    return bags


class _SparseGradLookup(torch.autograd.Function):
    """Lookup whose weight gradients are coalesced sparse COO tensors, like
    nn.EmbeddingBag(sparse=True)."""

    @staticmethod
    def forward(ctx, mode, include_last, t, *tensors):
        weights, indices, offsets = list(tensors[:t]), list(tensors[t:2 * t]), list(tensors[2 * t:3 * t])
        psw = list(tensors[3 * t:])
        _no_psw_grad(psw)
        ctx.lookup = (mode, include_last, t)
        ctx.save_for_backward(*tensors)
        return tuple(ops.merged_embedding_bag_forward(weights, indices, offsets, mode, include_last, psw))

    @staticmethod
    def backward(ctx, *grads):
        mode, include_last, t = ctx.lookup
        tensors = ctx.saved_tensors
        weights, indices, offsets = list(tensors[:t]), list(tensors[t:2 * t]), list(tensors[2 * t:3 * t])
        psw = list(tensors[3 * t:])
        rows, values = ops.merged_embedding_bag_backward_rows(list(grads), weights, indices, offsets, mode,
                                                              include_last, psw)
        sparse = []
        for w, r, v in zip(weights, rows, values):
            # rows are sorted, unique and in range by construction
            g = torch.sparse_coo_tensor(r.unsqueeze(0), v, w.shape, is_coalesced=True, check_invariants=False)
            sparse.append(g)
        return (None, None, None, *sparse, *([None] * (len(tensors) - t)))


class _FusedUpdateLookup(torch.autograd.Function):
    """Forward lookup; backward updates the tables in place (fused SGD or
    Adagrad) and returns no weight gradients."""

    @staticmethod
    def forward(ctx, module, t, *tensors):
        weights, indices, offsets = list(tensors[:t]), list(tensors[t:2 * t]), list(tensors[2 * t:3 * t])
        psw = list(tensors[3 * t:])
        _no_psw_grad(psw)
        ctx.module = module
        ctx.t = t
        ctx.save_for_backward(*indices, *offsets, *psw)
        return tuple(ops.merged_embedding_bag_forward(weights, indices, offsets, module.pooling_mode,
                                                      module.include_last_offset, psw))

    @staticmethod
    def backward(ctx, *grads):
        t = ctx.t
        saved = ctx.saved_tensors
        indices, offsets, psw = list(saved[:t]), list(saved[t:2 * t]), list(saved[2 * t:])
        ctx.module._apply_update(*_update_lookups(ctx.module, list(grads), indices, offsets, psw))
        return (None, None, *([None] * (t + len(saved))))


def _update_lookups(module, grads, indices, offsets, psw):
    """The lookups a table update applies: this rank's, or every rank's for
    tables replicated by ipex_lite.distributed.wrap_ddp (each replica then
    applies the same update, the one a single process would on the whole
    batch).  Returns (grads, indices, offsets, psw, include_last_offset)."""
    local = (grads, indices, offsets, psw, module.include_last_offset)
    if not getattr(module, "replicated", False):  # modules pickled before it existed have none
        if is_multi_rank():
            raise RuntimeError(f"{type(module).__name__}: its update inside backward would use this rank's "
                               "lookups only; wrap the model with ipex_lite.distributed.wrap_ddp, which "
                               "replicates the tables and exchanges every rank's lookups")
        return local
    group = module.process_group  # None: the default group
    if dist.get_world_size(group) == 1:
        return local
    return (*gather_lookups(grads, indices, offsets, psw, module.include_last_offset, group), False)


class _FusedUpdateBase(MergedEmbeddingBag):
    """Shared by the fused-update modules: split-BF16 storage and state dicts
    with plain fp32 per-table weights."""

    def __init__(self, embedding_specs, include_last_offset=False, split_bf16: Optional[bool] = None):
        super().__init__(embedding_specs, include_last_offset)
        if self.aten_lookup:
            raise ValueError(f"{type(self).__name__}: the fused update kernels take float32 or bfloat16 tables, got "
                             f"{self.weights[0].dtype}; use MergedEmbeddingBag with a torch.optim optimizer")
        self.sparse = False  # tables are updated in backward: no gradient, sparse or dense, is produced
        # set by ipex_lite.distributed.wrap_ddp; the group is kept only when it is not the default
        # one (a module holding the default group would keep it alive past destroy_process_group)
        self.replicated, self.process_group = False, None
        bf16 = self.weights[0].dtype == torch.bfloat16
        self.split_bf16 = bf16 if split_bf16 is None else bool(split_bf16)
        if self.split_bf16 and not bf16:
            raise ValueError("split_bf16 needs bfloat16 tables")
        for i, s in enumerate(embedding_specs):
            trail = torch.zeros_like(self.weights[i])
            if self.split_bf16 and s.weight is not None and s.weight.dtype == torch.float32:
                top, trail = _split(s.weight.detach().contiguous())
                with torch.no_grad():
                    self.weights[i].copy_(top)
            self.register_buffer(f"trail_{i}", trail if self.split_bf16 else None, persistent=False)
        self._register_split_hooks()

    def trails(self) -> List[torch.Tensor]:
        return [getattr(self, f"trail_{i}") for i in range(len(self.weights))] if self.split_bf16 else []

    def fp32_weight(self, t: int) -> torch.Tensor:
        """Table t as fp32 (top and trail joined in split mode)."""
        w = self.weights[t].detach()
        if self.split_bf16:
            return _join(w, getattr(self, f"trail_{t}"))
        return w.float() if w.dtype != torch.float32 else w

    def forward(self, indices: Lists, offsets: Lists, per_sample_weights: Optional[Lists] = None):
        indices, offsets, psw = self._lists(indices, offsets, per_sample_weights)
        weights = self._weight_list()
        if torch.is_grad_enabled():
            return list(_FusedUpdateLookup.apply(self, len(weights), *weights, *indices, *offsets, *psw))
        return list(ops.merged_embedding_bag_forward(weights, indices, offsets, self.pooling_mode,
                                                     self.include_last_offset, psw))

    # State dicts hold plain fp32 per-table weights in split mode: a post hook
    # joins top + trail on save, a pre hook splits fp32 on load (the bf16
    # parameter then receives the exact top half, not a rounded copy).
    def _register_split_hooks(self):
        post = getattr(self, "register_state_dict_post_hook", None) or self._register_state_dict_hook
        post(_FusedUpdateBase._state_dict_join)
        self.register_load_state_dict_pre_hook(_FusedUpdateBase._state_dict_split)
        self.register_load_state_dict_post_hook(_FusedUpdateBase._state_dict_commit_trails)
        self._pending_trails = {}

    @staticmethod
    def _state_dict_join(module, state_dict, prefix, local_metadata):
        if module.split_bf16:
            for t in range(len(module.weights)):
                state_dict[f"{prefix}weights.{t}"] = module.fp32_weight(t)

    @staticmethod
    def _state_dict_split(module, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                          error_msgs):
        if not module.split_bf16:
            return
        module._pending_trails = {}
        for t in range(len(module.weights)):
            key = f"{prefix}weights.{t}"
            w = state_dict.get(key)
            if isinstance(w, torch.Tensor) and w.is_floating_point() and w.shape == module.weights[t].shape:
                top, trail = _split(w.float())  # a bf16 entry splits into itself + a zero trail
                state_dict[key] = top
                module._pending_trails[t] = trail

    @staticmethod
    def _state_dict_commit_trails(module, incompatible_keys):
        # runs after the parameters were loaded: only then replace the trails
        with torch.no_grad():
            for t, trail in module._pending_trails.items():
                getattr(module, f"trail_{t}").copy_(trail)
        module._pending_trails = {}


class MergedEmbeddingBagWithSGD(_FusedUpdateBase):
    """Merged embedding bags trained by SGD inside backward: each distinct row
    gets w -= lr * (sum of its gradient contributions + weight_decay * w), in
    one pass, without materialising a gradient.  bf16 tables keep an fp32
    master weight split into top + trail (split_bf16)."""

    def __init__(self, embedding_specs, lr: float = 0.01, weight_decay: float = 0.0,
                 include_last_offset: bool = False, split_bf16: Optional[bool] = None):
        if lr < 0 or weight_decay < 0:
            raise ValueError("lr and weight_decay must be non-negative")
        super().__init__(embedding_specs, include_last_offset, split_bf16)
        self.lr = float(lr)
        self.weight_decay = float(weight_decay)

    def _apply_update(self, grads, indices, offsets, psw, include_last):
        with torch.no_grad():
            ops.merged_embedding_bag_sgd_(grads, [w.data for w in self.weights], self.trails(), indices, offsets,
                                          self.pooling_mode, include_last, psw, self.lr, self.weight_decay)


class MergedEmbeddingBagWithAdaGrad(_FusedUpdateBase):
    """Merged embedding bags trained by Adagrad inside backward (per distinct
    row: state += g*g; w -= lr * g / (sqrt(state) + eps)), as torch.optim.Adagrad
    does for sparse gradients."""

    def __init__(self, embedding_specs, lr: float = 0.01, eps: float = 1e-10, initial_accumulator_value: float = 0.0,
                 include_last_offset: bool = False, split_bf16: Optional[bool] = None):
        if lr < 0 or eps < 0 or initial_accumulator_value < 0:
            raise ValueError("lr, eps and initial_accumulator_value must be non-negative")
        super().__init__(embedding_specs, include_last_offset, split_bf16)
        self.lr = float(lr)
        self.eps = float(eps)
        for i, w in enumerate(self.weights):
            self.register_buffer(f"state_sum_{i}", torch.full(w.shape, float(initial_accumulator_value),
                                                                  dtype=torch.float32))

    def state_sums(self) -> List[torch.Tensor]:
        return [getattr(self, f"state_sum_{i}") for i in range(len(self.weights))]

    def _apply_update(self, grads, indices, offsets, psw, include_last):
        with torch.no_grad():
            ops.merged_embedding_bag_adagrad_(grads, [w.data for w in self.weights], self.trails(),
                                              self.state_sums(), indices, offsets, self.pooling_mode,
                                              include_last, psw, self.lr, self.eps)


class MergedEmbeddingBagWithCat(MergedEmbeddingBag):
    """``forward(dense, indices, offsets)`` -> (B, (T+1)*D): the dense feature
    followed by every table's pooled embedding, written in place into one
    tensor (no torch.cat).  Differentiable in the dense input and the tables."""

    def forward(self, dense: torch.Tensor, indices: Lists, offsets: Lists,
                per_sample_weights: Optional[Lists] = None) -> torch.Tensor:
        if self.sparse:
            raise ValueError("MergedEmbeddingBagWithCat produces dense gradients; use sparse=False")
        indices, offsets, psw = self._lists(indices, offsets, per_sample_weights)
        weights = self._weight_list()
        if self.aten_lookup:
            lookups = self._aten_lookups(weights, indices, offsets, psw)
            if dense.dim() != 2 or dense.shape != (lookups[0].shape[0], self.embedding_dim) \
                    or dense.dtype != weights[0].dtype:
                raise ValueError(f"dense must be ({lookups[0].shape[0]}, {self.embedding_dim}) {weights[0].dtype}, "
                                 f"got {dense.dtype} of shape {tuple(dense.shape)}")
            return torch.cat([dense, *lookups], dim=1)
        return ops.merged_embedding_bag_cat_forward(dense, weights, indices, offsets, self.pooling_mode,
                                                    self.include_last_offset, psw)


class _TableSGDLookup(torch.autograd.Function):
    """One table: forward lookup; backward applies w -= lr * g to the touched
    rows of the split weight in place (no weight gradient is produced)."""

    @staticmethod
    def forward(ctx, module, weight, indices, offsets, psw):
        _no_psw_grad([psw] if psw is not None else [])
        ctx.module = module
        ctx.save_for_backward(indices, offsets, *([psw] if psw is not None else []))
        psw_list = [psw] if psw is not None else []
        return ops.merged_embedding_bag_forward([weight], [indices], [offsets], module.pooling_mode,
                                                module.include_last_offset, psw_list)[0]

    @staticmethod
    def backward(ctx, grad):
        saved = ctx.saved_tensors
        m = ctx.module
        grads, indices, offsets, psw, include_last = _update_lookups(
            m, [grad.to(m.weight.dtype).contiguous()], [saved[0]], [saved[1]], list(saved[2:]))
        with torch.no_grad():
            ops.merged_embedding_bag_sgd_(grads, [m.weight.data], m.trails(), indices, offsets, m.pooling_mode,
                                          include_last, psw, float(m.sgd_group["lr"]), 0.0)
        return None, None, None, None, None


class SGDEmbeddingBag(nn.Module):
    """An nn.EmbeddingBag trained by plain SGD inside backward.

    ``ipex_lite.optimize`` swaps it in for nn.EmbeddingBag tables whose
    optimizer group is plain SGD (no momentum, no weight decay): the update of
    the rows a batch touched equals the dense-gradient step (untouched rows
    have zero gradient), but no (rows x dim) gradient is written and read.
    The learning rate is read from the optimizer's param group at each step,
    so LR schedulers apply.  With a bf16 weight the fp32 master is split
    (trail buffer); ``state_dict()["weight"]`` is always the exact fp32 weight.
    """

    def __init__(self, emb: nn.EmbeddingBag, sgd_group: dict, split_bf16: bool):
        super().__init__()
        if emb.mode not in ("sum", "mean") or emb.max_norm is not None or emb.padding_idx is not None \
                or emb.scale_grad_by_freq or emb.sparse:
            raise ValueError("SGDEmbeddingBag supports sum/mean EmbeddingBag without max_norm, padding_idx, "
                             "scale_grad_by_freq or sparse")
        self.num_embeddings, self.embedding_dim = emb.num_embeddings, emb.embedding_dim
        self.mode, self.pooling_mode = emb.mode, _MODES[emb.mode]
        self.include_last_offset = emb.include_last_offset
        self.sgd_group = sgd_group
        self.split_bf16 = split_bf16
        # set by ipex_lite.distributed.wrap_ddp; the group is kept only when it is not the default
        # one (a module holding the default group would keep it alive past destroy_process_group)
        self.replicated, self.process_group = False, None
        w = emb.weight.detach()
        if split_bf16:
            top, trail = _split(w.float().contiguous())
            self.weight = nn.Parameter(top, requires_grad=True)
            self.register_buffer("trail", trail, persistent=False)
        else:
            self.weight = nn.Parameter(w.clone().contiguous(), requires_grad=True)
            self.register_buffer("trail", None, persistent=False)
        post = getattr(self, "register_state_dict_post_hook", None) or self._register_state_dict_hook
        post(SGDEmbeddingBag._join_hook)
        self.register_load_state_dict_pre_hook(SGDEmbeddingBag._split_hook)

    def trails(self):
        return [self.trail] if self.split_bf16 else []

    @staticmethod
    def _join_hook(module, state_dict, prefix, local_metadata):
        if module.split_bf16:
            state_dict[prefix + "weight"] = _join(module.weight.detach(), module.trail)

    @staticmethod
    def _split_hook(module, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs):
        w = state_dict.get(prefix + "weight")
        if module.split_bf16 and torch.is_tensor(w) and w.is_floating_point() and w.shape == module.weight.shape:
            top, trail = _split(w.float().contiguous())
            state_dict[prefix + "weight"] = top
            with torch.no_grad():
                module.trail.copy_(trail)

    def forward(self, input, offsets=None, per_sample_weights=None):
        if input.dim() == 2:
            if offsets is not None:
                raise ValueError("offsets must be None when input is 2-D")
            batch, bag = input.shape
            offsets = torch.arange(0, batch * bag, bag, dtype=input.dtype)
            input = input.reshape(-1)
        elif offsets is None:
            raise ValueError("offsets are required when input is 1-D")
        if torch.is_grad_enabled() and self.weight.requires_grad:
            return _TableSGDLookup.apply(self, self.weight, input, offsets, per_sample_weights)
        psw = [per_sample_weights] if per_sample_weights is not None else []
        return ops.merged_embedding_bag_forward([self.weight], [input], [offsets], self.pooling_mode,
                                                self.include_last_offset, psw)[0]

    def extra_repr(self):
        return f"{self.num_embeddings}, {self.embedding_dim}, mode={self.mode!r}, split_bf16={self.split_bf16}"
