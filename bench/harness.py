"""Shared benchmark harness.

Cases are measured interleaved (A B C A B C ...) in one process so that a
noisy neighbour hits every system alike; each sample times `inner` calls and
the reported figure is the median sample.  Ratios are reference time / case
time (higher is better), taken from medians measured in the same run.
"""
import argparse
import json
import platform
import statistics
import sys
import time
from typing import Callable, Dict, List, Optional

import torch


def add_common_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    parser.add_argument("--repeat", type=int, default=15, help="interleaved samples per case (median is reported)")
    parser.add_argument("--warmup", type=int, default=3, help="untimed rounds before sampling")
    parser.add_argument("--quick", action="store_true", help="fewer samples, for smoke runs")
    parser.add_argument("--json", action="store_true", help="print one JSON document instead of tables")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads before measuring")
    return parser


def add_model_args(parser: argparse.ArgumentParser, models) -> argparse.ArgumentParser:
    """--model (comma-separated names of ``models``, all by default) and --no-compile."""
    parser.add_argument("--model", default=",".join(models))
    parser.add_argument("--no-compile", dest="compile", action="store_false",
                        help="skip torch.compile (minutes of compiling per model on 2 cores)")
    return parser


def selected_models(parser: argparse.ArgumentParser, args, models) -> List[str]:
    names = args.model.split(",")
    unknown = [n for n in names if n not in models]
    if unknown:
        parser.error(f"unknown models {unknown}; known: {', '.join(models)}")
    return names


def setup_from_args(args) -> None:
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.quick:
        args.repeat = min(args.repeat, 5)
        args.warmup = min(args.warmup, 1)


def _time_once(fn: Callable[[], object], inner: int) -> float:
    start = time.perf_counter()
    for _ in range(inner):
        fn()
    return (time.perf_counter() - start) / inner


def _pick_inner(fns: Dict[str, Callable[[], object]], target_s: float = 0.05) -> int:
    slowest = max(_time_once(fn, 1) for fn in fns.values())
    return max(1, min(1000, int(target_s / max(slowest, 1e-7))))


def measure(fns: Dict[str, Callable[[], object]], repeat: int = 15, warmup: int = 3,
            inner: Optional[int] = None, before: Optional[Callable[[], object]] = None
            ) -> Dict[str, Dict[str, float]]:
    """Interleaved medians.  Returns {name: {"median_ms", "min_ms", "samples"}}.
    `before`, when given, runs untimed ahead of every sample (one call each), e.g.
    to evict the caches."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    if before is not None:
        inner = 1
    elif inner is None:
        inner = _pick_inner(fns)
    samples: Dict[str, List[float]] = {name: [] for name in fns}
    for _ in range(repeat):
        for name, fn in fns.items():
            if before is not None:
                before()
            samples[name].append(_time_once(fn, inner))
    return {name: {"median_ms": statistics.median(s) * 1e3, "min_ms": min(s) * 1e3,
                   "samples": len(s), "inner": inner} for name, s in samples.items()}


def import_ipex():
    """intel_extension_for_pytorch when it imports (IPEX 2.8 needs torch 2.8), else None."""
    try:
        import intel_extension_for_pytorch as ipex
        return ipex
    except Exception:  # noqa: BLE001 - absent, or built for another torch
        return None


def machine() -> Dict[str, object]:
    info: Dict[str, object] = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
    }
    try:
        import ipex_lite
        isa = ipex_lite.isa_info()
        info.update(cpu=isa["brand"], isa=isa["active_level"],
                    amx=isa["amx_tile"], avx512_bf16=isa["avx512_bf16"])
    except ImportError:
        info["cpu"] = platform.processor()
    return info


class Report:
    """Collects result rows; prints a table (or JSON) at the end."""

    def __init__(self, title: str, reference: str):
        self.title = title
        self.reference = reference
        self.rows: List[Dict[str, object]] = []

    def add(self, workload: str, results: Dict[str, Dict[str, float]], extra: Optional[Dict] = None) -> None:
        ref = results[self.reference]["median_ms"]
        for system, r in results.items():
            row = {"workload": workload, "system": system, "median_ms": r["median_ms"],
                   "min_ms": r["min_ms"], "ratio": ref / r["median_ms"]}
            if extra and system in extra:
                row.update(extra[system])
            self.rows.append(row)

    def emit(self, as_json: bool, notes: Optional[List[str]] = None) -> None:
        if as_json:
            json.dump({"title": self.title, "reference": self.reference, "machine": machine(),
                       "rows": self.rows, "notes": notes or []}, sys.stdout, indent=2)
            print()
            return
        m = machine()
        print(f"\n## {self.title}")
        print("machine: " + ", ".join(f"{k}={v}" for k, v in m.items()))
        print(f"ratio = {self.reference} median / system median (same process, interleaved; higher is better)\n")
        extra_keys = sorted({k for row in self.rows for k in row} - {"workload", "system", "median_ms", "min_ms", "ratio"})
        header = ["workload", "system", "median ms", "min ms", "ratio"] + extra_keys
        lines = [header]
        for row in self.rows:
            lines.append([str(row["workload"]), str(row["system"]), f"{row['median_ms']:.3f}",
                          f"{row['min_ms']:.3f}", f"{row['ratio']:.2f}x"]
                         + [_fmt(row.get(k)) for k in extra_keys])
        widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
        for i, line in enumerate(lines):
            print("| " + " | ".join(c.ljust(w) for c, w in zip(line, widths)) + " |")
            if i == 0:
                print("|" + "|".join("-" * (w + 2) for w in widths) + "|")
        for note in notes or []:
            print(f"note: {note}")


def _fmt(v) -> str:
    if v is None:
        return ""
    if isinstance(v, float):
        return f"{v:.1f}"
    return str(v)
