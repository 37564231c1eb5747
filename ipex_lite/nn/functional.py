"""Functional ops (IPEX names: ipex.nn.functional.*)."""
from typing import Optional, Sequence, Union

import torch
import torch.nn.functional as F

from .prepacked import _shape_test
from .vision import as_pair, roi_align

__all__ = ["interaction", "max_pool2d", "roi_align", "scaled_dot_product_attention", "cached_attention"]


def interaction(*tensors: Union[torch.Tensor, Sequence[torch.Tensor]]) -> torch.Tensor:
    """DLRM dot interaction of N (B, D) tensors -> (B, D + N(N-1)/2).

    The output is the first tensor followed by the strict lower triangle of
    the per-sample N x N dot-product matrix, row by row (i > j), as in IPEX's
    ``ipex.nn.functional.interaction`` and DLRM's ``interact_features``.
    Accepts the tensors as separate arguments or as one list/tuple.
    Differentiable; under ``torch.autocast("cpu", dtype=torch.bfloat16)`` it
    runs in bf16.
    """
    if len(tensors) == 1 and isinstance(tensors[0], (list, tuple)):
        tensors = tuple(tensors[0])
    for i, t in enumerate(tensors):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"interaction: argument {i} is {type(t).__name__}, expected a torch.Tensor")
    return torch.ops.ipex_lite.interaction_forward(list(tensors))


def scaled_dot_product_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                                 attn_mask: Optional[torch.Tensor] = None, dropout_p: float = 0.0,
                                 is_causal: bool = False, scale: Optional[float] = None,
                                 enable_gqa: bool = False) -> torch.Tensor:
    """``F.scaled_dot_product_attention`` with ipex_lite's CPU kernel for inference.

    The kernel serves 4-D fp32/bf16 CPU tensors with matching batch and head
    dimensions, no dropout and no gradient; anything else (training, dropout,
    grouped-query heads, broadcast batch dimensions, other dtypes or devices)
    goes to torch's own implementation, so the call accepts what torch's does.
    """
    if _fused_attention_applies(query, key, value, attn_mask, dropout_p, enable_gqa):
        return torch.ops.ipex_lite.scaled_dot_product_attention(query, key, value, attn_mask, is_causal, scale)
    kwargs = {"enable_gqa": True} if enable_gqa else {}
    return F.scaled_dot_product_attention(query, key, value, attn_mask=attn_mask, dropout_p=dropout_p,
                                          is_causal=is_causal, scale=scale, **kwargs)


def _fused_attention_applies(query, key, value, attn_mask, dropout_p, enable_gqa) -> bool:
    tensors = (query, key, value) if attn_mask is None else (query, key, value, attn_mask)
    if dropout_p != 0.0 or enable_gqa or not all(isinstance(t, torch.Tensor) for t in tensors):
        return False
    if torch.is_grad_enabled() and any(t.requires_grad for t in tensors):
        return False
    if any(t.device.type != "cpu" or t.layout != torch.strided for t in tensors):
        return False
    if query.dtype not in (torch.float32, torch.bfloat16) or key.dtype != query.dtype or value.dtype != query.dtype:
        return False
    if query.dim() != 4 or key.dim() != 4 or value.dim() != 4:
        return False
    b, h, _, e = query.shape
    if _shape_test(lambda: e == 0 or key.shape[:2] != (b, h) or value.shape[:3] != key.shape[:3]
                   or key.shape[3] != e):
        return False
    return attn_mask is None or attn_mask.dtype in (torch.bool, torch.float32, torch.bfloat16)


# Query rows up to which cached_attention reads the keys through the decode kernel.
DECODE_ROWS = 16


def cached_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                     attn_mask: Optional[torch.Tensor] = None, is_causal: bool = False,
                     scale: Optional[float] = None) -> torch.Tensor:
    """Attention of (B, Hq, Lq, D) queries over (B, Hkv, Lk, D) cached keys/values, Hq a multiple of Hkv,
    causal aligned with the end of the cache (query i sees keys ``j <= Lk - Lq + i``), for inference.

    Up to DECODE_ROWS query rows go to ipex_lite's decode kernel, which reads the cache in place and never
    copies K/V for grouped-query heads; longer calls (prefill) repeat K/V per head group once and use
    ``scaled_dot_product_attention`` (its kernel, or torch's for what it does not serve)."""
    lq, lk = query.shape[2], key.shape[2]
    if lq <= DECODE_ROWS and _decode_applies(query, key, value, attn_mask):
        return torch.ops.ipex_lite.decode_attention(query, key, value, attn_mask, is_causal, scale)
    groups = query.shape[1] // key.shape[1]
    if groups > 1:
        key, value = key.repeat_interleave(groups, 1), value.repeat_interleave(groups, 1)
    if is_causal and lk != lq:  # bottom-right aligned: a mask, since SDPA's is_causal is top-left
        attn_mask = torch.ones(lq, lk, dtype=torch.bool, device=query.device).tril(lk - lq)
        is_causal = False
    return scaled_dot_product_attention(query, key, value, attn_mask=attn_mask, is_causal=is_causal, scale=scale)


def _decode_applies(query, key, value, mask) -> bool:
    tensors = [t for t in (query, key, value, mask) if t is not None]
    if any(not isinstance(t, torch.Tensor) or t.device.type != "cpu" or t.layout != torch.strided for t in tensors):
        return False
    if torch.is_grad_enabled() and any(t.requires_grad for t in tensors):
        return False
    if query.dtype not in (torch.float32, torch.bfloat16) or not query.dtype == key.dtype == value.dtype:
        return False
    return (query.dim() == key.dim() == value.dim() == 4 and key.shape[1] > 0 and query.shape[1] % key.shape[1] == 0
            and (mask is None or mask.dtype in (torch.bool, torch.float32, torch.bfloat16)))


def max_pool2d(input: torch.Tensor, kernel_size, stride=None, padding=0, dilation=1, ceil_mode: bool = False,
               return_indices: bool = False) -> torch.Tensor:
    """``F.max_pool2d`` with ipex_lite's channels-last inference kernel (no indices computed).

    The kernel serves 4-D fp32/bf16 CPU tensors without gradient; anything
    else (training, indices, other dtypes, 3-D input) goes to torch.
    """
    stride = kernel_size if stride is None or (not isinstance(stride, int) and len(stride) == 0) else stride
    args = [as_pair(v) for v in (kernel_size, stride, padding, dilation)]
    if (not return_indices and isinstance(input, torch.Tensor) and input.dim() == 4 and input.device.type == "cpu"
            and input.layout == torch.strided and input.dtype in (torch.float32, torch.bfloat16)
            and not (torch.is_grad_enabled() and input.requires_grad) and all(len(a) == 2 for a in args)):
        return torch.ops.ipex_lite.max_pool2d(input, *args, ceil_mode)
    return F.max_pool2d(input, kernel_size, stride, padding, dilation, ceil_mode=ceil_mode,
                        return_indices=return_indices)
