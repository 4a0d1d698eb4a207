"""The Sphinx site builds with warnings as errors (``sphinx-build -W``), as in CI."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("sphinx") is None or importlib.util.find_spec("myst_parser") is None,
    reason='sphinx and myst-parser are not installed (pip install -e ".[docs]")',
)


@pytest.mark.timeout(180)
def test_sphinx_build_with_warnings_as_errors(tmp_path):
    out = tmp_path / "html"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "sphinx",
            "-W",
            "--keep-going",
            "-q",
            "-b",
            "html",
            "-d",
            str(tmp_path / "doctrees"),
            str(REPO / "docs"),
            str(out),
        ],
        capture_output=True,
        text=True,
        timeout=170,
        cwd=REPO,
    )
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    for page in (
        "index",
        "quickstart",
        "concepts",
        "protocol",
        "threat-model",
        "numerics",
        "design-decisions",
        "api",
        "cli",
        "benchmarks",
        "troubleshooting",
    ):
        assert (out / f"{page}.html").is_file(), page
    api = (out / "api.html").read_text(encoding="utf-8")
    for name in (
        "Peer",
        "Scheduler",
        "RoundStats",
        "KeyPair",
        "Schema",
        "AggregationTree",
        "build_tree",
        "RoundTimeoutError",
    ):
        assert f"lightning_secagg.{name}" in api, name
    assert (out / "_images" / "tree.png").is_file() or (out / "_static" / "tree.png").is_file()
    cli = (out / "cli.html").read_text(encoding="utf-8")
    assert "--target-size" in cli and "--params" in cli
