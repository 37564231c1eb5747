"""ipex_lite.launcher (top-level ``launcher/`` in the source tree): the ``ipex-lite-run`` CPU launcher.

Modules: ``cpu_info`` (topology discovery), ``plan`` (core sets per instance), ``env`` (allocator /
OpenMP libraries and per-instance environment), ``launch`` (command line and process handling).
"""
from .launch import main

__all__ = ["main"]
