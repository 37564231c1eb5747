"""Functional ops (IPEX names: ipex.nn.functional.*)."""
from typing import Sequence, Union

import torch

from .vision import roi_align

__all__ = ["interaction", "roi_align"]


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
