"""``nn.MultiheadAttention`` for inference: packed projections and ipex_lite's attention kernel.

``InferenceMultiheadAttention`` is an ``nn.MultiheadAttention`` (same Parameters, attributes and
state_dict keys) whose self-attention calls without attention weights -- what ViT, encoders and
most inference code make -- run the QKV projection as one packed GEMM, ipex_lite's attention
kernel over (B, H, L, D), and the packed output projection.  Every other call (training with
dropout, ``need_weights=True``, cross-attention, separate k/v dims, bias_k/v, add_zero_attn,
nested or unusual inputs, masks of a shape stock does not take) runs stock's forward, so it gives
stock's results and stock's errors.  ``ipex_lite.optimize`` swaps it in for the
``nn.MultiheadAttention`` modules that are not inside another torch module (whose fast paths read
the weights themselves).
"""
import copy
from typing import Optional

import torch
from torch import nn

from .functional import scaled_dot_product_attention
from .prepacked import PackedLinear


class _InProj(nn.Module):
    """The in-projection as a Linear-shaped view of the attention module's own Parameters."""

    def __init__(self, weight, bias):
        super().__init__()
        self.weight, self.bias = weight, bias


class InferenceMultiheadAttention(nn.MultiheadAttention):

    @classmethod
    def from_module(cls, mha: nn.MultiheadAttention, dtype: torch.dtype = torch.float32,
                    prepack: bool = True) -> "InferenceMultiheadAttention":
        new = cls.__new__(cls)
        nn.Module.__init__(new)
        for k, v in mha.__dict__.items():
            if k not in ("_parameters", "_buffers", "_modules"):
                new.__dict__[k] = copy.copy(v) if isinstance(v, dict) else v  # hook dicts are not shared
        for name, p in mha._parameters.items():
            new.register_parameter(name, p)  # the same Parameters: same keys, values and sharing
        for name, b in mha._buffers.items():
            new.register_buffer(name, b)
        new.out_proj = PackedLinear(mha.out_proj, dtype=dtype, prepack=prepack)
        # unregistered: its weight is in_proj_weight, already in the state_dict under its own name
        new.__dict__["in_proj"] = (None if mha.in_proj_weight is None else
                                   PackedLinear(_InProj(mha.in_proj_weight, mha.in_proj_bias), dtype=dtype,
                                                prepack=prepack))
        return new

    def _served(self, query, key, value, key_padding_mask, need_weights, attn_mask) -> bool:
        if need_weights or self.in_proj is None or not self._qkv_same_embed_dim or self.bias_k is not None \
                or self.add_zero_attn or (self.training and self.dropout > 0):
            return False
        if not (query is key and key is value) or not isinstance(query, torch.Tensor) or query.dim() != 3 \
                or query.is_nested or not query.is_floating_point() or query.device.type != "cpu":
            return False
        if torch.is_grad_enabled() and (query.requires_grad or self.in_proj_weight.requires_grad):
            return False
        b, length = (query.shape[0], query.shape[1]) if self.batch_first else (query.shape[1], query.shape[0])
        if query.shape[2] != self.embed_dim or b == 0 or length == 0:
            return False
        for mask, shapes in ((key_padding_mask, [(b, length)]),
                             (attn_mask, [(length, length), (b * self.num_heads, length, length)])):
            if mask is not None and (not isinstance(mask, torch.Tensor) or tuple(mask.shape) not in shapes
                                     or not (mask.dtype == torch.bool or mask.is_floating_point())):
                return False
        return True

    def _additive_mask(self, key_padding_mask, attn_mask, b, length, dtype) -> Optional[torch.Tensor]:
        """Both masks as one additive (B or 1, H or 1, L, L) float mask (bool True = not attended, as
        nn.MultiheadAttention reads them)."""
        def additive(m):
            return torch.zeros(m.shape, dtype=dtype).masked_fill_(m, float("-inf")) if m.dtype == torch.bool \
                else m.to(dtype)
        merged = None
        if attn_mask is not None:
            merged = additive(attn_mask)
            merged = merged.view(1, 1, length, length) if merged.dim() == 2 else \
                merged.view(b, self.num_heads, length, length)
        if key_padding_mask is not None:
            pad = additive(key_padding_mask).view(b, 1, 1, length)
            merged = pad if merged is None else merged + pad
        return merged

    def forward(self, query, key, value, key_padding_mask=None, need_weights=True, attn_mask=None,
                average_attn_weights=True, is_causal=False):
        if not self._served(query, key, value, key_padding_mask, need_weights, attn_mask):
            # stock's forward on the module's own (fp32) weights, also in a bf16 model
            dtype = self.out_proj.weight.dtype

            def cast(t):
                return t.to(dtype) if isinstance(t, torch.Tensor) and t.is_floating_point() else t
            return super().forward(cast(query), cast(key), cast(value), key_padding_mask=cast(key_padding_mask),
                                   need_weights=need_weights, attn_mask=cast(attn_mask),
                                   average_attn_weights=average_attn_weights, is_causal=is_causal)
        x = query if self.batch_first else query.transpose(0, 1)
        b, length, e = x.shape
        h = self.num_heads
        qkv = self.in_proj(x)  # (B, L, 3E)
        q, k, v = qkv.view(b, length, 3, h, e // h).permute(2, 0, 3, 1, 4).unbind(0)  # each (B, H, L, D)
        mask = self._additive_mask(key_padding_mask, attn_mask, b, length, q.dtype)
        # an attn_mask with is_causal is the causal mask by nn.MultiheadAttention's contract: applied as given
        out = scaled_dot_product_attention(q, k, v, attn_mask=mask)
        out = self.out_proj(out.transpose(1, 2).reshape(b, length, e))
        return (out if self.batch_first else out.transpose(0, 1)), None

    def extra_repr(self) -> str:
        return "packed projections, ipex_lite attention kernel for self-attention inference"
