"""What a user sees: progress displays, the summary, Prometheus metrics, compressed
federations, --help, and the MNIST benchmark script."""

from __future__ import annotations

import asyncio
import io
import json
import re
import subprocess
import sys
import threading
import urllib.request
from dataclasses import replace
from pathlib import Path
from typing import Any

import forked
import numpy as np
import pytest
from conftest import BIN
from rich.console import Console
from test_coordinator import TIMEOUT, ScriptedTrainer, config, initial_weights, run_worker

from fedcore.codec import make_header
from fedcore.errors import ConfigError
from fedcore.plan import ModelSpec, TrainConfig
from fedcore.server.reporting.metrics import RoundMetrics
from fedcore.server.reporting.progress import LiveDisplay, summary_line
from fedcore.server.reporting.prometheus import PrometheusExporter
from fedcore.server.reporting.sink import CoordinatorStatus
from fedcore.v1 import fedcore_pb2 as pb
from fedcore.weights import Weights

ROOT = Path(__file__).resolve().parent.parent


def _metrics(round_: int, accuracy: float, **kw: Any) -> RoundMetrics:
    return RoundMetrics(
        round=round_,
        workers=3,
        failures=0,
        duration_s=2.5,
        bytes_sent=4_000_000,
        bytes_received=2_000_000,
        accuracy=accuracy,
        loss=0.1,
        elapsed_s=2.5 * round_,
        **kw,
    )


def _status(last: RoundMetrics | None) -> CoordinatorStatus:
    return CoordinatorStatus(
        phase="training",
        round=2,
        rounds=5,
        connected=3,
        training=3,
        reported=1,
        min_workers=3,
        bytes_sent=8_000_000,
        bytes_received=4_000_000,
        elapsed_s=7.0,
        last=last,
    )


def test_live_panel_shows_round_workers_accuracy_and_epsilon() -> None:
    out = io.StringIO()
    display = LiveDisplay(Console(file=out, force_terminal=True, width=100))
    row = _metrics(1, 0.9751)
    row.train["epsilon"] = 0.0  # not an epsilon: only a top-level "epsilon" counts

    class WithEpsilon(RoundMetrics):
        def to_json(self) -> dict[str, Any]:
            return {**super().to_json(), "epsilon": 1.25}

    display.round_completed(row)
    text = Console(file=io.StringIO(), width=100)
    with text.capture() as capture:
        text.print(display.render(_status(row)))
    panel = capture.get()
    assert "round 2 of 5" in panel
    assert "3 connected (need 3), 1/3 reported this round" in panel
    assert "last round 1: accuracy 97.51%, loss 0.1000" in panel
    assert "epsilon" not in panel
    dp_row = WithEpsilon(**{**row.__dict__})
    with text.capture() as capture:
        text.print(display.render(_status(dp_row)))
    assert "epsilon 1.250" in capture.get()
    display.close(_status(row), [row])
    final = out.getvalue()
    assert "federation summary" in final
    assert "97.51%" in final
    assert "summary rounds=1 accuracy=0.9751" in final


def test_summary_line_is_parseable() -> None:
    line = summary_line([_metrics(1, 0.95), _metrics(2, 0.975)])
    fields = dict(part.split("=") for part in line.split()[1:])
    assert fields == {
        "rounds": "2",
        "accuracy": "0.9750",
        "loss": "0.1000",
        "elapsed_s": "5.0",
        "bytes_sent": "8000000",
        "bytes_received": "4000000",
    }


def _scrape(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
        return str(response.read().decode())


def _value(text: str, name: str) -> float:
    match = re.search(rf"^{name} ([0-9.e+-]+)$", text, re.MULTILINE)
    assert match, f"{name} not in:\n{text}"
    return float(match.group(1))


def test_prometheus_exporter_serves_rounds_workers_bytes_durations_and_epsilon() -> None:
    exporter = PrometheusExporter("127.0.0.1", 0)
    try:
        exporter.update(_status(None))
        exporter.round_completed(_metrics(1, 0.97))
        done = replace(_status(None), rounds_completed=1)
        exporter.update(done)
        exporter.update(done)  # the same totals again: counters do not double
        text = _scrape(exporter.port)
        assert _value(text, "fedcore_rounds_completed_total") == 1
        assert _value(text, "fedcore_rounds_planned") == 5
        assert _value(text, "fedcore_workers_connected") == 3
        assert _value(text, "fedcore_bytes_sent_total") == 8_000_000
        assert _value(text, "fedcore_bytes_received_total") == 4_000_000
        assert _value(text, "fedcore_round_duration_seconds_count") == 1
        assert _value(text, 'fedcore_round_duration_seconds_bucket{le="5.0"}') == 1
        assert _value(text, "fedcore_test_accuracy") == pytest.approx(0.97)
    finally:
        exporter.close(_status(None), [])


def test_prometheus_port_in_use_is_explained() -> None:
    first = PrometheusExporter("127.0.0.1", 0)
    try:
        with pytest.raises(ConfigError, match="pick another --metrics-port"):
            PrometheusExporter("127.0.0.1", first.port)
    finally:
        first.close(_status(None), [])


def test_bad_progress_and_metrics_port_are_refused() -> None:
    with pytest.raises(ConfigError, match="--progress must be auto, live or plain"):
        config(progress="fancy")
    with pytest.raises(ConfigError, match="--metrics-port must be a TCP port"):
        config(metrics_port=70000)
    with pytest.raises(ConfigError, match="--compression must be one of none, float16, int8"):
        config(compression="bfloat16")


class GatedTrainer(ScriptedTrainer):
    """Blocks its second fit until ``gate`` is set (at most TIMEOUT seconds)."""

    def __init__(self, offset: float, examples: int, gate: threading.Event) -> None:
        super().__init__(offset, examples)
        self.gate = gate

    def fit(self, model: ModelSpec, weights: Weights, config: TrainConfig) -> Any:
        if self.rounds_seen == 1:
            self.gate.wait(TIMEOUT)
        return super().fit(model, weights, config)


async def test_metrics_endpoint_of_a_running_federation(coordinator_factory: Any) -> None:
    gate = threading.Event()
    coordinator, task = await coordinator_factory(config(rounds=2, metrics_port=0))
    exporter = next(o for o in coordinator.sinks if isinstance(o, PrometheusExporter))
    workers = asyncio.gather(
        run_worker(coordinator.port, "a", GatedTrainer(1.0, 30, gate)),
        run_worker(coordinator.port, "b", GatedTrainer(1.0, 10, gate)),
    )
    try:
        for _ in range(200):  # round 1 done, round 2 held at the gate
            text = await asyncio.to_thread(_scrape, exporter.port)
            if "fedcore_rounds_completed_total 1.0" in text and "fedcore_round 2.0" in text:
                break
            await asyncio.sleep(0.1)
        assert _value(text, "fedcore_workers_connected") == 2
        assert _value(text, "fedcore_round_duration_seconds_count") == 1
        assert _value(text, "fedcore_bytes_received_total") > 2 * 7850 * 4
        status = coordinator.status()
        assert (status.round, status.connected, status.training) == (2, 2, 2)
    finally:
        gate.set()
    await asyncio.wait_for(workers, TIMEOUT)
    result = await asyncio.wait_for(task, TIMEOUT)
    assert [r.round for r in result.rounds] == [1, 2]
    assert result.rounds[1].elapsed_s >= result.rounds[0].elapsed_s > 0


@pytest.mark.parametrize(("scheme", "ratio"), [("float16", 2.0), ("int8", 4.0)])
async def test_compressed_federation_is_exact_for_representable_updates_and_smaller(
    coordinator_factory: Any, scheme: str, ratio: float
) -> None:
    results = {}
    for mode in ("none", scheme):
        coordinator, task = await coordinator_factory(config(rounds=2, compression=mode))
        # Offsets 0.5 and 0.25: exact in float16, and in int8 (every entry is the peak).
        await asyncio.gather(
            run_worker(coordinator.port, "a", ScriptedTrainer(0.5, 30)),
            run_worker(coordinator.port, "b", ScriptedTrainer(0.25, 10)),
        )
        results[mode] = await asyncio.wait_for(task, TIMEOUT)
    mean = (0.5 * 30 + 0.25 * 10) / 40
    for name, w0 in initial_weights().items():
        np.testing.assert_allclose(results[scheme].weights[name], w0 + 2 * mean, atol=1e-6)
    full = results["none"].rounds[0].bytes_received
    compressed = results[scheme].rounds[0].bytes_received
    assert full / compressed == pytest.approx(ratio, rel=0.1)


async def test_full_precision_update_to_a_compressed_federation_is_refused(
    coordinator_factory: Any,
) -> None:
    from raw_client import RawClient

    coordinator, _ = await coordinator_factory(config(min_workers=1, compression="int8"))
    client = RawClient(coordinator.port)
    try:
        await client.hello("old-worker")
        task, weights = await client.receive_task()
        assert task.train.extra["compression"] == 2.0
        # Only the header: the coordinator refuses it before any chunk.
        result = pb.TaskResult(
            task_id=task.task_id,
            num_examples=10,
            update=make_header(weights, 1024),
            update_kind=pb.UPDATE_KIND_WEIGHTS,
        )
        await client.send(pb.WorkerMessage(result=result))
        code, details = await client.final_status()
        assert code.name == "INVALID_ARGUMENT"
        assert "runs with --compression int8, but this worker sent full-precision" in details
    finally:
        await client.close()


@pytest.mark.slow
def test_help_reads_like_documentation() -> None:
    text = forked.run([str(BIN / "fed-server"), "--help"], timeout=60, check=True).stdout
    for flag in ("--compression", "--metrics-port", "--progress", "--log-json"):
        assert flag in text
    assert "error feedback" in text
    assert "Prometheus" in text


@pytest.mark.slow
def test_bench_mnist_smoke(tmp_path: Path) -> None:
    out = tmp_path / "bench"
    run = subprocess.run(
        [
            sys.executable,
            str(ROOT / "scripts" / "bench_mnist.py"),
            "--model",
            "mnist-mlp",
            "--workers",
            "2",
            "--examples-per-worker",
            "200",
            "--test-examples",
            "300",
            "--rounds",
            "2",
            "--lr",
            "0.1",
            "--target",
            "0.5",
            "--out",
            str(out),
            "--compare",
            "plain",
            # One federation for int8 uploads, non-IID data and DP-SGD silos: they do not
            # interact in what is checked (upload bytes, the scheme, the silos' epsilon).
            "int8:compression=int8,scheme=dirichlet,alpha=1,worker=--dpsgd-noise-multiplier 1.0",
        ],
        capture_output=True,
        text=True,
        timeout=280,
    )
    assert run.returncode == 0, run.stdout + run.stderr
    results = json.loads((out / "results.json").read_text())
    plain, int8 = results["runs"]
    assert [r["round"] for r in plain["rounds"]] == [1, 2]
    assert int8["config"]["scheme"] == "dirichlet"
    for r in plain["rounds"] + int8["rounds"]:
        assert 0.0 < r["accuracy"] <= 1.0
        assert r["elapsed_s"] > 0
        assert r["bytes_sent"] > 0
    # int8 updates: about a quarter of the upload bytes.
    up_plain = plain["rounds"][0]["bytes_received"]
    assert 3.5 < up_plain / int8["rounds"][0]["bytes_received"] < 4.5
    assert plain["target"]["round"] in (1, 2, None)
    # DP-SGD silos report their own epsilon, which grows round over round; plain has none.
    eps = [r["epsilon"] for r in int8["rounds"]]
    assert 0 < eps[0] < eps[1], eps
    assert all(r["epsilon"] is None for r in plain["rounds"])
    table = (out / "results.md").read_text()
    assert "| plain |" in table
    assert "| int8 |" in table
    assert "rounds to target" in table
    assert (out / "accuracy.png").read_bytes()[:4] == b"\x89PNG"


@pytest.mark.slow
def test_bench_mnist_explains_bad_specs(tmp_path: Path) -> None:
    run = subprocess.run(
        [
            sys.executable,
            str(ROOT / "scripts" / "bench_mnist.py"),
            "--out",
            str(tmp_path),
            "--compare",
            "x:lr=0.1,colour=red",
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert run.returncode == 2
    assert "bad setting 'colour=red'; known keys:" in run.stderr
