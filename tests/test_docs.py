"""The documentation's examples run, so README.md and docs/ cannot drift from the code.

- Every ```python block of a page runs: the blocks of one file in order, in one namespace (like a
  notebook), in a fresh interpreter per file, with the repository root as the working directory.  A
  block whose first line is ``# doc: no-run (<reason>)`` is skipped; the reason is mandatory.
- In ```bash / ```sh / ```console / ```shell blocks nothing runs, but every ``ipex-lite-run ...``
  command is parsed by the launcher's own argparse parser, every ``python -m X`` must name an
  importable module, every ``python <dir>/<file>.py`` a file of this repository (when <dir> is one of
  its top-level directories) and every ``make <target>`` a target of the Makefile.
- README.md stays at most 12 KB and its relative links resolve, and every page under docs/ is in a
  toctree (Sphinx -W in ``make docs`` fails on that too; this test says so without building the site).
"""
import os
import re
import shlex
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import List, NamedTuple, Optional

import pytest

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"
README_LIMIT = 12 * 1024  # bytes

NO_RUN = re.compile(r"#\s*doc:\s*no-run\b(.*)$")
NO_RUN_REASON = re.compile(r"^\s*\((.*\S.*)\)\s*$")
SHELL_LANGS = {"bash", "sh", "shell", "console", "shell-session"}
PYTHON_LANGS = {"python", "python3", "py"}
TIMEOUT_S = 300


class Block(NamedTuple):
    lang: str
    line: int  # 1-based line of the first line of code
    code: str


def _pages() -> List[str]:
    """README.md and every page under docs/ (a page missing from a toctree fails Sphinx -W and the test below)."""
    return ["README.md"] + sorted(str(p.relative_to(ROOT)) for p in DOCS.rglob("*.md") if "_build" not in p.parts)


def _fence_lang(info: str) -> str:
    """The language of a fence: ```python -> python; MyST ```{code-block} python -> python."""
    info = info.strip()
    m = re.match(r"\{(code-block|code|sourcecode)\}\s*(\S*)", info)
    if m:
        return m.group(2).lower()
    return info.split()[0].lower() if info else ""


def parse_blocks(text: str) -> List[Block]:
    """Fenced code blocks (``` or ~~~, any indentation).  MyST directive fences (```{note}, ...)
    are looked into: code blocks nested in them count; ```{eval-rst} and the like hold none."""
    blocks: List[Block] = []
    lines = text.split("\n")
    directives: List[str] = []  # fences of the directives we are inside
    i = 0
    while i < len(lines):
        m = re.match(r"^(\s*)(`{3,}|~{3,})(.*)$", lines[i])
        if not m:
            i += 1
            continue
        indent, fence, info = m.group(1), m.group(2), m.group(3).strip()
        if (not info and directives and fence[0] == directives[-1][0]
                and len(fence) >= len(directives[-1])):
            directives.pop()  # the end of a directive
            i += 1
            continue
        if info.startswith("{") and not re.match(r"\{(code-block|code|sourcecode)\}", info):
            directives.append(fence)  # a directive: its content is scanned as ordinary lines
            i += 1
            continue
        body = []
        j = i + 1
        close = re.compile(r"^\s*" + re.escape(fence[0]) + "{" + str(len(fence)) + r",}\s*$")
        while j < len(lines) and not close.match(lines[j]):
            body.append(lines[j][len(indent):] if lines[j].startswith(indent) else lines[j].lstrip())
            j += 1
        lang = _fence_lang(info)
        # MyST code-block options (:caption: ...) come first in the body
        while info.startswith("{") and body and body[0].startswith(":"):
            body.pop(0)
        blocks.append(Block(lang, i + 2, "\n".join(body)))
        i = j + 1
    return blocks


def _read(page: str) -> str:
    return (ROOT / page).read_text(encoding="utf-8")


# ----------------------------------------------------------------------------- python blocks

def no_run_reason(code: str) -> Optional[str]:
    """None for a block that runs; the reason for one marked ``# doc: no-run (<reason>)``.
    A marker without a reason in parentheses raises ValueError."""
    first = code.lstrip("\n").split("\n", 1)[0]
    m = NO_RUN.match(first.strip())
    if not m:
        return None
    r = NO_RUN_REASON.match(m.group(1))
    if not r:
        raise ValueError(f"'# doc: no-run' needs a reason in parentheses, e.g. '# doc: no-run (multi-node "
                         f"torchrun)'; got {first.strip()!r}")
    return r.group(1).strip()


RUNNER = textwrap.dedent("""\
    import json, sys, traceback
    blocks = json.load(open(sys.argv[1]))
    ns = {"__name__": "__main__"}
    for b in blocks:
        print(f"--- block at {b['label']}", file=sys.stderr, flush=True)
        try:
            exec(compile(b["code"], b["where"], "exec"), ns)
        except BaseException:
            traceback.print_exc()
            print(f"FAILED in the block at {b['label']}", file=sys.stderr)
            sys.exit(1)
""")


@pytest.mark.parametrize("page", _pages())
def test_python_blocks_run(page, tmp_path):
    import json

    text = _read(page)
    runnable, bad = [], []
    for b in parse_blocks(text):
        if b.lang not in PYTHON_LANGS:
            continue
        try:
            if no_run_reason(b.code) is not None:
                continue
        except ValueError as e:
            bad.append(f"{page}:{b.line}: {e}")
            continue
        # line numbers in tracebacks: pad so that line k of the block is line (b.line + k - 1) of the page
        runnable.append({"label": f"{page}:{b.line}", "where": str(ROOT / page), "code": "\n" * (b.line - 1) + b.code})
    assert not bad, "\n".join(bad)
    if not runnable:
        pytest.skip(f"{page} has no python block to run")
    spec = tmp_path / "blocks.json"
    spec.write_text(json.dumps(runnable))
    runner = tmp_path / "run_blocks.py"
    runner.write_text(RUNNER)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
               MPLBACKEND="Agg")
    try:
        r = subprocess.run([sys.executable, str(runner), str(spec)], cwd=ROOT, env=env, capture_output=True,
                           text=True, timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired as e:
        pytest.fail(f"{page}: its python blocks ran longer than {TIMEOUT_S} s\n{(e.stderr or '')[-4000:]}")
    assert r.returncode == 0, (f"{page}: a python block failed (exit {r.returncode})\n"
                               f"--- stdout (tail)\n{r.stdout[-3000:]}\n--- stderr (tail)\n{r.stderr[-6000:]}")


def test_no_run_marker_needs_a_reason():
    assert no_run_reason("x = 1") is None
    assert no_run_reason("# doc: no-run (needs two hosts)\nx") == "needs two hosts"
    for bad in ("# doc: no-run\nx", "# doc: no-run ()\nx", "# doc: no-run because\nx"):
        with pytest.raises(ValueError):
            no_run_reason(bad)


def test_block_parser():
    text = "a\n```python\nx = 1\n```\n\n````{note}\n```python\ny = 2\n```\n````\n  ~~~bash\n  make test\n  ~~~\n"
    blocks = parse_blocks(text)
    assert [(b.lang, b.line, b.code) for b in blocks] == [("python", 3, "x = 1"), ("python", 8, "y = 2"),
                                                           ("bash", 12, "make test")]


# ----------------------------------------------------------------------------- shell blocks

def _commands(code: str, lang: str) -> List[List[str]]:
    """Shell commands of a block as token lists: prompts ($ / #) stripped for console blocks (lines
    without a prompt are output there), continuation lines joined, split at ; && || |."""
    lines, cmds, cur = code.split("\n"), [], ""
    for line in lines:
        if lang in ("console", "shell-session"):
            if cur:
                pass
            elif re.match(r"^\s*\$ ", line):
                line = re.sub(r"^\s*\$ ", "", line)
            else:
                continue
        if line.rstrip().endswith("\\"):
            cur += line.rstrip()[:-1] + " "
            continue
        cur += line
        if cur.strip():
            cmds.append(cur)
        cur = ""
    out = []
    for c in cmds:
        try:
            lex = shlex.shlex(c, posix=True, punctuation_chars=";&|<>")
            lex.whitespace_split = True
            lex.commenters = "#"
            tokens = list(lex)
        except ValueError:
            tokens = c.split()
        part: List[str] = []
        for t in tokens + [";"]:
            if t and set(t) <= set(";&|<>"):
                if part:
                    out.append(part)
                part = []
            else:
                part.append(t)
    return out


def _strip_env(tokens: List[str]) -> List[str]:
    """Drop leading VAR=value assignments, ``env``, ``sudo``, ``time``, ``timeout N``."""
    i = 0
    while i < len(tokens):
        t = tokens[i]
        if re.match(r"^[A-Za-z_][A-Za-z0-9_]*=", t) or t in ("env", "sudo", "time", "exec", "nohup"):
            i += 1
        elif t == "timeout" and i + 1 < len(tokens):
            i += 2
        else:
            break
    return tokens[i:]


def _make_targets() -> set:
    text = (ROOT / "Makefile").read_text()
    return set(re.findall(r"^([A-Za-z][\w.-]*)\s*:(?!=)", text, re.MULTILINE))


def check_shell_block(code: str, lang: str) -> List[str]:
    from ipex_lite.launcher.launch import build_parser

    problems = []
    targets = None
    for tokens in _commands(code, lang):
        tokens = _strip_env(tokens)
        if not tokens:
            continue
        exe = os.path.basename(tokens[0])
        shown = " ".join(tokens)
        if exe == "ipex-lite-run" or (exe.startswith("python") and tokens[1:3] == ["-m", "ipex_lite.launcher"]):
            args = tokens[1:] if exe == "ipex-lite-run" else tokens[3:]
            if "-h" in args or "--help" in args:
                continue
            try:
                build_parser().parse_args(args)
            except SystemExit as e:
                problems.append(f"`{shown}`: the launcher's parser refuses it (exit {e.code}; see stderr)")
        elif exe.startswith("python") and re.fullmatch(r"python[\d.]*", exe):
            if len(tokens) > 2 and tokens[1] == "-m":
                if not _importable(tokens[2]):
                    problems.append(f"`{shown}`: no module named {tokens[2]!r}")
            elif len(tokens) > 1 and tokens[1].endswith(".py"):
                top = tokens[1].split("/", 1)[0]
                if "/" in tokens[1] and (ROOT / top).is_dir() and not (ROOT / tokens[1]).is_file():
                    problems.append(f"`{shown}`: {tokens[1]} is not a file of this repository")
        elif exe == "make" and len(tokens) > 1:
            targets = targets if targets is not None else _make_targets()
            for t in tokens[1:]:
                if t.startswith("-") or "=" in t:
                    continue
                if t not in targets:
                    problems.append(f"`{shown}`: the Makefile has no target {t!r}")
    return problems


def _importable(module: str) -> bool:
    import importlib.util

    sys.path.insert(0, str(ROOT))
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False
    finally:
        sys.path.remove(str(ROOT))


@pytest.mark.parametrize("page", _pages())
def test_shell_commands_are_current(page):
    text = _read(page)
    problems = []
    for b in parse_blocks(text):
        if b.lang in SHELL_LANGS:
            problems += [f"{page}:{b.line}: {p}" for p in check_shell_block(b.code, b.lang)]
    assert not problems, "\n".join(problems)


def test_shell_checker_catches_drift():
    assert check_shell_block("ipex-lite-run --throughput-mode tutorials/quickstart.py", "bash") == []
    assert check_shell_block("$ OMP_NUM_THREADS=2 ipex-lite-run --ninstances 2 \\\n    x.py --iters 3\nout", "console") == []
    assert check_shell_block("ipex-lite-run --no-such-flag x.py", "bash")
    assert check_shell_block("python -m ipex_lite.doctor --json && make docs", "sh") == []
    assert check_shell_block("python -m ipex_lite.no_such_module", "sh")
    assert check_shell_block("make no-such-target", "sh")
    assert check_shell_block("python bench/no_such_script.py", "sh")


# ----------------------------------------------------------------------------- size and toctrees

def test_readme_size():
    size = (ROOT / "README.md").stat().st_size
    assert size <= README_LIMIT, f"README.md is {size} bytes; keep it at most {README_LIMIT} (move detail into docs/)"


def test_readme_links_resolve():
    """README.md is not part of the Sphinx site, so nothing else checks its relative links."""
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    missing = []
    for target in re.findall(r"\]\(([^)\s]+)\)", text):
        if re.match(r"^[a-z]+:", target) or target.startswith("#"):
            continue
        path = target.split("#", 1)[0]
        if not (ROOT / path).exists():
            missing.append(path)
    assert not missing, f"README.md links to files that do not exist: {missing}"


def _toctree_entries(page: Path) -> List[Path]:
    entries = []
    for m in re.finditer(r"^(`{3,}|:{3,})\{toctree\}[^\n]*\n(.*?)^\1\s*$", page.read_text(), re.MULTILINE | re.DOTALL):
        for line in m.group(2).split("\n"):
            line = line.strip()
            if not line or line.startswith(":"):
                continue
            target = re.sub(r"^.*<(.+)>$", r"\1", line)  # "Title <path>"
            entries.append((page.parent / target).resolve())
    return entries


def test_every_docs_page_is_in_a_toctree():
    pages = {p.resolve() for p in DOCS.rglob("*.md") if "_build" not in p.parts}
    assert (DOCS / "index.md").resolve() in pages
    listed = {e.with_suffix(".md") if e.suffix != ".md" else e for p in pages for e in _toctree_entries(p)}
    missing_targets = sorted(str(e.relative_to(ROOT)) for e in listed if e not in pages)
    orphans = sorted(str(p.relative_to(ROOT)) for p in pages if p not in listed and p != (DOCS / "index.md").resolve())
    assert not orphans, f"pages in no toctree (add them to one, e.g. docs/index.md): {orphans}"
    assert not missing_targets, f"toctrees list pages that do not exist: {missing_targets}"
