"""Upgrading privacy ledgers written in an older format, conservatively.

Format 1 (before issue 22's follow-up) charged some releases for a neighbouring relation the
silo does not offer. A silo's size is public, so its unit is one record *replaced*; format 2
states that and re-charges what format 1 under-charged, on the safe side:

* the label histogram, charged at multiplier ``sigma`` (add/remove, sensitivity 1), costs
  ``sigma / sqrt 2`` (replace-one, sensitivity ``sqrt 2``); a format-1 charge already at
  ``sigma / sqrt 2`` (written by a worker with the fix) is kept;
* an analytics query, calibrated for add/remove sensitivities before the fix, moved by up to
  twice its sensitivity under replace-one (sums with ``lo = -hi``): its multiplier is halved.
  Queries written after the fix are over-charged by this, never under-charged;
* a DP-SGD round is analysed for one record replaced (``relation = "replace-one"``): the
  history it records is what was released, so only the analysis changes.

Client-level training rounds and evaluations were charged for their own unit already.
"""

from __future__ import annotations

import copy
import math
from typing import Any

__all__ = ["CURRENT_FORMAT", "LEGACY_FORMATS", "upgrade"]

CURRENT_FORMAT = "fedcore-privacy-ledger/2"
_V1 = "fedcore-privacy-ledger/1"
LEGACY_FORMATS = (_V1,)

_HISTOGRAM = "label histogram"
_HISTOGRAM_RELEASE = "label-histogram"
_NOTE = " [re-charged for replace-one: ledger format 1]"


def _upgraded_charge(charge: dict[str, Any], histogram_std: float | None) -> dict[str, Any]:
    what = str(charge.get("what", ""))
    z = float(charge["noise_multiplier"])
    if what == _HISTOGRAM:
        fixed = histogram_std is not None and math.isclose(
            z, histogram_std / math.sqrt(2), rel_tol=1e-9
        )
        if not fixed:
            return {**charge, "noise_multiplier": z / math.sqrt(2), "what": what + _NOTE}
    elif what.startswith("query "):
        return {**charge, "noise_multiplier": z / 2, "what": what + _NOTE}
    elif what.endswith(": DP-SGD"):
        return {**charge, "relation": "replace-one"}
    return dict(charge)


def upgrade(document: dict[str, Any]) -> dict[str, Any]:
    """``document`` in :data:`CURRENT_FORMAT` (a new dict; a current one is returned as is)."""
    if document.get("format") == CURRENT_FORMAT:
        return document
    if document.get("format") != _V1:
        raise ValueError(f"not a fedcore privacy ledger format: {document.get('format')!r}")
    out = copy.deepcopy(document)
    for study in out.get("studies", {}).values():
        release = study.get("releases", {}).get(_HISTOGRAM_RELEASE)
        std = float(release["noise_std"]) if isinstance(release, dict) else None
        study["charges"] = [_upgraded_charge(c, std) for c in study.get("charges", [])]
    out["format"] = CURRENT_FORMAT
    out["upgraded_from"] = _V1
    return out
