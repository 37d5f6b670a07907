"""A data owner's secure-aggregation rules in the policy file: the signing key and the peers
it accepts (a roster file or fingerprints pinned inline), and the most silos a secure round
may have (sybils), each with a control that passes."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from fedcore.errors import ConfigError, PolicyError, SecAggRefusedError
from fedcore.policy import load_policy
from fedcore.secagg import SecAggClient, SecAggParams
from fedcore.secagg.client import ClientRules
from fedcore.secagg.identity import (
    Roster,
    SiloIdentity,
    fingerprint,
    generate_signing_key,
    raw_public,
)
from fedcore.secagg.setup import make_setup
from fedcore.secagg.simulation import make_identities

A = "a" * 64
B = "b" * 64


def _policy(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "policy.toml"
    path.write_text("[secure-aggregation]\n" + text)
    return path


def test_the_signing_key_and_pinned_peers_come_from_the_policy(tmp_path: Path) -> None:
    policy = load_policy(
        _policy(
            tmp_path,
            f'signing-key = "keys/me.pem"\nmax-silos = 8\n[secure-aggregation.peers]\n'
            f'me = "{A}"\nhospital-b = "{B}"\n',
        )
    )
    signing = policy.privacy.signing
    assert signing.signing_key == tmp_path / "keys" / "me.pem"  # relative to the policy
    assert signing.roster is None
    assert signing.peers == (("hospital-b", B), ("me", A))
    assert policy.privacy.max_silos == 8
    assert any("signed secure aggregation" in line for line in policy.describe())
    roster = load_policy(_policy(tmp_path, 'signing-key = "k.pem"\nroster = "/etc/r.json"\n'))
    assert roster.privacy.signing.roster == Path("/etc/r.json")


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (
            f'roster = "r.json"\n[secure-aggregation.peers]\nb = "{B}"\n',
            "'peers' and 'roster' both list the peers",
        ),
        ('signing-key = "k.pem"\n', "'signing-key' needs the peers it accepts"),
        ('[secure-aggregation.peers]\nb = "B0"\n', "'b' must be the hex SHA-256"),
        (f'[secure-aggregation.peers]\nb = "{B}"\nc = "{B}"\n', "one signing key for two"),
        ("min-group-size = 4\nmax-silos = 3\n", "is below min-group-size (3 < 4)"),
        ("max-silos = 1\n", "must be at least 2"),
    ],
)
def test_policy_errors_about_signing_name_the_problem(
    tmp_path: Path, text: str, message: str
) -> None:
    with pytest.raises(PolicyError, match=re.escape(message)):
        load_policy(_policy(tmp_path, text))


def test_pinned_peers_are_a_roster() -> None:
    key = generate_signing_key()
    where = "policy.toml [secure-aggregation.peers]"
    roster = Roster.from_fingerprints({"me": fingerprint(raw_public(key)), "b": B}, where)
    assert SiloIdentity("me", key, roster).roster.fingerprints["b"] == B
    # A policy that pins another key for this silo: the worker does not start.
    wrong = Roster.from_fingerprints({"me": A, "b": B}, where)
    with pytest.raises(ConfigError, match="does not match the roster"):
        SiloIdentity("me", key, wrong)


def test_max_silos_refuses_a_larger_signed_round_before_any_key() -> None:
    names = ["s1", "s2", "s3", "s4"]
    identities = make_identities(names)
    params = SecAggParams(signed=True)
    # Control: a round of three within max-silos = 3 is joined.
    three = make_setup(params, 3, 10, members=names[:3], job="j", round_number=1)
    rules = ClientRules(max_silos=3)
    assert SecAggClient(three, rules=rules, identity=identities["s1"]).advertise().signature
    four = make_setup(params, 4, 10, members=names, job="j", round_number=2)
    with pytest.raises(SecAggRefusedError, match=r"names 4 silos.*at most 3 \(max-silos\)"):
        SecAggClient(four, rules=rules, identity=identities["s1"]).advertise()
