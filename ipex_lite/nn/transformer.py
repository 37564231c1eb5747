"""torch.nn's transformer layers for inference: packed projections, ipex_lite's attention kernel,
the activation fused into the first feed-forward GEMM and the residual adds into the GEMMs that
end each block.

``nn.TransformerEncoderLayer``'s eval fast path (``torch._transformer_encoder_layer_fwd``) reads the
layer's weights itself, so packing its children alone would never be called; these subclasses keep
the same Parameters, children and state_dict keys and compute the same function with ipex_lite's
modules.  Training and calls that need gradients run torch's own forward (through the same
children, whose packed modules have autograd paths).  ``InferenceTransformerEncoder`` reproduces
``nn.TransformerEncoder``'s nested-tensor path without nested tensors: where stock would pack the
batch by ``src_key_padding_mask``, padded positions come out as zeros, as stock's do.
"""
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.modules.transformer import _detect_is_causal_mask, _get_seq_len

from .attention import InferenceMultiheadAttention, adopt
from .prepacked import PackedLinear


def _activation_name(activation) -> Optional[str]:
    """The packed kernels' name for the layer's activation (a function or a module), None if they lack it."""
    if activation in (F.relu, torch.relu) or type(activation) is nn.ReLU:
        return "relu"
    if activation is F.gelu or (type(activation) is nn.GELU and activation.approximate == "none"):
        return "gelu"
    if type(activation) is nn.GELU and activation.approximate == "tanh":
        return "gelu_tanh"
    return None


class _FeedForward:
    """Shared by the encoder and decoder layers: children packed in place, the feed-forward block."""

    @classmethod
    def from_module(cls, layer: nn.Module, dtype: torch.dtype = torch.float32, prepack: bool = True):
        new = adopt(cls, layer)
        for name in ("self_attn", "multihead_attn"):
            if isinstance(getattr(layer, name, None), nn.MultiheadAttention):
                setattr(new, name, InferenceMultiheadAttention.from_module(getattr(layer, name), dtype, prepack))
        unary = _activation_name(layer.activation)
        new.linear1 = PackedLinear(layer.linear1, unary=unary, dtype=dtype, prepack=prepack)
        new.linear2 = PackedLinear(layer.linear2, binary=True, dtype=dtype, prepack=prepack)
        new.fused_activation = unary is not None
        return new

    def _hidden(self, x):
        h = self.linear1(x)
        return h if self.fused_activation else self.activation(h)

    def _ff_block(self, x):  # torch's formulation (training path), with the fused activation
        return getattr(self, self._FF_DROPOUT)(self.linear2(self.dropout(self._hidden(x))))

    def _ff_residual(self, x, residual):
        return self.linear2(self._hidden(x), residual)

    def _use_stock(self, x) -> bool:
        return self.training or x.is_nested or \
            (torch.is_grad_enabled() and (x.requires_grad or any(p.requires_grad for p in self.parameters())))

    def extra_repr(self) -> str:
        return "packed GEMMs (activation and residual adds fused), ipex_lite attention kernel"


class InferenceTransformerEncoderLayer(_FeedForward, nn.TransformerEncoderLayer):
    _FF_DROPOUT = "dropout2"

    def forward(self, src, src_mask=None, src_key_padding_mask=None, is_causal=False):
        if self._use_stock(src):
            if src.is_nested:
                raise NotImplementedError(
                    "InferenceTransformerEncoderLayer does not take nested tensors: pass the padded batch and "
                    "src_key_padding_mask (ipex_lite's TransformerEncoder does so instead of nesting)")
            return super().forward(src, src_mask, src_key_padding_mask, is_causal)
        # the masks as stock's layer takes them (its checks and messages; bool masks become float)
        kpm = F._canonical_mask(mask=src_key_padding_mask, mask_name="src_key_padding_mask",
                                other_type=F._none_or_dtype(src_mask), other_name="src_mask", target_type=src.dtype)
        mask = F._canonical_mask(mask=src_mask, mask_name="src_mask", other_type=None, other_name="",
                                 target_type=src.dtype, check_other=False)
        attn, x = self.self_attn, src
        if self.norm_first:
            h = self.norm1(x)
            x = attn.forward_residual(h, h, h, x, kpm, mask, is_causal)
            return self._ff_residual(self.norm2(x), x)
        x = self.norm1(attn.forward_residual(x, x, x, x, kpm, mask, is_causal))
        return self.norm2(self._ff_residual(x, x))


class InferenceTransformerDecoderLayer(_FeedForward, nn.TransformerDecoderLayer):
    _FF_DROPOUT = "dropout3"

    def forward(self, tgt, memory, tgt_mask=None, memory_mask=None, tgt_key_padding_mask=None,
                memory_key_padding_mask=None, tgt_is_causal=False, memory_is_causal=False):
        if self._use_stock(tgt):
            return super().forward(tgt, memory, tgt_mask, memory_mask, tgt_key_padding_mask,
                                   memory_key_padding_mask, tgt_is_causal, memory_is_causal)
        sa, ca, x = self.self_attn, self.multihead_attn, tgt
        if self.norm_first:
            h = self.norm1(x)
            x = sa.forward_residual(h, h, h, x, tgt_key_padding_mask, tgt_mask, tgt_is_causal)
            x = ca.forward_residual(self.norm2(x), memory, memory, x, memory_key_padding_mask, memory_mask,
                                    memory_is_causal)
            return self._ff_residual(self.norm3(x), x)
        x = self.norm1(sa.forward_residual(x, x, x, x, tgt_key_padding_mask, tgt_mask, tgt_is_causal))
        x = self.norm2(ca.forward_residual(x, memory, memory, x, memory_key_padding_mask, memory_mask,
                                           memory_is_causal))
        return self.norm3(self._ff_residual(x, x))


class InferenceTransformerEncoder(nn.TransformerEncoder):

    @classmethod
    def from_module(cls, encoder: nn.TransformerEncoder) -> "InferenceTransformerEncoder":
        return adopt(cls, encoder)

    def _stock_nests(self, src, mask, kpm) -> bool:
        """Whether stock's forward would run this call on a nested tensor (its conditions, in its order)."""
        if not (torch.backends.mha.get_fastpath_enabled() and getattr(self, "use_nested_tensor", False)
                and src.dim() == 3 and kpm is not None and mask is None and not torch.is_autocast_enabled()):
            return False
        if getattr(self, "mask_check", True):
            return not torch.compiler.is_compiling() and \
                bool(torch._nested_tensor_from_mask_left_aligned(src, kpm.logical_not()))
        return True

    def forward(self, src, mask=None, src_key_padding_mask=None, is_causal=None):
        layers = list(self.layers)
        if src.is_nested or not all(isinstance(m, InferenceTransformerEncoderLayer) for m in layers) or \
                any(m._use_stock(src) for m in layers):
            return super().forward(src, mask, src_key_padding_mask, is_causal)
        kpm = F._canonical_mask(mask=src_key_padding_mask, mask_name="src_key_padding_mask",
                                other_type=F._none_or_dtype(mask), other_name="mask", target_type=src.dtype)
        mask = F._canonical_mask(mask=mask, mask_name="mask", other_type=None, other_name="",
                                 target_type=src.dtype, check_other=False)
        zero_padded = self._stock_nests(src, mask, kpm)
        is_causal = _detect_is_causal_mask(mask, is_causal, _get_seq_len(src, layers[0].self_attn.batch_first))
        out = src
        for layer in layers:
            out = layer(out, src_mask=mask, is_causal=is_causal, src_key_padding_mask=kpm)
        if zero_padded:  # stock's nested batch comes back padded with zeros
            out = out.masked_fill((kpm != 0).unsqueeze(-1), 0.0)
        return out if self.norm is None else self.norm(out)


_SWAPS = {nn.MultiheadAttention: InferenceMultiheadAttention, nn.TransformerEncoderLayer: InferenceTransformerEncoderLayer,
          nn.TransformerDecoderLayer: InferenceTransformerDecoderLayer}


def fast_module(module: nn.Module, dtype: torch.dtype, prepack: bool) -> Optional[nn.Module]:
    """ipex_lite's replacement for one of torch's attention/transformer modules, else None."""
    if type(module) is nn.TransformerEncoder:
        return InferenceTransformerEncoder.from_module(module)
    cls = _SWAPS.get(type(module))
    return None if cls is None else cls.from_module(module, dtype, prepack)
