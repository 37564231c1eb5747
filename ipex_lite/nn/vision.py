"""Detection helpers with torchvision's names and semantics: ``roi_align``,
``RoIAlign`` and ``FrozenBatchNorm2d`` (state_dict compatible with
torchvision's; ``ipex_lite.optimize`` folds it into the convolution before it)."""
from typing import List, Sequence, Tuple, Union

import torch
from torch import nn

__all__ = ["roi_align", "RoIAlign", "FrozenBatchNorm2d"]

ops = torch.ops.ipex_lite


def as_pair(v) -> tuple:
    """An int as (v, v); any other sequence as a tuple (its length unchecked)."""
    return (v, v) if isinstance(v, int) else tuple(v)


def _pair(v) -> Tuple[int, int]:
    v = as_pair(v)
    if len(v) != 2 or not all(isinstance(i, int) for i in v):
        raise ValueError(f"roi_align: output_size must be an int or a pair of ints, got {v!r}")
    return v


def _as_rois(boxes: Union[torch.Tensor, Sequence[torch.Tensor]], dtype: torch.dtype) -> torch.Tensor:
    """(K, 5) rois from a (K, 5) tensor or from one (Ki, 4) box tensor per image (torchvision's convention)."""
    if isinstance(boxes, torch.Tensor):
        if boxes.dim() != 2 or boxes.shape[1] != 5:
            raise ValueError(f"roi_align: a boxes tensor must be (K, 5) = (batch index, x1, y1, x2, y2), "
                             f"got shape {tuple(boxes.shape)}")
        return boxes
    parts = []
    for i, b in enumerate(boxes):
        if not isinstance(b, torch.Tensor) or b.dim() != 2 or b.shape[1] != 4:
            raise ValueError(f"roi_align: boxes[{i}] must be a (Ki, 4) tensor")
        parts.append(torch.cat([torch.full((b.shape[0], 1), float(i), dtype=b.dtype), b], dim=1))
    if not parts:
        return torch.zeros(0, 5, dtype=dtype)
    return torch.cat(parts)


def roi_align(input: torch.Tensor, boxes: Union[torch.Tensor, List[torch.Tensor]], output_size, spatial_scale=1.0,
              sampling_ratio: int = -1, aligned: bool = False) -> torch.Tensor:
    """torchvision.ops.roi_align: (K, C, PH, PW) average of bilinear samples per bin.

    fp32 / fp64 / bf16 (computed in fp32), NCHW or channels_last input,
    parallel over boxes; differentiable w.r.t. ``input``."""
    ph, pw = _pair(output_size)
    rois = _as_rois(boxes, input.dtype)
    return ops.roi_align_forward(input, rois, float(spatial_scale), ph, pw, int(sampling_ratio), bool(aligned))


class RoIAlign(nn.Module):
    """torchvision.ops.RoIAlign."""

    def __init__(self, output_size, spatial_scale: float, sampling_ratio: int, aligned: bool = False):
        super().__init__()
        self.output_size, self.spatial_scale = _pair(output_size), spatial_scale
        self.sampling_ratio, self.aligned = sampling_ratio, aligned

    def forward(self, input, rois):
        return roi_align(input, rois, self.output_size, self.spatial_scale, self.sampling_ratio, self.aligned)

    def extra_repr(self) -> str:
        return (f"output_size={self.output_size}, spatial_scale={self.spatial_scale}, "
                f"sampling_ratio={self.sampling_ratio}, aligned={self.aligned}")


class FrozenBatchNorm2d(nn.Module):
    """BatchNorm2d with fixed statistics and affine parameters (buffers, not
    trained): y = (x - mean) / sqrt(var + eps) * weight + bias in one pass,
    NCHW or channels_last, fp32 or bf16; differentiable w.r.t. the input."""

    def __init__(self, num_features: int, eps: float = 1e-5):
        super().__init__()
        self.num_features, self.eps = num_features, eps
        self.register_buffer("weight", torch.ones(num_features))
        self.register_buffer("bias", torch.zeros(num_features))
        self.register_buffer("running_mean", torch.zeros(num_features))
        self.register_buffer("running_var", torch.ones(num_features))

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        state_dict.pop(prefix + "num_batches_tracked", None)  # a BatchNorm2d checkpoint loads too
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)

    def forward(self, x):
        return ops.frozen_batch_norm(x, self.weight, self.bias, self.running_mean, self.running_var, self.eps)

    def extra_repr(self) -> str:
        return f"{self.num_features}, eps={self.eps}"
