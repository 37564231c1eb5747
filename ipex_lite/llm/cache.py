"""KV caches that are allocated once per generation instead of growing by ``torch.cat`` every token.

``KVCache`` is a ``transformers.DynamicCache`` whose full-attention layers (transformers 5.x layer classes;
the key_cache / value_cache lists of 4.x) keep keys and values in a buffer sized for the whole generation; ``update`` copies the new positions in
and returns views of the filled part, which ipex_lite's decode attention reads in place.  Everything
else a ``DynamicCache`` does (crop, beam reordering, batch selection, sliding-window layers) keeps
working: an operation that replaces the layer's tensors is noticed at the next update and the buffer is
rebuilt around the new tensors.  ``ipex_lite.llm.optimize`` makes ``generate()`` use it.

``StaticKVCache`` is the cache of the hand-built decoders in ``ipex_lite.llm.modules``.
"""
from typing import List, Optional, Tuple

import torch

__all__ = ["KVCache", "StaticKVCache", "kv_cache_available"]

_ROUND = 256  # positions: a buffer grown without a size hint is rounded up to this


def _check_states(layer_name: str, buf: torch.Tensor, new: torch.Tensor, what: str) -> None:
    if new.dim() != 4:
        raise ValueError(f"{layer_name}: {what} must be (batch, kv_heads, positions, head_dim), got {tuple(new.shape)}")
    if new.dtype != buf.dtype or new.device != buf.device:
        raise ValueError(f"{layer_name}: the cache holds {buf.dtype} on {buf.device} but {what} are {new.dtype} on "
                         f"{new.device}")
    if (new.shape[0], new.shape[1], new.shape[3]) != (buf.shape[0], buf.shape[1], buf.shape[3]):
        raise ValueError(f"{layer_name}: {what} of shape {tuple(new.shape)} do not match the cache's (batch, kv_heads, "
                         f"head_dim) = {(buf.shape[0], buf.shape[1], buf.shape[3])}")


class _Buffers:
    """Keys and values of one layer in buffers with room for ``capacity`` positions."""

    def __init__(self, capacity: int = 0):
        self.capacity_hint = capacity
        self.k: Optional[torch.Tensor] = None
        self.v: Optional[torch.Tensor] = None

    def holds(self, keys: torch.Tensor, values: torch.Tensor) -> bool:
        """Whether keys/values are still the filled part of our buffers (nothing replaced them)."""
        return (self.k is not None and keys.data_ptr() == self.k.data_ptr() and values.data_ptr() == self.v.data_ptr()
                and keys.stride() == self.k.stride() and keys.shape[:2] == self.k.shape[:2])

    def reserve(self, template: torch.Tensor, vtemplate: torch.Tensor, filled_k: Optional[torch.Tensor],
                filled_v: Optional[torch.Tensor], need: int) -> None:
        have = 0 if self.k is None else self.k.shape[2]
        cap = max(need, self.capacity_hint, 2 * have)
        cap = -(-cap // _ROUND) * _ROUND if cap > self.capacity_hint else cap
        b, h, _, d = template.shape
        k = template.new_empty((b, h, cap, d))
        v = vtemplate.new_empty((b, h, cap, vtemplate.shape[3]))
        if filled_k is not None and filled_k.shape[2] > 0:
            n = filled_k.shape[2]
            k[:, :, :n].copy_(filled_k)
            v[:, :, :n].copy_(filled_v)
        self.k, self.v = k, v

    def append(self, name: str, keys: Optional[torch.Tensor], values: Optional[torch.Tensor],
               key_states: torch.Tensor, value_states: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """(keys, values) -- the layer's filled positions, or None -- with the new states after them, as views
        of the buffers.  Raises before writing anything when the states do not fit the layer."""
        for what, t in (("key_states", key_states), ("value_states", value_states)):
            if t.dim() != 4:
                raise ValueError(f"{name}: {what} must be (batch, kv_heads, positions, head_dim), got {tuple(t.shape)}")
        filled = 0 if keys is None else keys.shape[2]
        need = filled + key_states.shape[2]
        if filled:
            _check_states(name, keys, key_states, "key_states")
            _check_states(name, values, value_states, "value_states")
            if not self.holds(keys, values):  # crop / reorder / batch selection replaced the tensors
                self.k = None
            if self.k is None or need > self.k.shape[2]:
                self.reserve(keys, values, keys, values, need)
        elif (self.k is None or need > self.k.shape[2] or self.k.dtype != key_states.dtype
              or self.k.shape[:2] != key_states.shape[:2] or self.k.shape[3] != key_states.shape[3]
              or self.v.shape[3] != value_states.shape[3]):
            self.k = None
            self.reserve(key_states, value_states, None, None, need)
        self.k[:, :, filled:need].copy_(key_states)
        self.v[:, :, filled:need].copy_(value_states)
        return self.k[:, :, :need], self.v[:, :, :need]


def _make_cache_class():
    try:
        from transformers.cache_utils import DynamicCache
    except ImportError:
        return None
    try:
        from transformers.cache_utils import DynamicLayer
    except ImportError:  # transformers < 4.56: key_cache / value_cache lists
        DynamicLayer = None

    if DynamicLayer is not None:
        class PreallocatedLayer(DynamicLayer):
            """A ``DynamicLayer`` whose keys/values are views of buffers sized once for the generation."""

            def __init__(self, capacity: int = 0):
                super().__init__()
                self._buffers = _Buffers(capacity)

            def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs
                       ) -> Tuple[torch.Tensor, torch.Tensor]:
                if not self.is_initialized and key_states.dim() == 4:
                    self.lazy_initialization(key_states, value_states)
                filled = self.get_seq_length() if self.is_initialized else 0
                self.keys, self.values = self._buffers.append(
                    type(self).__name__, self.keys if filled else None, self.values if filled else None,
                    key_states, value_states)
                return self.keys, self.values

        class KVCache(DynamicCache):
            """``DynamicCache`` with preallocated full-attention layers (see the module docstring).

            Args:
                config: the model config (layer types, as ``DynamicCache`` reads them); optional.
                max_length: positions to reserve per layer at the first update (prompt + new tokens); more
                    are added by doubling if a generation runs past it.
            """

            def __init__(self, config=None, max_length: int = 0):
                super().__init__(config=config)
                if not self.layers:  # no config: layers are created on first use
                    self.layer_class_to_replicate = PreallocatedLayer
                self.layers = [PreallocatedLayer(max_length) if type(layer) is DynamicLayer else layer
                               for layer in self.layers]

        return KVCache

    class KVCache(DynamicCache):  # noqa: F811 - the transformers 4.x form
        """``DynamicCache`` (transformers 4.x) whose per-layer tensors are views of preallocated buffers."""

        def __init__(self, config=None, max_length: int = 0):
            super().__init__()
            self._buffers = []
            self._capacity = max_length

        def update(self, key_states, value_states, layer_idx, cache_kwargs=None):
            while len(self._buffers) <= layer_idx:
                self._buffers.append(_Buffers(self._capacity))
            filled = (layer_idx < len(self.key_cache) and isinstance(self.key_cache[layer_idx], torch.Tensor)
                      and self.key_cache[layer_idx].numel() > 0)
            keys, values = self._buffers[layer_idx].append(
                f"KVCache layer {layer_idx}", self.key_cache[layer_idx] if filled else None,
                self.value_cache[layer_idx] if filled else None, key_states, value_states)
            if layer_idx == 0:
                self._seen_tokens += key_states.shape[-2]
            while len(self.key_cache) <= layer_idx:
                self.key_cache.append(torch.tensor([]))
                self.value_cache.append(torch.tensor([]))
            self.key_cache[layer_idx], self.value_cache[layer_idx] = keys, values
            return keys, values

    return KVCache


KVCache = _make_cache_class()


def kv_cache_available() -> bool:
    """True when the installed transformers has a ``DynamicCache`` for ``KVCache`` to build on."""
    return KVCache is not None


class StaticKVCache:
    """Per-layer key/value buffers of fixed capacity for the hand-built decoders of ``ipex_lite.llm.modules``.

    ``update(layer, k, v)`` takes (batch, kv_heads, n, head_dim) states, writes them after the positions the
    layer holds and returns views of everything it holds.  ``advance``-free: each layer counts its own
    positions; ``reset()`` starts a new sequence without reallocating.
    """

    def __init__(self, num_layers: int, batch_size: int, kv_heads: int, head_dim: int, max_length: int,
                 dtype: torch.dtype = torch.bfloat16, device="cpu"):
        if min(num_layers, batch_size, kv_heads, head_dim, max_length) <= 0:
            raise ValueError("StaticKVCache: num_layers, batch_size, kv_heads, head_dim and max_length must be positive")
        shape = (batch_size, kv_heads, max_length, head_dim)
        self.keys: List[torch.Tensor] = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.values: List[torch.Tensor] = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.lengths = [0] * num_layers
        self.max_length = max_length

    def seq_length(self, layer: int = 0) -> int:
        return self.lengths[layer]

    def update(self, layer: int, key: torch.Tensor, value: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        if not 0 <= layer < len(self.keys):
            raise IndexError(f"StaticKVCache: layer {layer} out of range [0, {len(self.keys)})")
        name = f"StaticKVCache layer {layer}"
        _check_states(name, self.keys[layer], key, "keys")
        _check_states(name, self.values[layer], value, "values")
        start = self.lengths[layer]
        end = start + key.shape[2]
        if end > self.max_length:
            raise ValueError(f"{name}: {end} positions do not fit the cache's max_length {self.max_length}")
        self.keys[layer][:, :, start:end].copy_(key)
        self.values[layer][:, :, start:end].copy_(value)
        self.lengths[layer] = end
        return self.keys[layer][:, :, :end], self.values[layer][:, :, :end]

    def reset(self) -> None:
        self.lengths = [0] * len(self.lengths)
