"""Building blocks of decoder LLMs as functions (IPEX names: ``ipex.llm.functional.*``).

Each function runs ipex_lite's CPU kernel on fp32/bf16 CPU tensors outside autograd and falls back
to the same arithmetic in plain torch otherwise (a gradient, another device or dtype), so a call
never fails where the torch formula would work.  The kernels reproduce Hugging Face's rounding
order in bf16 (RMSNorm rounds the normalised value before the weight multiplies it; SiLU rounds the
activation before the gate product).
"""
from typing import Optional, Tuple

import torch
import torch.nn.functional as F

__all__ = ["rms_norm", "add_rms_norm", "rotary_embedding", "silu_mul", "linear", "decode_attention"]

ops = torch.ops.ipex_lite
_DTYPES = (torch.float32, torch.bfloat16)


def _kernel_ok(*tensors: Optional[torch.Tensor]) -> bool:
    # a plain loop: this runs several times per decoder layer and token
    grad = torch.is_grad_enabled()
    for t in tensors:
        if t is not None and (not t.is_cpu or t.layout != torch.strided or t.dtype not in _DTYPES
                              or (grad and t.requires_grad)):
            return False
    return True


def _rms_norm_reference(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    h = x.to(torch.float32)
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return weight * h.to(x.dtype)


def rms_norm(hidden_states: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """``weight * round(x * rsqrt(mean(x^2) + eps))`` over the last dimension (Llama's RMSNorm)."""
    if _kernel_ok(hidden_states, weight) and weight.dtype == hidden_states.dtype:
        return ops.rms_norm(hidden_states, weight, float(eps))
    return _rms_norm_reference(hidden_states, weight, eps)


def add_rms_norm(residual: Optional[torch.Tensor], x: torch.Tensor, weight: torch.Tensor,
                 bias: Optional[torch.Tensor] = None, eps: float = 1e-6, add_back: bool = False) -> torch.Tensor:
    """``rms_norm(x + residual)`` (+ ``bias``) in one pass; with ``add_back=True`` the sum is also written
    into ``residual`` in place (a pre-norm decoder's next residual).  ``residual=None`` normalises ``x``."""
    if residual is None:
        out = rms_norm(x, weight, eps)
        return out if bias is None else out + bias
    if (_kernel_ok(residual, x, weight) and weight.dtype == x.dtype == residual.dtype
            and residual.shape == x.shape and (residual.is_contiguous() or not add_back)):
        target = residual if add_back else residual.clone(memory_format=torch.contiguous_format)
        out = ops.add_rms_norm(x, target, weight, float(eps))
    else:
        total = residual + x
        if add_back:
            residual.copy_(total)
        out = _rms_norm_reference(total, weight, eps)
    return out if bias is None else out + bias


def _rotate_reference(t: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, half: bool) -> torch.Tensor:
    rd = cos.shape[-1]
    rot, rest = t[..., :rd], t[..., rd:]
    if half:
        x1, x2 = rot[..., : rd // 2], rot[..., rd // 2:]
        rotated = torch.cat((-x2, x1), dim=-1)
    else:  # GPT-J: pairs (2i, 2i + 1)
        x1, x2 = rot[..., 0::2], rot[..., 1::2]
        rotated = torch.stack((-x2, x1), dim=-1).flatten(-2)
    return torch.cat((rot * cos + rotated * sin, rest), dim=-1)


def rotary_embedding(query: torch.Tensor, key: torch.Tensor, sin: torch.Tensor, cos: torch.Tensor,
                     rotary_dim: Optional[int] = None, rotary_half: bool = True,
                     position_ids: Optional[torch.Tensor] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """Rotary position embedding of ``query`` and ``key``, both (batch, seq, heads, head_dim).

    ``cos``/``sin`` are (batch | 1, seq, rotary_dim) or (seq, rotary_dim) -- or a table indexed by
    ``position_ids`` (batch, seq) when given.  ``rotary_half=True`` is the rotate-half form of
    Llama/Mistral/Qwen/NeoX; False the interleaved GPT-J form (computed in torch).  With the kernel,
    query and key are rotated in place and returned; otherwise new tensors are returned.
    """
    if position_ids is not None:
        cos, sin = cos[position_ids], sin[position_ids]
    if rotary_dim is not None and cos.shape[-1] != rotary_dim:
        cos, sin = cos[..., :rotary_dim], sin[..., :rotary_dim]
    for name, t in (("query", query), ("key", key)):
        if t.dim() != 4:
            raise ValueError(f"rotary_embedding: {name} must be (batch, seq, heads, head_dim), got {tuple(t.shape)}")
    if rotary_half and _kernel_ok(query, key, cos, sin):
        cos_k, sin_k = cos.to(query.dtype), sin.to(query.dtype)
        ops.rotary_embedding_(query, cos_k, sin_k)
        ops.rotary_embedding_(key, cos_k.to(key.dtype), sin_k.to(key.dtype))
        return query, key
    c = cos.unsqueeze(-2) if cos.dim() >= 2 else cos
    s = sin.unsqueeze(-2) if sin.dim() >= 2 else sin
    return _rotate_reference(query, c, s, rotary_half), _rotate_reference(key, c, s, rotary_half)


def silu_mul(x: torch.Tensor, y: torch.Tensor, out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``silu(x) * y`` (a gated MLP's gate and up projections) in one pass."""
    if _kernel_ok(x, y) and x.dtype == y.dtype and x.shape == y.shape and x.dim() >= 1:
        result = ops.silu_mul(x, y)
    else:
        result = F.silu(x) * y
    if out is not None:
        return out.copy_(result)
    return result


# Rows up to which the small-M kernel beats oneDNN's GEMM (decode of a batch of up to 8 sequences);
# above it the call is a GEMM and goes to torch.
SMALL_M_MAX_ROWS = 8


def linear(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``F.linear``; with a bf16 weight and few rows (decode) it streams the weight through ipex_lite's
    small-M kernel at the memory bandwidth."""
    if (weight.dtype == torch.bfloat16 and x.dtype == torch.bfloat16 and x.dim() >= 1 and weight.dim() == 2
            and 0 < x.numel() <= SMALL_M_MAX_ROWS * weight.shape[1] and x.shape[-1] == weight.shape[1]
            and (bias is None or bias.dtype == torch.bfloat16)
            and _kernel_ok(x, weight, bias) and not torch.is_autocast_enabled("cpu")):
        return ops.linear_small_m(x, weight, bias)
    return F.linear(x, weight, bias)


def decode_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                     attn_mask: Optional[torch.Tensor] = None, is_causal: bool = False,
                     scale: Optional[float] = None) -> torch.Tensor:
    """Attention of a few query rows over a KV cache: query (B, Hq, Lq, D), key/value (B, Hkv, Lk, D) with
    Hq a multiple of Hkv (grouped-query heads share their K/V rows, never copied), any strides along the
    cache (a view of a larger preallocated buffer is read in place).  ``is_causal`` aligns the queries
    with the end of the cache (query i sees keys ``j <= Lk - Lq + i``).  Returns (B, Hq, Lq, Dv)."""
    if _kernel_ok(query, key, value) and query.dtype == key.dtype == value.dtype:
        mask = attn_mask
        if mask is not None and (mask.device.type != "cpu" or mask.dtype not in (torch.bool, *_DTYPES)):
            mask = mask.to(device="cpu", dtype=torch.float32)
        return ops.decode_attention(query, key, value, mask, is_causal, scale)
    groups = query.shape[1] // key.shape[1]
    k, v = key.repeat_interleave(groups, 1), value.repeat_interleave(groups, 1)
    if is_causal and query.shape[2] != key.shape[2]:
        lq, lk = query.shape[2], key.shape[2]
        attn_mask = torch.ones(lq, lk, dtype=torch.bool, device=query.device).tril(lk - lq)
        is_causal = False
    return F.scaled_dot_product_attention(query, k, v, attn_mask=attn_mask, is_causal=is_causal, scale=scale)
