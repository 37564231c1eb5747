"""The inference half of ``ipex_lite.optimize``: Dropout removal, BatchNorm
folding, post-op fusion, oneDNN weight prepacking, Winograd 3x3 convolutions,
and ipex_lite's attention and max-pooling kernels.

Where a module traces with ``torch.fx`` the rewrite works on its graph, so it
sees ``bn(conv(x))``, ``relu(...)`` and ``out += identity`` wherever they are
written; where it does not trace, its children are tried one by one and
``nn.Sequential`` runs of Conv/Linear, BatchNorm and activation are fused in
place.  A module whose rewrite fails is left as it was and the report says
why: the call as a whole never fails on a model it cannot improve.

State dict keys survive every rewrite: packed modules own the source layer's
Parameters under the same names, and folded BatchNorms stay registered where
they were (a graph no longer calls them; a Sequential holds them as
``FoldedBatchNorm``, an identity that keeps the buffers).
"""
import copy
import operator
import time
import warnings
import weakref
from dataclasses import dataclass, field
from typing import Dict, List, Optional

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from ._hf_attention import is_transformers_model, use_ipex_lite_attention
from .nn.attention import InferenceMultiheadAttention
from .nn.transformer import _activation_name
from .nn.transformer import fast_module as fast_transformer_module
from .nn.functional import max_pool2d as fast_max_pool2d
from .nn.functional import scaled_dot_product_attention as fused_sdpa
from .nn.prepacked import (UNARY, PackCache, PackedConv, PackedConvTranspose, PackedLinear, _hardtanh, _leaky,
                           _Packed)

_CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
_EMBEDDINGS = (nn.Embedding, nn.EmbeddingBag)
_BNS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)
_DROPOUTS = (nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout, nn.FeatureAlphaDropout)
_NORMS = (nn.modules.batchnorm._NormBase, nn.LayerNorm, nn.GroupNorm, nn.modules.normalization.RMSNorm)


@dataclass
class Knobs:
    dtype: torch.dtype = torch.float32
    conv_bn_folding: bool = True
    linear_bn_folding: bool = True
    weights_prepack: bool = True
    replace_dropout_with_identity: bool = True
    graph_mode: bool = True
    concat_linear: bool = False
    fuse_post_ops: bool = True
    auto_kernel_selection: bool = False
    conv_winograd: bool = False


@dataclass
class Report:
    """What optimize() did to each module, and what it left alone and why."""

    entries: List[tuple] = field(default_factory=list)

    def add(self, path: str, action: str, detail: str = "") -> None:
        self.entries.append((path or "<root>", action, detail))

    def __str__(self) -> str:
        if not self.entries:
            return "ipex_lite.optimize: nothing to do"
        width = max(len(p) for p, _, _ in self.entries)
        lines = ["ipex_lite.optimize report:"]
        for path, action, detail in self.entries:
            lines.append(f"  {path.ljust(width)}  {action}" + (f": {detail}" if detail else ""))
        return "\n".join(lines)


class FoldedBatchNorm(nn.Module):
    """A BatchNorm folded into the layer before it: identity in forward, same
    Parameters and buffers (so the same state_dict keys and values)."""

    def __init__(self, bn: nn.Module):
        super().__init__()
        for name, p in bn.named_parameters(recurse=False):
            self.register_parameter(name, p)
        for name, b in bn.named_buffers(recurse=False):
            self.register_buffer(name, b)
        self.eps = bn.eps
        self.num_features = bn.num_features

    def forward(self, x):
        return x


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


def _bn_subclass(mod: nn.Module) -> bool:
    """A BatchNorm subclass (timm's BatchNormAct2d, ...): its forward may add work after normalising."""
    return isinstance(mod, _BNS) and type(mod) not in _BNS


def _bn_subclass_activation(bn: nn.Module):
    """For a BatchNorm subclass: ``(name, spec)`` of the activation its forward applies after
    normalising, ``()`` when it applies none, ``None`` when its forward is anything else.  Judged by
    structure -- children are Identity/Dropout and at most one fusable activation, last -- and
    confirmed on a probe input (eval mode, so Dropout is the identity)."""
    if not _bn_subclass(bn) or bn.training or bn.running_mean is None:
        return None
    if bn not in _NORM_ACTIVATION:  # probed once per module (asked while folding and again while fusing)
        _NORM_ACTIVATION[bn] = _probe_norm_activation(bn)
    return _NORM_ACTIVATION[bn]


_NORM_ACTIVATION: "weakref.WeakKeyDictionary[nn.Module, object]" = weakref.WeakKeyDictionary()


def _probe_norm_activation(bn: nn.Module):
    children = list(bn.children())
    act = None
    for i, child in enumerate(children):
        if isinstance(child, (nn.Identity,) + _DROPOUTS):
            continue
        act = _activation_of_module(child)
        if act is None or i != len(children) - 1:
            return None
    dims = {nn.BatchNorm1d: 3, nn.BatchNorm2d: 4, nn.BatchNorm3d: 5}
    ndim = next(d for cls, d in dims.items() if isinstance(bn, cls))
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, bn.num_features, *([3] * (ndim - 2)), generator=g).to(bn.running_mean.dtype)
    with torch.no_grad():
        try:
            got = bn(x.clone())
        except Exception:  # noqa: BLE001 - a forward we cannot call on a probe is not foldable
            return None
        want = F.batch_norm(x, bn.running_mean, bn.running_var, bn.weight, bn.bias, False, 0.0, bn.eps)
        if act is not None:
            want = children[-1](want)
    if not isinstance(got, torch.Tensor) or got.shape != want.shape or not torch.allclose(got, want, 1e-4, 1e-5):
        return None
    return act if act is not None else ()


def _bn_foldable(layer: nn.Module, bn: nn.Module) -> bool:
    if type(layer) not in (nn.Linear, nn.ConvTranspose2d) + _CONVS:
        return False
    if not isinstance(bn, _BNS) and type(bn).__name__ != "FrozenBatchNorm2d":
        return False
    if getattr(bn, "training", False) or getattr(bn, "running_mean", None) is None:
        return False
    if isinstance(bn, _BNS) and not bn.track_running_stats:
        return False
    if _bn_subclass(bn) and _bn_subclass_activation(bn) is None:
        return False
    out = layer.out_features if isinstance(layer, nn.Linear) else layer.out_channels
    if bn.running_mean.numel() != out:
        return False
    if isinstance(layer, nn.Linear):
        return isinstance(bn, nn.BatchNorm1d)
    if isinstance(layer, nn.ConvTranspose2d):
        return layer.groups == 1 and not isinstance(bn, nn.BatchNorm1d)
    nd = layer.weight.dim() - 2
    return isinstance(bn, {1: nn.BatchNorm1d, 2: nn.BatchNorm2d, 3: nn.BatchNorm3d}.get(nd, ())) \
        or (nd == 2 and type(bn).__name__ == "FrozenBatchNorm2d")


class _Tracer(fx.Tracer):
    """torch.fx's tracer, with BatchNorm subclasses kept as calls (leaves) so that they can be folded
    like BatchNorm itself; traced through, they are a functional batch_norm on attributes."""

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return _bn_subclass(m) or super().is_leaf_module(m, qualname) or _linear_orientation(m) is not None \
            or _probed_activation(m) is not None


def _trace(mod: nn.Module) -> fx.GraphModule:
    for m in mod.modules():  # probe (and cache) outside the trace: fx intercepts module calls while tracing
        _linear_orientation(m)
        _probed_activation(m)
    tracer = _Tracer()
    graph = tracer.trace(mod)
    return fx.GraphModule(tracer.root, graph, type(mod).__name__)


def _activation_of_module(mod: nn.Module):
    simple = {nn.ReLU: "relu", nn.SiLU: "silu", nn.Sigmoid: "sigmoid", nn.Tanh: "tanh", nn.Hardswish: "hardswish",
              nn.Hardsigmoid: "hardsigmoid", nn.ReLU6: "relu6"}
    for cls, name in simple.items():
        if type(mod) is cls:
            return name, UNARY[name]
    if type(mod) is nn.GELU:
        name = "gelu" if mod.approximate == "none" else "gelu_tanh"
        return name, UNARY[name]
    if type(mod) is nn.LeakyReLU:
        return "leaky_relu", _leaky(float(mod.negative_slope))
    if type(mod) is nn.Hardtanh:
        return "hardtanh", _hardtanh(float(mod.min_val), float(mod.max_val))
    name = _probed_activation(mod)
    return None if name is None else (name, UNARY[name])


# module -> the UNARY name its forward computes, or None; probed once per module
_PROBED_ACTIVATION: "weakref.WeakKeyDictionary[nn.Module, Optional[str]]" = weakref.WeakKeyDictionary()
_PROBE = torch.linspace(-8.0, 8.0, 161, dtype=torch.float64).float().repeat(2, 1)


def _probed_activation(mod: nn.Module) -> Optional[str]:
    """An activation module ipex_lite has no name for (Hugging Face's NewGELUActivation, timm's GELU,
    a user's Swish): a stateless leaf outside torch.nn whose output on a probe matches one of the
    packed kernels' post-ops.  Probed outside any trace (see ``_trace``)."""
    if type(mod).__module__.startswith("torch.") or next(mod.children(), None) is not None \
            or next(mod.parameters(), None) is not None or next(mod.buffers(), None) is not None:
        return None
    if mod not in _PROBED_ACTIVATION:
        _PROBED_ACTIVATION[mod] = None
        try:
            with torch.no_grad():
                out = mod(_PROBE.clone())
        except Exception:  # noqa: BLE001 - not a one-tensor elementwise function
            return None
        if isinstance(out, torch.Tensor) and out.shape == _PROBE.shape and out.dtype == _PROBE.dtype:
            for name in ("relu", "gelu", "gelu_tanh", "silu", "sigmoid", "tanh", "hardswish", "hardsigmoid",
                         "relu6"):
                if torch.allclose(out, UNARY[name][3](_PROBE.clone()), rtol=1e-5, atol=1e-6):
                    _PROBED_ACTIVATION[mod] = name
                    break
    return _PROBED_ACTIVATION[mod]


_FN_ACTIVATIONS = {F.relu: "relu", torch.relu: "relu", torch.relu_: "relu", F.relu_: "relu", F.silu: "silu",
                   torch.sigmoid: "sigmoid", F.sigmoid: "sigmoid", torch.tanh: "tanh", F.tanh: "tanh",
                   F.hardswish: "hardswish", F.hardsigmoid: "hardsigmoid", F.relu6: "relu6"}
_METHOD_ACTIVATIONS = {"relu": "relu", "relu_": "relu", "sigmoid": "sigmoid", "sigmoid_": "sigmoid", "tanh": "tanh",
                       "tanh_": "tanh"}


def _activation_of_node(node: fx.Node, modules: Dict[str, nn.Module]):
    """(name, spec) when ``node`` applies a fusable activation to its first argument only."""
    if node.op == "call_module":
        return _activation_of_module(modules[node.target]) if len(node.args) == 1 and not node.kwargs else None
    extra = set(node.kwargs) - {"inplace", "approximate", "negative_slope"}
    if extra or not node.args:
        return None
    if node.op == "call_function":
        if node.target is F.gelu and len(node.args) == 1:
            name = "gelu" if node.kwargs.get("approximate", "none") == "none" else "gelu_tanh"
            return name, UNARY[name]
        if node.target is F.leaky_relu:
            slope = node.args[1] if len(node.args) > 1 else node.kwargs.get("negative_slope", 0.01)
            return ("leaky_relu", _leaky(float(slope))) if isinstance(slope, (int, float)) else None
        name = _FN_ACTIVATIONS.get(node.target)
        ok_args = len(node.args) == 1 or (len(node.args) == 2 and isinstance(node.args[1], bool))
        return (name, UNARY[name]) if name and ok_args else None
    if node.op == "call_method" and len(node.args) == 1 and not node.kwargs:
        name = _METHOD_ACTIVATIONS.get(node.target)
        return (name, UNARY[name]) if name else None
    return None


def _is_add(node: fx.Node) -> bool:
    if node.op != "call_function" or len(node.args) != 2 or node.kwargs:
        return False
    return node.target in (operator.add, operator.iadd, torch.add) and all(isinstance(a, fx.Node) for a in node.args)


def _only_user(node: fx.Node) -> Optional[fx.Node]:
    users = list(node.users)
    return users[0] if len(users) == 1 else None


def _make_packed(layer, bn, unary, spec, binary, knobs: Knobs):
    common = dict(bn=bn, unary=unary, unary_spec=spec, dtype=knobs.dtype, prepack=knobs.weights_prepack)
    if isinstance(layer, _CONVS):
        return PackedConv(layer, binary=binary, **common)
    if isinstance(layer, nn.ConvTranspose2d):
        return PackedConvTranspose(layer, **common)
    return PackedLinear(layer, binary=binary, transposed=_linear_orientation(layer) == "transposed", **common)


def _linear_like_params(mod: nn.Module):
    """(weight, bias) of a leaf holding a 2-D floating weight and at most a 1-D bias that is not an
    embedding (a GEMM whatever its class), else None."""
    if isinstance(mod, (_Packed,) + _EMBEDDINGS) or next(mod.children(), None) is not None:
        return None
    params = dict(mod.named_parameters(recurse=False))
    w, b = params.get("weight"), params.get("bias")
    if w is None or w.dim() != 2 or not w.is_floating_point() or not set(params) <= {"weight", "bias"} \
            or (b is not None and b.dim() != 1):
        return None
    return w, b


# module -> "linear" | "transposed" | None, probed once per module
_ORIENTATION: "weakref.WeakKeyDictionary[nn.Module, Optional[str]]" = weakref.WeakKeyDictionary()


def _linear_orientation(mod: nn.Module) -> Optional[str]:
    """Whether ``mod`` computes a Linear: "linear" for y = x W^T + b (nn.Linear; a subclass of it or a
    layer of another class whose forward is that), "transposed" for y = x W + b with W stored (in, out)
    (Hugging Face's Conv1D), None otherwise.  Layers ipex_lite has no name for are judged by their
    parameters (a leaf holding a 2-D floating weight and at most a bias) and a probe input."""
    if type(mod) is nn.Linear:
        return "linear"
    if mod in _ORIENTATION:
        return _ORIENTATION[mod]
    found = None
    wb = _linear_like_params(mod)
    if wb is not None:
        w, b = wb
        g = torch.Generator().manual_seed(0)
        candidates = {"linear": (w.shape[1], w.shape[0], lambda x: F.linear(x, w, b)),
                      "transposed": (w.shape[0], w.shape[1], lambda x: x @ w + (0 if b is None else b))}
        for name, (n_in, n_out, ref) in candidates.items():
            if b is not None and b.numel() != n_out:
                continue
            x = torch.randn(3, 2, n_in, generator=g).to(w.dtype)
            with torch.no_grad():
                try:
                    got = mod(x)
                except Exception:  # noqa: BLE001 - this orientation's shape is not what it takes
                    continue
                want = ref(x)
            if isinstance(got, torch.Tensor) and got.shape == want.shape and torch.allclose(got, want, 1e-4, 1e-5):
                found = name
                break
    _ORIENTATION[mod] = found
    return found


def _packable(mod: nn.Module) -> bool:
    if type(mod) in (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear):
        return mod.weight.is_floating_point()
    if type(mod) is nn.ConvTranspose2d:
        return mod.padding_mode == "zeros"
    return _linear_orientation(mod) is not None


def _describe(layer, bn, unary, binary) -> str:
    parts = [type(layer).__name__]
    if bn is not None:
        parts.append(f"{bn if isinstance(bn, str) else type(bn).__name__} folded")
    if binary:
        parts.append("residual add fused")
    if unary:
        parts.append(f"{unary} fused")
    return " + ".join(parts)


# ---------------------------------------------------------------- graph rewrite
def _rewrite_graph(gm: fx.GraphModule, prefix: str, knobs: Knobs, report: Report) -> None:
    modules = dict(gm.named_modules())
    graph = gm.graph
    for n in list(graph.nodes):  # Identity (e.g. a replaced Dropout) must not hide a pattern
        if n.op == "call_module" and type(modules.get(n.target)) is nn.Identity and len(n.args) == 1 \
                and not n.kwargs and isinstance(n.args[0], fx.Node):
            n.replace_all_uses_with(n.args[0])
            graph.erase_node(n)
    if knobs.fuse_post_ops:
        _use_inference_kernels(graph, prefix, report)
    calls: Dict[str, int] = {}
    for n in graph.nodes:
        if n.op == "call_module":
            calls[n.target] = calls.get(n.target, 0) + 1

    if knobs.concat_linear:
        _concat_linears(gm, modules, calls, prefix, knobs, report)

    for node in list(graph.nodes):
        if node.op != "call_module" or node.target not in modules:
            continue
        layer = modules[node.target]
        if not _packable(layer) or len(node.args) != 1 or node.kwargs:
            continue
        path = _join(prefix, node.target)
        if calls[node.target] > 1:  # one module, several call sites: pack it, fuse nothing
            if not isinstance(modules[node.target], _Packed):
                packed = _make_packed(layer, None, None, None, False, knobs)
                _set(gm, node.target, packed)
                modules[node.target] = packed
                report.add(path, "prepacked", f"{type(layer).__name__}; called {calls[node.target]} times, not fused")
            continue
        bn = unary = spec = other = None
        absorbed = [node]  # the layer and the nodes fused into it, each the only user of the one before
        user = _only_user(node)
        fold = knobs.linear_bn_folding if isinstance(layer, nn.Linear) else knobs.conv_bn_folding
        if fold and user is not None and user.op == "call_module" and len(user.args) == 1 and \
                calls.get(user.target) == 1 and _bn_foldable(layer, modules[user.target]):
            bn = modules[user.target]
            absorbed.append(user)
            user = _only_user(user)
            bn_act = _bn_subclass_activation(bn) if _bn_subclass(bn) else ()
            if bn_act:  # the norm's own activation runs before anything after it: fused, nothing more
                unary, spec = bn_act
                user = None
        if knobs.fuse_post_ops and user is not None and not isinstance(layer, nn.ConvTranspose2d) and _is_add(user):
            a, b = user.args
            if a is not b:
                other = b if a is absorbed[-1] else a
                absorbed.append(user)
                user = _only_user(user)
        if knobs.fuse_post_ops and user is not None and not (other is not None and isinstance(layer, nn.Linear)):
            act = _activation_of_node(user, modules)
            if act is not None:
                unary, spec = act
                absorbed.append(user)
        packed = _make_packed(layer, bn, unary, spec, other is not None, knobs)
        _set(gm, node.target, packed)
        modules[node.target] = packed
        if len(absorbed) > 1:
            tail = absorbed[-1]
            with graph.inserting_before(tail):  # after `other` is computed
                fused = graph.call_module(node.target, (node.args[0],) if other is None else (node.args[0], other))
            tail.replace_all_uses_with(fused)
            for n in reversed(absorbed):
                graph.erase_node(n)
        report.add(path, "prepacked" if knobs.weights_prepack else "folded", _describe(layer, bn, unary,
                                                                                       other is not None))
        if bn is not None:
            report.add(_join(prefix, _target_of(modules, bn)), "folded", f"into {path}")
    _keep_channels_last(gm, prefix, report)
    _mark_inplace_adds(gm)
    graph.lint()
    gm.recompile()


def _keep_channels_last(gm: fx.GraphModule, prefix: str, report: Report) -> None:
    """``conv(x).contiguous()`` converts the packed convolution's channels_last output to NCHW; where
    the value only reaches packed layers (directly or through concatenations and adds, whose outputs
    follow their inputs' layout), the conversion only costs a copy, and makes a concatenation with
    channels_last tensors mix layouts (timm's CSP stages: ~2 full-activation copies per stage).  A
    value that reaches anything else (a ``view``, the model's output) keeps its ``contiguous()``."""
    modules = dict(gm.named_modules())

    def layout_blind(user: fx.Node) -> bool:
        if user.op == "call_module":
            return isinstance(modules.get(user.target), _Packed)
        return user.op == "call_function" and user.target in (torch.cat, torch.add, operator.add) and \
            bool(user.users) and all(layout_blind(u) for u in user.users)
    dropped = 0
    for n in list(gm.graph.nodes):
        src = n.args[0] if n.op == "call_method" and n.target == "contiguous" and len(n.args) == 1 else None
        if n.kwargs or not isinstance(src, fx.Node) or src.op != "call_module" or \
                not isinstance(modules.get(src.target), PackedConv) or modules[src.target].nd != 2:
            continue
        if n.users and all(layout_blind(u) for u in n.users):
            n.replace_all_uses_with(src)
            gm.graph.erase_node(n)
            dropped += 1
    if dropped:
        report.add(prefix, "channels_last", f"{dropped} .contiguous() call(s) after a convolution dropped: their "
                   "users take channels_last as it is")


def _use_inference_kernels(graph: fx.Graph, prefix: str, report: Report) -> None:
    """F.scaled_dot_product_attention and F.max_pool2d calls go through
    ipex_lite's wrappers, which run its CPU kernels when they apply
    (inference, no dropout / no indices) and torch's own otherwise."""
    counts = {"attention": 0, "max_pool2d": 0}
    for n in graph.nodes:
        if n.op == "call_function" and n.target is F.scaled_dot_product_attention:
            n.target = fused_sdpa
            counts["attention"] += 1
        elif n.op == "call_function" and n.target is F.max_pool2d:
            n.target = fast_max_pool2d
            counts["max_pool2d"] += 1
    if counts["attention"]:
        report.add(prefix, "attention", f"{counts['attention']} scaled_dot_product_attention call(s) -> ipex_lite "
                   "kernel (torch's when training or with dropout)")
    if counts["max_pool2d"]:
        report.add(prefix, "max_pool2d", f"{counts['max_pool2d']} F.max_pool2d call(s) -> ipex_lite kernel "
                   "(no indices; torch's when training)")


class InferenceMaxPool2d(nn.MaxPool2d):
    """nn.MaxPool2d that pools through ipex_lite's channels-last kernel when
    no gradient is needed (torch computes int64 indices it then drops)."""

    def forward(self, x):
        return fast_max_pool2d(x, self.kernel_size, self.stride, self.padding, self.dilation, self.ceil_mode,
                               self.return_indices)


def _use_fast_pooling(model: nn.Module, report: Report) -> None:
    for parent_name, parent in list(model.named_modules()):
        for name, child in list(parent.named_children()):
            if type(child) is nn.MaxPool2d and not child.return_indices:
                fast = InferenceMaxPool2d(child.kernel_size, child.stride, child.padding, child.dilation,
                                          return_indices=False, ceil_mode=child.ceil_mode)
                setattr(parent, name, fast)
                report.add(_join(parent_name, name), "replaced", "MaxPool2d -> ipex_lite kernel (no indices)")


def _use_hf_attention(mod: nn.Module, prefix: str, report: Report) -> None:
    """The outermost transformers models in the tree (the model itself, or one a user wrapped)."""
    if is_transformers_model(mod):
        report.add(prefix, "attention", use_ipex_lite_attention(mod))
        return
    for name, child in mod.named_children():
        _use_hf_attention(child, _join(prefix, name), report)


def _swap_note(mod: nn.Module) -> str:
    if isinstance(mod, nn.MultiheadAttention):
        served = mod._qkv_same_embed_dim and mod.bias_k is None and not mod.add_zero_attn
        return ("MultiheadAttention -> packed QKV/out projections + ipex_lite attention kernel for calls "
                "without attention weights" + ("" if served else " (this one's options: stock forward)"))
    if isinstance(mod, nn.TransformerEncoder):
        return ("TransformerEncoder -> ipex_lite's: its layers run on the padded batch (no nested tensors; "
                "padded positions zeroed where stock's nested path would zero them)")
    act = _activation_name(mod.activation)
    return (f"{type(mod).__name__} -> packed attention projections and feed-forward GEMMs "
            f"({act + ' fused into linear1, ' if act else ''}residual adds fused into the GEMMs) + ipex_lite "
            "attention kernel")


def _use_fast_transformers(mod: nn.Module, prefix: str, knobs: Knobs, report: Report) -> nn.Module:
    """torch's MultiheadAttention and Transformer* modules -> ipex_lite.nn's (their eval fast paths read
    the weights themselves, so their packed children alone would never be called); returns what
    replaces ``mod``."""
    fast = fast_transformer_module(mod, knobs.dtype, knobs.weights_prepack)
    if fast is not None:
        report.add(prefix, "replaced", _swap_note(mod))
        if not isinstance(fast, nn.TransformerEncoder):
            return fast  # its children are ipex_lite's already
        mod = fast
    elif _torch_composite(mod) and not isinstance(mod, (nn.Transformer, nn.TransformerDecoder)):
        return mod
    for name, child in list(mod.named_children()):
        new = _use_fast_transformers(child, _join(prefix, name), knobs, report)
        if new is not child:
            setattr(mod, name, new)
    return mod


def _mark_inplace_adds(gm: fx.GraphModule) -> None:
    """A fused conv + add may write the sum into ``other`` when that is the
    fresh output of another packed layer and nothing reads it afterwards:
    no new activation buffer (and no page faults on it) per residual block."""
    modules = dict(gm.named_modules())
    order = {n: i for i, n in enumerate(gm.graph.nodes)}
    for node in gm.graph.nodes:
        mod = modules.get(node.target) if node.op == "call_module" else None
        if not isinstance(mod, PackedConv) or not mod.binary or len(node.args) != 2:
            continue
        other = node.args[1]
        src = modules.get(other.target) if other.op == "call_module" else None
        fresh = isinstance(src, (PackedConv, PackedConvTranspose))
        # conv(x) + x: the convolution still reads x, so the sum cannot overwrite it
        if fresh and node.args[0] is not other and all(order[u] < order[node] for u in other.users if u is not node):
            mod.inplace_add = True


def _target_of(modules: Dict[str, nn.Module], mod: nn.Module) -> str:
    return next(name for name, m in modules.items() if m is mod)


def _set(root: nn.Module, target: str, mod: nn.Module) -> None:
    parent_name, _, name = target.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    setattr(parent, name, mod)


def _concat_linears(gm, modules, calls, prefix, knobs, report):
    """Parallel Linears reading the same tensor (Q, K, V) become one GEMM."""
    graph = gm.graph
    for node in list(graph.nodes):
        group = [u for u in node.users if u.op == "call_module" and len(u.args) == 1 and not u.kwargs
                 and u.args[0] is node and calls.get(u.target) == 1 and type(modules.get(u.target)) is nn.Linear]
        if len(group) < 2:
            continue
        in_features = {modules[u.target].in_features for u in group}
        if len(in_features) != 1:
            continue
        group.sort(key=lambda u: list(graph.nodes).index(u))
        linears = [modules[u.target] for u in group]
        name = group[0].target.replace(".", "_") + "_concat"
        merged = PackedLinear(None, dtype=knobs.dtype, prepack=knobs.weights_prepack, concat=linears)
        gm.add_module(name, merged)
        with graph.inserting_before(group[0]):
            call = graph.call_module(name, (node,))
            pieces = [graph.call_function(operator.getitem, (call, i)) for i in range(len(group))]
        for u, piece in zip(group, pieces):
            u.replace_all_uses_with(piece)
            graph.erase_node(u)
            calls[u.target] = 0
        report.add(_join(prefix, name), "concatenated",
                   " + ".join(_join(prefix, u.target) for u in group) + " -> one Linear")


# ---------------------------------------------------------------- module-local rewrite
def _rewrite_sequential(seq: nn.Sequential, prefix: str, knobs: Knobs, report: Report) -> None:
    names = list(seq._modules)
    i = 0
    while i < len(names):
        layer = seq._modules[names[i]]
        if not _packable(layer):
            i += 1
            continue
        j = i + 1
        bn = unary = spec = None
        fold = knobs.linear_bn_folding if isinstance(layer, nn.Linear) else knobs.conv_bn_folding
        folded_type = None
        bn_act = ()
        if fold and j < len(names) and _bn_foldable(layer, seq._modules[names[j]]):
            folded_type = type(seq._modules[names[j]]).__name__
            if _bn_subclass(seq._modules[names[j]]):
                bn_act = _bn_subclass_activation(seq._modules[names[j]])
            bn = seq._modules[names[j]] = FoldedBatchNorm(seq._modules[names[j]])
            report.add(_join(prefix, names[j]), "folded", f"{folded_type} into {_join(prefix, names[i])}")
            j += 1
        if bn_act:
            unary, spec = bn_act
        elif knobs.fuse_post_ops and j < len(names):
            act = _activation_of_module(seq._modules[names[j]])
            if act is not None:
                unary, spec = act
                seq._modules[names[j]] = nn.Identity()
                j += 1
        seq._modules[names[i]] = _make_packed(layer, bn, unary, spec, False, knobs)
        report.add(_join(prefix, names[i]), "prepacked" if knobs.weights_prepack else "folded",
                   _describe(layer, folded_type, unary, False))
        i = j


def _rewrite(mod: nn.Module, prefix: str, knobs: Knobs, report: Report) -> nn.Module:
    """Returns the rewritten module (a GraphModule, a packed module, or ``mod`` with rewritten children)."""
    if isinstance(mod, _Packed):
        return mod
    if _packable(mod):
        report.add(prefix, "prepacked", type(mod).__name__)
        return _make_packed(mod, None, None, None, False, knobs)
    if not any(_packable(m) for m in mod.modules()):
        return mod
    builtin = type(mod).__module__.split(".")[0] == "torch"
    if builtin and not isinstance(mod, (nn.Sequential, nn.ModuleList, nn.ModuleDict)):
        return mod  # torch's own composite modules (MultiheadAttention, Transformer*) use their weights directly
    if isinstance(mod, nn.Sequential):  # runs of layer, BatchNorm, activation: fused in place, indexing kept
        _rewrite_sequential(mod, prefix, knobs, report)
    elif knobs.graph_mode and not builtin:
        try:
            gm = _trace(mod)
        except Exception as e:  # data-dependent control flow etc.: rewrite the children instead
            report.add(prefix, "not traced", f"{type(e).__name__}: {str(e).splitlines()[0][:120]}")
        else:
            try:
                _keep_attributes(mod, gm)
                _rewrite_graph(gm, prefix, knobs, report)
                return gm
            except Exception as e:
                report.add(prefix, "graph rewrite failed, kept module rewrites",
                           f"{type(e).__name__}: {str(e).splitlines()[0][:120]}")
    for name, child in list(mod.named_children()):
        new = _rewrite(child, _join(prefix, name), knobs, report)
        if new is not child:
            setattr(mod, name, new)
    return mod


def _keep_attributes(src: nn.Module, gm: fx.GraphModule) -> None:
    """Plain attributes of the user's module (config values) stay readable on the graph module."""
    for k, v in src.__dict__.items():
        if not k.startswith("_") and k not in gm.__dict__ and k != "training":
            gm.__dict__[k] = v
    # submodules the graph does not call (e.g. folded BatchNorms' siblings) keep their state_dict keys
    for name, child in src.named_children():
        if not hasattr(gm, name):
            gm.add_module(name, child)


def _replace_dropout(mod: nn.Module, prefix: str, report: Report) -> None:
    for name, child in list(mod.named_children()):
        if isinstance(child, _DROPOUTS):
            setattr(mod, name, nn.Identity())
            report.add(_join(prefix, name), "replaced", f"{type(child).__name__} -> Identity")
        else:
            _replace_dropout(child, _join(prefix, name), report)


def _torch_composite(m: nn.Module) -> bool:
    """One of torch.nn's own modules that computes with its children's weights itself."""
    return (type(m).__module__.startswith("torch.nn") and type(m) is not nn.Module and next(m.children(), None)
            is not None and not isinstance(m, (nn.Sequential, nn.ModuleList, nn.ModuleDict, _Packed)))


def _floating_inputs_to_weight_dtype(module, args, kwargs):
    # read at call time: auto_kernel_selection switches the weights between fp32 and bf16
    dtype = next((p.dtype for p in module.parameters() if p.is_floating_point()), None)
    if dtype is None:
        return None

    def cast(a):
        return a.to(dtype) if isinstance(a, torch.Tensor) and a.is_floating_point() else a
    return tuple(cast(a) for a in args), {k: cast(v) for k, v in kwargs.items()}


def _cast_rest_to_bf16(model: nn.Module, report: Report) -> list:
    """Modules ipex_lite does not pack compute in bf16 too (norms keep fp32
    parameters: their kernels take bf16 inputs with fp32 weights).  Returns
    what was replaced, as (module, name, original) to undo it."""
    undo = []
    bn_refs = {id(m.bn) for m in model.modules() if isinstance(m, _Packed) and m.bn is not None}
    inside_hooked = set()
    for name, m in model.named_modules():
        if _torch_composite(m) and id(m) not in inside_hooked and any(True for _ in m.parameters()):
            # torch's composite modules (TransformerEncoder, MultiheadAttention, ...) require their input
            # and weights to share a dtype: their weights are cast below, their inputs by this hook
            m.register_forward_pre_hook(_floating_inputs_to_weight_dtype, with_kwargs=True)
            inside_hooked.update(id(sub) for sub in m.modules())
            report.add(name, "bf16", f"torch's {type(m).__name__} reads its weights directly: its floating "
                       "inputs (masks included) are cast to its weights' dtype")
        if isinstance(m, (_Packed, FoldedBatchNorm, InferenceMultiheadAttention) + _NORMS) or id(m) in bn_refs:
            continue  # (the attention's projections are packed modules that compute in the model's dtype)
        params = [p for p in m.parameters(recurse=False) if p.is_floating_point() and p.dtype != torch.bfloat16]
        bufs = [b for b in m.buffers(recurse=False) if b.is_floating_point() and b.dtype != torch.bfloat16]
        if not params and not bufs:
            continue
        for pname, p in list(m.named_parameters(recurse=False)):
            if p.is_floating_point():
                undo.append((p, "data", p.data))
                p.data = p.data.to(torch.bfloat16)
        for bname, b in list(m.named_buffers(recurse=False)):
            if b.is_floating_point():
                undo.append((m, bname, b))
                setattr(m, bname, b.to(torch.bfloat16))
        report.add(name, "bf16", f"{type(m).__name__} parameters cast to bfloat16")
    return undo


def _compute_kind(mod: nn.Module) -> Optional[str]:
    """What kind of compute layer ``mod`` is, judged by its type or, for layers ipex_lite has no name
    for, by its parameters: a leaf holding a 2-D floating weight (and at most a bias) that is not an
    embedding is a Linear-like GEMM (Hugging Face's Conv1D, a custom Linear subclass)."""
    if isinstance(mod, _Packed):
        return None
    if isinstance(mod, nn.MultiheadAttention):
        return "attention"
    if isinstance(mod, (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)):
        return "convolution"
    if isinstance(mod, nn.Linear):
        return "linear"
    return "linear-like" if _linear_like_params(mod) is not None else None


def _why_left_alone(mod: nn.Module, ancestors: List[nn.Module]) -> str:
    # torch's own composite modules; plain containers (nn.Module is what fx makes for a graph's paths) aside
    composite = next((a for a in ancestors if _torch_composite(a)), None)
    if composite is not None and composite is not mod:
        return (f"inside torch's {type(composite).__name__}, which reads its weights directly (its inference "
                "fast path), so a packed replacement would never be called")
    if isinstance(mod, nn.MultiheadAttention):
        return ("nn.MultiheadAttention reads in_proj_weight / out_proj directly; ipex_lite replaces it when "
                "optimize packs weights (weights_prepack and fuse_post_ops on)")
    if not any(p.is_floating_point() for p in mod.parameters(recurse=False)):
        return "weights are not floating point"
    if type(mod) not in (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear, nn.ConvTranspose2d):
        if isinstance(mod, (nn.Conv1d, nn.Conv2d, nn.Conv3d)):
            return f"{type(mod).__name__} subclasses {type(mod).__mro__[1].__name__} and may change its forward"
        if isinstance(mod, (nn.ConvTranspose1d, nn.ConvTranspose3d)):
            return f"{type(mod).__name__}: only ConvTranspose2d is packed"
        return (f"{type(mod).__name__}'s forward is neither x W^T + b nor x W + b on a probe input, so it is "
                "not packed as a Linear")
    if isinstance(mod, nn.ConvTranspose2d) and mod.padding_mode != "zeros":
        return f"padding_mode={mod.padding_mode!r}"
    return "not reached by the rewrite (called with extra arguments, or under a module that failed to trace)"


def _report_left_alone(model: nn.Module, report: Report) -> int:
    """Adds every compute layer that was neither packed nor folded away, with the reason; returns
    how many layers ipex_lite changed."""
    changed = 0
    stack = [("", model, [])]
    while stack:
        path, mod, ancestors = stack.pop()
        if isinstance(mod, (_Packed, InferenceMultiheadAttention)):
            changed += 1
            continue
        kind = _compute_kind(mod)
        if kind is not None:
            report.add(path, "left alone", f"{type(mod).__name__} ({kind}): {_why_left_alone(mod, ancestors)}")
        for name, child in reversed(list(mod.named_children())):
            stack.append((_join(path, name), child, ancestors + [mod]))
    return changed


def optimize_for_inference(model: nn.Module, knobs: Knobs, sample_input=None) -> nn.Module:
    report = Report()
    if knobs.fuse_post_ops:
        _use_hf_attention(model, "", report)
    if knobs.replace_dropout_with_identity:
        _replace_dropout(model, "", report)
    model = _rewrite(model, "", knobs, report)
    if knobs.fuse_post_ops:
        _use_fast_pooling(model, report)
        if knobs.weights_prepack:
            model = _use_fast_transformers(model, "", knobs, report)
    if knobs.conv_winograd and knobs.weights_prepack:
        _use_winograd(model, report)
    if knobs.weights_prepack and knobs.dtype == torch.float32:
        _default_fp32_linear_kernels(model, report)  # auto_kernel_selection with a sample refines them
    if _report_left_alone(model, report) == 0 and any(_compute_kind(m) for m in model.modules()):
        warnings.warn("ipex_lite.optimize changed none of this model's compute layers; ipex_lite.explain(model) "
                      "says why for each", stacklevel=4)
    model.__dict__["_ipex_lite_report"] = report
    args = None if sample_input is None else sample_input if isinstance(sample_input, tuple) else (sample_input,)
    if knobs.dtype == torch.bfloat16:
        if knobs.auto_kernel_selection:
            _select_kernels(model, args, report)
        else:
            _cast_rest_to_bf16(model, report)
    if knobs.auto_kernel_selection and knobs.weights_prepack:
        if args is None:
            report.add("", "auto_kernel_selection", "fp32 Linear kernels: the defaults (pass sample_input to "
                       "time oneDNN, MKL and ATen per layer)")
        else:
            _choose_fp32_linear_kernels(model, args, report)
    if args is not None:
        with torch.no_grad():
            model(*args)  # packs every weight for the real input shapes
    return model


def _default_fp32_kernel(m: PackedLinear) -> str:
    """On Intel CPUs, fp32 Linears with no activation, or a GELU, run MKL's packed sgemm (IPEX's fp32
    default), the residual add and the GELU applied in place after it: on BERT-base's projections 3%
    faster than oneDNN's packed GEMM, and on its 768 -> 3072 GELU layers MKL + an in-place GELU
    beats oneDNN's fused erf (4-layer encoder, batch 8 x 128: 214 -> 205 ms, interleaved).  MKL
    takes slower code paths on other vendors' CPUs (AMD EPYC, AVX-512: 172-195 GFLOP/s against
    oneDNN's 215-220 on Llama/BERT shapes; Llama 4 x 128 265 -> 233 ms with oneDNN throughout), so
    there, and for other activations (which oneDNN fuses nearly for free), oneDNN."""
    intel = _cpu_vendor() == "GenuineIntel"
    return "mkl" if intel and "mkl" in PackedLinear.KERNELS and m.unary in (None, "gelu", "gelu_tanh") else "onednn"


def _cpu_vendor() -> str:
    from . import isa_info
    return isa_info().get("vendor", "")


def _default_fp32_linear_kernels(model: nn.Module, report: Report) -> None:
    count = 0
    for _, m in _packed_layers(model):  # the caller checked fp32 and prepacking
        kernel = _default_fp32_kernel(m) if isinstance(m, PackedLinear) else None
        if kernel is not None and kernel != m.kernel:
            m.set_kernel(kernel)
            count += 1
    if count:
        report.add("", "fp32 Linear kernel", f"MKL packed sgemm for {count} layer(s) without an activation or with "
                   "a GELU (applied in place after it); oneDNN (activation fused) for the rest")


def _use_winograd(model: nn.Module, report: Report) -> None:
    for name, m in model.named_modules():
        if isinstance(m, PackedConv) and m.winograd_eligible:
            m.use_winograd(True)
            report.add(name, "winograd", "3x3 stride-1 convolution through Winograd F(2x2, 3x3) when computing in fp32")


def _time_interleaved(calls: Dict, reps: int = 7) -> Dict:
    """Median time of each call, measured in interleaved rounds (A B C A B C ...) so that a busy
    neighbour or a clock change weighs on every candidate alike."""
    for fn in calls.values():
        fn()  # packs
    times = {k: [] for k in calls}
    for _ in range(reps):
        for k, fn in calls.items():
            t = time.perf_counter()
            fn()
            times[k].append(time.perf_counter() - t)
    return {k: sorted(v)[len(v) // 2] for k, v in times.items()}


def _fastest(timing: Dict, default, margin: float = 0.03):
    """The fastest candidate, or ``default`` while it is within ``margin`` of it: per-layer times on
    a shared machine move by a few percent, and a choice made on noise costs more than it saves."""
    best = min(timing, key=timing.get)
    return default if default in timing and timing[default] <= timing[best] * (1 + margin) else best


def _time_variants(m: _Packed, configures: Dict, args) -> Dict:
    """Median time of ``m(*args)`` under each configuration, timed interleaved on shallow copies of
    ``m`` (same parameters, their own pack cache) so that nothing repacks between calls."""
    calls = {}
    for key, configure in configures.items():
        c = copy.copy(m)
        c.packs = PackCache()
        if hasattr(c, "inplace_add"):
            c.inplace_add = False  # timing calls must not write into the captured residual
        configure(c)
        calls[key] = lambda c=c: c(*args)
    return _time_interleaved(calls)


def _set_compute(m: _Packed, dtype: torch.dtype, kernel: Optional[str]) -> None:
    """A bf16 model's layer computes in ``dtype`` (output bf16); a Linear computing in fp32 uses ``kernel``."""
    m.set_compute_dtype(dtype, torch.bfloat16)
    if kernel is not None:
        m.set_kernel(kernel)


def _packed_layers(model: nn.Module) -> List[tuple]:
    """(name, module) of every packed layer, with the attention modules' QKV projections (held outside
    the module tree so the state_dict keeps nn.MultiheadAttention's keys) as "<attention>.in_proj"."""
    layers = []
    for name, m in model.named_modules():
        if isinstance(m, _Packed):
            layers.append((name, m))
        elif isinstance(m, InferenceMultiheadAttention) and isinstance(m.in_proj, _Packed):
            layers.append((_join(name, "in_proj"), m.in_proj))
    return layers


def _all_fp32(model: nn.Module) -> None:
    """Every packed layer computes in fp32, Linears on their default fp32 kernel."""
    for _, m in _packed_layers(model):
        m.set_compute_dtype(torch.float32)
        if isinstance(m, PackedLinear):
            m.set_kernel(_default_fp32_kernel(m))


def _layer_states(layers) -> list:
    """Each packed layer's compute configuration and the pack cache built for it (see _use_config)."""
    return [(m.dtype, m.out_dtype, getattr(m, "kernel", None), m.packs) for m in layers]


def _select_kernels(model: nn.Module, args, report: Report) -> None:
    """bf16 model with auto_kernel_selection: the fastest of
    (a) the whole model in fp32 (no AMX: bf16 GEMM peaks below fp32 here), and
    (b) bf16 with each packed layer timed in bf16 and in fp32 (bf16 in and out) on its real input.
    Both are at least as accurate as bf16.  Without a sample input: (a) on
    CPUs without AMX, plain bf16 on CPUs with it."""
    from . import isa_info
    if args is None:
        if isa_info().get("amx_bf16"):
            _cast_rest_to_bf16(model, report)
            report.add("", "auto_kernel_selection", "AMX present: bf16 kernels (no sample_input to time)")
        else:
            _all_fp32(model)
            report.add("", "auto_kernel_selection", "no AMX: whole model kept in fp32, which is faster than bf16 "
                       "here and more accurate (pass sample_input to time each layer)")
        return
    layers = [m for _, m in _packed_layers(model)]
    with torch.no_grad():
        # Both configurations stay built (each layer's packs for either) and are timed interleaved:
        # on BERT they come within 2% of each other, closer than back-to-back timing can tell apart.
        _all_fp32(model)
        fp32 = _layer_states(layers)
        for m in layers:
            m.packs = PackCache()  # the bf16 side packs apart from the fp32 side
        undo = _cast_rest_to_bf16(model, report)
        recast = [(owner, name, getattr(owner, name)) for owner, name, _ in undo]
        for m in layers:
            m.set_compute_dtype(torch.bfloat16)
        _per_layer_choice(model, args, report)
        configs = {"fp32": (list(reversed(undo)), fp32), "bf16": (recast, _layer_states(layers))}

        def run(name):
            _use_config(layers, *configs[name])
            model(*args)
        timing = _time_interleaved({k: (lambda k=k: run(k)) for k in configs}, reps=3)
        choice = _fastest(timing, "fp32")  # the more accurate one unless the mix is clearly faster
        _use_config(layers, *configs[choice])
        t_fp32, t_bf16 = timing["fp32"] * 1e3, timing["bf16"] * 1e3
        if choice == "fp32":
            report.entries = [e for e in report.entries if e[1] not in ("kernel", "bf16")]
            report.add("", "auto_kernel_selection", f"whole model in fp32: {t_fp32:.1f} ms per sample call "
                       f"against {t_bf16:.1f} ms for the best bf16 mix")
        else:
            report.add("", "auto_kernel_selection", f"bf16 with per-layer kernels: {t_bf16:.1f} ms per "
                       f"sample call against {t_fp32:.1f} ms for the whole model in fp32")


def _use_config(layers, casts, states) -> None:
    """Puts back one timed configuration: the other modules' parameters and buffers, and each packed
    layer's compute dtype, output dtype, Linear kernel and the pack cache built for them."""
    for owner, name, value in casts:
        setattr(owner, name, value)
    for m, (dtype, out_dtype, kernel, packs) in zip(layers, states):
        m.dtype, m.out_dtype, m.packs = dtype, out_dtype, packs
        if kernel is not None:
            m.kernel = kernel


def _layer_inputs(model: nn.Module, layers, args) -> dict:
    """The positional inputs each of ``layers`` (name, module) receives in ``model(*args)``."""
    inputs = {}
    hooks = [m.register_forward_pre_hook(lambda mod, a, _n=name: inputs.setdefault(_n, a)) for name, m in layers]
    try:
        with torch.no_grad():
            model(*args)
    finally:
        for h in hooks:
            h.remove()
    return inputs


def _choose_fp32_linear_kernels(model: nn.Module, args, report: Report) -> None:
    """Each fp32 PackedLinear keeps the fastest of oneDNN packed, MKL packed and ATen on its real input
    (all fp32 GEMMs of the same operands: the choice moves results by summation order only)."""
    layers = [(name, m) for name, m in _packed_layers(model) if isinstance(m, PackedLinear)
              and m.dtype == torch.float32 and m.prepack and m.out_dtype is None]
    inputs = _layer_inputs(model, layers, args)
    with torch.no_grad():
        for name, m in layers:
            if name not in inputs:
                continue
            timing = _time_variants(m, {k: (lambda c, k=k: c.set_kernel(k)) for k in PackedLinear.KERNELS},
                                    inputs[name])
            best = _fastest(timing, _default_fp32_kernel(m))
            m.set_kernel(best)
            report.add(name, "kernel", f"fp32 {best} (" + ", ".join(f"{k} {t * 1e3:.3f} ms" for k, t in
                                                                      timing.items()) + ")")


def _per_layer_choice(model: nn.Module, args, report: Report) -> None:
    """Each layer of a bf16 model computes in bf16 or in fp32 (output bf16), whichever is faster on
    its real input; a Linear computing in fp32 also picks its GEMM kernel (oneDNN, MKL, ATen)."""
    packed = _packed_layers(model)
    inputs = _layer_inputs(model, packed, args)
    for name, m in packed:
        if name not in inputs:
            continue
        fp32_kernels = m.KERNELS if isinstance(m, PackedLinear) else (None,)
        candidates = [(torch.bfloat16, None)] + [(torch.float32, k) for k in fp32_kernels]
        timing = _time_variants(m, {cand: (lambda c, cand=cand: _set_compute(c, *cand)) for cand in candidates},
                                inputs[name])
        best_dt, best_kernel = _fastest(timing, candidates[0])  # bf16 unless fp32 is clearly faster
        _set_compute(m, best_dt, best_kernel)
        labels = {c: "bf16" if c[0] == torch.bfloat16 else " ".join(filter(None, ("fp32", c[1]))) for c in timing}
        report.add(name, "kernel", f"{str(best_dt).replace('torch.', '')} compute"
                   + (f", {best_kernel}" if best_kernel else "") + " ("
                   + ", ".join(f"{labels[c]} {t * 1e3:.3f} ms" for c, t in timing.items()) + ")")


def explain(model: nn.Module) -> str:
    """The report of what ``ipex_lite.optimize`` did to ``model`` (per module: folded,
    packed, fused, replaced, skipped and why)."""
    report = model.__dict__.get("_ipex_lite_report")
    if report is None:
        return "this model was not produced by ipex_lite.optimize"
    return str(report)


__all__ = ["optimize_for_inference", "explain", "Knobs", "Report", "FoldedBatchNorm"]
