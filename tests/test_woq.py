"""Weight-only quantization: the int8 / int4 kernels against a reference built from the documented layout
(every ISA level), quantization error bounds, checkpoints (sizes, fresh-process reload, the GPTQ layout),
bad input that leaves the model unchanged, and perplexity on real text of a small Llama trained here.

Tolerances: the GEMV kernel sums exact int * fp32 products in fp32 (~1e-6 relative in fp32); the prefill
path multiplies the bf16-rounded dequantized weight (bf16 tolerance); quantized weights lie within half a
quantization step of the float weights.
"""
import glob
import json
import math
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import ipex_lite
from ipex_lite import quantization as q
from ipex_lite.quantization._woq import _pack_int4, _unpack_int4, nf4_codebook, quantize_tensor
from isa_levels import LEVELS, run_at_level

ops = torch.ops.ipex_lite


def rel(a, b):
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-12))


def reference_weight(qweight, scales, zeros, bits, k, group):
    """The float weight the documented layout stands for (independent of the kernels)."""
    n = qweight.shape[0]
    vals = qweight.float() if bits == 8 else _unpack_int4(qweight).float()
    kp = vals.shape[1]
    g = vals.view(n, kp // group, group)
    if zeros is not None:
        g = g - zeros.unsqueeze(-1)
    return (g * scales.unsqueeze(-1)).view(n, kp)[:, :k]


@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("k,group", [(32, -1), (100, -1), (256, 32), (256, 128), (384, 64)])
@pytest.mark.parametrize("m", [1, 3, 5, 9])
def test_woq_linear_matches_reference(bits, k, group, m):
    torch.manual_seed(bits * 1000 + k + m)
    n = 37
    w = torch.randn(n, k) * 0.1
    kp = (k + 31) // 32 * 32
    g = kp if group == -1 else group
    qw, s, z = quantize_tensor(w, bits, g)
    ref_w = reference_weight(qw, s, z, bits, k, g)
    assert ((ref_w - w).abs() <= s.repeat_interleave(g, 1)[:, :k] * 0.5 + 1e-6).all()  # half a step
    bias = torch.randn(n)
    x = torch.randn(2, m, k)
    want = F.linear(x.double(), ref_w.double(), bias.double())
    got = ops.woq_linear(x, qw, s, z, bias, bits, k, group)
    assert got.shape == (2, m, n) and got.dtype == torch.float32
    if 2 * m <= 8:  # the GEMV kernel: exact products, fp32 sums
        assert rel(got, want) < 1e-5
    else:  # prefill: a GEMM on the bf16 dequantized weight
        assert rel(got, want) < 1e-2
    got16 = ops.woq_linear(x.bfloat16(), qw, s, z, bias.bfloat16(), bits, k, group)
    assert got16.dtype == torch.bfloat16 and rel(got16, want) < 2e-2
    deq = ops.woq_dequantize(qw, s, z, bits, k, group)
    assert deq.dtype == torch.bfloat16 and rel(deq, ref_w) < 2 ** -8


@pytest.mark.parametrize("bits,group", [(4, 128), (4, 256), (8, 64), (8, -1)])
def test_lowp_int8_matches_quantized_activation_reference(bits, group):
    # lowp INT8: each activation row symmetric int8, integer products (VNNI); where the CPU has no VNNI, or a
    # group does not fit its loads, the call keeps bf16 activations -- closer to the float result still
    torch.manual_seed(bits + group)
    k = 512
    qw, s, z = quantize_tensor(torch.randn(37, k) * 0.05, bits, k if group == -1 else group)
    g = k if group == -1 else group
    deq = reference_weight(qw, s, z, bits, k, g).double()
    for m in (1, 3, 6):
        x = torch.randn(m, k).bfloat16()
        got = ops.woq_linear(x, qw, s, z, None, bits, k, g, True).double()
        sx = x.double().abs().amax(-1, keepdim=True) / 127
        xq = torch.round(x.double() / sx).clamp(-127, 127) * sx
        assert min(rel(got, F.linear(xq, deq)), rel(got, F.linear(x.double(), deq))) < 1e-2
        assert rel(got, F.linear(x.double(), deq)) < 3e-2  # int8 activations: within ~1% of the float result
    # a group that a 128-input load would straddle: bf16 activations, same result as without lowp
    qw32, s32, z32 = quantize_tensor(torch.randn(8, k) * 0.05, 4, 32)
    x = torch.randn(1, k).bfloat16()
    assert torch.equal(ops.woq_linear(x, qw32, s32, z32, None, 4, k, 32, True),
                       ops.woq_linear(x, qw32, s32, z32, None, 4, k, 32, False))


def reference_nf4(qweight, scales, k, group):
    n = qweight.shape[0]
    vals = nf4_codebook()[_unpack_int4(qweight).long()]
    kp = vals.shape[1]
    return (vals.view(n, kp // group, group) * scales.unsqueeze(-1)).view(n, kp)[:, :k]


def test_nf4_codebook_and_quantization():
    cb = nf4_codebook()
    assert cb.shape == (16,) and cb[0] == -1 and cb[15] == 1 and cb[7] == 0 and (cb[1:] > cb[:-1]).all()
    assert torch.equal(cb.bfloat16().float(), cb)  # exact in bf16: the bf16 kernels hold it as bf16
    torch.manual_seed(0)
    w = torch.randn(16, 256)
    qw, s, z = quantize_tensor(w, 4, 64, cb)
    assert z is None and torch.allclose(s, w.view(16, 4, 64).abs().amax(-1))
    deq = reference_nf4(qw, s, 256, 64)
    # the nearest code: no other code is closer to w / scale
    r = (w.view(16, 4, 64) / s.unsqueeze(-1)).view(16, 256)
    best = (r.unsqueeze(-1) - cb).abs().min(-1).values
    assert torch.allclose((deq / s.repeat_interleave(64, 1) - r).abs(), best, atol=1e-6)


@pytest.mark.parametrize("k,group", [(2048, 128), (256, -1), (100, -1), (256, 32), (384, 64), (512, 256)])
@pytest.mark.parametrize("m", [1, 3, 9])
def test_nf4_linear_matches_reference(k, group, m):
    # groups of a multiple of 128 take the bf16 lanes kernel (vpermw look-up); others the fp32 kernel
    torch.manual_seed(k + m)
    n = 37
    kp = (k + 31) // 32 * 32
    g = kp if group == -1 else group
    cb = nf4_codebook()
    qw, s, _ = quantize_tensor(torch.randn(n, k) * 0.1, 4, g, cb)
    ref_w = reference_nf4(qw, s, k, g)
    bias = torch.randn(n)
    x = torch.randn(m, k)
    want = F.linear(x.double(), ref_w.double(), bias.double())
    got = ops.woq_linear(x, qw, s, None, bias, 4, k, group, False, cb)
    assert rel(got, want) < (1e-5 if m <= 8 else 1e-2)
    xb = x.bfloat16()
    want16 = F.linear(xb.double(), ref_w.double(), bias.double())
    got16 = ops.woq_linear(xb, qw, s, None, bias.bfloat16(), 4, k, group, True, cb)  # lowp INT8: not for NF4
    assert rel(got16, want16) < (1e-2 if m <= 8 else 2e-2)
    assert rel(ops.woq_dequantize(qw, s, None, 4, k, group, cb), ref_w) < 2 ** -8


def test_nf4_bad_input():
    cb = nf4_codebook()
    qw, s, z = quantize_tensor(torch.randn(8, 128), 4, 128)
    x = torch.randn(1, 128)
    with pytest.raises(RuntimeError, match="a codebook layer has no zero points"):
        ops.woq_linear(x, qw, s, z, None, 4, 128, 128, False, cb)
    with pytest.raises(RuntimeError, match="codebook must be a float32 CPU tensor of 16 values"):
        ops.woq_linear(x, qw, s, None, None, 4, 128, 128, False, cb[:8])
    with pytest.raises(RuntimeError, match="codebook value 1 .* is not exact in bfloat16"):
        ops.woq_linear(x, qw, s, None, None, 4, 128, 128, False, cb + torch.tensor([0, 1e-4] + [0] * 14))
    qw8, s8, _ = quantize_tensor(torch.randn(8, 128), 8, 128)
    with pytest.raises(RuntimeError, match="a codebook is for 4-bit weights"):
        ops.woq_linear(x, qw8, s8, None, None, 8, 128, 128, False, cb)


def test_woq_bad_input():
    qw, s, z = quantize_tensor(torch.randn(8, 64), 4, 32)
    x = torch.randn(1, 64)
    with pytest.raises(RuntimeError, match="bits must be 4 or 8"):
        ops.woq_linear(x, qw, s, z, None, 3, 64, 32)
    with pytest.raises(RuntimeError, match="group_size 48 must be a multiple of 32"):
        ops.woq_linear(x, qw, s, z, None, 4, 64, 48)
    with pytest.raises(RuntimeError, match="qweight of 8-bit weights must be Char"):
        ops.woq_linear(x, qw, s, z, None, 8, 64, 32)
    with pytest.raises(RuntimeError, match=r"scales must be float32 of shape \(8, 2\)"):
        ops.woq_linear(x, qw, s[:, :1], z, None, 4, 64, 32)
    with pytest.raises(RuntimeError, match="zeros must be float32"):
        ops.woq_linear(x, qw, s, z.double(), None, 4, 64, 32)
    with pytest.raises(RuntimeError, match="input has 63 features but the layer takes 64"):
        ops.woq_linear(x[:, :63], qw, s, z, None, 4, 64, 32)
    with pytest.raises(RuntimeError, match="bytes per row"):
        ops.woq_linear(x, qw[:, :16], s, z, None, 4, 64, 32)


def test_opcheck_woq_ops():
    qw, s, z = quantize_tensor(torch.randn(8, 64), 4, 32)
    torch.library.opcheck(ops.woq_linear, (torch.randn(2, 64), qw, s, z, torch.randn(8), 4, 64, 32))
    qw8, s8, _ = quantize_tensor(torch.randn(8, 64), 8, 64)
    torch.library.opcheck(ops.woq_linear, (torch.randn(9, 64), qw8, s8, None, None, 8, 64, 64))
    torch.library.opcheck(ops.woq_dequantize, (qw, s, z, 4, 64, 32))
    qn, sn, _ = quantize_tensor(torch.randn(8, 128), 4, 128, nf4_codebook())
    torch.library.opcheck(ops.woq_linear, (torch.randn(1, 128).bfloat16(), qn, sn, None, None, 4, 128, 128, False,
                                           nf4_codebook()))
    torch.library.opcheck(ops.woq_dequantize, (qn, sn, None, 4, 128, 128, nf4_codebook()))


_LEVEL_SCRIPT = r"""
import json, torch, torch.nn.functional as F, ipex_lite
from ipex_lite.quantization._woq import quantize_tensor
ops = torch.ops.ipex_lite
torch.manual_seed(0)
res = {"level": ipex_lite.cpu_capability()}
w = torch.randn(37, 200) * 0.1
for bits in (8, 4):
    qw, s, z = quantize_tensor(w, bits, 32 if bits == 4 else 224)
    deq = ops.woq_dequantize(qw, s, z, bits, 200, 32 if bits == 4 else 224).float()
    for m in (1, 4, 6):
        x = torch.randn(m, 200)
        got = ops.woq_linear(x, qw, s, z, None, bits, 200, 32 if bits == 4 else 224)
        want = F.linear(x.double(), deq.double())
        res[f"int{bits}_m{m}"] = float((got.double() - want).abs().max() / want.abs().max())
        if bits == 4:  # lowp INT8 (group 32: bf16 activations at every level) and a 128-group that takes VNNI
            qw128, s128, z128 = quantize_tensor(w[:, :128], 4, 128)
            d128 = ops.woq_dequantize(qw128, s128, z128, 4, 128, 128).double()
            xb = x[:, :128].bfloat16()
            got = ops.woq_linear(xb, qw128, s128, z128, None, 4, 128, 128, True)
            want = F.linear(xb.double(), d128)
            res[f"lowp_m{m}"] = float((got.double() - want).abs().max() / want.abs().max())
            # NF4, group 128 (the vpermw kernel where the level has bf16) and group 32 (fp32 kernel)
            from ipex_lite.quantization._woq import nf4_codebook
            cb = nf4_codebook()
            for gs, kk in ((128, 128), (32, 200)):
                qn, sn, _ = quantize_tensor(w[:, :kk], 4, gs, cb)
                dn = ops.woq_dequantize(qn, sn, None, 4, kk, gs, cb).double()
                for xin in (x[:, :kk], x[:, :kk].bfloat16()):
                    got = ops.woq_linear(xin, qn, sn, None, None, 4, kk, gs, False, cb)
                    want = F.linear(xin.double(), dn)
                    res[f"nf4_g{gs}_{xin.dtype}_m{m}"] = float((got.double() - want).abs().max() / want.abs().max())
print(json.dumps(res))
"""


@pytest.mark.parametrize("level", LEVELS)
def test_every_isa_level(level):
    res = run_at_level(level, _LEVEL_SCRIPT)
    for key, err in res.items():
        if key != "level":
            assert err < (3e-2 if key.startswith("lowp") else 1e-2), (key, err)  # vs the bf16 dequantized weight


# ---------------------------------------------------------------- models
def _tiny_llama(seed=0, hidden=128, inter=352, layers=2, vocab=256):
    from transformers import LlamaConfig, LlamaForCausalLM
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
    torch.manual_seed(seed)
    return LlamaForCausalLM(cfg).eval()


@pytest.mark.parametrize("dtype,group", [("int8", -1), ("int8", 32), ("int4", 32), ("int4", -1)])
def test_llm_optimize_woq_generates_and_explains(dtype, group):
    pytest.importorskip("transformers")
    model = _tiny_llama()
    cfg = q.get_weight_only_quant_qconfig_mapping(
        weight_dtype=q.WoqWeightDtype.INT8 if dtype == "int8" else q.WoqWeightDtype.INT4, group_size=group)
    opt = ipex_lite.llm.optimize(model, dtype=torch.bfloat16, quantization_config=cfg)
    report = ipex_lite.explain(opt)
    assert "weight-only quantized" in report and "rotary attention" in report and "gated SiLU MLP" in report
    assert "lm_head" in report and isinstance(opt.lm_head, nn.Linear)  # excluded by default
    ids = torch.randint(0, 256, (2, 10), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = model.to(torch.bfloat16)(ids).logits
        got = opt(ids).logits
        assert rel(got, want) < (0.1 if dtype == "int8" else 0.5)
        out = opt.generate(ids, max_new_tokens=5, do_sample=False, pad_token_id=0, output_logits=True,
                           return_dict_in_generate=True)
        full = opt(out.sequences[:, :-1]).logits[:, -5:]  # the cache path against a recomputation
        assert rel(torch.stack(out.logits, 1), full) < 3e-2


def test_checkpoint_sizes_and_fresh_process_reload(tmp_path):
    pytest.importorskip("transformers")
    model = _tiny_llama(hidden=256, inter=512)
    linear_bytes = sum(m.weight.numel() * 2 for n, m in model.named_modules()
                       if isinstance(m, nn.Linear) and n != "lm_head")
    ids = torch.randint(0, 256, (1, 12), generator=torch.Generator().manual_seed(2))
    for wd, group, ratio in (("INT8", -1, 1.95), ("INT4", 128, 3.5), ("NF4", 128, 3.7)):
        bits = 8 if wd == "INT8" else 4
        cfg = q.get_weight_only_quant_qconfig_mapping(weight_dtype=q.WoqWeightDtype[wd], group_size=group)
        opt = ipex_lite.llm.optimize(model, dtype=torch.bfloat16, quantization_config=cfg)
        sd = opt.state_dict()
        woq_bytes = sum(t.numel() * t.element_size() for k, t in sd.items()
                        if k.rsplit(".", 1)[-1] in ("qweight", "scales", "qzeros") and not k.startswith("lm_head"))
        assert linear_bytes / woq_bytes > ratio, (bits, linear_bytes / woq_bytes)
        assert ("model.layers.0.mlp.down_proj.codebook" in sd) == (wd == "NF4")  # the checkpoint says what it holds
        path = tmp_path / f"woq_{wd}.pt"
        with torch.no_grad():
            want = opt(ids).logits
        torch.save({"state_dict": sd, "ids": ids, "logits": want}, path)
        script = f"""
import torch, ipex_lite
from ipex_lite import quantization as q
from transformers import LlamaConfig, LlamaForCausalLM
saved = torch.load({str(path)!r})
cfg = LlamaConfig(vocab_size=256, hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
torch.manual_seed(123)  # other random weights: everything must come from the checkpoint
model = LlamaForCausalLM(cfg).eval()
qc = q.get_weight_only_quant_qconfig_mapping(weight_dtype=q.WoqWeightDtype.{wd}, group_size={group})
opt = ipex_lite.llm.optimize(model, dtype=torch.bfloat16, quantization_config=qc, low_precision_checkpoint=saved["state_dict"])
with torch.no_grad():
    got = opt(saved["ids"]).logits
print(float((got.float() - saved["logits"].float()).abs().max()))
"""
        r = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
        assert r.returncode == 0, r.stderr
        assert float(r.stdout.strip().splitlines()[-1]) == 0.0


def _gptq_checkpoint(w: torch.Tensor, group: int, act_order: bool):
    """A GPTQ (AutoGPTQ) layout built from its documentation: qweight int32 (k/8, n), 8 inputs per word,
    lowest nibble first; qzeros int32 (groups, n/8) holding zero - 1; scales fp16 (groups, n); g_idx (k,)."""
    n, k = w.shape
    groups = k // group
    g_idx = torch.arange(k) // group
    if act_order:  # inputs assigned to groups in a permuted order
        g_idx = g_idx[torch.randperm(k, generator=torch.Generator().manual_seed(0))]
    qv = torch.zeros(n, k, dtype=torch.int32)
    scales = torch.zeros(groups, n)
    zeros = torch.zeros(groups, n, dtype=torch.int32)
    for gi in range(groups):
        cols = (g_idx == gi).nonzero().flatten()
        wg = w[:, cols]
        lo, hi = wg.amin(1).clamp(max=0), wg.amax(1).clamp(min=0)
        s = ((hi - lo) / 15).clamp_min(1e-8).half().float()
        z = torch.round(-lo / s).clamp(1, 15).int()
        scales[gi], zeros[gi] = s, z
        qv[:, cols] = (torch.round(wg / s[:, None]) + z[:, None]).clamp(0, 15).int()
    shifts = torch.arange(0, 32, 4, dtype=torch.int32)
    qweight = (qv.t().reshape(k // 8, 8, n) << shifts.view(1, 8, 1)).sum(1, dtype=torch.int32)
    qzeros = ((zeros - 1).reshape(groups, n // 8, 8) << shifts.view(1, 1, 8)).sum(2, dtype=torch.int32)
    deq = (qv.float() - zeros.t()[:, g_idx].float()) * scales.t()[:, g_idx]
    return {"qweight": qweight, "qzeros": qzeros, "scales": scales.half(), "g_idx": g_idx.int()}, deq


@pytest.mark.parametrize("act_order", [False, True])
def test_gptq_checkpoint_layout(act_order):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(128, 64), nn.ReLU(), nn.Linear(64, 32))
    ckpt, deqs = {}, {}
    for name in ("0", "2"):
        layer = model.get_submodule(name)
        parts, deq = _gptq_checkpoint(layer.weight.detach(), 32, act_order)
        ckpt.update({f"{name}.{k}": v for k, v in parts.items()})
        ckpt[f"{name}.bias"] = layer.bias.detach().half()
        deqs[name] = deq
    opt = ipex_lite.llm.optimize(model, dtype=torch.float32, low_precision_checkpoint=ckpt)
    assert isinstance(opt[0], q.WoqLinear) and (opt[0].perm is not None) == act_order
    x = torch.randn(3, 128)
    ref = nn.Sequential(nn.Linear(128, 64), nn.ReLU(), nn.Linear(64, 32))
    with torch.no_grad():
        for name in ("0", "2"):
            ref.get_submodule(name).weight.copy_(deqs[name])
            ref.get_submodule(name).bias.copy_(ckpt[f"{name}.bias"].float())
        assert rel(opt(x), ref(x)) < 1e-5
        assert rel(opt[0].dequantize().float(), deqs["0"]) < 2 ** -8
    bad = dict(ckpt)
    bad["2.scales"] = bad["2.scales"][:1]
    fresh = nn.Sequential(nn.Linear(128, 64), nn.ReLU(), nn.Linear(64, 32))
    with pytest.raises(ValueError, match="2: GPTQ tensors"):
        ipex_lite.llm.optimize(fresh, low_precision_checkpoint=bad, inplace=True)
    assert isinstance(fresh[0], nn.Linear)  # nothing was replaced


def test_prepare_convert_any_model_and_bad_config():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 96), nn.GELU(), nn.Linear(96, 10)).eval()
    x = torch.randn(5, 64)
    for wd, group in ((q.WoqWeightDtype.INT8, -1), (q.WoqWeightDtype.INT4, 32), (q.WoqWeightDtype.NF4, 32)):
        cfg = q.get_weight_only_quant_qconfig_mapping(weight_dtype=wd, group_size=group, exclude=())
        qm = q.convert(q.prepare(model, cfg))
        assert all(isinstance(qm[i], q.WoqLinear) for i in (0, 2))
        with torch.no_grad():
            assert rel(qm(x), model(x)) < (2e-2 if wd == q.WoqWeightDtype.INT8 else 0.15)
        assert "weight-only quantized" in ipex_lite.explain(qm)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match="group_size 64 does not divide the input features of '2' \\(96"):
        q.prepare(model, q.get_weight_only_quant_qconfig_mapping(group_size=64, exclude=()), inplace=True)
    with pytest.raises(ValueError, match="does not divide the input features"):
        ipex_lite.llm.optimize(model, quantization_config=q.get_weight_only_quant_qconfig_mapping(
            group_size=64, exclude=()), inplace=True)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert isinstance(model[0], nn.Linear) and model[0].weight.dtype == torch.float32  # unchanged
    with pytest.raises(NotImplementedError, match="FP16"):
        q.get_weight_only_quant_qconfig_mapping(lowp_mode=q.WoqLowpMode.FP16)
    with pytest.raises(ValueError, match="multiple of 32"):
        q.get_weight_only_quant_qconfig_mapping(group_size=48)
    with pytest.raises(TypeError, match="quantization_config must come from"):
        ipex_lite.llm.optimize(model, quantization_config=q.default_static_qconfig_mapping)


def test_hf_conv1d_layers_quantize():
    transformers = pytest.importorskip("transformers")
    cfg = transformers.GPT2Config(vocab_size=256, n_embd=128, n_layer=2, n_head=4, n_positions=128)
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(cfg).eval()
    qc = q.get_weight_only_quant_qconfig_mapping(weight_dtype=q.WoqWeightDtype.INT8)
    opt = ipex_lite.llm.optimize(model, dtype=torch.float32, quantization_config=qc)
    assert isinstance(opt.transformer.h[0].attn.c_attn, q.WoqLinear)
    ids = torch.randint(0, 256, (1, 9))
    with torch.no_grad():
        assert rel(opt(ids).logits, model(ids).logits) < 3e-2


# ---------------------------------------------------------------- perplexity on real text
def _stdlib_text(limit: int = 400_000) -> bytes:
    """Python's own standard library sources: real text that ships with every interpreter."""
    root = os.path.dirname(os.__file__)
    out = bytearray()
    for path in sorted(glob.glob(os.path.join(root, "*.py"))):
        with open(path, "rb") as f:
            out += f.read()
        if len(out) >= limit:
            break
    return bytes(out[:limit])


def _perplexity(model, data: torch.Tensor, seq: int = 128) -> float:
    n = (data.numel() - 1) // seq
    x = data[: n * seq].view(n, seq)
    y = data[1: n * seq + 1].view(n, seq)
    with torch.no_grad():
        logits = torch.cat([model(x[i:i + 8]).logits.float() for i in range(0, n, 8)])
    return math.exp(F.cross_entropy(logits.view(-1, logits.shape[-1]), y.reshape(-1)).item())


def _perplexity_decode(model, data: torch.Tensor, seq: int = 96, batch: int = 8) -> float:
    """Teacher-forced decoding one token at a time through the KV cache: 8 rows per call, the GEMV path
    (where lowp INT8 applies), not the prefill GEMM."""
    x = data[: batch * (seq + 1)].view(batch, seq + 1)
    losses, past = [], None
    with torch.no_grad():
        for t in range(seq):
            out = model(x[:, t:t + 1], past_key_values=past, use_cache=True)
            past = out.past_key_values
            losses.append(F.cross_entropy(out.logits[:, -1].float(), x[:, t + 1]))
    return math.exp(torch.stack(losses).mean().item())


@pytest.fixture(scope="module")
def trained_llama():
    pytest.importorskip("transformers")
    text = torch.tensor(list(_stdlib_text()), dtype=torch.long)
    split = int(text.numel() * 0.9)
    train, held_out = text[:split], text[split:]
    torch.manual_seed(0)
    model = _tiny_llama(hidden=128, inter=384, layers=2).train()  # inputs of 128 and 384: whole groups of 128
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.01)
    seq, batch = 64, 16
    g = torch.Generator().manual_seed(0)
    for step in range(200):
        starts = torch.randint(0, train.numel() - seq - 1, (batch,), generator=g)
        x = torch.stack([train[s:s + seq] for s in starts])
        y = torch.stack([train[s + 1:s + seq + 1] for s in starts])
        loss = F.cross_entropy(model(x).logits.view(-1, 256), y.view(-1))
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval(), held_out[:8192]


def test_perplexity_of_woq_on_real_text(trained_llama):
    model, held_out = trained_llama
    bf16 = ipex_lite.llm.optimize(model, dtype=torch.bfloat16)
    ppl = {"bf16": _perplexity(bf16, held_out)}
    assert ppl["bf16"] < 16, ppl  # it learned something (uniform bytes: 256)
    for name, wd, group in (("int8", q.WoqWeightDtype.INT8, -1), ("int4_g128", q.WoqWeightDtype.INT4, 128),
                            ("nf4_g128", q.WoqWeightDtype.NF4, 128)):
        cfg = q.get_weight_only_quant_qconfig_mapping(weight_dtype=wd, group_size=group)
        ppl[name] = _perplexity(ipex_lite.llm.optimize(model, dtype=torch.bfloat16, quantization_config=cfg),
                                held_out)
    # decoding (the GEMV kernels, where lowp INT8 quantizes the activations)
    for name, wd, lowp in (("bf16", None, None), ("int4_g128", q.WoqWeightDtype.INT4, q.WoqLowpMode.NONE),
                           ("int4_g128_lowp_int8", q.WoqWeightDtype.INT4, q.WoqLowpMode.INT8),
                           ("nf4_g128", q.WoqWeightDtype.NF4, q.WoqLowpMode.NONE)):
        cfg = None if wd is None else q.get_weight_only_quant_qconfig_mapping(weight_dtype=wd, group_size=128,
                                                                              lowp_mode=lowp)
        ppl["decode_" + name] = _perplexity_decode(
            ipex_lite.llm.optimize(model, dtype=torch.bfloat16, quantization_config=cfg), held_out)
    print(json.dumps(ppl))
    assert ppl["decode_int4_g128"] <= ppl["decode_bf16"] * 1.05, ppl
    assert ppl["decode_int4_g128_lowp_int8"] <= ppl["decode_bf16"] * 1.05, ppl
    assert ppl["int8"] <= ppl["bf16"] * 1.01, ppl
    assert ppl["int4_g128"] <= ppl["bf16"] * 1.05, ppl
    assert ppl["nf4_g128"] <= ppl["bf16"] * 1.05 and ppl["decode_nf4_g128"] <= ppl["decode_bf16"] * 1.05, ppl


def test_checkpoint_group_size_checked_before_anything_changes():
    # the checkpoint's scales give a group of 16 inputs: refused by WoqLinear's group check, naming the layer
    model = nn.Sequential(nn.Linear(128, 64), nn.ReLU(), nn.Linear(64, 32)).eval()
    sd = q.convert(q.prepare(model, q.get_weight_only_quant_qconfig_mapping(group_size=32, exclude=()))).state_dict()
    bad = dict(sd)
    bad["2.scales"] = torch.ones(32, 4)  # 64 inputs / 4 groups = 16
    fresh = nn.Sequential(nn.Linear(128, 64), nn.ReLU(), nn.Linear(64, 32))
    with pytest.raises(ValueError, match="'2': group size 16 is not -1 or a positive multiple of 32"):
        ipex_lite.llm.optimize(fresh, low_precision_checkpoint=bad, inplace=True)
    assert isinstance(fresh[0], nn.Linear) and isinstance(fresh[2], nn.Linear)
    with pytest.raises(ValueError, match="group size 48"):
        q.WoqLinear(128, 8, 8, group_size=48, name="proj")
