"""ipex_lite::scaled_dot_product_attention: the inference attention kernel and
its Python face, against torch's math implementation."""
import textwrap

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import ipex_lite
from ipex_lite.nn.functional import scaled_dot_product_attention as sdpa
from tests.isa_levels import LEVELS, run_at_level

op = torch.ops.ipex_lite.scaled_dot_product_attention


def reference(q, k, v, mask=None, causal=False, scale=None):
    """softmax(q k^T * scale + mask) v in float64."""
    q, k, v = q.double(), k.double(), v.double()
    s = q @ k.transpose(-1, -2) * (scale if scale is not None else q.shape[-1] ** -0.5)
    if causal:
        s = s.masked_fill(~torch.ones(q.shape[2], k.shape[2], dtype=torch.bool).tril(), float("-inf"))
    if mask is not None:
        s = s.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else s + mask.double()
    return torch.softmax(s, -1) @ v


def heads_of(b, h, length, e, dtype=torch.float32, gen=None):
    """(B, H, L, E) views of a (B, L, H, E) tensor, as attention after a projection sees them."""
    return torch.randn(b, length, h, e, generator=gen).to(dtype).transpose(1, 2)


def check(out, ref, dtype):
    tol = 2e-2 if dtype == torch.bfloat16 else 1e-5
    assert out.dtype == dtype
    assert out.shape == ref.shape
    torch.testing.assert_close(out.double(), ref, atol=tol, rtol=tol)


SHAPES = [(2, 3, 17, 17, 40, 40), (1, 2, 70, 130, 64, 64), (2, 2, 5, 9, 24, 72), (1, 1, 1, 1, 16, 16),
          (3, 4, 64, 64, 64, 64), (1, 2, 129, 33, 80, 8)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("b,h,lq,lk,e,ev", SHAPES)
def test_matches_reference(b, h, lq, lk, e, ev, dtype):
    g = torch.Generator().manual_seed(lq * 7 + lk)
    q, k, v = heads_of(b, h, lq, e, dtype, g), heads_of(b, h, lk, e, dtype, g), heads_of(b, h, lk, ev, dtype, g)
    check(op(q, k, v, None, False, None), reference(q, k, v), dtype)
    check(op(q.contiguous(), k.contiguous(), v.contiguous(), None, False, 0.3), reference(q, k, v, scale=0.3), dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("lq,lk", [(9, 9), (70, 70), (5, 9), (3, 1)])
def test_causal(lq, lk, dtype):
    g = torch.Generator().manual_seed(lq + lk)
    q, k, v = heads_of(2, 3, lq, 32, dtype, g), heads_of(2, 3, lk, 32, dtype, g), heads_of(2, 3, lk, 32, dtype, g)
    out = op(q, k, v, None, True, None)
    check(out, reference(q, k, v, causal=True), dtype)
    torch.testing.assert_close(out, F.scaled_dot_product_attention(q, k, v, is_causal=True),
                               atol=2e-2 if dtype == torch.bfloat16 else 1e-5, rtol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_masks(dtype):
    b, h, lq, lk = 2, 3, 20, 37
    g = torch.Generator().manual_seed(5)
    q, k, v = heads_of(b, h, lq, 32, dtype, g), heads_of(b, h, lk, 32, dtype, g), heads_of(b, h, lk, 48, dtype, g)
    padding = torch.ones(b, 1, 1, lk, dtype=torch.bool)
    padding[0, ..., 30:] = False  # BERT-style padding mask
    additive = torch.randn(lq, lk, generator=g).to(dtype)  # broadcast over batch and heads
    full = torch.randn(b, h, lq, lk, generator=g)
    transposed = torch.randn(lk, lq, generator=g).t()  # unit stride along queries, not keys
    per_head = torch.rand(1, h, 1, lk, generator=g) > 0.3
    per_head[..., 0] = True  # every row keeps a key
    for mask in (padding, additive, full, transposed, per_head):
        out = op(q, k, v, mask, False, None)
        check(out, reference(q, k, v, mask), dtype)
        torch.testing.assert_close(out, F.scaled_dot_product_attention(q, k, v, attn_mask=mask.to(q.dtype)
                                                                       if mask.is_floating_point() else mask),
                                   atol=2e-2 if dtype == torch.bfloat16 else 1e-5, rtol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fully_masked_rows_are_zero_like_torch(dtype):
    # left-padded prompts: the padding query rows see no key.  NaN there would reach the next layer's
    # keys and, through NaN + (-inf), every valid row (found by the LLM left-padding test).
    q, k, v = heads_of(2, 2, 6, 16, dtype), heads_of(2, 2, 6, 16, dtype), heads_of(2, 2, 6, 16, dtype)
    mask = torch.ones(2, 1, 6, 6, dtype=torch.bool).tril()
    mask[1, :, :3] = False
    out = op(q, k, v, mask, False, None)
    assert torch.equal(out[1, :, :3], torch.zeros_like(out[1, :, :3]))
    torch.testing.assert_close(out, F.scaled_dot_product_attention(q, k, v, attn_mask=mask),
                               atol=2e-2 if dtype == torch.bfloat16 else 1e-5, rtol=0)


def test_output_layout_and_empty_cases():
    q, k, v = heads_of(2, 3, 5, 8), heads_of(2, 3, 7, 8), heads_of(2, 3, 7, 4)
    out = op(q, k, v, None, False, None)
    assert out.shape == (2, 3, 5, 4) and out.transpose(1, 2).is_contiguous()  # (B, L, H, E) storage
    assert op(q[:, :, :0], k, v, None, False, None).shape == (2, 3, 0, 4)
    assert op(q[:0], k[:0], v[:0], None, False, None).shape == (0, 3, 5, 4)
    no_keys = op(q, k[:, :, :0], v[:, :, :0], None, False, None)
    assert no_keys.shape == (2, 3, 5, 4) and bool((no_keys == 0).all())


def test_strided_last_dimension():
    q = torch.randn(2, 3, 6, 32)[..., ::2]
    k, v = torch.randn(2, 3, 9, 16), torch.randn(2, 3, 9, 16)
    check(op(q, k, v, None, False, None), reference(q, k, v), torch.float32)


def test_large_scores_stay_finite():
    q, k, v = heads_of(1, 2, 8, 16) * 60, heads_of(1, 2, 8, 16) * 60, heads_of(1, 2, 8, 16)
    out = op(q, k, v, None, False, None)
    assert torch.isfinite(out).all()
    check(out, reference(q, k, v), torch.float32)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_opcheck(dtype):
    q, k, v = heads_of(2, 3, 10, 16, dtype), heads_of(2, 3, 12, 16, dtype), heads_of(2, 3, 12, 8, dtype)
    torch.library.opcheck(op, (q, k, v, None, False, None))
    torch.library.opcheck(op, (q, k, v, torch.rand(2, 1, 10, 12) > 0.2, False, 0.5))
    torch.library.opcheck(op, (q, k, v, None, True, None))


def test_autocast_runs_in_bf16():
    q, k, v = heads_of(1, 2, 6, 16), heads_of(1, 2, 6, 16), heads_of(1, 2, 6, 16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = op(q, k, v, None, False, None)
    assert out.dtype == torch.bfloat16
    check(out, reference(q.bfloat16(), k.bfloat16(), v.bfloat16()), torch.bfloat16)


def _qkv():
    return heads_of(2, 2, 4, 8), heads_of(2, 2, 6, 8), heads_of(2, 2, 6, 8)


@pytest.mark.parametrize("args,message", [
    (lambda q, k, v: (q[0], k, v, None, False, None), "query must be 4-D"),
    (lambda q, k, v: (q, k.double(), v, None, False, None), "key has dtype"),
    (lambda q, k, v: (q.int(), k.int(), v.int(), None, False, None), "query has dtype"),
    (lambda q, k, v: (q, k.bfloat16(), v, None, False, None), "share one dtype"),
    (lambda q, k, v: (q, k[:, :, :, :4], v, None, False, None), "key must have shape"),
    (lambda q, k, v: (q, k[:1], v, None, False, None), "key must have shape"),
    (lambda q, k, v: (q, k, v[:, :, :5], None, False, None), "value must have shape"),
    (lambda q, k, v: (q, k, v, torch.zeros(4, 5), False, None), "does not broadcast"),
    (lambda q, k, v: (q, k, v, torch.zeros(1, 1, 1, 1, 6), False, None), "at most 4 dimensions"),
    (lambda q, k, v: (q, k, v, torch.zeros(4, 6, dtype=torch.int32), False, None), "attn_mask has dtype"),
    (lambda q, k, v: (q, k, v, torch.zeros(4, 6), True, None), "not both"),
    (lambda q, k, v: (q, k, v, None, False, float("inf")), "scale must be finite"),
    (lambda q, k, v: (q[..., :0], k[..., :0], v, None, False, None), "positive last dimension"),
    (lambda q, k, v: (q.to("meta"), k, v, None, False, None), "is on"),
    (lambda q, k, v: (q, k.to("meta"), v, None, False, None), "is on"),
])
def test_bad_inputs_raise(args, message):
    with pytest.raises((RuntimeError, ValueError), match=message):
        op(*args(*_qkv()))


def test_gradient_through_the_op_raises():
    q, k, v = [t.requires_grad_() for t in _qkv()]
    out = op(q, k, v, None, False, None)
    with pytest.raises(RuntimeError, match="not implemented"):
        out.sum().backward()


def test_python_face_falls_back_to_torch():
    q, k, v = _qkv()
    # inference: the kernel
    torch.testing.assert_close(sdpa(q, k, v), F.scaled_dot_product_attention(q, k, v), atol=1e-5, rtol=0)
    # training: torch's kernel, with gradients
    qg = q.clone().requires_grad_()
    out = sdpa(qg, k, v)
    out.sum().backward()
    assert qg.grad is not None and qg.grad.shape == q.shape
    # dropout, broadcast batch dimensions, float64, grouped-query heads: torch's kernel
    assert sdpa(q, k, v, dropout_p=0.5).shape == (2, 2, 4, 8)
    torch.testing.assert_close(sdpa(q, k[:1], v[:1]), F.scaled_dot_product_attention(q, k[:1], v[:1]))
    torch.testing.assert_close(sdpa(q.double(), k.double(), v.double()),
                               F.scaled_dot_product_attention(q.double(), k.double(), v.double()))
    kv = heads_of(2, 1, 6, 8)
    torch.testing.assert_close(sdpa(q, kv, kv, enable_gqa=True), F.scaled_dot_product_attention(q, kv, kv,
                                                                                                 enable_gqa=True))
    with pytest.raises(RuntimeError):  # torch's own error for torch's own bad input
        sdpa(q, k[..., :3], v)


class _Attention(nn.Module):
    def __init__(self, hidden=64, heads=4):
        super().__init__()
        self.heads = heads
        self.qkv = nn.ModuleList(nn.Linear(hidden, hidden) for _ in range(3))
        self.out = nn.Linear(hidden, hidden)

    def forward(self, x, mask):
        b, s, h = x.shape
        q, k, v = (p(x).view(b, s, self.heads, h // self.heads).transpose(1, 2) for p in self.qkv)
        ctx = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return self.out(ctx.transpose(1, 2).reshape(b, s, h)) + x


def test_optimize_routes_attention_through_the_kernel():
    torch.manual_seed(0)
    model = _Attention().eval()
    x, mask = torch.randn(3, 10, 64), torch.ones(3, 1, 1, 10, dtype=torch.bool)
    mask[1, ..., 7:] = False
    opt = ipex_lite.optimize(model, sample_input=(x, mask))
    assert "attention" in ipex_lite.explain(opt)
    with torch.no_grad():
        torch.testing.assert_close(opt(x, mask), model(x, mask), atol=1e-5, rtol=1e-5)
        traced = torch.jit.freeze(torch.jit.trace(opt, (x, mask)))
        assert "ipex_lite::scaled_dot_product_attention" in str(traced.graph)
        torch.testing.assert_close(traced(x, mask), model(x, mask), atol=1e-5, rtol=1e-5)
    off = ipex_lite.optimize(model, level="O0")
    assert "attention" not in ipex_lite.explain(off)


_LEVEL_SCRIPT = textwrap.dedent("""
    import json, torch, ipex_lite
    results = {"level": ipex_lite.cpu_capability(), "errors": {}}
    for dtype in (torch.float32, torch.bfloat16):
        for b, h, lq, lk, e, ev, causal in ((2, 3, 70, 70, 64, 64, True), (1, 2, 9, 33, 20, 40, False)):
            g = torch.Generator().manual_seed(lq + lk)
            q, k = torch.randn(b, h, lq, e, generator=g), torch.randn(b, h, lk, e, generator=g)
            v = torch.randn(b, h, lk, ev, generator=g)
            mask = None if causal else torch.randn(lq, lk, generator=g)
            out = torch.ops.ipex_lite.scaled_dot_product_attention(q.to(dtype), k.to(dtype), v.to(dtype), mask,
                                                                   causal, None)
            s = q.double() @ k.double().transpose(-1, -2) / e ** 0.5
            s = s.masked_fill(~torch.ones(lq, lk, dtype=torch.bool).tril(), float("-inf")) if causal else s + mask
            ref = torch.softmax(s, -1) @ v.double()
            results["errors"][f"{dtype}-{lq}-{lk}"] = (out.double() - ref).abs().max().item()
    print(json.dumps(results))
""")


@pytest.mark.parametrize("level", LEVELS)
def test_every_isa_level_matches_reference(level):
    res = run_at_level(level, _LEVEL_SCRIPT)
    for key, err in res["errors"].items():
        assert err < (2e-2 if "bfloat16" in key else 1e-5), (key, err)


# ---------------------------------------------------------------- nn.MultiheadAttention replacement

from torch.profiler import profile  # noqa: E402

from ipex_lite.nn.attention import InferenceMultiheadAttention  # noqa: E402


def _mha_pair(batch_first=True, **kw):
    torch.manual_seed(0)
    stock = nn.MultiheadAttention(32, 4, batch_first=batch_first, **kw).eval()
    return stock, InferenceMultiheadAttention.from_module(stock)


def _mha_masks(b, length, heads=4):
    g = torch.Generator().manual_seed(1)
    kpm = torch.zeros(b, length, dtype=torch.bool)
    kpm[1, length - 2:] = True
    causal = torch.ones(length, length, dtype=torch.bool).triu(1)
    return [{}, {"key_padding_mask": kpm}, {"attn_mask": torch.randn(length, length, generator=g)},
            {"attn_mask": causal, "is_causal": True}, {"attn_mask": causal, "key_padding_mask": kpm},
            {"attn_mask": torch.randn(b * heads, length, length, generator=g), "key_padding_mask": kpm},
            {"key_padding_mask": torch.zeros(b, length).masked_fill(kpm, float("-inf"))}]


@pytest.mark.parametrize("batch_first", [True, False])
def test_multihead_attention_matches_stock_with_every_mask(batch_first):
    stock, fast = _mha_pair(batch_first)
    assert set(fast.state_dict()) == set(stock.state_dict())
    assert fast.in_proj_weight is stock.in_proj_weight and fast.out_proj.weight is stock.out_proj.weight
    b, length = 3, 7
    x = torch.randn(b, length, 32) if batch_first else torch.randn(length, b, 32)
    with torch.no_grad():
        for kw in _mha_masks(b, length):
            want = stock(x, x, x, need_weights=False, **kw)[0]
            got, weights = fast(x, x, x, need_weights=False, **kw)
            assert weights is None
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5, msg=str(list(kw)))
        with profile() as prof:
            fast(x, x, x, need_weights=False)
        assert any(e.key == "ipex_lite::scaled_dot_product_attention" for e in prof.key_averages())
        # not served by the kernel: stock's forward, stock's result
        want, want_w = stock(x, x, x)
        got, got_w = fast(x, x, x)
        torch.testing.assert_close(got, want)
        torch.testing.assert_close(got_w, want_w)
        y = torch.randn_like(x)
        torch.testing.assert_close(fast(x, y, y, need_weights=False)[0], stock(x, y, y, need_weights=False)[0])
        xt = x.transpose(0, 1).contiguous().transpose(0, 1)  # non-contiguous input
        torch.testing.assert_close(fast(xt, xt, xt, need_weights=False)[0], stock(xt, xt, xt, need_weights=False)[0],
                                   rtol=1e-5, atol=1e-5)


def test_multihead_attention_bf16_training_and_bad_inputs():
    stock, _ = _mha_pair()
    bf16 = InferenceMultiheadAttention.from_module(stock, dtype=torch.bfloat16)
    x = torch.randn(2, 9, 32)
    with torch.no_grad():
        want = stock(x, x, x, need_weights=False)[0]
        got = bf16(x, x, x, need_weights=False)[0]
    assert got.dtype == torch.bfloat16 and (got.float() - want).abs().max() / want.abs().max() < 3e-2
    # gradients: stock's forward, stock's gradients
    _, fast = _mha_pair()
    xg = x.clone().requires_grad_()
    fast(xg, xg, xg)[0].sum().backward()
    xs = x.clone().requires_grad_()
    stock(xs, xs, xs)[0].sum().backward()
    torch.testing.assert_close(xg.grad, xs.grad)
    # bad inputs: the same error class and message as stock's
    bad = [dict(key_padding_mask=torch.zeros(3, 9, dtype=torch.bool)), dict(attn_mask=torch.zeros(5, 5)),
           dict(attn_mask=torch.zeros(9, 9, dtype=torch.int64)), dict(key_padding_mask=torch.zeros(2, 4))]
    for kw in bad:
        with pytest.raises(Exception) as theirs:
            stock(x, x, x, need_weights=False, **kw)
        with pytest.raises(type(theirs.value)) as ours:
            fast(x, x, x, need_weights=False, **kw)
        assert str(ours.value) == str(theirs.value)
    with pytest.raises(AssertionError):
        fast(torch.randn(2, 9, 16), torch.randn(2, 9, 16), torch.randn(2, 9, 16))
    empty = torch.randn(0, 9, 32)
    with torch.no_grad():
        assert fast(empty, empty, empty, need_weights=False)[0].shape == (0, 9, 32)


def test_optimize_replaces_multihead_attention_and_encoder_layers():
    import ipex_lite

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.ln = nn.LayerNorm(32)
            self.attn = nn.MultiheadAttention(32, 4, batch_first=True)
            self.enc = nn.TransformerEncoderLayer(32, 4, 64, batch_first=True)

        def forward(self, x):
            y = self.ln(x)
            return self.enc(x + self.attn(y, y, y, need_weights=False)[0])

    model = Block().eval()
    opt = ipex_lite.optimize(model)
    assert isinstance(opt.attn, InferenceMultiheadAttention)
    # the encoder layer's fast path reads its weights: the whole layer is replaced
    assert type(opt.enc).__name__ == "InferenceTransformerEncoderLayer"
    assert isinstance(opt.enc.self_attn, InferenceMultiheadAttention)
    text = ipex_lite.explain(opt)
    assert "MultiheadAttention -> packed QKV/out projections" in text
    assert "TransformerEncoderLayer -> packed attention projections" in text and "left alone" not in text
    x = torch.randn(2, 6, 32)
    with torch.no_grad():
        want = model(x)
        torch.testing.assert_close(opt(x), want, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(torch.jit.freeze(torch.jit.trace(opt, x))(x), want, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(torch.compile(opt)(x), want, rtol=1e-4, atol=1e-4)
        bf16 = ipex_lite.optimize(model, dtype=torch.bfloat16)(x).float()
    assert ((bf16 - want).abs().max() / want.abs().max()).item() < 5e-2
    assert set(opt.state_dict()) == set(model.state_dict())
