"""Environment report for ipex_lite: versions, CPU ISA, threading, allocator, NUMA::

    python -m ipex_lite.doctor          # human-readable report + recommendations
    python -m ipex_lite.doctor --json   # everything as one JSON document

``collect()`` returns the report as a dict and ``recommendations(info)`` turns
such a dict into a list of advice strings; both are usable from tests.  Every
probe of /proc and /sys is optional: a missing file gives ``None`` or an empty
value, never an exception.
"""
import argparse
import glob
import json
import os
import platform
import re
import sys
from typing import Dict, List, Optional

import torch

LEVELS = ("default", "avx2", "avx512", "avx512_bf16", "amx")

JEMALLOC_PATH = "/usr/lib/x86_64-linux-gnu/libjemalloc.so.2"
TCMALLOC_PATH = "/usr/lib/x86_64-linux-gnu/libtcmalloc.so.4"

THREAD_ENV_VARS = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "KMP_AFFINITY", "KMP_BLOCKTIME",
                   "OMP_PROC_BIND", "OMP_PLACES", "GOMP_CPU_AFFINITY")

# (isa_info key, label) in the order they are printed.
FEATURES = (
    ("avx2", "AVX2"), ("fma", "FMA"), ("f16c", "F16C"),
    ("avx512f", "AVX-512F"), ("avx512bw", "AVX-512BW"), ("avx512vl", "AVX-512VL"),
    ("avx512dq", "AVX-512DQ"), ("avx512_bf16", "AVX512_BF16"), ("avx512_vnni", "AVX512_VNNI (VNNI)"),
    ("avx_vnni", "AVX_VNNI"), ("avx512_fp16", "AVX512_FP16"),
    ("amx_tile", "AMX tile"), ("amx_bf16", "AMX bf16"), ("amx_int8", "AMX int8"),
    ("os_avx512", "OS saves AVX-512 state"), ("os_amx", "OS enabled AMX state"),
    ("amx_permitted", "AMX granted to process"),
)


# ----------------------------------------------------------------------------- probes

def _read(path: str) -> Optional[str]:
    try:
        with open(path, "r", errors="replace") as f:
            return f.read()
    except (OSError, ValueError):
        return None


def _level_index(name: Optional[str]) -> int:
    try:
        return LEVELS.index(name)
    except ValueError:
        return -1


def _parse_cpulist(text: Optional[str]) -> List[int]:
    """'0-3,8,10-11' -> [0, 1, 2, 3, 8, 10, 11]; bad input -> []."""
    cpus: List[int] = []
    if not text:
        return cpus
    try:
        for part in text.strip().split(","):
            part = part.strip()
            if not part:
                continue
            if "-" in part:
                lo, hi = part.split("-", 1)
                cpus.extend(range(int(lo), int(hi) + 1))
            else:
                cpus.append(int(part))
    except ValueError:
        return []
    return cpus


def _torch_build_info() -> Dict[str, Optional[str]]:
    try:
        config = torch.__config__.show()
    except Exception:  # noqa: BLE001 - diagnostics must not fail
        config = ""
    try:
        parallel = torch.__config__.parallel_info()
    except Exception:  # noqa: BLE001
        parallel = ""
    text = config + "\n" + parallel

    onednn = None
    m = re.search(r"(?:MKL-DNN|oneDNN)\s+v?(\d+(?:\.\d+)*)", text)
    if m:
        onednn = m.group(1)
    mkl = None
    m = re.search(r"Math Kernel Library Version\s+(\d+(?:\.\d+)*)", text)
    if m:
        mkl = m.group(1)
    backend = None
    m = re.search(r"ATen parallel backend:\s*(.+)", parallel)
    if m:
        backend = m.group(1).strip()
    torch_capability = None
    m = re.search(r"CPU capability usage:\s*(\S+)", config)
    if m:
        torch_capability = m.group(1)

    def _available(mod_name: str) -> Optional[bool]:
        try:
            return bool(getattr(torch.backends, mod_name).is_available())
        except Exception:  # noqa: BLE001
            return None

    return {
        "torch": torch.__version__,
        "onednn": onednn,
        "onednn_available": _available("mkldnn"),
        "mkl": mkl,
        "mkl_available": _available("mkl"),
        "parallel_backend": backend,
        "torch_cpu_capability": torch_capability,
    }


def _loaded_libraries() -> List[str]:
    """Basenames of the shared objects mapped into this process (empty when /proc is missing)."""
    maps = _read("/proc/self/maps")
    if not maps:
        return []
    libs = set()
    for line in maps.splitlines():
        fields = line.split(None, 5)
        if len(fields) == 6 and ".so" in fields[5]:
            libs.add(os.path.basename(fields[5].strip()))
    return sorted(libs)


def _openmp_info(libs: List[str]) -> Dict[str, object]:
    runtimes = []
    for lib in libs:
        if lib.startswith("libiomp5"):
            runtimes.append(("libiomp5 (Intel OpenMP)", lib))
        elif lib.startswith("libgomp"):
            runtimes.append(("libgomp (GNU OpenMP)", lib))
        elif lib.startswith("libomp.so") or lib.startswith("libomp-"):
            runtimes.append(("libomp (LLVM OpenMP)", lib))
    names = sorted({name for name, _ in runtimes})
    return {
        "runtime": ", ".join(names) if names else None,
        "libraries": sorted({lib for _, lib in runtimes}),
        "torch_num_threads": torch.get_num_threads(),
        "torch_num_interop_threads": _safe(torch.get_num_interop_threads),
        "env": {k: os.environ.get(k) for k in THREAD_ENV_VARS if os.environ.get(k) is not None},
    }


def _allocator_info(libs: List[str]) -> Dict[str, object]:
    preload = os.environ.get("LD_PRELOAD", "")
    found = []
    for lib in libs:
        if "jemalloc" in lib:
            found.append("jemalloc")
        elif "tcmalloc" in lib:
            found.append("tcmalloc")
    for entry in re.split(r"[\s:]+", preload):
        if "jemalloc" in entry:
            found.append("jemalloc")
        elif "tcmalloc" in entry:
            found.append("tcmalloc")
    found = sorted(set(found))
    return {
        "in_use": ", ".join(found) if found else "default (glibc malloc)",
        "preloaded": bool(found),
        "ld_preload": preload or None,
        "candidates": {JEMALLOC_PATH: os.path.exists(JEMALLOC_PATH),
                       TCMALLOC_PATH: os.path.exists(TCMALLOC_PATH)},
    }


def _cpu_topology() -> Dict[str, object]:
    try:
        from . import _C
        affinity = sorted(_C.process_cpus())  # the OpenMP places too: OMP_PROC_BIND narrows this thread's mask
    except (ImportError, OSError):
        affinity = list(range(os.cpu_count() or 1))
    # Physical cores among the CPUs we may run on: one per distinct thread-sibling set.
    cores = set()
    known = True
    for cpu in affinity:
        siblings = _read(f"/sys/devices/system/cpu/cpu{cpu}/topology/thread_siblings_list")
        if siblings is None:
            known = False
            break
        cores.add(siblings.strip())
    physical = len(cores) if known and cores else None
    return {
        "logical_cpus": os.cpu_count(),
        "affinity_cpus": len(affinity),
        "affinity": _format_cpulist(affinity),
        "physical_cores_in_affinity": physical,
        "smt": (physical is not None and physical < len(affinity)),
    }


def _format_cpulist(cpus: List[int]) -> str:
    if not cpus:
        return ""
    parts = []
    start = prev = cpus[0]
    for c in cpus[1:] + [None]:
        if c is not None and c == prev + 1:
            prev = c
            continue
        parts.append(str(start) if start == prev else f"{start}-{prev}")
        if c is not None:
            start = prev = c
    return ",".join(parts)


def _numa_nodes() -> List[Dict[str, object]]:
    nodes = []
    for path in sorted(glob.glob("/sys/devices/system/node/node[0-9]*"),
                       key=lambda p: int(re.sub(r"\D", "", os.path.basename(p)) or 0)):
        cpulist = _read(os.path.join(path, "cpulist"))
        mem_kb = None
        meminfo = _read(os.path.join(path, "meminfo"))
        if meminfo:
            m = re.search(r"MemTotal:\s+(\d+)\s*kB", meminfo)
            if m:
                mem_kb = int(m.group(1))
        nodes.append({
            "node": int(re.sub(r"\D", "", os.path.basename(path)) or 0),
            "cpus": cpulist.strip() if cpulist else None,
            "num_cpus": len(_parse_cpulist(cpulist)),
            "mem_gib": round(mem_kb / 2**20, 1) if mem_kb else None,
        })
    return nodes


def _proc_cpuinfo_flags() -> List[str]:
    """Flags the kernel reports for CPU 0 (used to tell 'no AMX' from 'AMX not enabled')."""
    text = _read("/proc/cpuinfo")
    if not text:
        return []
    m = re.search(r"^flags\s*:\s*(.*)$", text, re.MULTILINE)
    return m.group(1).split() if m else []


def _safe(fn, default=None):
    try:
        return fn()
    except Exception:  # noqa: BLE001
        return default


def _link_info() -> Dict[str, object]:
    """setup.py's post-link check, run on the installed _C (found by path, not imported)."""
    from . import _linkcheck
    path = _linkcheck.installed_module()
    if path is None:
        return {"ok": None, "path": None, "needed": [], "internals": [],
                "problem": "no built ipex_lite._C next to the package"}
    return _linkcheck.check(path)


def _ipex_lite_info() -> Dict[str, object]:
    try:
        import ipex_lite
    except Exception as e:  # noqa: BLE001 - report, do not crash
        return {"error": f"{type(e).__name__}: {e}"}
    isa = dict(_safe(ipex_lite.isa_info, {}) or {})
    return {
        "version": getattr(ipex_lite, "__version__", None),
        "path": os.path.dirname(os.path.abspath(ipex_lite.__file__)),
        "cpu_capability": _safe(ipex_lite.cpu_capability),
        "isa": isa,
    }


# ----------------------------------------------------------------------------- public API

def collect() -> Dict[str, object]:
    """Everything the doctor knows, as a JSON-serialisable dict."""
    libs = _loaded_libraries()
    ipex = _ipex_lite_info()
    isa = ipex.get("isa", {}) if isinstance(ipex.get("isa"), dict) else {}
    flags = _proc_cpuinfo_flags()
    env_isa = os.environ.get("IPEX_LITE_ISA")
    return {
        "versions": dict(_torch_build_info(),
                         python=platform.python_version(),
                         python_executable=sys.executable,
                         ipex_lite=ipex.get("version"),
                         platform=platform.platform()),
        "ipex_lite": {k: v for k, v in ipex.items() if k != "isa"},
        "build": _link_info(),
        "cpu": {
            "vendor": isa.get("vendor"),
            "brand": isa.get("brand") or _cpuinfo_model_name(),
            "cpu_level": isa.get("cpu_level"),
            "built_level": isa.get("built_level"),
            "active_level": isa.get("active_level"),
            "ipex_lite_isa_env": env_isa,
            "kernel_reports_amx": any(f.startswith("amx") for f in flags),
        },
        "features": {key: bool(isa.get(key, False)) for key, _ in FEATURES},
        "openmp": _openmp_info(libs),
        "allocator": _allocator_info(libs),
        "topology": _cpu_topology(),
        "numa_nodes": _numa_nodes(),
    }


def _cpuinfo_model_name() -> Optional[str]:
    text = _read("/proc/cpuinfo")
    if not text:
        return None
    m = re.search(r"^model name\s*:\s*(.*)$", text, re.MULTILINE)
    return m.group(1).strip() if m else None


def recommendations(info: Dict[str, object]) -> List[str]:
    """Concrete advice for the machine described by ``info`` (a ``collect()`` dict).

    Missing sections are treated as unknown, so a partial dict (as in tests) works.
    """
    recs: List[str] = []
    build = info.get("build") or {}
    if build.get("ok") is False:
        recs.append(f"BROKEN BUILD: {build.get('problem')}")
    cpu = info.get("cpu") or {}
    feats = info.get("features") or {}
    omp = info.get("openmp") or {}
    alloc = info.get("allocator") or {}
    topo = info.get("topology") or {}
    numa = info.get("numa_nodes") or []
    omp_env = omp.get("env") or {}

    # Matrix units / ISA.
    amx = bool(feats.get("amx_bf16") or feats.get("amx_int8"))
    if amx:
        recs.append("AMX present: bf16/int8 GEMMs are fast; run compute-bound layers (Linear/Conv) "
                    "in bf16 (torch.autocast('cpu', dtype=torch.bfloat16)) or int8.")
    else:
        msg = ("no AMX on this CPU: bf16 matmul will not beat fp32; prefer int8 (VNNI) or fp32 for "
               "compute-bound layers, bf16 for memory-bound ops (embeddings, interaction).")
        if feats.get("amx_tile") and not feats.get("amx_permitted"):
            msg += (" (The CPU and OS have AMX but Linux refused this process the tile state: "
                    "arch_prctl(ARCH_REQ_XCOMP_PERM) failed; a seccomp filter or an old kernel?)")
        elif cpu.get("kernel_reports_amx"):
            msg += (" (The kernel lists AMX flags but the OS has not enabled AMX state for this "
                    "process; a newer kernel or hypervisor setting would expose it.)")
        recs.append(msg)
        if feats and not (feats.get("avx512_vnni") or feats.get("avx_vnni")):
            recs.append("no VNNI: int8 GEMMs gain little over fp32 here; keep fp32 unless memory "
                        "traffic dominates.")
    if not feats.get("avx512f") and feats:
        recs.append("no AVX-512: kernels run at the avx2 level or below; expect roughly half the "
                    "vector throughput of an AVX-512 machine.")

    cpu_level, built, active = cpu.get("cpu_level"), cpu.get("built_level"), cpu.get("active_level")
    if cpu_level and active and _level_index(active) < _level_index(cpu_level):
        why, fix = [], []
        if cpu.get("ipex_lite_isa_env"):
            why.append(f"IPEX_LITE_ISA={cpu['ipex_lite_isa_env']} is set")
            fix.append("unset IPEX_LITE_ISA")
        if built and _level_index(built) < _level_index(cpu_level):
            why.append(f"the extension was built only up to {built}")
            fix.append("rebuild with a compiler that accepts the higher level's flags")
        recs.append(f"active ISA level {active} is lower than this CPU's {cpu_level}"
                    + (f" ({'; '.join(why)})" if why else "")
                    + f": {' and '.join(fix) if fix else 'check the build'} to use the full level.")

    # Allocator.
    if not alloc.get("preloaded", False):
        cands = alloc.get("candidates") or {JEMALLOC_PATH: os.path.exists(JEMALLOC_PATH),
                                            TCMALLOC_PATH: os.path.exists(TCMALLOC_PATH)}
        shown = ", ".join(f"{p} ({'found' if ok else 'not installed'})" for p, ok in cands.items())
        recs.append("no jemalloc/tcmalloc preloaded (glibc malloc): for inference/training loops set "
                    f"LD_PRELOAD to one of {shown}; e.g. apt-get install libjemalloc2 / "
                    "libtcmalloc-minimal4 / libgoogle-perftools4.")

    # Threads.
    physical = topo.get("physical_cores_in_affinity") or topo.get("affinity_cpus")
    if "OMP_NUM_THREADS" not in omp_env:
        hint = f" (here: {physical} physical core(s) available)" if physical else ""
        recs.append("OMP_NUM_THREADS is unset: set it to the physical cores per instance"
                    f"{hint}, e.g. OMP_NUM_THREADS={physical or 'N'}, and run one instance per "
                    "socket/NUMA node.")
    threads = omp.get("torch_num_threads")
    affinity_cpus = topo.get("affinity_cpus")
    if threads and affinity_cpus and threads > affinity_cpus:
        recs.append(f"torch uses {threads} threads but only {affinity_cpus} CPUs are in the affinity "
                    "mask: oversubscription; lower torch.set_num_threads / OMP_NUM_THREADS.")
    if topo.get("smt") and threads and physical and threads > physical:
        recs.append(f"torch uses {threads} threads on {physical} physical cores (SMT siblings): "
                    "one thread per physical core is usually faster for GEMM-heavy work.")

    runtime = omp.get("runtime") or ""
    if "libiomp5" in runtime and "KMP_AFFINITY" not in omp_env:
        recs.append("Intel OpenMP loaded: set KMP_AFFINITY=granularity=fine,compact,1,0 and "
                    "KMP_BLOCKTIME=1 to pin threads.")
    elif "libgomp" in runtime and not any(k in omp_env for k in
                                          ("OMP_PROC_BIND", "GOMP_CPU_AFFINITY", "KMP_AFFINITY")):
        recs.append("GNU OpenMP loaded with no pinning: set OMP_PROC_BIND=close OMP_PLACES=cores "
                    "(or preload libiomp5 with KMP_AFFINITY) for steadier timings.")

    if len(numa) > 1:
        recs.append(f"{len(numa)} NUMA nodes: bind each instance to one node, e.g. "
                    "numactl --cpunodebind=0 --membind=0 python ...")
    return recs


# ----------------------------------------------------------------------------- printing

def _yes(v) -> str:
    return "yes" if v else "no"


def format_report(info: Dict[str, object], recs: List[str]) -> str:
    v = info.get("versions", {})
    cpu = info.get("cpu", {})
    feats = info.get("features", {})
    omp = info.get("openmp", {})
    alloc = info.get("allocator", {})
    topo = info.get("topology", {})
    numa = info.get("numa_nodes", [])
    ipex = info.get("ipex_lite", {})
    lines = ["ipex_lite doctor", ""]

    def row(label, value):
        lines.append(f"  {label:<24} {value}")

    lines.append("Versions")
    row("torch", v.get("torch"))
    row("oneDNN", (v.get("onednn") or "not found")
        + ("" if v.get("onednn_available") in (None, True) else " (unavailable)"))
    row("MKL", v.get("mkl") or ("available" if v.get("mkl_available") else "not present"))
    row("python", f"{v.get('python')} ({v.get('python_executable')})")
    row("ipex_lite", f"{v.get('ipex_lite')} ({ipex.get('path', ipex.get('error'))})")
    row("platform", v.get("platform"))
    lines.append("")
    build = info.get("build", {})
    lines.append("Build")
    ok = build.get("ok")
    row("libstdc++", "linked dynamically (libstdc++.so.6 NEEDED, no private copy)" if ok
        else "PRIVATE COPY: error messages break (see Recommendations)" if ok is False
        else f"not checked ({build.get('problem')})")
    row("_C", build.get("path"))
    row("NEEDED", ", ".join(build.get("needed") or []) or "-")
    lines.append("")
    lines.append("CPU")
    row("brand", cpu.get("brand"))
    row("vendor", cpu.get("vendor"))
    row("CPU ISA level", cpu.get("cpu_level"))
    row("built level", cpu.get("built_level"))
    row("active level", cpu.get("active_level"))
    env = cpu.get("ipex_lite_isa_env")
    row("IPEX_LITE_ISA", env if env is not None else "not set")
    row("torch CPU capability", v.get("torch_cpu_capability"))
    lines.append("")
    lines.append("Features")
    labels = dict(FEATURES)
    for key in ("avx2", "fma", "avx512f", "avx512bw", "avx512vl", "avx512dq", "avx512_bf16",
                "avx512_vnni", "avx_vnni", "avx512_fp16", "amx_tile", "amx_bf16", "amx_int8",
                "os_avx512", "os_amx", "amx_permitted"):
        row(labels[key], _yes(feats.get(key)))
    lines.append("")
    lines.append("Threads")
    row("OpenMP runtime", omp.get("runtime") or "not detected")
    row("parallel backend", v.get("parallel_backend"))
    row("torch.get_num_threads()", omp.get("torch_num_threads"))
    row("interop threads", omp.get("torch_num_interop_threads"))
    for key in THREAD_ENV_VARS:
        if key == "MKL_NUM_THREADS" or key == "KMP_BLOCKTIME":
            if key not in (omp.get("env") or {}):
                continue
        row(key, (omp.get("env") or {}).get(key, "not set"))
    lines.append("")
    lines.append("Memory")
    row("allocator", alloc.get("in_use"))
    row("LD_PRELOAD", alloc.get("ld_preload") or "not set")
    for path, ok in (alloc.get("candidates") or {}).items():
        row(os.path.basename(path), f"{path} {'exists' if ok else 'missing'}")
    lines.append("")
    lines.append("Topology")
    row("logical CPUs", topo.get("logical_cpus"))
    row("CPUs in affinity", f"{topo.get('affinity_cpus')} ({topo.get('affinity')})")
    row("physical cores", topo.get("physical_cores_in_affinity") or "unknown")
    if numa:
        for n in numa:
            mem = f", {n['mem_gib']} GiB" if n.get("mem_gib") else ""
            row(f"NUMA node {n['node']}", f"cpus {n.get('cpus')}{mem}")
    else:
        row("NUMA nodes", "unknown (/sys/devices/system/node missing)")
    lines.append("")
    lines.append("Recommendations")
    if recs:
        lines.extend(f"  - {r}" for r in recs)
    else:
        lines.append("  - none: this setup looks fine")
    return "\n".join(lines)


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m ipex_lite.doctor",
                                     description="Report the ipex_lite / torch / CPU environment.")
    parser.add_argument("--json", action="store_true", help="print one JSON document")
    args = parser.parse_args(argv)
    info = collect()
    recs = recommendations(info)
    if args.json:
        print(json.dumps(dict(info, recommendations=recs), indent=2, sort_keys=True, default=str))
    else:
        print(format_report(info, recs))
    return 0


if __name__ == "__main__":
    sys.exit(main())
