"""Decoder building blocks as modules (IPEX names where IPEX had them: ``ipex.llm.modules.*``).

For people who write their own decoder for inference: every module holds plain Parameters (a checkpoint's
tensors load into them by name) and runs ipex_lite's kernels.  Projections that run as one GEMM (q/k/v,
gate/up) share one weight buffer with their Parameters as views of it, made at the first call: the
modules are for inference, not training.
``DecoderLayer`` is a Llama-style pre-norm block assembled from the others, and ``tests/test_llm.py``
checks that such a hand-built decoder computes what Hugging Face's Llama computes.
"""
from typing import List, Optional, Tuple

import torch
from torch import nn

from ..nn.functional import cached_attention
from . import functional as LF
from .cache import StaticKVCache

__all__ = ["RMSNorm", "RotaryEmbedding", "LinearFast", "Linear2SiluMul", "GatedMLP", "CachedAttention",
           "DecoderLayer"]


class RMSNorm(nn.Module):
    """RMSNorm; ``forward(x, residual)`` adds ``x`` into ``residual`` in place first and returns
    ``(normed, residual)`` -- the pre-norm decoder's add + norm in one pass."""

    def __init__(self, hidden_size: int, eps: float = 1e-6, weight: Optional[torch.Tensor] = None):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size) if weight is None else weight)
        self.eps = eps

    def forward(self, x: torch.Tensor, residual: Optional[torch.Tensor] = None):
        if residual is None:
            return LF.rms_norm(x, self.weight, self.eps)
        return LF.add_rms_norm(residual, x, self.weight, eps=self.eps, add_back=True), residual


class RotaryEmbedding(nn.Module):
    """Rotary position embedding (rotate-half form) with a cos/sin table for ``max_position_embeddings``
    positions; ``forward(query, key, position_ids)`` rotates (batch, seq, heads, head_dim) query and key
    in place and returns them."""

    def __init__(self, max_position_embeddings: int, pos_embd_dim: int, base: float = 10000.0,
                 dtype: torch.dtype = torch.float32):
        super().__init__()
        if pos_embd_dim % 2:
            raise ValueError(f"RotaryEmbedding: pos_embd_dim must be even, got {pos_embd_dim}")
        inv_freq = 1.0 / (base ** (torch.arange(0, pos_embd_dim, 2, dtype=torch.float32) / pos_embd_dim))
        freqs = torch.outer(torch.arange(max_position_embeddings, dtype=torch.float32), inv_freq)
        emb = torch.cat((freqs, freqs), dim=-1)
        self.register_buffer("cos_cached", emb.cos().to(dtype), persistent=False)
        self.register_buffer("sin_cached", emb.sin().to(dtype), persistent=False)
        self.max_position_embeddings = max_position_embeddings

    def cos_sin(self, position_ids: torch.Tensor, dtype: torch.dtype) -> Tuple[torch.Tensor, torch.Tensor]:
        if position_ids.numel() and (int(position_ids.max()) >= self.max_position_embeddings
                                     or int(position_ids.min()) < 0):
            raise ValueError(f"RotaryEmbedding: positions must lie in [0, {self.max_position_embeddings}), got "
                             f"[{int(position_ids.min())}, {int(position_ids.max())}]")
        return self.cos_cached[position_ids].to(dtype), self.sin_cached[position_ids].to(dtype)

    def forward(self, query: torch.Tensor, key: torch.Tensor, position_ids: torch.Tensor):
        cos, sin = self.cos_sin(position_ids, query.dtype)
        return LF.rotary_embedding(query, key, sin, cos)


class LinearFast(nn.Linear):
    """``nn.Linear`` whose bf16 calls with few rows (decode) stream the weight through the small-M kernel."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return LF.linear(x, self.weight, self.bias)


def _fuse_rows(*linears: nn.Linear) -> LinearFast:
    """One LinearFast over the stacked rows of ``linears``; their weights (and biases) become views into it,
    so the Parameters are shared and no weight is held twice."""
    first = linears[0]
    biases = [lin.bias for lin in linears]
    if any((b is None) != (biases[0] is None) for b in biases):
        raise ValueError("_fuse_rows: either all or none of the layers have a bias")
    fused = LinearFast(first.in_features, sum(lin.out_features for lin in linears), bias=biases[0] is not None,
                       device="meta")
    with torch.no_grad():
        fused.weight = nn.Parameter(torch.cat([lin.weight for lin in linears]), requires_grad=False)
        if biases[0] is not None:
            fused.bias = nn.Parameter(torch.cat(biases), requires_grad=False)
    start = 0
    for lin in linears:
        end = start + lin.out_features
        lin.weight = nn.Parameter(fused.weight[start:end], requires_grad=False)
        if lin.bias is not None:
            lin.bias = nn.Parameter(fused.bias[start:end], requires_grad=False)
        start = end
    return fused


class Linear2SiluMul(nn.Module):
    """``silu(linear_s(x)) * linear_m(x)`` with both projections in one GEMM (IPEX's name).  The two
    layers stay registered (same state_dict keys); their weights become views of the fused one."""

    def __init__(self, linear_s: nn.Linear, linear_m: nn.Linear):
        super().__init__()
        if linear_s.in_features != linear_m.in_features or linear_s.out_features != linear_m.out_features:
            raise ValueError("Linear2SiluMul: linear_s and linear_m must have the same shape")
        self.linear_s, self.linear_m = linear_s, linear_m
        self._fused = [_fuse_rows(linear_s, linear_m)]  # a list: not a child, no extra state_dict keys

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gu = self._fused[0](x)
        n = self.linear_s.out_features
        return LF.silu_mul(gu[..., :n], gu[..., n:])


class GatedMLP(nn.Module):
    """``down(silu(gate(x)) * up(x))`` -- Llama's MLP -- with gate and up in one GEMM."""

    def __init__(self, hidden_size: int, intermediate_size: int, bias: bool = False, dtype=None):
        super().__init__()
        self.gate_proj = nn.Linear(hidden_size, intermediate_size, bias=bias, dtype=dtype)
        self.up_proj = nn.Linear(hidden_size, intermediate_size, bias=bias, dtype=dtype)
        self.down_proj = LinearFast(intermediate_size, hidden_size, bias=bias, dtype=dtype)
        self._gate_up: List[Linear2SiluMul] = []  # a list: not a child, no extra state_dict keys

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self._gate_up or self.gate_proj.weight.data_ptr() != self._gate_up[0]._fused[0].weight.data_ptr():
            self._gate_up[:] = [Linear2SiluMul(self.gate_proj, self.up_proj)]  # first call, or weights reloaded
        return self.down_proj(self._gate_up[0](x))


class CachedAttention(nn.Module):
    """Causal self-attention with grouped-query heads, rotary embedding and a ``StaticKVCache``:
    q/k/v in one GEMM, rotary applied in place, decode attention reading the cache in place."""

    def __init__(self, hidden_size: int, num_heads: int, num_kv_heads: int, layer_idx: int,
                 rotary: RotaryEmbedding, head_dim: Optional[int] = None, bias: bool = False, dtype=None):
        super().__init__()
        if num_heads % num_kv_heads:
            raise ValueError(f"CachedAttention: num_heads ({num_heads}) must be a multiple of num_kv_heads "
                             f"({num_kv_heads})")
        self.head_dim = head_dim or hidden_size // num_heads
        self.num_heads, self.num_kv_heads, self.layer_idx = num_heads, num_kv_heads, layer_idx
        d = self.head_dim
        self.q_proj = nn.Linear(hidden_size, num_heads * d, bias=bias, dtype=dtype)
        self.k_proj = nn.Linear(hidden_size, num_kv_heads * d, bias=bias, dtype=dtype)
        self.v_proj = nn.Linear(hidden_size, num_kv_heads * d, bias=bias, dtype=dtype)
        self.o_proj = LinearFast(num_heads * d, hidden_size, bias=False, dtype=dtype)
        self._rotary = [rotary]  # shared by the layers, not a child
        self._qkv: List[LinearFast] = []  # not a child either: q/k/v_proj hold the Parameters

    def forward(self, x: torch.Tensor, position_ids: torch.Tensor, cache: Optional[StaticKVCache] = None,
                attention_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        if not self._qkv or self.q_proj.weight.data_ptr() != self._qkv[0].weight.data_ptr():
            self._qkv[:] = [_fuse_rows(self.q_proj, self.k_proj, self.v_proj)]
        b, s, _ = x.shape
        hq, hk, d = self.num_heads, self.num_kv_heads, self.head_dim
        qkv = self._qkv[0](x).view(b, s, hq + 2 * hk, d)
        q, k, v = qkv[:, :, :hq], qkv[:, :, hq:hq + hk], qkv[:, :, hq + hk:]
        q, k = self._rotary[0](q, k, position_ids)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        if cache is not None:
            k, v = cache.update(self.layer_idx, k, v)
        out = cached_attention(q, k, v, attention_mask, attention_mask is None and s > 1)
        return self.o_proj(out.transpose(1, 2).reshape(b, s, hq * d))


class DecoderLayer(nn.Module):
    """A Llama-style pre-norm decoder block: ``h = x + attn(norm(x)); out = h + mlp(norm(h))``, with the
    first add fused into the second norm."""

    def __init__(self, hidden_size: int, intermediate_size: int, num_heads: int, num_kv_heads: int, layer_idx: int,
                 rotary: RotaryEmbedding, eps: float = 1e-6, dtype=None):
        super().__init__()
        self.input_layernorm = RMSNorm(hidden_size, eps, torch.ones(hidden_size, dtype=dtype))
        self.self_attn = CachedAttention(hidden_size, num_heads, num_kv_heads, layer_idx, rotary, dtype=dtype)
        self.post_attention_layernorm = RMSNorm(hidden_size, eps, torch.ones(hidden_size, dtype=dtype))
        self.mlp = GatedMLP(hidden_size, intermediate_size, dtype=dtype)

    def forward(self, x: torch.Tensor, position_ids: torch.Tensor, cache: Optional[StaticKVCache] = None,
                attention_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        attn = self.self_attn(self.input_layernorm(x), position_ids, cache, attention_mask)
        h, residual = self.post_attention_layernorm(x, attn)  # attn += x in place, then the norm
        out = self.mlp(h)
        return out.add_(residual)
