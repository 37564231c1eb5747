"""Inference modules that ``ipex_lite.optimize`` puts in place of Conv / Linear.

Each module computes ``post_ops(layer(x) [+ other])`` with the weights folded
(a following BatchNorm absorbed), converted to the compute dtype and
reordered once into oneDNN's blocked layout, through torch's own oneDNN ops
(``torch.ops.mkldnn._convolution_pointwise`` / ``_linear_pointwise``), which
apply the activation and the residual add inside the GEMM/convolution.

State: the module owns the source layer's ``weight`` and ``bias`` Parameters
under their original names, so ``state_dict()`` keys and values are those of
the user's model (fp32, unfolded); a folded BatchNorm stays where it was in
the module tree.  The packed weight is a cache keyed on the sources'
(storage, version): ``load_state_dict`` or any in-place edit repacks it on the
next call.  It is dropped by ``copy.deepcopy`` and pickling and rebuilt on
first use.

The packed path runs for inference (no gradient needed).  Under autograd
and ``torch.compile`` the module computes the same function with plain ATen
ops on the folded weights, so gradients are right and inductor sees ops it
knows.  Under ``torch.jit.trace`` Conv2d/3d and Linear record
``ipex_lite::packed_conv`` / ``packed_linear`` on the plain folded weights:
a trace cannot hold oneDNN's packed tensors, so those ops pack on first use
(csrc/ops/packed_weights.cpp), and a frozen graph runs packed, without
Python, and can be saved and loaded on another machine.
"""
import functools
import threading
import warnings
from typing import List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["PackedConv", "PackedConvTranspose", "PackedLinear", "PackCache", "UNARY"]

mkldnn = torch.ops.mkldnn
lite_ops = torch.ops.ipex_lite

def _gelu(t, inplace=False):
    return torch._C._nn.gelu_(t) if inplace else F.gelu(t)


def _gelu_tanh(t, inplace=False):
    return torch._C._nn.gelu_(t, approximate="tanh") if inplace else F.gelu(t, approximate="tanh")


def _sigmoid(t, inplace=False):
    return t.sigmoid_() if inplace else torch.sigmoid(t)


def _tanh(t, inplace=False):
    return t.tanh_() if inplace else torch.tanh(t)


# post-op name -> (oneDNN attr, scalars, algorithm, eager function f(t, inplace=False))
UNARY = {
    "relu": ("relu", [], "", F.relu),
    "silu": ("swish", [], "", F.silu),
    "gelu": ("gelu", [], "none", _gelu),
    "gelu_tanh": ("gelu", [], "tanh", _gelu_tanh),
    "sigmoid": ("sigmoid", [], "", _sigmoid),
    "tanh": ("tanh", [], "", _tanh),
    "hardswish": ("hardswish", [], "", F.hardswish),
    "hardsigmoid": ("hardsigmoid", [], "", F.hardsigmoid),
    "relu6": ("hardtanh", [0.0, 6.0], "", F.relu6),
}


def _shape_test(test) -> bool:
    """A test on shapes: a trace is specialised on its outcome (as on every
    shape), so the TracerWarning it raises while tracing says nothing new."""
    if not torch.jit.is_tracing():  # eager calls skip catch_warnings (~3 us per call)
        return bool(test())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        return bool(test())


def _tensor_attr(m: nn.Module, name: str):
    """``getattr(m, name, None)`` for a parameter, buffer or plain attribute, in nn.Module's lookup order."""
    d = m.__dict__
    for store in (d["_parameters"], d["_buffers"]):
        if name in store:
            return store[name]
    return d.get(name)


def _leaky(slope):
    return ("leaky_relu", [slope], "", functools.partial(F.leaky_relu, negative_slope=slope))


def _hardtanh(lo, hi):
    return ("hardtanh", [lo, hi], "", functools.partial(F.hardtanh, min_val=lo, max_val=hi))


class PackCache:
    """Packed weights per (OpenMP team size, input shape), rebuilt when the source tensors change.

    oneDNN picks the blocked weight layout for the thread count and the input
    shape at packing time, and a layout packed for other ones is reordered on
    every call (measured on ResNet-50: packed for 2 threads and run on 1, 4x
    slower; packed for batch 1 and run at batch 2, 1.9x slower).  So each
    (threads, shape) gets its pack; packs whose layout is identical (oneDNN's
    serialized memory descriptor) share one tensor, and at most ``MAX``
    slots are kept (oldest dropped).  Not part of the module's state:
    deepcopy and pickle start empty."""

    MAX = 8

    def __init__(self):
        self.__setstate__({})

    def __getstate__(self):
        return {}

    def __setstate__(self, state):
        self.lock = threading.Lock()
        self.key = None
        self.entries = {}  # (threads, shape) -> (packed value, layout descriptor or None)

    def get(self, key, build, shape=(), per_team=True):
        # the calling thread's OpenMP team size, for layouts that depend on it
        slot = (torch.get_num_threads() if per_team else 0, tuple(shape))
        if self.key == key:
            entry = self.entries.get(slot)
            if entry is not None:
                return entry[0]
        with self.lock:
            if self.key != key:
                self.key, self.entries = key, {}
            entry = self.entries.get(slot)
            if entry is None:
                entry = self._shared(build())
                if len(self.entries) >= self.MAX:
                    self.entries.pop(next(iter(self.entries)))
                self.entries[slot] = entry
            return entry[0]

    def _shared(self, value):
        packed = value[0] if isinstance(value, tuple) else value
        if not (isinstance(packed, torch.Tensor) and packed.is_mkldnn):
            return value, None
        layout = mkldnn._get_mkldnn_serialized_md(packed)
        for other, other_layout in self.entries.values():
            if other_layout is not None and torch.equal(other_layout, layout):
                return other, other_layout
        return value, layout

    def clear(self) -> None:
        with self.lock:
            self.key, self.entries = None, {}

    def __len__(self) -> int:
        return len({id(v) for v, _ in self.entries.values()})


def _bn_scale_shift(bn: nn.Module) -> Tuple[torch.Tensor, torch.Tensor]:
    """Per-channel y = x * scale + shift of an eval-mode BatchNorm (or FrozenBatchNorm2d)."""
    var, mean = bn.running_var.float(), bn.running_mean.float()
    eps = getattr(bn, "eps", 1e-5)
    scale = torch.rsqrt(var + eps)
    shift = -mean * scale
    if getattr(bn, "weight", None) is not None:
        scale = scale * bn.weight.float()
        shift = shift * bn.weight.float()
    if getattr(bn, "bias", None) is not None:
        shift = shift + bn.bias.float()
    return scale, shift


class _Packed(nn.Module):
    """Folding, the packed-weight cache and the post-ops shared by the packed modules."""

    def __init__(self, layer: nn.Module, bn: Optional[nn.Module], unary: Optional[str], binary: bool,
                 dtype: torch.dtype, prepack: bool, unary_spec=None):
        super().__init__()
        self.weight = layer.weight
        self.bias = layer.bias
        # the BatchNorm stays registered where it was (its state_dict keys); this is a plain reference
        self.__dict__["bn"] = bn
        self.unary = unary
        self._unary_spec = unary_spec if unary_spec is not None else (UNARY[unary] if unary else None)
        self.binary = binary
        self.dtype = dtype  # compute dtype
        self.out_dtype = None  # when set (a bf16 model computing this layer in fp32), outputs are cast to it
        self.prepack = prepack
        self.packs = PackCache()

    def _sources(self) -> List[torch.Tensor]:
        # read every call (a parameter may be reassigned), so without nn.Module.__getattr__'s frames:
        # the pack-cache key is computed on every eager call
        ts = [t for t in (_tensor_attr(self, "weight"), _tensor_attr(self, "bias")) if t is not None]
        bn = self.__dict__["bn"]
        if bn is not None:
            ts += [t for t in (_tensor_attr(bn, "running_mean"), _tensor_attr(bn, "running_var"),
                               _tensor_attr(bn, "weight"), _tensor_attr(bn, "bias")) if t is not None]
        return ts

    def _key(self):
        return tuple([(t.data_ptr(), t._version) for t in self._sources()])

    def _folded(self) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        """fp32 weight and bias with the BatchNorm folded in (differentiable torch ops)."""
        w, b = self.weight.float(), None if self.bias is None else self.bias.float()
        if self.bn is None:
            return w, b
        scale, shift = _bn_scale_shift(self.bn)
        w = w * self._channel_view(scale)
        b = shift if b is None else b * scale + shift
        return w, b

    def _channel_view(self, scale):
        return scale.view(-1, *([1] * (self.weight.dim() - 1)))

    def _cast(self, x: torch.Tensor) -> torch.Tensor:
        # floating inputs compute in the module's dtype; others reach the stock op and its error
        return x.to(self.dtype) if x.is_floating_point() else x

    # whether a trace records this layer's packed op (see the module docstring)
    _traces_packed = False

    def _needs_reference(self, x: torch.Tensor) -> bool:
        if not self.prepack or torch.jit.is_scripting() or torch.compiler.is_compiling():
            return True
        if torch.jit.is_tracing() and not self._traces_packed:
            return True
        if torch.is_grad_enabled() and (x.requires_grad or any(t.requires_grad for t in self._sources())):
            return True
        return x.dtype not in (torch.float32, torch.bfloat16) or x.device.type != "cpu"

    def _packed(self, x: torch.Tensor):
        """(weight, bias) for the packed ops: oneDNN-packed for eager calls; in a
        trace, the plain folded ones (recorded from the parameters, so a frozen
        graph holds them as constants), which ipex_lite's graph ops pack."""
        if torch.jit.is_tracing():
            w, b = self._folded()
            return w.to(self.dtype).contiguous(), None if b is None else b.to(self.dtype)

        def build():
            with torch.no_grad():
                w, b = self._folded()
                return self._reorder(w.to(self.dtype).contiguous(), x), None if b is None else b.to(self.dtype)
        return self.packs.get(self._key(), build, x.shape)

    def set_compute_dtype(self, dtype: torch.dtype, out_dtype: Optional[torch.dtype] = None) -> None:
        """Compute in ``dtype`` (packed weights rebuilt on the next call), return ``out_dtype``."""
        self.dtype = dtype
        self.out_dtype = None if out_dtype in (None, dtype) else out_dtype
        self.packs.clear()

    def forward(self, x, other=None):
        y = self._compute(x, other)
        if self.out_dtype is not None:
            y = tuple(t.to(self.out_dtype) for t in y) if isinstance(y, tuple) else y.to(self.out_dtype)
        return y

    def _attr(self):
        if self._unary_spec is None:
            return "none", [], ""
        attr, scalars, algo, _ = self._unary_spec
        return attr, scalars, algo

    def _post(self, y, other):
        # y is a fresh kernel output: update it in place (no second output to allocate and
        # page in) unless autograd needs it unchanged or the add would broadcast or promote
        inplace = not y.requires_grad
        if other is not None:
            same = _shape_test(lambda: other.shape == y.shape) and other.dtype == y.dtype
            y = y.add_(other) if inplace and same else y + other
        if self._unary_spec is not None:
            y = self._unary_spec[3](y, inplace=inplace)
        return y

    def extra_repr(self) -> str:
        parts = [f"dtype={str(self.dtype).replace('torch.', '')}", f"prepack={self.prepack}"]
        if self.bn is not None:
            parts.append("bn_folded=True")
        if self.out_dtype is not None:
            parts.append(f"out_dtype={str(self.out_dtype).replace('torch.', '')}")
        if self.unary:
            parts.append(f"post_op={self.unary}")
        if self.binary:
            parts.append("residual_add=True")
        if getattr(self, "kernel", "onednn") != "onednn":
            parts.append(f"kernel={self.kernel}")
        if getattr(self, "winograd", False):
            parts.append("winograd=True")
        return ", ".join(parts)


# F(2x2, 3x3) filter transform (a tensor made once: a trace records it as a constant without a warning)
_WINOGRAD_G = torch.tensor(((1.0, 0.0, 0.0), (0.5, 0.5, 0.5), (0.5, -0.5, 0.5), (0.0, 0.0, 1.0)), dtype=torch.float64)


def winograd_weight(weight: torch.Tensor) -> torch.Tensor:
    """The (K, C, 3, 3) filters as ipex_lite::winograd_conv2d takes them:
    U = G g G^T per filter (computed in float64), laid out (16, ceil(K / 64), C, 64)
    with the output channels in zero-padded panels of 64."""
    k, c = weight.shape[:2]
    g = _WINOGRAD_G
    u = torch.einsum("ai,kcij,bj->abck", g, weight.double(), g).reshape(16, c, k)
    panels = (k + 63) // 64
    u = F.pad(u, (0, panels * 64 - k)).view(16, c, panels, 64).permute(0, 2, 1, 3)
    return u.float().contiguous()


class PackedConv(_Packed):
    """Conv1d/2d/3d (+ folded BatchNorm) (+ residual add) (+ activation), channels_last, prepacked.

    ``winograd=True`` (optimize's ``conv_winograd``) runs an eligible layer
    (3x3, stride 1, dilation 1, one group, >= 16 channels in and out, no
    residual add, ReLU or no activation) in fp32 through ipex_lite's
    Winograd F(2x2, 3x3) kernel instead of oneDNN: 16 multiplies per 2x2
    output tile and channel pair instead of 36."""

    def __init__(self, conv: nn.Module, bn=None, unary=None, binary=False, dtype=torch.float32, prepack=True,
                 unary_spec=None):
        super().__init__(conv, bn, unary, binary, dtype, prepack, unary_spec)
        self.nd = conv.weight.dim() - 2
        self.in_channels, self.out_channels = conv.in_channels, conv.out_channels
        self.stride, self.dilation, self.groups = tuple(conv.stride), tuple(conv.dilation), conv.groups
        self.kernel_size = tuple(conv.kernel_size)
        self.padding_mode = conv.padding_mode
        self._reversed_padding_repeated_twice = list(conv._reversed_padding_repeated_twice)
        self.padding = self._explicit_padding(conv.padding)
        # set by optimize() where ``other`` is a fresh tensor nobody reads afterwards: the sum is written into it
        self.inplace_add = False
        self._conv_padding = conv.padding  # what F.convNd takes (may be "same"/"valid")
        self._traces_packed = self.nd in (2, 3)  # 1-D convolutions have no packed layout
        if self.padding is None or self.padding_mode != "zeros":
            self.prepack = False  # asymmetric "same" padding or a non-zero padding mode: plain path

    winograd = False  # a class default: modules pickled before the knob existed load with it off

    @property
    def winograd_eligible(self) -> bool:
        return (self.nd == 2 and self.kernel_size == (3, 3) and self.stride == (1, 1) and self.dilation == (1, 1)
                and self.groups == 1 and self.padding is not None and self.padding_mode == "zeros"
                and not self.binary and self._attr()[0] in ("none", "relu")
                and self.in_channels >= 16 and self.out_channels >= 16)

    def use_winograd(self, on: bool = True) -> None:
        """Route fp32 calls through the Winograd kernel (eligible layers only)."""
        if on and not self.winograd_eligible:
            raise ValueError("PackedConv.use_winograd: needs a 3x3, stride-1, undilated, ungrouped Conv2d with "
                             ">= 16 input and output channels, no residual add and ReLU or no activation")
        self.winograd = bool(on)
        self.packs.clear()

    def _winograd(self, x):
        def build():
            with torch.no_grad():
                w, b = self._folded()
                return winograd_weight(w), b
        if torch.jit.is_tracing():
            # Computed outside the trace, so the graph holds U and the bias themselves as constants.
            # Traced from the parameters, torch.jit.freeze left the einsum/pad/permute chain in the
            # graph and it ran on every call (13 chains on ResNet-50).
            state = torch._C._get_tracing_state()
            torch._C._set_tracing_state(None)
            try:
                u, b = build()
            finally:
                torch._C._set_tracing_state(state)
        else:
            u, b = self.packs.get(self._key(), build, per_team=False)  # U depends on neither team nor shape
        return lite_ops.winograd_conv2d(x, u, b, list(self.padding), self.out_channels, self._attr()[0])

    def _explicit_padding(self, padding):
        if not isinstance(padding, str):
            return tuple(padding)
        if padding == "valid":
            return (0,) * self.nd
        total = [d * (k - 1) for d, k in zip(self.dilation, self.kernel_size)]
        return None if any(t % 2 for t in total) else tuple(t // 2 for t in total)

    def _memory_format(self):
        return {2: torch.channels_last, 3: torch.channels_last_3d}.get(self.nd, torch.contiguous_format)

    def _reorder(self, w, x):
        if self.nd == 1:  # oneDNN's 1-D convolution takes the plain weight; there is no 1-D reorder op
            return w
        return mkldnn._reorder_convolution_weight(w, list(self.padding), list(self.stride), list(self.dilation),
                                                  self.groups, list(x.shape))

    def _out_shape(self, x):
        spatial = [(n + 2 * p - d * (k - 1) - 1) // s + 1 for n, p, d, k, s in
                   zip(x.shape[2:], self.padding, self.dilation, self.kernel_size, self.stride)]
        return (x.shape[0], self.out_channels, *spatial)

    def reference(self, x, other=None):
        w, b = self._folded()
        x = self._cast(x)
        w, b = w.to(self.dtype), None if b is None else b.to(self.dtype)
        conv = (F.conv1d, F.conv2d, F.conv3d)[self.nd - 1]
        if self.padding_mode != "zeros":
            x = F.pad(x, self._reversed_padding_repeated_twice, mode=self.padding_mode)
            y = conv(x, w, b, self.stride, 0, self.dilation, self.groups)
        else:
            y = conv(x, w, b, self.stride, self._conv_padding, self.dilation, self.groups)
        return self._post(y, None if other is None else other.to(y.dtype))

    def _compute(self, x, other=None):
        if self._needs_reference(x) or x.dim() != self.nd + 2:
            return self.reference(x, other)
        x = x.to(self.dtype).contiguous(memory_format=self._memory_format())
        if self.winograd and self.dtype == torch.float32 and other is None:
            return self._winograd(x)
        w, b = self._packed(x)
        traced = torch.jit.is_tracing()
        conv, conv_add = ((lite_ops.packed_conv, lite_ops.packed_conv_add) if traced else
                          (mkldnn._convolution_pointwise, mkldnn._convolution_pointwise.binary))
        attr, scalars, algo = self._attr()
        args = (list(self.padding), list(self.stride), list(self.dilation), self.groups)
        if other is None:
            return conv(x, w, b, *args, attr, scalars, algo)
        if _shape_test(lambda: tuple(other.shape) != self._out_shape(x)) or not other.is_floating_point():
            # a broadcast operand: no fused add
            y = conv(x, w, b, *args, "none", [], "")
            return self._post(y, other)
        other = other.to(self.dtype)
        unary = (attr if attr != "none" else None, scalars, algo or None)
        if self.inplace_add and other.is_contiguous(memory_format=self._memory_format()):
            if traced:
                lite_ops.packed_conv_add_(other, x, w, b, *args, *unary)
                return other
            return mkldnn._convolution_pointwise_.binary(other, x, w, b, *args, "add", None, *unary)
        other = other.contiguous(memory_format=self._memory_format())
        if traced:
            return conv_add(x, other, w, b, *args, *unary)
        return conv_add(x, other, w, b, *args, "add", None, *unary)


class PackedConvTranspose(_Packed):
    """ConvTranspose2d (+ folded BatchNorm, groups=1) (+ activation), prepacked."""

    def __init__(self, conv: nn.ConvTranspose2d, bn=None, unary=None, dtype=torch.float32, prepack=True,
                 unary_spec=None):
        super().__init__(conv, bn, unary, False, dtype, prepack, unary_spec)
        self.stride, self.padding = tuple(conv.stride), tuple(conv.padding)
        self.output_padding, self.dilation, self.groups = tuple(conv.output_padding), tuple(conv.dilation), conv.groups
        self.out_channels = conv.out_channels
        if conv.padding_mode != "zeros":
            raise ValueError("PackedConvTranspose: only zero padding")

    def _channel_view(self, scale):  # weight is (in, out / groups, kh, kw)
        return scale.view(1, -1, 1, 1)

    def _reorder(self, w, x):
        return mkldnn._reorder_convolution_transpose_weight(w, list(self.padding), list(self.output_padding),
                                                            list(self.stride), list(self.dilation), self.groups,
                                                            list(x.shape))

    def reference(self, x, other=None):
        w, b = self._folded()
        x = self._cast(x)
        y = F.conv_transpose2d(x, w.to(self.dtype), None if b is None else b.to(self.dtype), self.stride,
                               self.padding, self.output_padding, self.groups, self.dilation)
        return self._post(y, None)

    def _compute(self, x, other=None):
        if self._needs_reference(x) or x.dim() != 4:
            return self.reference(x)
        x = x.to(self.dtype).contiguous(memory_format=torch.channels_last)
        w, b = self._packed(x)
        attr, scalars, algo = self._attr()
        return mkldnn._convolution_transpose_pointwise(x, w, b, list(self.padding), list(self.output_padding),
                                                       list(self.stride), list(self.dilation), self.groups, attr,
                                                       scalars, algo)


class PackedLinear(_Packed):
    """Linear (+ folded BatchNorm1d on 2-D inputs) (+ residual add) (+ activation), prepacked.

    ``concat`` merges several Linears that read the same input into one GEMM
    (their weights stacked); the module then has no parameters of its own (the
    sources stay registered where they were) and returns the pieces as a tuple."""

    _traces_packed = True
    # fp32 GEMM kernel, chosen per layer by optimize(auto_kernel_selection=True): "onednn" (packed, post-ops
    # fused), "mkl" (MKL's packed sgemm, post-ops after it) or "aten" (F.linear on the folded weight).
    # Traces record ipex_lite::packed_linear / packed_linear_mkl or aten::linear on the plain weight,
    # packed by the machine that runs the graph.
    kernel = "onednn"
    KERNELS = ("onednn", "mkl", "aten") if torch.backends.mkl.is_available() else ("onednn", "aten")

    # the source holds its weight as (in, out) and computes x @ W + b (Hugging Face's Conv1D, GPT-2's
    # projections): same Parameter and state_dict key, transposed when folded for the kernels
    transposed = False

    def __init__(self, linear: Optional[nn.Module], bn=None, unary=None, binary=False, dtype=torch.float32,
                 prepack=True, unary_spec=None, concat: Sequence[nn.Linear] = (), transposed: bool = False):
        if concat:
            holder = nn.Module()
            holder.weight, holder.bias = None, None
            super().__init__(holder, None, None, False, dtype, prepack)
            del self.weight, self.bias
            self.__dict__["sources"] = list(concat)
            self.splits = [m.out_features for m in concat]
            self.in_features, self.out_features = concat[0].in_features, sum(self.splits)
        else:
            if transposed and bn is not None:
                raise ValueError("PackedLinear: a BatchNorm cannot be folded into a transposed-weight layer")
            super().__init__(linear, bn, unary, binary, dtype, prepack, unary_spec)
            self.__dict__["sources"] = None
            self.splits = None
            self.transposed = bool(transposed)
            out_dim, in_dim = linear.weight.shape[::-1] if transposed else linear.weight.shape
            self.in_features, self.out_features = in_dim, out_dim

    def _sources(self):
        if self.sources is None:
            return super()._sources()
        return [t for m in self.sources for t in (m.weight, m.bias) if t is not None]

    def _folded(self):
        if self.sources is not None:
            w = torch.cat([m.weight.float() for m in self.sources])
            if all(m.bias is None for m in self.sources):
                return w, None
            return w, torch.cat([m.bias.float() if m.bias is not None else m.weight.new_zeros(m.out_features)
                                 for m in self.sources])
        if self.transposed:
            return self.weight.float().t().contiguous(), None if self.bias is None else self.bias.float()
        return super()._folded()

    def set_kernel(self, kernel: str) -> None:
        """Use ``kernel`` (one of KERNELS) for fp32 calls; packed weights are rebuilt on the next call."""
        if kernel not in self.KERNELS:
            raise ValueError(f"PackedLinear: kernel must be one of {self.KERNELS}, got {kernel!r}")
        self.kernel = kernel
        self.packs.clear()

    def _fp32_kernel(self) -> str:
        return self.kernel if self.dtype == torch.float32 else "onednn"

    def _reorder(self, w, x):
        rows = max(1, x.numel() // max(1, x.shape[-1]))
        kernel = self._fp32_kernel()
        if kernel == "mkl":
            return torch.ops.mkl._mkl_reorder_linear_weight(w, rows), w
        if kernel == "aten":
            return w
        return mkldnn._reorder_linear_weight(w, rows)

    def _split(self, y):
        return tuple(torch.split(y, self.splits, dim=-1)) if self.splits is not None else y

    def reference(self, x, other=None):
        if self.bn is not None and x.dim() != 2:  # BatchNorm1d normalises dim 1: only 2-D folds
            y = self.bn(F.linear(x, self.weight, self.bias).to(self.bn.running_mean.dtype)).to(self.dtype)
            return self._post(y, None if other is None else other.to(y.dtype))
        w, b = self._folded()
        y = F.linear(self._cast(x), w.to(self.dtype), None if b is None else b.to(self.dtype))
        return self._split(self._post(y, None if other is None else other.to(y.dtype)))

    def _compute(self, x, other=None):
        if self._needs_reference(x) or (self.bn is not None and x.dim() != 2) or \
                _shape_test(lambda: x.shape[-1] != self.in_features):
            return self.reference(x, other)
        x = x.to(self.dtype)
        if not x.is_contiguous():
            x = x.contiguous()
        w, b = self._packed(x)
        kernel = self._fp32_kernel()
        if kernel != "onednn":
            if kernel == "aten":
                y = F.linear(x, w, b)
            elif torch.jit.is_tracing():
                y = lite_ops.packed_linear_mkl(x, w, b)
            else:
                y = torch.ops.mkl._mkl_linear(x, w[0], w[1], b, max(1, x.numel() // max(1, x.shape[-1])))
            return self._split(self._post(y, other))
        linear, linear_add = ((lite_ops.packed_linear, lite_ops.packed_linear_add) if torch.jit.is_tracing() else
                              (mkldnn._linear_pointwise, mkldnn._linear_pointwise.binary))
        attr, scalars, algo = self._attr()
        if other is None:
            return self._split(linear(x, w, b, attr, scalars, algo))
        if _shape_test(lambda: tuple(other.shape) != (*x.shape[:-1], self.out_features)) or \
                not other.is_floating_point() or attr != "none":
            return self._post(linear(x, w, b, "none", [], ""), other)
        other = other.to(self.dtype).contiguous()
        return linear_add(x, other, w, b) if torch.jit.is_tracing() else linear_add(x, other, w, b, "add")
