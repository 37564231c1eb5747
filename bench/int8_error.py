"""Where int8 error comes from on a zoo model: the error floor of 8-bit weights and activations.

    python bench/int8_error.py [--model llama,gpt2,...]

For each model (bench/zoo.py's configurations and inputs) it prints the output error against stock fp32
(largest |diff| over the largest |fp32| output, and the RMS ratio) of:
  - fake quantization of every Linear in plain torch: int8 per-channel weights with fp32 activations (the
    floor any 8-bit-weight recipe starts from), plus per-token or per-tensor uint8 activations;
  - ipex_lite's int8 models: static (calibrated per-tensor) and per-token dynamic;
and the per-layer error of the static model's Linears (relative RMS of one layer's output on the fp32
model's own input to it), worst first.  Accuracy only: no timing.
"""
import argparse
import os
import sys

import torch
from torch import nn

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from bench.zoo import MODELS, _int8  # noqa: E402

from ipex_lite import quantization  # noqa: E402


def _errors(got, want):
    got, want = got.float(), want.float()
    return ((got - want).abs().max() / want.abs().max()).item(), \
        ((got - want).pow(2).mean().sqrt() / want.pow(2).mean().sqrt()).item()


def _weight_int8(w):
    scale = (w.abs().amax(1, keepdim=True) / 127).clamp_min(1e-12)
    return torch.round(w / scale).clamp(-127, 127) * scale


def _per_token(a):
    scale = (a.abs().amax(-1, keepdim=True) / 127).clamp_min(1e-12)
    return torch.round(a / scale).clamp(-127, 127) * scale


def _per_tensor(a):
    lo, hi = min(a.min().item(), 0.0), max(a.max().item(), 0.0)
    scale = max((hi - lo) / 255, 1e-12)
    zp = round(-lo / scale)
    return ((torch.round(a / scale) + zp).clamp(0, 255) - zp) * scale


def _fake_quantized(model, x, activation):
    """The model's output with every nn.Linear's weight rounded to int8 and its input through ``activation``."""
    saved, hooks = [], []
    for m in model.modules():
        if isinstance(m, nn.Linear):
            saved.append((m, m.weight.data))
            m.weight.data = _weight_int8(m.weight.data)
            hooks.append(m.register_forward_pre_hook(lambda mod, args: (activation(args[0]),) + args[1:]))
    try:
        with torch.no_grad():
            return model(x)
    finally:
        for h in hooks:
            h.remove()
        for m, w in saved:
            m.weight.data = w


def _per_layer(model, x, int8):
    """Relative RMS error of each int8 Linear on the fp32 model's input to that layer."""
    prepared = quantization.prepare(model, quantization.default_static_qconfig_mapping, example_inputs=(x,))
    for h in prepared._hooks:
        h.remove()
    seen, hooks = {}, []
    for name in prepared.observers:
        layer = prepared.model.get_submodule(name)
        hooks.append(layer.register_forward_hook(lambda m, a, out, name=name: seen.__setitem__(name, (a, out))))
    with torch.no_grad():
        prepared.model(x)
    for h in hooks:
        h.remove()
    rows = []
    for name, (args, out) in seen.items():
        q = int8.get_submodule(name)
        if not isinstance(q, quantization.QuantizedLinear):
            continue
        with torch.no_grad():
            got = q(*args)
        rows.append((_errors(got, out)[1], name, (args[0].abs().max() / args[0].pow(2).mean().sqrt()).item()))
    return sorted(rows, reverse=True)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="llama", help=f"comma-separated, of {', '.join(MODELS)}")
    parser.add_argument("--layers", type=int, default=8, help="worst layers to list per model")
    args = parser.parse_args(argv)
    for name in args.model.split(","):
        ctor, make_input = MODELS[name]
        torch.manual_seed(0)
        model = ctor().eval()
        x = make_input()
        with torch.no_grad():
            want = model(x)
        print(f"## {name}: output error vs stock fp32 (max-abs relative, RMS relative)")
        for label, act in (("int8 weights, fp32 activations", lambda a: a),
                           ("int8 weights, per-token int8 activations", _per_token),
                           ("int8 weights, per-tensor uint8 activations", _per_tensor)):
            print(f"  fake quant: {label:45s} {_errors(_fake_quantized(model, x, act), want)}")
        static = _int8(model, x)
        token = _int8(model, x, quantization.per_token_dynamic_qconfig_mapping)
        with torch.no_grad():
            print(f"  ipex_lite int8 static (per-tensor, calibrated)        {_errors(static(x), want)}")
            print(f"  ipex_lite int8 per-token dynamic                      {_errors(token(x), want)}")
        print(f"  worst static int8 Linears (relative RMS of the layer's output; input max/RMS):")
        for err, layer, peak in _per_layer(model, x, static)[:args.layers]:
            print(f"    {layer:45s} {err:.4f}   {peak:.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
