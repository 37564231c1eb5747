"""prepare / calibrate / convert (IPEX 2.x names).

prepare() runs the fp32 rewrite of ``optimize`` (BatchNorm folded, Dropout
removed, activations and residual adds fused into their Conv/Linear), then
hooks observers on each layer's input, residual operand and output.
convert() replaces every observed layer with its int8 module and, in graphs,
lets consecutive int8 layers hand each other uint8 activations.
"""
import copy
import json
from dataclasses import dataclass, field
from typing import Callable, Dict, Optional

import torch
import torch.fx as fx
from torch import nn

from .._inference import (FoldedBatchNorm, Knobs, Report, _packed_layers, _replace_dropout, _rewrite, _set,
                          _use_fast_transformers)
from ..nn.prepacked import PackedConv, PackedLinear, _Packed
from ._modules import QuantizedConv, QuantizedLinear, _QuantizedLayer
from ._observers import FixedRange, HistogramObserver, MinMaxObserver
from ._woq import WoqConfig, WoqPreparedModel, quantize_weight_only
from ._woq import _plan as _woq_plan


@dataclass
class QConfig:
    """activation: observer factory for static quantization, or None for dynamic
    (per-call) activation quantization; weights are always int8 per-channel symmetric.

    granularity (dynamic Linear layers): "per_tensor" (uint8, one range per call) or "per_token"
    (symmetric int8 with one scale per row of the input: LLM-style decoders, whose rows and
    heavy-tailed MLP activations a single range serves badly)."""

    activation: Optional[Callable[[], MinMaxObserver]] = HistogramObserver
    weight: str = "int8 per-channel symmetric"
    dynamic: bool = False
    granularity: str = "per_tensor"

    def __post_init__(self):
        if self.granularity not in ("per_tensor", "per_token"):
            raise ValueError(f"QConfig: granularity must be 'per_tensor' or 'per_token', got {self.granularity!r}")
        if self.granularity == "per_token" and not self.dynamic:
            raise ValueError("QConfig: per_token activation scales are computed per call: set dynamic=True")


@dataclass
class QConfigMapping:
    """A global QConfig plus per-module overrides (``None`` keeps that module fp32)."""

    global_qconfig: Optional[QConfig] = None
    module_names: Dict[str, Optional[QConfig]] = field(default_factory=dict)

    def set_global(self, qconfig: Optional[QConfig]) -> "QConfigMapping":
        self.global_qconfig = qconfig
        return self

    def set_module_name(self, name: str, qconfig: Optional[QConfig]) -> "QConfigMapping":
        self.module_names[name] = qconfig
        return self

    def qconfig_for(self, name: str) -> Optional[QConfig]:
        probe = name
        while True:  # the longest matching prefix wins
            if probe in self.module_names:
                return self.module_names[probe]
            if not probe:
                return self.global_qconfig
            probe = probe.rpartition(".")[0]


default_static_qconfig_mapping = QConfigMapping(QConfig(activation=HistogramObserver))
minmax_static_qconfig_mapping = QConfigMapping(QConfig(activation=MinMaxObserver))
default_dynamic_qconfig_mapping = QConfigMapping(QConfig(activation=None, dynamic=True))
per_token_dynamic_qconfig_mapping = QConfigMapping(QConfig(activation=None, dynamic=True, granularity="per_token"))


class _Observers:
    def __init__(self, qconfig: QConfig, binary: bool):
        make = qconfig.activation
        self.input, self.output = make(), make()
        self.other = make() if binary else None

    def pre(self, module, args):
        self.input.observe(args[0])
        if self.other is not None and len(args) > 1:
            self.other.observe(args[1])

    def post(self, module, args, output):
        self.output.observe(output)


def _quantizable(m: nn.Module, qconfig: Optional[QConfig]) -> bool:
    if qconfig is None:
        return False
    if isinstance(m, PackedLinear):
        return m.sources is None
    return isinstance(m, PackedConv) and m.nd in (1, 2) and m.prepack and not qconfig.dynamic


class PreparedModel(nn.Module):
    """The model with observers: run calibration batches through it, then ``convert`` it."""

    def __init__(self, model: nn.Module, qconfig_mapping: QConfigMapping, report: Report):
        super().__init__()
        self.model = model
        self.qconfig_mapping = qconfig_mapping
        self.observers: Dict[str, _Observers] = {}
        self._hooks = []
        self.report = report
        for name, m in _packed_layers(model):
            qc = qconfig_mapping.qconfig_for(name)
            if not isinstance(m, _Packed) or not _quantizable(m, qc):
                continue
            if qc.dynamic:
                self.observers[name] = None
                continue
            obs = _Observers(qc, m.binary)
            self.observers[name] = obs
            self._hooks += [m.register_forward_pre_hook(obs.pre), m.register_forward_hook(obs.post)]

    def forward(self, *args, **kwargs):
        return self.model(*args, **kwargs)

    def save_qconf_summary(self, path: str) -> None:
        """Writes every layer's calibrated ranges and the scales they give as editable JSON."""
        doc = {}
        for name, obs in self.observers.items():
            if obs is None:
                doc[name] = {"dynamic": True, "granularity": self.qconfig_mapping.qconfig_for(name).granularity}
                continue
            entry = {"input": obs.input.to_dict(), "output": obs.output.to_dict()}
            if obs.other is not None:
                entry["residual"] = obs.other.to_dict()
            doc[name] = entry
        with open(path, "w") as f:
            json.dump({"format": "ipex_lite qconf summary v1", "layers": doc}, f, indent=2)

    def load_qconf_summary(self, path: str) -> None:
        """Reads ranges written by ``save_qconf_summary`` (edited or not); no calibration needed after it."""
        with open(path) as f:
            doc = json.load(f)
        layers = doc.get("layers", {})
        unknown = sorted(set(layers) - set(self.observers))
        if unknown:
            raise ValueError(f"load_qconf_summary: layers not in this model: {unknown[:5]}")
        updates = []  # parsed and checked in full before any observer changes: a bad file loads nothing
        for name, entry in layers.items():
            obs = self.observers[name]
            if obs is None or entry.get("dynamic"):
                continue
            for key, attr in (("input", "input"), ("output", "output"), ("residual", "other")):
                if key in entry and getattr(obs, attr) is not None:
                    try:
                        lo, hi = float(entry[key]["min"]), float(entry[key]["max"])
                    except (KeyError, TypeError, ValueError) as e:
                        raise ValueError(f"load_qconf_summary: {name}.{key} needs numeric 'min' and 'max' ({e})")
                    if not lo <= hi:
                        raise ValueError(f"load_qconf_summary: {name}.{key} has min {lo} > max {hi}")
                    updates.append((obs, attr, FixedRange(lo, hi)))
        for obs, attr, observer in updates:
            setattr(obs, attr, observer)


def prepare(model: nn.Module, qconfig_mapping: QConfigMapping = default_static_qconfig_mapping,
            example_inputs=None, inplace: bool = False, bn_folding: bool = True) -> PreparedModel:
    """The model, folded and fused in fp32, with observers on every Conv/Linear it will quantize."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"prepare: model must be an nn.Module, got {type(model).__name__}")
    if isinstance(qconfig_mapping, WoqConfig):  # weight-only: no observers, no calibration
        _woq_plan(model, qconfig_mapping)
        return WoqPreparedModel(model if inplace else copy.deepcopy(model), qconfig_mapping)
    if not isinstance(qconfig_mapping, QConfigMapping):
        raise TypeError("prepare: qconfig_mapping must be an ipex_lite.quantization.QConfigMapping")
    model = model if inplace else copy.deepcopy(model)
    model.eval()
    report = Report()
    knobs = Knobs(conv_bn_folding=bn_folding, linear_bn_folding=bn_folding)
    _replace_dropout(model, "", report)
    model = _rewrite(model, "", knobs, report)
    model = _use_fast_transformers(model, "", knobs, report)
    if example_inputs is not None:  # surfaces shape errors now, before observers exist to count it
        args = example_inputs if isinstance(example_inputs, tuple) else (example_inputs,)
        with torch.no_grad():
            model(*args)
    return PreparedModel(model, qconfig_mapping, report)


def convert(prepared: PreparedModel, inplace: bool = False) -> nn.Module:
    """The int8 model: observed layers become QuantizedConv / QuantizedLinear."""
    if isinstance(prepared, WoqPreparedModel):
        model = prepared.model if inplace else copy.deepcopy(prepared.model)
        report = Report()
        quantize_weight_only(model, prepared.config, report)
        model.__dict__["_ipex_lite_report"] = report
        return model
    if not isinstance(prepared, PreparedModel):
        raise TypeError("convert: expected the model returned by ipex_lite.quantization.prepare")
    for h in prepared._hooks:
        h.remove()
    prepared._hooks = []
    model = prepared.model if inplace else copy.deepcopy(prepared.model)
    report = copy.deepcopy(prepared.report)
    for name, obs in prepared.observers.items():
        packed = model.get_submodule(name)
        if obs is None:
            granularity = prepared.qconfig_mapping.qconfig_for(name).granularity
            q = QuantizedLinear(packed, None, None, dynamic=True, per_token=granularity == "per_token")
        else:
            if not obs.input.calibrated:
                report.add(name, "kept fp32", "never called during calibration")
                continue
            other = obs.other.qparams() if obs.other is not None and obs.other.calibrated else None
            cls = QuantizedConv if isinstance(packed, PackedConv) else QuantizedLinear
            q = cls(packed, obs.input.qparams(), obs.output.qparams(), other)
        _set(model, name, q)
        report.add(name, "int8", f"{type(q).__name__}: {q.extra_repr()}")
    for gm in [m for m in model.modules() if isinstance(m, fx.GraphModule)]:
        _chain_int8(gm, report)
    for prefix, seq in [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Sequential)]:
        _chain_sequential(seq, prefix, report)
    _report_fp32_ops(model, report)
    model.__dict__["_ipex_lite_report"] = report
    return model


def _chain_int8(gm: fx.GraphModule, report: Report) -> None:
    """An int8 layer whose every consumer is an int8 layer emits uint8 with its
    output scale, and those consumers take it as is: no fp32 round trip."""
    modules = dict(gm.named_modules())

    def qlayer(node):
        m = modules.get(node.target) if node.op == "call_module" else None
        return m if isinstance(m, _QuantizedLayer) and not m.dynamic else None

    for node in gm.graph.nodes:
        producer = qlayer(node)
        if producer is None or not node.users:
            continue
        def as_main(user):
            return user.args[0] is node

        def as_residual(user):  # a fused conv + add takes uint8 as its accumulator
            return isinstance(qlayer(user), QuantizedConv) and len(user.args) == 2 and user.args[1] is node

        if not all(qlayer(u) is not None and (as_main(u) or as_residual(u))
                   and all(a is not node for a in u.args[2:]) for u in node.users):
            continue
        producer.out_dtype = torch.uint8
        for user in node.users:  # one consumer may take it both ways: conv(h) + h
            consumer = qlayer(user)
            if as_main(user):
                consumer.in_scale, consumer.in_zero_point = producer.out_scale, producer.out_zero_point
                consumer.in_quantized = True
            if as_residual(user):
                consumer.other_scale, consumer.other_zero_point = producer.out_scale, producer.out_zero_point
                consumer.other_quantized = True
        report.add(node.target, "int8 chain", "uint8 output feeds " + ", ".join(u.target for u in node.users))
    # a residual consumer whose output stays fp32 dequantizes a uint8 operand: decide its own output last
    for node in gm.graph.nodes:
        m = qlayer(node)
        if isinstance(m, QuantizedConv) and m.binary and m.out_dtype == torch.float32 and m.other_quantized:
            report.add(node.target, "note", "uint8 residual dequantized: this layer's output stays fp32")


def _chain_sequential(seq: nn.Sequential, prefix: str, report: Report) -> None:
    """Consecutive int8 layers of a Sequential (the only consumer of each output is the next layer; the
    pass-through modules a fused run leaves in place of its BatchNorm and activation are skipped)."""
    layers = [(name, m) for name, m in seq.named_children() if not isinstance(m, (FoldedBatchNorm, nn.Identity))]
    for (name, a), (next_name, b) in zip(layers, layers[1:]):
        if isinstance(a, _QuantizedLayer) and isinstance(b, _QuantizedLayer) and not a.dynamic and not b.dynamic \
                and not b.binary:
            a.out_dtype = torch.uint8
            b.in_scale, b.in_zero_point, b.in_quantized = a.out_scale, a.out_zero_point, True
            report.add(f"{prefix}.{name}" if prefix else name, "int8 chain", f"uint8 output feeds {next_name}")


def _report_fp32_ops(model: nn.Module, report: Report) -> None:
    """Which operations still run in fp32 (everything that is not an int8 layer)."""
    seen = set()
    for gm in [m for m in model.modules() if isinstance(m, fx.GraphModule)]:
        mods = dict(gm.named_modules())
        for n in gm.graph.nodes:
            if n.op == "call_module" and not isinstance(mods.get(n.target), _QuantizedLayer):
                seen.add(type(mods[n.target]).__name__)
            elif n.op in ("call_function", "call_method"):
                seen.add(getattr(n.target, "__name__", str(n.target)))
    if seen:
        report.add("", "fp32 ops", ", ".join(sorted(seen)))
