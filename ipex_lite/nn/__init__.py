from . import functional, linear, modules, vision
from .linear import Fp32ComputeLinear
from .modules import (EmbeddingSpec, MergedEmbeddingBag, MergedEmbeddingBagWithAdaGrad, MergedEmbeddingBagWithCat,
                      MergedEmbeddingBagWithSGD)
from .vision import FrozenBatchNorm2d, RoIAlign

__all__ = ["functional", "linear", "modules", "EmbeddingSpec", "Fp32ComputeLinear", "MergedEmbeddingBag",
           "MergedEmbeddingBagWithSGD", "MergedEmbeddingBagWithAdaGrad", "MergedEmbeddingBagWithCat",
           "FrozenBatchNorm2d", "RoIAlign"]
