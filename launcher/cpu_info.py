"""CPU topology discovery: which logical CPUs exist, which core/socket/NUMA node each belongs to,
which are hyper-thread siblings and which are E-cores of a hybrid part.

Two sources: the text of ``lscpu -p=CPU,CORE,SOCKET,NODE,MAXMHZ`` (preferred: lscpu already
renumbers cores uniquely and knows offline CPUs) and, where lscpu is missing, sysfs.  Both are
plain functions of their input (text, a sysfs root, an allowed set) so tests can feed canned
machines.  CPUs outside the allowed set (the process affinity: taskset, cgroup cpusets, container
limits) are dropped at construction, so nothing downstream can ever plan on them.
"""
from __future__ import annotations

import os
import re
import shutil
import subprocess
from dataclasses import dataclass
from typing import AbstractSet, Dict, Iterable, List, Optional, Sequence, Tuple

from .errors import LauncherError

_RANGE = re.compile(r"(\d+)(?:-(\d+))?")


def parse_cpu_list(text: str, what: str = "CPU list") -> List[int]:
    """``"0-3,8,10-11"`` -> ``[0, 1, 2, 3, 8, 10, 11]`` (sorted, unique); `what` names the flag in errors."""
    ids = set()
    if not text.strip():
        raise LauncherError(f"{what} is empty (expected e.g. 0-3,8,10-11)")
    for part in text.split(","):
        m = _RANGE.fullmatch(part.strip())
        if not m:
            raise LauncherError(f"bad {what} {text!r}: {part.strip()!r} is not N or N-M (expected e.g. 0-3,8,10-11)")
        lo = int(m.group(1))
        hi = int(m.group(2)) if m.group(2) is not None else lo
        if hi < lo:
            raise LauncherError(f"bad {what} {text!r}: range {part.strip()!r} goes downwards")
        ids.update(range(lo, hi + 1))
    return sorted(ids)


def format_cpu_list(ids: Iterable[int], keep_order: bool = False) -> str:
    """Inverse of parse_cpu_list: ``[0, 1, 2, 3, 8]`` -> ``"0-3,8"``.

    `keep_order` compresses runs without sorting, for lists whose order is meaningful
    (GOMP_CPU_AFFINITY binds thread i to the i-th entry).
    """
    seq = list(ids) if keep_order else sorted(set(ids))
    parts: List[str] = []
    i = 0
    while i < len(seq):
        j = i
        while j + 1 < len(seq) and seq[j + 1] == seq[j] + 1:
            j += 1
        parts.append(str(seq[i]) if i == j else f"{seq[i]}-{seq[j]}")
        i = j + 1
    return ",".join(parts)


@dataclass(frozen=True)
class CPU:
    """One logical CPU.  `core` is unique within its `socket` (sysfs core ids repeat across sockets)."""

    id: int
    core: int
    socket: int = 0
    node: int = 0
    max_mhz: Optional[float] = None
    e_core: bool = False


class CPUInfo:
    """The visible (allowed) logical CPUs of the machine and their topology."""

    def __init__(self, cpus: Iterable[CPU], allowed: Optional[AbstractSet[int]] = None):
        if allowed is None:
            allowed = os.sched_getaffinity(0)
        every = sorted(cpus, key=lambda c: c.id)
        self.cpus: Dict[int, CPU] = {c.id: c for c in every if c.id in allowed}
        if not self.cpus:
            raise LauncherError(f"none of the machine's CPUs {format_cpu_list(c.id for c in every)} "
                                f"is in the allowed set {format_cpu_list(allowed)}")
        # The physical core is represented by its lowest *visible* thread, so a container allowed
        # only the second thread of a core still gets that core.
        self._primary: Dict[Tuple[int, int], int] = {}
        for c in self.cpus.values():
            self._primary.setdefault((c.socket, c.core), c.id)

    # --- queries -------------------------------------------------------------------------------
    @property
    def cpu_ids(self) -> List[int]:
        return sorted(self.cpus)

    @property
    def nodes(self) -> List[int]:
        return sorted({c.node for c in self.cpus.values()})

    @property
    def e_cores(self) -> List[int]:
        return [i for i in self.cpu_ids if self.cpus[i].e_core]

    def primary_of(self, cpu: int) -> int:
        """Lowest visible logical CPU of the physical core that `cpu` belongs to."""
        c = self.cpus[cpu]
        return self._primary[(c.socket, c.core)]

    def is_primary(self, cpu: int) -> bool:
        return self.primary_of(cpu) == cpu

    def physical_cores(self) -> List[int]:
        """One logical CPU (the lowest visible id) per physical core."""
        return sorted(self._primary.values())

    def node_of(self, cpu: int) -> int:
        return self.cpus[cpu].node

    def __repr__(self) -> str:
        return (f"CPUInfo(cpus={format_cpu_list(self.cpus)}, physical={len(self._primary)}, "
                f"nodes={self.nodes}, e_cores={format_cpu_list(self.e_cores) or '-'})")

    # --- constructors --------------------------------------------------------------------------
    @classmethod
    def from_lscpu(cls, text: str, allowed: Optional[AbstractSet[int]] = None, hybrid: bool = False,
                   e_cores: Optional[AbstractSet[int]] = None) -> "CPUInfo":
        """From ``lscpu -p=CPU,CORE,SOCKET,NODE,MAXMHZ`` output (any column order, per its header).

        E-cores: `e_cores` when given (sysfs cpu_atom knows best); otherwise, on a `hybrid` part
        only, the cores of the lower of exactly two MAXMHZ classes.  Non-hybrid servers can also
        show two MAXMHZ values (Turbo Boost Max 3.0 favoured cores), hence the separate flag.
        """
        cpus = _parse_lscpu(text)
        if e_cores is None and hybrid:
            e_cores = _slow_class(cpus)
        if e_cores:
            cpus = [CPU(c.id, c.core, c.socket, c.node, c.max_mhz, c.id in e_cores) for c in cpus]
        return cls(cpus, allowed)

    @classmethod
    def from_sysfs(cls, root: str = "/sys", allowed: Optional[AbstractSet[int]] = None) -> "CPUInfo":
        """From ``<root>/devices/system/cpu/cpuN/topology`` (no lscpu needed); E-cores from cpu_atom."""
        base = os.path.join(root, "devices", "system", "cpu")
        try:
            names = os.listdir(base)
        except OSError as e:
            raise LauncherError(f"cannot read CPU topology from {base}: {e}") from e
        online_text = _read(os.path.join(base, "online"))
        online = set(parse_cpu_list(online_text, "sysfs online list")) if online_text else None
        atom = read_cpu_atom(root) or set()
        cpus = []
        for name in names:
            m = re.fullmatch(r"cpu(\d+)", name)
            if not m:
                continue
            cpu_id = int(m.group(1))
            d = os.path.join(base, name)
            core = _read(os.path.join(d, "topology", "core_id"))
            if core is None or (online is not None and cpu_id not in online):
                continue  # offline CPUs have no topology directory
            socket = int(_read(os.path.join(d, "topology", "physical_package_id")) or 0)
            nodes = sorted(int(n[4:]) for n in os.listdir(d) if re.fullmatch(r"node\d+", n))
            khz = _read(os.path.join(d, "cpufreq", "cpuinfo_max_freq"))
            cpus.append(CPU(cpu_id, int(core), max(socket, 0), nodes[0] if nodes else 0,
                            int(khz) / 1000.0 if khz else None, cpu_id in atom))
        if not cpus:
            raise LauncherError(f"no CPU topology found under {base}")
        return cls(cpus, allowed)

    @classmethod
    def discover(cls, allowed: Optional[AbstractSet[int]] = None, sysfs_root: str = "/sys",
                 cpuinfo_path: str = "/proc/cpuinfo", use_lscpu: bool = True) -> "CPUInfo":
        """This machine: lscpu when it is installed and parses, sysfs otherwise."""
        atom = read_cpu_atom(sysfs_root)
        hybrid = atom is not None or _cpuinfo_flag(cpuinfo_path, "hybrid_cpu")
        text = _run_lscpu() if use_lscpu else None
        if text:
            try:
                return cls.from_lscpu(text, allowed, hybrid=hybrid, e_cores=atom)
            except (LauncherError, ValueError):
                pass  # unexpected lscpu dialect: sysfs still knows the topology
        return cls.from_sysfs(sysfs_root, allowed)


# --- helpers ---------------------------------------------------------------------------------------
def _parse_lscpu(text: str) -> List[CPU]:
    columns: Optional[List[str]] = None
    cpus: List[CPU] = []
    for raw in text.splitlines():
        line = raw.strip()
        if not line:
            continue
        if line.startswith("#"):
            # The header is the comment line that names the columns ("# CPU,Core,Socket,...");
            # the prose comment lines above it never contain a bare "CPU" field.
            fields = [f.strip().upper() for f in line.lstrip("#").split(",")]
            if "CPU" in fields:
                columns = fields
            continue
        if columns is None:
            raise LauncherError("lscpu output lacks a '# CPU,Core,...' header line")
        row = dict(zip(columns, (v.strip() for v in line.split(","))))

        def num(key: str, default: Optional[int]) -> Optional[int]:
            v = row.get(key, "")
            return int(v) if v not in ("", "-") else default

        cpu_id = int(row["CPU"])
        core = num("CORE", None)
        mhz = row.get("MAXMHZ", "")
        # No CORE column: every CPU counts as its own core (no SMT information to go on).
        cpus.append(CPU(cpu_id, cpu_id if core is None else core, num("SOCKET", 0) or 0,
                        num("NODE", 0) or 0, float(mhz) if mhz not in ("", "-") else None))
    if not cpus:
        raise LauncherError("lscpu output lists no CPU")
    return cpus


def _slow_class(cpus: Sequence[CPU]) -> AbstractSet[int]:
    """CPUs of the lower-frequency class when physical cores fall into exactly two MAXMHZ classes."""
    per_core: Dict[Tuple[int, int], Optional[float]] = {}
    for c in sorted(cpus, key=lambda c: c.id):
        per_core.setdefault((c.socket, c.core), c.max_mhz)
    classes = {v for v in per_core.values() if v is not None}
    if len(classes) != 2:
        return set()
    slow = min(classes)
    return {c.id for c in cpus if per_core[(c.socket, c.core)] == slow}


def read_cpu_atom(root: str = "/sys") -> Optional[AbstractSet[int]]:
    """E-core ids from ``<root>/devices/cpu_atom/cpus`` (Intel hybrid PMU); None if absent."""
    text = _read(os.path.join(root, "devices", "cpu_atom", "cpus"))
    if text is None:
        return None
    return set(parse_cpu_list(text, "cpu_atom list")) if text else set()


def _read(path: str) -> Optional[str]:
    try:
        with open(path) as f:
            return f.read().strip()
    except OSError:
        return None


def _cpuinfo_flag(path: str, flag: str) -> bool:
    try:
        with open(path) as f:
            for line in f:
                if line.startswith("flags"):
                    return flag in line.split(":", 1)[-1].split()
    except OSError:
        pass
    return False


def _run_lscpu() -> Optional[str]:
    exe = shutil.which("lscpu")
    if exe is None:
        return None
    try:
        r = subprocess.run([exe, "-p=CPU,CORE,SOCKET,NODE,MAXMHZ"], capture_output=True, text=True,
                           timeout=30, env={**os.environ, "LC_ALL": "C"})
    except (OSError, subprocess.SubprocessError):
        return None
    return r.stdout if r.returncode == 0 else None
