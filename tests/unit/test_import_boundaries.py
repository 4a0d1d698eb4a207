"""Who imports what: the scheduler process never loads torch, ``protocol/`` never loads ZeroMQ.

Each check runs in a fresh interpreter (this one has long imported torch), and
every process a test starts is ended by its PID (``tests/integration/_procs.py``).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.integration._procs import REPO, python_env, read_line_matching, stop_all

pytestmark = pytest.mark.timeout(90)

HEAVY = ("torch", "lightning", "pytorch_lightning", "lightning_fabric")


def loaded_after(code: str) -> set[str]:
    """The top-level packages loaded in a fresh interpreter after running ``code``."""
    probe = f"{code}\nimport json, sys\nprint(json.dumps(sorted(sys.modules)))"
    out = subprocess.run(
        [sys.executable, "-c", probe],
        capture_output=True,
        text=True,
        timeout=60,
        env=python_env(),
        cwd=REPO,
        check=True,
    )
    return set(json.loads(out.stdout.strip().splitlines()[-1]))


def roots(modules: set[str]) -> set[str]:
    return {m.split(".")[0] for m in modules}


def test_starting_a_scheduler_does_not_import_torch():
    code = (
        "from lightning_secagg.scheduler import Scheduler\n"
        "with Scheduler(port=0) as s:\n"
        "    assert s.address.startswith('tcp://') and s.public_key\n"
        "import lightning_secagg.cli\n"
        "from lightning_secagg import Scheduler, Schema, KeyPair, SecAggError\n"
    )
    modules = loaded_after(code)
    assert "lightning_secagg.protocol.scheduler_state" in modules  # the probe did run
    assert "zmq" in roots(modules)
    assert not roots(modules) & set(HEAVY), sorted(roots(modules) & set(HEAVY))
    assert "lightning_secagg.encoding" not in modules
    assert "lightning_secagg.peer" not in modules


def test_the_tree_preview_does_not_import_torch():
    modules = loaded_after(
        "from lightning_secagg.cli import main\n"
        "assert main(['tree', '--target-size', '7', '--params', '1000']) == 0\n"
    )
    assert "lightning_secagg.planner" in modules
    assert not roots(modules) & set(HEAVY)


@pytest.mark.parametrize(
    "module",
    [
        "lightning_secagg.schema",
        "lightning_secagg.ring",
        "lightning_secagg.messages",
        "lightning_secagg.protocol.scheduler_state",
        "lightning_secagg.protocol.segmented_round",
        "lightning_secagg.protocol.peer_round",
    ],
)
def test_torch_free_modules_import_neither_torch_nor_zmq(module):
    modules = loaded_after(f"import {module}")
    assert module in modules
    assert not roots(modules) & {*HEAVY, "zmq"}, sorted(roots(modules) & {*HEAVY, "zmq"})


def test_the_public_names_still_load_on_demand():
    modules = loaded_after(
        "import lightning_secagg\n"
        "assert 'lightning_secagg.peer' not in __import__('sys').modules\n"
        "from lightning_secagg import Peer, RoundStats\n"
        "assert Peer.__module__ == 'lightning_secagg.peer'\n"
        "assert set(lightning_secagg.__all__) <= set(dir(lightning_secagg))\n"
        "for name in lightning_secagg.__all__:\n"
        "    if name != 'SecureAggregationCallback':\n"
        "        getattr(lightning_secagg, name)\n"
    )
    assert "torch" in roots(modules)  # Peer needs it, and gets it
    assert "pytorch_lightning" not in roots(modules)  # the callback only when asked for
    with pytest.raises(subprocess.CalledProcessError):
        loaded_after("import lightning_secagg\nlightning_secagg.NoSuchName")


def test_the_scheduler_command_does_not_import_torch(tmp_path: Path):
    """``python -m lightning_secagg scheduler``, started for real, under ``-X importtime``."""
    imports = tmp_path / "imports.txt"
    cmd = [sys.executable, "-X", "importtime", "-m", "lightning_secagg", "scheduler", "--port", "0"]
    with imports.open("w") as err:
        proc = subprocess.Popen(
            cmd,
            stdout=subprocess.PIPE,
            stderr=err,
            text=True,
            env=python_env(),
            cwd=REPO,
        )
        try:
            read_line_matching(proc, "listening on", timeout=60)
        finally:
            stop_all([proc])
    # "import time: self [us] | cumulative | imported package", one line per module.
    names = {
        line.rsplit("|", 1)[-1].strip()
        for line in imports.read_text().splitlines()
        if line.startswith("import time:")
    }
    assert "lightning_secagg.scheduler" in names and "zmq" in names  # it really ran
    assert not roots(names) & set(HEAVY), sorted(roots(names) & set(HEAVY))
    assert "lightning_secagg.encoding" not in names
