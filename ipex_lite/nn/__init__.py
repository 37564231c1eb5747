from . import functional, modules
from .modules import (EmbeddingSpec, MergedEmbeddingBag, MergedEmbeddingBagWithAdaGrad, MergedEmbeddingBagWithCat,
                      MergedEmbeddingBagWithSGD)

__all__ = ["functional", "modules", "EmbeddingSpec", "MergedEmbeddingBag", "MergedEmbeddingBagWithSGD",
           "MergedEmbeddingBagWithAdaGrad", "MergedEmbeddingBagWithCat"]
