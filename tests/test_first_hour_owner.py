"""Issue 27, traps 4 and 5: a user's own model package, the data owner's commands.

``fed-plan export`` and ``fed-server --ship-plan`` find a package in the current folder (as
``python -m`` does); ``fed-worker requests`` takes ``--policy`` before or after its command
and starts without importing torch.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from fedcore.errors import ModelError
from fedcore.models import build_model, import_from_cwd
from fedcore.plan import ModelSpec
from fedcore.plans.cli import main as plan_main
from fedcore.policy import Charge, PrivacyLedger, epsilon_of
from fedcore.worker.entry import main as requests_owner
from fedcore.worker.requests_cli import requests_main

_PACKAGE = "owner_pkg_27"


def _package(root: Path) -> None:
    (root / _PACKAGE).mkdir()
    (root / _PACKAGE / "__init__.py").write_text("")
    (root / _PACKAGE / "models.py").write_text(
        "from torch import nn\n\n\ndef make() -> nn.Module:\n"
        "    return nn.Sequential(nn.Flatten(), nn.Linear(784, 10))\n"
    )


@pytest.fixture
def in_package_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A fresh folder holding a model package, as cwd, with sys.path restored afterwards."""
    _package(tmp_path)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p not in ("", str(tmp_path))])
    monkeypatch.delitem(sys.modules, _PACKAGE, raising=False)
    monkeypatch.delitem(sys.modules, f"{_PACKAGE}.models", raising=False)
    return tmp_path


def test_fed_plan_export_finds_a_package_in_the_current_folder(in_package_folder: Path) -> None:
    spec = ModelSpec(f"{_PACKAGE}.models:make")
    # Positive control: without the current folder on the path the package is not found,
    # and the error says which commands look there.
    with pytest.raises(ModelError, match="current folder is importable only for fed-plan"):
        build_model(spec)
    assert plan_main(["export", spec.name, "--out", "model.plan"]) == 0
    assert (in_package_folder / "model.plan").stat().st_size > 0


def test_ship_plan_finds_a_package_in_the_current_folder(in_package_folder: Path) -> None:
    from fedcore.server.cli import build_parser
    from fedcore.server.plans import plan_from_args

    args = build_parser().parse_args(["--model", f"{_PACKAGE}.models:make", "--ship-plan"])
    shipped = plan_from_args(args, ModelSpec(args.model), seed=0, max_bytes=1 << 24)
    assert shipped is not None
    assert shipped[0].name.startswith("plan-")


def test_import_from_cwd_adds_the_folder_once(in_package_folder: Path) -> None:
    import_from_cwd()
    import_from_cwd()
    assert sys.path.count(str(in_package_folder)) == 1


def _policy(root: Path) -> Path:
    policy = root / "policy.toml"
    policy.write_text('[plans]\nrequire-approval = true\nrequests = "queue"\n')
    return policy


@pytest.mark.parametrize("where", ["before", "after"])
def test_requests_take_policy_before_or_after_the_command(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], where: str
) -> None:
    policy = _policy(tmp_path)
    flag = ["--policy", str(policy)]
    argv = [*flag, "list"] if where == "before" else ["list", *flag]
    assert requests_main(argv) == 0
    assert "no plan requests in" in capsys.readouterr().out


def test_requests_find_the_policy_in_the_current_folder(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    assert requests_main(["list"]) != 0  # positive control: no policy here yet
    assert "run from the folder of the worker's policy.toml" in capsys.readouterr().err
    _policy(tmp_path)
    assert requests_main(["list"]) == 0
    assert "no plan requests in" in capsys.readouterr().out


def test_requests_refuse_policy_and_queue_together(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    policy = _policy(tmp_path)
    argv = ["--policy", str(policy), "list", "--queue", str(tmp_path / "queue")]
    assert requests_main(argv) != 0
    assert "not both" in capsys.readouterr().err


def test_requests_start_without_importing_torch(tmp_path: Path) -> None:
    policy = _policy(tmp_path)
    code = (
        "import sys\n"
        "from fedcore.worker.entry import main\n"
        f"assert main(['requests', 'list', '--policy', {str(policy)!r}]) == 0\n"
        "loaded = sorted(m for m in sys.modules if m == 'torch' or m.startswith('torch.'))\n"
        "assert not loaded, loaded[:5]\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=False
    )
    assert done.returncode == 0, done.stderr
    assert "no plan requests in" in done.stdout


def test_the_owners_ledger_lists_epsilon_per_charge_and_the_budget_left(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Issue 27, trap 4: the ledger stores noise multipliers; its owner reads epsilon."""
    policy = tmp_path / "policy.toml"
    policy.write_text('[budget]\nstudy = "s1"\nepsilon = 8\ndelta = 1e-5\nledger = "ledger.json"\n')
    ledger = PrivacyLedger(tmp_path / "ledger.json", study="s1")
    charges = [Charge(2.0, what="query count()"), Charge(1.1, 0.01, steps=3, what="round 1")]
    assert ledger.spend(charges, delta=1e-5, budget=8.0) is not None
    assert requests_owner(["ledger", "--policy", str(policy)]) == 0
    out = capsys.readouterr().out
    alone = epsilon_of(charges[:1], delta=1e-5)
    total = epsilon_of(charges, delta=1e-5)
    assert f"{'query count()':<40} {alone:9.4g} {alone:9.4g}" in out
    assert "round 1" in out
    assert f"spent ε={total:.4g} of the budget ε=8; left ε={8 - total:.4g}" in out
    assert "noise" not in out  # epsilon, not the mechanism's parameters
