"""torch.nn's transformer modules under ipex_lite.optimize / quantization: InferenceTransformerEncoder,
-EncoderLayer, -DecoderLayer and cross-attention in InferenceMultiheadAttention, against stock.

fp32 within 1e-5 of stock (relative to the output's scale); bf16 within 5e-2; int8 within 5e-2."""
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn
from torch.profiler import profile

import ipex_lite
from ipex_lite import quantization as q
from ipex_lite.nn.attention import InferenceMultiheadAttention
from ipex_lite.nn.transformer import (InferenceTransformerDecoderLayer, InferenceTransformerEncoder,
                                      InferenceTransformerEncoderLayer)

pytestmark = pytest.mark.filterwarnings("ignore:enable_nested_tensor is True", "ignore:The PyTorch API of nested")


def _rel(got, want):
    return ((got.float() - want.float()).abs().max() / want.float().abs().max().clamp_min(1e-12)).item()


def _encoder(batch_first=True, norm_first=False, activation="relu", final_norm=True, **kw):
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(32, 4, 64, batch_first=batch_first, norm_first=norm_first,
                                       activation=activation)
    return nn.TransformerEncoder(layer, 2, norm=nn.LayerNorm(32) if final_norm else None, **kw).eval()


def _masks(b=3, length=8):
    pad = torch.zeros(b, length, dtype=torch.bool)
    pad[1, length - 3:] = True
    causal = nn.Transformer.generate_square_subsequent_mask(length)
    return [{}, {"src_key_padding_mask": pad}, {"mask": causal}, {"mask": causal, "is_causal": True},
            {"mask": causal.isinf(), "src_key_padding_mask": pad},
            {"src_key_padding_mask": torch.zeros(b, length).masked_fill(pad, float("-inf"))}]


@pytest.mark.parametrize("batch_first,norm_first,activation",
                         [(True, False, "relu"), (True, True, "gelu"), (False, False, "gelu"),
                          (False, True, nn.GELU(approximate="tanh")), (True, False, torch.tanh)])
def test_encoder_matches_stock(batch_first, norm_first, activation):
    enc = _encoder(batch_first, norm_first, activation)
    opt = ipex_lite.optimize(enc)
    assert isinstance(opt, InferenceTransformerEncoder)
    assert all(isinstance(m, InferenceTransformerEncoderLayer) for m in opt.layers)
    assert set(opt.state_dict()) == set(enc.state_dict())
    assert torch.equal(opt.layers[0].linear1.weight, enc.layers[0].linear1.weight)
    assert opt.layers[0].fused_activation == (activation in ("relu", "gelu") or isinstance(activation, nn.GELU))
    x = torch.randn(3, 8, 32) if batch_first else torch.randn(8, 3, 32)
    with torch.no_grad():
        for kw in _masks():
            assert _rel(opt(x, **kw), enc(x, **kw)) < 1e-5, list(kw)
        with profile() as prof:
            opt(x)
    assert any(e.key == "ipex_lite::scaled_dot_product_attention" for e in prof.key_averages())
    text = ipex_lite.explain(opt)
    assert "TransformerEncoderLayer -> packed attention projections" in text and "left alone" not in text


def test_encoder_nested_path_gives_stock_zeros_at_padded_positions():
    enc = _encoder()  # batch_first, post-norm, even heads: stock nests the batch by the padding mask
    assert enc.use_nested_tensor
    opt = ipex_lite.optimize(enc)
    x = torch.randn(3, 8, 32)
    pad = torch.zeros(3, 8, dtype=torch.bool)
    pad[0, 5:] = True
    with torch.no_grad():
        want = enc(x, src_key_padding_mask=pad)
        got = opt(x, src_key_padding_mask=pad)
    assert torch.equal(want[0, 5:], enc.norm(torch.zeros(3, 32))) and torch.equal(got[0, 5:], want[0, 5:])
    assert _rel(got, want) < 1e-5
    right_padded = pad.clone()
    right_padded[2, 0] = True  # not left-aligned: stock computes every position
    with torch.no_grad():
        assert _rel(opt(x, src_key_padding_mask=right_padded), enc(x, src_key_padding_mask=right_padded)) < 1e-5


def test_decoder_and_full_transformer_match_stock():
    torch.manual_seed(0)
    for norm_first in (False, True):
        model = nn.Transformer(32, 4, 2, 2, 64, batch_first=True, norm_first=norm_first).eval()
        opt = ipex_lite.optimize(model)
        assert all(isinstance(m, InferenceTransformerDecoderLayer) for m in opt.decoder.layers)
        assert isinstance(opt.decoder.layers[0].multihead_attn, InferenceMultiheadAttention)
        assert set(opt.state_dict()) == set(model.state_dict())
        src, tgt = torch.randn(3, 9, 32), torch.randn(3, 6, 32)
        pad = torch.zeros(3, 9, dtype=torch.bool)
        pad[2, 6:] = True
        tgt_mask = nn.Transformer.generate_square_subsequent_mask(6)
        with torch.no_grad():
            for kw in [{}, {"tgt_mask": tgt_mask, "tgt_is_causal": True},
                       {"src_key_padding_mask": pad, "memory_key_padding_mask": pad, "tgt_mask": tgt_mask}]:
                assert _rel(opt(src, tgt, **kw), model(src, tgt, **kw)) < 1e-5, list(kw)


def test_cross_attention_projections_are_packed_and_match_stock():
    torch.manual_seed(0)
    stock = nn.MultiheadAttention(32, 4, batch_first=False).eval()
    fast = InferenceMultiheadAttention.from_module(stock)
    query, mem, other = torch.randn(5, 2, 32), torch.randn(7, 2, 32), torch.randn(7, 2, 32)
    kpm = torch.zeros(2, 7, dtype=torch.bool)
    kpm[0, 4:] = True
    with torch.no_grad():
        for k, v, kw in [(mem, mem, {}), (mem, other, {}), (mem, mem, {"key_padding_mask": kpm}),
                         (mem, mem, {"attn_mask": torch.randn(5, 7)})]:
            want = stock(query, k, v, need_weights=False, **kw)[0]
            torch.testing.assert_close(fast(query, k, v, need_weights=False, **kw)[0], want, rtol=1e-5, atol=1e-5)
    assert set(fast._row_projections) == {"q", "kv", "k", "v"}
    with torch.no_grad():  # the packed rows follow an in-place update of in_proj_weight
        stock.in_proj_weight.mul_(0.5)
        torch.testing.assert_close(fast(query, mem, mem, need_weights=False)[0],
                                   stock(query, mem, mem, need_weights=False)[0], rtol=1e-5, atol=1e-5)


def test_bf16_int8_trace_and_compile():
    enc = _encoder()
    x = torch.randn(3, 8, 32)
    pad = _masks()[1]["src_key_padding_mask"]
    with torch.no_grad():
        want = enc(x, src_key_padding_mask=pad)
        bf16 = ipex_lite.optimize(enc, dtype=torch.bfloat16)
        got = bf16(x, src_key_padding_mask=pad)
        assert got.dtype == torch.bfloat16 and _rel(got, want) < 5e-2
        opt = ipex_lite.optimize(enc)
        traced = torch.jit.freeze(torch.jit.trace(opt, x))
        assert _rel(traced(x), enc(x)) < 1e-5
        # compiled, stock does not nest (its mask check cannot be compiled): compare unpadded positions
        assert _rel(torch.compile(opt)(x, src_key_padding_mask=pad)[~pad], want[~pad]) < 1e-4
    prepared = q.prepare(enc, q.default_static_qconfig_mapping, example_inputs=x)
    with torch.no_grad():
        for _ in range(4):
            prepared(torch.randn(3, 8, 32))
    int8 = q.convert(prepared)
    text = ipex_lite.explain(int8)
    for name in ("self_attn.in_proj", "self_attn.out_proj", "linear1", "linear2"):
        assert f"layers.0.{name}" in text and f"layers.1.{name}" in text
    assert text.count("int8: QuantizedLinear") == 8
    with torch.no_grad():
        assert _rel(int8(x), enc(x)) < 5e-2
    # the int8 model's state_dict round-trips into a fresh conversion
    again = q.convert(prepared)
    again.load_state_dict(int8.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(again(x), int8(x))


def test_training_and_gradients_take_stock_forward():
    enc = _encoder(final_norm=False)
    opt = ipex_lite.optimize(enc)
    x = torch.randn(3, 8, 32)
    xs, xo = x.clone().requires_grad_(), x.clone().requires_grad_()
    enc(xs).sum().backward()
    opt(xo).sum().backward()  # grad mode, eval: stock's formulation through the packed modules' autograd
    torch.testing.assert_close(xo.grad, xs.grad, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(opt.layers[0].linear1.weight.grad, enc.layers[0].linear1.weight.grad)


def test_bad_inputs_give_stocks_error():
    enc = _encoder()
    opt = ipex_lite.optimize(enc)
    x = torch.randn(3, 8, 32)
    bad = [dict(src_key_padding_mask=torch.zeros(2, 8, dtype=torch.bool)),  # batch differs
           dict(src_key_padding_mask=torch.zeros(3, 8, dtype=torch.int64)),  # wrong dtype
           dict(mask=torch.zeros(5, 5)),  # wrong shape
           dict(mask=torch.zeros(8, 8, dtype=torch.int32)),
           dict(mask=torch.zeros(8, 8, dtype=torch.bool), src_key_padding_mask=torch.zeros(3, 8))]
    with torch.no_grad():
        calls = [((x,), kw) for kw in bad] + [((torch.randn(3, 8, 16),), {}), ((torch.randn(8, 32),), {})]
        for args, kw in calls:
            try:
                want = enc(*args, **kw)
            except Exception as e:
                with pytest.raises(type(e)) as ours:
                    opt(*args, **kw)
                # stock's fast path reports a bad mask shape as a failed view; ours names the mask
                assert str(ours.value) == str(e) or "mask has shape" in str(ours.value), list(kw)
            else:  # accepted by stock (an unbatched input; mixed mask types, with a warning): the same result
                assert _rel(opt(*args, **kw), want) < 1e-5, list(kw)
        empty = torch.randn(0, 8, 32)
        assert opt(empty).shape == enc(empty).shape == (0, 8, 32)
        xt = torch.randn(8, 3, 32).transpose(0, 1)  # non-contiguous
        assert _rel(opt(xt), enc(xt)) < 1e-5
        nested = torch.nested.nested_tensor([torch.randn(4, 32), torch.randn(6, 32)])
        with pytest.raises(NotImplementedError, match="nested tensors"):
            opt.layers[0](nested)


@settings(max_examples=15, deadline=None, derandomize=True)
@given(st.data())
def test_fuzz_encoder_layer(data):
    """Random sizes (empty batches and length 1 included), masks of right and wrong shapes and dtypes:
    stock's result or stock's error class, never a crash."""
    b, length = data.draw(st.integers(0, 4)), data.draw(st.integers(1, 9))
    torch.manual_seed(data.draw(st.integers(0, 1000)))
    layer = nn.TransformerEncoderLayer(16, 2, 24, batch_first=True, norm_first=data.draw(st.booleans())).eval()
    fast = ipex_lite.optimize(layer)
    x = torch.randn(b, length, 16)
    kw = {}
    if data.draw(st.booleans()):
        kb = data.draw(st.sampled_from([b, b + 1]))
        kw["src_key_padding_mask"] = torch.rand(kb, length) < 0.3
    if data.draw(st.booleans()):
        ml = data.draw(st.sampled_from([length, length + 1]))
        kw["src_mask"] = torch.randn(ml, ml).to(data.draw(st.sampled_from([torch.float32, torch.bool, torch.int64])))
    wrong_shape = ("src_key_padding_mask" in kw and kw["src_key_padding_mask"].shape[0] != b) or \
        ("src_mask" in kw and kw["src_mask"].shape[0] != length)
    with torch.no_grad():
        if wrong_shape:  # refused with a message naming the mask (stock's fused path may read it silently)
            with pytest.raises(RuntimeError, match="mask"):
                fast(x, **kw)
            return
        try:
            want = layer(x, **kw)
        except Exception as e:
            with pytest.raises(type(e)):
                fast(x, **kw)
            return
        got = fast(x, **kw)
    # a fully masked row is NaN in stock's math path; ipex_lite's attention gives it zeros, as torch's
    # SDPA does (a NaN there would spread to every row of the next layer through its keys)
    finite = want.isfinite()
    assert got[finite].isfinite().all()
    torch.testing.assert_close(got[finite], want[finite], rtol=1e-4, atol=1e-4)
