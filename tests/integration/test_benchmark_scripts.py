"""The benchmark scripts run as documented, on small settings.

Nothing else imports them, so an API change could break them unseen (``bench_steps.py``
did, for a while). These runs check that they work and that what they print
is consistent with the JSON; their timings are not checked (performance targets
live in the benchmarks' output, not in tests).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from tests.integration._callback_helpers import REPO, kill_group, spawn, wait_all

pytestmark = pytest.mark.integration

BENCH = REPO / "benchmarks"


def run_script(args: list[str], tmp_path: Path, timeout: float) -> str:
    """Run ``python args...`` in its own session; its output, or a failure with the log."""
    log = tmp_path / "out.log"
    proc = spawn(args, log)
    try:
        (code,) = wait_all([proc], timeout)
    finally:
        kill_group(proc)  # the script and any worker it started, by process group
    out = log.read_text(errors="replace")
    assert code == 0, f"exit code {code}:\n{out[-4000:]}"
    return out


@pytest.mark.timeout(120)
def test_bench_steps_prints_every_step(tmp_path: Path) -> None:
    out = run_script([str(BENCH / "bench_steps.py"), "--repeat", "1"], tmp_path, timeout=90)
    rows = re.findall(r"^\| (.+?) \| (\d+\.\d\d) \|$", out, flags=re.MULTILINE)
    names = [name for name, _ in rows]
    assert len(rows) == 11, out
    assert "encode" in names and "decode the ring total (root actors)" in names
    assert all(float(ms) > 0 for _, ms in rows)


@pytest.mark.timeout(240)
def test_bench_rounds_table_and_json(tmp_path: Path) -> None:
    result = tmp_path / "bench.json"
    args = [str(BENCH / "bench_rounds.py"), "--peers", "3", "--rounds", "2", "--warmup", "1"]
    out = run_script([*args, "--json", str(result)], tmp_path, timeout=200)

    (row,) = json.loads(result.read_text())
    assert row["n"] == 3 and row["model"] == "mnist"
    assert len(row["secagg"]) == 2  # one time per measured round
    assert len(row["gloo"]) == 4  # gloo runs before and after the secure rounds
    model_bytes = row["model_bytes"]
    assert model_bytes == 1_199_882 * 4
    # A leaf sends its masked share and receives the average: 2x the model plus
    # headers and tags, within the 2.2x target.
    leaf = row["bytes"]["leaf"]
    assert 2.0 <= leaf / model_bytes <= 2.2, leaf / model_bytes
    assert set(row["bytes"]) == {"leaf", "root actor"}  # N = 3: one group, the root
    # The printed table carries the same run.
    line = next(x for x in out.splitlines() if x.startswith("| 3 | mnist"))
    assert f"leaf {leaf / model_bytes:.2f}x" in line


@pytest.mark.timeout(300)
def test_bench_rounds_on_capped_hosts(tmp_path: Path) -> None:
    """``--rate``: every process on a capped host of its own; the busiest host's
    bytes measured are the planner's (N = 3: one group, the same for every draw),
    up to the headers' peer ids and addresses, which the planner makes up."""
    from benchmarks.netns import unavailable_reason

    reason = unavailable_reason()
    if reason is not None:
        pytest.skip(f"--rate needs network namespaces: {reason}")
    result = tmp_path / "bench.json"
    args = [str(BENCH / "bench_rounds.py"), "--peers", "3", "--rounds", "1", "--warmup", "1"]
    out = run_script([*args, "--rate", "100mbit", "--json", str(result)], tmp_path, timeout=270)
    (row,) = json.loads(result.read_text())
    (planned,) = set(row["planner_busiest_bytes"])
    assert abs(planned - row["busiest_bytes"]) <= 1000, (planned, row["busiest_bytes"])
    # A 100 Mbit/s link cannot move the busiest host's bytes faster than the rate.
    assert min(row["secagg_slowest_call"]) >= row["busiest_bytes"] * 8 / 100e6
    assert "every host capped at 100mbit both ways" in out
    assert re.search(r"^\| 3 \| mnist \(4\.8 MB\) \| \d+ \| \d+ \| ", out, flags=re.MULTILINE), out
