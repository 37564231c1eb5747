"""CPU runtime features (IPEX's ``ipex.cpu`` namespace)."""
from . import runtime

__all__ = ["runtime"]
