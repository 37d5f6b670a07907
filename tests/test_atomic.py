"""The one atomic-write helper (issue 27): a failure before the rename leaves the old file and
no temporary file; every durable writer in fedcore goes through it."""

from __future__ import annotations

import os
import re
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest

from fedcore.atomic import write_atomically
from fedcore.errors import LedgerError
from fedcore.policy import Charge, PrivacyLedger

ROOT = Path(__file__).resolve().parent.parent


def _crash_before_rename(monkeypatch: pytest.MonkeyPatch) -> None:
    def crash(src: object, dst: object) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "replace", crash)  # the os module fedcore.atomic calls


def test_a_write_replaces_the_file_with_its_mode_and_syncs_file_and_folder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    synced: list[int] = []
    real_fsync = os.fsync

    def fsync(fd: int) -> None:
        synced.append(fd)
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    target = tmp_path / "sub" / "state.json"
    write_atomically(target, b"one")
    write_atomically(target, [b"tw", memoryview(b"o")], mode=0o600)
    assert target.read_bytes() == b"two"
    assert stat.S_IMODE(target.stat().st_mode) == 0o600
    assert len(synced) == 4  # the file and the folder, each write
    assert sorted(p.name for p in target.parent.iterdir()) == ["state.json"]


def test_a_crash_before_the_rename_keeps_the_old_file_and_leaves_no_temporary(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    target = tmp_path / "state.json"
    write_atomically(target, b"old")
    _crash_before_rename(monkeypatch)
    with pytest.raises(OSError, match="No space left"):
        write_atomically(target, b"new")
    assert target.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["state.json"]


def test_a_failing_writer_of_pieces_leaves_no_temporary(tmp_path: Path) -> None:
    def pieces() -> Iterator[bytes]:
        yield b"half"
        raise RuntimeError("the source failed")

    target = tmp_path / "weights.bin"
    with pytest.raises(RuntimeError):
        write_atomically(target, pieces())
    assert list(tmp_path.iterdir()) == []


def test_the_ledger_forgets_no_charge_and_leaves_no_temporary_on_a_failed_write(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    ledger = PrivacyLedger(tmp_path / "ledger.json", study="s")
    assert ledger.spend([Charge(2.0, what="first")], delta=1e-5, budget=10) is not None
    _crash_before_rename(monkeypatch)
    with pytest.raises(LedgerError, match="nothing was released"):
        ledger.spend([Charge(2.0, what="second")], delta=1e-5, budget=10)
    assert [c.what for c in ledger.charges()] == ["first"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ledger.json", "ledger.json.lock"]


def test_no_other_module_renames_files_itself() -> None:
    """Every durable write goes through fedcore.atomic (the ledger, DP-SGD state, the plan
    queue, the frozen cache, enrolment, checkpoints): no second copy to fall behind."""
    pattern = re.compile(r"os\.replace\(|os\.rename\(|\.rename\(|mkstemp\(")
    offenders = [
        str(path.relative_to(ROOT))
        for folder in ("fedcore", "server", "worker")
        for path in (ROOT / folder).rglob("*.py")
        if path.name != "atomic.py" and pattern.search(path.read_text())
    ]
    assert offenders == []
