"""Hugging Face attention through ipex_lite's kernel, by transformers' own extension point.

``optimize()`` registers ``"ipex_lite"`` in transformers' ``AttentionInterface`` (with the sdpa
mask format in ``AttentionMaskInterface``) the first time it sees a transformers model, and sets
it on the model it returns (``model.set_attn_implementation``) -- never on import, and never on
the caller's model when ``inplace=False``.  Models whose attention does not go through the
interface keep theirs, and the report says so.  Nothing of transformers is imported unless the
model comes from it.
"""
from typing import Optional

import torch
from torch import nn

from .nn.functional import cached_attention, scaled_dot_product_attention

NAME = "ipex_lite"


def attention_forward(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                      attention_mask: Optional[torch.Tensor], dropout: float = 0.0, scaling: Optional[float] = None,
                      is_causal: Optional[bool] = None, **kwargs):
    """transformers' attention-function signature: (B, H, S, D) inputs, returns ((B, S, H, D), None)."""
    if kwargs.get("position_bias") is not None or kwargs.get("output_attentions", False):
        from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS  # what sdpa does with those
        return ALL_ATTENTION_FUNCTIONS["sdpa"](module, query, key, value, attention_mask, dropout=dropout,
                                               scaling=scaling, is_causal=is_causal, **kwargs)
    if attention_mask is not None and attention_mask.shape[-1] > key.shape[2]:  # 4.x masks may run longer
        attention_mask = attention_mask[..., :key.shape[2]]
    q_len, kv_len = query.shape[2], key.shape[2]
    causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
    causal = bool(q_len > 1 and attention_mask is None and causal)
    if causal and kv_len > q_len:  # prefill into an empty static cache: the tail is padding
        key, value = key[:, :, :q_len], value[:, :, :q_len]
    if module.training and dropout:
        out = scaled_dot_product_attention(query, key, value, attn_mask=attention_mask, dropout_p=dropout,
                                           is_causal=causal, scale=scaling, enable_gqa=key.shape[1] != query.shape[1])
    else:
        out = cached_attention(query, key, value, attention_mask, causal, scaling)
    return out.transpose(1, 2).contiguous(), None


def _register() -> None:
    from transformers import AttentionInterface
    AttentionInterface.register(NAME, attention_forward)
    try:  # transformers 5.x builds masks per implementation; 4.x gives unknown ones its eager masks
        from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface
    except ImportError:
        return
    AttentionMaskInterface.register(NAME, ALL_MASK_ATTENTION_FUNCTIONS["sdpa"])


def is_transformers_model(model: nn.Module) -> bool:
    return type(model).__module__.startswith("transformers.") and hasattr(model, "config")


def use_ipex_lite_attention(model: nn.Module) -> str:
    """Sets ipex_lite's attention on a transformers model; returns what the report says."""
    current = getattr(getattr(model, "config", None), "_attn_implementation", None)
    if current not in ("sdpa", None, NAME):  # eager is kept: it is what returns attention weights
        return f"kept {current!r} attention (only sdpa models are switched)"
    try:
        _register()
        if hasattr(model, "set_attn_implementation"):
            model.set_attn_implementation(NAME)
        elif getattr(model, "_supports_attention_backend", False):  # transformers 4.x: layers read the config
            model.config._attn_implementation = NAME
        else:  # a 4.x model that picked its attention classes at construction (BERT, ...)
            return f"kept {current!r} attention: {type(model).__name__} does not use transformers' AttentionInterface"
    except Exception as e:  # noqa: BLE001 - an older transformers, or a model without the interface
        return f"kept {current!r} attention: {type(e).__name__}: {str(e).splitlines()[0][:160]}"
    if getattr(model.config, "_attn_implementation", None) != NAME:
        return f"kept {current!r} attention: {type(model).__name__} does not use transformers' AttentionInterface"
    return (f"{current or 'default'} attention -> ipex_lite kernel (transformers AttentionInterface {NAME!r}; "
            "torch's sdpa for output_attentions, position bias, dropout in training)")
