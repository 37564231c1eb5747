"""ipex_lite.launcher (top-level ``launcher/`` in the source tree): ``ipex-lite-run``."""
from .launch import main

__all__ = ["main"]
