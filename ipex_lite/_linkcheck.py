"""Checks that a built ipex_lite._C uses the process's libstdc++, not a copy of its own.

A ``_C`` linked with ``-static-libstdc++`` carries private copies of libstdc++'s locale
facets; the first number formatted into a TORCH_CHECK message then goes through facet ids
the process's libstdc++ never registered, and the message is cut or the process crashes.
``setup.py`` runs this after linking (and fails the build), ``python -m ipex_lite.doctor``
runs it on the installed module.

Standard library only, and no import of ipex_lite or torch: setup.py loads this file by
path before either is importable.
"""
import os
import struct
from typing import Dict, List, Optional, Tuple

# Symbols that only a linked-in libstdc++ defines: the locale machinery and the ostream
# inserters that libstdc++ instantiates itself (extern templates, never emitted by user code).
STDCXX_INTERNALS = (
    "_ZNSt6locale",         # std::locale members (ids, classic(), _Impl)
    "_ZNSo9_M_insertI",     # std::ostream::_M_insert<unsigned long/long/double/...>
    "_ZNSt7codecvtI",       # std::codecvt<...> facets
    "_ZNSt8ios_base4Init",  # the iostream static initialiser
)
LIBSTDCXX = "libstdc++.so.6"

FIX = ("libstdc++ must be linked dynamically (a private copy breaks every error message that "
       "formats a number).  Remove -static-libstdc++, -static-libgcc and -static from LDFLAGS, "
       "CFLAGS, CXXFLAGS and LDSHARED (and from any compiler wrapper or specs file), make CXX a C++ "
       "driver (g++), then rebuild: pip install --no-build-isolation -e .  (or make build)")

_DT_NEEDED = 1
_SHT_SYMTAB, _SHT_DYNAMIC, _SHT_DYNSYM = 2, 6, 11
_SHN_UNDEF = 0


class ElfError(ValueError):
    pass


def _sections(data: bytes):
    if data[:4] != b"\x7fELF":
        raise ElfError("not an ELF file")
    if data[4] != 2 or data[5] != 1:
        raise ElfError("only 64-bit little-endian ELF is checked")
    shoff, = struct.unpack_from("<Q", data, 0x28)
    shentsize, shnum, shstrndx = struct.unpack_from("<HHH", data, 0x3A)
    secs = []
    for i in range(shnum):
        name, typ, _flags, _addr, off, size, link, _info, _align, entsize = struct.unpack_from(
            "<IIQQQQIIQQ", data, shoff + i * shentsize)
        secs.append({"type": typ, "offset": off, "size": size, "link": link, "entsize": entsize})
    return secs


def _cstr(data: bytes, start: int) -> str:
    end = data.index(b"\0", start)
    return data[start:end].decode("utf-8", "replace")


def inspect(path: str) -> Tuple[List[str], List[str]]:
    """(NEEDED entries, defined symbols that are libstdc++ internals) of a shared object."""
    with open(path, "rb") as f:
        data = f.read()
    secs = _sections(data)
    needed: List[str] = []
    internals = set()
    for s in secs:
        if s["type"] == _SHT_DYNAMIC:
            strtab = secs[s["link"]]["offset"]
            for off in range(s["offset"], s["offset"] + s["size"], 16):
                tag, val = struct.unpack_from("<qQ", data, off)
                if tag == 0:
                    break
                if tag == _DT_NEEDED:
                    needed.append(_cstr(data, strtab + val))
        elif s["type"] in (_SHT_DYNSYM, _SHT_SYMTAB):
            strtab = secs[s["link"]]["offset"]
            for off in range(s["offset"], s["offset"] + s["size"], s["entsize"] or 24):
                name, _info, _other, shndx = struct.unpack_from("<IBBH", data, off)
                if shndx == _SHN_UNDEF or name == 0:
                    continue
                sym = _cstr(data, strtab + name)
                if sym.startswith(STDCXX_INTERNALS):
                    internals.add(sym)
    return needed, sorted(internals)


def check(path: str) -> Dict[str, object]:
    """{'ok', 'path', 'needed', 'internals', 'problem'}; ok is None when the file cannot be read."""
    result: Dict[str, object] = {"ok": None, "path": path, "needed": [], "internals": [], "problem": None}
    try:
        needed, internals = inspect(path)
    except (OSError, ElfError, struct.error, ValueError, IndexError) as e:
        result["problem"] = f"could not inspect {path}: {e}"
        return result
    result.update(needed=needed, internals=internals)
    problems = []
    if LIBSTDCXX not in needed:
        problems.append(f"{LIBSTDCXX} is not among its NEEDED libraries ({', '.join(needed) or 'none'})")
    if internals:
        shown = ", ".join(internals[:3]) + (f" and {len(internals) - 3} more" if len(internals) > 3 else "")
        problems.append(f"it defines libstdc++ internals itself ({shown})")
    result["ok"] = not problems
    if problems:
        result["problem"] = f"{os.path.basename(path)}: " + "; ".join(problems) + ". " + FIX
    return result


def installed_module() -> Optional[str]:
    """Path of the ipex_lite._C next to this file, without importing it."""
    import importlib.machinery
    here = os.path.dirname(os.path.abspath(__file__))
    for suffix in importlib.machinery.EXTENSION_SUFFIXES:
        candidate = os.path.join(here, "_C" + suffix)
        if os.path.exists(candidate):
            return candidate
    return None
