"""Secure aggregation (Bonawitz et al., CCS 2017; SecAgg+ of Bell et al., CCS 2020).

The coordinator learns the sum of the workers' (quantized, weighted) updates and nothing else
about any single one, although every byte passes through it. Small modules, one job each:

========================  ===============================================================
``shamir``                t-of-n secret sharing over GF(2^521 - 1)
``crypto``                X25519 key pairs, HKDF key agreement, ChaCha20-Poly1305
``prg``                   AES-256-CTR mask expansion, applied in place block by block
``quantize``              fixed point in Z_(2^k), unbiased stochastic rounding, clipping
``params``                settings, threshold, the SecAgg+ k-regular graph
``identity``              Ed25519 silo signing keys and the roster the data owners agree on
``consistency``           what the signed mode signs: keys and unmasking requests, bound to
                          the round
``participation``         the on-disk record that refuses replayed contributions
``messages`` / ``wire``   the phase messages and their protobuf forms
``client`` / ``server``   the two sides' state machines (pure, testable in memory)
``setup``                 the round setup a coordinator derives from its settings
``driver``                the coordinator's one driver of a round (training and analytics)
``participant``           the worker's one client of a round on the wire (both, too)
``simulation``            the whole protocol in one process (tests, benchmark)
========================  ===============================================================
"""

from __future__ import annotations

from .client import ClientRules, ClientState, SecAggClient
from .messages import RoundSetup
from .params import SecAggParams
from .quantize import FixedPoint, ring_bits_for
from .server import AggregateResult, SecAggServer, ServerState

__all__ = [
    "AggregateResult",
    "ClientRules",
    "ClientState",
    "FixedPoint",
    "RoundSetup",
    "SecAggClient",
    "SecAggParams",
    "SecAggServer",
    "ServerState",
    "ring_bits_for",
]
