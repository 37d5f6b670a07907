"""The first hour of a new operator (issue 18): each trap they hit, one test per item.

1. a second coordinator on a taken port; 2. data that cannot fit the model; 3. TLS mistakes;
4. a worker's allowed coordinators; 5. configurations that cannot succeed; 6. the smaller
traps. Item 7 (setup warnings) is in test_packaging.py.
"""

from __future__ import annotations

import asyncio
import io
import logging
import re
import socket
import urllib.request
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from conftest import BIN, Proc, start_server
from cryptography import x509
from rich.console import Console
from test_coordinator import TIMEOUT, ScriptedTrainer, config, initial_weights, run_worker

from fedcore.certs_cli import main as certs_main
from fedcore.data import ArrayDataset, load_shard, save_shard
from fedcore.data.cli import main as data_main
from fedcore.errors import ConfigError, DataError, RejectedError, RoundFailedError
from fedcore.plan import ModelSpec, TrainConfig
from fedcore.privacy import ClientDP
from fedcore.privacy.dpsgd import DPSGD
from fedcore.secagg import SecAggParams
from fedcore.server import Coordinator
from fedcore.server.cli import build_parser as server_parser
from fedcore.server.engine.evaluation import CentralEvaluator
from fedcore.server.reporting.metrics import RoundMetrics
from fedcore.server.reporting.progress import LiveDisplay
from fedcore.server.reporting.prometheus import PrometheusExporter
from fedcore.server.reporting.sink import CoordinatorStatus
from fedcore.server.state.checkpoint import load_checkpoint
from fedcore.tls import ClientTLS
from fedcore.training import TrainResult
from fedcore.weights import Weights
from fedcore.worker import EchoTrainer, TorchTrainer, TrainingFailed, Worker
from fedcore.worker.runtime import tls_channel_factory

LOGREG = ModelSpec("logreg")


def _wait(proc: Proc, timeout: float = 60) -> Any:
    return asyncio.to_thread(proc.wait, timeout)


# ---------------------------------------------------------------- 1. one port, one coordinator


@pytest.mark.slow
async def test_1_a_second_coordinator_on_a_taken_port_is_refused(
    coordinator_factory: Any, procs: list[Proc]
) -> None:
    coordinator, _ = await coordinator_factory(config(min_workers=1))
    second = Proc(
        [
            str(BIN / "fed-server"),
            "--listen",
            f"127.0.0.1:{coordinator.port}",
            "--model",
            "logreg",
            "--min-workers",
            "1",
        ],
        "second fed-server",
    )
    procs.append(second)
    # Before the fix it printed "listening on" too and took half of the workers.
    first_word = await asyncio.to_thread(second.wait_for_line, r"listening on|error:", 60)
    assert first_word.group(0) == "error:", second.output
    assert await _wait(second) == 2
    assert (
        f"fed-server: error: cannot listen on 127.0.0.1:{coordinator.port}: the port is already "
        "in use (another fed-server may be running there); stop it, or pick another port"
    ) in second.output


# ---------------------------------------------------------------- 2. data that cannot fit


@pytest.mark.slow
async def test_2_data_that_cannot_fit_the_model_is_refused_before_any_round(
    tmp_path: Path,
    coordinator_factory: Any,
    procs: list[Proc],
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    images = np.zeros((20, 28, 28), np.uint8)
    bad_labels = save_shard(tmp_path / "labels.npz", images, np.arange(20) % 12)
    bad_shape = save_shard(
        tmp_path / "shape.npz", np.zeros((20, 32, 32), np.uint8), np.zeros(20, np.int64)
    )
    good = save_shard(tmp_path / "good.npz", images, np.arange(20) % 10)

    # A worker started for its model checks the shard before it connects (nobody listens).
    worker = Proc(
        [
            str(BIN / "fed-worker"),
            *("--server", "127.0.0.1:1", "--data", str(bad_labels), "--model", "logreg"),
            *("--name", "silo", "--give-up-after", "5"),
        ],
        "fed-worker",
    )
    procs.append(worker)
    assert await _wait(worker) == 2, worker.output
    assert (
        f"fed-worker: error: shard {bad_labels} does not fit model logreg: its labels range over "
        "0..11, the model has 10 classes (labels 0..9)"
    ) in worker.output
    assert "Traceback" not in worker.output

    # Without --model it checks when the coordinator's welcome names the model: no task runs.
    coordinator, _ = await coordinator_factory(config(rounds=1))
    with pytest.raises(DataError, match=r"examples of shape \(32, 32\) make the model fail"):
        await run_worker(coordinator.port, "silo", TorchTrainer(load_shard(bad_shape)))

    # The coordinator's --eval-data is checked before it serves.
    with pytest.raises(DataError, match=r"--eval-data .*labels\.npz does not fit model logreg"):
        Coordinator(config(eval_data=bad_labels))

    # An evaluation that fails anyway loses nothing: both rounds are trained and checkpointed.
    def broken(self: CentralEvaluator, weights: Weights) -> Any:
        raise RuntimeError("disk gone")

    monkeypatch.setattr(CentralEvaluator, "evaluate", broken)
    checkpoints = tmp_path / "checkpoints"
    coordinator, task = await coordinator_factory(
        config(min_workers=1, rounds=2, eval_data=good, checkpoint_dir=checkpoints)
    )
    await run_worker(coordinator.port, "a", ScriptedTrainer(1.0, 10))
    result = await asyncio.wait_for(task, TIMEOUT)
    assert [(r.round, r.accuracy) for r in result.rounds] == [(1, None), (2, None)]
    checkpoint = load_checkpoint(checkpoints)
    assert checkpoint is not None
    assert checkpoint.round == 2
    for name, w0 in initial_weights().items():
        np.testing.assert_allclose(result.weights[name], w0 + 2.0, atol=1e-5)
    assert "round 1: centralized evaluation failed (RuntimeError: disk gone)" in caplog.text


# ---------------------------------------------------------------- 3. TLS mistakes


@pytest.mark.slow
async def test_3_tls_certificates_name_what_was_promised_and_mistakes_take_one_line(
    tmp_path: Path,
    procs: list[Proc],
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    certs = tmp_path / "certs"
    assert certs_main(["init", "--dir", str(certs), "--server-name", "coord.example.org"]) == 0
    assert certs_main(["add-worker", "--dir", str(certs), "lab", "--no-token"]) == 0
    pem = x509.load_pem_x509_certificate((certs / "server.pem").read_bytes())
    sans = pem.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert set(sans.get_values_for_type(x509.DNSName)) == {"coord.example.org", "localhost"}
    assert [str(ip) for ip in sans.get_values_for_type(x509.IPAddress)] == ["127.0.0.1"]

    # The coordinator's own gRPC core logging is what the CLI decides, not this process.
    monkeypatch.delenv("GRPC_VERBOSITY", raising=False)
    server, port = start_server(
        procs,
        *("--model", "logreg", "--min-workers", "1", "--rounds", "1"),
        *("--tls-cert", str(certs / "server.pem"), "--tls-key", str(certs / "server.key")),
        *("--tls-client-ca", str(certs / "ca.pem")),
    )
    worker_pem = (certs / "workers" / "lab.pem", certs / "workers" / "lab.key")

    def worker(tls: ClientTLS) -> Worker:
        return Worker(
            f"127.0.0.1:{port}",
            "lab",
            EchoTrainer(),
            channel_factory=tls_channel_factory(tls),
            tls=tls,
            backoff_initial=0.05,
            give_up_after=1.0,
        )

    wrong_name = ClientTLS(certs / "ca.pem", *worker_pem, server_name="coord.example.com")
    with pytest.raises(RejectedError) as refused:
        await asyncio.wait_for(worker(wrong_name).run(), TIMEOUT)
    assert str(refused.value) == (
        "TLS: the coordinator's certificate does not name 'coord.example.com' "
        "(--tls-server-name); pass --tls-server-name with a name its certificate holds (the "
        "--server-name given to `fed-certs init`), or reissue the certificate for "
        "coord.example.com"
    )

    caplog.set_level("INFO", logger="fedcore")
    with pytest.raises(RejectedError, match="could not reach"):
        await asyncio.wait_for(worker(ClientTLS(certs / "ca.pem")).run(), TIMEOUT)
    hints = [r for r in caplog.records if "--tls-cert and --tls-key" in r.getMessage()]
    assert [r.levelno for r in hints] == [logging.WARNING], caplog.text

    # The positive control: 127.0.0.1, as promised, with the worker's certificate.
    await asyncio.wait_for(worker(ClientTLS(certs / "ca.pem", *worker_pem)).run(), TIMEOUT)
    assert await _wait(server) == 0, server.output
    assert not re.search(r"^[IWE]\d{4} ", server.output, re.MULTILINE), server.output


# ---------------------------------------------------------------- 4. identity before data


@pytest.mark.slow
def test_4_a_worker_checks_the_coordinator_before_it_sends_anything(
    tmp_path: Path, procs: list[Proc]
) -> None:
    assert certs_main(["init", "--dir", str(tmp_path / "certs")]) == 0
    shard = save_shard(tmp_path / "silo.npz", np.zeros((20, 28, 28), np.uint8), np.arange(20) % 10)
    (tmp_path / "silo.meta.toml").write_text('name = "silo"\ntags = ["#mnist"]\n')
    ledger = tmp_path / "ledger.json"
    policy = tmp_path / "policy.toml"
    policy.write_text(
        '[coordinators]\nallowed = ["coord.example.org"]\n'
        f'[budget]\nstudy = "s"\nepsilon = 8.0\ndelta = 1e-5\nledger = "{ledger}"\n'
        "[dataset]\nrelease-label-histogram = true\nlabel-histogram-noise-multiplier = 20.0\n"
        "label-histogram-labels = 10\n"
    )
    # A coordinator that is not on the list; it would see the hello if the worker connected.
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        listener.setblocking(False)
        port = listener.getsockname()[1]
        worker = Proc(
            [
                str(BIN / "fed-worker"),
                *("--server", f"127.0.0.1:{port}", "--data", str(shard), "--name", "silo"),
                *("--tls-ca", str(tmp_path / "certs" / "ca.pem"), "--policy", str(policy)),
                *("--give-up-after", "3"),
            ],
            "fed-worker",
        )
        procs.append(worker)
        assert worker.wait(60) == 2, worker.output
        with pytest.raises(BlockingIOError):
            listener.accept()
    assert (
        "[coordinators] allowed lists coord.example.org, and this worker would connect to "
        "'127.0.0.1'"
    ) in worker.output
    assert "nothing was sent" in worker.output
    assert not ledger.exists()  # no label histogram was made, nothing was charged


# ---------------------------------------------------------------- 5. doomed configurations


def _nan_train(model: Any, data: Any, config: TrainConfig, device: Any) -> TrainResult:
    for p in model.parameters():
        p.data.fill_(float("nan"))
    return TrainResult(num_examples=4, loss=float("nan"), accuracy=0.0, seconds=0.0)


class _NanDPSGD(DPSGD):
    def __call__(self, model: Any, data: Any, config: TrainConfig, device: Any) -> TrainResult:
        return _nan_train(model, data, config, device)


async def test_5_configurations_that_cannot_succeed_are_refused_at_start(
    coordinator_factory: Any, caplog: pytest.LogCaptureFixture
) -> None:
    with pytest.raises(ConfigError) as doomed:
        Coordinator(config(strategy="krum", strategy_options={"num-byzantine": 1}, min_workers=3))
    assert str(doomed.value) == (
        "strategy Krum needs at least 5 updates per round, and rounds would complete with 3 "
        "(--min-workers 3); pass --min-workers 5 and start at least 5 workers"
    )
    Coordinator(config(strategy="krum", strategy_options={"num-byzantine": 1}, min_workers=5))
    with pytest.raises(ConfigError, match=r"round 1 would start with 1 \(--min-workers\); pass"):
        config(min_workers=1, secagg=SecAggParams(threshold=0.5))
    config(min_workers=2, secagg=SecAggParams(threshold=0.5))

    # Weights that turn NaN: the hint names the noise when the plan or the worker adds some.
    data = ArrayDataset(np.zeros((4, 28, 28), np.uint8), np.arange(4) % 10)
    weights = initial_weights()
    plain = TrainConfig(learning_rate=0.05)
    with pytest.raises(TrainingFailed, match=r"lower the learning rate \(--lr, now 0\.05\)"):
        TorchTrainer(data, train_fn=_nan_train).fit(LOGREG, weights, plain)
    dp_plan = TrainConfig(extra=ClientDP(clip_norm=1.0, noise_multiplier=4.0).to_extra())
    with pytest.raises(TrainingFailed, match=r"DP noise \(noise multiplier 4, clip norm 1\)"):
        TorchTrainer(data, train_fn=_nan_train).fit(LOGREG, weights, dp_plan)
    silo = _NanDPSGD(noise_multiplier=3.0, max_grad_norm=1.0)
    with pytest.raises(TrainingFailed, match=r"DP-SGD's gradient noise \(noise multiplier 3\)"):
        TorchTrainer(data, train_fn=silo).fit(LOGREG, weights, plain)

    # A failure the worker reports for this very plan is not retried blindly.
    class Diverging(ScriptedTrainer):
        def fit(self, model: ModelSpec, weights: Weights, config: TrainConfig) -> Any:
            self.rounds_seen += 1
            raise TrainingFailed("training produced NaN/Inf in 'linear.weight'")

    coordinator, task = await coordinator_factory(config(min_workers=1, rounds=1, round_retries=3))
    diverging = Diverging(0.0, 10)
    worker = asyncio.create_task(run_worker(coordinator.port, "a", diverging))
    with pytest.raises(RoundFailedError, match="round 1 cannot succeed: 0 valid result"):
        await asyncio.wait_for(task, TIMEOUT)
    await asyncio.wait_for(worker, TIMEOUT)
    assert diverging.rounds_seen == 1
    # ... and the coordinator logs the worker's answer once (it logged it twice, worded twice).
    server_lines = [
        r for r in caplog.records if r.name == "fedcore.server" and "NaN/Inf" in r.getMessage()
    ]
    assert len(server_lines) == 1, caplog.text


# ---------------------------------------------------------------- 6. the smaller traps


def _row(round_: int) -> RoundMetrics:
    return RoundMetrics(
        round=round_,
        workers=12,
        failures=1,
        duration_s=103.5,
        bytes_sent=400_000_000,
        bytes_received=200_000_000,
        accuracy=0.9876,
        loss=0.1234,
        elapsed_s=1234.5 * round_,
        fit_s=100.2,
        eval_s=3.3,
    )


async def test_6_the_smaller_traps(
    tmp_path: Path,
    coordinator_factory: Any,
    caplog: pytest.LogCaptureFixture,
    capsys: pytest.CaptureFixture[str],
) -> None:
    caplog.set_level("INFO", logger="fedcore")
    # --listen without a port (gRPC would bind 443).
    with pytest.raises(ConfigError, match="--listen 'localhost' needs HOST:PORT"):
        config(listen="localhost")

    # A duplicate name: one warning that says what to do, then the usual retries.
    checkpoints = tmp_path / "checkpoints"
    coordinator, task = await coordinator_factory(
        config(min_workers=2, rounds=1, checkpoint_dir=checkpoints)
    )
    first = asyncio.create_task(run_worker(coordinator.port, "a", ScriptedTrainer(1.0, 10)))
    assert await coordinator.registry.wait_for_idle(1, TIMEOUT)
    twin = Worker(
        f"127.0.0.1:{coordinator.port}",
        "a",
        ScriptedTrainer(1.0, 10),
        backoff_initial=0.05,
        give_up_after=1.0,
    )
    with pytest.raises(RejectedError, match="could not reach"):
        await asyncio.wait_for(twin.run(), TIMEOUT)
    hints = [r for r in caplog.records if "give each worker a unique --name" in r.getMessage()]
    assert [r.levelno for r in hints] == [logging.WARNING]

    second = asyncio.create_task(run_worker(coordinator.port, "b", ScriptedTrainer(3.0, 30)))
    first_run = await asyncio.wait_for(task, TIMEOUT)
    await asyncio.wait_for(asyncio.gather(first, second), TIMEOUT)
    status = coordinator.status()
    assert (status.training, status.reported, status.rounds_completed) == (2, 2, 1)
    assert "federation over: training finished after 1 round" in caplog.text
    assert "the federation is over" not in caplog.text

    # --resume: elapsed_s goes on from the checkpoint's rows instead of restarting at 0.
    coordinator, task = await coordinator_factory(
        config(min_workers=2, rounds=2, checkpoint_dir=checkpoints, resume=True)
    )
    workers = asyncio.gather(
        run_worker(coordinator.port, "a", ScriptedTrainer(1.0, 10)),
        run_worker(coordinator.port, "b", ScriptedTrainer(3.0, 30)),
    )
    rows = (await asyncio.wait_for(task, TIMEOUT)).rounds
    await asyncio.wait_for(workers, TIMEOUT)
    assert rows[0].elapsed_s == first_run.rounds[0].elapsed_s > 0
    assert rows[1].elapsed_s >= rows[0].elapsed_s + rows[1].fit_s - 0.002

    # Prometheus: rounds counted once aggregated (from the status), no epsilon without DP.
    exporter = PrometheusExporter("127.0.0.1", 0)
    try:
        exporter.update(_status(rounds_completed=2))
        exporter.round_completed(rows[0])
        url = f"http://127.0.0.1:{exporter.port}/metrics"
        text = await asyncio.to_thread(lambda: urllib.request.urlopen(url, timeout=10).read())
        assert b"fedcore_rounds_completed_total 2.0" in text
        assert b"fedcore_dp_epsilon" not in text
    finally:
        exporter.close(_status(rounds_completed=2), [])

    # The live summary on an 80-column terminal: whole columns, an unbroken summary line.
    out = io.StringIO()
    LiveDisplay(Console(file=out, width=80, force_terminal=True)).close(
        _status(rounds_completed=2), [_row(1), _row(2)]
    )
    shown = out.getvalue()
    assert "…" not in shown
    assert "98.76%" in shown
    assert "2469.0" in shown
    assert any(
        line.startswith("summary rounds=2") and line.endswith("bytes_received=400000000")
        for line in shown.splitlines()
    ), shown

    # --alpha with a scheme that ignores it.
    split = ["split", "--out", str(tmp_path / "shards"), "--num-shards", "2"]
    assert data_main([*split, "--alpha", "0.1"]) == 2
    assert "--alpha applies to --scheme dirichlet only, not --scheme iid" in capsys.readouterr().err

    # A mistyped flag: one usage line, then the error.
    with pytest.raises(SystemExit):
        server_parser().parse_args(["--roundz", "3"])
    assert capsys.readouterr().err.splitlines() == [
        "usage: fed-server [options]",
        "fed-server: error: unrecognized arguments: --roundz 3",
    ]


def _status(*, rounds_completed: int) -> CoordinatorStatus:
    return CoordinatorStatus(
        phase="finished",
        round=2,
        rounds=2,
        connected=0,
        training=2,
        reported=2,
        min_workers=2,
        bytes_sent=0,
        bytes_received=0,
        elapsed_s=2469.0,
        last=None,
        rounds_completed=rounds_completed,
    )
