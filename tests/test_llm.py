"""ipex_lite.llm: the decode ops against torch references (every ISA level), llm.optimize on Hugging Face
decoders built from configs (logits and greedy tokens against stock transformers, KV cache against
recomputation, padding, beams, bad input), and a decoder assembled from ipex_lite.llm.modules by hand.

Tolerances: fp32 paths agree with torch to ~1e-5 relative (summation order only); bf16 outputs round
to bf16 once where torch rounds once, so they differ by at most a few bf16 ulps (2^-8 relative each).
"""
import copy
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import ipex_lite
from ipex_lite.llm import functional as LF
from ipex_lite.llm import modules as LM
from isa_levels import LEVELS, run_at_level

transformers = pytest.importorskip("transformers")
ops = torch.ops.ipex_lite


def rel(a, b):
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-12))


# ---------------------------------------------------------------- linear_small_m
@pytest.mark.parametrize("m", [1, 2, 3, 4, 5, 9])
@pytest.mark.parametrize("k,n", [(1, 3), (17, 5), (100, 37), (2048, 64)])
@pytest.mark.parametrize("bias", [False, True])
def test_linear_small_m_matches_reference(m, k, n, bias):
    torch.manual_seed(m * 1000 + k + n)
    w = torch.randn(n, k).bfloat16()
    x = torch.randn(2, m, k).bfloat16()
    b = torch.randn(n).bfloat16() if bias else None
    y = ops.linear_small_m(x, w, b)
    ref = F.linear(x.double(), w.double(), None if b is None else b.double())
    assert y.dtype == torch.bfloat16 and y.shape == (2, m, n)
    # one bf16 rounding of an fp32 sum
    assert ((y.double() - ref).abs() <= ref.abs() * 2 ** -8 + 1e-4 * (x.double().abs() @ w.double().abs().t())).all()
    y32 = ops.linear_small_m(x.float(), w, b)  # fp32 activations: fp32 output, no rounding
    assert y32.dtype == torch.float32 and rel(y32, ref) < 1e-5


def test_linear_small_m_reads_strided_weight_rows():
    torch.manual_seed(0)
    big = torch.randn(40, 96).bfloat16()
    w = big[5:25, :64]  # row stride 96: a column block of a larger matrix
    x = torch.randn(3, 64).bfloat16()
    assert rel(ops.linear_small_m(x.float(), w), F.linear(x.double(), w.double())) < 1e-5


def test_linear_small_m_empty_and_bad_input():
    w = torch.randn(8, 16).bfloat16()
    assert ops.linear_small_m(torch.empty(0, 16).bfloat16(), w).shape == (0, 8)
    with pytest.raises(RuntimeError, match="weight must be bfloat16"):
        ops.linear_small_m(torch.randn(1, 16), w.float())
    with pytest.raises(RuntimeError, match="input has 15 features but weight expects 16"):
        ops.linear_small_m(torch.randn(1, 15).bfloat16(), w)
    with pytest.raises(RuntimeError, match=r"bias must have shape \(8\)"):
        ops.linear_small_m(torch.randn(1, 16).bfloat16(), w, torch.randn(7).bfloat16())
    with pytest.raises(RuntimeError, match="input has dtype Long"):
        ops.linear_small_m(torch.ones(1, 16, dtype=torch.long), w)


def test_functional_linear_dispatch():
    torch.manual_seed(0)
    w = torch.randn(32, 64).bfloat16()
    for rows in (1, 8, 9, 64):  # up to 8 rows: the kernel; more: torch's GEMM
        x = torch.randn(rows, 64).bfloat16()
        assert rel(LF.linear(x, w), F.linear(x.double(), w.double())) < 2e-2
    x = torch.randn(2, 64, requires_grad=True)  # gradients: torch
    y = LF.linear(x, w.float())
    y.sum().backward()
    assert x.grad is not None


# ---------------------------------------------------------------- norms, rotary, SiLU gate
def hf_rms_norm(x, w, eps):
    h = x.float()
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return w * h.to(x.dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("n", [1, 15, 64, 2048])
def test_rms_norm_and_add(dtype, n):
    torch.manual_seed(n)
    x = torch.randn(3, 5, n).to(dtype)
    r = torch.randn(3, 5, n).to(dtype)
    w = (torch.rand(n) + 0.5).to(dtype)
    tol = 1e-6 if dtype == torch.float32 else 2 ** -7
    assert rel(ops.rms_norm(x, w, 1e-5), hf_rms_norm(x, w, 1e-5)) < tol
    summed = (r + x)
    res = r.clone()
    out = ops.add_rms_norm(x, res, w, 1e-5)
    assert torch.equal(res, summed)  # the stored sum is exactly torch's (rounded) add
    assert rel(out, hf_rms_norm(summed, w, 1e-5)) < tol
    # the functional face: add_back writes the sum into residual, otherwise residual is untouched
    r2 = r.clone()
    LF.add_rms_norm(r2, x, w, eps=1e-5, add_back=False)
    assert torch.equal(r2, r)
    strided = torch.randn(3, 5, 2 * n).to(dtype)[..., :n]  # non-contiguous input is copied
    assert rel(ops.rms_norm(strided, w, 1e-5), hf_rms_norm(strided, w, 1e-5)) < tol


def test_rms_norm_bad_input():
    x = torch.randn(2, 8)
    with pytest.raises(RuntimeError, match=r"weight must have shape \(8\)"):
        ops.rms_norm(x, torch.ones(7), 1e-6)
    with pytest.raises(RuntimeError, match="weight has dtype BFloat16 but input has Float"):
        ops.rms_norm(x, torch.ones(8).bfloat16(), 1e-6)
    with pytest.raises(RuntimeError, match="eps must be finite"):
        ops.rms_norm(x, torch.ones(8), float("nan"))
    with pytest.raises(RuntimeError, match="residual has shape"):
        ops.add_rms_norm(x, torch.zeros(3, 8), torch.ones(8), 1e-6)
    with pytest.raises(RuntimeError, match="residual is updated in place and must be contiguous"):
        ops.add_rms_norm(x, torch.zeros(8, 2).t(), torch.ones(8), 1e-6)
    with pytest.raises(RuntimeError, match="non-empty last dimension"):
        ops.rms_norm(torch.randn(2, 0), torch.ones(0), 1e-6)


def hf_rotary(t, cos, sin):
    """transformers' apply_rotary_pos_emb on (B, S, H, D) with cos/sin (B, S, rd) (partial rotary kept)."""
    rd = cos.shape[-1]
    c, s = cos.unsqueeze(2), sin.unsqueeze(2)
    rot, rest = t[..., :rd], t[..., rd:]
    x1, x2 = rot[..., : rd // 2], rot[..., rd // 2:]
    return torch.cat((rot * c + torch.cat((-x2, x1), -1) * s, rest), -1)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rd", [64, 32, 2])
def test_rotary_in_place(dtype, rd):
    torch.manual_seed(rd)
    b, s, hq, hk, d = 2, 5, 4, 2, 64
    qkv = torch.randn(b, s, hq + 2 * hk, d).to(dtype)  # q and k are strided views of one buffer
    q, k = qkv[:, :, :hq], qkv[:, :, hq:hq + hk]
    want_q, want_k = hf_rotary(q.double(), *_cos_sin(b, s, rd)), hf_rotary(k.double(), *_cos_sin(b, s, rd))
    v_before = qkv[:, :, hq + hk:].clone()
    cos, sin = (t.to(dtype) for t in _cos_sin(b, s, rd))
    LF.rotary_embedding(q, k, sin, cos)
    tol = 1e-6 if dtype == torch.float32 else 2 ** -7
    assert rel(q, want_q) < tol and rel(k, want_k) < tol
    assert torch.equal(qkv[:, :, hq + hk:], v_before)  # v untouched
    # cos/sin shared across the batch, 2-D
    q2 = torch.randn(b, s, hq, d).to(dtype)
    want = hf_rotary(q2.double(), cos[0].double().expand(b, s, rd), sin[0].double().expand(b, s, rd))
    ops.rotary_embedding_(q2, cos[0], sin[0])
    assert rel(q2, want) < tol


def _cos_sin(b, s, rd):
    g = torch.Generator().manual_seed(0)
    ang = torch.rand(b, s, rd // 2, generator=g, dtype=torch.float64) * 10
    ang = torch.cat((ang, ang), -1)
    return ang.cos(), ang.sin()


def test_rotary_bad_input():
    q = torch.randn(1, 3, 2, 8)
    c = torch.randn(1, 3, 8)
    with pytest.raises(RuntimeError, match="must be even and at most head_dim"):
        ops.rotary_embedding_(q, c[..., :3], c[..., :3])
    with pytest.raises(RuntimeError, match="cos covers 2 positions but input has 3"):
        ops.rotary_embedding_(q, c[:, :2], c[:, :2])
    with pytest.raises(RuntimeError, match="must have the dtype of input"):
        ops.rotary_embedding_(q, c.bfloat16(), c.bfloat16())
    with pytest.raises(RuntimeError, match="must be 4-D"):
        ops.rotary_embedding_(q[0], c, c)


def test_rotary_gptj_form_and_position_ids():
    torch.manual_seed(0)
    q, k = torch.randn(1, 4, 2, 8), torch.randn(1, 4, 2, 8)
    table_c, table_s = _cos_sin(1, 16, 8)
    pos = torch.tensor([[3, 4, 5, 6]])
    qr, kr = LF.rotary_embedding(q.clone(), k.clone(), table_s[0].float(), table_c[0].float(), rotary_half=False,
                                 position_ids=pos)
    c, s = table_c[0][pos].float(), table_s[0][pos].float()
    x1, x2 = q[..., 0::2], q[..., 1::2]
    want = q * c.unsqueeze(2) + torch.stack((-x2, x1), -1).flatten(-2) * s.unsqueeze(2)
    assert rel(qr, want) < 1e-6


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_silu_mul(dtype):
    torch.manual_seed(0)
    gu = (torch.randn(3, 7, 2 * 100) * 4).to(dtype)
    g, u = gu[..., :100], gu[..., 100:]
    out = ops.silu_mul(g, u)
    want = F.silu(g) * u  # torch rounds silu to the dtype, then the product
    tol = 1e-6 if dtype == torch.float32 else 2 ** -7
    assert rel(out, want) < tol
    with pytest.raises(RuntimeError, match="x has shape"):
        ops.silu_mul(g, u[..., :99])


# ---------------------------------------------------------------- decode attention
def ref_attention(q, k, v, mask=None, causal=False, scale=None):
    g = q.shape[1] // k.shape[1]
    k, v = k.double().repeat_interleave(g, 1), v.double().repeat_interleave(g, 1)
    lq, lk = q.shape[2], k.shape[2]
    s = q.double() @ k.transpose(-1, -2) * (scale if scale is not None else 1 / math.sqrt(q.shape[-1]))
    if mask is not None:
        s = s.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else s + mask.double()
    if causal:
        s = s.masked_fill(~torch.ones(lq, lk, dtype=torch.bool).tril(lk - lq), float("-inf"))
    return torch.softmax(s, -1) @ v


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("lq,lk", [(1, 1), (1, 7), (1, 300), (3, 1000), (16, 40)])
@pytest.mark.parametrize("groups", [1, 4])
def test_decode_attention_matches_reference(dtype, lq, lk, groups):
    torch.manual_seed(lq * 7 + lk + groups)
    b, hk, d, cap = 2, 2, 64, lk + 13
    q = torch.randn(b, hk * groups, lq, d).to(dtype)
    kbuf, vbuf = torch.randn(b, hk, cap, d).to(dtype), torch.randn(b, hk, cap, d).to(dtype)
    k, v = kbuf[:, :, :lk], vbuf[:, :, :lk]  # views of a preallocated cache
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    out = ops.decode_attention(q, k, v, None, lq > 1 and lq <= lk, None)
    assert out.shape == (b, hk * groups, lq, d)
    assert rel(out, ref_attention(q, k, v, causal=lq > 1)) < tol
    # left padding: the first keys of batch 1 masked out (bool), and an additive float mask
    mask = torch.ones(b, 1, lq, lk, dtype=torch.bool)
    mask[1, :, :, : lk // 3] = False
    mask[..., -1] = True
    assert rel(ops.decode_attention(q, k, v, mask, False, 0.3), ref_attention(q, k, v, mask, scale=0.3)) < tol
    fmask = torch.randn(b, 1, lq, lk)
    assert rel(ops.decode_attention(q, k, v, fmask, False, None), ref_attention(q, k, v, fmask)) < tol


def test_decode_attention_fully_masked_row_is_zero_and_bad_input():
    q, k = torch.randn(1, 2, 1, 8), torch.randn(1, 1, 5, 8)
    out = ops.decode_attention(q, k, k, torch.zeros(1, 1, 1, 5, dtype=torch.bool), False, None)
    assert torch.equal(out, torch.zeros_like(out))
    with pytest.raises(RuntimeError, match="must be a multiple of the key/value heads"):
        ops.decode_attention(torch.randn(1, 3, 1, 8), torch.randn(1, 2, 5, 8), torch.randn(1, 2, 5, 8))
    with pytest.raises(RuntimeError, match="must share one dtype"):
        ops.decode_attention(q, k.bfloat16(), k.bfloat16())
    with pytest.raises(RuntimeError, match="does not broadcast"):
        ops.decode_attention(q, k, k, torch.zeros(1, 1, 1, 4, dtype=torch.bool))
    with pytest.raises(RuntimeError, match="needs at least as many keys"):
        ops.decode_attention(torch.randn(1, 2, 6, 8), k, k, None, True)
    with pytest.raises(RuntimeError, match="value must have shape"):
        ops.decode_attention(q, k, torch.randn(1, 1, 4, 8))
    assert ops.decode_attention(q, k[:, :, :0], k[:, :, :0]).abs().sum() == 0  # no keys: zeros


def test_opcheck_llm_ops():
    torch.manual_seed(0)
    x = torch.randn(2, 16).bfloat16()
    w = torch.randn(8, 16).bfloat16()
    torch.library.opcheck(ops.linear_small_m, (x, w, torch.randn(8).bfloat16()))
    torch.library.opcheck(ops.rms_norm, (x, torch.ones(16).bfloat16(), 1e-6))
    torch.library.opcheck(ops.add_rms_norm, (x, x.clone(), torch.ones(16).bfloat16(), 1e-6))
    torch.library.opcheck(ops.rotary_embedding_, (torch.randn(1, 3, 2, 8), torch.randn(1, 3, 8), torch.randn(1, 3, 8)))
    torch.library.opcheck(ops.silu_mul, (x, x.clone()))
    q, k = torch.randn(1, 4, 2, 8), torch.randn(1, 2, 6, 8)
    torch.library.opcheck(ops.decode_attention, (q, k, k.clone(), None, True, None))


_LEVEL_SCRIPT = r"""
import json, math, torch, torch.nn.functional as F, ipex_lite
ops = torch.ops.ipex_lite
torch.manual_seed(0)
def rel(a, b):
    a, b = a.double(), b.double()
    return float((a - b).abs().max() / b.abs().max())
res = {"level": ipex_lite.cpu_capability()}
w = torch.randn(37, 300).bfloat16()
for m in (1, 3, 6):
    x = torch.randn(m, 300).bfloat16()
    res[f"lin{m}"] = rel(ops.linear_small_m(x.float(), w), F.linear(x.double(), w.double()))
    res[f"lin{m}bf16"] = rel(ops.linear_small_m(x, w), F.linear(x.double(), w.double()))
x = torch.randn(4, 100); wn = torch.rand(100) + 0.5
h = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * wn
res["rms"] = rel(ops.rms_norm(x, wn, 1e-6), h)
g, u = torch.randn(4, 100) * 4, torch.randn(4, 100)
res["silu"] = rel(ops.silu_mul(g, u), F.silu(g) * u)
q = torch.randn(1, 3, 2, 40); c = torch.rand(1, 3, 40); s = torch.rand(1, 3, 40)
want = q * c.unsqueeze(2) + torch.cat((-q[..., 20:], q[..., :20]), -1) * s.unsqueeze(2)
ops.rotary_embedding_(q, c, s)
res["rot"] = rel(q, want)
q, k, v = torch.randn(1, 4, 2, 40), torch.randn(1, 2, 600, 40), torch.randn(1, 2, 600, 40)
ref = F.scaled_dot_product_attention(q, k.repeat_interleave(2, 1), v.repeat_interleave(2, 1))
res["attn"] = rel(ops.decode_attention(q, k, v), ref)
print(json.dumps(res))
"""


@pytest.mark.parametrize("level", LEVELS)
def test_every_isa_level(level):
    res = run_at_level(level, _LEVEL_SCRIPT)
    for key, err in res.items():
        if key == "level":
            continue
        assert err < (1e-2 if key.endswith("bf16") else 1e-5), (key, err)


# ---------------------------------------------------------------- Hugging Face decoders
def _tiny(family: str, seed: int = 0):
    """A small random-weight model of `family` with realistic norm weights and GQA where the family has it."""
    common = dict(vocab_size=503, hidden_size=128, intermediate_size=344, num_hidden_layers=2,
                  num_attention_heads=8, max_position_embeddings=512)
    if family == "llama":
        cfg = transformers.LlamaConfig(num_key_value_heads=2, **common)
        cls = transformers.LlamaForCausalLM
    elif family == "mistral":
        cfg = transformers.MistralConfig(num_key_value_heads=4, sliding_window=None, **common)
        cls = transformers.MistralForCausalLM
    elif family == "qwen2":
        cfg = transformers.Qwen2Config(num_key_value_heads=2, **common)
        cls = transformers.Qwen2ForCausalLM
    elif family == "qwen3":
        cfg = transformers.Qwen3Config(num_key_value_heads=2, head_dim=16, **common)
        cls = transformers.Qwen3ForCausalLM
    elif family == "phi3":
        cfg = transformers.Phi3Config(num_key_value_heads=4, pad_token_id=0, **common)
        cls = transformers.Phi3ForCausalLM
    elif family == "gpt2":
        cfg = transformers.GPT2Config(vocab_size=503, n_embd=128, n_layer=2, n_head=4, n_positions=512)
        cls = transformers.GPT2LMHeadModel
    elif family == "opt":
        cfg = transformers.OPTConfig(vocab_size=503, hidden_size=128, ffn_dim=256, num_hidden_layers=2,
                                     num_attention_heads=4, max_position_embeddings=512, word_embed_proj_dim=128)
        cls = transformers.OPTForCausalLM
    elif family == "gpt_neox":
        cfg = transformers.GPTNeoXConfig(vocab_size=503, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                                         num_attention_heads=4, max_position_embeddings=512, rotary_pct=0.5)
        cls = transformers.GPTNeoXForCausalLM
    else:
        raise ValueError(family)
    torch.manual_seed(seed)
    model = cls(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name and p.dim() == 1 and "bias" not in name:
                p.uniform_(0.7, 1.3)
            elif p.dim() == 2:
                p.normal_(0, 0.08)  # larger than HF's 0.02 init: logits far apart, greedy well conditioned
    return model


ROTARY_FAMILIES = ["llama", "mistral", "qwen2", "qwen3", "phi3"]
OTHER_FAMILIES = ["gpt2", "opt", "gpt_neox"]


def _ids(batch=1, length=12, seed=1):
    return torch.randint(3, 503, (batch, length), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("family", ROTARY_FAMILIES + OTHER_FAMILIES)
def test_optimize_bf16_logits_match_stock(family):
    model = _tiny(family)
    stock = copy.deepcopy(model).to(torch.bfloat16)
    opt = ipex_lite.llm.optimize(model, dtype=torch.bfloat16)
    assert next(model.parameters()).dtype == torch.float32  # inplace=False: the caller's model is untouched
    report = ipex_lite.explain(opt)
    if family in ROTARY_FAMILIES:
        assert "rotary attention" in report and "gated SiLU MLP" in report, report
    else:
        assert "rotary attention" not in report
    assert set(opt.state_dict()) == set(stock.state_dict())
    ids = _ids()
    with torch.no_grad():
        want, got, want32 = stock(ids).logits, opt(ids).logits, model(ids).logits
        assert rel(got, want) < 3e-2
        assert rel(got, want32) < 5e-2
        # one decode step through the cache: last-position logits against a full recomputation
        out = opt.generate(ids, max_new_tokens=3, do_sample=False, output_logits=True, return_dict_in_generate=True,
                           pad_token_id=0)
        full = stock(out.sequences[:, :-1]).logits[:, -3:]
        assert rel(torch.stack(out.logits, 1), full) < 5e-2


@pytest.mark.parametrize("family", ROTARY_FAMILIES + OTHER_FAMILIES)
def test_optimize_fp32_greedy_tokens_equal_stock(family):
    model = _tiny(family, seed=3)
    opt = ipex_lite.llm.optimize(model, dtype=torch.float32)
    ids = _ids(length=9, seed=4)
    with torch.no_grad():
        kw = dict(max_new_tokens=12, do_sample=False, pad_token_id=0, output_logits=True, return_dict_in_generate=True)
        want, got = model.generate(ids, **kw), opt.generate(ids, **kw)
        assert torch.equal(got.sequences, want.sequences)
        assert rel(torch.stack(got.logits), torch.stack(want.logits)) < 1e-4
        nocache = opt.generate(ids, max_new_tokens=12, do_sample=False, pad_token_id=0, use_cache=False)
        assert torch.equal(nocache, want.sequences)


@pytest.mark.parametrize("family", ["llama", "qwen3"])
def test_left_padded_batch_beams_and_long_prompt(family):
    model = _tiny(family, seed=5)
    opt = ipex_lite.llm.optimize(model, dtype=torch.float32)
    a, b = _ids(length=7, seed=6)[0], _ids(length=300, seed=7)[0]  # 300: prefill through the GEMM kernel
    ids = torch.zeros(2, 300, dtype=torch.long)
    mask = torch.zeros(2, 300, dtype=torch.long)
    ids[0, -7:], mask[0, -7:] = a, 1
    ids[1], mask[1] = b, 1
    kw = dict(attention_mask=mask, max_new_tokens=8, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        assert torch.equal(opt.generate(ids, **kw), model.generate(ids, **kw))
        # the padded row generates what it generates alone
        alone = opt.generate(a[None], max_new_tokens=8, do_sample=False, pad_token_id=0)
        assert torch.equal(opt.generate(ids, **kw)[0, -8:], alone[0, -8:])
        beams = dict(max_new_tokens=6, num_beams=3, do_sample=False, pad_token_id=0)
        assert torch.equal(opt.generate(a[None], **beams), model.generate(a[None], **beams))
        torch.manual_seed(0)
        s1 = opt.generate(a[None], max_new_tokens=6, do_sample=True, top_k=5, pad_token_id=0)
        torch.manual_seed(0)
        s2 = model.generate(a[None], max_new_tokens=6, do_sample=True, top_k=5, pad_token_id=0)
        assert torch.equal(s1, s2)


def test_kv_cache_allocated_once_per_generate(monkeypatch):
    from ipex_lite.llm import cache as cache_mod
    model = _tiny("llama")
    opt = ipex_lite.llm.optimize(model, dtype=torch.bfloat16)
    calls = []
    real = cache_mod._Buffers.reserve
    monkeypatch.setattr(cache_mod._Buffers, "reserve", lambda self, *a: (calls.append(a[-1]), real(self, *a))[1])
    ids = _ids(length=10)
    with torch.no_grad():
        out = opt.generate(ids, max_new_tokens=20, min_new_tokens=20, do_sample=False, pad_token_id=0,
                           return_dict_in_generate=True)
    assert len(calls) == model.config.num_hidden_layers  # one allocation per layer, none per token
    cache = out.past_key_values
    assert isinstance(cache, ipex_lite.llm.KVCache)
    keys = cache.layers[0].keys if hasattr(cache, "layers") else cache.key_cache[0]  # transformers 5.x / 4.x
    b, h, n, d = keys.shape
    assert n == 29 and keys.untyped_storage().nbytes() == b * h * 29 * d * 2  # prompt + new tokens - 1, exactly


def test_kv_cache_errors_before_writing():
    cache = ipex_lite.llm.KVCache()
    k = torch.randn(2, 2, 3, 8).bfloat16()
    cache.update(k, k, 0)
    with pytest.raises(ValueError, match="the cache holds torch.bfloat16 on cpu but key_states are torch.float32"):
        cache.update(k.float(), k.float(), 0)
    with pytest.raises(ValueError, match=r"do not match the cache's \(batch, kv_heads, head_dim\)"):
        cache.update(k[:1], k[:1], 0)
    with pytest.raises(ValueError, match="must be \\(batch, kv_heads, positions, head_dim\\)"):
        cache.update(k[0], k[0], 0)
    assert cache.get_seq_length() == 3
    keys, _ = cache.update(k, k, 0)
    assert keys.shape[2] == 6 and torch.equal(keys[:, :, 3:], k)
    cache.crop(-2)
    keys, _ = cache.update(k[:, :, :1], k[:, :, :1], 0)
    assert keys.shape[2] == 5 and torch.equal(keys[:, :, :3], k)


def test_optimize_bad_input_and_options():
    model = _tiny("llama")
    with pytest.raises(TypeError, match="quantization_config must come from"):
        ipex_lite.llm.optimize(model, dtype=torch.bfloat16, quantization_config=object())
    with pytest.raises(TypeError, match="low_precision_checkpoint must be a state_dict"):
        ipex_lite.llm.optimize(model, dtype=torch.bfloat16, low_precision_checkpoint="ckpt.pt")
    with pytest.raises(ValueError, match="dtype must be"):
        ipex_lite.llm.optimize(model, dtype=torch.float16)
    with pytest.raises(ValueError, match="only device='cpu'"):
        ipex_lite.llm.optimize(model, device="xpu")
    with pytest.raises(TypeError, match="must be a torch.nn.Module"):
        ipex_lite.llm.optimize("llama")
    opt = ipex_lite.llm.optimize(model, dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="max_position_embeddings"):
        opt.generate(_ids(length=500), max_new_tokens=20, pad_token_id=0)
    with pytest.raises(ValueError, match="empty prompt"):
        opt.generate(torch.zeros(1, 0, dtype=torch.long), max_new_tokens=2, pad_token_id=0)


def test_unrecognised_blocks_are_explained():
    class Weird(nn.Module):  # an RMSNorm-named module that is not one: kept, with the reason
        def __init__(self):
            super().__init__()
            self.weight = nn.Parameter(torch.ones(16))
            self.eps = 1e-6

        def forward(self, x):
            return x * self.weight  # no normalisation

    model = nn.Sequential(nn.Linear(16, 16), Weird())
    model[1].__class__.__name__ = "WeirdNorm"
    opt = ipex_lite.llm.optimize(model, dtype=torch.bfloat16)
    report = ipex_lite.explain(opt)
    assert "a norm that is not Llama's RMSNorm" in report and "Linear: bf16 calls" in report
    x = torch.randn(3, 16).bfloat16()
    assert rel(opt(x), model.to(torch.bfloat16)(x)) < 2e-2


# ---------------------------------------------------------------- a decoder from ipex_lite.llm.modules
def _tutorial():
    """tutorials/llm.py (its HandBuiltLlama: a Llama assembled from ipex_lite.llm.modules)."""
    import importlib.util
    import os
    path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tutorials", "llm.py")
    spec = importlib.util.spec_from_file_location("tutorial_llm", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_hand_built_decoder_matches_hf_llama(dtype):
    hf = _tiny("llama", seed=9).to(dtype)
    dec = _tutorial().HandBuiltLlama(hf)
    keys = set(dec.state_dict())
    ids = _ids(length=20, seed=10)
    tol = 1e-4 if dtype == torch.float32 else 5e-2
    with torch.no_grad():
        want = hf(ids).logits
        assert rel(dec(ids), want) < tol
        assert set(dec.state_dict()) == keys  # the fused projections add no keys
        cache = dec.new_cache(1, 64)
        first = dec(ids[:, :17], cache)
        steps = [dec(ids[:, i:i + 1], cache) for i in range(17, 20)]
        assert rel(torch.cat([first] + steps, 1), want) < tol
        with pytest.raises(ValueError, match="do not fit the cache's max_length 64"):
            dec(_ids(length=50), cache)
        assert cache.seq_length() == 20  # nothing was written by the failed call
        if dtype == torch.float32:  # greedy tokens equal transformers'
            want_tokens = hf.generate(ids, max_new_tokens=10, do_sample=False, pad_token_id=0)
            assert torch.equal(dec.generate_greedy(ids, 10), want_tokens)


def test_optimized_model_compiles():
    # every llm op has a fake kernel: torch.compile of the optimized model traces them as custom ops
    opt = ipex_lite.llm.optimize(_tiny("llama"), dtype=torch.bfloat16)
    ids = _ids(length=12)
    with torch.no_grad():
        want = opt(ids).logits
        got = torch.compile(opt)(ids).logits
    assert rel(got, want) < 1e-2
