"""fed-sim: virtual workers with the deployment's code, on the local and the Ray engine.

Equality is bit for bit (the SHA-256 of the global model): shards, sampled cohorts and
per-client training (one torch thread, the plan's seed) are identical, and the coordinator
sums updates exactly, so the order in which they arrive does not matter.
"""

from __future__ import annotations

import asyncio
import functools
import gc
import hashlib
import sys
import threading
import weakref
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from conftest import Proc, start_server, start_worker
from safetensors.numpy import load_file
from torch import nn

from fedcore.data import load_mnist, partition, save_shard
from fedcore.data.cli import main as fed_data
from fedcore.errors import RoundFailedError
from fedcore.plan import ModelSpec, TrainConfig
from fedcore.server import Coordinator, FederationResult, ServerConfig
from fedcore.server.cli import config_from_args
from fedcore.simulation import (
    DataSpec,
    HostSpec,
    LocalEngine,
    RayEngine,
    SimulationResult,
    TransientTrainer,
    WorkerSettings,
    client_name,
    client_shards,
    host_specs,
    load_source,
    run_host,
    simulate,
)
from fedcore.simulation.cli import build_parser
from fedcore.simulation.cli import main as fed_sim
from fedcore.simulation.clients import shard_dataset
from fedcore.training import TrainResult
from fedcore.weights import Weights
from fedcore.worker import FitOutput

RAY_IMPORTED_WITH_FEDCORE = "ray" in sys.modules


def sim_config(*flags: str) -> ServerConfig:
    """A coordinator configured from fed-sim's flags (as the CLI does)."""
    return config_from_args(build_parser().parse_args(["--num-clients", "1", *flags]))


@pytest.fixture(scope="module")
def test_set(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("sim") / "test.npz"
    tx, ty = load_mnist("test")
    save_shard(path, tx[:500], ty[:500])
    return path


def _federation_flags(test_set: Path, clients: int, fraction: float) -> list[str]:
    return [
        "--model",
        "logreg",
        "--rounds",
        "2",
        "--min-workers",
        str(clients),
        "--lr",
        "0.1",
        "--seed",
        "3",
        "--eval-data",
        str(test_set),
        "--strategy-options",
        f'{{"fraction-fit": {fraction}, "sample-seed": 5}}',
        "--heartbeat-interval",
        "0.5",
    ]


def model_sha256(weights: dict[str, np.ndarray]) -> str:
    """SHA-256 over every tensor's name, dtype, shape and bytes, in name order."""
    digest = hashlib.sha256()
    for name in sorted(weights):
        array = np.ascontiguousarray(weights[name])
        digest.update(f"{name}:{array.dtype.str}:{array.shape}".encode())
        digest.update(array.tobytes())
    return digest.hexdigest()


def _assert_same_federation(a: FederationResult, b: FederationResult) -> None:
    assert [r.workers for r in a.rounds] == [r.workers for r in b.rounds]
    assert model_sha256(a.weights) == model_sha256(b.weights)
    for ra, rb in zip(a.rounds, b.rounds, strict=True):
        assert ra.train["loss"] == rb.train["loss"]


# --------------------------------------------------------------------------- in process


def test_clients_get_fed_data_split_shards(tmp_path: Path) -> None:
    """A virtual client's shard holds the same tensors as fed-data split's shard file."""
    spec = DataSpec(num_clients=5, max_examples=400, scheme="shards", seed=7)
    split = ["split", "--out", str(tmp_path), "--num-shards", "5", "--scheme", "shards"]
    assert fed_data([*split, "--seed", "7", "--max-examples", "400"]) == 0
    x, y = load_source(spec)
    shards = client_shards(spec, y)
    assert sorted(np.concatenate(shards).tolist()) == list(range(400))
    from fedcore.data import load_shard

    for i, indices in enumerate(shards):
        mine, theirs = shard_dataset(x, y, indices), load_shard(tmp_path / f"shard-{i}.npz")
        assert torch.equal(mine.x, theirs.x)
        assert torch.equal(mine.y, theirs.y)
        assert len(set(mine.y.tolist())) <= 2  # the pathological split: two classes each


def test_the_report_shows_the_federated_accuracy_the_table_shows() -> None:
    """Issue 27: under federated evaluation only, `fed-sim --report` said `accuracy: null`
    while its table showed the accuracy."""
    from fedcore.server.reporting.metrics import RoundMetrics
    from fedcore.simulation import HostReport

    federated = RoundMetrics(1, 3, 0, 1.0, 0, 0, federated={"accuracy": 0.8486, "loss": 0.4})
    centralized = RoundMetrics(1, 3, 0, 1.0, 0, 0, accuracy=0.9, federated={"accuracy": 0.8})
    host = HostReport(pid=1, clients=3, tasks=3, refused=0, seconds=1.0, peak_rss_bytes=0)
    for row, accuracy, source in (
        (federated, 0.8486, "federated"),
        (centralized, 0.9, "centralized"),
    ):
        result = SimulationResult(FederationResult({}, [row]), [host], 0, 1.0, "local")
        summary = result.summary()
        assert summary["accuracy"] == [accuracy]
        assert summary["evaluation"] == source
        assert row.cells()["accuracy"] == f"{100 * accuracy:.2f}%"  # what the table shows


def test_a_saved_model_file_is_the_same_bytes_every_time(tmp_path: Path) -> None:
    """The safetensors library writes metadata in hash-map order: identical models gave files
    with different SHA-256 digests. Saved files are canonical, and still load."""
    from safetensors import safe_open

    from fedcore.server.reporting.metrics import save_weights

    weights: Weights = {"b": np.arange(3, dtype=np.float32), "a": np.ones((2, 2), dtype=np.int64)}
    metadata = {f"key-{i}": f"value-{i}" for i in range(12)}
    digests = set()
    for i in range(6):
        path = tmp_path / f"model-{i}.safetensors"
        save_weights(weights, path, dict(reversed(metadata.items())) if i % 2 else metadata)
        digests.add(hashlib.sha256(path.read_bytes()).hexdigest())
    assert len(digests) == 1
    with safe_open(str(path), "np") as f:
        assert f.metadata() == metadata
        tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (no __iter__)
        assert model_sha256(tensors) == model_sha256(weights)


def test_hosts_share_the_clients_out() -> None:
    specs = host_specs("127.0.0.1:1", DataSpec(num_clients=10), 3, concurrency=2)
    assert [s.clients for s in specs] == [(0, 1, 2), (3, 4, 5), (6, 7, 8, 9)]
    assert HostSpec.from_json(specs[1].to_json()) == specs[1]
    assert len(host_specs("127.0.0.1:1", DataSpec(num_clients=2), 8)) == 2
    assert [client_name(i, 1000) for i in (0, 7, 999)] == ["client-000", "client-007", "client-999"]


@pytest.mark.slow
def test_virtual_workers_keep_no_model_and_train_a_bounded_number_at_once() -> None:
    x, y = load_mnist("train")
    labels = y.astype(np.int64)
    spec = DataSpec(num_clients=12, max_examples=600)
    shards = client_shards(spec, labels[:600])
    slots = threading.BoundedSemaphore(2)
    running, most = 0, 0
    lock = threading.Lock()
    models: list[weakref.ref[nn.Module]] = []

    def counting_train(
        model: nn.Module, data: Any, config: TrainConfig, device: torch.device
    ) -> TrainResult:
        nonlocal running, most
        with lock:
            models.append(weakref.ref(model))
            running += 1
            most = max(most, running)
        try:
            # Long enough that the other threads pile up on the slots.
            threading.Event().wait(0.05)
            return TrainResult(len(data), 0.0, 0.0, 0.0)
        finally:
            with lock:
                running -= 1

    trainers = [
        TransientTrainer(
            functools.partial(shard_dataset, x, labels, idx),
            len(idx),
            slots,
            train_fn=counting_train,
        )
        for idx in shards
    ]
    model = ModelSpec("logreg")
    from fedcore.models import build_model, get_weights

    weights = get_weights(build_model(model))
    outputs: list[FitOutput] = []
    threads = [
        threading.Thread(target=lambda t=t: outputs.append(t.fit(model, weights, TrainConfig())))
        for t in trainers
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert len(outputs) == 12
    assert most == 2
    gc.collect()
    assert len(models) == 12
    assert all(ref() is None for ref in models)  # every model was released after its task
    assert [t.num_examples for t in trainers] == [len(i) for i in shards]


def test_deployment_only_flags_are_refused(capsys: pytest.CaptureFixture[str]) -> None:
    assert fed_sim(["--num-clients", "2", "--enrolled", "enrolled.json"]) == 2
    assert "--enrolled is not supported by fed-sim" in capsys.readouterr().err
    assert fed_sim(["--num-clients", "2", "--ray-address", "auto"]) == 2
    assert "--ray-address needs --engine ray" in capsys.readouterr().err
    assert fed_sim(["--num-clients", "0"]) == 2
    assert "--num-clients must be at least 1" in capsys.readouterr().err
    # Checked before anything starts, not once per host.
    assert fed_sim(["--num-clients", "2", "--data", "no-such-shard.npz"]) == 2
    assert "--data no-such-shard.npz: no such file or directory" in capsys.readouterr().err


def test_ray_is_imported_only_for_the_ray_engine() -> None:
    # Taken when this module imported fedcore.simulation and its CLI (no test ran Ray yet).
    assert not RAY_IMPORTED_WITH_FEDCORE
    assert build_parser().parse_args(["--num-clients", "3", "--engine", "ray"]).engine == "ray"
    RayEngine(num_cpus=0.5)  # declaring the engine is not using it
    assert "ray" not in sys.modules  # (this test runs before the Ray engine's)


def _policy(tmp_path: Path) -> Path:
    path = tmp_path / "policy.toml"
    path.write_text(
        "[secure-aggregation]\nrequired = true\n"
        '[differential-privacy]\nrequired = "client-level"\n'
        '[budget]\nstudy = "sim"\nepsilon = 100.0\ndelta = 1e-3\nledger = "unused.json"\n'
    )
    return path


async def _in_process(config: ServerConfig, spec: HostSpec) -> tuple[object, Any]:
    """A coordinator and one host's virtual workers on this event loop."""
    threads = torch.get_num_threads()
    coordinator = Coordinator(config)
    serving = asyncio.create_task(coordinator.run())
    await asyncio.wait_for(coordinator.ready.wait(), 30)
    spec = HostSpec(f"127.0.0.1:{coordinator.port}", spec.data, spec.clients, spec.workers)
    try:
        report = await asyncio.wait_for(run_host(spec), 120)
        outcome: object = await asyncio.wait_for(
            asyncio.gather(serving, return_exceptions=True), 60
        )
    finally:
        torch.set_num_threads(threads)
    return outcome[0], report  # type: ignore[index]


@pytest.mark.slow
async def test_secagg_dp_and_policies_run_in_simulation(tmp_path: Path) -> None:
    """Every virtual worker enforces its policy and keeps its own ledger; secure aggregation
    and distributed client-level DP run as deployed."""
    ledgers = tmp_path / "ledgers"
    ledgers.mkdir()
    workers = WorkerSettings(policy=str(_policy(tmp_path)), ledger_dir=str(ledgers))
    data = DataSpec(num_clients=5, max_examples=500)
    flags = ["--model", "logreg", "--rounds", "1", "--min-workers", "5", "--round-retries", "0"]
    flags += ["--fed-eval-every", "0", "--heartbeat-interval", "0.5"]
    # Positive control: the plan the policy asks for (masked, noised updates) is accepted.
    secure = sim_config(
        *flags, "--secagg", "--dp-mode", "distributed", "--dp-noise-multiplier", "0.5"
    )
    result, report = await _in_process(secure, HostSpec("", data, tuple(range(5)), workers))
    assert isinstance(result, FederationResult), result
    assert result.rounds[0].workers == 5
    assert result.rounds[0].epsilon is not None
    assert report.errors == {}
    assert report.refused == 0
    files = sorted(ledgers.glob("*.json"))
    assert [p.name for p in files] == [f"client-{i}.json" for i in range(5)]
    assert all('"sim"' in p.read_text() for p in files)
    # The attack on a policy: a plan without secure aggregation. Every virtual worker refuses.
    plain = sim_config(*flags, "--dp-noise-multiplier", "0.5")
    result, report = await _in_process(plain, HostSpec("", data, tuple(range(5)), workers))
    assert isinstance(result, RoundFailedError), result
    assert report.refused == 5


# --------------------------------------------------------------------------- federations


@pytest.fixture(scope="module")
def twenty_clients_local(test_set: Path) -> SimulationResult:
    config = sim_config(*_federation_flags(test_set, 20, 0.5))
    data = DataSpec(num_clients=20, max_examples=2000, scheme="dirichlet", seed=1)
    return asyncio.run(simulate(config, data, LocalEngine(), num_hosts=2))


@pytest.mark.slow
def test_local_engine_runs_twenty_virtual_workers(twenty_clients_local: SimulationResult) -> None:
    result = twenty_clients_local
    rows = result.federation.rounds
    assert [r.workers for r in rows] == [10, 10]  # fraction-fit 0.5 of 20
    assert (rows[-1].accuracy or 0.0) > 0.5, rows
    assert [h.clients for h in result.hosts] == [10, 10]
    assert sum(h.tasks for h in result.hosts) == 20
    assert result.errors == {}
    assert len({h.pid for h in result.hosts}) == 2


@pytest.mark.slow
def test_ray_engine_gives_the_local_engines_result(
    twenty_clients_local: SimulationResult, test_set: Path
) -> None:
    """Ray actors with 1 CPU each on a private 2-CPU Ray instance, shut down afterwards."""
    pytest.importorskip("ray")
    config = sim_config(*_federation_flags(test_set, 20, 0.5))
    data = DataSpec(num_clients=20, max_examples=2000, scheme="dirichlet", seed=1)
    engine = RayEngine(num_cpus=1, local_cpus=2, init_options={"log_to_driver": False})
    result = asyncio.run(simulate(config, data, engine, num_hosts=2))
    assert result.engine == "ray"
    assert result.errors == {}
    _assert_same_federation(result.federation, twenty_clients_local.federation)
    import ray

    assert not ray.is_initialized()
    assert _ray_processes() == []  # raylet, GCS and the actors' workers are gone


@pytest.mark.slow
def test_identical_simulations_end_with_bit_identical_models(
    twenty_clients_local: SimulationResult, test_set: Path
) -> None:
    """The same federation again, on one host instead of two: the ten updates of each round
    reach the coordinator in another order (one client trains at a time instead of two), and
    the global model is the same bytes."""
    config = sim_config(*_federation_flags(test_set, 20, 0.5))
    data = DataSpec(num_clients=20, max_examples=2000, scheme="dirichlet", seed=1)
    again = asyncio.run(simulate(config, data, LocalEngine(), num_hosts=1))
    assert again.errors == {}
    _assert_same_federation(again.federation, twenty_clients_local.federation)


def _ray_processes() -> list[str]:
    """Command lines of this virtualenv's Ray daemons still alive (Ray reaps them on shutdown;
    allow it a few seconds)."""
    found: list[str] = []
    for _ in range(50):
        found = []
        for proc in Path("/proc").iterdir():
            try:
                cmdline = (
                    (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
                )
            except OSError:
                continue
            if sys.prefix in cmdline and ("raylet" in cmdline or "gcs_server" in cmdline):
                found.append(cmdline[:120])
        if not found:
            return found
        threading.Event().wait(0.2)
    return found


@pytest.fixture
def three_shards(tmp_path: Path) -> tuple[DataSpec, list[Path]]:
    """Three clients' data, as fed-data would split it for real workers."""
    data = DataSpec(num_clients=3, max_examples=600, scheme="dirichlet", seed=2)
    x, y = load_source(data)
    paths = []
    for i, idx in enumerate(partition(y, 3, "dirichlet", seed=2)):
        paths.append(save_shard(tmp_path / f"shard-{i}.npz", x[idx], y[idx]))
    return data, paths


@pytest.mark.slow
def test_simulation_equals_real_fed_worker_processes(
    procs: list[Proc], three_shards: tuple[DataSpec, list[Path]], test_set: Path, tmp_path: Path
) -> None:
    """The same federation (3 clients, 2 of them sampled per round) twice with fed-server and
    three fed-worker processes, and once with fed-sim's virtual workers: the same global
    model, bit for bit."""
    data, paths = three_shards
    flags = _federation_flags(test_set, 3, 0.6)
    digests, files = [], []
    # Twice with real processes, the workers started in opposite orders.
    for run, order in enumerate(([0, 1, 2], [2, 1, 0])):
        saved = tmp_path / f"real-{run}.safetensors"
        server, port = start_server(
            procs, *flags, "--save-model", str(saved), "--progress", "plain"
        )
        workers = [start_worker(procs, port, paths[i], client_name(i, 3)) for i in order]
        assert server.wait(180) == 0, server.output
        for w in workers:
            assert w.wait(30) == 0, w.output
        digests.append(model_sha256(load_file(str(saved))))
        files.append(hashlib.sha256(saved.read_bytes()).hexdigest())
    assert files[0] == files[1]  # the saved files themselves, byte for byte
    simulated = asyncio.run(simulate(sim_config(*flags), data, LocalEngine(), num_hosts=1))
    assert [r.workers for r in simulated.federation.rounds] == [2, 2]
    digests.append(model_sha256(simulated.federation.weights))
    assert len(set(digests)) == 1, digests


@pytest.fixture(autouse=True, scope="module")
def _no_ray_left() -> Iterator[None]:
    yield
    if "ray" in sys.modules:
        import ray

        assert not ray.is_initialized()
