"""TLS, mutual TLS, worker authentication and the plaintext rule, with in-process coordinators
and real `Worker` objects over real TLS sockets. Certificates come from `fed-certs`."""

from __future__ import annotations

import asyncio
import json
import logging
from pathlib import Path
from typing import Any

import grpc
import pytest
from test_coordinator import TIMEOUT, ScriptedTrainer, config

from fedcore.certs_cli import main as fed_certs
from fedcore.enrollment import Enrollment, hash_token
from fedcore.errors import AuthenticationError, ConfigError, IdentityMismatchError, RejectedError
from fedcore.protocol import JOIN_METHOD, PROTOCOL_VERSION, serialize_worker_message
from fedcore.server import ServerConfig
from fedcore.tls import ClientTLS, ServerTLS, is_loopback, require_tls_or_loopback
from fedcore.v1 import fedcore_pb2 as pb
from fedcore.worker import Worker
from fedcore.worker.runtime import tls_channel_factory


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("certs")
    assert fed_certs(["init", "--dir", str(root), "--workers", "a,b,mallory"]) == 0
    # "eve" holds a valid certificate from the CA but was never enrolled.
    assert fed_certs(["add-worker", "--dir", str(root), "eve"]) == 0
    enrollment = Enrollment(root / "enrolled.json")
    enrollment._entries.pop("eve")
    enrollment.save()
    return root


def _copy_enrollment(certs: Path, tmp_path: Path) -> Path:
    path = tmp_path / "enrolled.json"
    path.write_bytes((certs / "enrolled.json").read_bytes())
    return path


def _tls(certs: Path, *, mutual: bool) -> ServerTLS:
    return ServerTLS(
        certs / "server.pem", certs / "server.key", certs / "ca.pem" if mutual else None
    )


def _worker(
    port: int,
    name: str,
    certs: Path,
    *,
    cert_of: str | None = None,
    token_of: str | None = None,
    ca: Path | None = None,
    give_up_after: float = TIMEOUT,
    trainer: ScriptedTrainer | None = None,
) -> Worker:
    cert = certs / "workers" / f"{cert_of}.pem" if cert_of else None
    key = certs / "workers" / f"{cert_of}.key" if cert_of else None
    token = (certs / "workers" / f"{token_of}.token").read_text().strip() if token_of else None
    factory = tls_channel_factory(ClientTLS(ca or certs / "ca.pem", cert, key))
    return Worker(
        f"localhost:{port}",
        name,
        trainer or ScriptedTrainer(1.0, 10),
        backoff_initial=0.05,
        give_up_after=give_up_after,
        channel_factory=factory,
        token=token,
    )


async def test_tls_federation_completes_and_plaintext_clients_cannot_talk_to_it(
    coordinator_factory: Any, certs: Path
) -> None:
    coordinator, task = await coordinator_factory(
        config(rounds=1, listen="localhost:0", tls=_tls(certs, mutual=False))
    )
    async with grpc.aio.insecure_channel(f"localhost:{coordinator.port}") as channel:
        call: Any = channel.stream_stream(
            JOIN_METHOD, request_serializer=serialize_worker_message, response_deserializer=None
        )(None)
        hello = pb.Hello(name="plain", protocol_version=PROTOCOL_VERSION, num_examples=1)

        async def handshake() -> None:
            await call.write(pb.WorkerMessage(hello=hello))
            await asyncio.wait_for(call.read(), TIMEOUT)

        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await handshake()
        assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
    workers = [_worker(coordinator.port, n, certs) for n in ("a", "b")]
    await asyncio.wait_for(asyncio.gather(*(w.run() for w in workers)), TIMEOUT)
    result = await asyncio.wait_for(task, TIMEOUT)
    assert result.rounds[0].workers == 2
    assert coordinator.registry.sessions() == []


async def test_worker_that_does_not_trust_the_coordinator_never_joins(
    coordinator_factory: Any, certs: Path, tmp_path: Path
) -> None:
    other = tmp_path / "other"
    assert fed_certs(["init", "--dir", str(other)]) == 0
    coordinator, _ = await coordinator_factory(
        config(listen="localhost:0", tls=_tls(certs, mutual=False))
    )
    worker = _worker(coordinator.port, "a", certs, ca=other / "ca.pem", give_up_after=1.0)
    with pytest.raises(RejectedError, match="could not reach a coordinator"):
        await asyncio.wait_for(worker.run(), TIMEOUT)
    assert worker.worker_id is None


async def test_mutual_tls_with_tokens_admits_enrolled_workers_only(
    coordinator_factory: Any, certs: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, "fedcore.server")
    enrolled = _copy_enrollment(certs, tmp_path)
    coordinator, task = await coordinator_factory(
        config(rounds=1, listen="localhost:0", tls=_tls(certs, mutual=True), enrolled=enrolled)
    )
    port = coordinator.port
    refusals: list[tuple[Worker, type[Exception], str]] = [
        # mallory's own certificate and token, claiming a's name: never a's seat.
        (
            _worker(port, "a", certs, cert_of="mallory", token_of="mallory"),
            IdentityMismatchError,
            "certificate is for 'mallory' but its hello claims 'a'",
        ),
        # a's name with a's stolen token but mallory's certificate: the certificate decides.
        (
            _worker(port, "mallory", certs, cert_of="mallory", token_of="a"),
            AuthenticationError,
            "worker 'mallory' sent a wrong token",
        ),
        (
            _worker(port, "a", certs, cert_of="a"),
            AuthenticationError,
            "worker 'a' sent no token",
        ),
        (
            _worker(port, "eve", certs, cert_of="eve"),
            AuthenticationError,
            "worker 'eve' is not enrolled",
        ),
    ]
    for worker, error, message in refusals:
        with pytest.raises(error, match=message):
            await asyncio.wait_for(worker.run(), TIMEOUT)
    # A worker without a client certificate fails the TLS handshake itself.
    no_cert = _worker(port, "a", certs, token_of="a", give_up_after=1.0)
    with pytest.raises(RejectedError, match="could not reach"):
        await asyncio.wait_for(no_cert.run(), TIMEOUT)
    assert len(coordinator.registry) == 0
    logged = caplog.text
    assert "refused worker 'a'" in logged
    assert "refused worker 'eve'" in logged

    good = [_worker(port, n, certs, cert_of=n, token_of=n) for n in ("a", "b")]
    await asyncio.wait_for(asyncio.gather(*(w.run() for w in good)), TIMEOUT)
    result = await asyncio.wait_for(task, TIMEOUT)
    assert result.rounds[0].workers == 2


async def test_tokens_alone_and_revocation_close_the_stream_and_refuse_the_rejoin(
    coordinator_factory: Any, certs: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, "fedcore.server")
    enrolled = _copy_enrollment(certs, tmp_path)
    coordinator, task = await coordinator_factory(
        config(
            rounds=1,
            listen="localhost:0",
            tls=_tls(certs, mutual=False),
            enrolled=enrolled,
        )
    )
    port = coordinator.port
    mallory = asyncio.create_task(_worker(port, "mallory", certs, token_of="mallory").run())
    assert await coordinator.registry.wait_for_idle(1, TIMEOUT)
    assert fed_certs(["revoke", "--dir", str(tmp_path), "mallory"]) == 0
    assert json.loads(enrolled.read_text())["workers"]["mallory"]["revoked"] is True
    # The next handshake notices the change: mallory's open stream is closed...
    with pytest.raises(AuthenticationError, match="'b' sent a wrong token"):
        await asyncio.wait_for(_worker(port, "b", certs, token_of="a").run(), TIMEOUT)
    # ...and its reconnection is refused for good.
    with pytest.raises(AuthenticationError, match="worker 'mallory' has been revoked"):
        await asyncio.wait_for(mallory, TIMEOUT)
    assert "worker 'mallory' was revoked; closing its stream" in caplog.text
    honest = [_worker(port, n, certs, token_of=n).run() for n in ("a", "b")]
    await asyncio.wait_for(asyncio.gather(*honest), TIMEOUT)
    assert (await asyncio.wait_for(task, TIMEOUT)).rounds[0].workers == 2


def test_enrollment_checks_tokens_by_hash_in_constant_time(tmp_path: Path) -> None:
    path = tmp_path / "enrolled.json"
    path.write_text(
        json.dumps(
            {
                "version": 1,
                "workers": {
                    "a": {"token_sha256": hash_token("secret-a"), "revoked": False},
                    "certonly": {"token_sha256": None, "revoked": False},
                },
            }
        )
    )
    enrollment = Enrollment(path)
    assert "secret-a" not in path.read_text()
    assert enrollment.verify_token("a", "secret-a") is None
    assert enrollment.verify_token("a", "secret-b") == "worker 'a' sent a wrong token"
    assert enrollment.verify_token("zed", "secret-a") == "worker 'zed' is not enrolled"
    assert "certificate authentication only" in (enrollment.verify_token("certonly", "x") or "")
    path.write_text('{"version": 2}')
    with pytest.raises(ConfigError, match="not a fedcore v1 enrollment"):
        Enrollment(path)


def test_plaintext_is_refused_off_loopback_unless_insecure() -> None:
    assert all(is_loopback(h) for h in ("127.0.0.1", "127.9.9.9", "::1", "localhost"))
    assert not any(is_loopback(h) for h in ("0.0.0.0", "::", "10.1.2.3", "coord"))
    with pytest.raises(ConfigError, match=r"refusing to serve plaintext on '0\.0\.0\.0:50051'"):
        ServerConfig(listen="0.0.0.0:50051")
    ServerConfig.from_flags(listen="0.0.0.0:50051", insecure=True)
    # TLS alone encrypts but proves no identity: off loopback it needs --enrolled or mTLS.
    tls = ServerTLS(Path("s.pem"), Path("s.key"))
    with pytest.raises(ConfigError, match="without worker authentication"):
        ServerConfig.from_flags(listen="[::]:50051", tls=tls)
    ServerConfig.from_flags(listen="[::]:50051", tls=tls, enrolled=Path("enrolled.json"))
    ServerConfig.from_flags(
        listen="[::]:50051", tls=ServerTLS(Path("s.pem"), Path("s.key"), Path("ca.pem"))
    )
    ServerConfig.from_flags(listen="[::]:50051", tls=tls, insecure=True)
    ServerConfig.from_flags(listen="localhost:50051", tls=tls)
    with pytest.raises(ConfigError, match="refusing to connect to 'coord:50051' without TLS"):
        require_tls_or_loopback("coord:50051", tls=False, insecure=False, role="worker")
    require_tls_or_loopback("[::1]:50051", tls=False, insecure=False, role="worker")


def test_fed_certs_refuses_to_overwrite_a_ca_and_explains_bad_pem(
    certs: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert fed_certs(["init", "--dir", str(certs)]) == 2
    assert "pass --force to replace the CA" in capsys.readouterr().err
    bogus = tmp_path / "bogus.pem"
    bogus.write_text("hello")
    with pytest.raises(ConfigError, match="is not a PEM file; create one with `fed-certs init`"):
        ServerTLS(bogus, certs / "server.key").credentials()
    assert fed_certs(["add-worker", "--dir", str(tmp_path), "x"]) == 2
    assert "create one with `fed-certs init`" in capsys.readouterr().err
