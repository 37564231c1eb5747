"""Property-based fuzzing of the public ops (hypothesis): random shapes
(zero-size included), dtypes, strides and deliberately bad values.  Every
call either matches the stock reference or raises RuntimeError / ValueError /
TypeError naming the problem — never a crash, hang or silent garbage.

Bounded for CI (IPEX_LITE_FUZZ_EXAMPLES, default 25 per property); run a
longer profile by hand with e.g. ``IPEX_LITE_FUZZ_EXAMPLES=2000 pytest tests/test_fuzz.py``.
"""
import os

import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import ipex_lite  # noqa: F401
from ipex_lite.nn.functional import interaction, roi_align

ops = torch.ops.ipex_lite
EXAMPLES = int(os.environ.get("IPEX_LITE_FUZZ_EXAMPLES", "25"))
FUZZ = settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
CLEAR = (RuntimeError, ValueError, TypeError, IndexError)


def _tensor(draw, shape, dtype=torch.float32, special=False):
    seed = draw(st.integers(0, 2**31 - 1))
    t = torch.randn(shape, generator=torch.Generator().manual_seed(seed)).to(dtype)
    if special and t.numel() and draw(st.booleans()):
        t.view(-1)[draw(st.integers(0, t.numel() - 1))] = draw(st.sampled_from([float("nan"), float("inf")]))
    if draw(st.booleans()) and t.dim() == 2 and t.shape[0] > 1:  # a non-contiguous view of the same values
        t = t.t().contiguous().t()
    return t


@FUZZ
@given(st.data())
def test_interaction(data):
    n = data.draw(st.integers(1, 6))
    batch = data.draw(st.integers(0, 9))
    dim = data.draw(st.integers(1, 40))
    dtype = data.draw(st.sampled_from([torch.float32, torch.bfloat16, torch.float64]))
    xs = [_tensor(data.draw, (batch, dim), dtype, special=True) for _ in range(n)]
    if data.draw(st.booleans()):  # a deliberately mismatched input
        i = data.draw(st.integers(0, n - 1))
        xs[i] = data.draw(st.sampled_from([xs[i][:, :max(dim - 1, 0)], xs[i].int(), xs[i].unsqueeze(0)]))
    try:
        got = interaction(*xs)
    except CLEAR:
        assert any(x.shape != xs[0].shape or x.dtype != xs[0].dtype or x.dim() != 2 or not x.is_floating_point()
                   for x in xs)
        return
    z = torch.bmm(torch.stack(xs, 1).double(), torch.stack(xs, 1).double().transpose(1, 2))
    li, lj = torch.tril_indices(n, n, -1)
    want = torch.cat([xs[0].double(), z[:, li, lj]], 1)
    tol = 5e-2 if dtype == torch.bfloat16 else 1e-4
    torch.testing.assert_close(got.double(), want, rtol=tol, atol=tol * (1 + dim), equal_nan=True)


@FUZZ
@given(st.data())
def test_merged_embedding_bag(data):
    tables = data.draw(st.integers(1, 3))
    batch = data.draw(st.integers(0, 6))
    weights, indices, offsets = [], [], []
    bad = data.draw(st.sampled_from(["none", "index", "offsets", "dtype", "count", "dim"]))
    include_last = data.draw(st.booleans())
    dim = data.draw(st.integers(1, 20))  # one (T, B, D) output: every table has the same width
    for t in range(tables):
        rows = data.draw(st.integers(1, 30))
        weights.append(_tensor(data.draw, (rows, dim + (1 if t == 0 and bad == "dim" else 0))))
        lengths = [data.draw(st.integers(0, 4)) for _ in range(batch)]
        idx = torch.tensor([data.draw(st.integers(0, rows - 1)) for _ in range(sum(lengths))], dtype=torch.int64)
        off = torch.tensor([0] + lengths, dtype=torch.int64).cumsum(0)
        off = off if include_last else off[:-1]
        if t == 0 and bad == "index" and idx.numel():
            idx[data.draw(st.integers(0, idx.numel() - 1))] = data.draw(st.sampled_from([-1, rows, 10**12]))
        if t == 0 and bad == "offsets" and off.numel() > 1:
            off = off.flip(0) if data.draw(st.booleans()) else off + 1
        if t == 0 and bad == "dtype":
            idx = idx.float()
        indices.append(idx)
        offsets.append(off)
    if bad == "count":
        offsets = offsets[:-1] or [torch.zeros(1, dtype=torch.int64)]
    mode = data.draw(st.sampled_from([0, 1]))  # sum, mean
    try:
        got = ops.merged_embedding_bag_forward(weights, indices, offsets, mode, include_last, [])
    except CLEAR:
        assert bad != "none" and not (bad == "dim" and tables == 1)
        return
    for t, w in enumerate(weights):
        want = F.embedding_bag(indices[t], w, offsets[t], mode=("sum", "mean")[mode],
                               include_last_offset=include_last)
        torch.testing.assert_close(got[t][:, :w.shape[1]], want, rtol=1e-5, atol=1e-5)


@FUZZ
@given(st.data())
def test_embedding_bag_backward_override(data):
    """aten::_embedding_bag_backward with ipex_lite's override: ATen's result on good input
    (NaN/Inf in the gradient included), a clear error on bad indices or offsets."""
    rows, dim, batch = data.draw(st.integers(1, 30)), data.draw(st.integers(1, 20)), data.draw(st.integers(0, 6))
    lengths = [data.draw(st.integers(0, 4)) for _ in range(batch)]
    idx = torch.tensor([data.draw(st.integers(0, rows - 1)) for _ in range(sum(lengths))], dtype=torch.int64)
    off = torch.tensor([0] + lengths, dtype=torch.int64).cumsum(0)[:-1]
    bad = data.draw(st.sampled_from(["none", "none", "index", "offsets"]))
    if bad == "index" and idx.numel():
        idx[data.draw(st.integers(0, idx.numel() - 1))] = data.draw(st.sampled_from([-1, rows, 10**12]))
    elif bad == "offsets" and off.numel() > 1 and off[-1] > 0:
        off = off.flip(0)
    else:
        bad = "none"
    dtype = data.draw(st.sampled_from([torch.float32, torch.bfloat16]))
    grad = _tensor(data.draw, (batch, dim), dtype, special=True)
    mode = data.draw(st.sampled_from([0, 1]))
    empty = torch.empty(0, dtype=torch.long)
    helpers = (empty, empty, empty)
    if bad == "none":  # ATen's kernel needs the forward's bag sizes (it segfaults on empty ones with empty bags)
        table = torch.zeros(rows, dim, dtype=dtype, requires_grad=True)
        helpers = torch.ops.aten._embedding_bag(table, idx, off, False, mode, False, None, False)[1:]
    args = (grad, idx, off, *helpers, rows, False, mode, False, None)
    with ipex_lite.aten_overrides(["_embedding_bag_backward"]):
        try:
            got = torch.ops.aten._embedding_bag_backward(*args)
        except CLEAR as e:
            assert bad != "none", e
            assert "indices" in str(e) or "offsets" in str(e), e
            return
    assert bad == "none"
    want = torch.ops.aten._embedding_bag_backward(*args)
    # bf16: ATen sums up to 4 bf16 terms in bf16, ours in fp32 (a few bf16 ulps of |terms| <= ~4 apart)
    rtol, atol = (2e-2, 6e-2) if dtype == torch.bfloat16 else (1e-5, 1e-5)
    torch.testing.assert_close(got.float(), want.float(), rtol=rtol, atol=atol, equal_nan=True)


@FUZZ
@given(st.data())
def test_optimizer_steps(data):
    shape = tuple(data.draw(st.lists(st.integers(0, 7), min_size=1, max_size=3)))
    p = _tensor(data.draw, shape)
    grad_shape = shape if data.draw(st.integers(0, 4)) else tuple(s + 1 for s in shape)
    g = _tensor(data.draw, grad_shape, special=True)
    split = data.draw(st.booleans())
    top, trail = ops.split_float_bfloat16(p.contiguous())
    buf = torch.zeros(data.draw(st.sampled_from([shape, (max(1, p.numel()) + 1,)])))
    try:
        if split:
            ops.sgd_step_(top, g, buf, trail, 0.1, 0.9, 0.0, False, 0.0, True)
        else:
            ref = p.clone()
            q = p.contiguous().clone()
            ops.sgd_step_(q, g, buf, torch.empty(0, dtype=torch.bfloat16), 0.1, 0.9, 0.0, False, 0.0, True)
            torch.testing.assert_close(q, ref - 0.1 * g, equal_nan=True)
    except CLEAR:
        assert grad_shape != shape or buf.shape != torch.Size(shape)


@FUZZ
@given(st.data())
def test_quantize_roundtrip(data):
    shape = tuple(data.draw(st.lists(st.integers(0, 9), min_size=1, max_size=4)))
    x = _tensor(data.draw, shape, special=True) * data.draw(st.floats(0.01, 100))
    scale = data.draw(st.sampled_from([1e-3, 0.05, 1.0, 0.0, -1.0, float("nan")]))
    dtype = data.draw(st.sampled_from([torch.uint8, torch.int8]))
    lo, hi = (0, 255) if dtype == torch.uint8 else (-128, 127)
    zp = data.draw(st.integers(-300, 300))
    try:
        q = ops.quantize_per_tensor(x, scale, zp, dtype)
    except CLEAR:
        assert not (scale > 0) or not lo <= zp <= hi
        return
    finite = torch.isfinite(x)
    want = torch.clamp(torch.round(x * (1.0 / scale)) + zp, lo, hi)
    assert torch.equal(q.float()[finite], want[finite])
    back = ops.dequantize_per_tensor(q, scale, zp)
    assert torch.equal(back, (q.float() - zp) * scale)


@FUZZ
@given(st.data())
def test_roi_align(data):
    n, c = data.draw(st.integers(1, 2)), data.draw(st.integers(0, 4))
    h, w = data.draw(st.integers(1, 9)), data.draw(st.integers(1, 9))
    x = _tensor(data.draw, (n, c, h, w))
    k = data.draw(st.integers(0, 4))
    coords = torch.tensor([[data.draw(st.floats(-5, 15)) for _ in range(4)] for _ in range(k)]).view(k, 4)
    idx = torch.tensor([[float(data.draw(st.integers(-1, n)))] for _ in range(k)]).view(k, 1)
    rois = torch.cat([idx, coords], 1)
    out = (data.draw(st.integers(0, 3)), data.draw(st.integers(1, 3)))
    try:
        got = roi_align(x, rois, out, 1.0, data.draw(st.integers(-1, 3)), data.draw(st.booleans()))
    except CLEAR:
        assert out[0] == 0 or (k and ((idx < 0).any() or (idx >= n).any()))
        return
    assert got.shape == (k, c, *out) and torch.isfinite(got).all()


@FUZZ
@given(st.data())
def test_frozen_batch_norm(data):
    shape = (data.draw(st.integers(0, 3)), data.draw(st.integers(1, 5)), data.draw(st.integers(1, 4)),
             data.draw(st.integers(1, 4)))
    x = _tensor(data.draw, shape, data.draw(st.sampled_from([torch.float32, torch.bfloat16])))
    if data.draw(st.booleans()):
        x = x.contiguous(memory_format=torch.channels_last)
    c = shape[1] + data.draw(st.sampled_from([0, 0, 1]))
    w, b, m, v = torch.rand(c) + 0.5, torch.randn(c), torch.randn(c), torch.rand(c) + 0.1
    try:
        got = ops.frozen_batch_norm(x, w, b, m, v, 1e-5)
    except CLEAR:
        assert c != shape[1]
        return
    want = (x.float() - m.view(1, -1, 1, 1)) / torch.sqrt(v.view(1, -1, 1, 1) + 1e-5) * w.view(1, -1, 1, 1) \
        + b.view(1, -1, 1, 1)
    tol = 3e-2 if x.dtype == torch.bfloat16 else 1e-5
    torch.testing.assert_close(got.float(), want, rtol=tol, atol=tol)


@FUZZ
@given(st.data())
def test_linear_small_m(data):
    m, k, n = data.draw(st.integers(0, 10)), data.draw(st.integers(0, 70)), data.draw(st.integers(1, 40))
    x = _tensor(data.draw, (m, k), torch.bfloat16, special=True)
    w = _tensor(data.draw, (n, k), torch.bfloat16)
    bad = data.draw(st.sampled_from([None, "k", "wdtype", "bias"]))
    bias = None
    if bad == "k":
        x = _tensor(data.draw, (m, k + 1), torch.bfloat16)
    elif bad == "wdtype":
        w = w.float()
    elif bad == "bias":
        bias = torch.zeros(n + 1, dtype=torch.bfloat16)
    try:
        got = ops.linear_small_m(x, w, bias)
    except CLEAR:
        assert bad is not None
        return
    assert bad is None
    want = F.linear(x.double(), w.double())
    torch.testing.assert_close(got.double(), want, rtol=2e-2, atol=2e-2 * (1 + k), equal_nan=True)


@FUZZ
@given(st.data())
def test_decode_ops(data):
    b, hk, g = data.draw(st.integers(0, 3)), data.draw(st.integers(1, 3)), data.draw(st.integers(1, 3))
    lq, lk, d = data.draw(st.integers(1, 5)), data.draw(st.integers(0, 40)), data.draw(st.integers(1, 24))
    dtype = data.draw(st.sampled_from([torch.float32, torch.bfloat16, torch.float64]))
    q = _tensor(data.draw, (b, hk * g, lq, d), dtype)
    k = _tensor(data.draw, (b, hk, lk, d), dtype)
    v = _tensor(data.draw, (b, hk, lk, d), dtype)
    mask = None
    if data.draw(st.booleans()):
        mask = torch.rand(b, 1, lq, data.draw(st.sampled_from([lk, lk + 1]))) > 0.3
    causal = mask is None and data.draw(st.booleans())
    try:
        got = ops.decode_attention(q, k, v, mask, causal, None)
    except CLEAR:
        assert dtype == torch.float64 or (mask is not None and mask.shape[-1] != lk) or (causal and lq > lk)
        return
    assert dtype != torch.float64 and not (causal and lq > lk)
    if lk == 0 or b == 0:
        assert got.abs().sum() == 0
        return
    kk, vv = k.double().repeat_interleave(g, 1), v.double().repeat_interleave(g, 1)
    s = q.double() @ kk.transpose(-1, -2) / d ** 0.5
    if mask is not None:
        s = s.masked_fill(~mask, float("-inf"))
    if causal:
        s = s.masked_fill(~torch.ones(lq, lk, dtype=torch.bool).tril(lk - lq), float("-inf"))
    p = torch.softmax(s, -1).nan_to_num(0.0)  # a row with no key: zeros
    torch.testing.assert_close(got.double(), p @ vv, rtol=3e-2, atol=3e-2)
    # the other decode ops on the same shapes
    w = _tensor(data.draw, (d,), dtype).abs() + 0.5
    x = q.reshape(-1, d)
    h = x.double() * torch.rsqrt(x.double().pow(2).mean(-1, keepdim=True) + 1e-6)
    want = (h.to(dtype) * w).double()
    torch.testing.assert_close(ops.rms_norm(x, w, 1e-6).double(), want, rtol=3e-2, atol=3e-2)
    torch.testing.assert_close(ops.silu_mul(x, x).double(), F.silu(x.double()) * x.double(), rtol=3e-2, atol=3e-2)


@pytest.mark.parametrize("dtype", ["fp32", "bf16", "int8"])
def test_optimized_models_are_thread_safe(dtype):
    """Several Python threads call the same optimized / int8 model at once: each result equals
    the sequential one (packed-weight caches are built once under a lock and then only read)."""
    import threading
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 16, 3, padding=1), torch.nn.BatchNorm2d(16), torch.nn.ReLU(),
                                torch.nn.Flatten(), torch.nn.Linear(16 * 64, 10)).eval()
    xs = [torch.randn(2, 3, 8, 8) for _ in range(6)]
    if dtype == "int8":
        prepared = ipex_lite.quantization.prepare(model, example_inputs=xs[0])
        with torch.no_grad():
            for x in xs:
                prepared(x)
        opt = ipex_lite.quantization.convert(prepared)
    else:
        opt = ipex_lite.optimize(model, dtype=torch.bfloat16 if dtype == "bf16" else None)
    fresh = [None] * len(xs)
    with torch.no_grad():
        want = [opt(x) for x in xs]
    opt = __import__("copy").deepcopy(opt)  # empty caches: the threads race to build them

    def run(i):
        with torch.no_grad():
            for _ in range(3):
                fresh[i] = opt(xs[i])
    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(xs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for got, ref in zip(fresh, want):
        assert torch.equal(got, ref)
