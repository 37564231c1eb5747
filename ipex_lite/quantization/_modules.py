"""INT8 Conv / Linear modules run by oneDNN through torch's own ops
(``torch.ops.onednn.qconv_pointwise`` / ``qconv2d_pointwise.binary`` /
``qlinear_pointwise``) on plain uint8 activations and int8 weights with
explicit scales and zero points (no quantized tensor dtypes).

A layer takes fp32 (quantized here with its calibrated input scale) or, when
its producer is an int8 layer too, the producer's uint8 output as is; it
returns uint8 when every consumer is an int8 layer (requantized inside the
kernel) and fp32 otherwise.  Weights are per-output-channel symmetric int8,
stored as plain buffers (the state_dict is the int8 model); the oneDNN
layout is a cache rebuilt after loading.  ``torch.jit.trace`` records
ipex_lite's graph ops (``packed_qconv`` / ``packed_qconv_add`` /
``packed_qlinear``, csrc/ops/packed_weights.cpp) on the plain int8 weights,
so a traced + frozen artifact runs oneDNN's int8 kernels and reloads anywhere.
"""
import contextlib
from typing import Tuple

import torch
import torch.nn.functional as F
from torch import nn

from ..nn.prepacked import PackCache
from ._observers import affine_qparams

onednn = torch.ops.onednn
ops = torch.ops.ipex_lite

# post-ops oneDNN's int8 kernels apply in the kernel (the others run in fp32 after it)
# post-ops oneDNN's int8 convolution applies itself (torch 2.14's qconv_pointwise refuses leaky_relu:
# "Unsupported post op leaky_relu for quantized pointwise conv2d"); the others run after it in fp32
_CONV_UNARY = {"relu", "swish", "hardswish", "hardtanh"}
_LINEAR_UNARY = {"relu", "swish", "gelu", "tanh", "hardswish", "hardtanh", "leaky_relu"}


@contextlib.contextmanager
def _untraced():
    """Runs its block outside any torch.jit trace (what it computes becomes a constant of the trace)."""
    state = torch._C._get_tracing_state()
    torch._C._set_tracing_state(None)
    try:
        yield
    finally:
        torch._C._set_tracing_state(state)


def _graph_mode() -> bool:
    """Whether this call is being recorded into a graph (torch.jit.trace, torch.compile, torch.export): the
    int8 layers then call ipex_lite's graph ops on the plain int8 weight instead of oneDNN's ops on the
    module's packed copy (a packed tensor is no graph constant)."""
    return torch.jit.is_tracing() or torch.compiler.is_compiling()


def quantize_weight(w: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """Per-output-channel symmetric int8: w ≈ q * scale[c]."""
    amax = w.detach().abs().amax(dim=tuple(range(1, w.dim()))).float()
    scale = torch.where(amax > 0, amax / 127.0, torch.ones_like(amax))
    q = torch.clamp(torch.round(w.detach().float() / scale.view(-1, *([1] * (w.dim() - 1)))), -128, 127)
    return q.to(torch.int8).contiguous(), scale  # the int8 kernels read it as a dense (out, in) block


class _QuantizedLayer(nn.Module):
    def __init__(self, packed, in_qparams, out_qparams, other_qparams=None, dynamic=False):
        super().__init__()
        with torch.no_grad():
            w, b = packed._folded()
        qweight, w_scales = quantize_weight(w)
        self.register_buffer("qweight", qweight)
        self.register_buffer("w_scales", w_scales)
        self.register_buffer("w_zero_points", torch.zeros(w_scales.numel(), dtype=torch.int64))
        self.register_buffer("bias", None if b is None else b.detach().float().clone())
        spec = packed._unary_spec
        self.unary = packed.unary
        self.unary_attr = spec[0] if spec else "none"
        self.unary_scalars = list(spec[1]) if spec else []
        self.unary_algorithm = spec[2] if spec else ""
        self.binary = packed.binary
        self.dynamic = dynamic
        self.in_scale, self.in_zero_point = in_qparams if in_qparams else (1.0, 0)
        self.out_scale, self.out_zero_point = out_qparams if out_qparams else (1.0, 0)
        self.other_scale, self.other_zero_point = other_qparams if other_qparams else (1.0, 0)
        self.in_quantized = False  # the input arrives as uint8 from an int8 producer
        self.out_dtype = torch.float32  # uint8 when every consumer is an int8 layer
        self.packs = PackCache()

    def _eager_unary(self):
        from ..nn.prepacked import UNARY
        attr, scalars = self.unary_attr, self.unary_scalars
        if attr == "leaky_relu":
            return lambda t: F.leaky_relu(t, scalars[0])
        if attr == "hardtanh":
            return lambda t: F.hardtanh(t, scalars[0], scalars[1])
        return UNARY[self.unary][3]

    def _quantize_input(self, x: torch.Tensor, scale: float, zero_point: int) -> torch.Tensor:
        if x.dtype == torch.uint8:
            if not self.in_quantized:
                raise TypeError(f"{type(self).__name__}: got a uint8 input but this layer expects floating point")
            return x
        if not x.is_floating_point():
            raise TypeError(f"{type(self).__name__}: input must be floating point (or uint8 from an int8 layer), "
                            f"got {x.dtype}")
        return ops.quantize_per_tensor(x, scale, zero_point, torch.uint8)

    def _packed(self, x: torch.Tensor):
        key = (self.qweight.data_ptr(), self.qweight._version, self.w_scales._version, self.in_scale,
               self.in_zero_point)
        return self.packs.get(key, lambda: self._prepack(x), x.shape)

    def _weight(self, qx: torch.Tensor) -> torch.Tensor:
        """The weight this call's kernel takes: the module's oneDNN-packed copy in eager; in a graph, the
        plain int8 weight, which ipex_lite's graph ops (packed_qconv / packed_qlinear) pack on the
        machine that runs the graph (a packed tensor is no graph constant, and the TorchScript tracer
        cannot record oneDNN's own int8 ops, whose post-op arguments are Scalar?[])."""
        return self.qweight if _graph_mode() else self._packed(qx)

    def _other_fp32(self, other: torch.Tensor) -> torch.Tensor:
        """A residual operand as fp32: dequantized with its own scale when it arrives as uint8."""
        return ops.dequantize_per_tensor(other, self.other_scale, self.other_zero_point) \
            if other.dtype == torch.uint8 else other.float()

    def _post_op(self, supported):
        """(fused, attr, scalars, algorithm, kernel output dtype): a post-op the kernel cannot apply
        runs in fp32 after it (see _finish), so the kernel then writes fp32."""
        fused = self.unary is None or self.unary_attr in supported
        if not fused:
            return False, "none", [], "", torch.float32
        return True, self.unary_attr, self.unary_scalars, self.unary_algorithm, self.out_dtype

    def _out_qparams(self, out_dtype):
        # oneDNN takes the output scale only for an 8-bit output
        return (self.out_scale, self.out_zero_point) if out_dtype == torch.uint8 else (1.0, 0)

    def _finish(self, y: torch.Tensor, fused_unary: bool) -> torch.Tensor:
        """Post-op oneDNN could not fuse, then the output dtype."""
        if self.unary is not None and not fused_unary:
            y = self._eager_unary()(y)
            if self.out_dtype == torch.uint8:
                y = ops.quantize_per_tensor(y, self.out_scale, self.out_zero_point, torch.uint8)
        return y

    def extra_repr(self) -> str:
        parts = [f"in=({'uint8' if self.in_quantized else 'fp32'}, scale={self.in_scale:.4g}, "
                 f"zp={self.in_zero_point})" if not self.dynamic else
                 "dynamic per-token int8" if getattr(self, "per_token", False) else "dynamic",
                 f"out={str(self.out_dtype).replace('torch.', '')}"]
        if self.unary:
            parts.append(f"post_op={self.unary}")
        if self.binary:
            parts.append("residual_add=True")
        return ", ".join(parts)


class QuantizedConv(_QuantizedLayer):
    """INT8 Conv1d/2d (+ folded BN) (+ residual add) (+ activation)."""

    def __init__(self, packed, in_qparams, out_qparams, other_qparams=None):
        super().__init__(packed, in_qparams, out_qparams, other_qparams)
        self.nd = packed.nd
        self.stride, self.padding, self.dilation = list(packed.stride), list(packed.padding), list(packed.dilation)
        self.groups = packed.groups
        self.out_channels = packed.out_channels
        self.other_quantized = False
        self.inplace_add = getattr(packed, "inplace_add", False)

    def _activation_table(self):
        """(input scale, input zero point, 256-entry uint8 table) when this layer's activation runs on its
        uint8 output as a lookup table: a LeakyReLU the int8 kernel cannot fuse (torch's int8 convolution
        refuses it), on a layer whose output stays uint8.  LeakyReLU is invertible, so its input range
        follows from the calibrated output range: [lo / slope, hi]."""
        if self.unary_attr != "leaky_relu" or self.out_dtype != torch.uint8 or not self.unary_scalars \
                or not float(self.unary_scalars[0]) > 0:
            return None
        slope = float(self.unary_scalars[0])
        key = (self.out_scale, self.out_zero_point, slope)
        cached = self.__dict__.get("_table")
        if cached is None or cached[0] != key:
            with _untraced():  # a trace holds the table as a constant, not the ops that build it
                cached = self._build_table(key)
        return cached[1]

    def _build_table(self, key):
        scale, zero_point, slope = key
        lo, hi = -zero_point * scale, (255 - zero_point) * scale
        pre_scale, pre_zp = affine_qparams(lo / slope, hi)
        pre = (torch.arange(256, dtype=torch.float64) - pre_zp) * pre_scale
        post = torch.where(pre > 0, pre, pre * slope)
        table = torch.clamp(torch.round(post / scale) + zero_point, 0, 255).to(torch.uint8)
        self.__dict__["_table"] = (key, (pre_scale, pre_zp, table))
        return self.__dict__["_table"]

    def _prepack(self, x):
        return onednn.qconv_prepack(self.qweight, self.w_scales, self.in_scale, self.in_zero_point, self.stride,
                                    self.padding, self.dilation, self.groups, list(x.shape))

    def extra_repr(self) -> str:
        text = super().extra_repr()
        return text.replace(f"post_op={self.unary}", f"post_op={self.unary} (uint8 table)") \
            if self._activation_table() is not None else text

    def forward(self, x, other=None):
        traced = _graph_mode()
        fmt = torch.channels_last if self.nd == 2 else torch.contiguous_format
        qx = self._quantize_input(x, self.in_scale, self.in_zero_point).contiguous(memory_format=fmt)
        w = self._weight(qx)
        fused, attr, scalars, algo, out_dtype = self._post_op(_CONV_UNARY)
        table = None if fused else self._activation_table()
        if table is not None:  # uint8 on the activation's input range; the table applies it
            out_qparams, out_dtype = table[:2], torch.uint8
        else:
            out_qparams = self._out_qparams(out_dtype)
        common = (self.stride, self.padding, self.dilation, self.groups)
        head = (qx, self.in_scale, self.in_zero_point, w, self.w_scales, self.w_zero_points)
        if other is None:
            y = ops.packed_qconv(*head, self.bias, *common, *out_qparams, out_dtype, attr, scalars, algo or "") \
                if traced else onednn.qconv_pointwise(*head, self.bias, *common, *out_qparams, out_dtype, attr,
                                                      scalars, algo)
            return ops.lookup_u8(y, table[2]) if table is not None else self._finish(y, fused)
        # residual add: oneDNN's sum post-op accumulates into ``other`` (uint8 with its own scale, or fp32)
        if out_dtype == torch.uint8:
            acc = other if other.dtype == torch.uint8 and self.other_quantized else \
                ops.quantize_per_tensor(other if other.is_floating_point() else other.float(), self.other_scale,
                                        self.other_zero_point, torch.uint8)
            acc_scale, acc_zp = self.other_scale, self.other_zero_point
        else:
            acc = self._other_fp32(other)
            acc_scale, acc_zp = 1.0, 0
        unary = (attr if attr != "none" else None, scalars, algo or None)
        if traced:  # the graph op sums into a copy of the accumulator
            y = ops.packed_qconv_add(*head, acc, self.bias, *common, *out_qparams, out_dtype, acc_scale, acc_zp, *unary)
        else:
            if acc is other and not self.inplace_add:
                acc = acc.clone(memory_format=fmt)  # the sum is written into the accumulator
            acc = acc.contiguous(memory_format=fmt)
            y = onednn.qconv2d_pointwise.binary(*head, acc, self.bias, *common, *out_qparams, out_dtype, acc_scale,
                                                acc_zp, "sum", 1.0, *unary)
        return ops.lookup_u8(y, table[2]) if table is not None else self._finish(y, fused)


class QuantizedLinear(_QuantizedLayer):
    """INT8 Linear (+ folded BN on 2-D inputs) (+ residual add) (+ activation); ``dynamic``
    quantizes each input with its own min/max instead of a calibrated scale, ``per_token`` with
    one symmetric scale per row (uint8 around zero point 128; the GEMM runs on scale 1 and each
    output row is rescaled)."""

    def __init__(self, packed, in_qparams, out_qparams, other_qparams=None, dynamic=False, per_token=False):
        super().__init__(packed, in_qparams, out_qparams, other_qparams, dynamic)
        if per_token and not dynamic:
            raise ValueError("QuantizedLinear: per_token activation scales are dynamic")
        self.per_token = per_token
        self.in_features, self.out_features = packed.in_features, packed.out_features

    def _linear(self, qx, scale, zp, other, bias, out_qparams, out_dtype, attr="none", scalars=(), algo=""):
        """oneDNN's int8 GEMM on the uint8 rows ``qx`` (+ ``other`` (rows, out) added in the kernel)."""
        head = (qx, scale, zp, self._weight(qx), self.w_scales, self.w_zero_points)
        scalars = list(scalars)
        if _graph_mode():
            return ops.packed_qlinear(*head, other, bias, *out_qparams, out_dtype, attr, scalars, algo)
        if other is None:
            return onednn.qlinear_pointwise(*head, bias, *out_qparams, out_dtype, attr, scalars, algo)
        return onednn.qlinear_pointwise.binary(*head, other, bias, *out_qparams, out_dtype, 1.0, 0, "add", 1.0, attr,
                                               scalars, algo)

    def _per_token(self, x, other):
        lead = x.shape[:-1]
        x2 = x.reshape(-1, self.in_features)
        qx, s = ops.quantize_per_token(x2)
        if x2.shape[0] == 0:
            y = x2.new_empty((0, self.out_features), dtype=torch.float32)
        else:  # the GEMM on scale 1 without the bias, then each row rescaled and the bias added
            raw = self._linear(qx, 1.0, 128, None, None, (1.0, 0), torch.float32)
            y = torch.addcmul(self.bias, raw, s.unsqueeze(1)) if self.bias is not None else \
                raw.mul_(s.unsqueeze(1))
        y = y.reshape(*lead, self.out_features)
        if other is not None:
            y = y + self._other_fp32(other)
        return y if self.unary is None else self._eager_unary()(y)

    def _prepack(self, x):
        return onednn.qlinear_prepack(self.qweight, [max(1, x.numel() // self.in_features), self.in_features])

    def forward(self, x, other=None):
        if x.shape[-1] != self.in_features:
            raise RuntimeError(f"QuantizedLinear: input has {x.shape[-1]} features, expected {self.in_features}")
        if self.per_token:
            if not x.is_floating_point():
                raise TypeError(f"QuantizedLinear: input must be floating point, got {x.dtype}")
            return self._per_token(x, other)
        lead = x.shape[:-1]
        scale, zp = self.in_scale, self.in_zero_point
        if self.dynamic and x.dtype != torch.uint8:
            lo, hi = torch.aminmax(x.detach().float()) if x.numel() else (torch.tensor(0.0), torch.tensor(0.0))
            scale, zp = affine_qparams(lo.item(), hi.item())
        qx = self._quantize_input(x, scale, zp).reshape(-1, self.in_features)
        fused, attr, scalars, algo, out_dtype = self._post_op(_LINEAR_UNARY)
        if other is None or other.shape != (*lead, self.out_features):
            y = self._linear(qx, scale, zp, None, self.bias, self._out_qparams(out_dtype), out_dtype, attr, scalars,
                             algo)
            y = self._finish(y, fused).reshape(*lead, self.out_features)
            if other is not None:  # a broadcast residual: added in fp32
                y = (y if y.is_floating_point() else ops.dequantize_per_tensor(y, self.out_scale,
                                                                                self.out_zero_point)) + other
            return y
        acc = self._other_fp32(other)
        y = self._linear(qx, scale, zp, acc.reshape(-1, self.out_features), self.bias, self._out_qparams(out_dtype),
                         out_dtype, attr, scalars, algo)
        return self._finish(y, fused).reshape(*lead, self.out_features)
