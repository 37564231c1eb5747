"""Data-parallel training of ipex_lite-optimized models with torch.distributed (gloo on CPU,
oneCCL where its bindings are installed).  Launch the workers with ``ipex-lite-run
--nproc-per-node N script.py`` (each rank pinned to its cores, env:// rendezvous variables set).  In each worker::

    torch.distributed.init_process_group("gloo")
    model, opt = ipex_lite.optimize(model, optimizer=opt, dtype=torch.bfloat16)
    model = ipex_lite.distributed.wrap_ddp(model, opt)          # fp32 all-reduce of bf16 gradients

What DDP alone gets wrong with split-BF16, and this module handles:

* DDP broadcasts the module's parameters from rank 0 (the bf16 top halves) but not the
  optimizer's trails, so ranks would hold different fp32 masters: ``wrap_ddp`` broadcasts them.
* bf16 gradients summed in bf16 over many ranks lose bits: the comm hook sums in fp32
  (``allreduce_dtype``), or in bf16 when asked and the backend supports it.
* Embedding tables updated inside backward (``SGDEmbeddingBag`` from ``optimize()``,
  ``MergedEmbeddingBagWithSGD`` / ``WithAdaGrad``) produce no gradient for DDP to reduce.
  ``wrap_ddp`` keeps them out of DDP, replicates them from rank 0 and has their backward
  all-gather every rank's lookups (indices, offsets and pooled gradients: bytes proportional
  to the batch, not to the tables) so that each replica applies the same touched-row update a
  single process would apply to the whole batch.
* ``fuse_update_step`` (every parameter updated inside backward) would use a rank's local
  gradient before the all-reduce: ``optimize()`` refuses it under a multi-rank group.
"""
from typing import List, Optional, Sequence

import torch
import torch.nn.functional as F
import torch.distributed as dist
from torch import nn

__all__ = ["allreduce_hook", "broadcast_master_weights", "gather_lookups", "wrap_ddp", "is_multi_rank",
           "ShardedEmbeddingBags"]


def is_multi_rank() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def allreduce_hook(state: torch.dtype, bucket):
    """DDP communication hook averaging each gradient bucket across ranks, summed in ``state``
    (the dtype: torch.float32 gives exact sums of bf16 gradients; torch.bfloat16 half the bytes
    on the wire, for backends that reduce bf16).  ``ddp.register_comm_hook(torch.float32, allreduce_hook)``."""
    world = dist.get_world_size()
    buf = bucket.buffer()
    wide = buf.to(state).div_(world)
    fut = dist.all_reduce(wide, async_op=True).get_future()
    if buf.is_sparse:  # a sparse embedding's own bucket: DDP takes the reduced tensor as the gradient
        return fut.then(lambda f: f.value()[0].to(buf.dtype))

    def done(f):
        buf.copy_(f.value()[0])
        return buf
    return fut.then(done)


@torch.no_grad()
def broadcast_master_weights(optimizer: torch.optim.Optimizer, src: int = 0, group=None) -> None:
    """Every rank takes rank ``src``'s low halves (trails) of split-BF16 parameters, or its fp32
    master copies under the master-copy fallback, so the fp32 masters agree bit for bit (DDP
    itself broadcasts only the module's bf16 weights)."""
    for g in optimizer.param_groups:
        for p in g["params"]:
            trail = optimizer.state.get(p, {}).get("trail")
            if trail is not None:
                dist.broadcast(trail.view(torch.uint8), src, group=group)  # raw bits; gloo has no int16
    for weight, master in getattr(optimizer, "_master_pairs", ()):  # fp32 master-copy fallback
        dist.broadcast(master.data, src, group=group)
        weight.copy_(master)


def _all_gather_bytes(flat: torch.Tensor, group) -> List[torch.Tensor]:
    """Every rank's 1-D uint8 tensor (any length), in rank order: two all-gathers (sizes, then
    the payloads padded to the longest)."""
    world = dist.get_world_size(group)
    size = torch.tensor([flat.numel()], dtype=torch.long)
    sizes = [torch.empty_like(size) for _ in range(world)]
    dist.all_gather(sizes, size, group=group)
    top = max(int(n) for n in sizes)
    send = torch.zeros(top, dtype=torch.uint8)
    send[:flat.numel()] = flat
    bufs = [torch.empty(top, dtype=torch.uint8) for _ in range(world)]
    dist.all_gather(bufs, send, group=group)
    return [b[:int(n)] for b, n in zip(bufs, sizes)]


def _as_bytes(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().reshape(-1).view(torch.uint8)  # raw bits: gloo does not carry bf16


@torch.no_grad()
def gather_lookups(grads: Sequence[torch.Tensor], indices: Sequence[torch.Tensor], offsets: Sequence[torch.Tensor],
                   per_sample_weights: Sequence[torch.Tensor], include_last_offset: bool, group=None):
    """One step's table lookups of every rank as one global batch (rank order): per table the
    concatenated indices (int64), offsets (no trailing entry) and pooled gradients divided by the
    world size (DDP's average), and per-sample weights when given.  One variable-size all-gather
    (two collectives) for all tables together; each rank's batch size may differ."""
    group = group or dist.group.WORLD
    world = dist.get_world_size(group)
    tables = len(grads)
    batch, dim = grads[0].shape
    dtype = grads[0].dtype
    ix_parts, off_parts, psw_parts = [], [], []
    for t in range(tables):
        ix, off = indices[t].reshape(-1).long(), offsets[t].reshape(-1).long()
        used = int(off[batch]) if include_last_offset else ix.numel()  # indices past the last bag are unused
        ix_parts.append(ix[:used])
        off_parts.append(off[:batch])
        if per_sample_weights:
            psw_parts.append(per_sample_weights[t].reshape(-1)[:used].to(dtype))
    lens = [p.numel() for p in ix_parts]
    meta = torch.cat([torch.tensor([batch, *lens], dtype=torch.long), *ix_parts, *off_parts])
    payload = torch.cat([_as_bytes(meta), *(_as_bytes(g) for g in grads), *(_as_bytes(w) for w in psw_parts)])
    elem = grads[0].element_size()
    out_ix, out_off, out_g, out_psw = ([[] for _ in range(tables)] for _ in range(4))
    base = [0] * tables  # indices of earlier ranks, per table: where this rank's offsets start
    for got in _all_gather_bytes(payload, group):
        b = int(got[:8].view(torch.long))
        r_lens = got[8:8 * (1 + tables)].view(torch.long).tolist()
        n_meta = 1 + tables + sum(r_lens) + tables * b
        r_meta = got[:8 * n_meta].view(torch.long)
        ixs = r_meta[1 + tables:1 + tables + sum(r_lens)].split(r_lens)
        offs = r_meta[1 + tables + sum(r_lens):].split(b)
        g_end = 8 * n_meta + tables * b * dim * elem
        gs = got[8 * n_meta:g_end].view(dtype).view(tables, b, dim)
        ws = got[g_end:].view(dtype).split(r_lens) if per_sample_weights else None
        for t in range(tables):
            out_ix[t].append(ixs[t])
            out_off[t].append(offs[t] + base[t])
            base[t] += r_lens[t]
            out_g[t].append(gs[t])
            if ws is not None:
                out_psw[t].append(ws[t])
    return ([torch.cat(p).div_(world) for p in out_g], [torch.cat(p) for p in out_ix],
            [torch.cat(p) for p in out_off], [torch.cat(p) for p in out_psw] if per_sample_weights else [])


def _broadcast_bits(t: torch.Tensor, group) -> None:
    dist.broadcast(t.view(torch.uint8), 0, group=group)  # raw bits: exact, and gloo has no bf16 / int16


def _sparse_allreduce(group):
    def hook(param: torch.Tensor) -> None:
        grad = param.grad.coalesce()
        dist.all_reduce(grad, group=group)  # gloo: an all-gather of every rank's touched rows, summed
        param.grad = grad.div_(dist.get_world_size(group))
    return hook


def _replicate_sparse_tables(model: nn.Module, group) -> List[str]:
    """MergedEmbeddingBag tables with sparse gradients, which DDP would treat as dense (it only
    knows nn.Embedding / nn.EmbeddingBag as sparse): kept out of DDP, broadcast from rank 0,
    and their (touched-row) gradients all-reduced as sparse tensors once accumulated."""
    from .nn.modules import MergedEmbeddingBag, _FusedUpdateBase
    skip = []
    for name, m in model.named_modules():
        if not isinstance(m, MergedEmbeddingBag) or isinstance(m, _FusedUpdateBase) or not m.sparse:
            continue
        prefix = name + "." if name else ""
        with torch.no_grad():
            for pname, p in m.named_parameters():
                _broadcast_bits(p.data, group)
                p.register_post_accumulate_grad_hook(_sparse_allreduce(group))
                skip.append(prefix + pname)
    return skip


def _replicate_fused_tables(model: nn.Module, group) -> List[str]:
    """Tables updated inside backward: rank 0's weights, trails and Adagrad sums everywhere,
    lookups exchanged in backward; returns their parameter and buffer names for DDP to skip."""
    from .nn.modules import SGDEmbeddingBag, _FusedUpdateBase
    skip = []
    for name, m in model.named_modules():
        if not isinstance(m, (SGDEmbeddingBag, _FusedUpdateBase)):
            continue
        m.replicated, m.process_group = True, group
        prefix = name + "." if name else ""
        with torch.no_grad():
            for pname, p in m.named_parameters():
                _broadcast_bits(p.data, group)
                skip.append(prefix + pname)
            for bname, buf in m.named_buffers():
                _broadcast_bits(buf, group)
                skip.append(prefix + bname)
    return skip


def wrap_ddp(model: nn.Module, optimizer: Optional[torch.optim.Optimizer] = None,
             allreduce_dtype: torch.dtype = torch.float32, **ddp_kwargs) -> nn.Module:
    """``DistributedDataParallel(model)`` with the gradient all-reduce in ``allreduce_dtype``; for
    a split-BF16 model the optimizer's trails broadcast from rank 0; tables updated inside backward
    replicated with their lookups exchanged (see the module docstring).  A model made only of such
    tables is returned as it is: DDP would have no gradient to reduce."""
    if not (dist.is_available() and dist.is_initialized()):
        raise RuntimeError("wrap_ddp: call torch.distributed.init_process_group first")
    if optimizer is not None and any(p._post_accumulate_grad_hooks for g in optimizer.param_groups
                                     for p in g["params"] if getattr(p, "_post_accumulate_grad_hooks", None)):
        raise ValueError("wrap_ddp: fuse_update_step=True updates before the all-reduce; optimize without it")
    if allreduce_dtype == torch.bfloat16 and dist.get_backend() == "gloo":
        raise ValueError("wrap_ddp: gloo does not reduce bfloat16; use allreduce_dtype=torch.float32")
    if allreduce_dtype not in (torch.float32, torch.bfloat16):
        raise ValueError(f"wrap_ddp: allreduce_dtype must be torch.float32 or torch.bfloat16, got {allreduce_dtype}")
    # None stands for the default group: holding that object in modules or hooks would keep it
    # alive after destroy_process_group, and its threads then abort the process at exit
    group = ddp_kwargs.get("process_group")
    skip = _replicate_fused_tables(model, group) + _replicate_sparse_tables(model, group)
    if optimizer is not None:
        broadcast_master_weights(optimizer, 0)
    if skip:
        if not any(p.requires_grad for n, p in model.named_parameters() if n not in skip):
            return model  # only fused tables: nothing is left for DDP to reduce
        nn.parallel.DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(model, skip)
    ddp = nn.parallel.DistributedDataParallel(model, **ddp_kwargs)
    ddp.register_comm_hook(allreduce_dtype, allreduce_hook)
    return ddp


class _ExchangePooled(torch.autograd.Function):
    """All-to-all of pooled embeddings: each rank holds its tables' (T_local, B, D) for the whole
    global batch and receives every table's (B / N) rows of its own samples; the backward sends
    the gradients back to the tables' owners the same way."""

    @staticmethod
    def forward(ctx, local, counts: List[int], rank: int):
        world = len(counts)
        t_loc, batch, dim = local.shape
        per = batch // world
        send = local.view(t_loc, world, per, dim).transpose(0, 1).contiguous()  # (N, T_loc, B/N, D)
        recv = local.new_empty(sum(counts) * per * dim)
        dist.all_to_all_single(recv, send.view(-1), [c * per * dim for c in counts],
                               [t_loc * per * dim] * world)
        ctx.counts, ctx.rank, ctx.shape = counts, rank, local.shape
        return recv.view(sum(counts), per, dim)  # owner-major: rank 0's tables, then rank 1's, ...

    @staticmethod
    def backward(ctx, grad):
        counts, (t_loc, batch, dim) = ctx.counts, ctx.shape
        world, per = len(counts), batch // len(counts)
        recv = grad.new_empty(world * t_loc * per * dim)
        dist.all_to_all_single(recv, grad.contiguous().view(-1), [t_loc * per * dim] * world,
                               [c * per * dim for c in counts])
        return recv.view(world, t_loc, per, dim).transpose(0, 1).reshape(t_loc, batch, dim), None, None


class ShardedEmbeddingBags(nn.Module):
    """Table-wise model parallelism (DLRM's layout): table t lives only on rank t % N.

    ``forward(indices, offsets)`` takes every table's indices and offsets for the *global* batch
    (B bags per table, B divisible by N), pools this rank's tables, and returns, for this rank's
    B / N samples (rank r owns samples r*B/N .. (r+1)*B/N - 1), one (B / N, D) tensor per table in
    table order.  Gradients flow back to the owners through the reverse exchange; the tables'
    own optimizer updates them (keep them out of DDP: they are not replicated).  Bytes per rank
    and step: 2 * T * B * D * 4 * (N - 1) / N^2 instead of all-reducing whole tables."""

    def __init__(self, tables: Sequence[nn.EmbeddingBag], rank: Optional[int] = None,
                 world_size: Optional[int] = None):
        super().__init__()
        self.rank = dist.get_rank() if rank is None else rank
        self.world = dist.get_world_size() if world_size is None else world_size
        dims = {t.embedding_dim for t in tables}
        if len(dims) != 1:
            raise ValueError(f"ShardedEmbeddingBags: tables must share one embedding_dim, got {sorted(dims)}")
        modes = {t.mode for t in tables}
        if modes - {"sum", "mean"}:
            raise ValueError("ShardedEmbeddingBags: sum or mean pooling only")
        self.num_tables, self.dim = len(tables), dims.pop()
        self.owned = [t for t in range(self.num_tables) if t % self.world == self.rank]
        self.tables = nn.ModuleList([tables[t] for t in self.owned])
        self.counts = [len(range(r, self.num_tables, self.world)) for r in range(self.world)]
        # position of table t in the owner-major exchange output
        order = [t for r in range(self.world) for t in range(r, self.num_tables, self.world)]
        self.slot = {t: i for i, t in enumerate(order)}

    def forward(self, indices: Sequence[torch.Tensor], offsets: Sequence[torch.Tensor]) -> List[torch.Tensor]:
        if len(indices) != self.num_tables or len(offsets) != self.num_tables:
            raise ValueError(f"ShardedEmbeddingBags: expected {self.num_tables} indices/offsets, got "
                             f"{len(indices)}/{len(offsets)}")
        batch = offsets[0].numel()
        if batch % self.world:
            raise ValueError(f"ShardedEmbeddingBags: the global batch ({batch}) must divide over {self.world} ranks")
        if self.tables:
            local = torch.stack([F.embedding_bag(indices[t], tab.weight, offsets[t], mode=tab.mode)
                                 for t, tab in zip(self.owned, self.tables)])
        else:
            local = torch.zeros(0, batch, self.dim, requires_grad=torch.is_grad_enabled())
        pooled = _ExchangePooled.apply(local, self.counts, self.rank)
        return [pooled[self.slot[t]] for t in range(self.num_tables)]
