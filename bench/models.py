"""Whole-model inference: stock eager vs stock bf16 autocast vs torch.compile
(inductor, freezing) vs ipex_lite.optimize, on ResNet-50 (batch 8, 224²) and
a 4-layer BERT-base encoder (batch 8 x 128), fp32 and bf16, in one run.

    python bench/models.py [--model resnet50,bert] [--no-compile] [--quick] [--json]

Ratios are against stock eager fp32; the "vs autocast" column compares the
bf16 systems with stock bf16 autocast, measured in the same rounds.
"""
import argparse
import copy
import os
import sys

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from bench.harness import (Report, add_common_args, add_model_args, import_ipex, measure,  # noqa: E402
                           selected_models, setup_from_args)

import ipex_lite  # noqa: E402


class Bottleneck(nn.Module):
    def __init__(self, inplanes, planes, stride=1, downsample=None):
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, planes * 4, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes * 4)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    def forward(self, x):
        identity = x
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        if self.downsample is not None:
            identity = self.downsample(x)
        out += identity
        return self.relu(out)


class ResNet50(nn.Module):
    """torchvision's resnet50 layout (same module names), written out: torchvision is not a dependency."""

    def __init__(self, layers=(3, 4, 6, 3), num_classes=1000):
        super().__init__()
        self.inplanes = 64
        self.conv1 = nn.Conv2d(3, 64, 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        self.layer1 = self._make(64, layers[0])
        self.layer2 = self._make(128, layers[1], 2)
        self.layer3 = self._make(256, layers[2], 2)
        self.layer4 = self._make(512, layers[3], 2)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(2048, num_classes)

    def _make(self, planes, blocks, stride=1):
        down = None
        if stride != 1 or self.inplanes != planes * 4:
            down = nn.Sequential(nn.Conv2d(self.inplanes, planes * 4, 1, stride, bias=False),
                                 nn.BatchNorm2d(planes * 4))
        layers = [Bottleneck(self.inplanes, planes, stride, down)]
        self.inplanes = planes * 4
        layers += [Bottleneck(self.inplanes, planes) for _ in range(1, blocks)]
        return nn.Sequential(*layers)

    def forward(self, x):
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(torch.flatten(self.avgpool(x), 1))


class BertLayer(nn.Module):
    """A Hugging Face-style BERT layer: separate Q/K/V Linears, SDPA, post-LayerNorm residuals."""

    def __init__(self, hidden=768, heads=12, inter=3072, eps=1e-12):
        super().__init__()
        self.heads = heads
        self.query, self.key, self.value = nn.Linear(hidden, hidden), nn.Linear(hidden, hidden), nn.Linear(hidden,
                                                                                                            hidden)
        self.attn_out, self.attn_norm = nn.Linear(hidden, hidden), nn.LayerNorm(hidden, eps=eps)
        self.intermediate, self.act = nn.Linear(hidden, inter), nn.GELU()
        self.output, self.out_norm = nn.Linear(inter, hidden), nn.LayerNorm(hidden, eps=eps)
        self.dropout = nn.Dropout(0.1)

    def forward(self, x):
        b, s, h = x.shape

        def heads(t):
            return t.view(b, s, self.heads, h // self.heads).transpose(1, 2)
        ctx = F.scaled_dot_product_attention(heads(self.query(x)), heads(self.key(x)), heads(self.value(x)))
        x = self.attn_norm(self.dropout(self.attn_out(ctx.transpose(1, 2).reshape(b, s, h))) + x)
        return self.out_norm(self.dropout(self.output(self.act(self.intermediate(x)))) + x)


class BertEncoder(nn.Module):
    def __init__(self, layers=4):
        super().__init__()
        self.layer = nn.ModuleList([BertLayer() for _ in range(layers)])

    def forward(self, x):
        for layer in self.layer:
            x = layer(x)
        return x


def _trained_looking_bn(model):
    g = torch.Generator().manual_seed(0)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.1)
            m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
    return model


MODELS = {
    "resnet50": (lambda: _trained_looking_bn(ResNet50()), lambda: torch.randn(8, 3, 224, 224)),
    "bert": (BertEncoder, lambda: torch.randn(8, 128, 768)),
}


def _compiled(model, x):
    import torch._inductor.config as cfg
    cfg.freezing = True
    fn = torch.compile(copy.deepcopy(model))
    with torch.no_grad():
        fn(x)  # compile outside the timed rounds
    return fn


def _ipex_systems(model, x):
    """IPEX 2.8 when it imports: optimize() eager, and traced + frozen as its docs advise for
    inference; bf16 under autocast.  A variant IPEX cannot build is left out."""
    ipex = import_ipex()
    if ipex is None:
        return {}
    out = {}
    with torch.no_grad():
        try:
            fp32 = ipex.optimize(copy.deepcopy(model).eval())
            out["ipex fp32"] = lambda: fp32(x)
            traced = torch.jit.freeze(torch.jit.trace(fp32, x))
            traced(x)
            out["ipex fp32 jit"] = lambda: traced(x)
        except Exception as e:  # noqa: BLE001 - reported, not fatal
            print(f"ipex fp32: {type(e).__name__}: {e}", file=sys.stderr)
        try:
            bf16 = ipex.optimize(copy.deepcopy(model).eval(), dtype=torch.bfloat16)
            with torch.autocast("cpu", dtype=torch.bfloat16):
                bf16(x)

            def run_bf16():
                with torch.autocast("cpu", dtype=torch.bfloat16):
                    return bf16(x)
            out["ipex bf16"] = run_bf16
        except Exception as e:  # noqa: BLE001
            print(f"ipex bf16: {type(e).__name__}: {e}", file=sys.stderr)
    return out


def bench_model(name, args, report):
    ctor, make_input = MODELS[name]
    torch.manual_seed(0)
    model = ctor().eval()
    x = make_input()
    fp32 = ipex_lite.optimize(model, sample_input=x)
    bf16 = ipex_lite.optimize(model, dtype=torch.bfloat16, sample_input=x)
    bf16_auto = ipex_lite.optimize(model, dtype=torch.bfloat16, sample_input=x, auto_kernel_selection=True)

    def autocast():
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return model(x)
    fp32_auto = ipex_lite.optimize(model, sample_input=x, auto_kernel_selection=True)  # per-Linear GEMM kernel
    with torch.no_grad():  # IPEX's inference recipe: trace + freeze; the graph calls the packed ops
        fp32_jit = torch.jit.freeze(torch.jit.trace(fp32, x))
        fp32_auto_jit = torch.jit.freeze(torch.jit.trace(fp32_auto, x))
        fp32_jit(x)
        fp32_auto_jit(x)
    systems = {"stock fp32": lambda: model(x), "stock bf16 autocast": autocast,
               "ipex_lite fp32": lambda: fp32(x), "ipex_lite fp32 jit": lambda: fp32_jit(x),
               "ipex_lite fp32 auto_kernel_selection jit": lambda: fp32_auto_jit(x),
               "ipex_lite bf16": lambda: bf16(x), "ipex_lite bf16 auto_kernel_selection": lambda: bf16_auto(x)}
    if args.compile:
        compiled = _compiled(model, x)
        systems["torch.compile fp32 (freezing)"] = lambda: compiled(x)
    systems.update(_ipex_systems(model, x))
    with torch.no_grad():
        want = model(x)
        for label, fn in systems.items():
            got = fn().float()
            err = ((got - want).abs().max() / want.abs().max()).item()
            limit = 5e-2 if "bf16" in label else 1e-4
            if err > limit:
                raise SystemExit(f"{name}: {label} differs from stock fp32 by {err:.2e} of the output scale")
        res = measure(systems, repeat=args.repeat, warmup=args.warmup, inner=1)
    ac = res["stock bf16 autocast"]["median_ms"]
    extra = {s: {"vs autocast": f"{ac / r['median_ms']:.2f}x"} for s, r in res.items() if "bf16" in s}
    report.add(name, res, extra)


def main(argv=None):
    parser = add_common_args(argparse.ArgumentParser(description=__doc__,
                                                     formatter_class=argparse.RawDescriptionHelpFormatter))
    args = add_model_args(parser, MODELS).parse_args(argv)
    setup_from_args(args)
    report = Report("model inference (no_grad)", reference="stock fp32")
    for name in selected_models(parser, args, MODELS):
        bench_model(name, args, report)
    report.emit(args.json, ["resnet50: batch 8 x 3 x 224 x 224; bert: 4 layers, 768 hidden / 12 heads / 3072, "
                            "batch 8 x 128",
                            "outputs checked against stock fp32 before timing (fp32 1e-4, bf16 5e-2 of the "
                            "output scale)"])


if __name__ == "__main__":
    main()
