"""Format-1 privacy ledgers (before issue 22's follow-up) are upgraded conservatively on load:
what they under-charged for one record replaced is re-charged, DP-SGD rounds are analysed for
replace-one, and the ledger is written back in format 2 with the next charge."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest

from fedcore.errors import LedgerError
from fedcore.policy.ledger import Charge, PrivacyLedger, epsilon_of
from fedcore.privacy.accountant import epsilon_of_history

DELTA = 1e-5

#: A format-1 ledger as a worker before the fix wrote it: a label histogram charged at its
#: noise std (add/remove), a query, a DP-SGD round and a client-level training round.
V1: dict[str, Any] = {
    "format": "fedcore-privacy-ledger/1",
    "studies": {
        "s": {
            "charges": [
                {
                    "noise_multiplier": 20.0,
                    "sample_rate": 1.0,
                    "steps": 1,
                    "what": "label histogram",
                },
                {
                    "noise_multiplier": 8.0,
                    "sample_rate": 1.0,
                    "steps": 1,
                    "what": "query q1: sum(x)",
                },
                {
                    "noise_multiplier": 1.1,
                    "sample_rate": 0.25,
                    "steps": 8,
                    "what": "round 1: DP-SGD",
                },
                {
                    "noise_multiplier": 5.0,
                    "sample_rate": 1.0,
                    "steps": 1,
                    "what": "round 2: client-level DP",
                },
            ],
            "releases": {"label-histogram": {"counts": [1.0, 2.0], "noise_std": 20.0}},
        }
    },
}


_V1_CHARGES: list[dict[str, Any]] = V1["studies"]["s"]["charges"]


def _write(path: Path, document: dict[str, object]) -> None:
    path.write_text(json.dumps(document))


def test_an_old_ledger_is_recharged_conservatively(tmp_path: Path) -> None:
    path = tmp_path / "ledger.json"
    _write(path, V1)
    ledger = PrivacyLedger(path, study="s")
    histogram, query, dpsgd, training = ledger.charges()
    assert histogram.noise_multiplier == pytest.approx(20.0 / math.sqrt(2))
    assert query.noise_multiplier == pytest.approx(4.0)
    assert dpsgd.relation == "replace-one"
    assert dpsgd.noise_multiplier == 1.1
    assert training == Charge(5.0, what="round 2: client-level DP")
    # Positive control: what format 1 reported for the same releases is lower, and the
    # upgraded epsilon bounds each release's replace-one cost.
    old = epsilon_of([Charge(**c) for c in _V1_CHARGES], delta=DELTA)
    upgraded = ledger.epsilon(delta=DELTA)
    assert upgraded > 1.2 * old
    sgd_alone = epsilon_of_history([(1.1, 0.25, 8)], delta=DELTA, relation="replace-one")
    assert upgraded >= sgd_alone
    # Nothing is written until the next charge; then format 2, upgraded once.
    assert json.loads(path.read_text())["format"] == "fedcore-privacy-ledger/1"
    assert ledger.spend([Charge(50.0, what="round 3")], delta=DELTA, budget=1e9) is not None
    stored = json.loads(path.read_text())
    assert stored["format"] == "fedcore-privacy-ledger/2"
    assert stored["upgraded_from"] == "fedcore-privacy-ledger/1"
    again = PrivacyLedger(path, study="s").charges()
    assert again[:4] == [histogram, query, dpsgd, training]  # not halved a second time


def test_a_histogram_already_charged_for_replace_one_is_kept(tmp_path: Path) -> None:
    document = json.loads(json.dumps(V1))
    document["studies"]["s"]["charges"][0]["noise_multiplier"] = 20.0 / math.sqrt(2)
    path = tmp_path / "ledger.json"
    _write(path, document)
    histogram = PrivacyLedger(path, study="s").charges()[0]
    assert histogram.noise_multiplier == pytest.approx(20.0 / math.sqrt(2))


def test_new_dpsgd_charges_are_replace_one_and_unknown_formats_refused(tmp_path: Path) -> None:
    ledger = PrivacyLedger(tmp_path / "ledger.json", study="s")
    charge = Charge(1.1, sample_rate=0.25, steps=8, what="round 1: DP-SGD", relation="replace-one")
    spent = ledger.spend([charge], delta=DELTA, budget=1e9)
    assert spent == pytest.approx(
        epsilon_of_history([(1.1, 0.25, 8)], delta=DELTA, mechanism="rdp", relation="replace-one")
    )
    assert ledger.charges() == [charge]
    _write(tmp_path / "future.json", {"format": "fedcore-privacy-ledger/9", "studies": {}})
    with pytest.raises(LedgerError, match="not a fedcore privacy ledger"):
        PrivacyLedger(tmp_path / "future.json", study="s").charges()
