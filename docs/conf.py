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
]

html_theme = "alabaster"
try:
    import furo  # noqa: F401

    html_theme = "furo"
except ImportError:
    pass
html_title = f"ipex_lite {release}"
html_static_path = []
