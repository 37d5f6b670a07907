"""Every strategy's math against a direct numpy computation; sampling, options, secure
aggregation compatibility and the resistance of the robust rules to poisoned updates."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import pytest

from fedcore.errors import ConfigError, RoundFailedError
from fedcore.plan import TrainConfig
from fedcore.strategy import (
    BUILTIN_STRATEGIES,
    ClientSampler,
    CoordinateMedian,
    FedAdagrad,
    FedAdam,
    FedAvg,
    FedAvgM,
    FedBuff,
    FedProx,
    FedYogi,
    FitResult,
    Krum,
    MultiKrum,
    Strategy,
    TrimmedMean,
    WeightedMeanAggregator,
    WorkerInfo,
    check_secure_aggregation,
    load_strategy,
    strategy_by_name,
)
from fedcore.weights import Weights


def _updates(n: int, seed: int = 0) -> list[tuple[Weights, int]]:
    rng = np.random.default_rng(seed)
    return [
        (
            {
                "w": rng.standard_normal((4, 3)).astype(np.float32),
                "b": rng.standard_normal(3).astype(np.float64),
                "count": np.array(rng.integers(0, 100), dtype=np.int64),
            },
            int(rng.integers(1, 1000)),
        )
        for _ in range(n)
    ]


@pytest.mark.parametrize("n", [1, 2, 7])
def test_weighted_mean_matches_numpy(n: int) -> None:
    updates = _updates(n)
    total = sum(k for _, k in updates)
    expected = {
        name: sum(u[name].astype(np.float64) * k for u, k in updates) / total
        for name in updates[0][0]
    }
    agg = WeightedMeanAggregator()
    for u, k in updates:
        agg.add({name: a.copy() for name, a in u.items()}, k)
    out = agg.result()
    assert agg.count == n
    np.testing.assert_allclose(out["w"], expected["w"], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(out["b"], expected["b"], rtol=1e-12)
    assert out["w"].dtype == np.float32
    assert out["count"].dtype == np.int64
    assert out["count"] == np.rint(expected["count"])


def test_read_only_updates_are_not_modified() -> None:
    a = np.ones(3, np.float32)
    a.flags.writeable = False
    agg = WeightedMeanAggregator()
    agg.add({"w": a}, 2)
    agg.add({"w": np.full(3, 4.0, np.float32)}, 1)
    np.testing.assert_allclose(agg.result()["w"], 2.0)
    np.testing.assert_array_equal(a, 1.0)


def test_empty_or_zero_weight_is_refused() -> None:
    agg = WeightedMeanAggregator()
    with pytest.raises(ValueError, match="no updates"):
        agg.result()
    with pytest.raises(ValueError, match="positive example count"):
        agg.add({"w": np.ones(1, np.float32)}, 0)


def test_strategy_lookup() -> None:
    assert isinstance(strategy_by_name("FedAvg"), FedAvg)
    with pytest.raises(ConfigError, match="built-in strategies: fedavg"):
        strategy_by_name("nope")


# --------------------------------------------------------------------------- helpers


def _float_updates(n: int, seed: int, scale: float = 1.0) -> list[tuple[Weights, int]]:
    rng = np.random.default_rng(seed)
    return [
        (
            {
                "w": (scale * rng.standard_normal((5, 4))).astype(np.float32),
                "b": (scale * rng.standard_normal(4)).astype(np.float32),
            },
            int(rng.integers(1, 100)),
        )
        for _ in range(n)
    ]


def _copy(w: Weights) -> Weights:
    return {k: v.copy() for k, v in w.items()}


def _run_round(
    strategy: Strategy, round_number: int, g: Weights, updates: list[tuple[Weights, int]]
) -> Weights:
    agg = strategy.start_aggregation(round_number, g)
    for u, k in updates:
        agg.add(_copy(u), k)
    results = [FitResult(WorkerInfo(f"w{i}", f"n{i}", k), k) for i, (_, k) in enumerate(updates)]
    return strategy.aggregate_fit(round_number, g, agg.result(), results, [])


def _weighted_mean(updates: list[tuple[Weights, int]]) -> dict[str, np.ndarray]:
    total = sum(k for _, k in updates)
    # A float64 zero to start from (not sum's int 0), so each sum is typed as an array.
    return {
        n: sum((u[n].astype(np.float64) * k for u, k in updates), np.zeros(())) / total
        for n in updates[0][0]
    }


def _global(seed: int = 99) -> Weights:
    rng = np.random.default_rng(seed)
    return {
        "w": rng.standard_normal((5, 4)).astype(np.float32),
        "b": rng.standard_normal(4).astype(np.float32),
    }


# --------------------------------------------------------------------------- server optimizers


def _numpy_server_opt(
    rule: str, lr: float, b1: float, b2: float, tau: float, rounds: int
) -> dict[str, np.ndarray]:
    """Reddi et al. 2021, Algorithm 2 / Hsu et al. 2019, written out in float64."""
    x = {k: v.astype(np.float64) for k, v in _global().items()}
    m = {k: np.zeros_like(v) for k, v in x.items()}
    v = {k: np.full_like(a, tau**2) for k, a in x.items()}
    for r in range(rounds):
        mean = _weighted_mean(_float_updates(4, seed=r))
        for k in x:
            d = mean[k] - x[k]
            if rule == "momentum":
                m[k] = b1 * m[k] + d
                x[k] = x[k] + lr * m[k]
                continue
            m[k] = b1 * m[k] + (1 - b1) * d
            if rule == "adagrad":
                v[k] = v[k] + d**2
            elif rule == "adam":
                v[k] = b2 * v[k] + (1 - b2) * d**2
            else:
                v[k] = v[k] - (1 - b2) * d**2 * np.sign(v[k] - d**2)
            x[k] = x[k] + lr * m[k] / (np.sqrt(v[k]) + tau)
    return x


SERVER_OPTS: list[tuple[Callable[[], Strategy], tuple[str, float, float, float, float]]] = [
    (lambda: FedAvgM(server_lr=0.7, momentum=0.8), ("momentum", 0.7, 0.8, 0.0, 0.0)),
    (lambda: FedAdagrad(server_lr=0.1, beta1=0.5, tau=1e-2), ("adagrad", 0.1, 0.5, 0.0, 1e-2)),
    (
        lambda: FedAdam(server_lr=0.05, beta1=0.9, beta2=0.99, tau=1e-3),
        ("adam", 0.05, 0.9, 0.99, 1e-3),
    ),
    (
        lambda: FedYogi(server_lr=0.05, beta1=0.9, beta2=0.99, tau=1e-3),
        ("yogi", 0.05, 0.9, 0.99, 1e-3),
    ),
]


@pytest.mark.parametrize(
    ("make", "params"), SERVER_OPTS, ids=["fedavgm", "fedadagrad", "fedadam", "fedyogi"]
)
def test_server_optimizers_match_numpy(
    make: Callable[[], Strategy], params: tuple[str, float, float, float, float]
) -> None:
    strategy, rounds = make(), 4
    g = _global()
    for r in range(rounds):
        g = _run_round(strategy, r + 1, g, _float_updates(4, seed=r))
    expected = _numpy_server_opt(*params, rounds=rounds)
    for k in g:
        assert g[k].dtype == np.float32
        np.testing.assert_allclose(g[k], expected[k], rtol=2e-4, atol=2e-5)


def test_fedavgm_without_momentum_is_fedavg() -> None:
    updates = _float_updates(3, seed=1)
    out = _run_round(FedAvgM(server_lr=1.0, momentum=0.0), 1, _global(), updates)
    for k, v in _weighted_mean(updates).items():
        np.testing.assert_allclose(out[k], v, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(
    "name", ["fedavg", "fedavgm", "fedprox", "fedadagrad", "fedadam", "fedyogi"]
)
def test_mean_based_strategies_give_the_same_result_from_the_secure_sum(name: str) -> None:
    """Secure aggregation hands the strategy only the weighted mean, as one update with the
    total example count: the result must not change."""
    individual, secure = load_strategy(name), load_strategy(name)
    g = _global()
    g_ind, g_sec = g, g
    for r in range(3):
        updates = _float_updates(4, seed=10 + r)
        mean = {k: v.astype(np.float32) for k, v in _weighted_mean(updates).items()}
        g_ind = _run_round(individual, r + 1, g_ind, updates)
        g_sec = _run_round(secure, r + 1, g_sec, [(mean, sum(k for _, k in updates))])
    for k in g:
        np.testing.assert_allclose(g_ind[k], g_sec[k], rtol=1e-4, atol=1e-5)
    check_secure_aggregation(individual, secure_aggregation=True)


@pytest.mark.parametrize("name", ["median", "trimmed-mean", "krum", "multi-krum", "fedbuff"])
def test_strategies_that_need_individual_updates_are_refused_with_secure_aggregation(
    name: str,
) -> None:
    strategy = load_strategy(name)
    check_secure_aggregation(strategy, secure_aggregation=False)
    with pytest.raises(ConfigError, match="needs every worker's individual update"):
        check_secure_aggregation(strategy, secure_aggregation=True)


def test_server_optimizer_state_survives_a_restart() -> None:
    """state_dict() after round 2, loaded into a fresh strategy, continues exactly."""
    g = _global()
    straight = FedAdam(server_lr=0.05)
    for r in range(2):
        g = _run_round(straight, r + 1, g, _float_updates(4, seed=r))
    restarted = FedAdam(server_lr=0.05)
    restarted.load_state_dict(straight.state_dict())
    state = straight.state_dict()
    assert state["steps"] == 2
    assert set(state["m"]) == set(state["v"]) == {"w", "b"}
    a = _run_round(straight, 3, g, _float_updates(4, seed=2))
    b = _run_round(restarted, 3, g, _float_updates(4, seed=2))
    for k in a:
        np.testing.assert_array_equal(a[k], b[k])
    with pytest.raises(ConfigError, match="keeps no state"):
        load_strategy("fedavg").load_state_dict({"x": 1})


# --------------------------------------------------------------------------- FedProx


def test_fedprox_sends_mu_in_every_plan() -> None:
    workers = [WorkerInfo(f"w{i}", f"n{i}", 10) for i in range(3)]
    base = TrainConfig(extra={"other": 1.0})
    instructions = FedProx(mu=0.3).configure_fit(2, workers, base)
    assert [i.worker for i in instructions] == workers
    for i in instructions:
        assert i.config.extra == {"other": 1.0, "proximal_mu": 0.3}
        assert i.config.seed == base.seed + 2
        assert TrainConfig.from_proto(i.config.to_proto()).extra["proximal_mu"] == pytest.approx(
            0.3
        )


# --------------------------------------------------------------------------- robust rules


def test_median_and_trimmed_mean_match_numpy() -> None:
    updates = _float_updates(7, seed=3)
    stacked = {k: np.stack([u[k] for u, _ in updates]) for k in ("w", "b")}
    median = _run_round(CoordinateMedian(), 1, _global(), updates)
    trimmed = _run_round(TrimmedMean(beta=0.2), 1, _global(), updates)  # floor(1.4) = 1 each side
    for k, s in stacked.items():
        np.testing.assert_allclose(median[k], np.median(s, axis=0), rtol=1e-6)
        expected = np.sort(s, axis=0)[1:6].mean(axis=0)
        np.testing.assert_allclose(trimmed[k], expected, rtol=1e-5, atol=1e-6)


def test_krum_and_multi_krum_match_a_direct_computation() -> None:
    n, f = 7, 2
    updates = _float_updates(n, seed=4)
    flat = [np.concatenate([u["w"].ravel(), u["b"].ravel()]).astype(np.float64) for u, _ in updates]
    scores = []
    for i in range(n):
        d = sorted(float(np.sum((flat[i] - flat[j]) ** 2)) for j in range(n) if j != i)
        scores.append(sum(d[: n - f - 2]))
    order = np.argsort(scores)
    krum = _run_round(Krum(num_byzantine=f), 1, _global(), updates)
    multi = _run_round(MultiKrum(num_byzantine=f, num_selected=3), 1, _global(), updates)
    multi_default = _run_round(MultiKrum(num_byzantine=f), 1, _global(), updates)
    for k in ("w", "b"):
        np.testing.assert_array_equal(krum[k], updates[order[0]][0][k])
        np.testing.assert_allclose(
            multi[k], np.mean([updates[i][0][k] for i in order[:3]], axis=0), rtol=1e-6
        )
        np.testing.assert_allclose(
            multi_default[k], np.mean([updates[i][0][k] for i in order[: n - f]], axis=0), rtol=1e-6
        )


def test_krum_needs_enough_updates() -> None:
    with pytest.raises(RoundFailedError, match="needs at least 7 updates, got 5"):
        _run_round(Krum(num_byzantine=2), 1, _global(), _float_updates(5, seed=0))


@pytest.mark.parametrize("attack", ["scaled", "sign-flipped"])
def test_robust_rules_resist_poisoned_updates_where_fedavg_does_not(attack: str) -> None:
    """n = 10 workers, f = 2 of them poisoned (finite values, large example counts)."""
    n, f = 10, 2
    rng = np.random.default_rng(7)
    true = {"w": rng.standard_normal((5, 4)), "b": rng.standard_normal(4)}
    honest = [
        (
            {
                k: (v + 0.1 * rng.standard_normal(v.shape)).astype(np.float32)
                for k, v in true.items()
            },
            100,
        )
        for _ in range(n - f)
    ]
    honest_mean = _weighted_mean(honest)
    factor = 50.0 if attack == "scaled" else -10.0
    poisoned = [
        ({k: (factor * v).astype(np.float32) for k, v in honest_mean.items()}, 1000)
        for _ in range(f)
    ]
    updates = honest + poisoned

    def error(strategy: Strategy) -> float:
        out = _run_round(strategy, 1, _global(), updates)
        return float(np.sqrt(sum(np.sum((out[k] - honest_mean[k]) ** 2) for k in out)))

    honest_norm = float(np.sqrt(sum(np.sum(v**2) for v in honest_mean.values())))
    assert error(load_strategy("fedavg")) > 2 * honest_norm
    for strategy in (
        CoordinateMedian(),
        TrimmedMean(beta=0.2),
        Krum(num_byzantine=f),
        MultiKrum(num_byzantine=f),
    ):
        assert error(strategy) < 0.1 * honest_norm, type(strategy).__name__


# --------------------------------------------------------------------------- FedBuff


def test_fedbuff_aggregator_matches_numpy() -> None:
    g = _global()
    strategy = FedBuff(buffer_size=3, server_lr=0.8, staleness_exponent=0.5)
    updates = _float_updates(3, seed=5)
    staleness = [0, 3, 8]
    agg = strategy.start_aggregation(4, g)
    for (u, k), s in zip(updates, staleness, strict=True):
        agg.add(_copy(u), k, staleness=s)
    out = agg.result()
    for name in g:
        step = (
            sum(
                (u[name] - g[name].astype(np.float64)) / np.sqrt(1 + s)
                for (u, _), s in zip(updates, staleness, strict=True)
            )
            / 3
        )
        np.testing.assert_allclose(out[name], g[name] + 0.8 * step, rtol=1e-5, atol=1e-6)
    assert strategy.async_settings.buffer_size == 3
    assert strategy.async_settings.max_staleness == 10


# --------------------------------------------------------------------------- sampling


def test_sampling_is_a_seeded_fraction_with_a_minimum() -> None:
    workers = [WorkerInfo(f"w{i:02d}", f"n{i:02d}", 10) for i in range(20)]
    sampler = ClientSampler(fraction=0.25, min_workers=2, seed=3)
    chosen = sampler.sample(5, workers)
    assert len(chosen) == 5
    expected = np.random.default_rng([3, 5]).choice(20, size=5, replace=False)
    assert [w.worker_id for w in chosen] == [f"w{i:02d}" for i in sorted(expected)]
    assert sampler.sample(5, list(reversed(workers))) == chosen  # order of arrival is irrelevant
    # The coordinator numbers workers as they join: the same names joining in another order
    # (other ids) are drawn the same, so a simulation and a deployment sample the same cohort.
    rejoined = [WorkerInfo(f"w{19 - i:02d}", f"n{i:02d}", 10) for i in range(20)]
    assert [w.name for w in sampler.sample(5, rejoined)] == [w.name for w in chosen]
    assert sampler.sample(6, workers) != chosen
    assert ClientSampler(fraction=0.25, min_workers=2, seed=4).sample(5, workers) != chosen
    assert len(ClientSampler(fraction=0.01, min_workers=2).sample(1, workers)) == 2
    assert len(ClientSampler(fraction=0.5, min_workers=5).sample(1, workers[:3])) == 3
    # Every worker is drawn about equally often.
    counts = np.zeros(20)
    for r in range(2000):
        for w in sampler.sample(r, workers):
            counts[int(w.worker_id[1:])] += 1
    np.testing.assert_allclose(counts / 2000, 0.25, atol=0.04)
    with pytest.raises(ConfigError, match="fraction-fit"):
        ClientSampler(fraction=0.0)


def test_strategies_sample_through_their_options() -> None:
    strategy = load_strategy(
        "fedadam", {"fraction-fit": 0.5, "min-fit-workers": 1, "sample-seed": 1}
    )
    workers = [WorkerInfo(f"w{i}", f"n{i}", 10) for i in range(4)]
    assert len(strategy.configure_fit(1, workers, TrainConfig())) == 2


# --------------------------------------------------------------------------- registry


def test_every_builtin_loads_with_default_options() -> None:
    for name, cls in BUILTIN_STRATEGIES.items():
        assert isinstance(load_strategy(name), cls)


def test_options_are_checked_and_user_strategies_load_by_path() -> None:
    s = load_strategy("fedadam", {"server-lr": 0.5, "tau": 0.1})
    assert isinstance(s, FedAdam)
    assert s.optimizer.lr == 0.5
    assert s.optimizer.tau == 0.1
    with pytest.raises(ConfigError, match=r"has no option 'lr'; its options: server-lr, beta1"):
        load_strategy("fedadam", {"lr": 0.5})
    with pytest.raises(ConfigError, match="server-lr must be positive"):
        load_strategy("fedadam", {"server-lr": -1})
    user = load_strategy("fedcore.strategy:TrimmedMean", {"beta": 0.3})
    assert isinstance(user, TrimmedMean)
    assert user.beta == 0.3
    with pytest.raises(ConfigError, match="cannot import strategy module 'no_such_module'"):
        load_strategy("no_such_module:X")
    with pytest.raises(ConfigError, match=r"not a fedcore\.Strategy"):
        load_strategy("fedcore.plan:TrainConfig")


def test_on_round_end_and_state_defaults() -> None:
    s: Any = load_strategy("fedavg")
    assert s.on_round_end(1, _global(), {"accuracy": 1.0}) is False
    assert s.state_dict() == {}
    assert s.async_settings is None
