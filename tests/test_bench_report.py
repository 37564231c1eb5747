"""The benchmark report keeps working: a reduced --quick run end to end (one fast script), and
rendering of every row shape the scripts produce (no timing assertions)."""
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from bench import report  # noqa: E402


def test_quick_run_writes_report(tmp_path):
    r = subprocess.run([sys.executable, "-m", "bench", "--quick", "--only", "interaction", "--out", str(tmp_path),
                        "--no-charts"], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    assert "[1/1] bench/interaction.py" in r.stderr  # progress
    text = (tmp_path / "REPORT.md").read_text()
    for needle in ("## Machine", "ISA:", "IPEX:", "## Headline", "forward float32", "ipex_lite"):
        assert needle in text, needle


def test_render_rows_errors_and_charts(tmp_path):
    machine = {"cpu": "test cpu", "threads": 2, "isa": "avx2", "amx": False, "avx512_bf16": False}
    results = [
        {"script": "optimizers", "title": "step", "reference": "torch fused fp32", "machine": machine, "seconds": 1.0,
         "rows": [{"workload": "SGD", "system": "torch fused fp32", "median_ms": 2.0, "ratio": 1.0, "GB/s": 30.0},
                  {"workload": "SGD", "system": "ipex_lite split-bf16", "median_ms": 1.6, "ratio": 1.25,
                   "GB/s": 35.0},
                  {"workload": "SGD", "system": "torch.compile", "median_ms": 1.9, "ratio": 1.05}],
         "notes": ["a note"]},
        {"script": "models", "error": "timed out after 1 s"},
    ]
    path = report.write_report(results, str(tmp_path), charts=True)
    text = open(path).read()
    assert "1.25x (ipex_lite split-bf16)" in text and "1.05x (torch.compile)" in text
    assert "not measured: timed out" in text and "- a note" in text
    pytest.importorskip("matplotlib")
    assert (tmp_path / "speedups.png").stat().st_size > 0 and (tmp_path / "bandwidth.png").stat().st_size > 0
