"""``ipex-lite-run``: run a program as one or more CPU-pinned instances with a tuned allocator and
OpenMP environment (flags follow IPEX's ``ipexrun`` / torch's ``run_cpu``).

Flow: parse flags -> discover the topology (cpu_info) -> plan core sets (plan) -> pick libraries
and per-instance environment (env) -> build argv lists -> start every instance, wait, return the
worst exit status.  ``main`` takes its dependencies as keyword arguments so tests can run it
against canned topologies and fake library dirs.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import shlex
import shutil
import signal
import socket
import subprocess
import sys
from dataclasses import dataclass
from typing import Callable, Dict, List, Mapping, Optional, Sequence

from .cpu_info import CPUInfo
from .env import Runtime, choose_runtime, default_lib_dirs, instance_env, resolve_env
from .errors import LauncherError
from .plan import Instance, plan_instances

log = logging.getLogger("ipex_lite.launcher")

EXAMPLES = """\
examples:
  # one instance on every allowed physical core; tcmalloc or jemalloc preloaded if installed
  ipex-lite-run infer.py --batch 64

  # one instance per NUMA node, memory bound to that node (needs numactl)
  ipex-lite-run --throughput-mode --bind-numa-node infer.py

  # 4 instances x 7 cores spread over the sockets, output in logs/run_instance_<i>_cores_<a>-<b>.log
  ipex-lite-run --ninstances 4 --ncores-per-instance 7 --log-dir logs infer.py

  # latency: 4 cores per instance, as many instances as fit; run a module
  ipex-lite-run --latency-mode -m mypkg.serve --port 8000

  # only CPUs 0-3 and 8, jemalloc required; print the plan and environment, run nothing
  ipex-lite-run --cores-list 0-3,8 --memory-allocator jemalloc --dry-run infer.py

  # instance 1 of a 2-instance plan (one launcher per container or per job step)
  ipex-lite-run --ninstances 2 --instance-idx 1 infer.py

  # a non-Python program, 2 instances x 4 cores
  ipex-lite-run --no-python --ninstances 2 --ncores-per-instance 4 ./bench_binary --iters 100

  # distributed data parallel: 2 ranks on this node (gloo over 127.0.0.1), each on its own cores
  ipex-lite-run --nproc-per-node 2 tutorials/dlrm_distributed.py

  # node 1 of 2, 4 ranks per node, rank 0 on host n0
  ipex-lite-run --nnodes 2 --node-rank 1 --nproc-per-node 4 --master-addr n0 train.py

  # the same command on every host of the file (node rank = this host's line, rank 0 on the first
  # host); ranks started by torch.distributed.run, restarted up to 3 times on a failure
  ipex-lite-run --hostfile hosts.txt --nproc-per-node 4 --torchrun --max-restarts 3 train.py

Each instance sees IPEX_LITE_INSTANCE_IDX=<i> and OMP_NUM_THREADS=<its core count>.  Variables
already exported (OMP_NUM_THREADS, MALLOC_CONF, KMP_*, ...) are kept, with a warning; LD_PRELOAD
is extended.
"""


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="ipex-lite-run", formatter_class=argparse.RawDescriptionHelpFormatter, epilog=EXAMPLES,
        # a program option that merely starts like a launcher flag (--n, --instance) must reach the program
        allow_abbrev=False,
        description="Launch a PyTorch CPU program as one or more instances pinned to cores, with a "
                    "tuned memory allocator and OpenMP environment (IPEX ipexrun-compatible flags).")
    g = p.add_argument_group("instances and cores")
    g.add_argument("--ninstances", type=int, default=None, help="number of instances")
    g.add_argument("--ncores-per-instance", type=int, default=None, help="cores per instance")
    g.add_argument("--instance-idx", type=int, default=None,
                   help="run only instance IDX of the plan (0-based); the others are left to other launchers")
    modes = g.add_mutually_exclusive_group()
    modes.add_argument("--latency-mode", action="store_true",
                       help="4 cores per instance, as many instances as fit")
    modes.add_argument("--throughput-mode", action="store_true",
                       help="one instance per NUMA node, using all of that node's cores")
    g.add_argument("--nodes-list", default=None, metavar="LIST", help="NUMA nodes to use, e.g. 0,1")
    g.add_argument("--cores-list", default=None, metavar="LIST",
                   help="logical CPU ids to use, e.g. 0-3,8,10-11")
    g.add_argument("--use-logical-cores", action="store_true",
                   help="also use hyper-thread siblings (default: one thread per physical core)")
    g.add_argument("--use-e-cores", action="store_true", help="also use E-cores of hybrid CPUs")
    g.add_argument("--bind-numa-node", action="store_true",
                   help="bind each single-node instance's memory to its node (numactl -m)")
    g.add_argument("--strategy", choices=("scatter", "close"), default="scatter",
                   help="scatter: instances round-robin over NUMA nodes; close: consecutive cores "
                        "(default: %(default)s)")
    r = p.add_argument_group("runtime")
    r.add_argument("--memory-allocator", choices=("auto", "default", "jemalloc", "tcmalloc"), default="auto",
                   help="auto: tcmalloc, else jemalloc, else the default malloc (default: %(default)s)")
    r.add_argument("--omp-runtime", choices=("auto", "default", "intel"), default="auto",
                   help="auto: Intel OpenMP (libiomp5) if found, else the default (default: %(default)s)")
    r.add_argument("--multi-task-manager", choices=("auto", "none", "numactl", "taskset"), default="auto",
                   help="what pins each instance; auto: numactl, else taskset, else none (OpenMP "
                        "affinity variables only) (default: %(default)s)")
    r.add_argument("--benchmark", action="store_true",
                   help="accepted for ipexrun compatibility: the allocator settings are always the "
                        "benchmark ones (jemalloc keeps freed pages)")
    d = p.add_argument_group("distributed (torch.distributed env:// rendezvous, as torchrun sets it up)")
    d.add_argument("--nproc-per-node", type=int, default=None,
                   help="ranks on this node: one instance each, with RANK / LOCAL_RANK / WORLD_SIZE / "
                        "MASTER_ADDR / MASTER_PORT set")
    d.add_argument("--nnodes", type=int, default=None, help="nodes in the job (default: 1, or the hostfile's)")
    d.add_argument("--node-rank", type=int, default=None,
                   help="this node's index (default: 0, or this host's line in the hostfile)")
    d.add_argument("--master-addr", default=None,
                   help="rank 0's address (default: 127.0.0.1, or the hostfile's first host)")
    d.add_argument("--master-port", type=int, default=29500, help="rank 0's port (default: %(default)s)")
    d.add_argument("--hostfile", default=None, metavar="FILE",
                   help="the job's hosts, one per line (# comments; words after the host are ignored): "
                        "sets --nnodes, --master-addr and this node's --node-rank; run the same command "
                        "on every host")
    d.add_argument("--torchrun", action="store_true",
                   help="start the ranks through torch.distributed.run (its rendezvous, failure "
                        "monitoring and restarts) instead of directly; each rank still gets its cores, "
                        "allocator and OpenMP environment")
    d.add_argument("--max-restarts", type=int, default=0,
                   help="with --torchrun: restart all ranks up to N times when one fails; note that torch's "
                        "restarted ranks can fail to re-form a gloo group (pytorch#167288) (default: %(default)s)")
    o = p.add_argument_group("program and output")
    o.add_argument("--log-dir", default=None, help="write each instance's stdout+stderr to a file in this dir")
    o.add_argument("--log-file-prefix", default="run", help="log file name prefix (default: %(default)s)")
    kind = o.add_mutually_exclusive_group()
    kind.add_argument("-m", "--module", action="store_true", help="run program as a Python module (python -m)")
    kind.add_argument("--no-python", action="store_true", help="run program directly, not with Python")
    o.add_argument("--dry-run", action="store_true",
                   help="print each instance's command and the environment it would get; run nothing")
    p.add_argument("program", help="the script (or module with -m, or executable with --no-python)")
    p.add_argument("program_args", nargs=argparse.REMAINDER, help="arguments for the program")
    return p


@dataclass
class Launch:
    """Everything needed to start one instance."""

    instance: Instance
    argv: List[str]
    env_changes: Dict[str, str]
    log_path: Optional[str] = None


def choose_manager(requested: str, which: Callable[[str], Optional[str]]) -> str:
    """Resolve ``auto``; an explicitly requested tool that is missing is an error."""
    if requested in ("numactl", "taskset"):
        if which(requested) is None:
            pkg = "numactl" if requested == "numactl" else "util-linux"
            raise LauncherError(f"--multi-task-manager {requested}: {requested} not found on PATH "
                                f"(Debian/Ubuntu: apt install {pkg}); or use --multi-task-manager auto")
        return requested
    if requested == "none":
        return "none"
    for tool in ("numactl", "taskset"):
        if which(tool):
            return tool
    log.info("neither numactl nor taskset found: pinning through OpenMP affinity variables only")
    return "none"


def build_argv(instance: Instance, args: argparse.Namespace, manager: str,
               python: str = sys.executable) -> List[str]:
    """The instance's command as an argv list (never a shell string)."""
    if manager == "numactl":
        prefix = ["numactl", "-C", instance.cpu_list]
        if args.bind_numa_node and instance.node is not None:
            prefix += ["-m", str(instance.node)]
    elif manager == "taskset":
        prefix = ["taskset", "-c", instance.cpu_list]
    else:
        prefix = []
    if args.no_python:
        cmd = [args.program]
    else:
        # -u with log files so they can be followed live and nothing is lost if the run is killed.
        cmd = [python] + (["-u"] if args.log_dir else []) + (["-m"] if args.module else []) + [args.program]
    return prefix + cmd + list(args.program_args)


def log_path(args: argparse.Namespace, instance: Instance) -> Optional[str]:
    if not args.log_dir:
        return None
    first, last = min(instance.cores), max(instance.cores)
    name = f"{args.log_file_prefix}_instance_{instance.index}_cores_{first}-{last}.log"
    return os.path.join(args.log_dir, name)


def distributed_env(args: argparse.Namespace, local_rank: int) -> Dict[str, str]:
    """The env:// rendezvous variables torchrun gives each worker (static membership, no elastic restarts)."""
    n = args.nproc_per_node
    return {"RANK": str(args.node_rank * n + local_rank), "LOCAL_RANK": str(local_rank),
            "WORLD_SIZE": str(args.nnodes * n), "LOCAL_WORLD_SIZE": str(n), "GROUP_RANK": str(args.node_rank),
            "MASTER_ADDR": args.master_addr, "MASTER_PORT": str(args.master_port)}


def read_hostfile(path: str) -> List[str]:
    """Host names or addresses, one per line; blank lines, # comments and words after the host
    (e.g. MPI's ``slots=4``) are ignored."""
    try:
        with open(path) as f:
            lines = f.read().splitlines()
    except OSError as e:
        raise LauncherError(f"--hostfile {path}: {e.strerror}") from e
    hosts = [line.split("#", 1)[0].split()[0] for line in lines if line.split("#", 1)[0].strip()]
    if not hosts:
        raise LauncherError(f"--hostfile {path} lists no hosts")
    if len(set(hosts)) != len(hosts):
        raise LauncherError(f"--hostfile {path} lists a host twice: {hosts}")
    return hosts


def local_identities() -> set:
    """Names and addresses this machine answers to."""
    names = {"localhost", "127.0.0.1", "::1", socket.gethostname(), socket.getfqdn(),
             socket.gethostname().split(".")[0]}
    try:
        names |= {info[4][0] for info in socket.getaddrinfo(socket.gethostname(), None)}
    except OSError:
        pass
    return names


def _apply_hostfile(args: argparse.Namespace) -> None:
    hosts = read_hostfile(args.hostfile)
    if args.nnodes not in (None, len(hosts)):
        raise LauncherError(f"--nnodes {args.nnodes} contradicts the {len(hosts)} hosts of --hostfile")
    args.nnodes = len(hosts)
    if args.master_addr is None:
        args.master_addr = hosts[0]
    if args.node_rank is None:
        mine = local_identities()
        matches = [i for i, h in enumerate(hosts) if h in mine]
        if len(matches) != 1:
            raise LauncherError(f"this host ({socket.gethostname()}) is {'not' if not matches else 'more than once'} "
                                f"in --hostfile {args.hostfile} ({hosts}); pass --node-rank")
        args.node_rank = matches[0]


def _check_distributed(args: argparse.Namespace) -> None:
    if args.hostfile:
        _apply_hostfile(args)
    if args.nproc_per_node is None:
        if args.nnodes not in (None, 1) or args.node_rank not in (None, 0) or args.torchrun:
            raise LauncherError("--nnodes / --node-rank / --hostfile / --torchrun need --nproc-per-node")
        return
    args.nnodes = 1 if args.nnodes is None else args.nnodes
    args.node_rank = 0 if args.node_rank is None else args.node_rank
    args.master_addr = args.master_addr or "127.0.0.1"
    if args.max_restarts < 0 or (args.max_restarts and not args.torchrun):
        raise LauncherError("--max-restarts needs --torchrun and must be at least 0")
    if args.nproc_per_node < 1 or args.nnodes < 1:
        raise LauncherError("--nproc-per-node and --nnodes must be at least 1")
    if not 0 <= args.node_rank < args.nnodes:
        raise LauncherError(f"--node-rank {args.node_rank} must lie in [0, --nnodes {args.nnodes})")
    if not 0 < args.master_port < 65536:
        raise LauncherError(f"--master-port {args.master_port} is not a TCP port")
    if args.latency_mode or args.throughput_mode or args.ninstances not in (None, args.nproc_per_node):
        raise LauncherError("--nproc-per-node sets the number of instances; drop --ninstances / "
                            "--latency-mode / --throughput-mode")
    args.ninstances = args.nproc_per_node


def prepare(args: argparse.Namespace, info: CPUInfo, lib_dirs: Sequence[str],
            which: Callable[[str], Optional[str]], environ: Mapping[str, str]) -> List[Launch]:
    """Plan, resolve the runtime and build every instance's command and environment."""
    _check_distributed(args)
    instances = plan_instances(info, args)
    manager = choose_manager(args.multi_task_manager, which)
    if args.bind_numa_node and manager != "numactl":
        log.warning("--bind-numa-node needs numactl (multi-task manager is %s): memory is not bound", manager)
    runtime: Runtime = choose_runtime(args.memory_allocator, args.omp_runtime, lib_dirs,
                                      environ.get("LD_PRELOAD", ""))
    launches, kept_all = [], {}
    for inst in instances:
        wanted = instance_env(inst.cores, runtime, inst.index, bound=manager != "none")
        changes, kept = resolve_env(wanted, runtime, environ)
        if args.nproc_per_node is not None and not args.torchrun:  # per-rank values win over inherited ones
            changes.update(distributed_env(args, inst.index))
        for name, values in kept.items():
            kept_all.setdefault(name, values)
        launches.append(Launch(inst, build_argv(inst, args, manager), changes, log_path(args, inst)))
    for name, (user, ours) in sorted(kept_all.items()):
        log.warning("%s=%s is already set in the environment; keeping it (the launcher would set %s)",
                    name, user, ours)
    return launches


def describe(launch: Launch) -> str:
    """Dry-run text for one instance: cores, environment changes, command."""
    inst = launch.instance
    where = f"node {inst.node}" if inst.node is not None else "several NUMA nodes"
    n = len(inst.cores)
    lines = [f"instance {inst.index}: CPUs {inst.cpu_list} ({n} CPU{'s' if n != 1 else ''}, {where})",
             "  env: " + " ".join(f"{k}={shlex.quote(v)}" for k, v in sorted(launch.env_changes.items())),
             "  cmd: " + shlex.join(launch.argv)]
    if launch.log_path:
        lines.append(f"  log: {launch.log_path}")
    return "\n".join(lines)


RANK_ENTRY = os.path.join(os.path.dirname(os.path.abspath(__file__)), "_rank_entry.py")


def torchrun_argv(args: argparse.Namespace, launches: Sequence[Launch], python: str = sys.executable) -> List[str]:
    """One torch.distributed.run command for this node.  Its workers run _rank_entry.py, which
    applies each local rank's environment and log file and then execs that rank's command."""
    plan = [{"argv": launch.argv, "env": launch.env_changes, "log": launch.log_path} for launch in launches]
    return [python, "-m", "torch.distributed.run", "--nnodes", str(args.nnodes),
            "--nproc-per-node", str(args.nproc_per_node), "--node-rank", str(args.node_rank),
            "--master-addr", args.master_addr, "--master-port", str(args.master_port),
            "--max-restarts", str(args.max_restarts), RANK_ENTRY, json.dumps(plan)]


def run_torchrun(argv: Sequence[str], environ: Mapping[str, str]) -> int:
    """torch.distributed.run in the foreground; it passes the signals we forward on to its workers."""
    with _forwarding_signals() as procs:
        procs.append(subprocess.Popen(list(argv), env=dict(environ)))
        return worst_exit_code([procs[0].wait()])


def worst_exit_code(codes: Sequence[int]) -> int:
    """0 if all succeeded, else the largest status; death by signal N counts as 128+N."""
    statuses = [128 - c if c < 0 else c for c in codes]
    return max(statuses, default=0)


def _foreground_on_tty() -> bool:
    """True when we own the terminal's foreground group: Ctrl-C then reached the children too."""
    try:
        fd = os.open("/dev/tty", os.O_RDONLY)
    except OSError:
        return False
    try:
        return os.tcgetpgrp(fd) == os.getpgrp()
    except OSError:
        return False
    finally:
        os.close(fd)


def run_all(launches: Sequence[Launch], environ: Mapping[str, str]) -> int:
    """Start every instance, forward SIGINT/SIGTERM, wait for all, return the worst status.

    Children stay in our process group so the terminal (Ctrl-C, Ctrl-Z, stdin) works as with a
    plain ``python script.py``.  A keyboard SIGINT therefore already reached them; it is forwarded
    only when it cannot have come from the terminal (we are not its foreground group).
    """
    files = []
    with _forwarding_signals() as procs:
        try:
            for launch in launches:
                out = None
                if launch.log_path:
                    os.makedirs(os.path.dirname(launch.log_path) or ".", exist_ok=True)
                    out = open(launch.log_path, "w")
                    files.append(out)
                    log.info("instance %d (CPUs %s) logs to %s", launch.instance.index,
                             launch.instance.cpu_list, launch.log_path)
                try:
                    procs.append(subprocess.Popen(launch.argv, env={**environ, **launch.env_changes}, stdout=out,
                                                  stderr=subprocess.STDOUT if out else None))
                except OSError as e:
                    log.error("cannot start instance %d (%s): %s", launch.instance.index, shlex.join(launch.argv),
                              e)
                    _signal_all(procs, signal.SIGTERM)
                    codes = [p.wait() for p in procs]
                    return max(worst_exit_code(codes), 127)
            return worst_exit_code([p.wait() for p in procs])
        finally:
            for f in files:
                f.close()


def _signal_all(procs: Sequence[subprocess.Popen], signum: int) -> None:
    for p in procs:
        if p.poll() is None:
            try:
                p.send_signal(signum)
            except ProcessLookupError:
                pass


@contextlib.contextmanager
def _forwarding_signals():
    """While active, SIGINT/SIGTERM go to the children appended to the yielded list.  A keyboard
    SIGINT already reached them when we own the terminal's foreground group, so it is forwarded
    only otherwise."""
    procs: List[subprocess.Popen] = []

    def forward(signum, _frame):
        if not (signum == signal.SIGINT and _foreground_on_tty()):
            _signal_all(procs, signum)
    old = {}
    for s in (signal.SIGINT, signal.SIGTERM):
        try:
            old[s] = signal.signal(s, forward)
        except ValueError:  # not the main thread: no handlers, children still get terminal signals
            pass
    try:
        yield procs
    finally:
        for s, handler in old.items():
            signal.signal(s, handler)

class _StderrHandler(logging.Handler):
    """Writes to whatever sys.stderr is at emit time (so redirections and pytest capture work)."""

    def emit(self, record: logging.LogRecord) -> None:
        sys.stderr.write(self.format(record) + "\n")


def _setup_logging() -> None:
    if not any(isinstance(h, _StderrHandler) for h in log.handlers):
        handler = _StderrHandler()
        handler.setFormatter(logging.Formatter("ipex-lite-run: %(levelname)s: %(message)s"))
        log.addHandler(handler)
    log.setLevel(logging.INFO)


def main(argv: Optional[Sequence[str]] = None, *, cpu_info: Optional[CPUInfo] = None,
         lib_dirs: Optional[Sequence[str]] = None, which: Callable[[str], Optional[str]] = shutil.which,
         environ: Optional[Mapping[str, str]] = None) -> int:
    """Entry point of ``ipex-lite-run``; returns the exit status.  Keyword arguments are for tests."""
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as e:  # --help or a usage error: argparse has printed the message
        return e.code if isinstance(e.code, int) else 0 if e.code is None else 2
    _setup_logging()
    environ = dict(os.environ) if environ is None else dict(environ)
    try:
        info = cpu_info if cpu_info is not None else CPUInfo.discover()
        launches = prepare(args, info, default_lib_dirs(environ) if lib_dirs is None else lib_dirs, which, environ)
    except LauncherError as e:
        print(f"ipex-lite-run: error: {e}", file=sys.stderr)
        return 1
    if args.torchrun:
        argv = torchrun_argv(args, launches)
        if args.dry_run:
            print("torch.distributed.run (sets RANK, LOCAL_RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT per worker):")
            print("  cmd: " + shlex.join(argv[:-1]) + " <plan>")
            print("\n".join(describe(launch) for launch in launches))
            return 0
        # torchrun would otherwise set (and announce) OMP_NUM_THREADS=1; each rank's own value is
        # applied by _rank_entry.py before its program starts
        omp = launches[0].env_changes.get("OMP_NUM_THREADS") if launches else None
        return run_torchrun(argv, {**environ, **({"OMP_NUM_THREADS": omp} if omp else {})})
    if args.dry_run:
        print("\n".join(describe(launch) for launch in launches))
        return 0
    return run_all(launches, environ)
