"""Federated analytics through real processes: one fed-server, three fed-workers serving CSV
tables, and the data scientist's client (Python API and fed-query) asking many queries.

The workers' operator turned the noise off (the test-only environment variable): every
answer is compared with the exact value computed from the tables here. The noise itself is
tested against its calibrated scale in test_analytics.py.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import numpy as np
import pytest
from conftest import BIN, Proc

import fedcore
from fedcore.analytics.answer import quantiles_from_histogram
from fedcore.analytics.client import AnalyticsClient
from fedcore.analytics.query import QueryError
from fedcore.errors import ConfigError, QueryRefusedError

pytestmark = pytest.mark.slow

SILOS = 3
ROWS = 60
MOCK = "age,sex,bmi,income\n50,F,25.5,1000\n61,M,31.0,2000\n"


@dataclass
class Federation:
    port: int
    token: Path
    worker_token: Path
    data: dict[str, np.ndarray]
    root: Path
    server: Proc

    def client(self) -> AnalyticsClient:
        return fedcore.connect(f"127.0.0.1:{self.port}", token_file=self.token)


def _write_silo(root: Path, i: int, rng: np.random.Generator) -> dict[str, np.ndarray]:
    age = rng.integers(20, 90, ROWS).astype(float)
    sex = rng.choice(["F", "M"], ROWS)
    bmi = rng.uniform(15, 45, ROWS).round(1)
    bmi[0] = 80.0  # outside the declared bounds: clamped to 60
    income = rng.integers(1000, 9000, ROWS).astype(float)
    lines = ["age,sex,bmi,income"] + [
        f"{a:g},{s},{b:g},{n:g}" for a, s, b, n in zip(age, sex, bmi, income, strict=True)
    ]
    (root / f"silo{i}.csv").write_text("\n".join(lines) + "\n")
    (root / f"silo{i}.meta.toml").write_text(
        f'name = "clinic {i}"\ntags = ["#diabetes"]\nmock = "mock.csv"\n'
        '[[features]]\nname = "age"\ndtype = "float64"\nminimum = 0\nmaximum = 100\n'
        '[[features]]\nname = "sex"\ndtype = "category"\ncategories = ["F", "M"]\n'
        '[[features]]\nname = "bmi"\ndtype = "float64"\nminimum = 10\nmaximum = 60\n'
        '[[features]]\nname = "income"\ndtype = "float64"\nminimum = 0\nmaximum = 10000\n'
    )
    (root / f"policy{i}.toml").write_text(
        f'[budget]\nstudy = "diabetes-2026"\nepsilon = 3.0\ndelta = 1e-5\nledger = "ledger{i}.json"\n'
        '[analytics]\nallowed-columns = ["age", "sex", "bmi"]\nmax-epsilon = 5.0\n'
    )
    return {"age": age, "sex": sex, "bmi": bmi, "income": income}


@pytest.fixture(scope="module")
def federation(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Federation]:
    root = tmp_path_factory.mktemp("analytics")
    rng = np.random.default_rng(15)
    parts = [_write_silo(root, i, rng) for i in range(SILOS)]
    (root / "mock.csv").write_text(MOCK)
    data = {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
    certs = root / "certs"
    for name in ("alice",):
        subprocess.run(
            [str(BIN / "fed-certs"), "add-scientist", "--dir", str(certs), name],
            check=True,
            capture_output=True,
        )
    started: list[Proc] = []
    try:
        server = Proc(
            [
                str(BIN / "fed-server"),
                "--listen",
                "127.0.0.1:0",
                "--scientists",
                str(certs / "scientists.json"),
                "--analytics-only",
                "--progress",
                "plain",
                "--log-json",
            ],
            "fed-server",
        )
        started.append(server)
        port = int(server.wait_for_line(r"listening on [\d.]+:(\d+)", 60).group(1))
        env = dict(os.environ, FEDCORE_ANALYTICS_EXACT_FOR_TESTS="1")
        for i in range(SILOS):
            worker = Proc(
                [
                    str(BIN / "fed-worker"),
                    "--server",
                    f"127.0.0.1:{port}",
                    "--data",
                    str(root / f"silo{i}.csv"),
                    "--name",
                    f"clinic-{i}",
                    "--policy",
                    str(root / f"policy{i}.toml"),
                    "--log-json",
                ],
                f"clinic-{i}",
                env=env,
            )
            started.append(worker)
        server.wait_for_event(
            "worker_joined", n=SILOS, worker=re.compile(r"^clinic-\d$"), timeout=90
        )
        worker_token = root / "worker.token"
        worker_token.write_text("not-a-scientist-token\n")
        yield Federation(
            port, certs / "scientists" / "alice.token", worker_token, data, root, server
        )
    finally:
        for p in started:
            p.signal(signal.SIGKILL)
        for p in started:
            p.kill()


def _clamped(x: np.ndarray, lo: float, hi: float) -> np.ndarray:
    clamped: np.ndarray = np.clip(x, lo, hi)
    return clamped


def test_search_by_tag_and_mock_fetch_return_metadata_and_the_mock_only(
    federation: Federation,
) -> None:
    with federation.client() as fed:
        found = fed.datasets(tag="#diabetes")
        assert [d.silo for d in found] == ["clinic-0", "clinic-1", "clinic-2"]
        bmi = found[0].dataset.feature("bmi")
        assert bmi is not None
        assert bmi.bounds == (10.0, 60.0)
        assert all(d.has_mock and d.dataset.mock_csv == "" for d in found)
        assert fed.datasets(tag="mnist") == []
        mock = fed.mock_csv("clinic-1")
        table = fed.mock("clinic-1")
    assert table.num_rows == 2
    assert table.column("bmi").to_pylist() == [25.5, 31.0]
    real_rows = (federation.root / "silo1.csv").read_text().splitlines()[1:]
    assert not any(row in mock for row in real_rows)


def test_every_query_type_matches_the_exact_answer(federation: Federation) -> None:
    d = federation.data
    bmi = _clamped(d["bmi"], 10, 60)
    old = d["age"] > 60
    with federation.client() as fed:
        count = fed.query('count() where age > 60 and sex == "F"', epsilon=0.1)
        total = fed.query("sum(bmi)", epsilon=0.1)
        mean = fed.query("mean(bmi) where age > 60 group by sex", epsilon=0.1)
        var = fed.query("var(bmi)", epsilon=0.1)
        std = fed.query("std(age)", epsilon=0.1)
        hist = fed.query("histogram(age, bins=[0, 40, 60, 100]) group by sex", epsilon=0.1)
        quant = fed.query("quantiles(bmi, [0.25, 0.5, 0.9])", epsilon=0.1)
    assert count.exact_test_mode
    assert count.value == pytest.approx(np.sum(old & (d["sex"] == "F")), abs=1e-4)
    assert total.value == pytest.approx(bmi.sum(), rel=1e-6)
    for sex in ("F", "M"):
        chosen = old & (d["sex"] == sex)
        assert mean.cell(sex).value == pytest.approx(bmi[chosen].mean(), rel=1e-6)
        assert mean.cell(sex).count == pytest.approx(chosen.sum(), abs=1e-4)
        expected = np.histogram(d["age"][d["sex"] == sex], bins=[0, 40, 60, 100])[0]
        assert hist.cell(sex).values == pytest.approx(expected.tolist(), abs=1e-4)
    assert var.value == pytest.approx(bmi.var(), rel=1e-6)
    assert std.value == pytest.approx(d["age"].std(), rel=1e-6)
    edges = np.linspace(10, 60, 65)
    counts = np.histogram(bmi, bins=edges)[0].astype(float)
    expected_q = quantiles_from_histogram(counts, edges, (0.25, 0.5, 0.9))
    assert quant.cells[0].values == pytest.approx(expected_q.tolist(), abs=1e-4)
    # The histogram method is within one bin (50/64) of the sample quantiles.
    assert (
        np.abs(np.asarray(quant.cells[0].values) - np.quantile(bmi, [0.25, 0.5, 0.9])).max() < 0.8
    )
    assert [s.silo for s in mean.spent] == ["clinic-0", "clinic-1", "clinic-2"]
    assert all(s.epsilon == pytest.approx(0.1, rel=0.01) for s in mean.spent)
    assert mean.noise_multiplier > 10  # epsilon 0.1 needs a lot of noise


def test_fed_query_prints_the_answer_as_json(federation: Federation) -> None:
    out = subprocess.run(
        [
            str(BIN / "fed-query"),
            "--server",
            f"127.0.0.1:{federation.port}",
            "--token-file",
            str(federation.token),
            "mean(age)",
            "--epsilon",
            "0.1",
            "--json",
        ],
        check=True,
        capture_output=True,
        text=True,
        timeout=120,
    )
    answer = json.loads(out.stdout)
    assert answer["cells"][0]["value"] == pytest.approx(federation.data["age"].mean(), rel=1e-6)
    assert len(answer["spent"]) == SILOS


def test_silos_refuse_forbidden_columns_and_large_epsilon_and_answer_small_cells(
    federation: Federation,
) -> None:
    with federation.client() as fed:
        # Positive control: the same harness answers an allowed query.
        assert fed.query("count() where age > 30", epsilon=0.1).value > 0
        with pytest.raises(QueryRefusedError, match=r"analytics.allowed-columns.*income"):
            fed.query("mean(income)", epsilon=0.1)
        with pytest.raises(QueryRefusedError, match=r"analytics.allowed-columns"):
            fed.query("count() where income > 5000", epsilon=0.1)
        # A near-empty cell is no refusal (that was a free, exact release: issue 22): it is
        # answered with noise, and paid for.
        small = fed.query("count() where age > 85 group by sex", epsilon=0.1)
        assert len(small.cells) == 2
        with pytest.raises(QueryRefusedError, match=r"analytics.max-epsilon"):
            fed.query("mean(bmi)", epsilon=6.0)
        with pytest.raises(QueryRefusedError, match=r"\[budget\].*too little of its privacy"):
            fed.query("mean(bmi)", epsilon=4.5)
    ledger = json.loads((federation.root / "ledger0.json").read_text())
    whats = [c["what"] for c in ledger["studies"]["diabetes-2026"]["charges"]]
    assert any("mean(bmi) where age > 60 group by sex" in w for w in whats)
    assert any("age > 85" in w for w in whats)
    assert not any("income" in w for w in whats)


def test_raw_rows_cannot_be_requested_and_only_scientists_may_ask(
    federation: Federation,
) -> None:
    with federation.client() as fed:
        assert len(fed.datasets()) == SILOS  # positive control: the scientist's token works
        for text in (
            "rows()",
            "select * from silo",
            "bmi",
            "mean(bmi); rows()",
            "__import__('os')",
        ):
            with pytest.raises(QueryError):
                fed.query(text, epsilon=0.1)
    channel = grpc.insecure_channel(f"127.0.0.1:{federation.port}")
    try:
        rows = channel.unary_unary("/fedcore.v1.Analytics/Rows", None, None)
        with pytest.raises(grpc.RpcError) as err:
            rows(b"", timeout=10)
        assert err.value.code() is grpc.StatusCode.UNIMPLEMENTED
    finally:
        channel.close()
    stranger = fedcore.connect(f"127.0.0.1:{federation.port}", token_file=federation.worker_token)
    with stranger, pytest.raises(ConfigError, match="data scientist token"):
        stranger.datasets()
