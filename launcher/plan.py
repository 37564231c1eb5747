"""Which logical CPUs each instance gets: a pure function of the topology and the flags.

Pool order.  Candidate CPUs are grouped by NUMA node (ascending), P-cores before E-cores, then
*core-major*: a physical core's threads stay adjacent (with ``--use-logical-cores`` node 0 of a
2x28-core HT server reads 0,56,1,57,...).  Slicing that order never gives two instances the two
threads of one core unless the per-instance count is odd, whereas "all physical cores first" would
hand instance 1 exactly the siblings of instance 0's cores.

Within an instance, ``Instance.cores`` lists one thread per physical core first and the remaining
threads after it (each part ascending): that is the order GOMP_CPU_AFFINITY/KMP proclist use, so with
fewer OpenMP threads than CPUs the threads spread over distinct cores first.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence

from .cpu_info import CPUInfo, format_cpu_list, parse_cpu_list
from .errors import LauncherError

log = logging.getLogger("ipex_lite.launcher")

LATENCY_CORES = 4  # cores per instance in --latency-mode (as IPEX)


@dataclass
class Instance:
    index: int
    cores: List[int]
    node: Optional[int]  # NUMA node when every core is on one node, else None

    @property
    def cpu_list(self) -> str:
        """Compressed, sorted list for numactl/taskset/log names, e.g. ``"0-13,56-69"``."""
        return format_cpu_list(self.cores)


def candidate_pool(info: CPUInfo, use_logical_cores: bool = False, use_e_cores: bool = False,
                   nodes_list: Optional[str] = None, cores_list: Optional[str] = None) -> List[int]:
    """Allowed CPUs that instances may use, in pool order (see the module docstring)."""
    cpus = info.cpu_ids
    if nodes_list is not None:
        nodes = parse_cpu_list(nodes_list, "--nodes-list")
        unknown = sorted(set(nodes) - set(info.nodes))
        if unknown:
            raise LauncherError(f"--nodes-list {nodes_list}: node(s) {format_cpu_list(unknown)} not available "
                                f"(nodes with allowed CPUs: {format_cpu_list(info.nodes)})")
        cpus = [c for c in cpus if info.node_of(c) in nodes]
    if cores_list is not None:
        wanted = parse_cpu_list(cores_list, "--cores-list")
        unknown = sorted(set(wanted) - set(info.cpu_ids))
        if unknown:
            raise LauncherError(f"--cores-list {cores_list}: CPU(s) {format_cpu_list(unknown)} not available "
                                f"(allowed CPUs: {format_cpu_list(info.cpu_ids)})")
        cpus = [c for c in cpus if c in set(wanted)]
    pool = [c for c in cpus
            if (use_logical_cores or info.is_primary(c)) and (use_e_cores or not info.cpus[c].e_core)]
    if cores_list is not None:
        dropped = sorted(set(cpus) - set(pool))
        if dropped:
            log.warning("--cores-list: skipping CPU(s) %s (hyper-thread siblings need --use-logical-cores, "
                        "E-cores --use-e-cores)", format_cpu_list(dropped))
    if not pool:
        raise LauncherError("no CPU left to run on after applying --nodes-list/--cores-list/--use-e-cores "
                            f"(allowed CPUs: {format_cpu_list(info.cpu_ids)})")
    return sorted(pool, key=lambda c: (info.node_of(c), info.cpus[c].e_core, info.primary_of(c), c))


def plan_instances(info: CPUInfo, args) -> List[Instance]:
    """Instances for the parsed command line `args` (an argparse Namespace of the launcher's flags).

    Sizes: default one instance with the whole pool; --throughput-mode one per NUMA node;
    --latency-mode 4 cores each, as many as fit; --ninstances/--ncores-per-instance, either
    deriving the other from the pool size.  Placement: see _scatter (default) or consecutive
    slices of the pool (close).
    """
    pool = candidate_pool(info, args.use_logical_cores, args.use_e_cores, args.nodes_list, args.cores_list)
    n, c = args.ninstances, args.ncores_per_instance
    mode = "--latency-mode" if args.latency_mode else "--throughput-mode" if args.throughput_mode else None
    if mode and (n is not None or c is not None):
        raise LauncherError(f"{mode} chooses the instance sizes itself; drop it or drop "
                            "--ninstances/--ncores-per-instance")
    for flag, value in (("--ninstances", n), ("--ncores-per-instance", c)):
        if value is not None and value < 1:
            raise LauncherError(f"{flag} must be at least 1 (got {value})")

    if args.throughput_mode:
        groups = _by_node(info, pool)
        slices = [groups[node] for node in groups]
    else:
        if args.latency_mode:
            n, c = len(pool) // LATENCY_CORES, LATENCY_CORES
        elif n is not None and c is not None:
            if n * c > len(pool):
                raise LauncherError(f"--ninstances {n} x --ncores-per-instance {c} = {n * c} cores, but only "
                                    f"{len(pool)} are available ({format_cpu_list(pool)})")
        elif n is not None:
            c = len(pool) // n
        elif c is not None:
            n = len(pool) // c
        else:
            n, c = 1, len(pool)
        if n < 1 or c < 1:
            have = f"only {len(pool)} core(s) are available ({format_cpu_list(pool)})"
            if args.latency_mode:
                raise LauncherError(f"--latency-mode needs {LATENCY_CORES} cores per instance but {have}; "
                                    "use --ncores-per-instance instead")
            if c < 1:
                raise LauncherError(f"--ninstances {n} needs at least {n} cores but {have}")
            raise LauncherError(f"--ncores-per-instance {c} does not fit: {have}")
        slices = _scatter(info, pool, n, c) if args.strategy == "scatter" else None
        if slices is None:
            slices = [pool[i * c:(i + 1) * c] for i in range(n)]

    instances = [_instance(info, i, cores) for i, cores in enumerate(slices)]
    if args.instance_idx is not None:
        if not 0 <= args.instance_idx < len(instances):
            raise LauncherError(f"--instance-idx {args.instance_idx} is out of range: the plan has "
                                f"{len(instances)} instance(s) (0-{len(instances) - 1})")
        instances = [instances[args.instance_idx]]
    for inst in instances:
        if inst.node is None:
            log.warning("instance %d (CPUs %s) spans NUMA nodes %s: memory accesses cross nodes; consider "
                        "--throughput-mode, --nodes-list or fewer cores per instance", inst.index,
                        inst.cpu_list, format_cpu_list(info.node_of(x) for x in inst.cores))
    return instances


def _by_node(info: CPUInfo, pool: Sequence[int]) -> Dict[int, List[int]]:
    groups: Dict[int, List[int]] = {}
    for cpu in pool:
        groups.setdefault(info.node_of(cpu), []).append(cpu)
    return groups


def _scatter(info: CPUInfo, pool: Sequence[int], n: int, c: int) -> Optional[List[List[int]]]:
    """Instance i on node i % nnodes, taking that node's next `c` cores; None when a node is short."""
    groups = _by_node(info, pool)
    nodes = list(groups)
    if len(nodes) < 2 or n < 2:
        return None
    per_node = [len(range(k, n, len(nodes))) for k in range(len(nodes))]
    if any(count * c > len(groups[node]) for node, count in zip(nodes, per_node)):
        log.info("--strategy scatter: %d instance(s) of %d core(s) do not fit round-robin on NUMA nodes %s; "
                 "using close", n, c, format_cpu_list(nodes))
        return None
    taken = {node: 0 for node in nodes}
    slices = []
    for i in range(n):
        node = nodes[i % len(nodes)]
        slices.append(groups[node][taken[node]:taken[node] + c])
        taken[node] += c
    return slices


def _instance(info: CPUInfo, index: int, cores: Sequence[int]) -> Instance:
    # "First thread" is relative to this instance: a core split with the previous instance still
    # counts its remaining thread among the instance's own cores.
    firsts = {}
    for x in sorted(cores):
        firsts.setdefault(info.primary_of(x), x)
    ordered = sorted(cores, key=lambda x: (x not in firsts.values(), x))
    nodes = {info.node_of(x) for x in cores}
    return Instance(index, ordered, nodes.pop() if len(nodes) == 1 else None)
