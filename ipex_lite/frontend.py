"""``ipex_lite.optimize`` (IPEX signature).

Training mode (an optimizer is given) with ``dtype=torch.bfloat16``:
the weights of Linear / Conv / Embedding / EmbeddingBag become split-BF16
(the module computes with the bf16 top half, the low 16 bits live in the
optimizer state as ``"trail"``: 4 bytes per parameter, exact fp32 master),
and the optimizer is replaced by the fused ipex_lite optimizer of the same
type with the same param groups, hyperparameters and state.  Run the forward
under ``torch.autocast("cpu", dtype=torch.bfloat16)``.  ``model.state_dict()``
returns the exact fp32 weights under the original keys and
``model.load_state_dict()`` accepts them.  On CPUs without AMX, where a bf16
GEMM is about half as fast as an fp32 one, the plain ``nn.Linear`` layers
also become ``ipex_lite.nn.Fp32ComputeLinear``: the same bf16 weights,
activations and gradients, with the GEMMs computed in fp32 on the widened
bf16 values (``auto_kernel_selection=False`` keeps bf16 GEMMs).

Inference mode (``optimize(model.eval(), dtype=...)``, no optimizer): see
``ipex_lite._inference``.  Level O1 folds BatchNorm into the Conv/Linear
before it, replaces Dropout with Identity, fuses activations and residual
adds into the layer, and prepacks Conv/ConvTranspose/Linear weights for
oneDNN (channels_last activations); ``dtype=torch.bfloat16`` computes those
layers in bf16.  Also at O1: fp32 3x3 stride-1 convolutions run through
ipex_lite's Winograd F(2x2, 3x3) kernel (``conv_winograd``, an ipex_lite knob),
and ``F.scaled_dot_product_attention`` / max pooling through its inference
kernels.  O0 changes nothing.  An explicit knob overrides the level.
``verbose=True`` prints what was done to each module; ``ipex_lite.explain``
returns the same report later.
"""
import copy
import warnings
from typing import Dict, List, Optional

import torch
from torch import nn

from . import optim as lite_optim
from ._inference import Knobs, optimize_for_inference
from ._inference import explain as _explain
from .nn.linear import Fp32ComputeLinear

__all__ = ["optimize"]

ops = torch.ops.ipex_lite

_FUSED = {
    torch.optim.SGD: lite_optim.SGD,
    torch.optim.Adam: lite_optim.Adam,
    torch.optim.AdamW: lite_optim.AdamW,
    torch.optim.Adagrad: lite_optim.Adagrad,
    lite_optim.Lamb: lite_optim.Lamb,
}
_SPLIT_MODULES = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Embedding, nn.EmbeddingBag)
_LEVELS = ("O0", "O1")


def _fused_class(optimizer):
    for base, fused in _FUSED.items():
        if type(optimizer) is base or type(optimizer) is fused:
            return fused
    return None


def _clone_state_value(key, v):
    # fresh tensors: the rebuilt optimizer must not step the caller's state; fp32 except the raw-bit trail
    if not torch.is_tensor(v):
        return copy.deepcopy(v)
    v = v.detach().clone()
    return v.float() if v.is_floating_point() and key not in ("step", "trail") else v


def _same_type_copy(optimizer, param_map: Dict[int, nn.Parameter]):
    """The optimizer re-pointed at the copied parameters: class, defaults, group keys and state kept."""
    memo = {id(old): new for old, new in _param_pairs(optimizer, param_map)}
    return copy.deepcopy(optimizer, memo)


def _param_pairs(optimizer, param_map):
    return [(p, param_map[id(p)]) for g in optimizer.param_groups for p in g["params"] if id(p) in param_map]


def _rebuild_fused(optimizer, fused_cls, param_map: Dict[int, nn.Parameter]):
    """Same param groups, hyperparameters, defaults and state, fused class."""
    unsupported = ("foreach", "fused", "capturable", "differentiable", "maximize", "decoupled_weight_decay")
    for g in optimizer.param_groups:
        if g.get("maximize"):
            raise ValueError("optimize: maximize=True is not supported by the fused optimizers")
        if g.get("decoupled_weight_decay") and fused_cls is lite_optim.Adam:
            fused_cls = lite_optim.AdamW  # Adam(decoupled_weight_decay=True) is AdamW
    groups = []
    for g in optimizer.param_groups:
        g2 = {k: v for k, v in g.items() if k != "params" and k not in unsupported}
        g2["params"] = [param_map.get(id(p), p) for p in g["params"]]
        groups.append(g2)
    defaults = {k: v for k, v in optimizer.defaults.items() if k not in unsupported}
    new = fused_cls(groups, **defaults)
    for p_old, st in optimizer.state.items():
        p_new = param_map.get(id(p_old), p_old)
        new.state[p_new] = {k: _clone_state_value(k, v) for k, v in st.items()}
    return new


def _fuse_embedding_sgd(model: nn.Module, optimizer, split: bool) -> None:
    """Plain-SGD EmbeddingBag tables are updated inside backward (only the
    touched rows; no dense table gradient): identical results to the dense
    step because rows outside the batch have zero gradient."""
    if not isinstance(optimizer, lite_optim.SGD):
        return
    from .nn.modules import SGDEmbeddingBag
    group_of = {id(p): g for g in optimizer.param_groups for p in g["params"]}
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if type(child) is not nn.EmbeddingBag or id(child.weight) not in group_of:
                continue
            g = group_of[id(child.weight)]
            if g["momentum"] != 0 or g["weight_decay"] != 0 or child.mode == "max" or child.sparse \
                    or child.max_norm is not None or child.padding_idx is not None or child.scale_grad_by_freq:
                continue
            fused = SGDEmbeddingBag(child, g, split)
            g["params"] = [p for p in g["params"] if p is not child.weight]
            optimizer.state.pop(child.weight, None)
            setattr(parent, name, fused)


def _fp32_compute_linears(model: nn.Module, auto_kernel_selection) -> None:
    """Gives plain nn.Linear layers with bf16 weights fp32 GEMMs where bf16
    GEMMs are the slower kind (no AMX); False keeps the bf16 GEMMs."""
    from . import isa_info
    if auto_kernel_selection is False or isa_info().get("amx_bf16"):
        return
    for mod in model.modules():
        if type(mod) is nn.Linear and mod.weight.dtype == torch.bfloat16:
            mod.__class__ = Fp32ComputeLinear


def _sparse_params(model: nn.Module):
    return {id(p) for m in model.modules() if isinstance(m, (nn.Embedding, nn.EmbeddingBag)) and m.sparse
            for p in m.parameters(recurse=False)}


def _split_params(model: nn.Module, optimizer) -> List[str]:
    """Splits the fp32 weights of supported modules (each shared parameter
    once); returns every state_dict key they appear under, tied weights
    included."""
    optimized = {id(p) for g in optimizer.param_groups for p in g["params"]}
    done = set()
    keys: List[str] = []
    for mod_name, mod in model.named_modules(remove_duplicate=False):
        if not isinstance(mod, _SPLIT_MODULES):
            continue
        if isinstance(mod, (nn.Embedding, nn.EmbeddingBag)) and mod.sparse:
            continue  # sparse gradients: use ipex_lite.nn.MergedEmbeddingBagWithSGD / WithAdaGrad
        for p_name, p in mod.named_parameters(recurse=False):
            key = f"{mod_name}.{p_name}" if mod_name else p_name
            if id(p) not in optimized or (p.dtype != torch.float32 and id(p) not in done):
                continue
            if id(p) not in done:
                top, trail = ops.split_float_bfloat16(p.data)
                p.data = top
                optimizer.state[p]["trail"] = trail
                done.add(id(p))
            keys.append(key)
    return keys


class _SplitStateDictHooks:
    """Module hooks (picklable, and bound to whichever module they are called
    on, so copies of the model report their own weights): save joins top and
    trail to fp32, load splits fp32 back into top and trail."""

    def __init__(self, optimizer, keys):
        self.optimizer = optimizer
        self.keys = sorted(keys)
        self.pending = {}

    def _trail(self, p):
        return self.optimizer.state.get(p, {}).get("trail")

    def save(self, module, state_dict, prefix, local_metadata):
        for key in self.keys:
            p = module.get_parameter(key)
            trail = self._trail(p)
            if prefix + key in state_dict and p.dtype == torch.bfloat16 and trail is not None:
                state_dict[prefix + key] = ops.cat_bfloat16_float(p.detach(), trail)

    def load_pre(self, module, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                 error_msgs):
        self.pending = {}
        for key in self.keys:
            w = state_dict.get(prefix + key)
            p = module.get_parameter(key)
            if torch.is_tensor(w) and w.is_floating_point() and w.shape == p.shape:
                top, trail = ops.split_float_bfloat16(w.float().contiguous())
                state_dict[prefix + key] = top
                self.pending[id(p)] = (p, trail)

    def load_post(self, module, incompatible_keys):
        for p, trail in self.pending.values():
            self.optimizer.state[p]["trail"] = trail
        self.pending = {}


def _all_or_nothing(module, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs):
    """load_state_dict pre-hook on the optimized model's root: a checkpoint with a tensor of the
    wrong shape, or a value that is not a tensor, is refused before any tensor is copied, so the
    failed load leaves the model as it was (stock loading copies every matching tensor first and
    reports the rest afterwards).  Missing / unexpected keys stay stock behaviour: hooks are not
    told whether the caller asked for strict loading."""
    if prefix:
        return
    problems = []
    for key, value in module.state_dict(keep_vars=True).items():
        if key not in state_dict:
            continue
        got = state_dict[key]
        if not torch.is_tensor(got):
            problems.append(f"{key!r} is a {type(got).__name__}, not a tensor")
        elif got.shape != value.shape:
            problems.append(f"{key!r} has shape {tuple(got.shape)}, the model has {tuple(value.shape)}")
    if problems:
        raise RuntimeError("load_state_dict: the checkpoint does not match this model; nothing was loaded: "
                           + "; ".join(problems[:8]) + (f"; and {len(problems) - 8} more" if len(problems) > 8 else ""))


def _master_copy_params(model: nn.Module, optimizer) -> List[nn.Parameter]:
    """The optimizer's fp32 parameters of the modules split-BF16 covers (dense gradients only)."""
    optimized = {id(p) for g in optimizer.param_groups for p in g["params"]}
    out = []
    for mod in model.modules():
        if isinstance(mod, _SPLIT_MODULES) and not (isinstance(mod, (nn.Embedding, nn.EmbeddingBag)) and mod.sparse):
            out += [p for p in mod.parameters(recurse=False) if id(p) in optimized and p.dtype == torch.float32]
    return out


class _MasterCopyStateDictHooks:
    """state_dict gives the fp32 masters under the original keys; load_state_dict fills masters and weights."""

    def __init__(self, optimizer, model):
        self.optimizer = optimizer
        ids = {id(p): m for p, m in optimizer._master_pairs}
        self.keys = [k for k, p in model.named_parameters(remove_duplicate=False) if id(p) in ids]

    def _master(self, module, key):
        p = module.get_parameter(key)
        return next((m for q, m in self.optimizer._master_pairs if q is p), None)

    def save(self, module, state_dict, prefix, local_metadata):
        for key in self.keys:
            master = self._master(module, key)
            if master is not None and prefix + key in state_dict:
                state_dict[prefix + key] = master.detach().clone()

    def load_pre(self, module, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                 error_msgs):
        for key in self.keys:
            w, master = state_dict.get(prefix + key), self._master(module, key)
            if master is not None and torch.is_tensor(w) and w.shape == master.shape:
                with torch.no_grad():
                    master.copy_(w)
                state_dict[prefix + key] = w.to(torch.bfloat16)


class _Hook:
    """Picklable bound hook (the public hook API tags callables with attributes)."""

    def __init__(self, owner, name):
        self.owner, self.name = owner, name

    def __call__(self, *args):
        return getattr(self.owner, self.name)(*args)


def _optimize_inference(model, dtype, level, inplace, sample_input, verbose, auto_kernel_selection, explicit):
    o1 = level == "O1"
    defaults = dict(conv_bn_folding=o1, linear_bn_folding=o1, weights_prepack=o1, replace_dropout_with_identity=o1,
                    graph_mode=o1, concat_linear=False, conv_winograd=o1)
    knobs = Knobs(dtype=dtype or torch.float32, fuse_post_ops=o1, auto_kernel_selection=bool(auto_kernel_selection),
                  **{k: bool(v) if v is not None else defaults[k] for k, v in explicit.items()})
    if not inplace:
        model = copy.deepcopy(model)
    if level == "O0" and not any(v for v in explicit.values()) and knobs.dtype == torch.float32:
        return model
    model = optimize_for_inference(model, knobs, sample_input)
    model.register_load_state_dict_pre_hook(_all_or_nothing)
    if verbose:
        print(_explain(model))
    return model


def optimize(model: nn.Module, dtype: Optional[torch.dtype] = None, optimizer=None, level: str = "O1",
             inplace: bool = False, conv_bn_folding=None, linear_bn_folding=None, weights_prepack=None,
             replace_dropout_with_identity=None, optimize_lstm=None, split_master_weight_for_bf16=None,
             fuse_update_step=None, auto_kernel_selection=None, sample_input=None, graph_mode=None,
             concat_linear=None, verbose=False, conv_winograd=None):
    """Optimize ``model`` for inference, or a model and its optimizer for training (IPEX's signature).

    Inference: pass a model in eval mode and no optimizer; the optimized model is returned.  Training:
    pass a model in training mode and its optimizer; ``(model, optimizer)`` is returned.  The module
    docstring of ``ipex_lite.frontend`` describes what each mode does.

    Args:
        model: the ``nn.Module``.  In training mode an optimizer is required (IPEX's
            ``AssertionError`` otherwise).
        dtype: ``None`` / ``torch.float32``, or ``torch.bfloat16``: inference computes the packed
            layers in bf16; training turns the weights into split-BF16 halves.
        optimizer: the training optimizer.  SGD, Adam, AdamW, Adagrad and ``ipex_lite.optim.Lamb``
            are replaced by ipex_lite's fused versions with the same groups, hyperparameters and
            state; other optimizers step fp32 master copies of bf16 weights (with a warning).
        level: ``"O1"`` (the default: the knobs below take their defaults) or ``"O0"`` (inference:
            nothing changes unless a knob is set or ``dtype=torch.bfloat16``; training: the model and
            optimizer are returned as they are).
        inplace: change ``model`` itself instead of a deep copy.
        conv_bn_folding: fold BatchNorm into the Conv before it (inference).
        linear_bn_folding: fold BatchNorm into the Linear before it (inference).
        weights_prepack: prepack Conv / ConvTranspose / Linear weights for oneDNN (inference).
        replace_dropout_with_identity: replace Dropout with Identity (inference).
        optimize_lstm: accepted for IPEX compatibility; it has no effect.
        split_master_weight_for_bf16: training with ``dtype=torch.bfloat16``: ``False`` keeps the fp32
            weights instead of splitting them.
        fuse_update_step: training: update each parameter inside backward as soon as its gradient is
            accumulated (``ipex_lite.optim.update_in_backward_``); refused under a multi-rank process
            group.
        auto_kernel_selection: inference: time the fp32 / bf16 / kernel choices on ``sample_input`` and
            keep a choice only when it is more than 3% faster.  Training on CPUs without AMX: ``False``
            keeps bf16 GEMMs instead of ``ipex_lite.nn.Fp32ComputeLinear``.
        sample_input: inference: a tensor or a tuple of positional inputs; weights are packed for its
            shapes and the kernel timing of ``auto_kernel_selection`` runs on it.
        graph_mode: inference: rewrite through ``torch.fx`` where the model traces (``False``: only
            module-local rewrites, the class is kept).
        concat_linear: inference: merge Linears that read the same input into one GEMM (off by default).
        verbose: inference: print the ``ipex_lite.explain`` report.
        conv_winograd: inference: run eligible fp32 3x3 stride-1 convolutions through ipex_lite's
            Winograd kernel (on at O1; an ipex_lite knob, not IPEX's).

    Each knob left at ``None`` takes the level's default.

    Returns:
        The optimized model (inference), or ``(model, optimizer)`` (training).

    Raises:
        AssertionError: a model in training mode without an optimizer.
        TypeError: ``model`` is not an ``nn.Module``.
        ValueError: an unknown ``level`` or ``dtype``, an optimizer with a model in eval mode, an
            optimizer none of whose parameters belong to the model, or ``fuse_update_step`` under a
            multi-rank process group.
    """
    if level not in _LEVELS:
        raise ValueError(f"optimize: level must be one of {_LEVELS}, got {level!r}")
    if dtype not in (None, torch.float32, torch.bfloat16):
        raise ValueError(f"optimize: dtype must be None, torch.float32 or torch.bfloat16, got {dtype}")
    if not isinstance(model, nn.Module):
        raise TypeError(f"optimize: model must be an nn.Module, got {type(model).__name__}")
    if optimizer is None:
        if model.training:  # IPEX's check and message
            raise AssertionError("The optimizer should be given for training mode")
        return _optimize_inference(model, dtype, level, inplace, sample_input, verbose, auto_kernel_selection, dict(
            conv_bn_folding=conv_bn_folding, linear_bn_folding=linear_bn_folding, weights_prepack=weights_prepack,
            replace_dropout_with_identity=replace_dropout_with_identity, graph_mode=graph_mode,
            concat_linear=concat_linear, conv_winograd=conv_winograd))
    if not model.training:
        raise ValueError("optimize: an optimizer was given, so the model must be in training mode (model.train())")

    model_params = {id(p) for p in model.parameters()}
    if not any(id(p) in model_params for g in optimizer.param_groups for p in g["params"]):
        raise ValueError("optimize: none of the optimizer's parameters belong to the model")
    if not inplace:
        new_model = copy.deepcopy(model)
        # named_parameters(remove_duplicate=False) pairs tied weights correctly
        param_map = {id(a): b for (_, a), (_, b) in zip(model.named_parameters(remove_duplicate=False),
                                                        new_model.named_parameters(remove_duplicate=False))}
        model = new_model
    else:
        param_map = {}

    fused_cls = _fused_class(optimizer)
    sparse = bool(_sparse_params(model) & {id(param_map.get(id(p), p)) for g in optimizer.param_groups
                                            for p in g["params"]})
    if level == "O1" and fused_cls is None and not sparse and dtype == torch.bfloat16 \
            and split_master_weight_for_bf16 is not False and type(optimizer) is not torch.optim.LBFGS:
        # IPEX's fallback: bf16 weights for compute, the unchanged optimizer on fp32 master copies
        warnings.warn(f"optimize: no fused ipex_lite version of {type(optimizer).__name__}; it steps fp32 master "
                      "copies of the bf16 weights (6 bytes per parameter instead of 4)")
        opt = _same_type_copy(optimizer, param_map) if param_map else optimizer
        opt = lite_optim.with_master_copy(opt, _master_copy_params(model, opt))
        hooks = _MasterCopyStateDictHooks(opt, model)
        post = getattr(model, "register_state_dict_post_hook", None) or model._register_state_dict_hook
        post(_Hook(hooks, "save"))
        model.register_load_state_dict_pre_hook(_all_or_nothing)
        model.register_load_state_dict_pre_hook(_Hook(hooks, "load_pre"))
        _fp32_compute_linears(model, auto_kernel_selection)
        return model, opt
    if level == "O0" or fused_cls is None or sparse:
        if level == "O1":
            warnings.warn(f"optimize: no fused ipex_lite version of {type(optimizer).__name__}"
                          + (" for sparse embedding gradients" if fused_cls is not None else "")
                          + "; keeping it and the fp32 weights (autocast still computes in bf16)")
        return model, (_same_type_copy(optimizer, param_map) if param_map else optimizer)

    optimizer = _rebuild_fused(optimizer, fused_cls, param_map)
    split = dtype == torch.bfloat16 and split_master_weight_for_bf16 is not False
    from .distributed import is_multi_rank
    if is_multi_rank() and fuse_update_step:
        # data parallel: every update must wait for the all-reduced gradient
        raise ValueError("optimize: fuse_update_step=True updates each parameter from its local gradient, "
                         "before DistributedDataParallel's all-reduce; drop it in multi-rank training")
    # Under a multi-rank group, ipex_lite.distributed.wrap_ddp makes these tables exchange lookups.
    _fuse_embedding_sgd(model, optimizer, split)
    model.register_load_state_dict_pre_hook(_all_or_nothing)
    if split:
        hooks = _SplitStateDictHooks(optimizer, _split_params(model, optimizer))
        post = getattr(model, "register_state_dict_post_hook", None) or model._register_state_dict_hook
        post(_Hook(hooks, "save"))
        model.register_load_state_dict_pre_hook(_Hook(hooks, "load_pre"))
        model.register_load_state_dict_post_hook(_Hook(hooks, "load_post"))
        _fp32_compute_linears(model, auto_kernel_selection)
    if fuse_update_step:
        lite_optim.update_in_backward_(optimizer)
    return model, optimizer
