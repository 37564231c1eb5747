"""Opt-in replacements of stock ATen CPU kernels.

IPEX replaced ATen kernels for the whole process as soon as it was imported.
ipex_lite registers nothing on ATen ops until asked, and only ops where its
kernel measured faster here (bench/aten_overrides.py; figures in the README).
Each override handles the arguments it is built for and hands every other
call to ATen's own kernel, so it is safe to leave on; turning it off
restores ATen's kernel exactly.

    ipex_lite.enable_aten_overrides()            # all of them
    with ipex_lite.aten_overrides(["_embedding_bag_backward"]):
        loss.backward()
"""
import contextlib
from typing import Iterable, Iterator, List, Optional

from . import _C

__all__ = ["aten_overrides", "available_aten_overrides", "disable_aten_overrides", "enable_aten_overrides",
           "enabled_aten_overrides"]


def available_aten_overrides() -> List[str]:
    """Names of the aten ops ipex_lite can take over:

    - ``_embedding_bag_backward``: dense weight gradient of ``nn.EmbeddingBag`` /
      ``F.embedding_bag`` with sum or mean pooling, fp32 and bf16 (deterministic,
      accumulated in fp32).  Sparse, max, ``scale_grad_by_freq`` and mean with
      ``padding_idx`` stay with ATen.
    """
    return list(_C.aten_override_names())


def enabled_aten_overrides() -> List[str]:
    """The overrides installed now."""
    return list(_C.active_aten_overrides())


def _names(ops: Optional[Iterable[str]]) -> List[str]:
    if ops is None:
        return available_aten_overrides()
    if isinstance(ops, str):
        ops = [ops]
    names = [op[len("aten::"):] if op.startswith("aten::") else op for op in ops]
    unknown = [n for n in names if n not in available_aten_overrides()]
    if unknown:
        raise ValueError(f"ops: no ATen override for {unknown}; available: {available_aten_overrides()}")
    return names


def enable_aten_overrides(ops: Optional[Iterable[str]] = None) -> List[str]:
    """Installs the named overrides (all when ``ops`` is None) for the CPU key
    of their aten ops, for the whole process.  Returns those it newly
    installed.  Names may carry the ``aten::`` prefix."""
    return [n for n in _names(ops) if not _C.set_aten_override(n, True)]


def disable_aten_overrides(ops: Optional[Iterable[str]] = None) -> List[str]:
    """Removes the named overrides (all when ``ops`` is None); ATen's kernels
    serve those ops again.  Returns those it removed."""
    return [n for n in _names(ops) if _C.set_aten_override(n, False)]


@contextlib.contextmanager
def aten_overrides(ops: Optional[Iterable[str]] = None) -> Iterator[List[str]]:
    """Overrides on inside the block; on exit only those this block turned on
    are turned off again, so blocks nest and an override enabled outside
    stays on."""
    added = enable_aten_overrides(ops)
    try:
        yield added
    finally:
        disable_aten_overrides(added)
