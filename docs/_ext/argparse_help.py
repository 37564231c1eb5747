"""A Sphinx directive that prints a command's ``--help`` from its own argparse parser.

    ```{argparse-help} ipex_lite.launcher.launch:build_parser
    ```

The argument names a callable that returns an ``argparse.ArgumentParser``.  The help is rendered at
a fixed width (100 columns, whatever the terminal), so the page does not depend on where it was
built, and it can never disagree with the flags the program accepts.  Options: ``:prog:`` replaces
the parser's program name.
"""
import argparse
import importlib

from docutils import nodes
from docutils.parsers.rst import directives
from sphinx.util.docutils import SphinxDirective

WIDTH = 100


def load_parser(spec: str) -> argparse.ArgumentParser:
    module_name, _, attr = spec.partition(":")
    if not attr:
        raise ValueError(f"argparse-help: expected 'module:callable', got {spec!r}")
    obj = importlib.import_module(module_name)
    for part in attr.split("."):
        obj = getattr(obj, part)
    parser = obj() if callable(obj) and not isinstance(obj, argparse.ArgumentParser) else obj
    if not isinstance(parser, argparse.ArgumentParser):
        raise TypeError(f"argparse-help: {spec} gave {type(parser).__name__}, not an ArgumentParser")
    return parser


def render_help(parser: argparse.ArgumentParser, prog: str = None) -> str:
    if prog:
        parser.prog = prog
    base = parser.formatter_class
    parser.formatter_class = lambda prog: base(prog, width=WIDTH)
    try:
        return parser.format_help().rstrip() + "\n"
    finally:
        parser.formatter_class = base


class ArgparseHelp(SphinxDirective):
    required_arguments = 1
    option_spec = {"prog": directives.unchanged}

    def run(self):
        spec = self.arguments[0]
        try:
            text = render_help(load_parser(spec), self.options.get("prog"))
        except Exception as e:  # noqa: BLE001 - reported as a build warning (an error under -W)
            return [self.state.document.reporter.warning(f"argparse-help {spec}: {type(e).__name__}: {e}",
                                                         line=self.lineno)]
        block = nodes.literal_block(text, text)
        block["language"] = "text"
        return [block]


def setup(app):
    app.add_directive("argparse-help", ArgparseHelp)
    return {"version": "1", "parallel_read_safe": True, "parallel_write_safe": True}
