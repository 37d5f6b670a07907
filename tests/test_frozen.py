"""Frozen parameters: they travel once (cache hit, miss, restart, damaged cache re-fetched), a
data owner's file with other contents is refused, and rounds move only trainable parameters."""

from __future__ import annotations

import json
import signal
from pathlib import Path

import numpy as np
import pytest
from conftest import Proc, start_server, start_worker
from safetensors.numpy import load_file, save_file

from fedcore.errors import ConfigError, PayloadError
from fedcore.frozen import FROM_MODEL, FrozenCache, frozen_digest, split_weights, trainable_names
from fedcore.models import build_model, get_weights
from fedcore.plan import ModelSpec

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
    a.wait_for_line(r"round \d+: sent update", 90)
    a.kill()
    a2 = start_worker(procs, port, shards / "shard-0.npz", "a", "--frozen-cache", str(cache_a))
    a2.wait_for_line(r"round \d+: sent update", 90)
    # c's data owner names a base model with other contents: c refuses the plans.
    c = start_worker(procs, port, shards / "shard-1.npz", "c", "--frozen-weights", str(bad))
    c.wait_for_line(r"differ from the data owner's file", 90)
    server.signal(signal.SIGTERM)
    assert server.wait(60) == 0, server.output

    # Cache miss: a received the frozen parameters once; after its restart, a cache hit.
    assert a.count(rf"frozen parameters {digest[:12]} received \(0\.6 MB\), cached") == 1
    assert (cache_a / f"{digest}.bin").exists()
    assert "loaded from the cache" in a2.output
    assert "received (" not in a2.output
    # The data owner's file is used, never a download.
    assert "received (" not in b.output
    assert b.count(r"sent update") >= 2
    # A damaged cache entry is refused, deleted and fetched again.
    assert "damaged" in d.output
    assert d.count(r"received \(0\.6 MB\), cached") == 1
    # The refusal reaches the coordinator with its reason; c never trains.
    assert "differ from the data owner's file" in server.output
    assert c.count(r"sent update") == 0

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
    from fedcore.server.transport.payloads import FrozenPayload
    from fedcore.worker.frozen import FrozenStore

    from fedcore.weights import signature_of

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
