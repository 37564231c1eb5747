"""The side-by-side benchmark report: runs every script in bench/ (each with --json), then writes
bench/report/REPORT.md (tables) and PNG charts (speed-up per workload and system; GB/s of the
memory-bound ops against the machine's measured streaming bandwidth).

    python -m bench [--quick] [--only models,int8] [--json] [--out bench/report]
    make bench

--quick runs a ~2-minute subset with small repeat counts.  Progress goes to stderr.  IPEX is
reported as absent unless it imports in this environment (it needs torch 2.8).
"""
import argparse
import json
import os
import platform
import subprocess
import sys
import time
from typing import Dict, List, Optional

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# script -> (full arguments, quick arguments or None when not in the quick subset)
SCRIPTS = {
    "models": ([], None),
    "zoo": (["--no-compile"], None),
    "llm": ([], ["--quick"]),
    "int8": ([], None),
    "interaction": ([], ["--quick", "--no-compile"]),
    "attention": ([], ["--quick"]),
    "embedding_bag": ([], ["--quick", "--rows", "20000"]),
    "dlrm": ([], None),
    "optimizers": ([], ["--quick", "--params", "10000000", "--no-whole-step"]),
    "vision": ([], ["--quick"]),
    "aten_overrides": ([], ["--quick", "--rows", "20000"]),
    "runtime": ([], ["--quick", "--model", "resnet50", "--batches", "2"]),
    "launcher": ([], ["--quick"]),
}


def _last_json(text: str) -> Optional[dict]:
    """The last top-level JSON document in a script's stdout."""
    start = text.rfind("\n{")
    start = 0 if start < 0 and text.lstrip().startswith("{") else start + 1
    try:
        return json.loads(text[start:])
    except (ValueError, IndexError):
        return None


def run_script(name: str, args: List[str], timeout: int) -> Dict:
    cmd = [sys.executable, os.path.join(ROOT, "bench", f"{name}.py"), *args, "--json"]
    t0 = time.time()
    try:
        r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"script": name, "error": f"timed out after {timeout} s"}
    doc = _last_json(r.stdout) if r.returncode == 0 else None
    if doc is None:
        tail = (r.stderr or r.stdout).strip().splitlines()[-3:]
        return {"script": name, "error": f"exit {r.returncode}: " + " | ".join(tail)}
    doc["script"], doc["seconds"] = name, round(time.time() - t0, 1)
    if name == "launcher":
        return _launcher_doc(doc)
    if "reference" not in doc:  # bench/runtime.py: rows per graph kind and stream count
        doc["title"], doc["reference"] = "multi-stream inference", "eager 1 stream"
        doc["rows"] = [{"workload": f"{r['model']} batch {r['batch']}",
                        "system": f"{r.get('graph', 'eager')} {r['streams']} stream" + ("s" if r["streams"] > 1 else ""),
                        "median_ms": r["p50 ms"], "p99_ms": r["p99 ms"],
                        "ratio": r["vs eager"] if r.get("vs eager") else r["ratio"]} for r in doc["rows"]]
    return doc


def _launcher_doc(raw: Dict) -> Dict:
    """bench/launcher.py prints {"<allocator> <instances>x<cores>": [items/s per run]}: one row per
    allocator and layout, ratio vs the default malloc in the same layout."""
    import statistics
    med = {k: statistics.median(v) for k, v in raw.items() if isinstance(v, list) and v}
    rows = []
    for key, v in med.items():
        alloc, layout = key.rsplit(" ", 1)
        base = med.get(f"default {layout}")
        system = "default malloc" if alloc == "default" else f"ipex_lite launcher + {alloc}"
        rows.append({"workload": f"{layout.replace('x', ' instance(s) x ')} core(s)", "system": system,
                     "median_ms": 1e3 / v, "ratio": v / base if base else float("nan"), "items/s": v})
    return {"script": "launcher", "title": "allocation-heavy inference loop under ipex-lite-run",
            "reference": "default malloc", "rows": rows, "seconds": raw.get("seconds"),
            "notes": ["median_ms = milliseconds per item (1 / throughput summed over instances)"]}


def ipex_status() -> str:
    try:
        import intel_extension_for_pytorch as ipex  # noqa: F401
    except Exception as e:  # noqa: BLE001 - any import failure means "absent"
        return f"absent ({type(e).__name__}: IPEX 2.8 needs torch 2.8; see ../shared/DESIGN.md for its venv)"
    return f"present ({ipex.__version__})"


def machine_lines(results: List[Dict]) -> List[str]:
    import torch
    m = next((r["machine"] for r in results if "machine" in r), {})
    flags = {k: v for k, v in m.items() if k in ("isa", "amx", "avx512_bf16")}
    return [f"- CPU: {m.get('cpu', platform.processor())}, {os.cpu_count()} logical CPUs visible, "
            f"{m.get('threads', torch.get_num_threads())} threads",
            f"- ISA: {', '.join(f'{k}={v}' for k, v in flags.items())}",
            f"- torch {torch.__version__}, oneDNN {_onednn_version()}, python {platform.python_version()}",
            f"- IPEX: {ipex_status()}",
            f"- allocator: {os.environ.get('LD_PRELOAD') or 'glibc malloc (no LD_PRELOAD)'}"]


def _onednn_version() -> str:
    import re

    import torch
    m = re.search(r"(?:oneDNN|MKL-DNN)[^\n]*?v?(\d+\.\d+(?:\.\d+)?)", torch.__config__.show())
    return m.group(1) if m else "unknown"


def headline(results: List[Dict]) -> List[Dict]:
    """Best ipex_lite ratio per workload, next to the best other system's."""
    rows = []
    for doc in results:
        by_workload: Dict[str, List[Dict]] = {}
        for r in doc.get("rows", []):
            by_workload.setdefault(r["workload"], []).append(r)
        for workload, rs in by_workload.items():
            lite = [r for r in rs if ("ipex_lite" in r["system"] or "stream" in r["system"])
                    and r["system"] != doc["reference"]]
            other = [r for r in rs if r not in lite and r["system"] != doc["reference"]]
            if not lite:
                continue
            best = max(lite, key=lambda r: r["ratio"])
            rival = max(other, key=lambda r: r["ratio"]) if other else None
            rows.append({"benchmark": doc["script"], "workload": workload, "reference": doc["reference"],
                         "ipex_lite": f"{best['ratio']:.2f}x ({best['system']})",
                         "best other": f"{rival['ratio']:.2f}x ({rival['system']})" if rival else "-"})
    return rows


def _md_table(rows: List[Dict], keys: List[str]) -> List[str]:
    out = ["| " + " | ".join(keys) + " |", "|" + "|".join("---" for _ in keys) + "|"]
    for r in rows:
        out.append("| " + " | ".join(_fmt(r.get(k)) for k in keys) + " |")
    return out


def _fmt(v) -> str:
    if v is None:
        return ""
    if isinstance(v, float):
        return f"{v:.3f}" if v < 10 else f"{v:.1f}"
    return str(v)


def write_report(results: List[Dict], out_dir: str, charts: bool = True) -> str:
    os.makedirs(out_dir, exist_ok=True)
    lines = ["# ipex_lite benchmark report", "", f"Generated {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())} "
             "by `python -m bench`. Ratios are medians of the reference over medians of the system, measured "
             "interleaved in one process; higher is better.", "", "## Machine", ""]
    lines += machine_lines(results) + ["", "## Headline", ""]
    lines += _md_table(headline(results), ["benchmark", "workload", "reference", "ipex_lite", "best other"])
    chart_files = _charts(results, out_dir) if charts else []
    for f in chart_files:
        lines += ["", f"![{f}]({f})"]
    for doc in results:
        lines += ["", f"## {doc['script']}: {doc.get('title', '')}", ""]
        if "error" in doc:
            lines.append(f"not measured: {doc['error']}")
            continue
        extra = sorted({k for r in doc["rows"] for k in r} - {"workload", "system", "median_ms", "min_ms", "ratio"})
        lines += _md_table(doc["rows"], ["workload", "system", "median_ms", "ratio"] + extra)
        lines += [f"- {n}" for n in doc.get("notes", [])]
        lines.append(f"- reference: {doc['reference']}; ran in {doc.get('seconds', '?')} s")
    path = os.path.join(out_dir, "REPORT.md")
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")
    return path


def _charts(results: List[Dict], out_dir: str) -> List[str]:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return []
    files = []
    docs = [d for d in results if d.get("rows")]
    if docs:
        fig, axes = plt.subplots(len(docs), 1, figsize=(10, 2.6 * len(docs)), squeeze=False)
        for ax, doc in zip(axes[:, 0], docs):
            workloads = list(dict.fromkeys(r["workload"] for r in doc["rows"]))
            systems = [s for s in dict.fromkeys(r["system"] for r in doc["rows"]) if s != doc["reference"]]
            width = 0.8 / max(1, len(systems))
            for i, s in enumerate(systems):
                vals = [next((r["ratio"] for r in doc["rows"] if r["workload"] == w and r["system"] == s), 0)
                        for w in workloads]
                ax.bar([j + i * width for j in range(len(workloads))], vals, width, label=s)
            ax.axhline(1.0, color="black", linewidth=0.8)
            ax.set_xticks([j + width * (len(systems) - 1) / 2 for j in range(len(workloads))])
            ax.set_xticklabels(workloads, fontsize=7, rotation=15)
            ax.set_ylabel(f"x vs {doc['reference']}", fontsize=8)
            ax.set_title(f"{doc['script']}: {doc.get('title', '')}", fontsize=9)
            ax.legend(fontsize=6, loc="upper left")
        fig.tight_layout()
        fig.savefig(os.path.join(out_dir, "speedups.png"), dpi=90)
        plt.close(fig)
        files.append("speedups.png")
    bw = [(f"{d['script']}: {r['workload']}", r["system"], r["GB/s"]) for d in docs for r in d["rows"] if "GB/s" in r]
    if bw:
        fig, ax = plt.subplots(figsize=(10, 0.35 * len(bw) + 1.5))
        ax.barh([f"{w} / {s}" for w, s, _ in bw], [v for _, _, v in bw], color="tab:blue")
        ax.axvline(40, color="red", linestyle="--", label="~40 GB/s in-place streaming (2 cores)")
        ax.set_xlabel("GB/s")
        ax.tick_params(axis="y", labelsize=6)
        ax.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(os.path.join(out_dir, "bandwidth.png"), dpi=90)
        plt.close(fig)
        files.append("bandwidth.png")
    return files


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="a ~2-minute subset")
    parser.add_argument("--only", default=None, help="comma-separated scripts (default: all, or the quick subset)")
    parser.add_argument("--out", default=os.path.join(ROOT, "bench", "report"))
    parser.add_argument("--json", action="store_true", help="also print all results as one JSON document")
    parser.add_argument("--timeout", type=int, default=3600, help="seconds per script")
    parser.add_argument("--no-charts", dest="charts", action="store_false")
    args = parser.parse_args(argv)
    names = args.only.split(",") if args.only else [n for n, (_, q) in SCRIPTS.items() if q is not None or not args.quick]
    unknown = [n for n in names if n not in SCRIPTS]
    if unknown:
        parser.error(f"unknown scripts {unknown}; known: {sorted(SCRIPTS)}")
    results = []
    for i, name in enumerate(names, 1):
        full, quick = SCRIPTS[name]
        script_args = (quick if quick is not None else ["--quick"]) if args.quick else full
        print(f"[{i}/{len(names)}] bench/{name}.py {' '.join(script_args)} ...", file=sys.stderr, flush=True)
        doc = run_script(name, script_args, args.timeout)
        print(f"      {'ERROR ' + doc['error'] if 'error' in doc else 'done in %s s' % doc['seconds']}",
              file=sys.stderr, flush=True)
        results.append(doc)
    path = write_report(results, args.out, args.charts)
    print(f"report: {path}", file=sys.stderr)
    if args.json:
        print(json.dumps(results, indent=2))
    return 1 if any("error" in r for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
