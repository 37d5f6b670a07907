"""The coordinator holds under hostile workers: each limit of docs/coordinator-hardening.md is
attacked by in-process gRPC clients speaking the v1 protocol, with an honest control in the
same test showing the harness reaches the code and honest work still goes through."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from raw_client import RawClient
from test_coordinator import (
    TIMEOUT,
    ScriptedTrainer,
    config,
    initial_weights,
    run_worker,
)

from fedcore.certs import CertificateAuthority
from fedcore.certs_cli import main as fed_certs
from fedcore.codec import iter_chunks, make_header
from fedcore.errors import AuthenticationError, ConfigError
from fedcore.plan import ModelSpec, TrainConfig
from fedcore.protocol import PROTOCOL_VERSION
from fedcore.sanitize import printable
from fedcore.server.cli import build_parser, config_from_args
from fedcore.server.state.checkpoint import load_checkpoint
from fedcore.server.state.limits import GateLimits
from fedcore.server.transport.admission import HandshakeGate, HandshakeRefused, peer_host
from fedcore.server.transport.limits import grpc_limit_options
from fedcore.strategy import FedAvg, UpdateAccess
from fedcore.tls import ClientTLS, ServerTLS
from fedcore.v1 import fedcore_pb2 as pb
from fedcore.weights import Weights
from fedcore.worker import EvalOutput, FitOutput, Worker
from fedcore.worker.runtime import tls_channel_factory


async def _until(condition: Any, timeout: float = TIMEOUT) -> None:
    """Poll ``condition()`` until true (bounded)."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.02)


async def _hello(client: RawClient, name: str, examples: int, **fields: Any) -> None:
    hello = pb.Hello(name=name, protocol_version=PROTOCOL_VERSION, num_examples=examples, **fields)
    await client.send(pb.WorkerMessage(hello=hello))
    welcome = await asyncio.wait_for(client.call.read(), TIMEOUT)
    assert welcome.WhichOneof("body") == "welcome"


# ---------------------------------------------------------------- 1. who may open streams


def test_flags_and_defaults_of_the_limits() -> None:
    args = build_parser().parse_args([])
    cfg = config_from_args(args).limits
    assert (cfg.max_pending_handshakes, cfg.max_pending_per_host) == (128, 32)
    assert (cfg.handshake_rate, cfg.handshake_burst) == (20.0, 100)
    assert dict(grpc_limit_options(cfg)) == {
        "grpc.max_concurrent_streams": 8,
        "grpc.max_connection_idle_ms": 300_000,
        "grpc.max_connection_age_ms": 3_600_000,
    }
    assert (cfg.upload_min_rate, cfg.max_examples, cfg.enrollment_poll) == (16384.0, 10**7, 1.0)
    # TLS alone off loopback: refused with the way out; --insecure is the operator's word.
    tls = ["--tls-cert", "s.pem", "--tls-key", "s.key", "--listen", "0.0.0.0:1"]
    with pytest.raises(ConfigError, match="without worker authentication"):
        config_from_args(build_parser().parse_args(tls))
    assert config_from_args(build_parser().parse_args([*tls, "--insecure"])).security.insecure
    assert config_from_args(build_parser().parse_args([*tls, "--enrolled", "e.json"]))
    with pytest.raises(ConfigError, match="--handshake-burst"):
        config(handshake_burst=0)


def test_handshake_gate_bounds_pending_streams_and_reopen_rate() -> None:
    now = [0.0]
    gate = HandshakeGate(
        GateLimits(max_pending=3, max_pending_per_host=2, rate_per_host=1.0, burst_per_host=3),
        clock=lambda: now[0],
    )
    assert peer_host("ipv4:10.0.0.1:5555") == "10.0.0.1"
    assert peer_host("ipv6:[::1]:5555") == "::1"
    with contextlib.ExitStack() as held:
        held.enter_context(gate.admit("ipv4:10.0.0.1:1"))
        held.enter_context(gate.admit("ipv4:10.0.0.1:2"))
        with pytest.raises(HandshakeRefused, match=r"from 10\.0\.0\.1 are waiting"):
            held.enter_context(gate.admit("ipv4:10.0.0.1:3"))
        held.enter_context(gate.admit("ipv4:10.0.0.2:1"))  # another host: its own allowance
        with pytest.raises(HandshakeRefused, match=r"waiting for their hello \(3\)"):
            held.enter_context(gate.admit("ipv4:10.0.0.3:1"))
        assert gate.pending == 3
    assert gate.pending == 0
    # 10.0.0.1 opened 3 streams, its whole burst (refused ones count): reopening is refused...
    with (
        pytest.raises(HandshakeRefused, match=r"too many new streams from 10\.0\.0\.1"),
        gate.admit("ipv4:10.0.0.1:4"),
    ):
        pass
    # ...until the bucket refills at 1/s.
    now[0] += 1.0
    with gate.admit("ipv4:10.0.0.1:5"):
        pass
    assert gate.refused == 3


async def test_silent_streams_are_capped_and_honest_workers_still_join(
    coordinator_factory: Any, raw_clients: Any
) -> None:
    coordinator, task = await coordinator_factory(
        config(rounds=1, min_workers=1, max_pending_handshakes=3, handshake_rate=0)
    )
    gate = coordinator.service.gate
    silent = [raw_clients(coordinator.port) for _ in range(3)]
    for client in silent:
        await client.call.wait_for_connection()
    await _until(lambda: gate.pending == 3)
    extra = raw_clients(coordinator.port)
    code, details = await extra.final_status()
    assert code == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "waiting for their hello (3)" in details
    # Control: once the silent streams go, an honest worker joins and the round completes.
    for client in silent:
        client.call.cancel()
    await _until(lambda: gate.pending == 0)
    await run_worker(coordinator.port, "honest", ScriptedTrainer(1.0, 10))
    assert (await asyncio.wait_for(task, TIMEOUT)).rounds[0].workers == 1


async def test_reopening_streams_fast_is_refused(
    coordinator_factory: Any, raw_clients: Any
) -> None:
    coordinator, _ = await coordinator_factory(
        config(rounds=1, min_workers=1, handshake_rate=0.5, handshake_burst=2)
    )
    codes = []
    for _ in range(3):
        client = raw_clients(coordinator.port)
        try:
            await client.send(pb.WorkerMessage(heartbeat=pb.Heartbeat()))  # not a hello: refused
        except grpc.aio.AioRpcError as exc:  # the refusal can end the stream before the write
            codes.append(exc.code())
            continue
        codes.append((await client.final_status())[0])
    assert codes[:2] == [grpc.StatusCode.INVALID_ARGUMENT] * 2  # reached the handshake
    assert codes[2] == grpc.StatusCode.RESOURCE_EXHAUSTED


async def test_grpc_connection_limits_apply(coordinator_factory: Any, raw_clients: Any) -> None:
    coordinator, _ = await coordinator_factory(
        config(rounds=1, min_workers=3, max_streams_per_connection=2, max_connection_idle=0.5)
    )
    # An idle connection (no RPC) is closed by the server: the channel falls back to IDLE.
    async with grpc.aio.insecure_channel(f"127.0.0.1:{coordinator.port}") as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        await stub.Check(health_pb2.HealthCheckRequest(), timeout=TIMEOUT)
        assert channel.get_state() is grpc.ChannelConnectivity.READY
        await asyncio.wait_for(
            channel.wait_for_state_change(grpc.ChannelConnectivity.READY), TIMEOUT
        )
    # Two streams fill one connection; a third on it waits until one of them ends.
    client = raw_clients(coordinator.port)
    await _hello(client, "one", 10)
    second = client.channel.stream_stream(
        "/fedcore.v1.Coordinator/Join",
        request_serializer=pb.WorkerMessage.SerializeToString,
        response_deserializer=pb.CoordinatorMessage.FromString,
    )
    calls = [second(), second()]
    hello = pb.Hello(name="two", protocol_version=PROTOCOL_VERSION, num_examples=1)
    await calls[0].write(pb.WorkerMessage(hello=hello))
    assert (await asyncio.wait_for(calls[0].read(), TIMEOUT)).WhichOneof("body") == "welcome"
    hello = pb.Hello(name="three", protocol_version=PROTOCOL_VERSION, num_examples=1)
    write = asyncio.create_task(calls[1].write(pb.WorkerMessage(hello=hello)))
    read = asyncio.create_task(calls[1].read())
    done, _ = await asyncio.wait({read}, timeout=0.5)
    assert not done
    assert len(coordinator.registry) == 2
    client.call.cancel()
    assert (await asyncio.wait_for(read, TIMEOUT)).WhichOneof("body") == "welcome"
    await write
    for call in calls:
        call.cancel()


# ---------------------------------------------------------------- 2. uploads


def _result(task_id: str, weights: Weights, examples: int) -> pb.WorkerMessage:
    header = make_header(weights, 1024)
    return pb.WorkerMessage(
        result=pb.TaskResult(
            task_id=task_id,
            num_examples=examples,
            update=header,
            update_kind=pb.UPDATE_KIND_WEIGHTS,
        )
    )


async def test_a_trickling_upload_loses_its_slot(
    coordinator_factory: Any, raw_clients: Any, caplog: pytest.LogCaptureFixture
) -> None:
    """One chunk every 0.3 s never looks idle (--upload-idle-timeout 1 s), but averages far
    below --upload-min-rate: dropped, and the honest upload goes through."""
    caplog.set_level(logging.WARNING, "fedcore.server")
    coordinator, task = await coordinator_factory(
        config(rounds=1, min_workers=2, min_results=1, upload_idle_timeout=1.0)
    )
    trickler = raw_clients(coordinator.port)
    await trickler.hello("trickler")
    honest = asyncio.create_task(run_worker(coordinator.port, "honest", ScriptedTrainer(1.0, 10)))
    task_msg, weights = await trickler.receive_task()

    async def trickle() -> None:
        with contextlib.suppress(grpc.aio.AioRpcError, asyncio.CancelledError):
            await trickler.send(_result(task_msg.task_id, weights, 10))
            for i, data in enumerate(iter_chunks(weights, 1024)):
                await trickler.send(pb.WorkerMessage(chunk=pb.PayloadChunk(index=i, data=data)))
                await asyncio.sleep(0.3)  # pacing of the attack, not synchronisation

    sender = asyncio.create_task(trickle())
    outcome = await asyncio.wait_for(task, TIMEOUT)
    sender.cancel()
    await honest
    assert "below --upload-min-rate" in caplog.text
    assert outcome.rounds[0].workers == 1
    for name, w0 in initial_weights().items():
        np.testing.assert_allclose(outcome.weights[name], w0 + 1.0, atol=1e-6)


async def test_every_upload_slot_is_released_when_its_round_ends(
    coordinator_factory: Any, raw_clients: Any, caplog: pytest.LogCaptureFixture
) -> None:
    """A worker that takes the only upload slot and sends nothing, with the idle and rate
    limits far away: the slot comes back when the round ends, so the retry succeeds. (With a
    strategy that stages updates whole: a streaming one's uploads take no slot.)"""

    class StagedFedAvg(FedAvg):
        update_access = UpdateAccess.WHOLE

    caplog.set_level(logging.INFO, "fedcore.server")
    coordinator, task = await coordinator_factory(
        config(
            rounds=1,
            min_workers=2,
            min_results=1,
            round_timeout=2,
            upload_idle_timeout=600,
            heartbeat_timeout=600,
            upload_min_rate=0,
        ),
        strategy=StagedFedAvg(),
    )
    holder = raw_clients(coordinator.port)
    await holder.hello("holder")
    gate = asyncio.Event()

    class Late(ScriptedTrainer):
        def fit(self, model: ModelSpec, weights: Weights, config: TrainConfig) -> FitOutput:
            if self.rounds_seen == 0:
                asyncio.run_coroutine_threadsafe(gate.wait(), loop).result(TIMEOUT)
            return super().fit(model, weights, config)

    loop = asyncio.get_running_loop()
    honest = asyncio.create_task(run_worker(coordinator.port, "honest", Late(1.0, 10)))
    task_msg, weights = await holder.receive_task()
    await holder.send(_result(task_msg.task_id, weights, 10))  # takes the slot, then silence
    await _until(lambda: coordinator.service.upload_slots_full)  # before the honest upload
    gate.set()  # the honest upload of attempt 1 now queues for the slot
    outcome = await asyncio.wait_for(task, TIMEOUT)
    await honest
    assert "round 1 ended during worker 'holder''s upload; its upload slot is free" in caplog.text
    # Attempt 1 times out (the honest upload waited for the slot); a retry then gets it.
    assert outcome.rounds[0].attempts >= 2
    assert outcome.rounds[0].workers == 1
    for name, w0 in initial_weights().items():
        np.testing.assert_allclose(outcome.weights[name], w0 + 1.0, atol=1e-6)


async def test_lying_example_counts_are_clamped_and_the_round_continues(
    coordinator_factory: Any, raw_clients: Any, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, "fedcore.server")
    coordinator, task = await coordinator_factory(config(rounds=1, min_workers=2, max_examples=20))
    liar = raw_clients(coordinator.port)
    await _hello(liar, "liar", 10**6)  # above --max-examples: counted as 20
    honest = asyncio.create_task(run_worker(coordinator.port, "honest", ScriptedTrainer(1.0, 20)))
    task_msg, weights = await liar.receive_task()
    shifted = {k: v + np.float32(3.0) for k, v in weights.items()}
    await liar.send(_result(task_msg.task_id, shifted, 10**9))
    for i, data in enumerate(iter_chunks(shifted, 1024)):
        await liar.send(pb.WorkerMessage(chunk=pb.PayloadChunk(index=i, data=data)))
    outcome = await asyncio.wait_for(task, TIMEOUT)
    await honest
    assert "announced 1000000 examples, more than --max-examples 20" in caplog.text
    assert "claims 1000000000 examples but announced 20" in caplog.text
    # Weighted 20:20, not 10^9:20 -- the liar counts, but only as much as an honest peer.
    assert outcome.rounds[0].workers == 2
    for name, w0 in initial_weights().items():
        np.testing.assert_allclose(outcome.weights[name], w0 + 2.0, atol=1e-5)


# ---------------------------------------------------------------- 3. strings from workers


async def test_worker_strings_are_sanitised_before_the_log(
    coordinator_factory: Any, raw_clients: Any, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, "fedcore.server")
    evil = "\x1b[2J\x1b]0;pwned\x07\r\n2026 INFO forged line\u202e" + "x" * 5000
    assert printable("plain name-1.ok") == "plain name-1.ok"
    shown = printable(evil)
    assert "\x1b" not in shown
    assert "\r" not in shown
    assert "\u202e" not in shown
    assert shown.endswith("more]")
    assert len(shown) < 250
    coordinator, _ = await coordinator_factory(config(rounds=1, min_workers=2))
    bad_name = raw_clients(coordinator.port)
    await bad_name.send(
        pb.WorkerMessage(hello=pb.Hello(name=evil, protocol_version=PROTOCOL_VERSION))
    )
    code, details = await bad_name.final_status()
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    client = raw_clients(coordinator.port)
    await _hello(client, "mallory", 10, dataset=pb.DatasetInfo(name=evil, license=evil))
    honest = asyncio.create_task(run_worker(coordinator.port, "honest", ScriptedTrainer(1.0, 10)))
    task_msg, _ = await client.receive_task()
    # Taken before the error: a round whose every missing worker reported a failure ends at
    # once, and with it mallory's session.
    session = coordinator.registry.by_name("mallory")
    assert session is not None
    await client.send(pb.WorkerMessage(error=pb.TaskError(task_id=task_msg.task_id, message=evil)))
    await _until(lambda: "could not run its task" in caplog.text)
    assert session.dataset is not None
    for text in (caplog.text, details, session.dataset.name, session.dataset.license):
        assert "\x1b" not in text
        assert "\r\n2026" not in text
        assert "\u202e" not in text
    assert "forged line" in caplog.text  # control: the message itself was logged
    coordinator.stop()
    honest.cancel()  # stopped before its last round, the coordinator leaves it reconnecting
    with contextlib.suppress(BaseException):
        await honest


# ---------------------------------------------------------------- 4. identities


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("certs")
    assert fed_certs(["init", "--dir", str(root), "--workers", "a,b"]) == 0
    return root


def _worker(port: int, name: str, certs: Path, cert: Path | None = None, **kw: Any) -> Worker:
    cert = cert or certs / "workers" / f"{name}.pem"
    key = cert.with_suffix(".key")
    token = (certs / "workers" / f"{name}.token").read_text().strip()
    factory = tls_channel_factory(ClientTLS(certs / "ca.pem", cert, key))
    return Worker(
        f"localhost:{port}",
        name,
        ScriptedTrainer(1.0, 10),
        backoff_initial=0.05,
        give_up_after=TIMEOUT,
        channel_factory=factory,
        token=token,
        **kw,
    )


async def test_certificates_are_pinned_and_removal_disconnects_at_once(
    coordinator_factory: Any, certs: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, "fedcore.server")
    enrolled = tmp_path / "enrolled.json"
    enrolled.write_bytes((certs / "enrolled.json").read_bytes())
    entries = json.loads(enrolled.read_text())["workers"]
    assert all(len(e["cert_sha256"]) == 64 for e in entries.values())
    tls = ServerTLS(certs / "server.pem", certs / "server.key", certs / "ca.pem")
    coordinator, task = await coordinator_factory(
        config(
            rounds=1,
            min_workers=3,  # no round starts: a and b stay connected until the end
            listen="localhost:0",
            tls=tls,
            enrolled=enrolled,
            enrollment_poll=0.1,
        )
    )
    port = coordinator.port
    # The CA signs a second certificate for "a" (a re-issue, or a careless CA): same common
    # name, same token, but not the enrolled certificate.
    other = tmp_path / "a-other.pem"
    CertificateAuthority.load(certs / "ca.pem", certs / "ca.key").issue_worker("a").write(
        other, other.with_suffix(".key")
    )
    with pytest.raises(AuthenticationError, match="certificate other than the one enrolled"):
        await asyncio.wait_for(_worker(port, "a", certs, other).run(), TIMEOUT)
    # Control: the enrolled certificates join.
    a = asyncio.create_task(_worker(port, "a", certs).run())
    b = asyncio.create_task(_worker(port, "b", certs).run())
    await _until(lambda: len(coordinator.registry.idle()) == 2)
    # Removing "a" from the file revokes it: its open stream is closed by the timer, without
    # any new handshake, and its reconnection is refused.
    body = json.loads(enrolled.read_text())
    del body["workers"]["a"]
    enrolled.write_text(json.dumps(body))
    with pytest.raises(AuthenticationError, match="'a' is not enrolled"):
        await asyncio.wait_for(a, TIMEOUT)
    assert "worker 'a' was revoked; closing its stream" in caplog.text
    assert coordinator.registry.by_name("b") is not None  # the others stay
    coordinator.stop()
    await asyncio.wait_for(task, TIMEOUT)
    # Stopped before its last round: b is not told the federation is over; it reconnects.
    assert not b.done()
    b.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await b


# ---------------------------------------------------------------- 5. checkpoints


async def test_a_rounds_model_leaves_only_after_its_checkpoint_is_on_disk(
    coordinator_factory: Any, tmp_path: Path
) -> None:
    ckpt = tmp_path / "ckpt"
    seen: list[tuple[str, int, int | None, bool]] = []

    class Witness(ScriptedTrainer):
        """Checks, whenever weights arrive, that they are the checkpoint's (or the initial
        model, before any round)."""

        def _check(self, kind: str, weights: Weights) -> None:
            on_disk = load_checkpoint(ckpt)
            if on_disk is None:
                same = all(np.array_equal(weights[k], v) for k, v in initial_weights().items())
                seen.append((kind, self.rounds_seen, None, same))
                return
            same = all(np.array_equal(weights[k], on_disk.weights[k]) for k in weights)
            seen.append((kind, self.rounds_seen, on_disk.round, same))

        def fit(self, model: ModelSpec, weights: Weights, config: TrainConfig) -> FitOutput:
            self._check("fit", weights)
            return super().fit(model, weights, config)

        def evaluate(self, model: ModelSpec, weights: Weights) -> EvalOutput:
            self._check("evaluate", weights)
            return super().evaluate(model, weights)

    save = tmp_path / "model.safetensors"
    coordinator, task = await coordinator_factory(
        config(rounds=3, min_workers=1, checkpoint_dir=ckpt, fed_eval_every=1, save_model=save)
    )
    await run_worker(coordinator.port, "w", Witness(1.0, 10))
    await asyncio.wait_for(task, TIMEOUT)
    fits = [(r, on_disk, same) for kind, r, on_disk, same in seen if kind == "fit"]
    evals = [(r, on_disk, same) for kind, r, on_disk, same in seen if kind == "evaluate"]
    assert fits == [(0, None, True), (1, 1, True), (2, 2, True)]
    assert evals == [(1, 1, True), (2, 2, True), (3, 3, True)]
    checkpoint = load_checkpoint(ckpt)
    assert checkpoint is not None
    assert checkpoint.round == 3
    assert "strategy" in checkpoint.states  # with DP, the accountant lives in there
