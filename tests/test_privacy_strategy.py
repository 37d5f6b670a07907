"""DP-FedAvg's coordinator side: bounded weights, noise calibrated to the updates actually
aggregated, distributed noise under dropouts, the budget stop, calibration, adaptive clipping."""

from __future__ import annotations

import json
import math
from collections import Counter

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fedcore.errors import ConfigError, PrivacyBudgetExhausted, RoundFailedError
from fedcore.plan import TrainConfig
from fedcore.privacy import (
    AdaptiveClipping,
    ClientDP,
    DifferentialPrivacy,
    PrivacyAccountant,
    add_gaussian_noise,
    privatize_update,
)
from fedcore.privacy.accountant import calibrate_noise_multiplier, epsilon_of_history
from fedcore.privacy.participation import ParticipationAccountant
from fedcore.strategy import (
    ClientSampler,
    FedAvg,
    FitResult,
    Strategy,
    UpdateAggregator,
    WorkerInfo,
)
from fedcore.weights import Weights

D = 40_000  # coordinates: the empirical std of N samples has relative std error 1/sqrt(2N)
TOL = 5 / math.sqrt(2 * D)  # five standard errors


def _workers(n: int) -> list[WorkerInfo]:
    return [WorkerInfo(f"id{i}", f"w{i}", 100 * (i + 1)) for i in range(n)]


def _global() -> Weights:
    return {"w": np.zeros(D, np.float64), "steps": np.zeros((), np.int64)}


def _round(
    dp: DifferentialPrivacy,
    r: int,
    offered: list[WorkerInfo],
    deltas: list[np.ndarray],
    examples: list[int] | None = None,
) -> tuple[Weights, list[TrainConfig]]:
    """One round: configure, the first len(deltas) workers privatize and report, release."""
    g = _global()
    instructions = dp.configure_fit(r, offered, TrainConfig())
    agg = dp.start_aggregation(r, g)
    results = []
    for i, (inst, d) in enumerate(zip(instructions, deltas, strict=False)):
        request = ClientDP.from_extra(inst.config.extra)
        assert request is not None
        upd = privatize_update(g, {"w": d, "steps": np.array(3)}, request)
        n = examples[i] if examples else inst.worker.num_examples
        agg.add({"w": g["w"] + upd.delta["w"], "steps": g["steps"]}, n)
        results.append(FitResult(inst.worker, n, upd.metrics))
    return dp.aggregate_fit(r, g, agg.result(), results, []), [i.config for i in instructions]


def test_workers_are_asked_to_clip_and_report_weight_one() -> None:
    dp = DifferentialPrivacy(FedAvg(), noise_multiplier=1.0, clipping_norm=0.5)
    configs = _round(dp, 1, _workers(3), [np.zeros(D)] * 3)[1]
    for config in configs:
        request = ClientDP.from_extra(config.extra)
        assert request == ClientDP(clip_norm=0.5, noise_multiplier=1.0)


def test_aggregate_uses_uniform_weights_not_example_counts() -> None:
    """A silo claiming a million examples must not dominate: its weight is 1 like any other."""
    dp = DifferentialPrivacy(FedAvg(), noise_multiplier=1e-9, clipping_norm=1.0)
    up, down = np.zeros(D), np.zeros(D)
    up[0], down[0] = 1.0, -1.0
    new, _ = _round(dp, 1, _workers(2), [up, down], examples=[1_000_000, 1])
    assert abs(new["w"][0]) < 1e-6  # example-weighted FedAvg would give ~ +1
    assert new["steps"] == 0  # integer buffers are not released


def test_central_noise_uses_the_number_of_updates_actually_aggregated() -> None:
    """8 workers sampled, 5 deliver: the mean carries noise z C / 5, not z C / 8."""
    z, clip = 1.5, 2.0
    dp = DifferentialPrivacy(FedAvg(), noise_multiplier=z, clipping_norm=clip)
    new, _ = _round(dp, 1, _workers(8), [np.zeros(D)] * 5)
    std = float(np.std(new["w"]))
    assert std == pytest.approx(z * clip / 5, rel=TOL)
    assert abs(std - z * clip / 8) > 10 * TOL * std
    assert abs(float(np.mean(new["w"]))) < 5 * std / math.sqrt(D)
    assert dp.privacy_metrics()["aggregated"] == 5


def test_sum_noise_std_is_z_times_c() -> None:
    rng = np.random.default_rng(3)
    total = {"w": np.zeros(D)}
    add_gaussian_noise(total, 0.7 * 3.0, rng)
    assert float(np.std(total["w"])) == pytest.approx(2.1, rel=TOL)


def test_distributed_noise_is_over_provisioned_against_dropouts() -> None:
    """Each of 8 sampled workers adds z C / sqrt(4) (min_updates = 4); 6 survive: the sum's noise
    is z C sqrt(6/4) >= z C, and the accountant charges exactly that multiplier."""
    z, clip = 1.0, 1.0
    dp = DifferentialPrivacy(
        FedAvg(), noise_multiplier=z, clipping_norm=clip, mode="distributed", min_updates=4
    )
    new, configs = _round(dp, 1, _workers(8), [np.zeros(D)] * 6)
    request = ClientDP.from_extra(configs[0].extra)
    assert request is not None
    assert request.noise_std == pytest.approx(z * clip / 2)
    # The released mean is (sum of 6 shares) / 6.
    assert float(np.std(new["w"])) * 6 == pytest.approx(z * clip * math.sqrt(6 / 4), rel=TOL)
    charged = dp.privacy_metrics()["noise_multiplier"]
    assert charged == pytest.approx(z * math.sqrt(6 / 4))
    # Distributed mode is accounted by Rényi DP (discrete-Gaussian shares have no proven PLD).
    reference = PrivacyAccountant(mechanism="rdp")
    reference.step(noise_multiplier=charged, sample_rate=1.0)
    assert dp.privacy_metrics()["epsilon"] == reference.get_epsilon(delta=1e-5)
    reference_no_dropout = PrivacyAccountant(mechanism="rdp")
    reference_no_dropout.step(noise_multiplier=z, sample_rate=1.0)
    assert dp.privacy_metrics()["epsilon"] <= reference_no_dropout.get_epsilon(delta=1e-5)


def test_distributed_noise_refuses_to_release_too_few_updates() -> None:
    dp = DifferentialPrivacy(
        FedAvg(), noise_multiplier=1.0, clipping_norm=1.0, mode="distributed", min_updates=4
    )
    with pytest.raises(RoundFailedError, match="fewer than the 4"):
        _round(dp, 1, _workers(8), [np.zeros(D)] * 3)
    with pytest.raises(ConfigError, match="sample more workers"):
        dp.configure_fit(2, _workers(3), TrainConfig())


@pytest.fixture
def small_models(monkeypatch: pytest.MonkeyPatch) -> None:
    """Eight coordinates per model: enough for the accounting, fast for many rounds."""
    monkeypatch.setitem(globals(), "D", 8)


def _sampled(rounds: int, workers: list[WorkerInfo], sampler: ClientSampler) -> Counter[str]:
    """Rounds each worker is sampled in, replayed from the public configuration alone."""
    return Counter(w.name for r in range(1, rounds + 1) for w in sampler.sample(r, workers))


@pytest.mark.usefixtures("small_models")
@pytest.mark.parametrize("z", [1.0, 2.0])
def test_a_seeded_cohort_is_accounted_per_worker_at_full_rate(z: float) -> None:
    """Issue 22: 100 workers, 50 per round, 30 rounds. The cohort is computable from the
    configuration, so no amplification by sampling applies: the reported epsilon must be at
    least the most-sampled worker's at q = 1 (22 rounds: 30.3 exactly for z = 1, 32.1 by Rényi
    DP, which the discrete-Gaussian noise is accounted by; accounting at q = 0.5 reported
    20.7)."""
    inner = FedAvg()
    inner.sampler = ClientSampler(fraction=0.5, seed=0)
    dp = DifferentialPrivacy(inner, noise_multiplier=z, clipping_norm=1.0)
    workers = _workers(100)
    for r in range(1, 31):
        _round(dp, r, workers, [np.zeros(D)] * 50)
    counts = _sampled(30, workers, inner.sampler)
    most = max(counts.values())
    assert most == 22
    exact_most = epsilon_of_history([(z, 1.0, most)], delta=1e-5, mechanism="rdp")
    amplified = epsilon_of_history([(z, 0.5, 30)], delta=1e-5, mechanism="rdp")
    reported = dp.privacy_metrics()["epsilon"]
    assert reported >= exact_most > amplified
    assert reported == pytest.approx(exact_most)
    assert dp.privacy_metrics()["most_rounds"] <= most
    per_worker = dp.worker_epsilons()
    assert set(per_worker) == set(counts)
    for name, rounds in counts.items():
        assert per_worker[name] == pytest.approx(
            epsilon_of_history([(z, 1.0, rounds)], delta=1e-5, mechanism="rdp")
        )


@settings(max_examples=25, deadline=None)
@given(
    cohorts=st.lists(
        st.sets(st.sampled_from([f"w{i}" for i in range(6)]), min_size=1), min_size=1, max_size=8
    ),
    multipliers=st.lists(st.sampled_from([0.8, 1.0, 2.5]), min_size=8, max_size=8),
)
@pytest.mark.slow
def test_per_worker_epsilon_is_that_of_its_own_rounds(
    cohorts: list[set[str]], multipliers: list[float]
) -> None:
    """Whatever the cohorts and multipliers, each worker's epsilon is that of exactly the
    rounds it was charged for, at q = 1, and the reported maximum is the largest of them."""
    accountant = ParticipationAccountant()
    taken: dict[str, list[tuple[float, float, int]]] = {}
    for cohort, z in zip(cohorts, multipliers, strict=False):
        before = accountant.max_epsilon_after(cohort, noise_multiplier=z, delta=1e-5)
        accountant.charge(sorted(cohort), noise_multiplier=z)
        assert accountant.max_epsilon(delta=1e-5) == pytest.approx(before)
        for name in cohort:
            taken.setdefault(name, []).append((z, 1.0, 1))
    epsilons = accountant.epsilons(delta=1e-5)
    assert set(epsilons) == set(taken)
    for name, history in taken.items():
        assert epsilons[name] == pytest.approx(epsilon_of_history(history, delta=1e-5))
    assert accountant.max_epsilon(delta=1e-5) == max(epsilons.values())


@pytest.mark.usefixtures("small_models")
def test_the_budget_stops_on_the_most_charged_worker() -> None:
    """The target is what 12 rounds at q = 1 cost: the federation stops before the round that
    would give any sampled worker a 13th, although the average worker is far below."""
    inner = FedAvg()
    inner.sampler = ClientSampler(fraction=0.5, seed=3)
    target = epsilon_of_history([(2.0, 1.0, 12)], delta=1e-5, mechanism="rdp")
    dp = DifferentialPrivacy(inner, noise_multiplier=2.0, clipping_norm=1.0, target_epsilon=target)
    workers = _workers(20)
    stopped = None
    for r in range(1, 31):
        try:
            _round(dp, r, workers, [np.zeros(D)] * 10)
        except PrivacyBudgetExhausted:
            stopped = r
            break
    assert stopped is not None
    before = _sampled(stopped - 1, workers, inner.sampler)
    including = _sampled(stopped, workers, inner.sampler)
    assert max(before.values()) == 12 < max(including.values())
    assert dp.privacy_metrics()["epsilon"] <= target
    assert dp.privacy_metrics()["epsilon"] == pytest.approx(target)


@pytest.mark.usefixtures("small_models")
def test_calibration_assumes_a_worker_may_be_sampled_every_round() -> None:
    inner = FedAvg()
    inner.sampler = ClientSampler(fraction=0.5, seed=0)
    dp = DifferentialPrivacy(
        inner, noise_multiplier=None, clipping_norm=1.0, target_epsilon=8.0, rounds=30
    )
    _round(dp, 1, _workers(10), [np.zeros(D)] * 5)
    assert dp.noise_multiplier == pytest.approx(
        calibrate_noise_multiplier(
            target_epsilon=8.0, delta=1e-5, sample_rate=1.0, steps=30, mechanism="rdp"
        )
    )
    assert dp.noise_multiplier is not None
    history = [(dp.noise_multiplier, 1.0, 30)]
    assert epsilon_of_history(history, delta=1e-5, mechanism="rdp") <= 8.0


def _rounds_until_stop(dp: DifferentialPrivacy, limit: int) -> int:
    for r in range(1, limit + 1):
        try:
            _round(dp, r, _workers(2), [np.zeros(8)] * 2)
        except PrivacyBudgetExhausted:
            return r - 1
    return limit


def test_budget_stop_triggers_at_the_right_round() -> None:
    z, q, target = 6.0, 1.0, 3.0
    # The reference: the last round count whose epsilon stays within the target.
    expected = 0
    while True:
        acc = PrivacyAccountant(mechanism="rdp")
        acc.step(noise_multiplier=z, sample_rate=q, steps=expected + 1)
        if acc.get_epsilon(delta=1e-5) > target:
            break
        expected += 1
    assert expected > 1
    dp = DifferentialPrivacy(FedAvg(), noise_multiplier=z, clipping_norm=1.0, target_epsilon=target)
    global D
    saved, D = D, 8
    try:
        completed = _rounds_until_stop(dp, 100)
    finally:
        D = saved
    assert completed == expected
    assert dp.privacy_metrics()["epsilon"] <= target


def test_noise_multiplier_is_calibrated_from_the_target_and_round_count() -> None:
    dp = DifferentialPrivacy(
        FedAvg(), noise_multiplier=None, clipping_norm=1.0, target_epsilon=4.0, rounds=5
    )
    global D
    saved, D = D, 8
    try:
        completed = _rounds_until_stop(dp, 10)
    finally:
        D = saved
    assert completed == 5
    assert 0.98 * 4.0 < dp.privacy_metrics()["epsilon"] <= 4.0


def test_adaptive_clipping_tracks_the_median_and_is_accounted() -> None:
    norms = np.linspace(0.5, 5.0, 20)
    adaptive = AdaptiveClipping(clip_norm=0.1, target_quantile=0.5, count_noise_std=2.0)
    dp = DifferentialPrivacy(
        FedAvg(), noise_multiplier=1.0, clipping_norm=0.1, adaptive=adaptive,
    )  # fmt: skip
    deltas = [np.full(16, n / 4) for n in norms]
    global_ = {"w": np.zeros(16), "steps": np.zeros((), np.int64)}
    for r in range(1, 61):
        instructions = dp.configure_fit(r, _workers(20), TrainConfig())
        agg = dp.start_aggregation(r, global_)
        results = []
        for inst, d in zip(instructions, deltas, strict=True):
            request = ClientDP.from_extra(inst.config.extra)
            assert request is not None
            assert request.report_unclipped
            upd = privatize_update(global_, {"w": d, "steps": np.array(0)}, request)
            agg.add({"w": upd.delta["w"], "steps": global_["steps"]}, 1)
            results.append(FitResult(inst.worker, 1, upd.metrics))
        dp.aggregate_fit(r, global_, agg.result(), results, [])
    assert dp.clip_norm == pytest.approx(np.median(norms), rel=0.25)
    # Accounted at z = 1 (update noise and count noise together), once per round, by Rényi DP.
    reference = PrivacyAccountant(mechanism="rdp")
    reference.step(noise_multiplier=1.0, sample_rate=1.0, steps=60)
    assert dp.privacy_metrics()["epsilon"] == pytest.approx(reference.get_epsilon(delta=1e-5))


def test_adaptive_clipping_reports_what_its_noise_really_costs() -> None:
    """Issue 22: 20 workers, z = 1, adaptive clipping with its default count noise. The noise
    the round really drew (measured on the released model) and the count noise, at the bits'
    real sensitivity of 1, make a Gaussian mechanism whose 30-round epsilon must not exceed
    the one reported for z (main reported 39.8 where the noise cost 59.4)."""
    dp = DifferentialPrivacy(
        FedAvg(), noise_multiplier=1.0, clipping_norm=1.0,
        adaptive=AdaptiveClipping(clip_norm=1.0),
    )  # fmt: skip
    new, _ = _round(dp, 1, _workers(20), [np.zeros(D)] * 20)
    n = 20
    z_update = float(np.std(new["w"])) * n / 1.0  # std of the mean = z_update C / n
    assert dp.adaptive is not None
    assert dp.adaptive.count_noise_std is not None
    count_multiplier = dp.adaptive.count_noise_std / 1.0  # raw 0/1 bits: sensitivity 1
    real = (z_update**-2 + count_multiplier**-2) ** -0.5
    charged = dp.privacy_metrics()["noise_multiplier"]
    assert charged == 1.0
    really = epsilon_of_history([(real, 1.0, 30)], delta=1e-5, mechanism="rdp")
    reported = epsilon_of_history([(charged, 1.0, 30)], delta=1e-5, mechanism="rdp")
    assert really <= reported * (1 + 3 * TOL)
    assert dp.privacy_metrics()["epsilon"] == epsilon_of_history(
        [(charged, 1.0, 1)], delta=1e-5, mechanism="rdp"
    )


def test_secure_aggregation_feeds_one_presummed_update() -> None:
    """Under secure aggregation the aggregator receives the unit-weight mean of n updates."""
    dp = DifferentialPrivacy(
        FedAvg(), noise_multiplier=1e-9, clipping_norm=1.0, secure_aggregation=True
    )
    dp.configure_fit(1, _workers(4), TrainConfig())
    g = _global()
    agg = dp.start_aggregation(1, g)
    agg.add({"w": np.full(D, 0.001), "steps": g["steps"]}, 4)  # the mean of 4 clipped deltas
    new = dp.aggregate_fit(1, g, agg.result(), [], [])
    assert dp.privacy_metrics()["aggregated"] == 4
    np.testing.assert_allclose(new["w"], 0.001, atol=1e-6)


def test_central_noise_is_exact_integer_noise_on_a_fine_grid() -> None:
    """Issue 22 item 7, central mode: the released sum is a point of the 2^-20 C grid plus
    discrete-Gaussian noise of sigma z (C/s + 2 sqrt(d)) ring units drawn through the injected
    sampler (OpenDP's by default), never numpy's floating-point normal."""
    draws: list[tuple[float, int]] = []

    def sampler(sigma: float, size: int) -> np.ndarray:
        draws.append((sigma, size))
        return np.zeros(size, dtype=np.int64)

    z, clip, d = 1.3, 0.5, 64
    dp = DifferentialPrivacy(FedAvg(), noise_multiplier=z, clipping_norm=clip, sampler=sampler)
    dp.configure_fit(1, _workers(3), TrainConfig())
    g = {"w": np.zeros(d), "steps": np.zeros((), np.int64)}
    agg = dp.start_aggregation(1, g)
    rng = np.random.default_rng(0)
    for _ in range(3):
        agg.add({"w": rng.normal(0, 0.01, d), "steps": g["steps"]}, 1)
    new = dp.aggregate_fit(1, g, agg.result(), [], [])
    step = clip * 2.0**-20
    assert [size for _, size in draws] == [d]
    assert draws[0][0] == pytest.approx(z * (clip / step + 2 * np.sqrt(d)))
    grid = new["w"] * 3 / step
    np.testing.assert_allclose(grid, np.rint(grid), atol=1e-6)
    # With OpenDP's sampler the noise has the calibrated spread (std z C / n on the mean).
    dp = DifferentialPrivacy(FedAvg(), noise_multiplier=z, clipping_norm=clip)
    new, _ = _round(dp, 1, _workers(4), [np.zeros(D)] * 4)
    assert float(np.std(new["w"])) == pytest.approx(z * clip / 4, rel=TOL)


def test_central_mode_reclips_what_it_can_see() -> None:
    dp = DifferentialPrivacy(FedAvg(), noise_multiplier=1e-9, clipping_norm=1.0)
    dp.configure_fit(1, _workers(1), TrainConfig())
    g = _global()
    agg = dp.start_aggregation(1, g)
    agg.add({"w": np.full(D, 10.0), "steps": g["steps"]}, 1)  # a worker that did not clip
    new = dp.aggregate_fit(1, g, agg.result(), [], [])
    # Re-clipped to 1, then rounded to the exact noise's grid of 2^-20 C.
    assert float(np.linalg.norm(new["w"])) == pytest.approx(1.0, rel=1e-4)


class _Median(Strategy):
    needs_individual_updates = True

    def start_aggregation(self, round_number: int, global_weights: Weights) -> UpdateAggregator:
        raise NotImplementedError


def test_refusals() -> None:
    with pytest.raises(ConfigError, match="individual updates"):
        DifferentialPrivacy(_Median(), noise_multiplier=1.0, clipping_norm=1.0)
    with pytest.raises(ConfigError, match="calibrate"):
        DifferentialPrivacy(FedAvg(), noise_multiplier=None, clipping_norm=1.0)
    with pytest.raises(ConfigError, match="distributed"):
        DifferentialPrivacy(
            FedAvg(), noise_multiplier=1.0, clipping_norm=1.0, mode="distributed",
            adaptive=AdaptiveClipping(clip_norm=1.0),
        )  # fmt: skip
    with pytest.raises(ConfigError, match="count noise"):
        DifferentialPrivacy(
            FedAvg(), noise_multiplier=4.0, clipping_norm=1.0,
            adaptive=AdaptiveClipping(clip_norm=1.0, count_noise_std=1.0),
        )  # fmt: skip


def test_state_dict_resumes_the_budget() -> None:
    dp = DifferentialPrivacy(FedAvg(), noise_multiplier=1.0, clipping_norm=1.0)
    _round(dp, 1, _workers(2), [np.zeros(D)] * 2)
    _round(dp, 2, _workers(3), [np.zeros(D)] * 3)
    again = DifferentialPrivacy(FedAvg(), noise_multiplier=1.0, clipping_norm=1.0)
    again.load_state_dict(json.loads(json.dumps(dp.state_dict())))
    assert again.worker_epsilons() == dp.worker_epsilons()
    assert again.accountant.rounds("w0") == 2
    assert again.accountant.rounds("w2") == 1
    # A checkpoint with one history at a sampling rate cannot say who took part.
    old = {"inner": {}, "accountant": {"mechanism": "rdp", "history": [[1.0, 0.5, 3]]}}
    with pytest.raises(ConfigError, match="per-worker"):
        again.load_state_dict({**old, "clip_norm": 1.0})


def test_worker_applies_the_plans_dp_to_any_trainer_result() -> None:
    from fedcore.worker.privacy import apply_client_dp
    from fedcore.worker.trainer import FitOutput

    received = {"w": np.zeros(4, np.float32), "n": np.array(7)}
    fit = FitOutput({"w": np.full(4, 2.0, np.float32), "n": np.array(9)}, 500, {"loss": 0.1})
    assert apply_client_dp(fit, received, None) is fit  # no DP asked
    config = TrainConfig(extra=ClientDP(clip_norm=1.0, report_unclipped=True).to_extra())
    out = apply_client_dp(fit, received, ClientDP.from_extra(config.extra))
    assert out.is_delta
    assert out.num_examples == 1  # bounded weight
    np.testing.assert_allclose(out.weights["w"], 0.5)
    assert out.weights["n"] == 0
    assert out.metrics == {"loss": 0.1, "dp_unclipped": 0.0}
