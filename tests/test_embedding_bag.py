"""Merged embedding bags: parity with per-table nn.EmbeddingBag (forward,
dense and sparse gradients), fused SGD / Adagrad against torch.optim on sparse
gradients, split-BF16, the with-cat variant, opcheck, every ISA level, bad
inputs."""
import textwrap

import pytest
import torch
from torch import nn

from isa_levels import LEVELS, run_at_level
from ipex_lite.nn import (EmbeddingSpec, MergedEmbeddingBag, MergedEmbeddingBagWithAdaGrad,
                          MergedEmbeddingBagWithCat, MergedEmbeddingBagWithSGD)
from ipex_lite.nn.modules import split_table_batched

ops = torch.ops.ipex_lite
MODES = {"sum": 0, "mean": 1, "max": 2}


def make_batch(rows, batch, max_bag, seed, index_dtype=torch.int64, include_last=False, empty_bags=True):
    """Random bags per table (some empty), nn.EmbeddingBag offsets convention."""
    g = torch.Generator().manual_seed(seed)
    indices, offsets = [], []
    for r in rows:
        sizes = torch.randint(0 if empty_bags else 1, max_bag + 1, (batch,), generator=g)
        idx = torch.randint(0, r, (int(sizes.sum()),), generator=g)
        off = torch.cat([torch.zeros(1, dtype=torch.long), sizes.cumsum(0)])
        if not include_last:
            off = off[:-1]
        indices.append(idx.to(index_dtype))
        offsets.append(off.to(index_dtype))
    return indices, offsets


def make_tables(rows, dim, mode, dtype, include_last=False, sparse=False, seed=0):
    torch.manual_seed(seed)
    return [nn.EmbeddingBag(r, dim, mode=mode, include_last_offset=include_last, sparse=sparse).to(dtype)
            for r in rows]


TOL = {torch.float32: dict(rtol=1e-5, atol=1e-5), torch.bfloat16: dict(rtol=1e-2, atol=4e-2)}
ROWS = [7, 50, 1, 300]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("mode", ["sum", "mean", "max"])
@pytest.mark.parametrize("index_dtype", [torch.int32, torch.int64])
@pytest.mark.parametrize("include_last", [False, True])
@pytest.mark.parametrize("dim", [1, 16, 37, 128, 200])
def test_forward_backward_match_embeddingbag(dtype, mode, index_dtype, include_last, dim):
    tables = make_tables(ROWS, dim, mode, dtype, include_last)
    merged = MergedEmbeddingBag.from_embeddingbag_list(tables)
    # Reference in fp32 on the same (bf16-valued) weights and gradients: ipex_lite
    # accumulates in fp32 and rounds once, stock bf16 rounds at every addition.
    tables = [t.float() for t in tables]
    indices, offsets = make_batch(ROWS, 9, 5, seed=dim, index_dtype=index_dtype, include_last=include_last)
    out = merged(indices, offsets)
    ref = [t(i, o) for t, i, o in zip(tables, indices, offsets)]
    for a, b in zip(out, ref):
        assert a.dtype == dtype and a.shape == b.shape
        torch.testing.assert_close(a.float(), b, **TOL[dtype])
    grads = [torch.randn(r.shape).to(dtype) for r in ref]
    torch.autograd.backward(out, grads)
    torch.autograd.backward(ref, [g.float() for g in grads])
    for w, t in zip(merged.weights, tables):
        assert w.grad.dtype == dtype
        torch.testing.assert_close(w.grad.float(), t.weight.grad, **TOL[dtype])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("mode", ["sum", "mean", "max"])
@pytest.mark.parametrize("batch,dim", [(5, 40), (3000, 128)])  # small, and streamed (> 1 MB per thread)
def test_one_index_per_bag_is_bit_exact(dtype, mode, batch, dim):
    # bags of one index copy their row as stored; -0 becomes +0 for sum and mean (their
    # accumulators start at +0) and stays -0 for max, as torch's EmbeddingBag gives
    g = torch.Generator().manual_seed(dim)
    tables = [nn.EmbeddingBag(50, dim, mode=mode).to(dtype) for _ in range(3)]
    with torch.no_grad():
        for t in tables:
            t.weight.copy_(torch.randn(50, dim, generator=g))
            t.weight[0, :7] = -0.0
            t.weight[1, 3] = float("inf")
    merged = MergedEmbeddingBag.from_embeddingbag_list(tables)
    indices = [torch.randint(0, 50, (batch,), generator=g) for _ in tables]
    indices[0][:2] = torch.tensor([0, 1])
    offsets = [torch.arange(batch) for _ in tables]
    offsets[2] = torch.tensor([0, 0] + list(range(2, batch)))  # an empty bag and a bag of two among ones
    with torch.no_grad():
        got = merged(indices, offsets)
        for t, i, o, out in zip(tables, indices, offsets, got):
            want = t(i, o)
            single = (o.diff(append=torch.tensor([batch])) == 1).nonzero().flatten()
            assert torch.equal(out[single], want[single])
            assert torch.equal(torch.signbit(out[single]), torch.signbit(want[single]))
            torch.testing.assert_close(out.float(), want.float(), **TOL[dtype])  # the empty and two-row bags


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("dim,cat", [(64, False), (37, False), (24, True)])
def test_large_outputs_take_streaming_stores(dtype, dim, cat):
    # outputs past 1 MB per thread (here 1.2-12 MB on 2 threads) are written
    # with non-temporal stores (full, aligned vectors only): odd dims mix both
    # kinds within a row
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        _check_large_output(dtype, dim, cat)
    finally:
        torch.set_num_threads(threads)


def _check_large_output(dtype, dim, cat):
    rows = [64, 3000, 500, 1] * 3
    tables = make_tables(rows, dim, "sum", dtype)
    merged = (MergedEmbeddingBagWithCat if cat else MergedEmbeddingBag).from_embeddingbag_list(tables)
    indices, offsets = make_batch(rows, 4096, 3, seed=dim)
    want = [t.float()(i, o) for t, i, o in zip(tables, indices, offsets)]  # .float() converts in place
    if cat:
        dense = torch.randn(4096, dim).to(dtype)
        got = merged(dense, indices, offsets)
        torch.testing.assert_close(got.float(), torch.cat([dense.float()] + want, dim=1), **TOL[dtype])
    else:
        got = merged(indices, offsets)
        for a, b in zip(got, want):
            torch.testing.assert_close(a.float(), b, **TOL[dtype])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_per_sample_weights(dtype):
    tables = make_tables(ROWS, 24, "sum", dtype)
    merged = MergedEmbeddingBag.from_embeddingbag_list(tables)
    tables = [t.float() for t in tables]
    indices, offsets = make_batch(ROWS, 6, 4, seed=3)
    psw = [torch.rand(i.numel()).to(dtype) for i in indices]
    out = merged(indices, offsets, psw)
    ref = [t(i, o, per_sample_weights=p.float()) for t, i, o, p in zip(tables, indices, offsets, psw)]
    for a, b in zip(out, ref):
        torch.testing.assert_close(a.float(), b.float(), **TOL[dtype])
    grads = [torch.randn(r.shape).to(dtype) for r in ref]
    torch.autograd.backward(out, grads)
    torch.autograd.backward(ref, [g.float() for g in grads])
    for w, t in zip(merged.weights, tables):
        torch.testing.assert_close(w.grad.float(), t.weight.grad.float(), **TOL[dtype])


def test_each_table_is_its_own_output_and_unused_ones_get_zero_gradients():
    tables = make_tables(ROWS, 8, "sum", torch.float32)
    merged = MergedEmbeddingBag.from_embeddingbag_list(tables)
    indices, offsets = make_batch(ROWS, 5, 3, seed=4)
    out = merged(indices, offsets)
    assert len({o.untyped_storage().data_ptr() for o in out}) == len(ROWS)  # separate allocations
    out[1].sum().backward()  # the other tables' outputs take no part in the loss
    ref = tables[1](indices[1], offsets[1]).sum()
    ref.backward()
    torch.testing.assert_close(merged.weights[1].grad, tables[1].weight.grad)
    for t in (0, 2, 3):
        assert torch.count_nonzero(merged.weights[t].grad) == 0


@pytest.mark.parametrize("mode", ["sum", "mean"])
def test_sparse_gradients_match(mode):
    tables = make_tables(ROWS, 16, mode, torch.float32, sparse=True)
    merged = MergedEmbeddingBag.from_embeddingbag_list(tables)
    assert merged.sparse
    indices, offsets = make_batch(ROWS, 8, 6, seed=11)
    out = merged(indices, offsets)
    ref = [t(i, o) for t, i, o in zip(tables, indices, offsets)]
    grads = [torch.randn(r.shape) for r in ref]
    torch.autograd.backward(out, grads)
    torch.autograd.backward(ref, grads)
    for w, t in zip(merged.weights, tables):
        assert w.grad.is_sparse
        torch.testing.assert_close(w.grad.to_dense(), t.weight.grad.to_dense(), rtol=1e-5, atol=1e-5)


def test_duplicates_accumulate_and_results_are_deterministic():
    w = torch.randn(5, 8)
    idx = torch.tensor([1, 1, 1, 3, 1, 3, 0])
    off = torch.tensor([0, 3, 5])
    out = ops.merged_embedding_bag_forward([w], [idx], [off], 0, False, [])[0]
    assert out.shape == (3, 8)
    torch.testing.assert_close(out[0], 3 * w[1])
    grad = torch.randn(3, 8)
    g1 = ops.merged_embedding_bag_backward([grad], [w], [idx], [off], 0, False, [])[0]
    g2 = ops.merged_embedding_bag_backward([grad], [w], [idx], [off], 0, False, [])[0]
    assert torch.equal(g1, g2)
    # bags: [1, 1, 1], [3, 1], [3, 0]
    torch.testing.assert_close(g1[1], 3 * grad[0] + grad[1])
    torch.testing.assert_close(g1[3], grad[1] + grad[2])
    torch.testing.assert_close(g1[0], grad[2])
    assert torch.count_nonzero(g1[2]) == 0 and torch.count_nonzero(g1[4]) == 0


def _sgd_reference(tables, indices, offsets, grads_per_step, lr, weight_decay):
    """Per-table sparse=True EmbeddingBag + torch.optim.SGD (weight decay applied by
    hand to the touched rows, as the fused update does: torch's SGD rejects it
    for sparse gradients)."""
    opt = torch.optim.SGD([t.weight for t in tables], lr=lr)
    for step_grads in grads_per_step:
        opt.zero_grad()
        outs = [t(i, o) for t, i, o in zip(tables, indices, offsets)]
        torch.autograd.backward(outs, step_grads)
        if weight_decay:
            for t in tables:
                g = t.weight.grad.coalesce()
                rows = g.indices()[0]
                vals = g.values() + weight_decay * t.weight.detach()[rows]
                t.weight.grad = torch.sparse_coo_tensor(g.indices(), vals, g.shape)
        opt.step()


@pytest.mark.parametrize("mode", ["sum", "mean"])
@pytest.mark.parametrize("weight_decay", [0.0, 0.1])
def test_fused_sgd_matches_torch_optim(mode, weight_decay):
    tables = make_tables(ROWS, 32, mode, torch.float32, sparse=True)
    fused = MergedEmbeddingBagWithSGD.from_embeddingbag_list(tables, lr=0.05, weight_decay=weight_decay)
    indices, offsets = make_batch(ROWS, 10, 6, seed=5)
    steps = [[torch.randn(10, 32) for _ in ROWS] for _ in range(4)]
    for step_grads in steps:
        out = fused(indices, offsets)
        torch.autograd.backward(out, step_grads)
        assert all(w.grad is None for w in fused.weights)
    _sgd_reference(tables, indices, offsets, steps, 0.05, weight_decay)
    for w, t in zip(fused.weights, tables):
        torch.testing.assert_close(w.detach(), t.weight.detach(), rtol=1e-5, atol=1e-6)


def test_fused_adagrad_matches_torch_optim():
    tables = make_tables(ROWS, 32, "sum", torch.float32, sparse=True)
    fused = MergedEmbeddingBagWithAdaGrad.from_embeddingbag_list(tables, lr=0.1, eps=1e-8)
    opt = torch.optim.Adagrad([t.weight for t in tables], lr=0.1, eps=1e-8)
    indices, offsets = make_batch(ROWS, 10, 6, seed=6)
    for step in range(4):
        grads = [torch.randn(10, 32) for _ in ROWS]
        torch.autograd.backward(fused(indices, offsets), grads)
        opt.zero_grad()
        torch.autograd.backward([t(i, o) for t, i, o in zip(tables, indices, offsets)], grads)
        opt.step()
    for w, t in zip(fused.weights, tables):
        torch.testing.assert_close(w.detach(), t.weight.detach(), rtol=1e-5, atol=1e-6)
    for s, t in zip(fused.state_sums(), tables):
        torch.testing.assert_close(s, opt.state[t.weight]["sum"].to_dense() if opt.state[t.weight]["sum"].is_sparse
                                   else opt.state[t.weight]["sum"], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("optimizer", ["sgd", "adagrad"])
def test_split_bf16_tracks_fp32_master(optimizer):
    """bf16 tables with a trail update the full fp32 master weight: the joined
    weight follows fp32 training fed with the same (bf16) gradients."""
    rows = [40, 9]
    fp32_tables = make_tables(rows, 16, "sum", torch.float32)
    specs = [EmbeddingSpec(t.num_embeddings, 16, "sum", torch.bfloat16, t.weight) for t in fp32_tables]
    specs32 = [EmbeddingSpec(t.num_embeddings, 16, "sum", torch.float32, t.weight) for t in fp32_tables]
    if optimizer == "sgd":
        split = MergedEmbeddingBagWithSGD(specs, lr=1e-3)
        master = MergedEmbeddingBagWithSGD(specs32, lr=1e-3)
    else:
        split = MergedEmbeddingBagWithAdaGrad(specs, lr=1e-3)
        master = MergedEmbeddingBagWithAdaGrad(specs32, lr=1e-3)
    assert split.split_bf16
    for t in range(len(rows)):  # the split starts exactly at the fp32 weight
        assert torch.equal(split.fp32_weight(t), fp32_tables[t].weight.detach())
    indices, offsets = make_batch(rows, 7, 4, seed=8)
    for _ in range(5):
        grads = [torch.randn(7, 16).bfloat16() for _ in rows]
        split_out = split(indices, offsets)
        torch.autograd.backward(split_out, grads)
        torch.autograd.backward(master(indices, offsets), [g.float() for g in grads])
    for t in range(len(rows)):
        torch.testing.assert_close(split.fp32_weight(t), master.weights[t].detach(), rtol=1e-6, atol=1e-7)
        # plain bf16 storage would lose these 1e-3-sized updates; the split keeps them
        assert not torch.equal(split.fp32_weight(t), fp32_tables[t].weight.detach())


def test_split_state_dict_is_fp32_and_round_trips():
    tables = make_tables([20, 6], 8, "sum", torch.float32)
    merged = MergedEmbeddingBagWithSGD.from_embeddingbag_list(tables, dtype=torch.bfloat16, lr=0.1)
    sd = merged.state_dict()
    assert sd["weights.0"].dtype == torch.float32
    torch.testing.assert_close(sd["weights.0"], tables[0].weight.detach(), rtol=0, atol=0)
    indices, offsets = make_batch([20, 6], 4, 3, seed=2)
    torch.autograd.backward(merged(indices, offsets), [torch.randn(4, 8).bfloat16() for _ in range(2)])
    sd = merged.state_dict()
    other = MergedEmbeddingBagWithSGD.from_embeddingbag_list(make_tables([20, 6], 8, "sum", torch.float32, seed=9),
                                                             dtype=torch.bfloat16, lr=0.1)
    other.load_state_dict(sd)
    for t in range(2):
        assert torch.equal(other.fp32_weight(t), merged.fp32_weight(t))
    # and back into the original nn.EmbeddingBag modules
    for t, emb in enumerate(tables):
        emb.load_state_dict({"weight": sd[f"weights.{t}"]})
        assert torch.equal(emb.weight.detach(), merged.fp32_weight(t))


def test_plain_state_dict_round_trips_with_embeddingbag():
    tables = make_tables(ROWS, 12, "mean", torch.float32)
    merged = MergedEmbeddingBag.from_embeddingbag_list(tables)
    sd = merged.state_dict()
    assert sorted(sd) == [f"weights.{t}" for t in range(len(ROWS))]
    for t, emb in enumerate(tables):
        assert torch.equal(sd[f"weights.{t}"], emb.weight.detach())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_with_cat_forward_backward(dtype):
    tables = make_tables(ROWS, 16, "sum", dtype)
    cat = MergedEmbeddingBagWithCat.from_embeddingbag_list(tables)
    tables = [t.float() for t in tables]
    indices, offsets = make_batch(ROWS, 5, 4, seed=12)
    dense = torch.randn(5, 16).to(dtype).requires_grad_(True)
    out = cat(dense, indices, offsets)
    dense_ref = dense.detach().float().requires_grad_(True)
    ref = torch.cat([dense_ref] + [t(i, o) for t, i, o in zip(tables, indices, offsets)], dim=1)
    torch.testing.assert_close(out.float(), ref, **TOL[dtype])
    grad = torch.randn(out.shape).to(dtype)
    out.backward(grad)
    ref.backward(grad.float())
    torch.testing.assert_close(dense.grad.float(), dense_ref.grad)
    for w, t in zip(cat.weights, tables):
        torch.testing.assert_close(w.grad.float(), t.weight.grad.float(), **TOL[dtype])


def test_table_batched_layout_matches_lists():
    tables = make_tables(ROWS, 8, "sum", torch.float32, include_last=True)
    merged = MergedEmbeddingBag.from_embeddingbag_list(tables)
    indices, offsets = make_batch(ROWS, 6, 3, seed=13, include_last=True)
    values = torch.cat(indices)
    base = 0
    flat = []
    for i, o in zip(indices, offsets):
        flat.append(o[:-1] + base)
        base += i.numel()
    flat = torch.cat(flat + [torch.tensor([base])])
    assert flat.numel() == len(ROWS) * 6 + 1
    a = merged(values, flat)
    b = merged(indices, offsets)
    for x, y in zip(a, b):
        assert torch.equal(x, y)
    with pytest.raises(ValueError, match="T\\*B\\+1"):
        split_table_batched(values, flat[:-1], len(ROWS))


def _opcheck_inputs(dtype=torch.float32):
    rows = [6, 11]
    indices, offsets = make_batch(rows, 4, 3, seed=21)
    weights = [torch.randn(r, 8).to(dtype) for r in rows]
    return weights, indices, offsets


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_opcheck(dtype):
    weights, indices, offsets = _opcheck_inputs(dtype)
    grads = [torch.randn(4, 8).to(dtype) for _ in weights]
    wg = [w.clone().requires_grad_(dtype == torch.float32) for w in weights]
    torch.library.opcheck(ops.merged_embedding_bag_forward, (wg, indices, offsets, 0, False, []))
    torch.library.opcheck(ops.merged_embedding_bag_forward, (weights, indices, offsets, 2, False, []))
    dense = torch.randn(4, 8).to(dtype)
    torch.library.opcheck(ops.merged_embedding_bag_cat_forward, (dense, weights, indices, offsets, 1, False, []))
    torch.library.opcheck(ops.merged_embedding_bag_backward, (grads, weights, indices, offsets, 0, False, []))
    torch.library.opcheck(ops.merged_embedding_bag_backward_rows, (grads, weights, indices, offsets, 1, False, []),
                          test_utils=("test_schema", "test_faketensor"))
    trails = [torch.zeros_like(w) for w in weights] if dtype == torch.bfloat16 else []
    torch.library.opcheck(ops.merged_embedding_bag_sgd_,
                          (grads, [w.clone() for w in weights], trails, indices, offsets, 0, False, [], 0.1, 0.0))
    states = [torch.zeros(w.shape) for w in weights]
    torch.library.opcheck(ops.merged_embedding_bag_adagrad_,
                          (grads, [w.clone() for w in weights], trails, states, indices, offsets, 0, False, [], 0.1,
                           1e-8))


def test_torch_compile_forward():
    torch._dynamo.reset()
    tables = make_tables(ROWS, 8, "sum", torch.float32)
    merged = MergedEmbeddingBag.from_embeddingbag_list(tables)
    indices, offsets = make_batch(ROWS, 5, 3, seed=4)

    def f(idx, off):
        return torch.stack(merged(idx, off)).sum(0)

    compiled = torch.compile(f, fullgraph=True)
    torch.testing.assert_close(compiled(indices, offsets), f(indices, offsets))


def _lookup(**over):
    weights = [torch.randn(6, 8), torch.randn(11, 8)]
    indices = [torch.tensor([0, 1, 2, 3]), torch.tensor([0, 1, 2])]
    offsets = [torch.tensor([0, 1, 2, 3]), torch.tensor([0, 1, 2, 3])]
    args = dict(weights=weights, indices=indices, offsets=offsets, mode=0, include_last=False, psw=[])
    args.update(over)
    return args


def _call_forward(a):
    return ops.merged_embedding_bag_forward(a["weights"], a["indices"], a["offsets"], a["mode"], a["include_last"],
                                            a["psw"])


BAD_FORWARD = [
    (dict(indices=[torch.tensor([0, 1, 6, 2]), torch.tensor([0, 1, 2])]), "out of range"),
    (dict(indices=[torch.tensor([0, -1, 2, 2]), torch.tensor([0, 1, 2])]), "out of range"),
    (dict(offsets=[torch.tensor([1, 2, 3, 3]), torch.tensor([0, 1, 2, 3])]), "must be 0"),
    (dict(offsets=[torch.tensor([0, 2, 1, 3]), torch.tensor([0, 1, 2, 3])]), "non-decreasing"),
    (dict(offsets=[torch.tensor([0, 1, 2, 99]), torch.tensor([0, 1, 2, 3])]), "past the"),
    (dict(indices=[torch.tensor([0, 1, 2, 3], dtype=torch.int32), torch.tensor([0, 1, 2])]), "dtype"),
    (dict(indices=[torch.tensor([0.0, 1.0, 2.0, 3.0]), torch.tensor([0.0, 1.0, 2.0])]), "int32 or int64"),
    (dict(weights=[torch.randn(6, 8), torch.randn(11, 9)]), "dim"),
    (dict(weights=[torch.randn(6, 8), torch.randn(11, 8).double()]), "dtype"),
    (dict(weights=[torch.randn(6, 8)]), "one entry per table"),
    (dict(weights=[]), "at least one table"),
    (dict(mode=3), "pooling_mode"),
    (dict(mode=1, psw=[torch.ones(4), torch.ones(3)]), "only supported with sum"),
    (dict(psw=[torch.ones(2), torch.ones(3)]), "one weight per index"),
    (dict(offsets=[torch.tensor([0, 1]), torch.tensor([0, 1, 2])]), "bags"),
    (dict(weights=[torch.randn(6, 8), torch.randn(11, 8, device="meta")]), "device|meta|CPU"),
    (dict(indices=[torch.zeros(2, 2, dtype=torch.long), torch.tensor([0, 1, 2])]), "1-D"),
]


@pytest.mark.parametrize("over,message", BAD_FORWARD)
def test_bad_inputs_raise(over, message):
    a = _lookup(**over)
    with pytest.raises((RuntimeError, ValueError, NotImplementedError), match=message):
        _call_forward(a)


def test_bad_index_leaves_tables_untouched():
    weights, indices, offsets = _opcheck_inputs()
    bad = [indices[0], indices[1].clone()]
    bad[1][-1] = 11  # table 1 has 11 rows
    grads = [torch.randn(4, 8) for _ in weights]
    before = [w.clone() for w in weights]
    states = [torch.zeros(w.shape) for w in weights]
    with pytest.raises(RuntimeError, match="out of range"):
        ops.merged_embedding_bag_sgd_(grads, weights, [], bad, offsets, 0, False, [], 0.1, 0.0)
    with pytest.raises(RuntimeError, match="out of range"):
        ops.merged_embedding_bag_adagrad_(grads, weights, [], states, bad, offsets, 0, False, [], 0.1, 1e-8)
    with pytest.raises(RuntimeError, match="out of range"):
        ops.merged_embedding_bag_backward(grads, weights, bad, offsets, 0, False, [])
    for w, b in zip(weights, before):
        assert torch.equal(w, b)
    assert all(torch.count_nonzero(s) == 0 for s in states)


def test_bad_update_companions():
    weights, indices, offsets = _opcheck_inputs()
    grads = [torch.randn(4, 8) for _ in weights]
    with pytest.raises(RuntimeError, match="trails"):
        ops.merged_embedding_bag_sgd_(grads, weights, [torch.zeros(6, 8)], indices, offsets, 0, False, [], 0.1, 0.0)
    with pytest.raises(RuntimeError, match="grads\\[0\\] must have shape"):
        ops.merged_embedding_bag_sgd_([torch.randn(3, 8), grads[1]], weights, [], indices, offsets, 0, False, [],
                                      0.1, 0.0)
    with pytest.raises(RuntimeError, match="state_sums"):
        ops.merged_embedding_bag_adagrad_(grads, weights, [], [torch.zeros(6, 8)], indices, offsets, 0, False, [],
                                          0.1, 1e-8)
    with pytest.raises(RuntimeError, match="unit stride"):
        ops.merged_embedding_bag_sgd_(grads, [weights[0].t().contiguous().t(), weights[1]], [], indices, offsets, 0,
                                      False, [], 0.1, 0.0)


def test_module_argument_errors():
    with pytest.raises(ValueError, match="pooling"):
        MergedEmbeddingBag([EmbeddingSpec(5, 4, "median", torch.float32)])
    with pytest.raises(ValueError, match="share"):
        MergedEmbeddingBag([EmbeddingSpec(5, 4, "sum", torch.float32), EmbeddingSpec(5, 8, "sum", torch.float32)])
    merged = MergedEmbeddingBag([EmbeddingSpec(5, 4, "sum", torch.float32)])
    with pytest.raises(ValueError, match="expected 1"):
        merged([torch.tensor([0]), torch.tensor([1])], [torch.tensor([0]), torch.tensor([0])])


def test_empty_batch_and_empty_bags():
    w = torch.randn(4, 8)
    out = ops.merged_embedding_bag_forward([w], [torch.tensor([], dtype=torch.long)],
                                           [torch.tensor([], dtype=torch.long)], 0, False, [])
    assert out[0].shape == (0, 8)
    out = ops.merged_embedding_bag_forward([w], [torch.tensor([], dtype=torch.long)],
                                           [torch.tensor([0, 0, 0])], 1, False, [])
    assert torch.equal(out[0], torch.zeros(3, 8))


_LEVEL_SCRIPT = textwrap.dedent("""
    import json, torch, ipex_lite
    from torch import nn
    from ipex_lite.nn import MergedEmbeddingBag
    torch.manual_seed(0)
    errs = {}
    for dtype in (torch.float32, torch.bfloat16):
        for mode in ("sum", "mean", "max"):
            for dim in (5, 128, 150):
                tables = [nn.EmbeddingBag(r, dim, mode=mode).to(dtype) for r in (30, 7)]
                m = MergedEmbeddingBag.from_embeddingbag_list(tables)
                idx = [torch.randint(0, t.num_embeddings, (20,)) for t in tables]
                off = [torch.tensor([0, 3, 3, 10]) for _ in tables]
                out = m(idx, off)
                ref = [t(i, o) for t, i, o in zip(tables, idx, off)]
                g = [torch.randn(r.shape).to(dtype) for r in ref]
                torch.autograd.backward(out, g); torch.autograd.backward(ref, g)
                scale = max(r.abs().max().item() for r in ref) + 1
                errs[f"{dtype}-{mode}-{dim}"] = max(
                    max((a.float() - b.float()).abs().max().item() for a, b in zip(out, ref)),
                    max((w.grad.float() - t.weight.grad.float()).abs().max().item()
                        for w, t in zip(m.weights, tables))) / scale
    print(json.dumps({"level": ipex_lite.cpu_capability(), "errors": errs}))
""")


@pytest.mark.parametrize("level", LEVELS)
def test_every_isa_level(level):
    res = run_at_level(level, _LEVEL_SCRIPT)
    for key, err in res["errors"].items():
        assert err < (2e-2 if "bfloat16" in key else 1e-5), (key, err)


def test_per_sample_weight_gradients_are_refused():
    merged = MergedEmbeddingBag([EmbeddingSpec(5, 4, "sum", torch.float32)])
    psw = torch.rand(3, requires_grad=True)
    with pytest.raises(RuntimeError, match="per_sample_weights"):
        merged([torch.tensor([0, 1, 2])], [torch.tensor([0, 2])], [psw])


def test_indices_after_last_offset_are_ignored_everywhere():
    w = torch.ones(6, 4)
    idx = torch.tensor([0, 1, 2, 99, 5])  # 99 and 5 lie after the last bag
    off = torch.tensor([0, 1, 3])
    grads = [torch.ones(2, 4)]
    out = ops.merged_embedding_bag_forward([w], [idx], [off], 0, True, [])
    assert torch.equal(out[0], torch.tensor([[1.0] * 4, [2.0] * 4]))
    dense = ops.merged_embedding_bag_backward(grads, [w], [idx], [off], 0, True, [])[0]
    assert torch.equal(dense.sum(1), torch.tensor([4.0, 4.0, 4.0, 0.0, 0.0, 0.0]))
    rows, _ = ops.merged_embedding_bag_backward_rows(grads, [w], [idx], [off], 0, True, [])
    assert rows[0].tolist() == [0, 1, 2]
    ops.merged_embedding_bag_sgd_(grads, [w], [], [idx], [off], 0, True, [], 0.1, 0.5)
    assert torch.equal(w[5], torch.ones(4))  # not decayed: row 5 was never looked up


def test_in_place_tensors_must_not_overlap():
    weights = [torch.randn(6, 8), torch.randn(6, 8)]
    indices = [torch.tensor([0, 1]), torch.tensor([2, 3])]
    offsets = [torch.tensor([0, 1]), torch.tensor([0, 1])]
    grads = [torch.randn(2, 8), torch.randn(2, 8)]
    with pytest.raises(RuntimeError, match="share memory"):
        ops.merged_embedding_bag_sgd_(grads, [weights[0], weights[0]], [], indices, offsets, 0, False, [], 0.1, 0.0)
    expanded = torch.randn(1, 8).expand(6, 8)
    with pytest.raises(RuntimeError, match="overlapping"):
        ops.merged_embedding_bag_sgd_(grads, [expanded, weights[1]], [], indices, offsets, 0, False, [], 0.1, 0.0)


def test_split_load_of_bf16_state_resets_trail():
    specs = [EmbeddingSpec(5, 4, "sum", torch.bfloat16, torch.randn(5, 4))]
    m = MergedEmbeddingBagWithSGD(specs, lr=0.1)
    assert m.trails()[0].abs().sum() > 0
    m.load_state_dict({"weights.0": torch.zeros(5, 4, dtype=torch.bfloat16)})
    assert torch.equal(m.fp32_weight(0), torch.zeros(5, 4))


def test_flat_layout_with_per_sample_weights():
    merged = MergedEmbeddingBag([EmbeddingSpec(10, 4, "sum", torch.float32) for _ in range(2)],
                                include_last_offset=True)
    values = torch.tensor([1, 2, 3, 4, 5, 6])
    offsets = torch.tensor([0, 2, 3, 5, 6])  # T=2, B=2
    psw = torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0, 6.0])
    got = merged(values, offsets, psw)
    w0, w1 = merged.weights[0].detach(), merged.weights[1].detach()
    torch.testing.assert_close(got[0][0], w0[1] + 2 * w0[2])
    torch.testing.assert_close(got[1][0], 4 * w1[4] + 5 * w1[5])


def test_zero_dim_still_checks_indices():
    with pytest.raises(RuntimeError, match="out of range"):
        ops.merged_embedding_bag_forward([torch.empty(3, 0)], [torch.tensor([0, 7])], [torch.tensor([0])], 0, False,
                                         [])


def test_unsupported_module_options_are_refused():
    with pytest.raises(ValueError, match="max"):
        MergedEmbeddingBag([EmbeddingSpec(5, 4, "max", torch.float32, sparse=True)])
    with pytest.raises(ValueError, match="scale_grad_by_freq"):
        MergedEmbeddingBag.from_embeddingbag_list([nn.EmbeddingBag(5, 4, scale_grad_by_freq=True)])


def test_module_on_meta_device():
    with torch.device("meta"):
        m = MergedEmbeddingBag([EmbeddingSpec(1000, 16, "sum", torch.float32)])
    assert m.weights[0].device.type == "meta"


def test_concurrent_lookups_match_sequential():
    from concurrent.futures import ThreadPoolExecutor
    tables = make_tables(ROWS, 16, "sum", torch.float32)
    merged = MergedEmbeddingBag.from_embeddingbag_list(tables)
    batches = [make_batch(ROWS, 7, 4, seed=s) for s in range(6)]
    with torch.no_grad():
        want = [merged(i, o) for i, o in batches]
        with ThreadPoolExecutor(4) as pool:
            got = list(pool.map(lambda b: merged(*b), batches * 3))
    for k, g in enumerate(got):
        for a, b in zip(g, want[k % len(batches)]):
            assert torch.equal(a, b)


def test_advise_hugepages():
    assert ops.advise_hugepages(torch.empty(16)) is False  # smaller than one aligned 2 MiB page
    big = torch.empty(8 << 20, dtype=torch.uint8)
    assert isinstance(ops.advise_hugepages(big), bool)
    with torch.device("meta"):
        assert ops.advise_hugepages(torch.empty(8 << 20)) is False  # fake kernel
    torch.library.opcheck(ops.advise_hugepages, (torch.empty(16),))


# ---------------------------------------------------------------- float64 / float16 tables (IPEX accepts them)

WIDE_TOL = {torch.float64: dict(rtol=1e-12, atol=1e-12), torch.float16: dict(rtol=2e-3, atol=2e-3)}


@pytest.mark.parametrize("dtype", [torch.float64, torch.float16])
@pytest.mark.parametrize("mode,sparse", [("sum", False), ("mean", False), ("max", False), ("sum", True),
                                         ("mean", True)])  # sparse gradients: sum and mean only
@pytest.mark.parametrize("index_dtype", [torch.int32, torch.int64])
@pytest.mark.parametrize("include_last", [False, True])
def test_float64_float16_tables_match_embeddingbag(dtype, mode, sparse, index_dtype, include_last):
    tables = make_tables(ROWS, 12, mode, dtype, include_last, sparse=sparse)
    merged = MergedEmbeddingBag.from_embeddingbag_list(tables)
    assert all(w.dtype == dtype for w in merged.weights)
    indices, offsets = make_batch(ROWS, 9, 5, seed=3, index_dtype=index_dtype, include_last=include_last)
    out = merged(indices, offsets)
    ref = [t(i, o) for t, i, o in zip(tables, indices, offsets)]
    grads = [torch.randn(r.shape, dtype=dtype) for r in ref]
    for a, b in zip(out, ref):
        assert a.dtype == dtype
        torch.testing.assert_close(a, b, **WIDE_TOL[dtype])
    torch.autograd.backward(out, grads)
    torch.autograd.backward(ref, grads)
    for w, t in zip(merged.weights, tables):
        assert w.grad.dtype == dtype and w.grad.is_sparse == sparse
        torch.testing.assert_close(w.grad.to_dense(), t.weight.grad.to_dense(), **WIDE_TOL[dtype])


@pytest.mark.parametrize("dtype", [torch.float64, torch.float16])
def test_float64_float16_per_sample_weights_flat_layout_and_cat(dtype):
    tables = make_tables(ROWS, 8, "sum", dtype, include_last=True)
    merged = MergedEmbeddingBag.from_embeddingbag_list(tables)
    indices, offsets = make_batch(ROWS, 6, 4, seed=5, include_last=True)
    psw = [torch.rand(i.shape, dtype=dtype) for i in indices]
    for got, t, i, o, p in zip(merged(indices, offsets, psw), tables, indices, offsets, psw):
        torch.testing.assert_close(got, t(i, o, per_sample_weights=p), **WIDE_TOL[dtype])
    # torchrec's flat layout: values table-major, T*B+1 offsets
    values = torch.cat(indices)
    starts = torch.cumsum(torch.tensor([0] + [i.numel() for i in indices[:-1]]), 0)
    flat = torch.cat([o[:-1] + s for o, s in zip(offsets, starts)] + [torch.tensor([values.numel()])])
    for a, b in zip(merged(values, flat), merged(indices, offsets)):
        torch.testing.assert_close(a, b)
    cat = MergedEmbeddingBagWithCat.from_embeddingbag_list(tables)
    dense = torch.randn(6, 8, dtype=dtype, requires_grad=True)
    got = cat(dense, indices, offsets)
    torch.testing.assert_close(got, torch.cat([dense] + [t(i, o) for t, i, o in zip(tables, indices, offsets)], 1),
                               **WIDE_TOL[dtype])
    got.sum().backward()
    assert torch.equal(dense.grad, torch.ones_like(dense))


def test_float64_tables_bad_inputs_raise_clearly():
    tables = make_tables([5, 7], 4, "sum", torch.float64)
    merged = MergedEmbeddingBag.from_embeddingbag_list(tables)
    ok_i = [torch.tensor([0, 1, 2]), torch.tensor([3, 6])]
    ok_o = [torch.tensor([0, 2]), torch.tensor([0, 1])]
    cases = [
        (([torch.tensor([0, 1, 5]), ok_i[1]], ok_o), IndexError, r"indices\[0\]\[2\] = 5 is out of range for table 0 "
                                                                 r"with 5 rows"),
        (([ok_i[0], torch.tensor([3, -1])], ok_o), IndexError, r"indices\[1\]\[1\] = -1 is out of range"),
        ((ok_i, [torch.tensor([1, 2]), ok_o[1]]), ValueError, r"offsets\[0\]\[0\] must be 0, got 1"),
        ((ok_i, [torch.tensor([0, 2]), torch.tensor([0, 3])]), ValueError,
         r"offsets\[1\] ends at 3 but indices\[1\] has 2 entries"),
        (([torch.tensor([0, 1, 2, 3]), ok_i[1]], [torch.tensor([0, 3, 1]), torch.tensor([0, 1, 2])]), ValueError,
         r"offsets\[0\] must be non-decreasing"),
        ((ok_i, [ok_o[0], torch.tensor([0, 1, 2])]), ValueError, r"table 1 has 3 bags but table 0 has 2"),
        (([ok_i[0].int(), ok_i[1]], ok_o), ValueError, r"must both be int32 or both int64"),
        (([ok_i[0].float(), ok_i[1]], ok_o), ValueError, r"must both be int32 or both int64"),
        ((ok_i[:1], ok_o[:1]), ValueError, r"expected 2 indices and offsets tensors, got 1 and 1"),
    ]
    for (indices, offsets), exc, message in cases:
        with pytest.raises(exc, match=message):
            merged(indices, offsets)
    with pytest.raises(ValueError, match=r"per_sample_weights\[0\] must have one torch.float64 weight per index"):
        merged(ok_i, ok_o, [torch.rand(3), torch.rand(2, dtype=torch.float64)])
    # empty batch: zero bags in every table
    assert [o.shape for o in merged([torch.tensor([], dtype=torch.long)] * 2, [torch.tensor([], dtype=torch.long)] * 2)] \
        == [(0, 4), (0, 4)]


def test_fused_update_modules_refuse_float64_tables_with_a_reason():
    specs = [EmbeddingSpec(10, 4, "sum", torch.float64)]
    for cls in (MergedEmbeddingBagWithSGD, MergedEmbeddingBagWithAdaGrad):
        with pytest.raises(ValueError, match="fused update kernels take float32 or bfloat16 tables, got torch.float64"):
            cls(specs)
    with pytest.raises(ValueError, match="float32, bfloat16, float64 or float16, got torch.int32"):
        MergedEmbeddingBag([EmbeddingSpec(10, 4, "sum", torch.int32)])
