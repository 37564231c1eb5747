"""``nn.MultiheadAttention`` for inference: packed projections and ipex_lite's attention kernel.

``InferenceMultiheadAttention`` is an ``nn.MultiheadAttention`` (same Parameters, attributes and
state_dict keys) whose calls without attention weights -- what ViT, encoders, decoders and most
inference code make -- run the projections as packed GEMMs (Q, K and V as one GEMM for
self-attention; Q and KV for cross-attention), ipex_lite's attention kernel over (B, H, L, D), and
the packed output projection.  Every other call (training with dropout, ``need_weights=True``,
separate k/v dims, bias_k/v, add_zero_attn, nested or unusual inputs, masks of a shape stock does
not take, ``is_causal`` without a mask) runs stock's forward, so it gives stock's results and
stock's errors.  ``ipex_lite.optimize`` swaps it in for ``nn.MultiheadAttention`` modules, and
``ipex_lite.nn.transformer``'s layers use it.
"""
import copy
from typing import Optional

import torch
from torch import nn

from .functional import scaled_dot_product_attention
from .prepacked import PackedLinear


class _InProj(nn.Module):
    """Rows of the in-projection as a Linear-shaped view of the attention module's own Parameters."""

    def __init__(self, weight, bias):
        super().__init__()
        self.weight, self.bias = weight, bias


def adopt(cls, module: nn.Module) -> nn.Module:
    """A ``cls`` instance (a subclass of ``type(module)``) holding ``module``'s attributes, Parameters,
    buffers and children: the same state_dict keys, values and sharing."""
    new = cls.__new__(cls)
    nn.Module.__init__(new)
    for k, v in module.__dict__.items():
        if k not in ("_parameters", "_buffers", "_modules"):
            new.__dict__[k] = copy.copy(v) if isinstance(v, dict) else v  # hook dicts are not shared
    for name, p in module._parameters.items():
        new.register_parameter(name, p)
    for name, b in module._buffers.items():
        new.register_buffer(name, b)
    for name, m in module._modules.items():
        new.add_module(name, m)
    return new


def _grad_needed(*tensors) -> bool:
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


class InferenceMultiheadAttention(nn.MultiheadAttention):

    @classmethod
    def from_module(cls, mha: nn.MultiheadAttention, dtype: torch.dtype = torch.float32,
                    prepack: bool = True) -> "InferenceMultiheadAttention":
        new = adopt(cls, mha)
        new.out_proj = PackedLinear(mha.out_proj, dtype=dtype, prepack=prepack)
        # unregistered: its weight is in_proj_weight, already in the state_dict under its own name
        new.__dict__["in_proj"] = (None if mha.in_proj_weight is None else
                                   PackedLinear(_InProj(mha.in_proj_weight, mha.in_proj_bias), dtype=dtype,
                                                prepack=prepack))
        new.__dict__["_row_projections"] = {}
        return new

    def _rows(self, part: str) -> nn.Module:
        """The packed projection for "q", "k", "v" or "kv" (cross-attention), made on first use."""
        projections = self.__dict__.setdefault("_row_projections", {})
        if part not in projections:
            e = self.embed_dim
            lo, hi = {"q": (0, e), "k": (e, 2 * e), "v": (2 * e, 3 * e), "kv": (e, 3 * e)}[part]
            with torch.no_grad():  # views of the Parameters: updates to them reach the packed copy
                w, b = self.in_proj_weight[lo:hi], None if self.in_proj_bias is None else self.in_proj_bias[lo:hi]
            projections[part] = PackedLinear(_InProj(w, b), dtype=self.out_proj.dtype, prepack=self.out_proj.prepack)
        return projections[part]

    def _sizes(self, query, key):
        """(batch, target length, source length) of 3-D inputs in the module's layout."""
        bdim = 0 if self.batch_first else 1
        return query.shape[bdim], query.shape[1 - bdim], key.shape[1 - bdim]

    def _served(self, query, key, value, key_padding_mask, need_weights, attn_mask, is_causal=False) -> bool:
        if need_weights or self.in_proj is None or not self._qkv_same_embed_dim or self.bias_k is not None \
                or self.add_zero_attn or (self.training and self.dropout > 0) or (is_causal and attn_mask is None):
            return False
        for t in (query, key, value):
            if not isinstance(t, torch.Tensor) or t.dim() != 3 or t.is_nested or not t.is_floating_point() \
                    or t.device.type != "cpu" or t.shape[2] != self.embed_dim:
                return False
        if _grad_needed(query, key, value, self.in_proj_weight):
            return False
        b, length, src_len = self._sizes(query, key)
        if key.shape != value.shape or key.shape[0 if self.batch_first else 1] != b or b == 0 or length == 0 \
                or src_len == 0:
            return False
        for mask, shapes in ((key_padding_mask, [(b, src_len)]),
                             (attn_mask, [(length, src_len), (b * self.num_heads, length, src_len)])):
            if mask is not None and (not isinstance(mask, torch.Tensor) or tuple(mask.shape) not in shapes
                                     or not (mask.dtype == torch.bool or mask.is_floating_point())):
                return False
        return True

    def _additive_mask(self, key_padding_mask, attn_mask, b, length, src_len, dtype) -> Optional[torch.Tensor]:
        """Both masks as one additive (B or 1, H or 1, L, S) float mask (bool True = not attended, as
        nn.MultiheadAttention reads them)."""
        def additive(m):
            return torch.zeros(m.shape, dtype=dtype).masked_fill_(m, float("-inf")) if m.dtype == torch.bool \
                else m.to(dtype)
        merged = None
        if attn_mask is not None:
            merged = additive(attn_mask)
            merged = merged.view(1, 1, length, src_len) if merged.dim() == 2 else \
                merged.view(b, self.num_heads, length, src_len)
        if key_padding_mask is not None:
            pad = additive(key_padding_mask).view(b, 1, 1, src_len)
            merged = pad if merged is None else merged + pad
        return merged

    def _attend(self, query, key, value, key_padding_mask, attn_mask, residual=None):
        """The served computation on batch-first (B, L, E) / (B, S, E) inputs; ``residual`` (B, L, E) is
        added by the output projection's kernel."""
        b, length, e = query.shape
        src_len, h = key.shape[1], self.num_heads
        d = e // h
        if query is key and key is value:
            q, k, v = self.in_proj(query).view(b, length, 3, h, d).permute(2, 0, 3, 1, 4).unbind(0)
        else:
            q = self._rows("q")(query).view(b, length, h, d).transpose(1, 2)
            if key is value:
                k, v = self._rows("kv")(key).view(b, src_len, 2, h, d).permute(2, 0, 3, 1, 4).unbind(0)
            else:
                k = self._rows("k")(key).view(b, src_len, h, d).transpose(1, 2)
                v = self._rows("v")(value).view(b, src_len, h, d).transpose(1, 2)
        mask = self._additive_mask(key_padding_mask, attn_mask, b, length, src_len, q.dtype)
        # an attn_mask with is_causal is the causal mask by nn.MultiheadAttention's contract: applied as given
        out = scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return self.out_proj(out.transpose(1, 2).reshape(b, length, e), residual)

    def _stock(self, query, key, value, **kwargs):
        # stock's forward on the module's own (fp32) weights, also in a bf16 model
        dtype = self.out_proj.weight.dtype

        def cast(t):
            return t.to(dtype) if isinstance(t, torch.Tensor) and t.is_floating_point() else t
        return super().forward(cast(query), cast(key), cast(value), **{k: cast(v) for k, v in kwargs.items()})

    def _batch_first(self, *tensors):
        return tensors if self.batch_first else tuple(t.transpose(0, 1) for t in tensors)

    def _inputs(self, query, key, value):
        """Batch-first views of the inputs, keeping which of them are the same tensor."""
        q, = self._batch_first(query)
        k = q if key is query else self._batch_first(key)[0]
        v = k if value is key else q if value is query else self._batch_first(value)[0]
        return q, k, v

    def forward(self, query, key, value, key_padding_mask=None, need_weights=True, attn_mask=None,
                average_attn_weights=True, is_causal=False):
        if not self._served(query, key, value, key_padding_mask, need_weights, attn_mask, is_causal):
            return self._stock(query, key, value, key_padding_mask=key_padding_mask, need_weights=need_weights,
                               attn_mask=attn_mask, average_attn_weights=average_attn_weights, is_causal=is_causal)
        out = self._attend(*self._inputs(query, key, value), key_padding_mask, attn_mask)
        return self._batch_first(out)[0], None

    def _check_mask_shapes(self, query, key, key_padding_mask, attn_mask) -> None:
        """Masks whose shapes do not fit the batch are refused (stock's fused encoder path reads some of
        them silently, giving NaN or a misplaced mask; its error, where it has one, is a failed view)."""
        if not (isinstance(query, torch.Tensor) and isinstance(key, torch.Tensor) and query.dim() == 3
                and key.dim() == 3) or query.is_nested or key.is_nested:
            return
        b, length, src_len = self._sizes(query, key)
        if isinstance(key_padding_mask, torch.Tensor) and tuple(key_padding_mask.shape) != (b, src_len):
            raise RuntimeError(f"key_padding_mask has shape {tuple(key_padding_mask.shape)}, but should be "
                               f"(batch, source length) = {(b, src_len)}")
        if isinstance(attn_mask, torch.Tensor) and tuple(attn_mask.shape) not in (
                (length, src_len), (b * self.num_heads, length, src_len)):
            raise RuntimeError(f"attn_mask has shape {tuple(attn_mask.shape)}, but should be {(length, src_len)} "
                               f"or (batch * num_heads, target length, source length) = "
                               f"{(b * self.num_heads, length, src_len)}")

    def forward_residual(self, query, key, value, residual, key_padding_mask=None, attn_mask=None,
                         is_causal=False):
        """``residual + forward(query, key, value, ..., need_weights=False)[0]``, the add done by the output
        projection's kernel when the call is served (the transformer layers' attention blocks)."""
        self._check_mask_shapes(query, key, key_padding_mask, attn_mask)
        if not self._served(query, key, value, key_padding_mask, False, attn_mask, is_causal):
            out = self._stock(query, key, value, key_padding_mask=key_padding_mask, need_weights=False,
                              attn_mask=attn_mask, is_causal=is_causal)[0]
            return residual + out
        q, k, v = self._inputs(query, key, value)
        return self._batch_first(self._attend(q, k, v, key_padding_mask, attn_mask, *self._batch_first(residual)))[0]

    def extra_repr(self) -> str:
        return "packed projections, ipex_lite attention kernel for inference without attention weights"
