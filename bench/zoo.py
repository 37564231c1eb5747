"""The models people run: torchvision, timm, Hugging Face transformers and torch.nn's own
transformer, built from configs with random weights (realistic BatchNorm statistics), at
realistic sizes: batch 8 of 224² images, 4-layer base-size transformers at 8 x 128.

    python bench/zoo.py [--model resnet50,bert,...] [--no-compile] [--quick] [--json]

Systems, interleaved in one process: stock fp32 eager, torch.compile (inductor, freezing), ipex_lite
fp32 eager and traced + frozen, stock bf16 autocast, ipex_lite bf16, ipex_lite int8 (static,
calibrated on 3 batches; for token models also per-token dynamic), ipex_lite's traced + frozen bf16 and
int8 graphs, and IPEX where it imports.  Every output is checked against stock fp32
before timing; the table carries each system's error and the explain() summary of the fp32 model.
"""
import argparse
import os
import sys
import warnings

import torch
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from bench.harness import (Report, add_common_args, add_model_args, import_ipex, measure,  # noqa: E402
                           selected_models, setup_from_args)
from bench.models import _compiled, _trained_looking_bn  # noqa: E402

import ipex_lite  # noqa: E402
from ipex_lite import quantization  # noqa: E402
from ipex_lite.nn.prepacked import _Packed  # noqa: E402


class _FirstOutput(nn.Module):
    """A Hugging Face model as tensor -> tensor (what torch.jit.trace takes)."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, ids):
        return self.model(ids, use_cache=False, return_dict=False)[0]


def _images():
    return torch.randn(8, 3, 224, 224)


def _tokens(batch=8, seq=128, vocab=30000):
    return torch.randint(1, vocab, (batch, seq))


def _realistic(model):
    """BatchNorm statistics as after training, and no all-zero Linear (torchvision's ViT head starts at 0)."""
    for m in model.modules():
        if isinstance(m, nn.Linear) and not m.weight.abs().sum():
            nn.init.normal_(m.weight, std=0.02)
    return _trained_looking_bn(model)


def _tv(name):
    import torchvision
    return lambda: _realistic(getattr(torchvision.models, name)())


def _timm(name):
    import timm
    return lambda: _realistic(timm.create_model(name, pretrained=False))


def _hf(kind):
    import transformers as T
    base = dict(vocab_size=30000, bos_token_id=0, eos_token_id=0, pad_token_id=0)
    configs = {
        "bert": lambda: T.BertModel(T.BertConfig(num_hidden_layers=4, **base)),
        "distilbert": lambda: T.DistilBertModel(T.DistilBertConfig(n_layers=4, vocab_size=30000, pad_token_id=0)),
        "gpt2": lambda: T.GPT2Model(T.GPT2Config(n_layer=4, **base)),
        "llama": lambda: T.LlamaModel(T.LlamaConfig(num_hidden_layers=4, hidden_size=1024, num_attention_heads=16,
                                                    num_key_value_heads=4, intermediate_size=2816, **base)),
    }
    return lambda: _FirstOutput(configs[kind]())


def _encoder():
    layer = nn.TransformerEncoderLayer(768, 12, 3072, batch_first=True)
    return nn.TransformerEncoder(layer, 4, enable_nested_tensor=False)


# name -> (constructor, input)
MODELS = {
    "resnet50": (_tv("resnet50"), _images),
    "mobilenet_v3_large": (_tv("mobilenet_v3_large"), _images),
    "convnext_tiny": (_tv("convnext_tiny"), _images),
    "vit_b_16": (_tv("vit_b_16"), _images),
    "cspdarknet53": (_timm("cspdarknet53"), _images),
    "bert": (_hf("bert"), _tokens),
    "distilbert": (_hf("distilbert"), _tokens),
    "gpt2": (_hf("gpt2"), _tokens),
    "llama": (_hf("llama"), lambda: _tokens(4)),
    "nn.TransformerEncoder": (_encoder, lambda: torch.randn(8, 128, 768)),
}


def _int8(model, x, mapping=quantization.default_static_qconfig_mapping):
    prepared = quantization.prepare(model, mapping, example_inputs=(x,))
    with torch.no_grad():
        for i in range(3):
            prepared(x if not x.is_floating_point() else x + 0.05 * i * torch.randn_like(x))
    return quantization.convert(prepared)


def _summary(opt) -> str:
    lines = ipex_lite.explain(opt).splitlines()[1:]
    packed = sum(isinstance(m, _Packed) for m in opt.modules())
    swapped = sum(" replaced: " in line and ("Attention ->" in line or "Layer ->" in line) for line in lines)
    alone = sum(" left alone:" in line for line in lines)
    attention = swapped or any(" attention:" in line and "ipex_lite kernel" in line for line in lines)
    return (f"{packed} packed" + (f" + {swapped} attention/transformer modules" if swapped else "")
            + f", {alone} left alone" + (", attention kernel" if attention else ""))


def bench_model(name, args, report, ipex):
    ctor, make_input = MODELS[name]
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = ctor().eval()
        x = make_input()
        fp32 = ipex_lite.optimize(model, sample_input=x)
        bf16 = ipex_lite.optimize(model, dtype=torch.bfloat16, sample_input=x)
        int8 = _int8(model, x)
        # token models: also the per-token dynamic recipe (LLM-style activations)
        int8_token = None if x.dim() == 4 else _int8(model, x, quantization.per_token_dynamic_qconfig_mapping)
        with torch.no_grad():
            fp32_jit = torch.jit.freeze(torch.jit.trace(fp32, x, check_trace=False))
            fp32_jit(x)
        # ipex_lite's graph forms: traced + frozen bf16 and int8 artifacts (packed / int8 graph ops)
        graphs = {}
        for label, opt in (("ipex_lite bf16 jit", bf16), ("ipex_lite int8 jit", int8)):
            try:
                with torch.no_grad():
                    graphs[label] = torch.jit.freeze(torch.jit.trace(opt, x, check_trace=False))
                    graphs[label](x)
            except Exception as e:  # noqa: BLE001 - a model that does not trace loses that row only
                print(f"zoo: {name}: {label} skipped: {type(e).__name__}: {str(e).splitlines()[0][:120]}",
                      file=sys.stderr)

    def autocast():
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return model(x)
    systems = {"stock fp32": lambda: model(x), "stock bf16 autocast": autocast,
               "ipex_lite fp32": lambda: fp32(x), "ipex_lite fp32 jit": lambda: fp32_jit(x),
               "ipex_lite bf16": lambda: bf16(x), "ipex_lite int8": lambda: int8(x)}
    if int8_token is not None:
        systems["ipex_lite int8 per-token"] = lambda: int8_token(x)
    for label, graph in graphs.items():
        systems[label] = lambda graph=graph: graph(x)
    if args.compile:
        compiled = _compiled(model, x)
        systems["torch.compile fp32 (freezing)"] = lambda: compiled(x)
    if ipex is not None:
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ip = ipex.optimize(model, dtype=torch.bfloat16)
            ip_jit = torch.jit.freeze(torch.jit.trace(ip, x, check_trace=False))
        systems["IPEX bf16 jit"] = lambda: ip_jit(x)
    extra = {}
    with torch.no_grad():
        want = model(x).float()
        for label, fn in systems.items():
            err = ((fn().float() - want).abs().max() / want.abs().max()).item()
            extra[label] = {"err": f"{err:.1e}"}
        res = measure(systems, repeat=args.repeat, warmup=args.warmup, inner=1)
    ac = res["stock bf16 autocast"]["median_ms"]
    for s, r in res.items():
        if "bf16" in s or "int8" in s:
            extra[s]["vs autocast"] = f"{ac / r['median_ms']:.2f}x"
    extra["ipex_lite fp32"]["explain"] = _summary(fp32)
    report.add(name, res, extra)


def main(argv=None):
    parser = add_common_args(argparse.ArgumentParser(description=__doc__,
                                                     formatter_class=argparse.RawDescriptionHelpFormatter))
    args = add_model_args(parser, MODELS).parse_args(argv)
    setup_from_args(args)
    names = selected_models(parser, args, MODELS)
    ipex = import_ipex()
    failed = False
    report = Report("model zoo inference (no_grad)", reference="stock fp32")
    for name in names:
        try:
            bench_model(name, args, report, ipex)
        except ImportError as e:  # torchvision / timm / transformers absent beside this torch
            print(f"zoo: {name} skipped: {e}", file=sys.stderr)
        except Exception as e:  # noqa: BLE001 - one model's failure is reported, the others still run
            print(f"zoo: {name} FAILED: {type(e).__name__}: {e}", file=sys.stderr)
            failed = True
    report.emit(args.json, ["images: batch 8 x 3 x 224 x 224; transformers: 4 layers, base size, batch 8 x 128 "
                            "(llama: 1024 hidden, 16 heads / 4 KV heads, batch 4 x 128)",
                            "err: largest |system - stock fp32| over the largest |stock fp32| output",
                            "vs autocast: stock bf16 autocast median / system median"])
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
