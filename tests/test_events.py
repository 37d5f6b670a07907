"""Structured log events: ``--log-json`` records carry a log call's ``extra=`` fields, and the
end-to-end tests' :meth:`conftest.Proc.wait_for_event` waits on them, not on log prose."""

from __future__ import annotations

import argparse
import json
import logging
import re
import sys
from pathlib import Path

import pytest
from conftest import Proc

from fedcore.cli_support import configure_logging

# A child that logs the way the CLIs do with --log-json, with one plain line in between.
_CHILD = """
import argparse, logging, pathlib
from fedcore.cli_support import configure_logging
configure_logging(argparse.Namespace(quiet=False, log_level="INFO", log_json=True), "x")
log = logging.getLogger("fedcore.worker")
print("listening on 127.0.0.1:1", flush=True)
for r in (1, 2):
    log.info("round %d: sent update", r, extra={"event": "update_sent", "round": r})
log.info("done", extra={"event": "finished", "path": pathlib.Path("/tmp/x")})
"""


def test_json_records_carry_the_structured_fields_of_the_log_call(
    capsys: pytest.CaptureFixture[str],
) -> None:
    root, fedcore_log = logging.getLogger(), logging.getLogger("fedcore")
    saved = (root.handlers[:], root.level, fedcore_log.level)
    try:
        configure_logging(argparse.Namespace(quiet=False, log_level="INFO", log_json=True), "t")
        log = logging.getLogger("fedcore.test_events")
        log.info("round %d: %d worker(s)", 2, 3, extra={"event": "round_started", "round": 2})
        log.info("prose only")
    finally:
        root.handlers[:], root.level = saved[0], saved[1]
        fedcore_log.setLevel(saved[2])
    first, second = (json.loads(line) for line in capsys.readouterr().err.splitlines())
    assert (first["event"], first["round"]) == ("round_started", 2)
    assert first["message"] == "round 2: 3 worker(s)"
    assert set(second) == {"time", "level", "logger", "message"}  # nothing invented


def test_wait_for_event_matches_event_fields_and_count(procs: list[Proc]) -> None:
    child = Proc([sys.executable, "-c", _CHILD], "child")
    procs.append(child)
    assert child.wait_for_event("update_sent", round=2)["message"] == "round 2: sent update"
    assert child.wait_for_event("update_sent", n=2)["round"] == 2
    assert child.wait_for_event("finished")["path"] == str(Path("/tmp/x"))
    assert child.wait_for_event("update_sent", message=re.compile(r"round 2"))["round"] == 2
    assert len(child.matching("update_sent")) == 2
    assert child.wait() == 0
    # The prose stays readable (and searchable) next to the events.
    assert "INFO round 1: sent update" in child.output
    assert "listening on 127.0.0.1:1" in child.lines


def test_wait_for_event_fails_at_once_when_the_process_ended_without_it(
    procs: list[Proc],
) -> None:
    child = Proc([sys.executable, "-c", _CHILD], "child")
    procs.append(child)
    assert child.wait() == 0
    with pytest.raises(AssertionError, match=r"2 of 3 'update_sent' event\(s\)"):
        child.wait_for_event("update_sent", n=3, timeout=60)
    with pytest.raises(
        AssertionError, match=r"0 of 1 'update_sent' event\(s\) with \{'round': 9\}"
    ):
        child.wait_for_event("update_sent", round=9, timeout=60)
