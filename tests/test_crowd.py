"""A hundred simulated clients do not print ~300 lines of joins, departures and roster rows
(issue 27); a handful of silos still get one line each."""

from __future__ import annotations

import logging

import pytest

from fedcore.server.reporting.roster import ROSTER_ROWS, ConnectedWorker, format_roster
from fedcore.server.state.registry import QUIET_AFTER, WorkerRegistry
from fedcore.v1 import fedcore_pb2 as pb


def _workers(n: int, lacking: frozenset[int] = frozenset()) -> list[ConnectedWorker]:
    return [
        ConnectedWorker(
            f"w{i}", f"client-{i:03d}", 60 + i, "idle", None, ("x",) if i in lacking else ()
        )
        for i in range(n)
    ]


def test_a_large_roster_is_summarised_but_lists_every_unselected_worker() -> None:
    table = format_roster(_workers(100, lacking=frozenset({57})), ("x",)).splitlines()
    assert len(table) == 1 + 1 + ROSTER_ROWS + 1 + 1  # title, header, rows, #57, summary
    assert table[0] == "connected workers: 100 (selecting those tagged #x)"
    assert any(line.split()[0] == "client-057" and "lacks" in line for line in table)
    assert table[-1].strip().startswith("... and 89 more, all selected:")
    assert f"{sum(60 + i for i in range(10, 100) if i != 57)} examples" in table[-1]
    # Positive control: a small federation keeps its full table.
    small = format_roster(_workers(QUIET_AFTER)).splitlines()
    assert len(small) == 2 + QUIET_AFTER
    assert "more" not in small[-1]


async def test_departures_beyond_a_handful_are_logged_at_debug(
    caplog: pytest.LogCaptureFixture,
) -> None:
    registry = WorkerRegistry()
    sessions = [
        registry.new_session(pb.Hello(name=f"client-{i:03d}"), "ipv4:127.0.0.1:1")
        for i in range(100)
    ]
    with caplog.at_level(logging.INFO, logger="fedcore.server"):
        for session in sessions:
            await registry.remove(session, "stream ended")
    left = [r for r in caplog.records if "left" in r.getMessage()]
    assert len(left) == QUIET_AFTER + 1  # the last ones, down to 0 connected
    assert left[-1].getMessage().endswith("; 0 connected")
