"""The data owner's controls in memory: policy parsing, the pure check, the ledger, the
label histogram, dataset metadata and the coordinator's roster."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import dp_accounting
import numpy as np
import pytest
from dp_accounting.rdp import rdp_privacy_accountant

from fedcore.data.metadata import (
    DatasetMetadata,
    load_metadata,
    metadata_path_for,
    normalize_tag,
)
from fedcore.errors import ConfigError, DataError, LedgerError, PolicyError
from fedcore.policy import (
    Charge,
    PlanRequest,
    PrivacyLedger,
    RecordDPSetup,
    Refusal,
    check,
    epsilon_of,
    load_policy,
    noisy_label_histogram,
)
from fedcore.server.reporting.roster import ConnectedWorker, format_roster
from fedcore.v1 import fedcore_pb2 as pb
from fedcore.worker import PolicyGuard

FULL_POLICY = """
[models]
allowed = ["mnist-mlp", "logreg"]
max-parameters = 200000

[training]
max-epochs = 2

[secure-aggregation]
required = true

[differential-privacy]
required = "client-level"
min-noise-multiplier = 1.0
max-clip-norm = 1.0

[budget]
study = "mnist-2026"
epsilon = 8.0
delta = 1e-5
ledger = "ledger.json"

[dataset]
release-label-histogram = true
label-histogram-noise-multiplier = 20.0
label-histogram-labels = 10
"""


def write_policy(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "policy.toml"
    path.write_text(text)
    return path


def task(
    *,
    kind: int = pb.TASK_KIND_FIT,
    model: str = "logreg",
    shape: tuple[int, ...] = (10, 784),
    epochs: int = 1,
    secagg: bool = True,
    extra: dict[str, float] | None = None,
) -> pb.Task:
    t = pb.Task(
        task_id="t",
        round=3,
        kind=kind,  # type: ignore[arg-type]
        model=pb.ModelSpec(name=model),
        train=pb.TrainConfig(epochs=epochs, batch_size=32, extra=extra or {}),
        weights=pb.PayloadHeader(tensors=[pb.TensorSpec(name="w", shape=shape)]),
    )
    if secagg:
        t.secagg.CopyFrom(pb.SecAggSetup(round_id="r"))
    return t


DP = {"dp.clip_norm": 1.0, "dp.noise_multiplier": 1.5}


# ---------------------------------------------------------------- policy file


def test_full_policy_parses(tmp_path: Path) -> None:
    policy = load_policy(write_policy(tmp_path, FULL_POLICY))
    assert policy.models.allowed == ("mnist-mlp", "logreg")
    assert policy.models.max_parameters == 200_000
    assert policy.training.max_epochs == 2
    assert policy.privacy.require_secagg
    assert policy.privacy.require_dp == "client-level"
    assert policy.budget is not None
    assert policy.budget.ledger == tmp_path / "ledger.json"  # relative to the policy file
    assert policy.dataset.label_histogram_labels == 10
    assert "secure aggregation required" in policy.describe()


def test_empty_policy_allows_everything(tmp_path: Path) -> None:
    policy = load_policy(write_policy(tmp_path, ""))
    assert policy.describe() == ["no restrictions"]
    assert check(policy, PlanRequest.from_task(task(secagg=False, epochs=50))) is None


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("[training]\nmax-epoch = 2\n", "unknown key(s) 'max-epoch'; known keys: max-epochs"),
        ("[model]\nallowed = []\n", "unknown key(s) 'model'"),
        ("[training]\nmax-epochs = 'two'\n", "'max-epochs' must be an integer"),
        ("[training]\nmax-epochs = 0\n", "'max-epochs' must be at least 1"),
        ("[differential-privacy]\nrequired = 'yes'\n", "must be one of client-level"),
        ("[budget]\nstudy = 's'\nepsilon = 1.0\ndelta = 1e-5\n", "'ledger' is required"),
        (
            "[dataset]\nrelease-label-histogram = true\nlabel-histogram-noise-multiplier = 5.0\n"
            "label-histogram-labels = 10\n",
            "needs a [budget] section",
        ),
        ("[coordinators]\nallowed = []\n", "would refuse every coordinator"),
        ("models = 3\n", "must be a table"),
        ("[models\n", "not valid TOML"),
    ],
)
def test_policy_errors_name_the_problem(tmp_path: Path, text: str, message: str) -> None:
    with pytest.raises(PolicyError, match=re.escape(message)):
        load_policy(write_policy(tmp_path, text))


def test_policy_errors_are_config_errors(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read policy file"):
        load_policy(tmp_path / "missing.toml")


# ---------------------------------------------------------------- the pure check


@pytest.fixture
def strict(tmp_path: Path) -> PolicyGuard:
    return PolicyGuard(load_policy(write_policy(tmp_path, FULL_POLICY)), num_examples=400)


def rule_of(guard: PolicyGuard, t: pb.Task) -> str | None:
    refusal = guard.review(t)
    return None if refusal is None else refusal.rule


def test_a_plan_within_the_policy_passes(strict: PolicyGuard) -> None:
    assert strict.review(task(extra=DP)) is None


@pytest.mark.parametrize(
    ("plan", "rule"),
    [
        (task(model="mnist-cnn", extra=DP), "models.allowed"),
        (task(model="mnist-mlp", shape=(784, 300), extra=DP), "models.max-parameters"),
        (task(epochs=3, extra=DP), "training.max-epochs"),
        (task(secagg=False, extra=DP), "secure-aggregation.required"),
        (
            task(extra={"dp.clip_norm": 5.0, "dp.noise_multiplier": 1.5}),
            "differential-privacy.max-clip-norm",
        ),
        (
            task(extra={"dp.clip_norm": 1.0, "dp.noise_multiplier": 0.5}),
            "differential-privacy.min-noise-multiplier",
        ),
        (task(extra={"dp.clip_norm": 1.0}), "differential-privacy.min-noise-multiplier"),
        (task(), "differential-privacy.required"),
    ],
)
def test_each_rule_refuses_the_plan_that_breaks_it(
    strict: PolicyGuard, plan: pb.Task, rule: str
) -> None:
    assert rule_of(strict, plan) == rule


def test_a_refusal_says_what_to_change(strict: PolicyGuard) -> None:
    refusal = strict.review(task(secagg=False, extra=DP))
    assert isinstance(refusal, Refusal)
    assert str(refusal).startswith("refused by the worker's policy [secure-aggregation.required]")
    assert "--secagg" in str(refusal)


def test_evaluation_is_checked_for_model_and_permission(tmp_path: Path) -> None:
    policy = load_policy(
        write_policy(
            tmp_path, '[models]\nallowed = ["logreg"]\n[training]\nallow-evaluation = false\n'
        )
    )
    evaluate = PlanRequest.from_task(task(kind=pb.TASK_KIND_EVALUATE, secagg=False))
    refusal = check(policy, evaluate)
    assert refusal is not None
    assert refusal.rule == "training.allow-evaluation"
    other = PlanRequest.from_task(task(kind=pb.TASK_KIND_EVALUATE, model="mnist-cnn"))
    assert check(policy, other) == Refusal("models.allowed", check(policy, other).reason)  # type: ignore[union-attr]


def test_a_budget_refuses_plans_without_dp(tmp_path: Path) -> None:
    text = '[budget]\nstudy = "s"\nepsilon = 5.0\ndelta = 1e-5\nledger = "l.json"\n'
    guard = PolicyGuard(load_policy(write_policy(tmp_path, text)), num_examples=400)
    refusal = guard.review(task(secagg=False))
    assert refusal is not None
    assert refusal.rule == "budget"
    assert "without differential privacy" in refusal.reason


def test_record_level_dp_is_checked_against_its_bounds(tmp_path: Path) -> None:
    text = (
        '[differential-privacy]\nrequired = "record-level"\n'
        "dpsgd-min-noise-multiplier = 1.0\ndpsgd-max-grad-norm = 1.0\n"
    )
    policy = load_policy(write_policy(tmp_path, text))
    with pytest.raises(PolicyError, match="DP-SGD"):
        PolicyGuard(policy, num_examples=10)  # this worker runs no DP-SGD
    with pytest.raises(PolicyError, match=r"noise multiplier is 0\.5"):
        PolicyGuard(policy, num_examples=10, record_dp=RecordDPSetup(0.5, 1.0))
    guard = PolicyGuard(policy, num_examples=10, record_dp=RecordDPSetup(1.2, 1.0))
    assert guard.review(task(secagg=False)) is None


def test_allowed_coordinators_fail_closed_without_tls(tmp_path: Path) -> None:
    policy = load_policy(write_policy(tmp_path, '[coordinators]\nallowed = ["coord.example"]\n'))
    with pytest.raises(PolicyError, match="TLS"):
        PolicyGuard(policy, num_examples=10)
    with pytest.raises(PolicyError, match=r"'evil\.example'.*nothing was sent"):
        PolicyGuard(policy, num_examples=10, coordinator_identity="evil.example")
    good = PolicyGuard(policy, num_examples=10, coordinator_identity="coord.example")
    assert good.review(task()) is None


# ---------------------------------------------------------------- the ledger


def test_epsilon_is_dp_accountings_rdp_epsilon() -> None:
    charges = [
        Charge(noise_multiplier=1.1, sample_rate=0.01, steps=1000),
        Charge(noise_multiplier=3.0),
    ]
    direct = rdp_privacy_accountant.RdpAccountant()
    direct.compose(
        dp_accounting.SelfComposedDpEvent(
            dp_accounting.PoissonSampledDpEvent(0.01, dp_accounting.GaussianDpEvent(1.1)), 1000
        )
    )
    direct.compose(dp_accounting.GaussianDpEvent(3.0))
    assert epsilon_of(charges, delta=1e-5) == pytest.approx(direct.get_epsilon(1e-5), rel=1e-12)


def test_one_gaussian_release_golden_value() -> None:
    # Regression golden (dp-accounting 0.6.0), below Mironov's classical RDP conversion bound
    # min_a a/(2 z^2) + log(1/delta)/(a-1).
    eps = epsilon_of([Charge(noise_multiplier=1.0)], delta=1e-5)
    assert eps == pytest.approx(4.728507, abs=1e-5)
    classical = min(a / 2 + math.log(1e5) / (a - 1) for a in np.linspace(1.01, 100, 10_000))
    assert eps < classical
    assert epsilon_of([], delta=1e-5) == 0.0


def test_the_ledger_persists_and_refuses_to_overspend(tmp_path: Path) -> None:
    path = tmp_path / "silo" / "ledger.json"
    charge = Charge(noise_multiplier=2.0, what="round 1")
    two = epsilon_of([charge] * 2, delta=1e-5)
    budget = (two + epsilon_of([charge] * 3, delta=1e-5)) / 2
    ledger = PrivacyLedger(path, study="s")
    assert ledger.spend([charge], delta=1e-5, budget=budget) == pytest.approx(
        epsilon_of([charge], delta=1e-5)
    )
    # A new instance (a restarted worker) reads what the first one wrote.
    again = PrivacyLedger(path, study="s")
    assert again.spend([charge], delta=1e-5, budget=budget) == pytest.approx(two)
    before = path.read_bytes()
    assert again.spend([charge], delta=1e-5, budget=budget) is None
    assert path.read_bytes() == before  # nothing written for a refused charge
    assert len(PrivacyLedger(path, study="s").charges()) == 2
    # Another study of the same silo has its own account; no temp files are left behind.
    assert PrivacyLedger(path, study="other").epsilon(delta=1e-5) == 0.0
    assert sorted(p.name for p in path.parent.iterdir()) == ["ledger.json", "ledger.json.lock"]
    assert json.loads(path.read_text())["studies"]["s"]["charges"][0]["what"] == "round 1"


def test_a_corrupt_ledger_is_an_error_never_a_fresh_start(tmp_path: Path) -> None:
    path = tmp_path / "ledger.json"
    path.write_text("{not json")
    with pytest.raises(LedgerError, match="corrupt"):
        PrivacyLedger(path, study="s").epsilon(delta=1e-5)
    path.write_text('{"format": "something else"}')
    with pytest.raises(LedgerError, match="not a fedcore privacy ledger"):
        PrivacyLedger(path, study="s").charges()


def test_guard_pays_each_round_until_the_budget_is_spent(tmp_path: Path) -> None:
    z = 2.0
    budget = (
        epsilon_of([Charge(noise_multiplier=z)] * 2, delta=1e-5)
        + epsilon_of([Charge(noise_multiplier=z)] * 3, delta=1e-5)
    ) / 2
    text = f'[budget]\nstudy = "s"\nepsilon = {budget}\ndelta = 1e-5\nledger = "l.json"\n'
    plan = task(extra={"dp.clip_norm": 1.0, "dp.noise_multiplier": z})
    for _ in range(2):
        guard = PolicyGuard(load_policy(write_policy(tmp_path, text)), num_examples=400)
        assert guard.review(plan) is None
        assert guard.pay(plan) is None
    refusal = guard.review(plan)
    assert refusal is not None
    assert refusal.rule == "budget"
    assert "the budget is spent" in refusal.reason
    assert guard.pay(plan) is not None


def test_dpsgd_rounds_are_charged_as_opacus_counts_them_for_one_record_replaced(
    tmp_path: Path,
) -> None:
    text = '[budget]\nstudy = "s"\nepsilon = 100.0\ndelta = 1e-5\nledger = "l.json"\n'
    guard = PolicyGuard(
        load_policy(write_policy(tmp_path, text)),
        num_examples=400,
        record_dp=RecordDPSetup(1.0, 1.0),
    )
    charges = guard.charges(PlanRequest.from_task(task(epochs=2), record_dp=guard.record_dp))
    assert charges == [
        Charge(
            noise_multiplier=1.0,
            sample_rate=1 / 13,
            steps=26,
            what="round 3: DP-SGD",
            relation="replace-one",
        )
    ]


# ---------------------------------------------------------------- the label histogram


def test_label_histogram_noise_has_the_stated_std() -> None:
    labels = np.repeat(np.arange(10), 100)
    rng = np.random.default_rng(0)
    draws = np.array(
        [
            noisy_label_histogram(labels, num_labels=10, noise_multiplier=5.0, rng=rng)[0]
            for _ in range(400)
        ]
    )
    assert np.abs(draws.mean(axis=0) - 100).max() < 1.5
    assert draws.std() == pytest.approx(5.0, rel=0.05)
    counts, charge = noisy_label_histogram([0, 12, -1], num_labels=3, noise_multiplier=1.0, rng=rng)
    assert len(counts) == 3  # labels out of range are not counted, and not revealed
    # One record replaced moves it between two labels: sensitivity sqrt(2) (issue 22).
    assert charge == Charge(noise_multiplier=1.0 / math.sqrt(2), what="label histogram")


def test_label_histogram_is_released_once_and_charged_once(tmp_path: Path) -> None:
    policy = load_policy(write_policy(tmp_path, FULL_POLICY))
    labels = np.repeat(np.arange(10), 40)
    first = PolicyGuard(policy, num_examples=400).label_histogram(labels)
    again = PolicyGuard(policy, num_examples=400).label_histogram(labels)
    assert first is not None
    assert again == first  # a restart resends the stored release: no fresh noise
    assert first.noise_std == 20.0
    charged = Charge(noise_multiplier=20.0 / math.sqrt(2))  # one record replaced
    assert first.epsilon == pytest.approx(epsilon_of([charged], delta=1e-5))
    assert len(PrivacyLedger(tmp_path / "ledger.json", study="mnist-2026").charges()) == 1
    assert (
        PolicyGuard(load_policy(write_policy(tmp_path, "")), num_examples=1).label_histogram(labels)
        is None
    )


# ---------------------------------------------------------------- dataset metadata


def test_metadata_file_round_trips_through_the_hello(tmp_path: Path) -> None:
    meta = tmp_path / "shard-0.meta.toml"
    meta.write_text(
        'name = "MNIST silo A"\ndescription = "digits"\ntags = ["#MNIST", "digits", "mnist"]\n'
        'license = "CC-BY-SA-3.0"\nnum-examples = 400\n'
        '[[features]]\nname = "image"\ndtype = "uint8"\nshape = [28, 28]\n'
    )
    assert metadata_path_for(tmp_path / "shard-0.npz") == meta
    assert metadata_path_for(tmp_path) == tmp_path / "metadata.toml"
    data = load_metadata(meta, num_examples=400)
    assert data.tags == ("mnist", "digits")
    assert data.features[0].shape == (28, 28)
    assert data.has_tags(("mnist",))
    assert not data.has_tags(("mnist", "diabetes"))
    assert DatasetMetadata.from_proto(data.to_proto()) == data
    assert data.summary() == "'MNIST silo A' #mnist #digits, 400 examples, CC-BY-SA-3.0"


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ('name = "x"\nnum-examples = 10\n', "says num-examples = 10, but the shard holds 400"),
        ('name = "x"\ncolour = "red"\n', "unknown key"),
        ('description = "x"\n', "'name' is required"),
        ('name = "x"\ntags = ["two words"]\n', "invalid tag"),
    ],
)
def test_metadata_errors(tmp_path: Path, text: str, message: str) -> None:
    path = tmp_path / "m.toml"
    path.write_text(text)
    with pytest.raises(DataError, match=message):
        load_metadata(path, num_examples=400)


def test_tags_are_normalized() -> None:
    assert normalize_tag(" #Diabetes ") == "diabetes"
    with pytest.raises(ConfigError):
        normalize_tag("#")


def test_roster_lists_who_holds_what() -> None:
    data = DatasetMetadata("MNIST A", tags=("mnist",), license="CC0", num_examples=400)
    table = format_roster(
        [
            ConnectedWorker("w1", "a", 400, "idle", data, ()),
            ConnectedWorker("w2", "b", 50, "idle", None, ("mnist",)),
        ],
        ("mnist",),
    )
    lines = table.splitlines()
    assert lines[0] == "connected workers: 2 (selecting those tagged #mnist)"
    assert lines[2].split() == ["a", "400", "MNIST", "A", "#mnist", "CC0", "yes"]
    assert lines[3].split() == ["b", "50", "-", "-", "-", "no", "(lacks", "#mnist)"]


def test_the_dp_strategy_states_what_the_policy_reads() -> None:
    from fedcore.policy.check import DP_CLIP_KEY, DP_NOISE_MULTIPLIER_KEY
    from fedcore.privacy import ClientDP

    extra = ClientDP(clip_norm=0.5, noise_multiplier=1.3).to_extra()
    request = PlanRequest.from_task(task(extra=extra))
    assert request.client_dp is not None
    assert (request.client_dp.clip_norm, request.client_dp.noise_multiplier) == (0.5, 1.3)
    assert {DP_CLIP_KEY, DP_NOISE_MULTIPLIER_KEY} <= set(extra)
    assert ClientDP.from_extra(extra) == ClientDP(clip_norm=0.5, noise_multiplier=1.3)
