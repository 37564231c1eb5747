"""ipex-lite-run: topology parsing, core plans, environment, command lines, and a few real runs.

Topologies are canned lscpu texts (plus a fake sysfs tree), so every core list below is exact and
independent of the machine running the tests.  The end-to-end tests run real instances here.
"""
import json
import logging
import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest

from ipex_lite.launcher import main
from ipex_lite.launcher.cpu_info import CPUInfo, format_cpu_list, parse_cpu_list
from ipex_lite.launcher.env import (JEMALLOC_CONF, Runtime, choose_runtime, default_lib_dirs,
                                    find_library, instance_env, merge_preload, resolve_env)
from ipex_lite.launcher.errors import LauncherError
from ipex_lite.launcher.launch import build_argv, build_parser, log_path, worst_exit_code
from ipex_lite.launcher.plan import plan_instances

LSCPU_HEADER = """\
# The following is the parsable format, which can be fed to other
# programs. Each different item in every column has an unique ID
# starting usually from zero.
"""


def lscpu(header, rows):
    return LSCPU_HEADER + "# " + header + "\n" + "\n".join(",".join(map(str, r)) for r in rows) + "\n"


def _server_rows():
    rows = []
    for cpu in range(112):
        core = cpu if cpu < 56 else cpu - 56
        sock = 0 if core < 28 else 1
        rows.append((cpu, core, sock, sock, "3800.0000"))
    return rows


# (a) 2 sockets x 28 cores, HT: 0-27 node 0, 28-55 node 1, 56-83 / 84-111 their siblings.
SERVER = lscpu("CPU,Core,Socket,Node,MaxMHz", _server_rows())
# (b) hybrid desktop, columns in another order: 8 HT P-cores (CPUs 2i, 2i+1) + 8 E-cores 16-23.
HYBRID = lscpu("CPU,Node,Socket,Core,MaxMHz",
               [(c, 0, 0, c // 2, "5200.0000") for c in range(16)] + [(c, 0, 0, c - 8, "3900.0000")
                                                                       for c in range(16, 24)])
# (c) container: the host has 8 HT cores (siblings i, i+8), no NODE values, no MAXMHZ column.
CONTAINER = lscpu("CPU,Core,Socket,Node", [(c, c % 8, 0, "") for c in range(16)])
# (d) 1 socket x 8 cores without HT, cgroup-restricted.
SMALL = lscpu("CPU,Core,Socket,Node,MaxMHz", [(c, c, 0, 0, "") for c in range(8)])


def server():
    return CPUInfo.from_lscpu(SERVER, allowed=set(range(112)))


def hybrid(**kw):
    return CPUInfo.from_lscpu(HYBRID, allowed=set(range(24)), **kw)


def plan(info, *flags):
    args = build_parser().parse_args([*flags, "prog.py"])
    return [(i.index, i.cores, i.node) for i in plan_instances(info, args)]


def cores(info, *flags):
    return [c for _, c, _ in plan(info, *flags)]


R = lambda a, b: list(range(a, b + 1))  # noqa: E731  inclusive range, reads like the CPU lists


# --- CPU lists and discovery -------------------------------------------------------------------------
def test_cpu_list_syntax():
    assert parse_cpu_list("0-3,8,10-11") == [0, 1, 2, 3, 8, 10, 11]
    assert parse_cpu_list(" 5 , 1-2 ,2") == [1, 2, 5]
    assert format_cpu_list([11, 0, 1, 2, 3, 8, 10]) == "0-3,8,10-11"
    assert format_cpu_list([0, 2, 1, 3], keep_order=True) == "0,2,1,3"
    for bad in ("", "a", "0-", "3-1", "1,,2", "0:2"):
        with pytest.raises(LauncherError, match="--cores-list"):
            parse_cpu_list(bad, "--cores-list")


def test_lscpu_server():
    info = server()
    assert info.cpu_ids == R(0, 111)
    assert info.physical_cores() == R(0, 55)
    assert info.nodes == [0, 1] and info.e_cores == []
    assert info.primary_of(56) == 0 and info.primary_of(111) == 55


def test_lscpu_hybrid_e_cores_need_hybrid_flag():
    assert hybrid(hybrid=True).e_cores == R(16, 23)
    assert hybrid(hybrid=False).e_cores == []  # two MAXMHZ classes alone (favoured cores) prove nothing
    assert hybrid(e_cores={20, 21}).e_cores == [20, 21]  # sysfs cpu_atom wins over the heuristic
    assert hybrid(hybrid=True).physical_cores() == list(range(0, 16, 2)) + R(16, 23)


def test_lscpu_container_allowed_set():
    info = CPUInfo.from_lscpu(CONTAINER, allowed={0, 1})
    assert info.cpu_ids == [0, 1] and info.physical_cores() == [0, 1] and info.nodes == [0]
    siblings = CPUInfo.from_lscpu(CONTAINER, allowed={0, 8})  # both threads of one core
    assert siblings.physical_cores() == [0]
    assert cores(siblings) == [[0]]
    assert cores(siblings, "--use-logical-cores") == [[0, 8]]
    with pytest.raises(LauncherError, match="allowed set"):
        CPUInfo.from_lscpu(CONTAINER, allowed={40})


def test_lscpu_default_allowed_is_affinity():
    info = CPUInfo.from_lscpu(lscpu("CPU,Core", [(c, c) for c in range(256)]))
    assert set(info.cpu_ids) == os.sched_getaffinity(0)


def _fake_sysfs(root, cpus, atom=None, online=None):
    """cpus: {id: (core_id, package, node)}; node None = no nodeX entry; package None = offline."""
    base = root / "devices" / "system" / "cpu"
    for cpu, (core, pkg, node) in cpus.items():
        d = base / f"cpu{cpu}"
        d.mkdir(parents=True)
        if pkg is None:
            continue
        (d / "topology").mkdir()
        (d / "topology" / "core_id").write_text(f"{core}\n")
        (d / "topology" / "physical_package_id").write_text(f"{pkg}\n")
        if node is not None:
            (d / f"node{node}").symlink_to(root)
    if online is not None:
        (base / "online").write_text(online + "\n")
    if atom is not None:
        (root / "devices" / "cpu_atom").mkdir(parents=True)
        (root / "devices" / "cpu_atom" / "cpus").write_text(atom + "\n")
    return str(root)


def test_sysfs_hybrid(tmp_path):
    # P-cores with HT (core ids 0 and 4: sysfs ids need not be dense), two E-cores, cpu6 offline.
    root = _fake_sysfs(tmp_path, {0: (0, 0, 0), 1: (0, 0, 0), 2: (4, 0, 0), 3: (4, 0, 0), 4: (8, 0, 0),
                                  5: (9, 0, 0), 6: (10, None, None)}, atom="4-5", online="0-5")
    info = CPUInfo.from_sysfs(root, allowed=set(range(8)))
    assert info.cpu_ids == R(0, 5)
    assert info.physical_cores() == [0, 2, 4, 5] and info.e_cores == [4, 5]
    assert cores(info) == [[0, 2]]
    assert cores(info, "--use-e-cores") == [[0, 2, 4, 5]]
    assert cores(info, "--use-e-cores", "--use-logical-cores") == [[0, 2, 4, 5, 1, 3]]
    assert CPUInfo.from_sysfs(root, allowed={1, 3, 5}).physical_cores() == [1, 3, 5]
    # discover() without lscpu takes the same path and reads cpu_atom itself.
    assert CPUInfo.discover(allowed=set(range(8)), sysfs_root=root, use_lscpu=False).e_cores == [4, 5]


def test_sysfs_core_ids_repeat_across_sockets(tmp_path):
    root = _fake_sysfs(tmp_path, {0: (0, 0, 0), 1: (0, 1, 1), 2: (0, 0, 0), 3: (0, 1, 1)})
    info = CPUInfo.from_sysfs(root, allowed=set(range(4)))
    assert info.physical_cores() == [0, 1] and info.nodes == [0, 1] and info.e_cores == []
    assert plan(info, "--throughput-mode") == [(0, [0], 0), (1, [1], 1)]


def test_sysfs_without_node_links(tmp_path):
    root = _fake_sysfs(tmp_path, {0: (0, 0, None), 1: (1, 0, None)})
    assert CPUInfo.from_sysfs(root, allowed={0, 1}).nodes == [0]


def test_discover_this_machine():
    info = CPUInfo.discover()
    assert set(info.cpu_ids) == os.sched_getaffinity(0)


# --- plans on (a) --------------------------------------------------------------------------------------
def test_server_default_spans_nodes(caplog):
    assert plan(server()) == [(0, R(0, 55), None)]
    assert "spans NUMA nodes 0-1" in caplog.text


def test_server_throughput():
    assert plan(server(), "--throughput-mode") == [(0, R(0, 27), 0), (1, R(28, 55), 1)]


def test_server_latency_scatter_and_close():
    scatter = cores(server(), "--latency-mode")
    assert len(scatter) == 14
    # instance i on node i % 2, each node's cores taken in order
    assert scatter == [R(4 * (i // 2) + 28 * (i % 2), 4 * (i // 2) + 28 * (i % 2) + 3) for i in range(14)]
    assert scatter[:3] == [R(0, 3), R(28, 31), R(4, 7)]
    assert cores(server(), "--latency-mode", "--strategy", "close") == [R(4 * i, 4 * i + 3) for i in range(14)]


def test_server_4x7_scatter_vs_close():
    flags = ("--ninstances", "4", "--ncores-per-instance", "7")
    assert plan(server(), *flags) == [(0, R(0, 6), 0), (1, R(28, 34), 1), (2, R(7, 13), 0), (3, R(35, 41), 1)]
    assert plan(server(), *flags, "--strategy", "close") == [(0, R(0, 6), 0), (1, R(7, 13), 0),
                                                             (2, R(14, 20), 0), (3, R(21, 27), 0)]


def test_server_scatter_falls_back_to_close(caplog):
    caplog.set_level(logging.INFO, logger="ipex_lite.launcher")
    # 2 instances of 18 would land on node 0 (36 > 28 cores): close instead, instance 1 spans nodes.
    assert plan(server(), "--ninstances", "3", "--ncores-per-instance", "18") == [
        (0, R(0, 17), 0), (1, R(18, 35), None), (2, R(36, 53), 1)]
    assert "using close" in caplog.text and "instance 1 (CPUs 18-35) spans" in caplog.text


def test_server_only_ninstances_or_only_ncores():
    assert cores(server(), "--ninstances", "2") == [R(0, 27), R(28, 55)]
    assert cores(server(), "--ninstances", "3", "--strategy", "close") == [R(0, 17), R(18, 35), R(36, 53)]
    assert cores(server(), "--ncores-per-instance", "28") == [R(0, 27), R(28, 55)]
    assert len(cores(server(), "--ncores-per-instance", "10")) == 5


def test_server_logical_cores():
    # Pool is core-major (both threads of a core together); each instance lists primaries first.
    assert cores(server(), "--use-logical-cores", "--throughput-mode") == [R(0, 27) + R(56, 83),
                                                                          R(28, 55) + R(84, 111)]
    assert cores(server(), "--use-logical-cores", "--ninstances", "4") == [
        R(0, 13) + R(56, 69), R(28, 41) + R(84, 97), R(14, 27) + R(70, 83), R(42, 55) + R(98, 111)]
    assert cores(server(), "--use-logical-cores", "--ninstances", "2", "--ncores-per-instance", "3",
                 "--strategy", "close") == [[0, 1, 56], [2, 57, 58]]


def test_server_nodes_list_and_cores_list(caplog):
    assert plan(server(), "--nodes-list", "1") == [(0, R(28, 55), 1)]
    assert plan(server(), "--nodes-list", "0,1", "--throughput-mode") == [(0, R(0, 27), 0), (1, R(28, 55), 1)]
    assert cores(server(), "--cores-list", "0-3,8,10-11") == [[0, 1, 2, 3, 8, 10, 11]]
    assert cores(server(), "--cores-list", "0-3,30-33", "--ninstances", "2") == [R(0, 3), R(30, 33)]
    assert cores(server(), "--cores-list", "0-1,56") == [[0, 1]]
    assert "skipping CPU(s) 56" in caplog.text
    assert cores(server(), "--cores-list", "0-1,56", "--use-logical-cores") == [[0, 1, 56]]
    assert cores(server(), "--cores-list", "0-7,28-29", "--nodes-list", "1") == [[28, 29]]


def test_server_instance_idx():
    assert plan(server(), "--throughput-mode", "--instance-idx", "1") == [(1, R(28, 55), 1)]
    assert plan(server(), "--latency-mode", "--instance-idx", "13") == [(13, R(52, 55), 1)]


# --- plans on (b), (c), (d) ----------------------------------------------------------------------------
def test_hybrid_plans():
    info = hybrid(hybrid=True)
    p_cores = list(range(0, 16, 2))
    assert plan(info) == [(0, p_cores, 0)]
    assert cores(info, "--use-e-cores") == [p_cores + R(16, 23)]
    assert cores(info, "--use-logical-cores") == [p_cores + list(range(1, 16, 2))]
    assert cores(info, "--use-logical-cores", "--use-e-cores") == [p_cores + R(16, 23) + list(range(1, 16, 2))]
    # P-cores fill first, E-cores after them
    assert cores(info, "--use-e-cores", "--ncores-per-instance", "4") == [[0, 2, 4, 6], [8, 10, 12, 14],
                                                                         R(16, 19), R(20, 23)]
    assert cores(info, "--cores-list", "16-23", "--use-e-cores") == [R(16, 23)]


def test_container_and_cgroup_plans():
    assert plan(CPUInfo.from_lscpu(CONTAINER, allowed={0, 1})) == [(0, [0, 1], 0)]
    assert cores(CPUInfo.from_lscpu(CONTAINER, allowed={0, 1}), "--ninstances", "2") == [[0], [1]]
    small = CPUInfo.from_lscpu(SMALL, allowed={2, 3, 6, 7})
    assert plan(small) == [(0, [2, 3, 6, 7], 0)]
    assert cores(small, "--ninstances", "2") == [[2, 3], [6, 7]]
    assert cores(small, "--throughput-mode") == [[2, 3, 6, 7]]
    assert cores(small, "--cores-list", "3,6") == [[3, 6]]
    with pytest.raises(LauncherError, match=r"CPU\(s\) 0-1 not available \(allowed CPUs: 2-3,6-7\)"):
        plan(small, "--cores-list", "0-3")


# --- plan errors ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("flags, message", [
    (("--ninstances", "4", "--ncores-per-instance", "20"), r"= 80 cores, but only 56 are available"),
    (("--ninstances", "57"), r"--ninstances 57 needs at least 57 cores"),
    (("--ncores-per-instance", "57"), r"--ncores-per-instance 57 does not fit"),
    (("--ninstances", "0"), r"--ninstances must be at least 1"),
    (("--cores-list", "0-3,x"), r"bad --cores-list '0-3,x'"),
    (("--cores-list", "5-2"), r"goes downwards"),
    (("--nodes-list", "2"), r"node\(s\) 2 not available"),
    (("--instance-idx", "2", "--throughput-mode"), r"--instance-idx 2 is out of range: the plan has 2"),
    (("--instance-idx", "-1"), r"out of range"),
    (("--throughput-mode", "--ninstances", "2"), r"--throughput-mode chooses the instance sizes"),
    (("--latency-mode", "--ncores-per-instance", "2"), r"--latency-mode chooses"),
])
def test_plan_errors(flags, message):
    with pytest.raises(LauncherError, match=message):
        plan(server(), *flags)


def test_latency_mode_needs_four_cores():
    with pytest.raises(LauncherError, match="--latency-mode needs 4 cores per instance but only 2"):
        plan(CPUInfo.from_lscpu(CONTAINER, allowed={0, 1}), "--latency-mode")


# --- libraries and environment ---------------------------------------------------------------------------
@pytest.fixture
def libdir(tmp_path):
    d = tmp_path / "lib"
    d.mkdir()
    for name in ("libjemalloc.so.2", "libiomp5.so"):
        (d / name).write_bytes(b"")
    return str(d)


def test_library_search(libdir, tmp_path):
    empty = str(tmp_path)
    assert find_library(["libjemalloc.so", "libjemalloc.so.2"], [empty, libdir]) == libdir + "/libjemalloc.so.2"
    assert find_library(["libtcmalloc.so"], [libdir]) is None
    dirs = default_lib_dirs({"CONDA_PREFIX": "/opt/conda"})
    assert dirs[0] == os.path.join(sys.prefix, "lib") and dirs[1] == "/opt/conda/lib"
    assert dirs[-1].startswith("/usr/lib/") and dirs.index("/usr/local/lib") < dirs.index("/usr/lib")
    assert "/opt/conda/lib" not in default_lib_dirs({})


def test_choose_runtime(libdir, caplog):
    caplog.set_level(logging.INFO, logger="ipex_lite.launcher")
    assert choose_runtime("auto", "auto", [libdir]) == Runtime("jemalloc", "intel", libdir + "/libjemalloc.so.2",
                                                               libdir + "/libiomp5.so")
    assert "memory allocator: jemalloc" in caplog.text
    assert choose_runtime("auto", "auto", []) == Runtime("default", "default")
    assert choose_runtime("default", "default", [libdir]) == Runtime("default", "default")
    # an allocator the user already preloads is used as is
    assert choose_runtime("auto", "default", [libdir], "/opt/libtcmalloc.so.4") == Runtime("tcmalloc", "default")


@pytest.mark.parametrize("allocator, omp, needles", [
    ("tcmalloc", "default", ["libgoogle-perftools4", "gperftools", "libtcmalloc.so.4"]),
    ("jemalloc", "default", ["libjemalloc2", "conda install jemalloc"]),
    ("default", "intel", ["pip install intel-openmp", "libiomp5.so"]),
])
def test_missing_requested_library(tmp_path, allocator, omp, needles):
    with pytest.raises(LauncherError) as e:
        choose_runtime(allocator, omp, [str(tmp_path)])
    assert all(n in str(e.value) for n in needles), str(e.value)


def test_missing_allocator_through_main(tmp_path, capsys):
    rc = main(["--memory-allocator", "tcmalloc", "--dry-run", "x.py"], cpu_info=server(), lib_dirs=[str(tmp_path)],
              environ={})
    assert rc == 1 and "libgoogle-perftools4" in capsys.readouterr().err


def _env(libdir, allocator, omp, cores=(0, 1, 2, 3, 4, 5, 6), base=None, **kw):
    runtime = choose_runtime(allocator, omp, [libdir], (base or {}).get("LD_PRELOAD", ""))
    return resolve_env(instance_env(list(cores), runtime, 2, **kw), runtime, base or {})


def test_env_jemalloc_gnu_openmp(libdir):
    changes, kept = _env(libdir, "jemalloc", "default")
    assert kept == {}
    assert changes == {"LD_PRELOAD": libdir + "/libjemalloc.so.2", "MALLOC_CONF": JEMALLOC_CONF,
                       "OMP_NUM_THREADS": "7", "OMP_SCHEDULE": "STATIC", "OMP_PROC_BIND": "CLOSE",
                       "IPEX_LITE_INSTANCE_IDX": "2"}
    # IPEX's settings with decay off: a finite decay re-faults every large buffer
    assert JEMALLOC_CONF == ("oversize_threshold:1,background_thread:true,metadata_thp:auto,"
                             "dirty_decay_ms:-1,muzzy_decay_ms:-1")


def test_env_intel_openmp(libdir):
    changes, _ = _env(libdir, "auto", "auto", cores=[4, 5])
    assert changes == {"LD_PRELOAD": f"{libdir}/libiomp5.so:{libdir}/libjemalloc.so.2", "MALLOC_CONF": JEMALLOC_CONF,
                       "OMP_NUM_THREADS": "2", "KMP_AFFINITY": "granularity=fine,compact,1,0", "KMP_BLOCKTIME": "1",
                       "IPEX_LITE_INSTANCE_IDX": "2"}
    unbound, _ = _env(libdir, "default", "intel", cores=[4, 5], bound=False)
    assert unbound["KMP_AFFINITY"] == "granularity=fine,proclist=[4,5],explicit"


def test_env_unbound_gnu_openmp_names_the_cpus(libdir):
    changes, _ = _env(libdir, "default", "default", cores=[0, 1, 2, 56, 57], bound=False)
    assert changes == {"OMP_NUM_THREADS": "5", "OMP_SCHEDULE": "STATIC", "OMP_PROC_BIND": "CLOSE",
                       "GOMP_CPU_AFFINITY": "0-2,56-57", "IPEX_LITE_INSTANCE_IDX": "2"}


def test_env_user_settings_win_except_ld_preload(libdir):
    base = {"OMP_NUM_THREADS": "3", "MALLOC_CONF": "narenas:1", "OMP_SCHEDULE": "STATIC",
            "LD_PRELOAD": "/x/libfoo.so /y/libbar.so:" + libdir + "/libjemalloc.so.2",
            "IPEX_LITE_INSTANCE_IDX": "9"}
    changes, kept = _env(libdir, "jemalloc", "default", base=base)
    # jemalloc is already preloaded by the user: nothing added, entries normalised to colons
    assert changes == {"LD_PRELOAD": f"/x/libfoo.so:/y/libbar.so:{libdir}/libjemalloc.so.2",
                       "OMP_PROC_BIND": "CLOSE", "IPEX_LITE_INSTANCE_IDX": "2"}
    assert kept == {"OMP_NUM_THREADS": ("3", "7"), "MALLOC_CONF": ("narenas:1", JEMALLOC_CONF)}
    assert merge_preload(["/a.so", "/b.so"], "/b.so:/c.so") == "/a.so:/b.so:/c.so"


def test_user_setting_warning_through_main(libdir, capsys):
    flags = ["--memory-allocator", "jemalloc", "--omp-runtime", "default", "--ninstances", "2", "--dry-run", "x.py"]
    rc = main(flags, cpu_info=server(), lib_dirs=[libdir], which=lambda n: None,
              environ={"OMP_NUM_THREADS": "5", "LD_PRELOAD": "/x/libfoo.so"})
    out, err = capsys.readouterr()
    assert rc == 0
    assert err.count("OMP_NUM_THREADS=5 is already set in the environment; keeping it") == 1
    assert "OMP_NUM_THREADS=" not in out
    assert out.count(f"LD_PRELOAD={libdir}/libjemalloc.so.2:/x/libfoo.so") == 2
    assert "GOMP_CPU_AFFINITY=0-27" in out and "GOMP_CPU_AFFINITY=28-55" in out  # no numactl/taskset here


# --- command lines -------------------------------------------------------------------------------------
def test_program_args_pass_through():
    args = build_parser().parse_args(["--ninstances", "2", "script.py", "--foo", "1", "--ninstances", "9"])
    assert args.ninstances == 2 and args.program == "script.py"
    assert args.program_args == ["--foo", "1", "--ninstances", "9"]
    # a program option that is only a prefix of a launcher flag is the program's (no abbreviations)
    args = build_parser().parse_args(["script.py", "--n", "3", "--log", "x"])
    assert args.ninstances is None and args.program_args == ["--n", "3", "--log", "x"]
    with pytest.raises(SystemExit):
        build_parser().parse_args(["--ninst", "2", "script.py"])


def test_build_argv():
    info = server()
    parse = build_parser().parse_args
    inst = plan_instances(info, parse(["--throughput-mode", "x.py"]))[1]
    assert build_argv(inst, parse(["s.py", "-v"]), "numactl", "py") == ["numactl", "-C", "28-55", "py", "s.py", "-v"]
    assert build_argv(inst, parse(["--bind-numa-node", "s.py"]), "numactl", "py") == \
        ["numactl", "-C", "28-55", "-m", "1", "py", "s.py"]
    assert build_argv(inst, parse(["-m", "pkg.mod", "a"]), "taskset", "py") == \
        ["taskset", "-c", "28-55", "py", "-m", "pkg.mod", "a"]
    assert build_argv(inst, parse(["--no-python", "./bin", "--x"]), "none", "py") == ["./bin", "--x"]
    assert build_argv(inst, parse(["--log-dir", "d", "s.py"]), "none", "py") == ["py", "-u", "s.py"]
    assert log_path(parse(["--log-dir", "d", "--log-file-prefix", "p", "s.py"]), inst) == \
        os.path.join("d", "p_instance_1_cores_28-55.log")


def test_conflicting_program_kinds():
    assert main(["-m", "--no-python", "x"]) == 2


def test_help_has_examples(capsys):
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    assert "examples:" in out and "--throughput-mode --bind-numa-node" in out


def test_dry_run_throughput_server(libdir, capsys):
    rc = main(["--throughput-mode", "--bind-numa-node", "--dry-run", "bench.py", "--batch", "8"], cpu_info=server(),
              lib_dirs=[libdir], which=lambda n: f"/usr/bin/{n}", environ={})
    out = capsys.readouterr().out
    assert rc == 0
    lines = [line for line in out.splitlines() if line.strip().startswith("cmd:")]
    assert len(lines) == 2
    assert "numactl -C 0-27 -m 0 " in lines[0] and lines[0].endswith("bench.py --batch 8")
    assert "numactl -C 28-55 -m 1 " in lines[1]
    assert "OMP_NUM_THREADS=28" in out and "KMP_AFFINITY=granularity=fine,compact,1,0" in out


def test_worst_exit_code():
    assert worst_exit_code([0, 0]) == 0
    assert worst_exit_code([0, 3, 1]) == 3
    assert worst_exit_code([2, -9]) == 137  # killed by SIGKILL
    assert worst_exit_code([]) == 0


# --- real runs on this machine ----------------------------------------------------------------------------
def _clean_env():
    drop = ("OMP_", "KMP_", "GOMP_", "MALLOC_CONF", "LD_PRELOAD", "IPEX_LITE_INSTANCE_IDX")
    return {k: v for k, v in os.environ.items() if not k.startswith(drop)}


def _launcher(*flags):
    return [sys.executable, "-m", "ipex_lite.launcher", *flags]


def test_e2e_jemalloc_taskset(tmp_path):
    from ipex_lite.launcher.env import LIBS
    if find_library(LIBS["jemalloc"], default_lib_dirs()) is None:
        pytest.skip("no jemalloc library found by the launcher (Debian/Ubuntu: apt install libjemalloc2)")
    script = tmp_path / "probe.py"
    script.write_text(textwrap.dedent("""\
        import json, os, sys, torch
        maps = open("/proc/self/maps").read()
        print(json.dumps({"jemalloc": "jemalloc" in maps, "threads": torch.get_num_threads(),
                          "affinity": sorted(os.sched_getaffinity(0)), "argv": sys.argv[1:],
                          "idx": os.environ.get("IPEX_LITE_INSTANCE_IDX")}))
        """))
    r = subprocess.run(_launcher("--memory-allocator", "jemalloc", "--ninstances", "1", "--ncores-per-instance", "1",
                                 "--multi-task-manager", "taskset", str(script), "--flag", "x"),
                       capture_output=True, text=True, env=_clean_env(), timeout=120)
    assert r.returncode == 0, r.stderr
    result = json.loads(r.stdout.strip().splitlines()[-1])
    assert result["jemalloc"] is True
    assert result["threads"] == 1
    assert len(result["affinity"]) == 1
    assert result["argv"] == ["--flag", "x"] and result["idx"] == "0"


@pytest.mark.parametrize("flags", [(), ("--benchmark",)])
def test_e2e_jemalloc_keeps_large_buffers_mapped(tmp_path, flags):
    """With or without --benchmark, a steady-state loop that frees and reallocates a
    big buffer pays no page faults (measured with getrusage in the child)."""
    from ipex_lite.launcher.env import LIBS
    if find_library(LIBS["jemalloc"], default_lib_dirs()) is None:
        pytest.skip("no jemalloc library found by the launcher (Debian/Ubuntu: apt install libjemalloc2)")
    script = tmp_path / "faults.py"
    script.write_text(textwrap.dedent("""\
        import json, resource, torch
        torch.zeros(100_000, 128)
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        for _ in range(10):
            torch.zeros(100_000, 128)  # 51 MB, freed at once
        print(json.dumps({"faults": resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before}))
        """))
    r = subprocess.run(_launcher("--memory-allocator", "jemalloc", *flags, "--ninstances", "1",
                                 "--ncores-per-instance", "1", str(script)),
                       capture_output=True, text=True, env=_clean_env(), timeout=120)
    assert r.returncode == 0, r.stderr
    faults = json.loads(r.stdout.strip().splitlines()[-1])["faults"]
    assert faults < 1000, f"{faults} page faults for 10 reallocations of 51 MB (12.5K each when purged)"


def test_e2e_log_dir_and_worst_exit_code(tmp_path):
    if len(os.sched_getaffinity(0)) < 2:
        pytest.skip("needs 2 allowed CPUs")
    script = tmp_path / "exit.py"
    script.write_text("import os, sys\nidx = int(os.environ['IPEX_LITE_INSTANCE_IDX'])\n"
                      "print('instance', idx, 'cpus', sorted(os.sched_getaffinity(0)))\n"
                      "sys.exit(3 if idx == 1 else 0)\n")
    logs = tmp_path / "logs"
    r = subprocess.run(_launcher("--ninstances", "2", "--ncores-per-instance", "1", "--memory-allocator", "default",
                                 "--log-dir", str(logs), "--log-file-prefix", "t", str(script)),
                       capture_output=True, text=True, env=_clean_env(), timeout=120)
    assert r.returncode == 3, r.stderr
    cpus = sorted(os.sched_getaffinity(0))[:2]
    files = sorted(os.listdir(logs))
    assert files == [f"t_instance_{i}_cores_{c}-{c}.log" for i, c in enumerate(cpus)]
    for i, name in enumerate(files):
        assert (logs / name).read_text().startswith(f"instance {i} cpus [{cpus[i]}]")
        assert str(logs / name) in r.stderr  # the launcher prints where each log goes


def test_e2e_sigterm_is_forwarded(tmp_path):
    ready = tmp_path / "ready"
    script = tmp_path / "sleep.py"
    script.write_text(f"import time\nopen({str(ready)!r}, 'w').close()\ntime.sleep(60)\n")
    p = subprocess.Popen(_launcher("--memory-allocator", "default", "--multi-task-manager", "none", str(script)),
                         env=_clean_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 60
        while not ready.exists():
            assert p.poll() is None and time.monotonic() < deadline, p.communicate()
            time.sleep(0.05)
        p.send_signal(signal.SIGTERM)
        assert p.wait(timeout=30) == 128 + signal.SIGTERM
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
