"""Library search (jemalloc, tcmalloc, Intel OpenMP) and the environment of each instance.

Everything here is a function of explicit inputs (search dirs, the launcher's own environment) so
tests can point it at a fake lib dir.  Policy: variables the user already exported win over the
launcher's choices (with a warning), except LD_PRELOAD, which is extended, and
IPEX_LITE_INSTANCE_IDX, which is the launcher's own per-instance value.
"""
from __future__ import annotations

import logging
import os
import sys
import sysconfig
from dataclasses import dataclass
from typing import Dict, List, Mapping, Optional, Sequence, Tuple

from .cpu_info import format_cpu_list
from .errors import LauncherError

log = logging.getLogger("ipex_lite.launcher")

LIBS: Dict[str, Tuple[str, ...]] = {
    "tcmalloc": ("libtcmalloc.so", "libtcmalloc.so.4", "libtcmalloc_minimal.so.4", "libtcmalloc_minimal.so"),
    "jemalloc": ("libjemalloc.so", "libjemalloc.so.2"),
    "intel": ("libiomp5.so",),
}
PROVIDERS: Dict[str, str] = {
    "tcmalloc": "Debian/Ubuntu: apt install libgoogle-perftools4 (or libtcmalloc-minimal4); "
                "conda: conda install gperftools",
    "jemalloc": "Debian/Ubuntu: apt install libjemalloc2; conda: conda install jemalloc",
    "intel": "pip install intel-openmp (or conda install intel-openmp)",
}
# IPEX's settings, plus: never give dirty pages back, so steady-state iterations do not pay
# page faults.  It has to be decay -1 (off): with any finite decay time jemalloc purges
# allocations above its oversize threshold at once (measured: a 51 MB buffer re-faulted on
# every allocation with IPEX's 9000000000 ms, none with -1), and IPEX's default (no decay
# setting) made DLRM inference 4.7x slower than glibc malloc (220 vs 47 ms).  The price is
# that the process keeps its peak footprint; a MALLOC_CONF of the user's own is kept.
JEMALLOC_CONF = ("oversize_threshold:1,background_thread:true,metadata_thp:auto,"
                 "dirty_decay_ms:-1,muzzy_decay_ms:-1")
INSTANCE_IDX = "IPEX_LITE_INSTANCE_IDX"


def default_lib_dirs(environ: Optional[Mapping[str, str]] = None) -> List[str]:
    """Where to look, in order: this Python's prefix, conda, ~/.local, then the system dirs."""
    environ = os.environ if environ is None else environ
    multiarch = sysconfig.get_config_var("MULTIARCH") or "x86_64-linux-gnu"
    dirs = [os.path.join(sys.prefix, "lib")]
    if environ.get("CONDA_PREFIX"):
        dirs.append(os.path.join(environ["CONDA_PREFIX"], "lib"))
    dirs += [os.path.expanduser("~/.local/lib"), "/usr/local/lib", "/usr/local/lib64", "/usr/lib", "/usr/lib64",
             f"/usr/lib/{multiarch}"]
    return list(dict.fromkeys(dirs))


def find_library(names: Sequence[str], dirs: Sequence[str]) -> Optional[str]:
    """First existing `dir/name`, directories taking priority over name order."""
    for d in dirs:
        for name in names:
            path = os.path.join(d, name)
            if os.path.isfile(path):
                return path
    return None


def split_preload(value: str) -> List[str]:
    """LD_PRELOAD entries; ld.so accepts both spaces and colons as separators."""
    return [e for e in value.replace(":", " ").split() if e]


def merge_preload(libs: Sequence[str], existing: str) -> str:
    """`libs` in front of the existing LD_PRELOAD entries, colon-separated, without duplicates."""
    return ":".join(dict.fromkeys([*libs, *split_preload(existing)]))


def preloaded_kind(ld_preload: str) -> Dict[str, str]:
    """{"jemalloc"/"tcmalloc"/"intel": path} for what LD_PRELOAD already loads."""
    found: Dict[str, str] = {}
    for entry in split_preload(ld_preload):
        base = os.path.basename(entry)
        for kind, prefix in (("jemalloc", "libjemalloc"), ("tcmalloc", "libtcmalloc"), ("intel", "libiomp")):
            if base.startswith(prefix):
                found.setdefault(kind, entry)
    return found


@dataclass(frozen=True)
class Runtime:
    """Chosen allocator and OpenMP runtime; a None lib means nothing to preload (default, or already preloaded)."""

    allocator: str  # "default" | "jemalloc" | "tcmalloc"
    omp: str  # "default" (the GNU OpenMP torch links) | "intel"
    allocator_lib: Optional[str] = None
    omp_lib: Optional[str] = None

    @property
    def preload(self) -> List[str]:
        return [lib for lib in (self.omp_lib, self.allocator_lib) if lib]


def choose_runtime(allocator: str, omp_runtime: str, lib_dirs: Sequence[str], ld_preload: str = "") -> Runtime:
    """Resolve ``auto`` and find the libraries; a missing explicitly requested one is an error."""
    already = preloaded_kind(ld_preload)
    alloc_kind, alloc_lib = _choose_allocator(allocator, lib_dirs, already)
    omp_kind, omp_lib = _choose_omp(omp_runtime, lib_dirs, already)
    return Runtime(alloc_kind, omp_kind, alloc_lib, omp_lib)


def _choose_allocator(requested: str, dirs: Sequence[str], already: Mapping[str, str]) -> Tuple[str, Optional[str]]:
    preloaded = [k for k in ("tcmalloc", "jemalloc") if k in already]
    if requested == "auto":
        if preloaded:
            log.info("memory allocator: %s (already in LD_PRELOAD: %s)", preloaded[0], already[preloaded[0]])
            return preloaded[0], None
        for kind in ("tcmalloc", "jemalloc"):
            lib = find_library(LIBS[kind], dirs)
            if lib:
                log.info("memory allocator: %s (%s)", kind, lib)
                return kind, lib
        log.info("memory allocator: default malloc (no tcmalloc or jemalloc found; for better multi-threaded "
                 "allocation: %s, or %s)", PROVIDERS["tcmalloc"], PROVIDERS["jemalloc"])
        return "default", None
    if requested == "default":
        if preloaded:
            log.warning("--memory-allocator default, but LD_PRELOAD already loads %s; leaving LD_PRELOAD as is",
                        already[preloaded[0]])
        return "default", None
    if requested in already:
        return requested, None
    lib = find_library(LIBS[requested], dirs)
    if lib is None:
        raise LauncherError(f"--memory-allocator {requested}: none of {', '.join(LIBS[requested])} found in "
                            f"{', '.join(dirs)}. Install it ({PROVIDERS[requested]}) or use "
                            "--memory-allocator auto")
    for other in preloaded:
        log.warning("LD_PRELOAD already loads %s; %s goes in front of it and serves malloc", already[other], lib)
    return requested, lib


def _choose_omp(requested: str, dirs: Sequence[str], already: Mapping[str, str]) -> Tuple[str, Optional[str]]:
    if requested == "default":
        return "default", None
    if "intel" in already:
        return "intel", None
    lib = find_library(LIBS["intel"], dirs)
    if lib:
        log.info("OpenMP runtime: Intel OpenMP (%s)", lib)
        return "intel", lib
    if requested == "intel":
        raise LauncherError(f"--omp-runtime intel: libiomp5.so not found in {', '.join(dirs)}. "
                            f"Install it ({PROVIDERS['intel']}) or use --omp-runtime default")
    return "default", None


def instance_env(cores: Sequence[int], runtime: Runtime, index: int, bound: bool = True) -> Dict[str, str]:
    """What the launcher wants for one instance (before LD_PRELOAD merging and user overrides).

    `bound`: numactl/taskset already restrict the process to `cores`.  Without that, the OpenMP
    places must name the CPUs explicitly, or every instance's threads pile onto CPUs 0..n-1.
    """
    env = {"OMP_NUM_THREADS": str(len(cores)), INSTANCE_IDX: str(index)}
    if runtime.allocator == "jemalloc":
        env["MALLOC_CONF"] = JEMALLOC_CONF
    if runtime.omp == "intel":
        env["KMP_AFFINITY"] = ("granularity=fine,compact,1,0" if bound else
                               f"granularity=fine,proclist=[{','.join(map(str, cores))}],explicit")
        env["KMP_BLOCKTIME"] = "1"
    else:
        env["OMP_SCHEDULE"] = "STATIC"
        env["OMP_PROC_BIND"] = "CLOSE"
        if not bound:
            # libgomp turns this list into the places that OMP_PROC_BIND=CLOSE binds to, in order.
            env["GOMP_CPU_AFFINITY"] = format_cpu_list(cores, keep_order=True)
    return env


def resolve_env(wanted: Mapping[str, str], runtime: Runtime,
                base: Mapping[str, str]) -> Tuple[Dict[str, str], Dict[str, Tuple[str, str]]]:
    """Apply the override policy to `wanted` against the launcher's environment `base`.

    Returns (changes: variables to set in the child, kept: {name: (user value, launcher value)}
    for user settings that were kept instead of the launcher's).
    """
    changes: Dict[str, str] = {}
    kept: Dict[str, Tuple[str, str]] = {}
    preload = merge_preload(runtime.preload, base.get("LD_PRELOAD", ""))
    if preload != base.get("LD_PRELOAD", ""):
        changes["LD_PRELOAD"] = preload
    for name, value in wanted.items():
        user = base.get(name)
        if user is None or name == INSTANCE_IDX:
            changes[name] = value
        elif user != value:
            kept[name] = (user, value)
    return changes, kept
