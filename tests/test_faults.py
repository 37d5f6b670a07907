"""Faults injected into a live federation of real processes: a worker's connection cut before
training (mid-download), while training and mid-upload; the same worker frozen past
--round-timeout (a straggler); a worker and then the coordinator stopped with SIGTERM (which
leaves the workers reconnecting). Each round finishes with the others, the worker reconnects
by itself and rejoins later rounds."""

from __future__ import annotations

import json
import re
import signal
from pathlib import Path

import pytest
from conftest import Proc, start_server, start_worker
from faults import CutAfter, CuttingProxy

pytestmark = pytest.mark.slow

FAST = ["--model", "mnist-mlp", "--lr", "0.1", "--heartbeat-interval", "0.5"]
MODEL_BYTES = 199_210 * 4


def test_cuts_at_every_stage_a_straggler_and_sigterm_are_survived(
    shards: Path, tmp_path: Path, procs: list[Proc]
) -> None:
    metrics = tmp_path / "metrics.jsonl"
    flags = "--min-workers 3 --min-results 2 --rounds 500 --epochs 1 --fed-eval-every 0"
    server, port = start_server(
        procs,
        *flags.split(),
        "--round-timeout",
        "8",
        "--heartbeat-timeout",
        "20",
        "--metrics-out",
        str(metrics),
        *FAST,
    )
    proxy = CuttingProxy(
        port,
        [
            CutAfter("down", MODEL_BYTES // 2),  # 1st connection: mid-download, before training
            None,  # 2nd: cut by the test while it trains
            CutAfter("up", MODEL_BYTES // 2),  # 3rd: mid-upload
        ],
    )
    try:
        silos = [
            start_worker(procs, port, shards / f"shard-{i}.npz", f"silo-{i}") for i in range(2)
        ]
        victim = start_worker(procs, proxy.port, shards / "shard-2.npz", "victim")

        # The 1st cut may reset the connection before the worker read the coordinator's
        # welcome (a reset drops unread bytes), so that join may or may not be logged.
        proxy.wait_for_cuts(1, 120)
        assert victim.matching("training") == []  # the 1st cut came before training
        victim.wait_for_event("training")
        joined = len(victim.matching("joined"))
        proxy.cut_all("while training")
        victim.wait_for_event("joined", n=joined + 1)
        victim.wait_for_event("joined", n=joined + 2)  # after mid-upload
        assert len(proxy.cuts) == 3
        assert proxy.cuts[2].startswith("up after")
        # Each cut dropped the victim from its round (the others completed it).
        server.wait_for_event("worker_dropped", n=3, worker="victim")
        drops = server.matching("worker_dropped", worker="victim")[:3]
        assert all(re.search("stream|connection|left", d["reason"]) for d in drops), drops
        updates = len(victim.matching("update_sent"))  # one may be logged for the cut upload
        victim.wait_for_event("update_sent", n=updates + 1)  # rejoined: a full round

        # A straggler: frozen while training, past the round timeout.
        trained = len(victim.matching("training"))
        training = victim.wait_for_event("training", n=trained + 1)["round"]
        victim.signal(signal.SIGSTOP)
        # Its round's training takes well under a millisecond: the signal may land after it
        # answered that round, so the round it straggles in is the one the timeout names.
        timed_out = re.compile("^no result within")
        drop = server.wait_for_event(
            "worker_dropped", worker="victim", reason=timed_out, timeout=30
        )
        straggled = drop["round"]
        assert straggled in (training, training + 1), (training, drop)
        server.wait_for_event("round_completed", round=straggled, workers=2, timeout=30)
        victim.signal(signal.SIGCONT)
        server.wait_for_event("late_answer", worker="victim", round=straggled)
        updates = len(victim.matching("update_sent"))
        victim.wait_for_event("update_sent", n=updates + 1)  # and rejoined later rounds

        # Graceful SIGTERM: a worker leaves, then the coordinator stops before its last round,
        # which does not end the federation: the others keep reconnecting until stopped.
        silos[1].signal(signal.SIGTERM)
        assert silos[1].wait(30) == 0, silos[1].output
        assert "stopped by signal" in silos[1].output
        server.wait_for_event("worker_left", worker="silo-1", timeout=30)
        server.signal(signal.SIGTERM)
        assert server.wait(60) == 0, server.output
        for w in (silos[0], victim):
            w.wait_for_event("not_connected", timeout=30)
            w.signal(signal.SIGTERM)
            assert w.wait(30) == 0, w.output
            assert "federation over" not in w.output
    except AssertionError as exc:
        raise AssertionError(f"{exc}\n--- coordinator:\n{server.output[-3000:]}") from None
    finally:
        proxy.close()

    rows = [json.loads(line) for line in metrics.read_text().splitlines()]
    assert [r["round"] for r in rows] == list(range(1, len(rows) + 1))
    assert all(r["workers"] >= 2 for r in rows)
    # 3 cuts and 1 straggler, each a failure of the round it happened in.
    dropped = [line for line in server.output.splitlines() if "dropped" in line]
    assert sum(r["failures"] for r in rows) >= 4, (
        dropped,
        [(r["round"], r["failures"]) for r in rows],
    )
    assert proxy.cuts[0].startswith("down after")
    assert proxy.cuts[1] == "while training"
