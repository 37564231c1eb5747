"""``ipex_lite.optimize`` (IPEX signature).

Training mode (an optimizer is given) with ``dtype=torch.bfloat16``:
the weights of Linear / Conv / Embedding / EmbeddingBag become split-BF16
(the module computes with the bf16 top half, the low 16 bits live in the
optimizer state as ``"trail"``: 4 bytes per parameter, exact fp32 master),
and the optimizer is replaced by the fused ipex_lite optimizer of the same
type with the same param groups, hyperparameters and state.  Run the forward
under ``torch.autocast("cpu", dtype=torch.bfloat16)``.  ``model.state_dict()``
returns the exact fp32 weights under the original keys and
``model.load_state_dict()`` accepts them.

Inference-mode rewrites (folding, prepacking, channels_last) are not in this
build: ``optimize(model)`` without an optimizer raises NotImplementedError
rather than returning an unchanged model that claims to be optimized.
"""
import copy
import warnings
from typing import Dict, Optional, Tuple

import torch
from torch import nn

from . import optim as lite_optim

__all__ = ["optimize"]

ops = torch.ops.ipex_lite

_FUSED = {
    torch.optim.SGD: lite_optim.SGD,
    torch.optim.Adam: lite_optim.Adam,
    torch.optim.AdamW: lite_optim.AdamW,
    torch.optim.Adagrad: lite_optim.Adagrad,
}
_SPLIT_MODULES = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Embedding, nn.EmbeddingBag)
_LEVELS = ("O0", "O1")


def _fused_class(optimizer):
    for base, fused in _FUSED.items():
        if type(optimizer) is base or type(optimizer) is fused:
            return fused
    return None


def _rebuild_optimizer(optimizer, fused_cls, param_map: Dict[int, nn.Parameter]):
    """Same param groups (hyperparameters included) and state, fused class."""
    groups = []
    for g in optimizer.param_groups:
        g2 = {k: v for k, v in g.items() if k != "params"}
        for key in ("foreach", "fused", "capturable", "differentiable", "maximize"):
            g2.pop(key, None)
        g2["params"] = [param_map.get(id(p), p) for p in g["params"]]
        groups.append(g2)
    new = fused_cls(groups)
    for p_old, st in optimizer.state.items():
        p_new = param_map.get(id(p_old), p_old)
        new.state[p_new] = {k: (v.float() if torch.is_tensor(v) and v.is_floating_point() and k != "step" else v)
                            for k, v in st.items()}
    return new


def _split_params(model: nn.Module, optimizer) -> Dict[str, nn.Parameter]:
    """Splits the fp32 weights of supported modules; returns {state_dict key: param}."""
    optimized = {id(p) for g in optimizer.param_groups for p in g["params"]}
    split: Dict[str, nn.Parameter] = {}
    for mod_name, mod in model.named_modules():
        if not isinstance(mod, _SPLIT_MODULES):
            continue
        if isinstance(mod, (nn.Embedding, nn.EmbeddingBag)) and mod.sparse:
            continue  # sparse gradients: use ipex_lite.nn.MergedEmbeddingBagWithSGD / WithAdaGrad
        for p_name, p in mod.named_parameters(recurse=False):
            if p.dtype != torch.float32 or id(p) not in optimized:
                continue
            top, trail = ops.split_float_bfloat16(p.data)
            p.data = top
            optimizer.state[p]["trail"] = trail
            split[f"{mod_name}.{p_name}" if mod_name else p_name] = p
    return split


class _SplitStateDict:
    """Model hooks: save joins top + trail to fp32, load splits fp32 back."""

    def __init__(self, optimizer, split: Dict[str, nn.Parameter]):
        self.optimizer = optimizer
        self.split = split
        self.pending: Dict[str, torch.Tensor] = {}

    def save(self, module, state_dict, prefix, local_metadata):
        for key, p in self.split.items():
            full = prefix + key
            if full in state_dict:
                state_dict[full] = lite_optim.master_weight(self.optimizer, p)

    def load_pre(self, module, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                 error_msgs):
        self.pending = {}
        for key, p in self.split.items():
            w = state_dict.get(prefix + key)
            if torch.is_tensor(w) and w.is_floating_point() and w.shape == p.shape:
                top, trail = ops.split_float_bfloat16(w.float().contiguous())
                state_dict[prefix + key] = top
                self.pending[key] = trail

    def load_post(self, module, incompatible_keys):
        for key, trail in self.pending.items():
            self.optimizer.state[self.split[key]]["trail"] = trail
        self.pending = {}


def optimize(model: nn.Module, dtype: Optional[torch.dtype] = None, optimizer=None, level: str = "O1",
             inplace: bool = False, conv_bn_folding=None, linear_bn_folding=None, weights_prepack=None,
             replace_dropout_with_identity=None, optimize_lstm=None, split_master_weight_for_bf16=None,
             fuse_update_step=None, auto_kernel_selection=None, sample_input=None, graph_mode=None,
             concat_linear=None):
    """IPEX-compatible entry point; see the module docstring for what this build does."""
    if level not in _LEVELS:
        raise ValueError(f"optimize: level must be one of {_LEVELS}, got {level!r}")
    if dtype not in (None, torch.float32, torch.bfloat16):
        raise ValueError(f"optimize: dtype must be None, torch.float32 or torch.bfloat16, got {dtype}")
    if not isinstance(model, nn.Module):
        raise TypeError(f"optimize: model must be an nn.Module, got {type(model).__name__}")
    if optimizer is None:
        if level == "O0":
            return model if inplace else copy.deepcopy(model)
        raise NotImplementedError("optimize(): inference-mode rewrites (BN folding, weight prepacking, "
                                  "channels_last) are not in this build yet; pass level='O0' for no change, or "
                                  "an optimizer for split-BF16 training")
    if not model.training:
        raise ValueError("optimize: an optimizer was given, so the model must be in training mode (model.train())")
    if fuse_update_step:
        raise NotImplementedError("optimize: fuse_update_step (update inside backward) is not in this build yet")

    if not inplace:
        new_model = copy.deepcopy(model)
        param_map = {id(a): b for a, b in zip(model.parameters(), new_model.parameters())}
        model = new_model
    else:
        param_map = {}

    if level == "O0":
        return model, _rebuild_optimizer(optimizer, type(optimizer), param_map) if param_map else optimizer

    fused_cls = _fused_class(optimizer)
    split = dtype == torch.bfloat16 and split_master_weight_for_bf16 is not False
    if fused_cls is None:
        warnings.warn(f"optimize: {type(optimizer).__name__} has no fused ipex_lite version; keeping it and the "
                      "fp32 weights (autocast still computes in bf16)")
        if param_map:
            optimizer = _rebuild_optimizer(optimizer, type(optimizer), param_map)
        return model, optimizer

    optimizer = _rebuild_optimizer(optimizer, fused_cls, param_map)
    if split:
        split_params = _split_params(model, optimizer)
        hooks = _SplitStateDict(optimizer, split_params)
        post = getattr(model, "register_state_dict_post_hook", None) or model._register_state_dict_hook
        # plain functions: the public hook API tags the callable with an attribute
        post(lambda *args: hooks.save(*args))
        model.register_load_state_dict_pre_hook(lambda *args: hooks.load_pre(*args))
        model.register_load_state_dict_post_hook(lambda *args: hooks.load_post(*args))
    return model, optimizer
