from . import functional, modules, vision
from .modules import (EmbeddingSpec, MergedEmbeddingBag, MergedEmbeddingBagWithAdaGrad, MergedEmbeddingBagWithCat,
                      MergedEmbeddingBagWithSGD)
from .vision import FrozenBatchNorm2d, RoIAlign

__all__ = ["functional", "modules", "EmbeddingSpec", "MergedEmbeddingBag", "MergedEmbeddingBagWithSGD",
           "MergedEmbeddingBagWithAdaGrad", "MergedEmbeddingBagWithCat", "FrozenBatchNorm2d", "RoIAlign"]
