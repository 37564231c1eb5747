"""Sphinx configuration of the ipex_lite documentation (`make docs`).

Pages are Markdown (MyST); the API reference is autodoc on the built package, so the extension
(`ipex_lite._C`) must be built first (`make docs` depends on `make build`).  The build runs with
-W --keep-going -n: every warning, unresolved cross-reference included, fails it.  There is no
intersphinx: CI builds the docs without fetching other projects' inventories.
"""
import os
import re
import sys

DOCS = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(DOCS)
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(DOCS, "_ext"))

with open(os.path.join(ROOT, "pyproject.toml")) as f:
    release = re.search(r'^version\s*=\s*"([^"]+)"', f.read(), re.MULTILINE).group(1)
version = release
project = "ipex_lite"
author = "the ipex_lite authors"
copyright = "2026, the ipex_lite authors"

extensions = [
    "myst_parser",
    "sphinx.ext.autodoc",
    "sphinx.ext.napoleon",
    "sphinx.ext.viewcode",
    "argparse_help",  # docs/_ext/argparse_help.py: the launcher's --help from its own parser
]

source_suffix = {".md": "markdown"}
root_doc = "index"
exclude_patterns = ["_build", "_ext", "requirements.txt"]

# MyST: `#`-anchors for headings down to ### so pages can link to sections
# (e.g. troubleshooting.md#build-problems).
myst_heading_anchors = 3
myst_enable_extensions = ["colon_fence"]

# autodoc / napoleon
autodoc_member_order = "bysource"
autodoc_typehints = "signature"
autodoc_default_options = {"members": True, "show-inheritance": True}
autodoc_inherit_docstrings = False  # torch's own docstrings (forward, state_dict, ...) are not ours
napoleon_google_docstring = True
napoleon_numpy_docstring = False

# Warnings as errors (-W -n in the Makefile).  Names that cannot be resolved without intersphinx:
# torch's, transformers' and numpy's types appear in signatures, base classes and docstrings, and
# no page of this site documents them.  Everything of ipex_lite's own must resolve.
nitpicky = True
nitpick_ignore_regex = [
    (r"py:.*", r"(torch|transformers|numpy|np|nn|F)(\..*)?"),
    (r"py:.*", r"(Tensor|Module|dtype|device)"),
    # the standard library's types (enum.IntEnum as a base class): no intersphinx either
    (r"py:.*", r"(enum|collections|concurrent|typing)\..*"),
]
nitpick_ignore = [
    # PreparedModel's constructor takes the optimize() report; users get a PreparedModel from
    # prepare() and never build the report type, which stays private.
    ("py:class", "ipex_lite._inference.Report"),
]

html_theme = "alabaster"
try:
    import furo  # noqa: F401

    html_theme = "furo"
except ImportError:
    pass
html_title = f"ipex_lite {release}"
html_static_path = []


# ----------------------------------------------------------------------------- autodoc hooks

def _public_bases(bases):
    """Base classes as shown by show-inheritance: a private base (``_Packed``, ``_FeedForward``,
    ...) is an implementation detail, so its own bases are shown in its place."""
    out = []
    for b in bases:
        if getattr(b, "__name__", "").startswith("_") and getattr(b, "__module__", "").startswith("ipex_lite"):
            out.extend(c for c in _public_bases(list(b.__bases__)) if c is not object and c not in out)
        elif b not in out:
            out.append(b)
    return out or [object]


def _process_bases(app, name, obj, options, bases):
    bases[:] = _public_bases(list(bases))


_OBJECT_REPR = [
    (re.compile(r"<class '(?:[\w]+\.)*(\w+)'>"), r"\1"),                     # a class as a default
    (re.compile(r"<function (?:[\w]+\.)*(\w+) at 0x[0-9a-f]+>"), r"\1"),      # a function as a default
    (re.compile(r"<factory>"), "..."),                                          # dataclass default_factory
]


def _process_signature(app, what, name, obj, options, signature, return_annotation):
    """Defaults whose repr is not Python (``<class 'x.Y'>``, dataclass ``<factory>``) make Sphinx
    fall back to splitting the signature at commas, which breaks its type annotations apart."""
    if signature:
        for pattern, repl in _OBJECT_REPR:
            signature = pattern.sub(repl, signature)
    return signature, return_annotation


def _resolve_private_path(app, env, node, contnode):
    """A type annotation names the defining module (``ipex_lite.quantization._woq.WoqWeightDtype``);
    the reference documents it where users import it (``ipex_lite.quantization.WoqWeightDtype``)."""
    if node.get("refdomain") != "py":
        return None
    target = node.get("reftarget", "")
    m = re.match(r"^(ipex_lite(?:\.[a-z]\w*)*)(?:\._\w+)+\.(\w+)$", target)
    if not m:
        return None
    public = f"{m.group(1)}.{m.group(2)}"
    domain = env.get_domain("py")
    if public not in domain.objects:
        return None
    return domain.resolve_xref(env, node.get("refdoc"), app.builder, node.get("reftype"), public, node, contnode)


def setup(app):
    app.connect("autodoc-process-bases", _process_bases)
    app.connect("autodoc-process-signature", _process_signature)
    app.connect("missing-reference", _resolve_private_path)
