"""The silo's own privacy ledger: every DP release it made, on its disk, and their epsilon.

The ledger is a small JSON file the worker owns. It lists, per study, each release the silo
made under differential privacy as a :class:`Charge` (a Gaussian mechanism with noise
multiplier ``z``, Poisson sampling rate ``q`` and ``steps`` compositions), so restarts of the
worker and new federations of the same study keep counting. Epsilon comes from Google's
``dp-accounting`` library (Rényi DP accountant; Mironov 2017), never from a hand-written
formula.

Format 2 states each charge's neighbouring relation (``"replace-one"`` for DP-SGD, whose unit is
one record replaced); a format-1 ledger is upgraded conservatively when read
(:mod:`.ledger_upgrade`) and written back in format 2 with the next charge.

Writes are atomic (temp file, fsync, rename, fsync of the folder) and every read-check-write
holds an exclusive lock on ``LEDGER.lock``, so two workers of one silo sharing a ledger cannot
both spend the last of a budget, and a crash leaves either the old or the new ledger, never a
torn one. A charge is written *before* the release it pays for leaves the worker: a crash in
between over-counts, which is the safe side.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import math
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fedcore.atomic import write_atomically
from fedcore.errors import LedgerError
from fedcore.privacy.accountant import Relation, gaussian_event, rdp_epsilon_mixed

from .ledger_upgrade import CURRENT_FORMAT, LEGACY_FORMATS, upgrade

if TYPE_CHECKING:
    import dp_accounting

__all__ = ["Charge", "PrivacyLedger", "epsilon_of"]

_FORMAT = CURRENT_FORMAT
_LOCK_TIMEOUT_S = 30.0

log = logging.getLogger("fedcore.policy")


@dataclass(frozen=True)
class Charge:
    """One DP release: ``steps`` compositions of a Gaussian mechanism of noise multiplier
    ``noise_multiplier``, each on a Poisson sample of rate ``sample_rate`` of the records.
    ``relation``: the neighbours the multiplier is stated for. ``"add-remove"`` when it is
    already in units of the release's own sensitivity (every charge but DP-SGD's);
    ``"replace-one"`` for DP-SGD, whose clip norm bounds one record, not the difference
    of two (see :mod:`fedcore.privacy.accountant`)."""

    noise_multiplier: float
    sample_rate: float = 1.0
    steps: int = 1
    what: str = ""
    relation: Relation = "add-remove"

    def __post_init__(self) -> None:
        if not (self.noise_multiplier > 0 and math.isfinite(self.noise_multiplier)):
            raise LedgerError(
                f"a charge needs a positive noise multiplier, got {self.noise_multiplier}"
            )
        if not 0 < self.sample_rate <= 1:
            raise LedgerError(f"a charge's sampling rate must be in (0, 1], got {self.sample_rate}")
        if self.steps < 1:
            raise LedgerError(f"a charge needs at least 1 step, got {self.steps}")
        if self.relation not in ("add-remove", "replace-one"):
            raise LedgerError(
                f"a charge's relation must be add-remove or replace-one, got {self.relation!r}"
            )

    def event(self) -> dp_accounting.DpEvent:
        return gaussian_event(
            noise_multiplier=self.noise_multiplier, sample_rate=self.sample_rate, steps=self.steps
        )


def epsilon_of(charges: Sequence[Charge], *, delta: float) -> float:
    """Epsilon at ``delta`` of all ``charges`` composed (0 for none)."""
    if not 0 < delta < 1:
        raise LedgerError(f"delta must be in (0, 1), got {delta}")
    if not charges:
        return 0.0
    if any(c.relation == "replace-one" for c in charges):
        return rdp_epsilon_mixed(
            add_remove=[_entry(c) for c in charges if c.relation == "add-remove"],
            replace_one=[_entry(c) for c in charges if c.relation == "replace-one"],
            delta=delta,
        )
    from dp_accounting.rdp import rdp_privacy_accountant  # scipy: imported on first use

    accountant = rdp_privacy_accountant.RdpAccountant()
    for charge in charges:
        accountant.compose(charge.event())
    return float(accountant.get_epsilon(delta))


def _entry(charge: Charge) -> tuple[float, float, int]:
    return (charge.noise_multiplier, charge.sample_rate, charge.steps)


class PrivacyLedger:
    """The ledger of one study in the file at ``path`` (created on first write)."""

    def __init__(self, path: Path, *, study: str) -> None:
        self.path = path
        self.study = study

    # ------------------------------------------------------------------ reading

    def _read(self) -> dict[str, Any]:
        try:
            text = self.path.read_text(encoding="utf-8")
        except FileNotFoundError:
            return {"format": _FORMAT, "studies": {}}
        except OSError as exc:
            raise LedgerError(
                f"cannot read the privacy ledger {self.path}: {exc.strerror}"
            ) from None
        try:
            document = json.loads(text)
        except json.JSONDecodeError as exc:
            raise LedgerError(
                f"the privacy ledger {self.path} is corrupt ({exc}); restore it from a backup. "
                "Never delete it: the silo's spent privacy would be forgotten"
            ) from None
        if not isinstance(document, dict):
            raise LedgerError(f"{self.path} is not a fedcore privacy ledger ({_FORMAT})")
        if document.get("format") in LEGACY_FORMATS:
            log.warning(
                "privacy ledger %s is in format %s: upgraded conservatively to %s (releases "
                "under-charged then are re-charged; written back with the next charge)",
                self.path,
                document.get("format"),
                _FORMAT,
            )
            return upgrade(document)
        if document.get("format") != _FORMAT:
            raise LedgerError(f"{self.path} is not a fedcore privacy ledger ({_FORMAT})")
        return document

    def _study(self, document: dict[str, Any]) -> dict[str, Any]:
        study: dict[str, Any] = document["studies"].setdefault(
            self.study, {"charges": [], "releases": {}}
        )
        return study

    def studies(self) -> list[str]:
        """The studies the ledger file holds charges for (this one or others)."""
        return sorted(self._read()["studies"])

    def charges(self) -> list[Charge]:
        """Every charge of this study so far."""
        return self._charges(self._study(self._read()))

    def _charges(self, study: dict[str, Any]) -> list[Charge]:
        try:
            return [Charge(**entry) for entry in study["charges"]]
        except (TypeError, KeyError) as exc:
            raise LedgerError(
                f"the privacy ledger {self.path} holds a malformed charge: {exc}"
            ) from None

    def epsilon(self, *, delta: float) -> float:
        """The study's epsilon so far at ``delta``."""
        return epsilon_of(self.charges(), delta=delta)

    def epsilon_after(self, extra: Sequence[Charge], *, delta: float) -> float:
        """The study's epsilon at ``delta`` if ``extra`` were charged too (nothing is written)."""
        return epsilon_of([*self.charges(), *extra], delta=delta)

    # ------------------------------------------------------------------ writing

    def spend(self, extra: Sequence[Charge], *, delta: float, budget: float) -> float | None:
        """Charge ``extra`` if the study's epsilon stays within ``budget``; return the new
        epsilon, or None (and write nothing) when it would not."""
        with self._locked():
            document = self._read()
            study = self._study(document)
            after = epsilon_of([*self._charges(study), *extra], delta=delta)
            if after > budget:
                return None
            stamp = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
            study["charges"].extend({**asdict(c), "what": c.what or stamp} for c in extra)
            self._write(document)
            return after

    def release(
        self,
        key: str,
        make: Callable[[], tuple[dict[str, Any], Sequence[Charge]]],
        *,
        delta: float,
        budget: float,
    ) -> dict[str, Any] | None:
        """A one-time release: the value stored under ``key`` if it was made before (reusing it
        costs nothing), else ``make()``'s value, charged and stored; None when its charges
        would exceed ``budget``."""
        with self._locked():
            document = self._read()
            study = self._study(document)
            stored = study["releases"].get(key)
            if stored is not None:
                return dict(stored)
            value, charges = make()
            if epsilon_of([*self._charges(study), *charges], delta=delta) > budget:
                return None
            study["charges"].extend(asdict(c) for c in charges)
            study["releases"][key] = value
            self._write(document)
            return value

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        lock_path = self.path.with_name(self.path.name + ".lock")
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            handle = lock_path.open("a")
        except OSError as exc:
            raise LedgerError(
                f"cannot open the privacy ledger's lock {lock_path}: {exc.strerror}; "
                "make its folder writable by the worker"
            ) from None
        with handle:
            deadline = time.monotonic() + _LOCK_TIMEOUT_S
            while True:
                try:
                    fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    if time.monotonic() > deadline:
                        raise LedgerError(
                            f"the privacy ledger {self.path} stayed locked for "
                            f"{_LOCK_TIMEOUT_S:g} s; is another worker stuck on it?"
                        ) from None
                    time.sleep(0.05)
            try:
                yield
            finally:
                fcntl.flock(handle, fcntl.LOCK_UN)

    def _write(self, document: dict[str, Any]) -> None:
        text = json.dumps(document, indent=1, sort_keys=True) + "\n"
        try:
            write_atomically(self.path, text.encode("utf-8"), mode=0o600)
        except OSError as exc:
            raise LedgerError(
                f"cannot write the privacy ledger {self.path}: {exc.strerror}; nothing was "
                "released. Free disk space or fix the folder's permissions"
            ) from None
