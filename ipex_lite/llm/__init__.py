"""LLM inference (IPEX names: ``ipex.llm``): ``optimize`` for Hugging Face decoders, the building blocks
as ``functional`` and ``modules``, and the KV caches."""
from . import functional, modules
from ._optimize import optimize
from .cache import KVCache, StaticKVCache, kv_cache_available

__all__ = ["optimize", "functional", "modules", "KVCache", "StaticKVCache", "kv_cache_available"]
