"""A modest load run of scripts/load_test.py: 16 echo workers in 2 processes, 2 rounds."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "load_test.py"


def test_many_echo_workers_per_process_complete_every_round(tmp_path: Path) -> None:
    out = tmp_path / "report.json"
    cmd = [sys.executable, str(SCRIPT), "--workers", "16", "--procs", "2", "--rounds", "2"]
    done = subprocess.run(
        [*cmd, "--params", "100000", "--out", str(out)], capture_output=True, text=True, timeout=240
    )
    assert done.returncode == 0, done.stdout + done.stderr
    report = json.loads(out.read_text())
    assert report["workers_per_round"] == [16, 16]
    assert report["failures_per_round"] == [0, 0]
    assert report["worker_exits_nonzero"] == 0
    # Every worker downloaded the 400 KB model each round.
    assert all(b >= 16 * 100_000 * 4 for b in report["bytes_sent_per_round"])
