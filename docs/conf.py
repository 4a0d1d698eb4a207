"""Sphinx configuration for the lightning_secagg documentation.

Build locally (warnings are errors, as in CI)::

    pip install -e ".[docs]"
    sphinx-build -W -b html docs docs/_build/html

Nothing is downloaded at build time (no intersphinx). Four small directives
defined here keep pages in step with the code:

* ``secagg-cli-help`` prints ``--help`` of the real argument parser
  (``lightning_secagg.cli.build_parser``), for the CLI reference;
* ``secagg-command`` runs a ``lightning-secagg`` command in-process and shows
  its output (the tree planner's previews);
* ``secagg-tradeoffs`` tabulates depth, collusion threshold and bytes per peer
  for several tree parameters, from :mod:`lightning_secagg.planner`.
* ``secagg-bandwidth`` tabulates the busiest host's traffic and the round time
  on capped links for several sizes, from :mod:`lightning_secagg.planner`.
"""

from __future__ import annotations

import contextlib
import importlib
import io
import os
import shlex
import sys
from pathlib import Path

from docutils import nodes
from docutils.parsers.rst import Directive, directives

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import lightning_secagg  # noqa: E402

project = "lightning_secagg"
author = "lightning_secagg contributors"
copyright = "2024, lightning_secagg contributors"
release = lightning_secagg.__version__
version = release

extensions = [
    "myst_parser",
    "sphinx.ext.autodoc",
    "sphinx.ext.napoleon",
    "sphinx.ext.viewcode",
]
source_suffix = {".md": "markdown", ".rst": "restructuredtext"}
root_doc = "index"
exclude_patterns = ["_build", "_scripts", "_*.md", "Thumbs.db", ".DS_Store"]
templates_path: list[str] = []
html_static_path = ["_static"]
html_theme = "alabaster"
html_theme_options = {
    "description": "Secure aggregation for PyTorch Lightning",
    "fixed_sidebar": True,
}
html_title = "lightning_secagg"

myst_enable_extensions = ["colon_fence", "deflist"]
myst_heading_anchors = 3

autodoc_member_order = "bysource"
autodoc_typehints = "description"
autodoc_typehints_format = "short"
autodoc_default_options = {"members": True, "show-inheritance": True}
autodoc_preserve_defaults = True
napoleon_google_docstring = True
napoleon_numpy_docstring = False
napoleon_use_ivar = True
napoleon_use_rtype = False
# Type names in signatures that autodoc cannot cross-reference are not errors.
nitpicky = False
suppress_warnings: list[str] = []


def _importable(module: str) -> bool:
    try:
        importlib.import_module(module)
    except ImportError:
        return False
    return True


#: Whether the Lightning callback can be documented (its module imports Lightning).
HAS_CALLBACK = _importable("lightning_secagg.callback")


def _cli_main(argv: list[str]) -> tuple[int, str]:
    from lightning_secagg.cli import main

    out = io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
        try:
            code = main(argv)
        except SystemExit as exc:  # --help exits
            code = int(exc.code or 0)
    return code, out.getvalue()


class CliHelp(Directive):
    """``--help`` of the parser, or of one subcommand: ``.. secagg-cli-help:: [subcommand]``."""

    optional_arguments = 1

    def run(self) -> list[nodes.Node]:
        os.environ["COLUMNS"] = "88"  # argparse wraps to the terminal width
        argv = [*self.arguments, "--help"]
        code, text = _cli_main(argv)
        if code != 0:
            raise self.error(f"lightning-secagg {' '.join(argv)} exited with {code}: {text}")
        block = nodes.literal_block(text, text)
        block["language"] = "text"
        return [block]


class Command(Directive):
    """Run ``lightning-secagg ARGS`` in-process and show the command and its output."""

    required_arguments = 1
    final_argument_whitespace = True

    def run(self) -> list[nodes.Node]:
        argv = shlex.split(self.arguments[0])
        code, text = _cli_main(argv)
        if code != 0:
            raise self.error(f"lightning-secagg {self.arguments[0]} exited with {code}: {text}")
        shown = f"$ lightning-secagg {self.arguments[0]}\n{text}"
        block = nodes.literal_block(shown, shown)
        block["language"] = "text"
        return [block]


class Tradeoffs(Directive):
    """A table of tree parameters: one ``target_size group_size num_actors`` per line.

    Option ``params`` is the model size (default 1200000 float32 elements).
    """

    has_content = True
    option_spec = {"params": directives.positive_int}

    def run(self) -> list[nodes.Node]:
        from lightning_secagg.planner import plan

        params = self.options.get("params", 1_200_000)
        header = [
            "peers",
            "group_size",
            "num_actors",
            "depth",
            "colluders to expose a peer",
            "leaf sends / receives (MB)",
            "busiest peer sends / receives (MB)",
            "busiest peer, one way / mean over peers",
            "all peers send (MB)",
        ]
        rows = []
        for line in self.content:
            if not line.strip():
                continue
            n, g, k = (int(x) for x in line.split())
            p = plan(n, g, k, params=params)
            leaf = next(x for x in p.peers if not x.kind.startswith(("actor", "root")))
            busiest = p.busiest
            rows.append(
                [
                    str(n),
                    str(g),
                    str(k),
                    str(p.depth),
                    str(p.collusion_threshold),
                    f"{leaf.bytes_sent / 1e6:.1f} / {leaf.bytes_received / 1e6:.1f}",
                    f"{busiest.bytes_sent / 1e6:.1f} / {busiest.bytes_received / 1e6:.1f}",
                    f"{p.load_ratio:.2f}x",
                    f"{sum(x.bytes_sent for x in p.peers) / 1e6:,.0f}",
                ]
            )
        return [_table(header, rows)]


class Bandwidth(Directive):
    """Per-host traffic and round time on capped links: one ``peers params`` per line.

    From :mod:`lightning_secagg.planner`, the median over seeded tree draws (the
    scheduler's own draw is random). The round-time column uses the measured
    behaviour of today's protocol on capped links: the busiest host's two
    directions barely overlap, so a round lasts about its bytes sent plus
    received over the rate.
    """

    has_content = True
    option_spec = {"rate": directives.positive_int}  # Mbit/s

    def run(self) -> list[nodes.Node]:
        import statistics

        from lightning_secagg.planner import plan

        rate = self.options.get("rate", 100) * 1e6
        header = [
            "peers",
            "model elements (float32)",
            "busiest host sends + receives (MB)",
            "busiest host one way / mean over peers",
            f"round at {rate / 1e6:.0f} Mbit/s (s), at least",
            "per-host Mbit/s for a 10 s round",
        ]
        rows = []
        for line in self.content:
            if not line.strip():
                continue
            n, params = (int(x) for x in line.split())
            draws = [plan(n, 3, 2, params=params, seed=seed) for seed in range(5)]
            both = statistics.median(p.busiest.bytes_sent + p.busiest.bytes_received for p in draws)
            ratio = statistics.median(p.load_ratio for p in draws)
            rows.append(
                [
                    str(n),
                    f"{params:,}",
                    f"{both / 1e6:,.1f}",
                    f"{ratio:.2f}x",
                    f"{both * 8 / rate:,.1f}",
                    f"{both * 8 / 10 / 1e6:,.0f}",
                ]
            )
        return [_table(header, rows)]


def _table(header: list[str], rows: list[list[str]]) -> nodes.table:
    table = nodes.table()
    group = nodes.tgroup(cols=len(header))
    table += group
    for _ in header:
        group += nodes.colspec(colwidth=1)
    thead = nodes.thead()
    group += thead
    tbody = nodes.tbody()
    group += tbody
    for cells, parent in [(header, thead)] + [(r, tbody) for r in rows]:
        row = nodes.row()
        for cell in cells:
            entry = nodes.entry()
            entry += nodes.paragraph(text=cell)
            row += entry
        parent += row
    return table


def _api_callback(app: object, docname: str, source: list[str]) -> None:
    """Document the callback only when its module exists (it is built separately)."""
    if docname != "api":
        return
    if HAS_CALLBACK:
        block = (
            "```{eval-rst}\n"
            ".. autoclass:: lightning_secagg.callback.SecureAggregationCallback\n"
            "   :members:\n"
            "   :show-inheritance:\n"
            "```\n"
        )
    else:
        block = "The callback module is not part of this build.\n"
    source[0] = source[0].replace("<!-- secagg: callback-api -->", block)


def setup(app: object) -> dict[str, object]:
    app.add_directive("secagg-cli-help", CliHelp)  # type: ignore[attr-defined]
    app.add_directive("secagg-command", Command)  # type: ignore[attr-defined]
    app.add_directive("secagg-tradeoffs", Tradeoffs)  # type: ignore[attr-defined]
    app.add_directive("secagg-bandwidth", Bandwidth)  # type: ignore[attr-defined]
    app.connect("source-read", _api_callback)  # type: ignore[attr-defined]
    return {"parallel_read_safe": True}
