"""The coordinator's side of one secure-aggregation round, as an explicit state machine.

::

    KEYS ──close_keys──▶ SHARES ──close_shares──▶ INPUTS ──close_inputs──▶ UNMASKING ──finish──▶ DONE
      │                    │                        │  signed│                ▲   │
      │                    │                        │        ▼                │   │
      │                    │                        │   CONSISTENCY ──close_consistency
      └────────────────────┴────────────────────────┴────────┴────────────────────┴──▶ ABORTED

In the signed mode (the setup names its members) the coordinator only relays: keys go out
with their signatures, and between phases 3 and 4 it gathers each survivor's signature on
the unmasking request (U4 of Bonawitz et al.) and sends them all to U4, whose members check
them before revealing anything. The workers verify; the coordinator is not trusted to.

Participants are known by their index (1..n). The sets of Bonawitz et al.: U1 advertised
keys, U2 completed key sharing, U3 sent a masked input, U5 answered the unmasking request.
Every ``close_*`` checks that at least ``t`` remain; if not, the round aborts with
:class:`~fedcore.errors.SecAggAbortedError` and nothing is revealed (no unmasking request was
sent, so the coordinator holds only masked vectors). Masked inputs are summed as they arrive,
whole (:meth:`SecAggServer.add_masked`) or chunk by chunk (:meth:`SecAggServer.open_masked`,
:mod:`.ring`): the coordinator keeps one ring vector, however many workers report at once.
"""

from __future__ import annotations

import enum
import functools
import random
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import NoReturn

import numpy as np
import numpy.typing as npt

from fedcore.errors import SecAggAbortedError, SecAggError

from . import crypto, prg, shamir
from .client import pairwise_sign
from .messages import (
    AdvertiseKeys,
    ConsistencySignature,
    EncryptedShare,
    KeyDirectory,
    PeerKeys,
    RoundSetup,
    UnmaskRequest,
    UnmaskResponse,
)
from .params import harary_neighbours
from .quantize import COUNT_WORDS, FixedPoint, decode_count
from .ring import MaskedInputStream, RingSum

__all__ = ["AggregateResult", "SecAggServer", "ServerState"]


class ServerState(enum.Enum):
    KEYS = "keys"
    SHARES = "shares"
    INPUTS = "inputs"
    CONSISTENCY = "consistency"
    UNMASKING = "unmasking"
    DONE = "done"
    ABORTED = "aborted"


@dataclass(frozen=True)
class AggregateResult:
    """The unmasked sum: ``sum_u w_u * delta_u`` (weights ``n_u / weight_norm``), the summed
    example count, and who contributed."""

    ring_sum: npt.NDArray[np.unsignedinteger]
    num_examples: int
    contributors: frozenset[int]
    fixed_point: FixedPoint
    weight_norm: float = 1.0

    @property
    def words(self) -> npt.NDArray[np.unsignedinteger]:
        """The ring sum of the inputs' values (without the count words)."""
        return self.ring_sum[: self.ring_sum.size - COUNT_WORDS]

    @functools.cached_property
    def weighted_sum(self) -> npt.NDArray[np.float64]:
        """The sum decoded (on first use: a training round decodes it block by block)."""
        return self.fixed_point.decode(self.words)

    @property
    def mean(self) -> npt.NDArray[np.float64]:
        """The example-weighted mean of the contributors' deltas."""
        return self.weighted_sum * (self.weight_norm / self.num_examples)


class SecAggServer:
    """Runs the protocol for ``num_participants`` workers with indexes 1..n.

    Args:
        setup: the round's parameters (the same every worker got).
        num_participants: n; participants are indexes 1..n.
        vector_words: length of a masked vector (delta coordinates + count words).
        degree: neighbours per worker (n - 1 for the complete graph; SecAgg+ below).
        rng: draws the SecAgg+ graph.
    """

    def __init__(
        self,
        setup: RoundSetup,
        num_participants: int,
        vector_words: int,
        *,
        degree: int | None = None,
        rng: random.Random | None = None,
    ) -> None:
        self.setup = setup
        self.indexes = list(range(1, num_participants + 1))
        self.vector_words = vector_words
        self.degree = num_participants - 1 if degree is None else degree
        self._rng = rng or random.SystemRandom()
        self.state = ServerState.KEYS
        self.keys: dict[int, AdvertiseKeys] = {}
        self.graph: dict[int, frozenset[int]] = {}
        self._outgoing: dict[int, list[EncryptedShare]] = {}
        self.u2: frozenset[int] = frozenset()
        self.u3: set[int] = set()
        self._ring: RingSum | None = None  # phase 3's running sum
        self._streaming: set[int] = set()  # who opened a streamed input (one try each)
        self.request: UnmaskRequest | None = None
        self._consistency: dict[int, ConsistencySignature] = {}
        self.u4: frozenset[int] = frozenset()
        self._responses: dict[int, UnmaskResponse] = {}
        self.abort_reason = ""
        #: Participants whose unmasking shares were malformed or disagreed with the others'
        #: (ignored: the secrets came from the consistent majority), and why.
        self.suspects: dict[int, str] = {}

    @property
    def threshold(self) -> int:
        return self.setup.threshold

    def _expect(self, state: ServerState, action: str) -> None:
        if self.state is not state:
            raise SecAggError(f"cannot {action} in state {self.state.value}")

    def _check_count(self, have: int, phase: str) -> None:
        if have < self.threshold:
            self.abort(f"{phase}: {have} worker(s) remain, below the threshold t={self.threshold}")

    def abort(self, reason: str) -> NoReturn:
        """Abandon the round; raises :class:`SecAggAbortedError`."""
        self.state = ServerState.ABORTED
        if self._ring is not None:
            self._ring.abandon()
            self._ring = None
        self.abort_reason = reason
        raise SecAggAbortedError(
            f"secure aggregation aborted ({reason}); nothing was unmasked and the global "
            "model is unchanged"
        )

    # ------------------------------------------------------------------ phase 1

    def add_keys(self, index: int, keys: AdvertiseKeys) -> None:
        self._expect(ServerState.KEYS, "accept keys")
        if index not in self.indexes or index in self.keys:
            raise SecAggError(f"unexpected keys from participant {index}")
        if len(keys.cipher_public) != crypto.KEY_BYTES or len(keys.mask_public) != crypto.KEY_BYTES:
            raise SecAggError(f"participant {index} sent malformed public keys")
        self.keys[index] = keys

    def close_keys(self) -> dict[int, KeyDirectory]:
        """End phase 1: draw the graph over U1 and give each member its neighbours' keys."""
        self._expect(ServerState.KEYS, "close phase 1")
        seen: set[bytes] = set()
        for index in sorted(self.keys):
            k = self.keys[index]
            if k.cipher_public in seen or k.mask_public in seen or k.cipher_public == k.mask_public:
                del self.keys[index]  # a repeated key: drop the later copy
            seen.update((k.cipher_public, k.mask_public))
        u1 = sorted(self.keys)
        self._check_count(len(u1), "key advertisement")
        self.graph = harary_neighbours(u1, self.degree, self._rng)
        self.state = ServerState.SHARES
        return {
            u: KeyDirectory(
                u,
                {
                    v: PeerKeys(
                        v,
                        self.keys[v].cipher_public,
                        self.keys[v].mask_public,
                        self.keys[v].signing_public,
                        self.keys[v].signature,
                    )
                    for v in sorted(self.graph[u])
                },
            )
            for u in u1
        }

    # ------------------------------------------------------------------ phase 2

    def add_shares(self, index: int, shares: Sequence[EncryptedShare]) -> None:
        self._expect(ServerState.SHARES, "accept shares")
        if index not in self.graph or index in self._outgoing:
            raise SecAggError(f"unexpected shares from participant {index}")
        recipients = [s.recipient for s in shares]
        if any(s.sender != index for s in shares) or sorted(recipients) != sorted(
            self.graph[index]
        ):
            raise SecAggError(
                f"participant {index} must send exactly one share to each of its neighbours"
            )
        self._outgoing[index] = list(shares)

    def has_shares(self, index: int) -> bool:
        """Whether ``index`` sent its shares in phase 2."""
        return index in self._outgoing

    def close_shares(self) -> dict[int, list[EncryptedShare]]:
        """End phase 2: U2 = who sent all its shares; each member of U2 gets the shares U2
        sent it."""
        self._expect(ServerState.SHARES, "close phase 2")
        self.u2 = frozenset(self._outgoing)
        self._check_count(len(self.u2), "key sharing")
        inbox: dict[int, list[EncryptedShare]] = {u: [] for u in self.u2}
        for sender in sorted(self.u2):
            for share in self._outgoing[sender]:
                if share.recipient in inbox:
                    inbox[share.recipient].append(share)
        self._outgoing.clear()
        self._ring = RingSum(self.vector_words, self.setup.fixed_point.dtype)
        self.state = ServerState.INPUTS
        return inbox

    # ------------------------------------------------------------------ phase 3

    def add_masked(self, index: int, vector: npt.NDArray[np.unsignedinteger]) -> None:
        """Fold one whole masked input into the running sum."""
        self._expect(ServerState.INPUTS, "accept a masked input")
        dtype = self.setup.fixed_point.dtype
        self._check_sender(index)
        if vector.shape != (self.vector_words,) or vector.dtype != dtype:
            raise SecAggError(
                f"participant {index} sent a masked input of {vector.dtype}{list(vector.shape)}, "
                f"expected {dtype}[{self.vector_words}]"
            )
        assert self._ring is not None
        self._ring.add(vector)
        self.u3.add(index)

    def open_masked(self, index: int) -> MaskedInputStream:
        """A stream that adds participant ``index``'s masked input to the running sum chunk
        by chunk; its :meth:`~.ring.MaskedInputStream.commit` adds ``index`` to U3 if phase 3
        is still open, and a stream still under way when phase 3 closes is taken back out."""
        self._expect(ServerState.INPUTS, "accept a masked input")
        self._check_sender(index)
        self._streaming.add(index)
        assert self._ring is not None
        return self._ring.open(index, self._commit_input)

    def _check_sender(self, index: int) -> None:
        if index not in self.u2 or index in self.u3 or index in self._streaming:
            raise SecAggError(f"unexpected masked input from participant {index}")

    def _commit_input(self, index: int) -> bool:
        # Called under the ring's lock, so phase 3 cannot close half-way through.
        if self.state is not ServerState.INPUTS or index in self.u3:
            return False
        self.u3.add(index)
        return True

    def close_inputs(self) -> UnmaskRequest:
        """End phase 3 (inputs still streaming are taken back out): ask for self-mask shares
        of U3 and key shares of U2 \\ U3."""
        self._expect(ServerState.INPUTS, "close phase 3")
        assert self._ring is not None
        self._ring.close()
        self._check_count(len(self.u3), "masked input")
        self.request = UnmaskRequest(frozenset(self.u3), frozenset(self.u2 - self.u3))
        self.state = ServerState.CONSISTENCY if self.setup.signed else ServerState.UNMASKING
        return self.request

    def recipients_of_request(self) -> list[int]:
        """The workers that must answer the unmasking request (U3)."""
        return sorted(self.u3)

    # ------------------------------------------------------------------ phase 4a (signed)

    def add_consistency(self, index: int, signature: ConsistencySignature) -> None:
        """Keep survivor ``index``'s signature on the request (verified by the workers)."""
        self._expect(ServerState.CONSISTENCY, "accept a consistency signature")
        if index not in self.u3 or index in self._consistency or signature.index != index:
            raise SecAggError(f"unexpected consistency signature from participant {index}")
        self._consistency[index] = signature

    def has_consistency(self, index: int) -> bool:
        return index in self._consistency

    def close_consistency(self) -> list[ConsistencySignature]:
        """End phase 4a: U4 = the survivors that signed; every member of U4 gets them all."""
        self._expect(ServerState.CONSISTENCY, "close the consistency check")
        self.u4 = frozenset(self._consistency)
        self._check_count(len(self.u4), "consistency check")
        self.state = ServerState.UNMASKING
        return [self._consistency[i] for i in sorted(self.u4)]

    def recipients_of_shares_request(self) -> list[int]:
        """The workers whose unmasking shares the round waits for (U3, or U4 signed)."""
        return sorted(self.u4 if self.setup.signed else self.u3)

    # ------------------------------------------------------------------ phase 4

    def add_unmask(self, index: int, response: UnmaskResponse) -> None:
        self._expect(ServerState.UNMASKING, "accept unmasking shares")
        assert self.request is not None
        expected = self.u4 if self.setup.signed else self.u3
        if index not in expected or index in self._responses:
            raise SecAggError(f"unexpected unmasking shares from participant {index}")
        group = (self.graph[index] & self.u2) | {index}
        if not (
            set(response.self_mask_shares) <= self.request.survivors & group
            and set(response.key_shares) <= self.request.dropped & group
        ):
            raise SecAggError(f"participant {index} sent shares nobody asked it for")
        self._responses[index] = response

    def has_unmask(self, index: int) -> bool:
        """Whether ``index`` answered the unmasking request."""
        return index in self._responses

    def finish(self) -> AggregateResult:
        """Reconstruct the missing secrets, strip every mask, decode the sum."""
        self._expect(ServerState.UNMASKING, "finish")
        assert self.request is not None
        assert self._ring is not None
        self._check_count(len(self._responses), "unmasking")
        total = self._ring.vector
        plus: list[bytes] = []  # seeds whose PRG is added back (subtracted masks)
        minus: list[bytes] = []  # seeds whose PRG is subtracted
        for u in sorted(self.request.survivors):
            minus.append(self._reconstruct(u, "self_mask_shares"))
        for u in sorted(self.request.dropped):
            survivors = sorted(self.graph[u] & self.u3)
            if not survivors:
                continue
            private = self._reconstruct(u, "key_shares")
            if crypto.public_from_private(private) != self.keys[u].mask_public:
                self.abort(f"the key shares of participant {u} reconstruct the wrong key")
            for v in survivors:
                seed = crypto.agree(
                    private, self.keys[v].mask_public, purpose="mask", round_id=self.setup.round_id
                )
                # v added sign(v, u) * PRG(s_vu); take it back out.
                (minus if pairwise_sign(v, u) > 0 else plus).append(seed)
        prg.apply_masks(total, plus=plus, minus=minus)
        self._ring = None
        count = decode_count(total[self.vector_words - COUNT_WORDS :])
        self.state = ServerState.DONE
        return AggregateResult(
            total, count, frozenset(self.u3), self.setup.fixed_point, self.setup.weight_norm
        )

    def _reconstruct(self, owner: int, kind: str) -> bytes:
        what = "self mask" if kind == "self_mask_shares" else "masking key"
        holders = (self.graph[owner] & self.u2) | {owner}
        shares: list[shamir.Share] = []
        for h in sorted(holders):
            value = getattr(self._responses[h], kind).get(owner) if h in self._responses else None
            if value is None:
                continue
            try:
                shares.append(shamir.Share.from_bytes(h, value))
            except SecAggError as exc:
                # One malformed share must not abort the round: the others may suffice.
                self.suspects[h] = f"a malformed share of participant {owner}'s {what}: {exc}"
        if len(shares) < self.threshold:
            self.abort(
                f"only {len(shares)} valid share(s) of participant {owner}'s {what} arrived, "
                f"t={self.threshold}"
            )
        try:
            secret, disagreeing = shamir.combine_robust(shares, self.threshold)
        except SecAggError as exc:
            self.abort(f"participant {owner}'s {what}: {exc}")
        for h in disagreeing:
            self.suspects[h] = (
                f"a share of participant {owner}'s {what} that disagrees with the rest"
            )
        return secret


def group_sizes(graph: Mapping[int, Iterable[int]]) -> dict[int, int]:
    """Size of each worker's sharing group (for reports)."""
    return {u: len(list(v)) + 1 for u, v in graph.items()}
