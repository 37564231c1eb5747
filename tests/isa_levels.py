"""Runs a script under IPEX_LITE_ISA=<level> in a fresh process (the level is
chosen once per process) and returns the JSON document its last line prints."""
import json
import os
import subprocess
import sys

import pytest

import ipex_lite

LEVELS = ["default", "avx2", "avx512", "avx512_bf16", "amx"]


def run_at_level(level: str, script: str) -> dict:
    info = ipex_lite.isa_info()
    if LEVELS.index(level) > min(LEVELS.index(info["cpu_level"]), LEVELS.index(info["built_level"])):
        pytest.skip(f"{level} not supported by this CPU/build")
    proc = subprocess.run([sys.executable, "-c", script], env=dict(os.environ, IPEX_LITE_ISA=level),
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    res = json.loads(proc.stdout.strip().splitlines()[-1])
    assert res["level"] == level
    return res


def run_at_every_level(script: str) -> list:
    """run_at_level for each level this CPU and build support (at least one)."""
    results = []
    for level in LEVELS:
        try:
            results.append(run_at_level(level, script))
        except pytest.skip.Exception:
            continue
    assert results
    return results
