"""Weight-only quantization (IPEX names): int8, int4 or NF4 weights with group-wise scales, activations kept
in bf16/fp32.  Decoding reads 2x (int8) or ~3.6x (int4, group 128) fewer weight bytes per token than bf16.

    from ipex_lite.quantization import get_weight_only_quant_qconfig_mapping, WoqWeightDtype
    qconfig = get_weight_only_quant_qconfig_mapping(weight_dtype=WoqWeightDtype.INT4, group_size=128)
    model = ipex_lite.llm.optimize(model, dtype=torch.bfloat16, quantization_config=qconfig)
    # or, for any model with Linear / HF Conv1D layers:
    model = ipex_lite.quantization.convert(ipex_lite.quantization.prepare(model, qconfig))

int8 weights are symmetric (one scale per group of inputs of each output row); int4 weights are
asymmetric (a scale and a zero point per group, GPTQ-style); NF4 weights are 4-bit indices into the
NormalFloat4 code book times a per-group absmax scale (QLoRA's format).  ``WoqLinear.state_dict()`` holds
the packed weights (``qweight``), ``scales`` and ``qzeros`` (``codebook`` for NF4); a checkpoint reloads
into a model built from its config
through ``ipex_lite.llm.optimize(..., low_precision_checkpoint=state_dict)``, which also reads the GPTQ
layout (``qweight``/``qzeros`` int32, ``scales``, ``g_idx``).
"""
from dataclasses import dataclass
from enum import IntEnum
from typing import Dict, Iterable, Optional, Tuple

import torch
from torch import nn

__all__ = ["WoqWeightDtype", "WoqLowpMode", "WoqActQuantMode", "WoqConfig", "WoqLinear",
           "get_weight_only_quant_qconfig_mapping", "quantize_weight_only", "woq_layers_from_checkpoint",
           "WoqPreparedModel"]


class WoqWeightDtype(IntEnum):
    INT8 = 1
    INT4 = 2
    NF4 = 3


class WoqLowpMode(IntEnum):
    """The compute type next to the quantized weights.  NONE / BF16: the model's dtype.  INT8: decode calls
    quantize each activation row to int8 (symmetric) and multiply with VNNI (AVX512-VNNI CPUs, groups of
    a multiple of 128 inputs for int4 / 64 for int8; elsewhere they keep bf16 activations); prefill stays a
    bf16 GEMM."""
    NONE = 0
    FP16 = 1
    BF16 = 2
    INT8 = 3


class WoqActQuantMode(IntEnum):
    PER_TENSOR = 0
    PER_IC_BLOCK = 1
    PER_BATCH = 2
    PER_BATCH_IC_BLOCK = 3
    PER_TENSOR_SYM = 4
    PER_IC_BLOCK_SYM = 5
    PER_BATCH_SYM = 6
    PER_BATCH_IC_BLOCK_SYM = 7


@dataclass(frozen=True)
class WoqConfig:
    """What ``get_weight_only_quant_qconfig_mapping`` returns; ``exclude`` names layers (full names or last
    components) that stay in the model's dtype."""
    weight_dtype: WoqWeightDtype = WoqWeightDtype.INT8
    lowp_mode: WoqLowpMode = WoqLowpMode.NONE
    act_quant_mode: WoqActQuantMode = WoqActQuantMode.PER_BATCH_IC_BLOCK_SYM
    group_size: int = -1
    exclude: Tuple[str, ...] = ("lm_head",)

    @property
    def bits(self) -> int:
        return 8 if self.weight_dtype == WoqWeightDtype.INT8 else 4

    def excluded(self, name: str) -> bool:
        return any(name == e or name.endswith("." + e) for e in self.exclude)


def get_weight_only_quant_qconfig_mapping(*, weight_dtype: int = WoqWeightDtype.INT8,
                                          lowp_mode: int = WoqLowpMode.NONE,
                                          act_quant_mode: int = WoqActQuantMode.PER_BATCH_IC_BLOCK_SYM,
                                          group_size: int = -1, exclude: Iterable[str] = ("lm_head",)) -> WoqConfig:
    """IPEX's name and keywords.  ``weight_dtype``: INT8 (symmetric), INT4 (asymmetric) or NF4;
    ``group_size``: -1 (one group per output row) or a multiple of 32; ``exclude``: layers kept in the
    model's dtype (full names or last name components)."""
    weight_dtype = WoqWeightDtype(int(weight_dtype))
    lowp_mode = WoqLowpMode(int(lowp_mode))
    if lowp_mode == WoqLowpMode.FP16:
        raise NotImplementedError("weight-only quantization: lowp_mode FP16 is not implemented; use NONE or BF16")
    if not isinstance(group_size, int) or (group_size != -1 and (group_size <= 0 or group_size % 32)):
        raise ValueError(f"weight-only quantization: group_size must be -1 or a positive multiple of 32, got "
                         f"{group_size!r}")
    return WoqConfig(weight_dtype, lowp_mode, WoqActQuantMode(int(act_quant_mode)), group_size, tuple(exclude))


# NormalFloat4 (QLoRA): the 16 quantiles of a standard normal scaled to [-1, 1], with an exact zero; stored
# rounded to bf16 so that the bf16 kernels and the reference dequantization agree exactly.
_NF4 = (-1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
        -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
        0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0)


def nf4_codebook() -> torch.Tensor:
    """The NF4 code book as the kernels take it: 16 float32 values, each exact in bf16."""
    return torch.tensor(_NF4, dtype=torch.bfloat16).float()


def _padded(k: int) -> int:
    return (k + 31) // 32 * 32


def _check_group(name: str, in_features: int, group_size: int) -> int:
    """The group length for a layer, or a ValueError naming it."""
    kp = _padded(in_features)
    if group_size == -1:
        return kp
    if group_size <= 0 or group_size % 32:
        raise ValueError(f"weight-only quantization: {name!r}: group size {group_size} is not -1 or a positive "
                         f"multiple of 32")
    if kp % group_size:
        raise ValueError(f"weight-only quantization: group_size {group_size} does not divide the input features of "
                         f"{name!r} ({in_features}, padded to {kp})")
    return group_size


def _pack_int4(q: torch.Tensor) -> torch.Tensor:
    """(n, kp) values in [0, 15] -> (n, kp / 2) bytes: per 32 inputs, byte j = input j | input j + 16 << 4."""
    n, kp = q.shape
    blocks = q.to(torch.uint8).view(n, kp // 32, 2, 16)
    return (blocks[:, :, 0] | (blocks[:, :, 1] << 4)).reshape(n, kp // 2)


def _unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    n, half = packed.shape
    blocks = packed.view(n, half // 16, 16)
    return torch.stack((blocks & 15, blocks >> 4), 2).reshape(n, half * 2)


def quantize_tensor(w: torch.Tensor, bits: int, group: int, codebook: Optional[torch.Tensor] = None):
    """(qweight, scales, zeros or None) of a float (n, k) weight, in WoqLinear's layout.  With a 4-bit
    ``codebook`` (NF4): scale = max |w| of the group, q = the nearest code of w / scale, no zero points."""
    n, k = w.shape
    kp = _padded(k)
    wf = torch.zeros(n, kp, dtype=torch.float32)
    wf[:, :k] = w.detach().float()
    g = wf.view(n, kp // group, group)
    if codebook is not None:
        scales = g.abs().amax(-1)
        scales = torch.where(scales > 0, scales, torch.ones_like(scales))
        r = g / scales.unsqueeze(-1)
        # nearest code: the code book is sorted, so count the midpoints below each value
        mids = (codebook[1:] + codebook[:-1]) / 2
        q = torch.bucketize(r, mids).view(n, kp)
        return _pack_int4(q), scales.contiguous(), None
    if bits == 8:
        scales = g.abs().amax(-1) / 127
        scales = torch.where(scales > 0, scales, torch.ones_like(scales))
        q = torch.round(g / scales.unsqueeze(-1)).clamp(-127, 127).to(torch.int8).view(n, kp)
        return q, scales.contiguous(), None
    lo, hi = g.amin(-1).clamp(max=0), g.amax(-1).clamp(min=0)  # zero is representable exactly
    scales = (hi - lo) / 15
    scales = torch.where(scales > 0, scales, torch.ones_like(scales))
    zeros = torch.round(-lo / scales).clamp(0, 15)
    q = (torch.round(g / scales.unsqueeze(-1)) + zeros.unsqueeze(-1)).clamp(0, 15).view(n, kp)
    return _pack_int4(q), scales.contiguous(), zeros.contiguous()


class WoqPreparedModel(nn.Module):
    """What ``prepare(model, weight_only_config)`` returns: the model unchanged (weight-only quantization needs
    no calibration) and the config, checked against every layer already; ``convert`` quantizes."""

    def __init__(self, model: nn.Module, config: WoqConfig):
        super().__init__()
        self.model, self.config = model, config

    def forward(self, *args, **kwargs):
        return self.model(*args, **kwargs)


def _fp32(t: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    """A later model.to(bf16) casts the float buffers too; the kernels read fp32 scales, zero points and code
    book (the NF4 code book is exact in bf16, so the round trip loses nothing)."""
    return t if t is None or t.dtype == torch.float32 else t.float()


class WoqLinear(nn.Module):
    """A Linear with weight-only quantized weights (buffers ``qweight``, ``scales``, ``qzeros`` (int4) or
    ``codebook`` (NF4); ``bias``).
    Few rows (decode) run the GEMV kernel over the packed weights; more rows dequantize to bf16 for a GEMM.
    ``perm`` (GPTQ act-order checkpoints) reorders the inputs to the stored group order."""

    def __init__(self, in_features: int, out_features: int, bits: int, group_size: int = -1, bias: bool = False,
                 dtype: torch.dtype = torch.bfloat16, name: str = "WoqLinear", nf4: bool = False):
        super().__init__()
        if bits not in (4, 8):
            raise ValueError(f"WoqLinear: bits must be 4 or 8, got {bits}")
        if nf4 and bits != 4:
            raise ValueError("WoqLinear: NF4 weights are 4-bit")
        self.in_features, self.out_features, self.bits = in_features, out_features, bits
        self.group = _check_group(name, in_features, group_size)
        kp = _padded(in_features)
        groups = kp // self.group
        self.register_buffer("qweight", torch.zeros(out_features, kp if bits == 8 else kp // 2,
                                                    dtype=torch.int8 if bits == 8 else torch.uint8))
        self.register_buffer("scales", torch.ones(out_features, groups))
        self.register_buffer("qzeros", torch.zeros(out_features, groups) if bits == 4 and not nf4 else None)
        # NF4: what each nibble stands for (kept in the state_dict, so a checkpoint says what it holds)
        self.register_buffer("codebook", nf4_codebook() if nf4 else None)
        self.register_buffer("bias", torch.zeros(out_features, dtype=dtype) if bias else None)
        self.register_buffer("perm", None)
        self.lowp_int8 = False  # WoqLowpMode.INT8: decode quantizes the activations per row (VNNI)

    @classmethod
    def from_float(cls, layer: nn.Module, config: WoqConfig, name: str = "") -> "WoqLinear":
        w = layer.weight.t() if type(layer).__name__ == "Conv1D" else layer.weight  # HF Conv1D stores (in, out)
        out_features, in_features = w.shape
        bias = getattr(layer, "bias", None)
        new = cls(in_features, out_features, config.bits, config.group_size, bias is not None,
                  dtype=layer.weight.dtype, name=name or type(layer).__name__,
                  nf4=config.weight_dtype == WoqWeightDtype.NF4)
        q, s, z = quantize_tensor(w, config.bits, new.group, new.codebook)
        new.qweight.copy_(q)
        new.scales.copy_(s)
        if z is not None:
            new.qzeros.copy_(z)
        if bias is not None:
            new.bias = bias.detach().clone()
        new.lowp_int8 = config.lowp_mode == WoqLowpMode.INT8
        return new

    def dequantize(self) -> torch.Tensor:
        """The bf16 (out_features, in_features) weight these buffers stand for (input order of the model)."""
        w = torch.ops.ipex_lite.woq_dequantize(self.qweight, self.scales, self.qzeros, self.bits, self.in_features,
                                               self.group, _fp32(self.codebook))
        if self.perm is not None:
            w = w[:, torch.argsort(self.perm)]
        return w

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b = self._buffers  # one dict instead of Module.__getattr__ per buffer: a decode step makes ~100 calls
        if x.dtype not in (torch.float32, torch.bfloat16):
            x = x.to(torch.bfloat16)
        if b["perm"] is not None:
            x = x.index_select(-1, b["perm"])
        return torch.ops.ipex_lite.woq_linear(x, b["qweight"], _fp32(b["scales"]), _fp32(b["qzeros"]), b["bias"],
                                              self.bits, self.in_features, self.group, self.lowp_int8,
                                              _fp32(b["codebook"]))

    def extra_repr(self) -> str:
        g = "per-row" if self.group == _padded(self.in_features) else f"group {self.group}"
        lowp = ", int8 activations when decoding" if self.lowp_int8 and self.codebook is None else ""
        kind = "nf4" if self.codebook is not None else f"int{self.bits}"
        return f"in_features={self.in_features}, out_features={self.out_features}, {kind} {g}{lowp}"


def _quantizable(m: nn.Module) -> bool:
    if type(m).__name__ == "Conv1D":  # Hugging Face's (GPT-2 style) Linear with a transposed weight
        return isinstance(getattr(m, "weight", None), torch.Tensor) and m.weight.dim() == 2
    return isinstance(m, nn.Linear)


def _plan(model: nn.Module, config: WoqConfig, report=None):
    """The layers to quantize; raises (naming the layer) before anything changes."""
    targets = [(n, m) for n, m in model.named_modules() if n and _quantizable(m)]
    plan = []
    for name, m in targets:
        if config.excluded(name):
            if report is not None:
                report.add(name, "kept", f"excluded from weight-only quantization ({type(m).__name__})")
            continue
        in_features = m.weight.shape[0] if type(m).__name__ == "Conv1D" else m.weight.shape[1]
        _check_group(name, in_features, config.group_size)
        plan.append((name, m))
    return plan


def quantize_weight_only(model: nn.Module, config: WoqConfig, report=None) -> nn.Module:
    """Replaces every Linear / HF Conv1D of ``model`` (in place) except the excluded ones by a WoqLinear.
    Every layer is checked first: on an error (a group size that does not divide a layer's inputs) nothing
    has been changed."""
    for name, m in _plan(model, config, report):
        new = WoqLinear.from_float(m, config, name)
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, child, new)
        if report is not None:
            report.add(name, "weight-only quantized", f"WoqLinear: {new.extra_repr()}")
    return model


# ---------------------------------------------------------------- checkpoints

def _from_gptq(name: str, sd: Dict[str, torch.Tensor], in_features: int, out_features: int) -> Dict[str, torch.Tensor]:
    """GPTQ layout (AutoGPTQ): qweight int32 (k / 8, n), 8 inputs per word, lowest nibble first; qzeros int32
    (groups, n / 8) holding zero - 1; scales (groups, n); g_idx (k,) the group of each input."""
    qweight, qzeros, scales = sd[name + ".qweight"], sd[name + ".qzeros"], sd[name + ".scales"]
    k, n = in_features, out_features
    if qweight.shape != (k // 8, n) or scales.shape[1] != n or qzeros.shape != (scales.shape[0], n // 8):
        raise ValueError(f"low_precision_checkpoint: {name}: GPTQ tensors qweight {tuple(qweight.shape)}, qzeros "
                         f"{tuple(qzeros.shape)}, scales {tuple(scales.shape)} do not fit a ({n}, {k}) layer")
    shifts = torch.arange(0, 32, 4, dtype=torch.int32)
    q = ((qweight.unsqueeze(1) >> shifts.view(1, 8, 1)) & 15).reshape(k, n).t()  # (n, k)
    zeros = (((qzeros.unsqueeze(2) >> shifts.view(1, 1, 8)) & 15).reshape(qzeros.shape[0], n) + 1).t().float()
    groups = scales.shape[0]
    g_idx = sd.get(name + ".g_idx")
    g_idx = (torch.arange(k) // (k // groups)) if g_idx is None else g_idx.long()
    perm = torch.argsort(g_idx, stable=True)
    if torch.equal(perm, torch.arange(k)):
        perm = None
    else:
        q = q[:, perm]
    group = k // groups
    if group % 32 or k % 32:
        raise ValueError(f"low_precision_checkpoint: {name}: GPTQ group size {group} (or {k} inputs) is not a "
                         "multiple of 32")
    out = {"qweight": _pack_int4(q.contiguous()), "scales": scales.t().float().contiguous(),
           "qzeros": zeros.contiguous(), "group": group}
    if perm is not None:
        out["perm"] = perm
    return out


def woq_layers_from_checkpoint(model: nn.Module, checkpoint: Dict[str, torch.Tensor], config: WoqConfig,
                               report=None) -> nn.Module:
    """Puts a WoqLinear, loaded from ``checkpoint`` (ipex_lite's WoqLinear state_dict keys or the GPTQ layout),
    in place of every Linear whose ``<name>.qweight`` the checkpoint holds; the float weights are not used."""
    plan = []
    for name, m in model.named_modules():
        if not name or not _quantizable(m) or name + ".qweight" not in checkpoint:
            continue
        out_features, in_features = ((m.weight.shape[1], m.weight.shape[0]) if type(m).__name__ == "Conv1D"
                                     else m.weight.shape)
        qweight = checkpoint[name + ".qweight"]
        if qweight.dtype == torch.int32:
            parts = _from_gptq(name, checkpoint, in_features, out_features)
            bits, group, nf4 = 4, parts.pop("group"), False
        else:
            bits = 8 if qweight.dtype == torch.int8 else 4
            scales = checkpoint.get(name + ".scales")
            if scales is None or scales.dim() != 2:
                raise ValueError(f"low_precision_checkpoint: {name}: scales missing or not 2-D")
            group = _padded(in_features) // scales.shape[1] if scales.shape[1] else 0
            parts = {key: checkpoint[f"{name}.{key}"] for key in ("qweight", "scales", "qzeros", "perm")
                     if f"{name}.{key}" in checkpoint}
            cb = checkpoint.get(name + ".codebook")
            if cb is not None and not torch.equal(cb.float(), nf4_codebook()):
                raise ValueError(f"low_precision_checkpoint: {name}.codebook is not the NF4 code book")
            nf4 = cb is not None
            if bits == 4 and not nf4 and "qzeros" not in parts:
                raise ValueError(f"low_precision_checkpoint: {name}: int4 weights without qzeros (or an NF4 "
                                 "codebook)")
        new = WoqLinear(in_features, out_features, bits, group if group != _padded(in_features) else -1,
                        bias=getattr(m, "bias", None) is not None, dtype=m.weight.dtype, name=name,
                        nf4=nf4)
        for key, t in parts.items():
            want = getattr(new, key)
            if want is None and key != "perm":
                raise ValueError(f"low_precision_checkpoint: {name}.{key} does not belong to a "
                                 f"{'nf4' if nf4 else f'int{bits}'} layer")
            if want is not None and tuple(t.shape) != tuple(want.shape):
                raise ValueError(f"low_precision_checkpoint: {name}.{key} has shape {tuple(t.shape)}, the layer "
                                 f"needs {tuple(want.shape)}")
        plan.append((name, m, new, parts))
    for name, m, new, parts in plan:  # every layer checked: now change the model
        new.lowp_int8 = config.lowp_mode == WoqLowpMode.INT8
        for key, t in parts.items():
            if key == "perm":
                new.perm = t.long()
            else:
                getattr(new, key).copy_(t)
        if new.bias is not None:
            b = checkpoint.get(name + ".bias", m.bias)
            new.bias.copy_(b.detach())
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, child, new)
        if report is not None:
            report.add(name, "weight-only quantized", f"loaded from the checkpoint: {new.extra_repr()}")
    # the float tensors (embeddings, norms, excluded layers) come from the checkpoint too
    own = model.state_dict()
    rest = {k: v for k, v in checkpoint.items() if k in own and not any(k.startswith(n + ".") for n, *_ in plan)}
    for k, v in rest.items():
        if tuple(v.shape) != tuple(own[k].shape):
            raise ValueError(f"low_precision_checkpoint: {k} has shape {tuple(v.shape)}, the model has "
                             f"{tuple(own[k].shape)}")
    model.load_state_dict(rest, strict=False)
    missing = [k for k in own if k not in checkpoint and not any(k.startswith(n + ".") for n, *_ in plan)]
    if report is not None and missing:
        report.add("<checkpoint>", "kept", f"{len(missing)} tensors not in the checkpoint keep the model's values "
                                           f"(first: {missing[0]})")
    return model


def fuse_woq(*layers: WoqLinear) -> WoqLinear:
    """One WoqLinear over the stacked output rows of ``layers`` (same inputs, bits and groups); their buffers
    become views into it, so nothing is held twice (the weight-only twin of the q/k/v and gate/up fusion)."""
    first = layers[0]
    for lay in layers:
        if ((lay.in_features, lay.bits, lay.group) != (first.in_features, first.bits, first.group)
                or lay.perm is not None or (lay.bias is None) != (first.bias is None)
                or (lay.codebook is None) != (first.codebook is None)):
            raise ValueError("fuse_woq: layers differ in inputs, bits, groups, code book, input order or bias")
    fused = WoqLinear(first.in_features, sum(lay.out_features for lay in layers), first.bits, first.group,
                      bias=first.bias is not None, dtype=first.bias.dtype if first.bias is not None else torch.bfloat16,
                      nf4=first.codebook is not None)
    fused.lowp_int8 = first.lowp_int8
    for key in ("qweight", "scales", "qzeros", "bias"):
        if getattr(first, key) is None:
            continue
        setattr(fused, key, torch.cat([getattr(lay, key) for lay in layers]))
        start = 0
        for lay in layers:
            setattr(lay, key, getattr(fused, key)[start:start + lay.out_features])
            start += lay.out_features
    return fused
