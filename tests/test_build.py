"""Build, ISA dispatch, env override, doctor and import hygiene of ipex_lite."""
import json
import os
import shutil
import subprocess
import sys

import pytest
import torch

import ipex_lite
from ipex_lite import doctor

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LEVELS = ["default", "avx2", "avx512", "avx512_bf16", "amx"]
PROBE = "import ipex_lite; print(ipex_lite.cpu_capability())"


def rank(level):
    return LEVELS.index(level)


def run_python(args, isa=None, timeout=120):
    """Run sys.executable in a clean-ish env (IPEX_LITE_ISA set only when isa is given)."""
    env = dict(os.environ)
    env.pop("IPEX_LITE_ISA", None)
    if isa is not None:
        env["IPEX_LITE_ISA"] = isa
    env["PYTHONPATH"] = ROOT + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    return subprocess.run([sys.executable, *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=timeout)


@pytest.fixture(scope="module")
def info():
    return ipex_lite.isa_info()


@pytest.fixture(scope="module")
def auto_level(info):
    """The level a process picks with IPEX_LITE_ISA unset: min(cpu, built)."""
    return LEVELS[min(rank(info["cpu_level"]), rank(info["built_level"]))]


# ----------------------------------------------------------------------------- levels

def test_cpu_capability_valid_and_matches_isa_info(info):
    cap = ipex_lite.cpu_capability()
    assert cap in LEVELS
    assert cap == info["active_level"]
    for key in ("cpu_level", "built_level", "active_level"):
        assert info[key] in LEVELS, (key, info[key])


def test_isa_info_keys(info):
    expected = {"vendor", "brand", "cpu_level", "built_level", "active_level", "avx2", "fma", "f16c",
                "avx512f", "avx512bw", "avx512vl", "avx512dq", "avx512_bf16", "avx512_vnni",
                "avx512_fp16", "avx_vnni", "amx_tile", "amx_bf16", "amx_int8", "os_avx512", "os_amx"}
    assert expected <= set(info)


def test_active_not_above_cpu_or_build(info):
    active = rank(info["active_level"])
    assert active <= min(rank(info["cpu_level"]), rank(info["built_level"]))


def test_cpu_level_consistent_with_flags(info):
    level = rank(info["cpu_level"])
    if level >= rank("avx2"):
        assert info["avx2"] and info["fma"]
    if level >= rank("avx512"):
        assert info["avx512f"] and info["avx512bw"] and info["avx512vl"] and info["avx512dq"]
    if level >= rank("avx512_bf16"):
        assert info["avx512_bf16"]
    if level >= rank("amx"):
        assert info["amx_tile"] and info["amx_bf16"] and info["amx_int8"] and info["os_amx"] and info["amx_permitted"]


def test_amx_is_named_when_cpu_and_os_have_it(info):
    """An AMX host reports 'amx' (not 'avx512_bf16') as its CPU level and, built with AMX flags, as
    cpu_capability(); the amx level runs the avx512_bf16 kernels, so every op works there."""
    amx = all(info[k] for k in ("avx512_bf16", "amx_tile", "amx_bf16", "amx_int8", "os_amx", "amx_permitted"))
    assert (info["cpu_level"] == "amx") == (amx and rank(info["cpu_level"]) >= rank("avx512_bf16"))
    if amx and info["built_level"] == "amx":
        assert ipex_lite.cpu_capability() == "amx" or os.environ.get("IPEX_LITE_ISA")
    r = run_python(["-c", "import torch, ipex_lite; print(ipex_lite.cpu_capability()); "
                          "print(torch.ops.ipex_lite.interaction_forward([torch.ones(2, 16)] * 3).sum().item())"],
                   isa="amx")
    assert r.returncode == 0, r.stderr
    level, total = r.stdout.split()
    assert level == ("amx" if amx and info["built_level"] == "amx" else
                     LEVELS[min(rank(info["cpu_level"]), rank(info["built_level"]))])
    assert float(total) > 0


def _supported_levels():
    i = ipex_lite.isa_info()
    top = min(rank(i["cpu_level"]), rank(i["built_level"]))
    return LEVELS[:top + 1]


@pytest.mark.parametrize("level", _supported_levels())
def test_env_override_selects_level(level):
    r = run_python(["-c", PROBE], isa=level)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == level
    assert "ipex_lite: IPEX_LITE_ISA=" not in r.stderr


def test_env_unset_uses_auto_level(auto_level):
    r = run_python(["-c", PROBE])
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == auto_level


def test_env_invalid_value_warns_and_falls_back(auto_level):
    r = run_python(["-c", PROBE], isa="foo")
    assert r.returncode == 0, r.stderr
    assert "ipex_lite: IPEX_LITE_ISA='foo' is not one of" in r.stderr
    assert r.stdout.strip() == auto_level


def test_env_above_supported_is_clamped(auto_level):
    above = LEVELS[rank(auto_level) + 1:]
    if not above:
        pytest.skip(f"this CPU and build support the top level ({auto_level}); nothing to clamp")
    for level in above:
        r = run_python(["-c", PROBE], isa=level)
        assert r.returncode == 0, r.stderr
        assert r.stdout.strip() == auto_level
        assert "ipex_lite: IPEX_LITE_ISA=" in r.stderr


# ----------------------------------------------------------------------------- doctor

def test_doctor_text_report():
    r = run_python(["-m", "ipex_lite.doctor"])
    assert r.returncode == 0, r.stderr
    out = r.stdout
    for field in ("torch", "oneDNN", "python", "CPU ISA level", "built level", "active level",
                  "IPEX_LITE_ISA", "AVX512_BF16", "AMX", "OpenMP runtime", "allocator",
                  "Recommendations"):
        assert field in out, field
    assert torch.__version__ in out
    assert ipex_lite.cpu_capability() in out


def test_doctor_json():
    r = run_python(["-m", "ipex_lite.doctor", "--json"], isa="default")
    assert r.returncode == 0, r.stderr
    data = json.loads(r.stdout)
    for key in ("versions", "cpu", "features", "openmp", "allocator", "topology", "numa_nodes",
                "recommendations"):
        assert key in data, key
    assert data["versions"]["torch"] == torch.__version__
    assert data["cpu"]["active_level"] == "default"
    assert data["cpu"]["ipex_lite_isa_env"] == "default"
    assert data["openmp"]["torch_num_threads"] >= 1
    assert isinstance(data["recommendations"], list) and data["recommendations"]
    if rank(data["cpu"]["cpu_level"]) > 0:
        assert any("lower than this CPU" in s for s in data["recommendations"])


def test_doctor_collect_in_process():
    info = doctor.collect()
    json.dumps(info)  # serialisable
    assert info["cpu"]["active_level"] == ipex_lite.cpu_capability()
    assert isinstance(doctor.recommendations(info), list)


def _fake_info(amx):
    return {
        "cpu": {"cpu_level": "avx512_bf16", "built_level": "avx512_bf16",
                "active_level": "avx512_bf16", "ipex_lite_isa_env": None},
        "features": {"avx2": True, "fma": True, "avx512f": True, "avx512bw": True, "avx512vl": True,
                     "avx512dq": True, "avx512_bf16": True, "avx512_vnni": True,
                     "amx_tile": amx, "amx_bf16": amx, "amx_int8": amx},
        "openmp": {"torch_num_threads": 4, "env": {"OMP_NUM_THREADS": "4"}, "runtime": None},
        "allocator": {"preloaded": True, "in_use": "jemalloc"},
        "topology": {"affinity_cpus": 4, "physical_cores_in_affinity": 4},
        "numa_nodes": [],
    }


def test_recommendations_without_amx():
    recs = doctor.recommendations(_fake_info(amx=False))
    text = "\n".join(recs)
    assert "no AMX" in text
    assert "bf16 matmul will not beat fp32" in text
    assert "AMX present" not in text
    # Allocator preloaded and OMP_NUM_THREADS set: no advice about them.
    assert "LD_PRELOAD" not in text
    assert "OMP_NUM_THREADS is unset" not in text


def test_recommendations_with_amx():
    recs = doctor.recommendations(_fake_info(amx=True))
    text = "\n".join(recs)
    assert "AMX present: bf16/int8 GEMMs are fast" in text
    assert "no AMX" not in text


def test_recommendations_allocator_threads_and_level():
    info = _fake_info(amx=False)
    info["allocator"] = {"preloaded": False, "in_use": "default (glibc malloc)"}
    info["openmp"]["env"] = {}
    info["cpu"]["active_level"] = "avx2"
    info["cpu"]["ipex_lite_isa_env"] = "avx2"
    text = "\n".join(doctor.recommendations(info))
    assert "libjemalloc.so.2" in text and "libtcmalloc.so.4" in text
    assert "OMP_NUM_THREADS is unset" in text
    assert "lower than this CPU" in text and "IPEX_LITE_ISA=avx2" in text


def test_doctor_survives_missing_proc_and_sys(monkeypatch):
    monkeypatch.setattr(doctor, "_read", lambda path: None)
    monkeypatch.setattr(doctor.glob, "glob", lambda pattern: [])
    monkeypatch.delattr(doctor.os, "sched_getaffinity", raising=False)
    info = doctor.collect()
    assert info["numa_nodes"] == []
    assert info["topology"]["affinity_cpus"] >= 1
    assert doctor.format_report(info, doctor.recommendations(info))


def test_recommendations_tolerate_empty_info():
    assert isinstance(doctor.recommendations({}), list)


# ----------------------------------------------------------------------------- ops and import hygiene

def test_ops_registered():
    ops = torch.ops.ipex_lite
    for name in ("interaction_forward", "interaction_backward"):
        assert hasattr(ops, name), name
    schema = str(ops.interaction_forward.default._schema)
    assert "Tensor[] inputs" in schema
    assert "Tensor[] inputs" in str(ops.interaction_backward.default._schema)


NO_PATCH_PROBE = r"""
import torch, torch.nn.functional as F

def snapshot():
    out = {}
    for name, obj in (("F", F), ("Tensor", torch.Tensor), ("TensorBase", torch._C.TensorBase),
                      ("Module", torch.nn.Module)):
        out[name] = {k: id(v) for k, v in vars(obj).items()}
    out["torch"] = {k: id(getattr(torch, k)) for k in ("matmul", "bmm", "cat", "compile", "autocast")}
    return out

before = snapshot()
keep = [F, torch.Tensor]  # hold references so ids cannot be reused
import ipex_lite, ipex_lite.nn.functional  # noqa: F401
after = snapshot()
bad = []
for group in before:
    for k, v in before[group].items():
        if after[group].get(k) != v:
            bad.append(f"{group}.{k} changed")
    for k in set(after[group]) - set(before[group]):
        bad.append(f"{group}.{k} added")
print("PATCHED:" + ";".join(sorted(bad)) if bad else "CLEAN")
"""


def test_import_does_not_monkey_patch_torch():
    r = run_python(["-c", NO_PATCH_PROBE])
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "CLEAN", r.stdout


# ----------------------------------------------------------------------------- compiled code

def _functions_with(insn_prefix):
    """Demangled names of the functions of ipex_lite._C whose code holds an instruction starting with insn_prefix."""
    objdump = shutil.which("objdump")
    if objdump is None:
        pytest.skip("objdump (binutils) not installed")
    r = subprocess.run([objdump, "-d", "-C", "--no-show-raw-insn", ipex_lite._C.__file__],
                       capture_output=True, text=True, check=True)
    found, current = set(), None
    for line in r.stdout.splitlines():
        if line.endswith(">:"):
            current = line[line.index("<") + 1:-2]
        elif current is not None and "\t" + insn_prefix in line:
            found.add(current)
    return found


@pytest.mark.skipif(os.uname().machine != "x86_64", reason="x86 prefetch instructions")
def test_kernels_keep_their_software_prefetches():
    # GCC 12 once deleted every prefetch of the embedding forward (a split
    # helper judged side-effect free): the random row gathers then ran at
    # memory latency, bf16 slower than stock.
    funcs = _functions_with("prefetch")
    for kernel in ("forward_impl<float", "forward_impl<unsigned short", "update_impl<float"):
        assert any(kernel in f for f in funcs), f"no prefetch instruction left in {kernel}"


# ----------------------------------------------------------------------------- linking (issue 22)

def test_built_module_links_the_process_libstdcxx():
    """_C must list libstdc++.so.6 as NEEDED and define none of libstdc++'s internals: a private
    copy formats numbers through locale facets the process never registered."""
    from ipex_lite import _C, _linkcheck
    result = _linkcheck.check(_C.__file__)
    assert result["ok"] is True, result["problem"]
    assert "libstdc++.so.6" in result["needed"]
    assert "libgcc_s.so.1" in result["needed"] or not any("gcc" in n for n in result["needed"])
    assert result["internals"] == []


def test_error_message_with_numbers_arrives_complete():
    with pytest.raises(RuntimeError) as e:
        torch.ops.ipex_lite.interaction_forward([torch.randn(4, 8), torch.randn(5, 8)])
    assert "interaction_forward: inputs[1] has batch size 5 but inputs[0] has 4" in str(e.value)
    # wide and negative int64 values take the same formatting path
    w = torch.randn(10, 4)
    for bad in (12345678901, -7):
        with pytest.raises(RuntimeError) as e:
            torch.ops.ipex_lite.merged_embedding_bag_forward([w], [torch.tensor([0, bad])], [torch.tensor([0])], 0,
                                                             False, [])
        assert f"indices[0][1] = {bad} is out of range for table 0 with 10 rows" in str(e.value)


@pytest.fixture(scope="module")
def tiny_libs(tmp_path_factory):
    """A C++ shared object linked with and without -static-libstdc++ (the broken build's recipe)."""
    cxx = shutil.which("g++") or shutil.which("c++")
    if cxx is None:
        pytest.skip("no C++ compiler")
    d = tmp_path_factory.mktemp("link")
    src = d / "fmt.cpp"
    src.write_text("#include <sstream>\n#include <string>\n"
                   "std::string fmt(unsigned long v) { std::ostringstream s; s << v; return s.str(); }\n")
    out = {}
    for name, flags in (("dynamic", []), ("static", ["-static-libstdc++", "-static-libgcc"])):
        so = d / f"{name}.so"
        r = subprocess.run([cxx, "-shared", "-fPIC", *flags, str(src), "-o", str(so)], capture_output=True, text=True)
        if r.returncode != 0:
            pytest.skip(f"{cxx} cannot build the probe: {r.stderr[-300:]}")
        out[name] = str(so)
    return out


def test_link_check_refuses_a_private_libstdcxx(tiny_libs):
    from ipex_lite import _linkcheck
    good = _linkcheck.check(tiny_libs["dynamic"])
    assert good["ok"] is True and "libstdc++.so.6" in good["needed"], good
    bad = _linkcheck.check(tiny_libs["static"])
    assert bad["ok"] is False
    assert "libstdc++.so.6" not in bad["needed"]
    assert any(s.startswith("_ZNSo9_M_insertI") for s in bad["internals"]), bad["internals"][:5]
    for words in ("is not among its NEEDED libraries", "defines libstdc++ internals", "-static-libstdc++",
                  "LDFLAGS", "rebuild"):
        assert words in bad["problem"], words


def test_link_check_on_a_file_that_is_not_elf(tmp_path):
    from ipex_lite import _linkcheck
    p = tmp_path / "x.so"
    p.write_bytes(b"not an elf")
    r = _linkcheck.check(str(p))
    assert r["ok"] is None and "not an ELF file" in r["problem"]
    assert _linkcheck.check(str(tmp_path / "missing.so"))["ok"] is None


def test_doctor_reports_the_link_check():
    info = doctor.collect()
    assert info["build"]["ok"] is True, info["build"]
    text = doctor.format_report(info, doctor.recommendations(info))
    assert "linked dynamically" in text and "libstdc++.so.6" in text
    broken = dict(info, build={"ok": False, "problem": "_C.so: libstdc++.so.6 is not among its NEEDED libraries"})
    recs = doctor.recommendations(broken)
    assert any(r.startswith("BROKEN BUILD:") and "NEEDED" in r for r in recs)
    assert "PRIVATE COPY" in doctor.format_report(broken, recs)


def test_setup_drops_static_runtime_flags_from_the_environment():
    """setup.py's flag filter, run in a child that imports setup.py's helpers without building."""
    code = (
        "import os, runpy, sys, setuptools\n"
        "setuptools.setup = lambda **kw: None\n"  # the module calls setup() at the end
        "os.environ['LDFLAGS'] = '-L/opt/x -static-libstdc++ -Wl,-O1 -static-libgcc'\n"
        "os.environ['CFLAGS'] = '-O2 -static'\n"
        "g = runpy.run_path('setup.py')\n"
        "print(os.environ['LDFLAGS']); print(os.environ['CFLAGS'])\n"
        "print(g['_without_static'](['g++', '-shared', '-static', '-o', 'x'], 'test'))\n")
    r = run_python(["-c", code])
    assert r.returncode == 0, r.stderr
    ldflags, cflags, cmd = r.stdout.strip().splitlines()[-3:]
    assert ldflags == "-L/opt/x -Wl,-O1" and cflags == "-O2"
    assert cmd == "['g++', '-shared', '-o', 'x']"
    assert "ignoring -static-libstdc++ -static-libgcc from LDFLAGS" in r.stderr
