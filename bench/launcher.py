"""What ipex-lite-run's allocator and instance layout are worth on an allocation-heavy inference loop.

Runs bench/_launcher_workload.py through the launcher (real subprocesses, as a user would) under
``--memory-allocator default / jemalloc / tcmalloc`` and two layouts of the same N cores: one
instance x N cores and N instances x 1 core.  Throughput of a run is the sum of its instances'
items/s over a common measuring window; figures are medians over --repeat runs, interleaved
(every configuration once per round) so background noise hits all alike.  Ratios are against the
default-malloc single instance.

    python bench/launcher.py [--quick] [--cores 2] [--seconds 5] [--repeat 3]
"""
import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from typing import Dict, List, Optional, Tuple

import torch

from ipex_lite.launcher.env import LIBS, default_lib_dirs, find_library

HERE = os.path.dirname(os.path.abspath(__file__))
WORKLOAD = os.path.join(HERE, "_launcher_workload.py")
ALLOCATORS = ("default", "jemalloc", "tcmalloc")
# Variables the launcher sets: inherited values would be kept (user wins) and skew the comparison.
SCRUB = ("OMP_", "KMP_", "GOMP_", "MALLOC_CONF", "LD_PRELOAD", "IPEX_LITE_INSTANCE_IDX")


def _json_objects(text: str) -> List[dict]:
    """Every instance's one-line JSON report; two instances finishing together can
    land on one line of the launcher's stdout, so objects are decoded where they start."""
    decoder, out = json.JSONDecoder(), []
    for line in text.splitlines():
        pos = line.find("{")
        while pos >= 0:
            obj, end = decoder.raw_decode(line, pos)
            out.append(obj)
            pos = line.find("{", end)
    return out


def run_once(allocator: str, ninstances: int, ncores: int, seconds: float, startup: float) -> Tuple[float, List[dict]]:
    """One launcher run; returns (summed items/s, per-instance reports)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(SCRUB)}
    cmd = [sys.executable, "-m", "ipex_lite.launcher", "--memory-allocator", allocator,
           "--ninstances", str(ninstances), "--ncores-per-instance", str(ncores),
           WORKLOAD, "--seconds", str(seconds), "--start-at", str(time.time() + startup)]
    r = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=startup + seconds + 120)
    if r.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} exited {r.returncode}:\n{r.stdout}\n{r.stderr}")
    reports = _json_objects(r.stdout)
    if len(reports) != ninstances:
        raise RuntimeError(f"expected {ninstances} reports, got:\n{r.stdout}\n{r.stderr}")
    for rep in reports:
        if rep["allocator"] != allocator or rep["threads"] != ncores:
            raise RuntimeError(f"instance ran with {rep['allocator']} / {rep['threads']} threads, expected "
                               f"{allocator} / {ncores}: {rep}")
        if rep["late"]:
            print(f"  note: an instance started measuring late (raise --startup): {rep}", file=sys.stderr)
    return sum(rep["items_per_s"] for rep in reports), reports


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cores", type=int, default=min(2, len(os.sched_getaffinity(0))),
                   help="cores shared out by both layouts (default: %(default)s)")
    p.add_argument("--seconds", type=float, default=5.0, help="measuring window per run")
    p.add_argument("--repeat", type=int, default=3, help="runs per configuration (median reported)")
    p.add_argument("--startup", type=float, default=6.0,
                   help="seconds from launch to the common start of measuring (imports + warm-up)")
    p.add_argument("--quick", action="store_true", help="2 s windows, one run per configuration")
    p.add_argument("--json", action="store_true", help="print the raw results as JSON too")
    args = p.parse_args()
    if args.quick:
        args.seconds, args.repeat = min(args.seconds, 2.0), 1
    n = args.cores
    layouts = [(1, n), (n, 1)] if n > 1 else [(1, 1)]

    dirs = default_lib_dirs()
    found: Dict[str, Optional[str]] = {a: (find_library(LIBS[a], dirs) if a != "default" else "glibc")
                                       for a in ALLOCATORS}
    configs = [(a, lay) for a in ALLOCATORS if found[a] for lay in layouts]
    samples: Dict[Tuple[str, Tuple[int, int]], List[float]] = {c: [] for c in configs}
    for rnd in range(args.repeat):
        for alloc, (ni, nc) in configs:
            total, _ = run_once(alloc, ni, nc, args.seconds, args.startup)
            samples[(alloc, (ni, nc))].append(total)
            print(f"  round {rnd + 1}/{args.repeat}: {alloc:8s} {ni} x {nc} core(s): {total:9.0f} items/s",
                  file=sys.stderr)

    med = {c: statistics.median(v) for c, v in samples.items()}
    base = med[("default", layouts[0])]
    print(f"\nipex-lite-run allocator x layout, {n} core(s) of {platform.processor() or platform.machine()}, "
          f"torch {torch.__version__}; {args.seconds:g} s windows, median of {args.repeat} run(s); "
          f"ratio = items/s vs default malloc, 1 x {n}\n")
    head = "| allocator | " + " | ".join(f"{ni} x {nc} core{'s' if nc > 1 else ''} (items/s)" for ni, nc in layouts)
    head += " | " + " | ".join(f"{ni} x {nc} ratio" for ni, nc in layouts) + " |"
    print(head)
    print("|" + " --- |" * (1 + 2 * len(layouts)))
    for alloc in ALLOCATORS:
        if not found[alloc]:
            print(f"| {alloc} | " + " | ".join(["not installed"] * (2 * len(layouts))) + " |")
            continue
        vals = [med[(alloc, lay)] for lay in layouts]
        print(f"| {alloc} | " + " | ".join(f"{v:,.0f}" for v in vals) + " | "
              + " | ".join(f"{v / base:.2f}x" for v in vals) + " |")
    if args.json:
        print(json.dumps({f"{a} {ni}x{nc}": v for (a, (ni, nc)), v in samples.items()}))


if __name__ == "__main__":
    main()
