"""Build of ipex_lite._C against the torch that is installed (2.8 or newer).

Op files (csrc/ops, csrc/dispatch, csrc/module.cpp) are compiled once with the
baseline flags.  Kernel files (csrc/kernels/*_kernel.cpp) include no torch
headers and are compiled once per ISA level, each into its own namespace, with
that level's -m flags; the runtime picks a level with cpuid (csrc/dispatch).
"""
import glob
import importlib.util
import os
import subprocess
import sys
import tempfile

from setuptools import find_packages, setup
from setuptools.errors import LinkError
from torch.utils.cpp_extension import BuildExtension, CppExtension

ROOT = os.path.dirname(os.path.abspath(__file__))


def _load_linkcheck():
    # by path: importing the ipex_lite package needs the very module being built
    spec = importlib.util.spec_from_file_location("_ipex_lite_linkcheck", os.path.join(ROOT, "ipex_lite", "_linkcheck.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


linkcheck = _load_linkcheck()

# libstdc++ and libgcc are always linked dynamically (DESIGN.md, "Building"): a private copy of
# libstdc++ in _C has its own locale facet ids and the first number formatted into a TORCH_CHECK
# message crashes or is cut.  These flags are dropped from wherever the build environment brings
# them (environment variables, sysconfig's LDSHARED/CFLAGS), and the linked module is verified.
STATIC_RUNTIME_FLAGS = {"-static", "-static-libstdc++", "-static-libgcc", "-static-pie"}
FLAG_VARIABLES = ("LDFLAGS", "CFLAGS", "CXXFLAGS", "CPPFLAGS", "LDSHARED", "LDCXXSHARED", "CC", "CXX")


def _without_static(args, origin):
    kept = [a for a in args if a not in STATIC_RUNTIME_FLAGS]
    dropped = [a for a in args if a in STATIC_RUNTIME_FLAGS]
    if dropped:
        print(f"ipex_lite: ignoring {' '.join(dropped)} from {origin}: libstdc++ and libgcc are linked "
              "dynamically (a private libstdc++ breaks error messages)", file=sys.stderr)
    return kept


def _clean_environment():
    import shlex
    for var in FLAG_VARIABLES:
        value = os.environ.get(var)
        if value:
            args = shlex.split(value)
            kept = _without_static(args, var)
            if kept != args:
                os.environ[var] = shlex.join(kept)


_clean_environment()

# Order matters: each level is a superset of the previous one.
ISA_LEVELS = [
    ("default", []),
    ("avx2", ["-mavx2", "-mfma", "-mf16c"]),
    ("avx512", ["-mavx2", "-mfma", "-mf16c", "-mavx512f", "-mavx512bw",
                "-mavx512vl", "-mavx512dq", "-mprefer-vector-width=512"]),
    ("avx512_bf16", ["-mavx2", "-mfma", "-mf16c", "-mavx512f", "-mavx512bw",
                     "-mavx512vl", "-mavx512dq", "-mavx512bf16", "-mavx512vnni",
                     "-mprefer-vector-width=512"]),
]
# Levels that run another level's kernel objects (csrc/dispatch/isa.h): no kernel of ours uses AMX
# tiles yet, so amx is avx512_bf16 on a CPU and OS with AMX; it is built when the compiler accepts
# the AMX flags, which a tile kernel will be compiled with.
ALIAS_LEVELS = [
    ("amx", "avx512_bf16", ISA_LEVELS[-1][1] + ["-mamx-tile", "-mamx-bf16", "-mamx-int8"]),
]
# -Wno-(maybe-)uninitialized: GCC 12 false positives inside its own avx512 intrinsics
# (the _mm512_undefined_* placeholders); kernel files only.
KERNEL_CFLAGS = ["-O3", "-fno-math-errno", "-fno-trapping-math", "-Wno-maybe-uninitialized", "-Wno-uninitialized"]
OP_CFLAGS = ["-O2", "-Wall", "-Wno-unknown-pragmas"]
# at::parallel_for is header code: op files must see _OPENMP to run in torch's
# OpenMP pool.  The libgomp.so.1 we link against resolves at run time to the
# one torch already loaded (same SONAME), so there is a single thread pool.
OPENMP_FLAGS = ["-fopenmp"]
# `make sanitize`: AddressSanitizer + UndefinedBehaviorSanitizer on every object (UB is fatal)
SANITIZE_FLAGS = (["-fsanitize=address,undefined", "-fno-sanitize-recover=undefined", "-fno-omit-frame-pointer", "-g"]
                  if os.environ.get("IPEX_LITE_SANITIZE") == "1" else [])
KERNEL_CFLAGS += SANITIZE_FLAGS
OP_CFLAGS += SANITIZE_FLAGS


def _is_x86():
    import platform
    return platform.machine().lower() in ("x86_64", "amd64", "i686", "x86")


def _compiler_accepts(flags):
    """True when $CXX can compile a file with these flags (old compilers lack avx512bf16)."""
    if not flags:
        return True
    # The compiler the build will use: $CXX, else the one Python was built with.
    import shlex
    import sysconfig
    cxx = os.environ.get("CXX") or (shlex.split(sysconfig.get_config_var("CXX") or "c++") or ["c++"])[0]
    with tempfile.TemporaryDirectory() as d:
        src = os.path.join(d, "probe.cpp")
        with open(src, "w") as f:
            f.write("#include <immintrin.h>\nint main() { return 0; }\n")
        cmd = [cxx, *flags, "-c", src, "-o", os.path.join(d, "probe.o")]
        return subprocess.run(cmd, capture_output=True).returncode == 0


def built_levels():
    if not _is_x86():
        return [ISA_LEVELS[0]]
    levels = []
    for name, flags in ISA_LEVELS:
        if not _compiler_accepts(flags):
            print(f"ipex_lite: compiler rejects {flags}; ISA levels from {name} up are not built",
                  file=sys.stderr)
            break
        levels.append((name, flags))
    for name, runs, flags in ALIAS_LEVELS:
        if levels[-1][0] == runs and _compiler_accepts(flags):
            levels.append((name, None))  # None: no kernel objects of its own
    return levels


class BuildWithIsaKernels(BuildExtension):
    """Compiles every kernel file once per ISA level before the normal build.

    Each level gets its own ninja file under build_temp/isa_<level>, so an
    incremental rebuild recompiles only what changed.
    """

    levels = ISA_LEVELS

    def _clean_compiler(self):
        # what sysconfig (Python's own build flags) brings, after the environment was cleaned
        for attr in ("compiler", "compiler_so", "compiler_cxx", "compiler_so_cxx", "linker_so",
                     "linker_so_cxx", "linker_exe", "linker_exe_cxx"):
            cmd = getattr(self.compiler, attr, None)
            if isinstance(cmd, list):
                setattr(self.compiler, attr, _without_static(cmd, f"the compiler's {attr} (sysconfig)"))

    def _verify_link(self, ext):
        path = self.get_ext_fullpath(ext.name)
        result = linkcheck.check(path)
        if result["ok"] is False:
            os.remove(path)  # never leave it to be copied in place or picked up as up to date
            raise LinkError(f"ipex_lite: the linked extension is unusable: {result['problem']}")
        if result["ok"] is None:
            print(f"ipex_lite: link check skipped: {result['problem']}", file=sys.stderr)

    def build_extension(self, ext):
        self._clean_compiler()
        ext.extra_link_args = _without_static(list(ext.extra_link_args or []), "extra_link_args")
        kernel_sources = sorted(os.path.relpath(p, ROOT)
                                for p in glob.glob(os.path.join(ROOT, "csrc", "kernels", "*_kernel.cpp")))
        base = ext.extra_compile_args
        base = list(base["cxx"] if isinstance(base, dict) else base)
        base = [f for f in base if f not in OP_CFLAGS and f not in OPENMP_FLAGS]
        objects = []
        for name, flags in self.levels:
            if flags is None:
                continue
            objects += self.compiler.compile(
                kernel_sources,
                output_dir=os.path.join(self.build_temp, f"isa_{name}"),
                macros=[("IPEX_LITE_ISA_NS", "default_isa" if name == "default" else name)],
                include_dirs=ext.include_dirs,
                extra_postargs=base + KERNEL_CFLAGS + flags,
            )
        ext.extra_objects = list(ext.extra_objects or []) + objects
        super().build_extension(ext)
        self._verify_link(ext)


def make_extension(levels):
    sources = sorted(glob.glob("csrc/module.cpp") + glob.glob("csrc/dispatch/*.cpp")
                     + glob.glob("csrc/ops/*.cpp") + glob.glob("csrc/runtime/*.cpp"))
    names = [n for n, _ in levels]
    macros = [(f"IPEX_LITE_HAS_{n.upper()}", "1") for n in names]
    return CppExtension(
        name="ipex_lite._C",
        sources=sources,
        include_dirs=[os.path.join(ROOT, "csrc")],
        define_macros=macros,
        extra_compile_args={"cxx": list(OP_CFLAGS) + OPENMP_FLAGS},
        extra_link_args=OPENMP_FLAGS + SANITIZE_FLAGS,
        language="c++",  # link with the C++ driver, which adds libstdc++ as a NEEDED library
        # Kernel objects are linked in as extra_objects: list their sources so a
        # kernel-only change relinks the module.
        depends=glob.glob("csrc/**/*.h", recursive=True) + glob.glob("csrc/kernels/*.cpp"),
    )


LEVELS = built_levels()
BuildWithIsaKernels.levels = LEVELS

setup(
    # the launcher lives in the top-level launcher/ directory and installs as ipex_lite.launcher
    packages=find_packages(include=["ipex_lite", "ipex_lite.*"]) + ["ipex_lite.launcher"],
    package_dir={"ipex_lite.launcher": "launcher"},
    ext_modules=[make_extension(LEVELS)],
    cmdclass={"build_ext": BuildWithIsaKernels.with_options(use_ninja=True)},
)
