"""Frozen parameters: they travel once (cache hit, miss, restart, damaged cache re-fetched), a
data owner's file with other contents is refused, and rounds move only trainable parameters."""

from __future__ import annotations

import json
import re
import signal
from pathlib import Path
from typing import cast

import numpy as np
import pytest
import torch
from conftest import Proc, start_server, start_worker
from hostile import fit_task
from safetensors.numpy import load_file, save_file
from torch.utils.data import Dataset, TensorDataset

from fedcore.codec import make_header
from fedcore.errors import ConfigError, PayloadError, TaskRefused
from fedcore.frozen import FROM_MODEL, FrozenCache, frozen_digest, split_weights, trainable_names
from fedcore.model_catalog import ModelCatalog
from fedcore.models import build_model, get_weights
from fedcore.plan import ModelSpec, TrainConfig
from fedcore.server.state.config import ServerConfig
from fedcore.server.transport.payloads import FrozenPayload
from fedcore.v1 import fedcore_pb2 as pb
from fedcore.weights import Weights, signature_of
from fedcore.worker import TorchTrainer
from fedcore.worker.frozen import FrozenStore
from fedcore.worker.gate import Gate

SPEC = ModelSpec("mnist-mlp")
TRAINABLE = ("net.3.*", "net.5.*")  # the first layer (net.1) is frozen


def _initial() -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    model = build_model(SPEC, seed=0)  # what fed-server --seed 0 starts from
    weights = get_weights(model)
    return split_weights(weights, trainable_names(model, TRAINABLE))


def test_trainable_patterns() -> None:
    model = build_model(SPEC, seed=0)
    assert trainable_names(model, ["net.5.*"]) == ["net.5.weight", "net.5.bias"]
    assert len(trainable_names(model, [FROM_MODEL])) == 6
    with pytest.raises(ConfigError, match="matches no parameter"):
        trainable_names(model, ["net.9.*"])


def test_cache_refuses_and_deletes_a_damaged_entry(tmp_path: Path) -> None:
    _, frozen = _initial()
    digest = frozen_digest(frozen)
    cache = FrozenCache(tmp_path)
    cache.store(digest, frozen)
    loaded = cache.load(digest)
    assert loaded is not None
    assert np.array_equal(loaded["net.1.weight"], frozen["net.1.weight"])
    path = tmp_path / f"{digest}.bin"
    data = bytearray(path.read_bytes())
    data[100] ^= 1
    path.write_bytes(bytes(data))
    with pytest.raises(PayloadError, match="damaged"):
        cache.load(digest)
    assert not path.exists()
    assert cache.digests() == []


@pytest.mark.slow
def test_frozen_parameters_travel_once(shards: Path, tmp_path: Path, procs: list[Proc]) -> None:
    trainable, frozen = _initial()
    digest = frozen_digest(frozen)
    good, bad = tmp_path / "base.safetensors", tmp_path / "other.safetensors"
    save_file(frozen, str(good))
    save_file({k: v + 0.5 for k, v in frozen.items()}, str(bad))
    damaged = tmp_path / "cache-d"
    FrozenCache(damaged).store(digest, {k: v + 1.0 for k, v in frozen.items()})
    metrics, saved = tmp_path / "metrics.jsonl", tmp_path / "final.safetensors"
    # Rounds need all of a, b and d, so they wait for a's restart; the test ends them.
    server, port = start_server(
        procs,
        "--model", "mnist-mlp", "--trainable", TRAINABLE[0], "--trainable", TRAINABLE[1],
        "--rounds", "1000", "--min-workers", "3", "--min-results", "3", "--round-retries", "10",
        "--fed-eval-every", "0", "--batch-size", "64",
        "--metrics-out", str(metrics), "--save-model", str(saved),
    )  # fmt: skip
    cache_a = tmp_path / "cache-a"
    a = start_worker(procs, port, shards / "shard-0.npz", "a", "--frozen-cache", str(cache_a))
    b = start_worker(procs, port, shards / "shard-1.npz", "b", "--frozen-weights", str(good))
    d = start_worker(procs, port, shards / "shard-2.npz", "d", "--frozen-cache", str(damaged))
    # Worker a restarts mid-federation, right after its first update: its cache survives.
    a.wait_for_event("update_sent", timeout=90)
    a.kill()
    # Restart once the coordinator has dropped the old connection: a worker joining under a
    # name still connected is refused and backs off (seconds, growing), which is not the test.
    server.wait_for_event("worker_left", worker="a", timeout=90)
    a2 = start_worker(procs, port, shards / "shard-0.npz", "a", "--frozen-cache", str(cache_a))
    a2.wait_for_event("update_sent", timeout=90)
    # c's data owner names a base model with other contents: c refuses the plans.
    c = start_worker(procs, port, shards / "shard-1.npz", "c", "--frozen-weights", str(bad))
    differ = re.compile(r"differ from the data owner's file")
    c.wait_for_event("task_refused", rule="frozen.weights", reason=differ, timeout=90)
    # The coordinator logs the refusal once it arrives: stop it only after that (a stop
    # racing the refusal's arrival lost the line on a fast machine).
    server.wait_for_event("task_refused", worker="c", reason=differ, timeout=90)
    server.signal(signal.SIGTERM)
    assert server.wait(60) == 0, server.output

    # Cache miss: a received the frozen parameters once; after its restart, a cache hit.
    received = a.matching("frozen_received", digest=digest, cached=True)
    assert [round(r["bytes"] / 1e6, 1) for r in received] == [0.6]
    assert (cache_a / f"{digest}.bin").exists()
    assert a2.matching("frozen_loaded", digest=digest)
    assert a2.matching("frozen_received") == []
    # The data owner's file is used, never a download.
    assert b.matching("frozen_received") == []
    assert len(b.matching("update_sent")) >= 2
    # A damaged cache entry is refused, deleted and fetched again.
    assert "damaged" in d.output
    assert len(d.matching("frozen_received", digest=digest, cached=True)) == 1
    # The refusal reaches the coordinator with its reason; c never trains.
    assert "differ from the data owner's file" in server.output
    assert c.matching("update_sent") == []

    rows = [json.loads(line) for line in metrics.read_text().splitlines()]
    assert len(rows) >= 2
    assert [r["round"] for r in rows] == list(range(1, len(rows) + 1))
    trainable_bytes = sum(a.nbytes for a in trainable.values())
    single = [row for row in rows if row["attempts"] == 1]
    assert single
    for row in single:
        # Updates hold the trainable parameters only (the frozen ones are 3.7x larger).
        assert trainable_bytes * row["workers"] <= row["bytes_received"]
        assert row["bytes_received"] < (trainable_bytes + 20_000) * (row["workers"] + 1)
    final = load_file(str(saved))
    for name, array in frozen.items():
        assert np.array_equal(final[name], array), name
    assert not np.array_equal(final["net.3.weight"], trainable["net.3.weight"])


def test_received_frozen_parameters_must_match_the_plans_digest(tmp_path: Path) -> None:
    _, frozen = _initial()
    plan = FrozenPayload(frozen, 1 << 20).plan(attached=True)
    assert plan.sha256 == frozen_digest(frozen)
    assert plan.header.total_bytes > 0
    store = FrozenStore(tmp_path)
    # Positive control: the honest parameters are kept, on disk too.
    store.put(plan.sha256, frozen, signature_of(frozen))
    assert store.held() == [plan.sha256]
    # A coordinator sending other contents under that digest is refused; nothing is kept.
    other = {k: v + 1.0 for k, v in frozen.items()}
    lying = FrozenStore(tmp_path / "other")
    with pytest.raises(PayloadError, match="have digest"):
        lying.put(plan.sha256, other, signature_of(other))
    assert lying.held() == []
    # A plan without them attached carries only the digest (the worker knows their layout).
    assert not FrozenPayload(frozen, 1 << 20).plan(attached=False).HasField("header")


def _frozen_task(trainable: Weights, frozen: Weights, *, attached: bool) -> pb.Task:
    task = fit_task("mnist-mlp")
    task.weights.CopyFrom(make_header(trainable, 1 << 16))
    task.frozen.CopyFrom(FrozenPayload(frozen, 1 << 16).plan(attached=attached))
    return task


def test_the_gate_admits_trainable_weights_that_frozen_parameters_complete(
    tmp_path: Path,
) -> None:
    trainable, frozen = _initial()
    gate = Gate(ModelCatalog(), max_model_bytes=1 << 26, frozen=FrozenStore(tmp_path))
    # Positive control: the trainable weights and the attached frozen header form the model.
    checked = gate.admit(_frozen_task(trainable, frozen, attached=True))
    assert checked.signature == signature_of(get_weights(build_model(SPEC, seed=0)))
    # Frozen parameters that leave a tensor out do not form the model.
    partial = dict(frozen)
    partial.pop("net.1.bias")
    with pytest.raises(TaskRefused, match=r"\[model.weights\].*missing parameters.*net.1.bias"):
        gate.admit(_frozen_task(trainable, partial, attached=True))
    # A tensor both frozen and sent for training is refused by name.
    both = {**frozen, "net.3.bias": trainable["net.3.bias"]}
    with pytest.raises(TaskRefused, match=r"\[frozen.weights\].*both frozen and sent"):
        gate.admit(_frozen_task(trainable, both, attached=True))
    # A digest that is no SHA-256 never reaches the cache's file names.
    task = _frozen_task(trainable, frozen, attached=False)
    task.frozen.sha256 = "../" * 21 + "x"
    with pytest.raises(TaskRefused, match=r"\[frozen.weights\].*not a hex SHA-256"):
        gate.admit(task)
    # Not attached and not held: not a refusal; the worker reconnects to say what it holds.
    with pytest.raises(PayloadError, match="not held here"):
        gate.admit(_frozen_task(trainable, frozen, attached=False))
    # Once held, the held copy's layout completes the model.
    gate.frozen.put(frozen_digest(frozen), frozen, signature_of(frozen))
    assert gate.admit(_frozen_task(trainable, frozen, attached=False)).kind == "fit"
    # A shipped plan cannot freeze parameters.
    task = _frozen_task(trainable, frozen, attached=True)
    task.plan.hash = "0" * 64
    with pytest.raises(TaskRefused, match=r"\[frozen.plans\]"):
        gate.admit(task)


def test_the_gate_refuses_frozen_parameters_other_than_the_data_owners(tmp_path: Path) -> None:
    trainable, frozen = _initial()
    path = tmp_path / "base.safetensors"
    save_file(frozen, str(path))
    gate = Gate(ModelCatalog(), max_model_bytes=1 << 26, frozen=FrozenStore(None, path))
    # Positive control: the owner's own parameters are admitted without being sent.
    assert gate.admit(_frozen_task(trainable, frozen, attached=False)).kind == "fit"
    other = {k: v + 0.5 for k, v in frozen.items()}
    for attached in (True, False):
        with pytest.raises(TaskRefused, match=r"\[frozen.weights\].*differ from the data owner"):
            gate.admit(_frozen_task(trainable, other, attached=attached))


def test_trainable_patterns_and_a_shipped_plan_do_not_mix() -> None:
    with pytest.raises(ConfigError, match="--trainable cannot be combined with --ship-plan"):
        ServerConfig.from_flags(trainable=("net.3.*",), plan=pb.PlanProgram(hash="0" * 64))


def test_a_task_without_trainable_names_trains_what_the_factory_left_trainable() -> None:
    # The worker keeps its model between tasks: what one task froze must not stay frozen.
    # cast: torch types TensorDataset's items as tuple[Tensor, ...] whatever it holds; two here.
    data = cast(
        "Dataset[tuple[torch.Tensor, torch.Tensor]]",
        TensorDataset(torch.randn(64, 1, 28, 28), torch.randint(0, 10, (64,))),
    )
    trainer = TorchTrainer(data, model=SPEC)
    start = get_weights(build_model(SPEC, seed=0))
    head = ("net.5.weight", "net.5.bias")

    def moved(config: TrainConfig) -> set[str]:
        out = trainer.fit(SPEC, {k: v.copy() for k, v in start.items()}, config).weights
        return {name for name, array in out.items() if not np.array_equal(array, start[name])}

    assert moved(TrainConfig(batch_size=16, trainable=head)) == set(head)
    assert moved(TrainConfig(batch_size=16)) == set(start)  # everything trains again
