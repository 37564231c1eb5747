"""optimize() on models people run, built from configs with random weights (no downloads):
torchvision CNNs and ViT, Hugging Face BERT / DistilBERT / GPT-2 / Llama.  fp32 within 1e-5 of
stock (relative to the output's scale), bf16 within 5e-2, and explain() accounting for every
compute layer: packed, or left alone with a reason."""
import warnings

import pytest
import torch
from torch import nn
from torch.profiler import profile

import ipex_lite
from ipex_lite import quantization
from ipex_lite._inference import _compute_kind
from ipex_lite.nn.prepacked import _Packed


def _realistic(model: nn.Module) -> nn.Module:
    """Random BatchNorm statistics and affine terms (fresh ones are the identity) and a non-zero head."""
    g = torch.Generator().manual_seed(0)
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.running_mean.copy_(torch.rand(m.num_features, generator=g) * 0.4 - 0.2)
            m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
            m.weight.data.copy_(torch.rand(m.num_features, generator=g) + 0.5)
            m.bias.data.copy_(torch.rand(m.num_features, generator=g) * 0.4 - 0.2)
    for m in model.modules():
        if isinstance(m, nn.Linear) and not m.weight.abs().sum():
            nn.init.normal_(m.weight, std=0.05)
    return model.eval()


def _rel_err(got, want) -> float:
    return ((got.float() - want.float()).abs().max() / want.float().abs().max()).item()


def _check_explained(model: nn.Module, opt: nn.Module) -> str:
    """Every compute layer of the original model is either packed or named in explain()."""
    text = ipex_lite.explain(opt)
    mentioned = {line.split()[0] for line in text.splitlines()[1:]}
    # packed, or replaced by one of ipex_lite's modules (attention)
    packed = {name for name, m in opt.named_modules() if isinstance(m, _Packed)
              or type(m).__module__.startswith("ipex_lite.nn")}
    for name, m in model.named_modules():
        if _compute_kind(m) is not None:
            assert name in packed or name in mentioned, f"{name} ({type(m).__name__}) is not accounted for:\n{text}"
    return text


# ---------------------------------------------------------------- torchvision

def _tv():
    return pytest.importorskip("torchvision", reason="torchvision is not installed beside this torch")


def _vision_models():
    tv = _tv()
    from torchvision.models.vision_transformer import VisionTransformer
    return {
        "resnet18": lambda: tv.models.resnet18(num_classes=10),
        "mobilenet_v3_small": lambda: tv.models.mobilenet_v3_small(num_classes=10),
        "efficientnet_b0": lambda: tv.models.efficientnet_b0(num_classes=10),
        "convnext_tiny": lambda: tv.models.convnext_tiny(num_classes=10),
        "vit": lambda: VisionTransformer(image_size=32, patch_size=8, num_layers=2, num_heads=2, hidden_dim=32,
                                         mlp_dim=64, num_classes=10),
    }


@pytest.mark.parametrize("name", ["resnet18", "mobilenet_v3_small", "efficientnet_b0", "convnext_tiny", "vit"])
def test_torchvision_models_fp32_bf16_and_explained(name):
    torch.manual_seed(0)
    model = _realistic(_vision_models()[name]())
    x = torch.randn(2, 3, 32, 32) if name == "vit" else torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        want = model(x)
        opt = ipex_lite.optimize(model)
        assert _rel_err(opt(x), want) < 1e-5
        assert _rel_err(torch.jit.freeze(torch.jit.trace(opt, x))(x), want) < 1e-5
        assert _rel_err(ipex_lite.optimize(model, dtype=torch.bfloat16)(x), want) < 5e-2
    text = _check_explained(model, opt)
    assert sum(isinstance(m, _Packed) for m in opt.modules()) > 0
    assert set(opt.state_dict()) == set(model.state_dict())
    if name == "vit":  # the encoder blocks' nn.MultiheadAttention: packed projections + attention kernel
        assert text.count("MultiheadAttention -> packed QKV/out projections") == 2
        assert "left alone" not in text


# ---------------------------------------------------------------- Hugging Face transformers

def _hf():
    return pytest.importorskip("transformers", reason="transformers is not installed")


def _hf_models():
    T = _hf()
    small = dict(vocab_size=100, bos_token_id=0, eos_token_id=0, pad_token_id=0)
    return {
        "bert": lambda: T.BertModel(T.BertConfig(num_hidden_layers=2, hidden_size=64, num_attention_heads=4,
                                                 intermediate_size=128, **small)),
        "distilbert": lambda: T.DistilBertModel(T.DistilBertConfig(n_layers=2, dim=64, n_heads=4, hidden_dim=128,
                                                                   vocab_size=100, pad_token_id=0)),
        "gpt2": lambda: T.GPT2Model(T.GPT2Config(n_layer=2, n_embd=64, n_head=4, **small)),
        "llama": lambda: T.LlamaModel(T.LlamaConfig(num_hidden_layers=2, hidden_size=64, num_attention_heads=4,
                                                    num_key_value_heads=2, intermediate_size=128, **small)),
    }


def _transformers_major() -> int:
    import transformers
    return int(transformers.__version__.split(".")[0])


@pytest.mark.parametrize("name", ["bert", "distilbert", "gpt2", "llama"])
def test_hugging_face_models_reach_the_attention_kernel(name):
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = _hf_models()[name]().eval()
    ids = torch.randint(1, 100, (2, 12))
    mask = torch.ones(2, 12, dtype=torch.long)
    mask[1, 7:] = 0  # a padded row
    before = model.config._attn_implementation
    opt = ipex_lite.optimize(model)
    assert model.config._attn_implementation == before  # the caller's model is untouched
    text = _check_explained(model, opt)
    switched = opt.config._attn_implementation == "ipex_lite"
    assert switched or "kept" in text
    # transformers 5.x routes all four through its AttentionInterface but DistilBERT; 4.x only the models
    # marked _supports_attention_backend (Llama), and the report says "kept" for the others
    if switched or (name != "distilbert" and _transformers_major() >= 5):
        assert "attention -> ipex_lite kernel" in text
    with torch.no_grad():
        for m in (None, mask):
            want = model(ids, attention_mask=m).last_hidden_state
            got = opt(ids, attention_mask=m).last_hidden_state
            if m is not None:  # padded positions' outputs are not compared (no defined value)
                want, got = want[mask.bool()], got[mask.bool()]
            assert _rel_err(got, want) < 1e-5, m
        with profile() as prof:
            opt(ids, attention_mask=mask)
        bf16 = ipex_lite.optimize(model, dtype=torch.bfloat16)(ids).last_hidden_state
        assert _rel_err(bf16, model(ids).last_hidden_state) < 5e-2
    if switched:
        assert any(e.key in ("ipex_lite::scaled_dot_product_attention", "ipex_lite::decode_attention")  # short: decode
                   for e in prof.key_averages())


def test_hugging_face_model_inside_a_user_module_is_switched_too():
    from bench.zoo import _FirstOutput  # a plain nn.Module around the transformers model
    model = _FirstOutput(_hf_models()["llama"]()).eval()
    opt = ipex_lite.optimize(model)
    assert opt.model.config._attn_implementation == "ipex_lite"
    assert any(line.split()[0] == "model" and "ipex_lite kernel" in line
               for line in ipex_lite.explain(opt).splitlines()[1:])
    ids = torch.randint(1, 100, (2, 9))
    with torch.no_grad():
        assert _rel_err(opt(ids), model(ids)) < 1e-5


def test_hugging_face_output_attentions_falls_back_to_torch():
    model = _hf_models()["bert"]().eval()
    opt = ipex_lite.optimize(model)
    ids = torch.randint(1, 100, (1, 8))
    with torch.no_grad():
        want = model(ids).last_hidden_state
        got = opt(ids, output_attentions=True).last_hidden_state
    assert _rel_err(got, want) < 1e-5


# ---------------------------------------------------------------- torch.nn's own transformer

def test_nn_transformer_encoder_every_layer_replaced_in_fp32_bf16_and_int8():
    torch.manual_seed(0)
    enc = nn.TransformerEncoder(nn.TransformerEncoderLayer(64, 4, 128, batch_first=True), 2).eval()
    x = torch.randn(2, 10, 64)
    pad = torch.zeros(2, 10, dtype=torch.bool)
    pad[1, 6:] = True
    float_mask = torch.zeros(10, 10).masked_fill(torch.ones(10, 10).triu(1).bool(), float("-inf"))
    with torch.no_grad():
        want = enc(x, src_key_padding_mask=pad)
        for dtype, tol in ((torch.float32, 1e-5), (torch.bfloat16, 5e-2)):
            opt = ipex_lite.optimize(enc, dtype=dtype)
            _check_explained(enc, opt)
            assert _rel_err(opt(x, src_key_padding_mask=pad), want) < tol
            assert _rel_err(opt(x, mask=float_mask), enc(x, mask=float_mask)) < tol
    prepared = quantization.prepare(enc, quantization.default_static_qconfig_mapping, example_inputs=x)
    with torch.no_grad():
        prepared(x)
        int8 = quantization.convert(prepared)
        assert _rel_err(int8(x), enc(x)) < 3e-2
