"""The worker's side of one secure-aggregation round, as an explicit state machine.

::

    ADVERTISED ──share_keys──▶ SHARED ──receive_shares──▶ READY ──mask──▶ MASKED ──unmask──▶ DONE
         │                        │                          │               │                ▲
         │                        │                          │           consistency   unmask_checked
         │                        │                          │               ▼                │
         │                        │                          │            CHECKING ───────────┘
         └────────────────────────┴──────────────────────────┴───────────────┴──▶ ABORTED

The lower path is the signed mode (a :class:`~fedcore.secagg.identity.SiloIdentity` is
given): every key this worker publishes is signed and bound to the round, every peer's key is
checked against the roster before any mask is derived, and shares are revealed only after at
least t of the group signed the same unmasking request (Bonawitz et al.'s consistency check).
Without an identity the client runs the unsigned protocol, safe only against a coordinator
that follows it.

Every move not drawn raises; an abort forgets the round's secrets. The client answers exactly
one unmasking request, and never reveals both the self-mask share and the masking-key share
of the same peer: that is what keeps a worker whose masked input arrived late safe from a
coordinator that calls it dropped *and* a survivor.

Against an active coordinator the client also enforces its :class:`ClientRules`: a sharing
group of at least ``min_group_size`` members, a Shamir threshold above ``min_threshold`` of
the group (default: a strict majority, so no two disjoint sets of survivors can both
reconstruct), and, when unmasking, at least ``t`` survivors *among its own neighbours* (the
only ones whose shares it holds; counts outside its group are the coordinator's word).
"""

from __future__ import annotations

import enum
import os
import secrets
import threading
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from fedcore.errors import SecAggAbortedError, SecAggError, SecAggRefusedError

from . import crypto, prg, shamir
from .consistency import key_statement, request_statement
from .identity import SiloIdentity
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
from .quantize import COUNT_WORDS, encode_count

__all__ = ["ClientRules", "ClientState", "MaskedInput", "SecAggClient", "pairwise_sign"]

_PLAINTEXT_BYTES = 8 + 2 * shamir.SHARE_BYTES


@dataclass(frozen=True)
class ClientRules:
    """What a worker requires of a secure round, whatever the coordinator's setup says.

    Args:
        min_group_size: fewest members (this worker and its neighbours) of its sharing group.
        min_threshold: the threshold t must exceed this fraction of the group.
        min_survivors: fewest survivors an unmasking request may name (distributed DP: the
            minimum update count the worker's noise share was derived from).
        max_silos: most silos a round may name (signed mode) or a sharing group may hold
            (None: any); more are refused, whoever they are (sybil resistance).
    """

    min_group_size: int = 3
    min_threshold: float = 0.5
    min_survivors: int = 0
    max_silos: int | None = None

    def __post_init__(self) -> None:
        if self.min_group_size < 2:
            raise SecAggError(
                f"a sharing group needs at least 2 members, got {self.min_group_size}"
            )
        if not 0 < self.min_threshold < 1:
            raise SecAggError(f"the minimum threshold must be in (0, 1), got {self.min_threshold}")


class ClientState(enum.Enum):
    ADVERTISED = "advertised"
    SHARED = "shared"
    READY = "ready"
    MASKED = "masked"
    CHECKING = "checking"
    DONE = "done"
    ABORTED = "aborted"


def pairwise_sign(me: int, peer: int) -> int:
    """+1 if ``me`` adds ``PRG(s_me,peer)``, -1 if it subtracts it (the lower index adds)."""
    return 1 if me < peer else -1


def share_aad(round_id: str, sender: int, recipient: int) -> bytes:
    """What an encrypted share is bound to: its round, sender and recipient."""
    return f"{round_id}/{sender}->{recipient}".encode()


class MaskedInput:
    """A masked vector with the number of coordinates the worker had to clip."""

    def __init__(self, vector: npt.NDArray[np.unsignedinteger], clipped: int) -> None:
        self.vector = vector
        self.clipped = clipped


class SecAggClient:
    """One worker's secrets and progress in one round.

    Args:
        setup: the round's parameters (from the task).
        rules: what this worker requires of the round (group size, threshold, survivors).
        identity: this silo's signing key and roster: the signed mode (default: unsigned).
        rounding_seed: 256-bit key of the stochastic-rounding keystream (default: fresh from
            the OS); fixed only in tests.
    """

    def __init__(
        self,
        setup: RoundSetup,
        *,
        rules: ClientRules | None = None,
        identity: SiloIdentity | None = None,
        rounding_seed: bytes | None = None,
    ) -> None:
        self.setup = setup
        self.rules = rules if rules is not None else ClientRules()
        self.identity = identity
        self.state = ClientState.ADVERTISED
        self._cipher = crypto.KeyPair.generate()
        self._mask = crypto.KeyPair.generate()
        self._rounding_seed = rounding_seed or os.urandom(32)
        self._self_seed = b""
        self.index = 0
        self._peers: dict[int, PeerKeys] = {}
        # Shares held for each member of the group (peers that shared with us, and us).
        self._self_mask_shares: dict[int, shamir.Share] = {}
        self._key_shares: dict[int, shamir.Share] = {}
        self._mask_peers: frozenset[int] = frozenset()
        self._request: UnmaskRequest | None = None
        self._own_signature = b""  # on the request, kept to recognise it when relayed
        # The whole mask, expanded ahead of the update (prepare_mask): as secret as the seeds.
        self._prepared: npt.NDArray[np.unsignedinteger] | None = None
        # The neighbours whose pairwise masks it holds (all of the directory's, when expanded
        # before the relayed shares named those that completed phase 2).
        self._prepared_peers: frozenset[int] = frozenset()
        self._prepared_lock = threading.Lock()

    @property
    def signed(self) -> bool:
        """Whether this client runs the signed protocol."""
        return self.identity is not None

    # ------------------------------------------------------------------ transitions

    def _expect(self, state: ClientState, action: str) -> None:
        if self.state is not state:
            raise SecAggRefusedError(
                f"cannot {action} in state {self.state.value} of round {self.setup.round_id}"
            )

    def abort(self) -> None:
        """Forget every secret of this round."""
        self.state = ClientState.ABORTED
        self._self_seed = b""
        self._self_mask_shares.clear()
        self._key_shares.clear()
        with self._prepared_lock:
            self._prepared = None

    def _fail(self, error: SecAggError) -> SecAggError:
        self.abort()
        return error

    def advertise(self) -> AdvertiseKeys:
        """Phase 1: the two public keys; in the signed mode, signed and bound to the round
        (after checking the round's member list against the roster)."""
        if self.identity is None:
            return AdvertiseKeys(self._cipher.public, self._mask.public)
        self.index = self._signed_index(self.identity)
        statement = key_statement(
            self.setup,
            self.index,
            self.identity.name,
            self._cipher.public,
            self._mask.public,
            self.identity.public,
        )
        return AdvertiseKeys(
            self._cipher.public,
            self._mask.public,
            self.identity.public,
            self.identity.sign(statement),
        )

    def _signed_index(self, identity: SiloIdentity) -> int:
        """This worker's index among the round's members, once they pass the roster."""
        setup = self.setup
        if not setup.signed:
            raise self._fail(
                SecAggRefusedError(
                    "this worker requires signed secure aggregation (it has a roster), but the "
                    "round names no members; start the coordinator with --secagg-signed"
                )
            )
        members = setup.members
        if len(set(members)) != len(members):
            raise self._fail(SecAggRefusedError("the round names a silo twice"))
        strangers = [m for m in members if m not in identity.roster.fingerprints]
        if strangers:
            # Sybil resistance: only enrolled silos count towards a group.
            raise self._fail(
                SecAggRefusedError(
                    f"the round names silo(s) {sorted(strangers)[:5]} that are not in this "
                    "worker's roster"
                )
            )
        most = self.rules.max_silos
        if most is not None and len(members) > most:
            raise self._fail(
                SecAggRefusedError(
                    f"the round names {len(members)} silos; this worker's policy allows secure "
                    f"rounds of at most {most} (max-silos)"
                )
            )
        if identity.name not in members:
            raise self._fail(SecAggRefusedError("the round does not name this worker"))
        if not 2 <= setup.group_size <= len(members):
            raise self._fail(SecAggRefusedError(f"invalid group size m={setup.group_size}"))
        return members.index(identity.name) + 1

    def _check_peer(self, identity: SiloIdentity, peer: PeerKeys) -> None:
        """A neighbour's keys must be signed by the silo the round names at its index."""
        if not 1 <= peer.index <= len(self.setup.members):
            raise SecAggRefusedError(f"peer index {peer.index} is not a member of the round")
        silo = self.setup.members[peer.index - 1]
        statement = key_statement(
            self.setup,
            peer.index,
            silo,
            peer.cipher_public,
            peer.mask_public,
            peer.signing_public,
        )
        try:
            identity.verify(silo, peer.signing_public, statement, peer.signature)
        except SecAggError as exc:
            raise SecAggRefusedError(
                f"peer {peer.index}'s keys are not signed by an enrolled silo for this round "
                f"({exc}); the coordinator may have made them up"
            ) from None

    def share_keys(self, directory: KeyDirectory) -> list[EncryptedShare]:
        """Phase 2: draw the self-mask seed, Shamir-share it and the masking private key among
        the group, and seal each peer's shares for it."""
        self._expect(ClientState.ADVERTISED, "share keys")
        t = self.setup.threshold
        if directory.index in directory.peers or directory.index < 1:
            raise self._fail(SecAggError("the key directory lists this worker as its own peer"))
        group = len(directory.peers) + 1
        if group < t:
            raise self._fail(
                SecAggAbortedError(f"only {group} workers in the group, threshold is {t}")
            )
        if group < self.rules.min_group_size:
            raise self._fail(
                SecAggRefusedError(
                    f"the sharing group has {group} member(s); this worker requires at least "
                    f"{self.rules.min_group_size} (a smaller sum reveals too much of each input)"
                )
            )
        if self.rules.max_silos is not None and group > self.rules.max_silos:
            raise self._fail(
                SecAggRefusedError(
                    f"the sharing group has {group} members; this worker's policy allows at "
                    f"most {self.rules.max_silos} (max-silos)"
                )
            )
        if t <= self.rules.min_threshold * group:
            raise self._fail(
                SecAggRefusedError(
                    f"the threshold t={t} is not above {self.rules.min_threshold:g} of the "
                    f"group of {group}; a coordinator could unmask two disjoint subsets"
                )
            )
        for index, peer in directory.peers.items():
            if index != peer.index or index < 1:
                raise self._fail(SecAggError("the key directory is inconsistent"))
        if self.identity is not None:
            # Before any mask or share key is derived from a peer's key.
            if directory.index != self.index:
                raise self._fail(
                    SecAggRefusedError("the key directory gives this worker another index")
                )
            # Workers that never advertised keys leave a group smaller than m; the
            # threshold and minimum group size above still hold it.
            if group > self.setup.group_size:
                raise self._fail(
                    SecAggRefusedError(
                        f"the key directory has a group of {group}, the round says "
                        f"m={self.setup.group_size}"
                    )
                )
            for peer in directory.peers.values():
                try:
                    self._check_peer(self.identity, peer)
                except SecAggError as exc:
                    raise self._fail(exc) from None
        publics = [p.cipher_public for p in directory.peers.values()] + [
            p.mask_public for p in directory.peers.values()
        ]
        if len(set(publics)) != len(publics) or self._cipher.public in publics:
            # Bonawitz et al.: distinct keys, or a coordinator could make two workers one.
            raise self._fail(SecAggError("the key directory repeats a public key"))
        self.index = directory.index
        self._peers = dict(directory.peers)
        self._self_seed = secrets.token_bytes(32)
        holders = sorted([self.index, *self._peers])
        b_shares = shamir.split(self._self_seed, holders, t)
        k_shares = shamir.split(self._mask.private, holders, t)
        out: list[EncryptedShare] = []
        for b, k in zip(b_shares, k_shares, strict=True):
            if b.x == self.index:
                self._self_mask_shares[self.index] = b
                self._key_shares[self.index] = k
                continue
            key = crypto.agree(
                self._cipher.private,
                self._peers[b.x].cipher_public,
                purpose="share",
                round_id=self.setup.round_id,
            )
            plaintext = (
                self.index.to_bytes(4, "big")
                + b.x.to_bytes(4, "big")
                + b.value_bytes()
                + k.value_bytes()
            )
            aad = share_aad(self.setup.round_id, self.index, b.x)
            out.append(EncryptedShare(self.index, b.x, crypto.seal(key, plaintext, aad)))
        self.state = ClientState.SHARED
        return out

    def receive_shares(self, shares: Sequence[EncryptedShare]) -> None:
        """Phase 2 ends: keep the shares the neighbours that completed phase 2 sent us; they
        (and we) are the pairwise masks of phase 3."""
        self._expect(ClientState.SHARED, "receive shares")
        senders: set[int] = set()
        for share in shares:
            peer = self._peers.get(share.sender)
            if share.recipient != self.index or peer is None or share.sender in senders:
                raise self._fail(SecAggError(f"share from {share.sender} is misaddressed"))
            key = crypto.agree(
                self._cipher.private,
                peer.cipher_public,
                purpose="share",
                round_id=self.setup.round_id,
            )
            try:
                plaintext = crypto.open_sealed(
                    key, share.ciphertext, share_aad(self.setup.round_id, share.sender, self.index)
                )
            except SecAggError as exc:
                raise self._fail(exc) from None
            if len(plaintext) != _PLAINTEXT_BYTES or plaintext[:8] != (
                share.sender.to_bytes(4, "big") + self.index.to_bytes(4, "big")
            ):
                raise self._fail(SecAggError(f"share from {share.sender} is malformed"))
            half = 8 + shamir.SHARE_BYTES
            self._self_mask_shares[share.sender] = shamir.Share.from_bytes(
                self.index, plaintext[8:half]
            )
            self._key_shares[share.sender] = shamir.Share.from_bytes(self.index, plaintext[half:])
            senders.add(share.sender)
        if len(senders) + 1 < self.setup.threshold:
            raise self._fail(
                SecAggAbortedError(
                    f"only {len(senders) + 1} workers of the group completed key sharing, "
                    f"threshold is {self.setup.threshold}"
                )
            )
        self._mask_peers = frozenset(senders)
        self.state = ClientState.READY

    def pairwise_seeds(self) -> tuple[list[bytes], list[bytes]]:
        """The pairwise mask seeds this worker adds and subtracts."""
        return self._seeds(self._mask_peers)

    def _seeds(self, peers: frozenset[int]) -> tuple[list[bytes], list[bytes]]:
        """The pairwise mask seeds shared with ``peers``: those added, those subtracted."""
        plus: list[bytes] = []
        minus: list[bytes] = []
        for v in sorted(peers):
            seed = crypto.agree(
                self._mask.private,
                self._peers[v].mask_public,
                purpose="mask",
                round_id=self.setup.round_id,
            )
            (plus if pairwise_sign(self.index, v) > 0 else minus).append(seed)
        return plus, minus

    def quantize(
        self, delta: npt.NDArray[np.floating], num_examples: int
    ) -> tuple[npt.NDArray[np.unsignedinteger], int]:
        """The plain ring vector: the weighted, quantized delta and the example count."""
        vector = np.zeros(delta.size + COUNT_WORDS, dtype=self.setup.fixed_point.dtype)
        return vector, self.quantize_onto(vector, delta, num_examples)

    def quantize_onto(
        self,
        vector: npt.NDArray[np.unsignedinteger],
        delta: npt.NDArray[np.floating],
        num_examples: int,
    ) -> int:
        """Add the weighted, quantized delta and the example count to ``vector`` (ring words,
        ``delta.size + COUNT_WORDS`` of them) in place; return how many coordinates were
        clipped."""
        if num_examples < 1:
            raise SecAggError("a masked input needs at least one example")
        fp = self.setup.fixed_point
        count = min(num_examples, int(self.setup.weight_norm))
        weight = min(count / self.setup.weight_norm, 1.0)
        clipped = fp.quantize(
            delta, weight, self._rounding_seed, vector[: delta.size], accumulate=True
        )
        words = np.zeros(COUNT_WORDS, dtype=fp.dtype)
        encode_count(count, words)
        tail = vector[delta.size :]
        np.add(tail, words, out=tail)
        return clipped

    def prepare_mask(self, words: int) -> None:
        """Phase 3, ahead of the update: expand ``PRG(b_u) + sum +/-PRG(s_uv)`` over ``words``
        ring words (the input's length with its count words). The mask depends only on this
        round's seeds, never on the update: so it can be computed while the model downloads
        or trains (in a thread), and :meth:`mask` then only quantizes onto it. Once the key
        directory is in (SHARED) the pairwise masks are those of every neighbour it lists;
        :meth:`mask` takes out again those of neighbours that did not complete phase 2 (rare).
        Kept as secret as the seeds: :meth:`abort` forgets it."""
        if self.state not in (ClientState.SHARED, ClientState.READY):
            raise SecAggRefusedError(
                f"cannot prepare a mask in state {self.state.value} of round {self.setup.round_id}"
            )
        # receive_shares sets the peers before the state (on the event loop): read in order.
        peers = self._mask_peers if self.state is ClientState.READY else frozenset(self._peers)
        plus, minus = self._seeds(peers)
        mask = np.zeros(words, dtype=self.setup.fixed_point.dtype)
        prg.apply_masks(mask, plus=[self._self_seed, *plus], minus=minus)
        with self._prepared_lock:
            # An abort (on another thread) while it was computed leaves nothing behind.
            if self.state in (ClientState.SHARED, ClientState.READY):
                self._prepared, self._prepared_peers = mask, peers

    def mask(self, delta: npt.NDArray[np.floating], num_examples: int) -> MaskedInput:
        """Phase 3: quantize ``delta`` (flat) weighted by ``num_examples``, add
        ``PRG(b_u)`` and ``+/-PRG(s_uv)`` for every neighbour that completed phase 2 (onto
        the mask :meth:`prepare_mask` expanded, when it has this input's length)."""
        self._expect(ClientState.READY, "mask an input")
        with self._prepared_lock:
            prepared, self._prepared = self._prepared, None
        if prepared is None or prepared.size != delta.size + COUNT_WORDS:
            vector, clipped = self.quantize(delta, num_examples)
            self.mask_vector(vector)
            return MaskedInput(vector, clipped)
        # Ring addition commutes: removing a pair's mask gives the very vector expanded
        # without it.
        if self._prepared_peers != self._mask_peers:
            gone_plus, gone_minus = self._seeds(self._prepared_peers - self._mask_peers)
            new_plus, new_minus = self._seeds(self._mask_peers - self._prepared_peers)
            prg.apply_masks(prepared, plus=[*gone_minus, *new_plus], minus=[*gone_plus, *new_minus])
        clipped = self.quantize_onto(prepared, delta, num_examples)
        self.state = ClientState.MASKED
        return MaskedInput(prepared, clipped)

    def mask_vector(self, vector: npt.NDArray[np.unsignedinteger]) -> None:
        """Phase 3 on an already quantized ring vector (in place)."""
        self._expect(ClientState.READY, "mask an input")
        with self._prepared_lock:
            self._prepared = None
        plus, minus = self.pairwise_seeds()
        prg.apply_masks(vector, plus=[self._self_seed, *plus], minus=minus)
        self.state = ClientState.MASKED

    def unmask(self, request: UnmaskRequest) -> UnmaskResponse:
        """Phase 4 (unsigned mode): self-mask shares of survivors, key shares of dropped
        workers."""
        self._expect(ClientState.MASKED, "answer an unmasking request")
        if self.identity is not None:
            raise self._fail(
                SecAggRefusedError(
                    "the coordinator asked for shares without the consistency check this "
                    "worker requires"
                )
            )
        self._check_request(request)
        return self._respond(request)

    def consistency(self, request: UnmaskRequest) -> ConsistencySignature:
        """Phase 4a (signed mode): check the request as for :meth:`unmask`, then sign it."""
        self._expect(ClientState.MASKED, "sign an unmasking request")
        if self.identity is None:
            raise self._fail(SecAggError("the consistency check needs a signing identity"))
        self._check_request(request)
        self._request = request
        self.state = ClientState.CHECKING
        statement = request_statement(self.setup, request, self.index)
        self._own_signature = self.identity.sign(statement)
        return ConsistencySignature(self.index, self.identity.public, self._own_signature)

    def unmask_checked(self, signatures: Sequence[ConsistencySignature]) -> UnmaskResponse:
        """Phase 4 (signed mode): reveal shares only if every signature relayed is a
        survivor's on the request this worker was shown, and at least t of its group signed.

        A coordinator that shows two workers different survivor sets cannot relay the other
        worker's signature (it is on another set), and cannot gather t signatures on both
        sets from one group when t is a majority of it: the round aborts, nothing revealed."""
        self._expect(ClientState.CHECKING, "answer an unmasking request")
        assert self.identity is not None
        assert self._request is not None
        request = self._request
        group = self._mask_peers | {self.index}
        seen: set[int] = set()
        agreeing: set[int] = set()
        # Group members first; t valid signatures from the group suffice (an honest member
        # signs one request, and t is a majority of the group), so verifying stops there. Any
        # invalid one met on the way is proof of two views: abort.
        for sig in sorted(signatures, key=lambda x: (x.index not in group, x.index)):
            if (
                sig.index not in request.survivors
                or sig.index in seen
                or not 1 <= sig.index <= len(self.setup.members)
            ):
                raise self._fail(
                    SecAggRefusedError(f"a consistency signature of non-survivor {sig.index}")
                )
            seen.add(sig.index)
            if len(agreeing) >= self.setup.threshold:
                break
            silo = self.setup.members[sig.index - 1]
            if sig.index == self.index:
                # Ed25519 is deterministic: this worker's own signature is known exactly.
                valid = sig.signature == self._own_signature
            else:
                statement = request_statement(self.setup, request, sig.index)
                try:
                    self.identity.verify(silo, sig.signing_public, statement, sig.signature)
                    valid = True
                except SecAggError:
                    valid = False
            if not valid:
                raise self._fail(
                    SecAggRefusedError(
                        f"silo {silo!r} did not sign the unmasking request this worker was "
                        "shown: workers were shown different survivor sets; nothing revealed"
                    )
                )
            if sig.index in group:
                agreeing.add(sig.index)
        if len(agreeing) < self.setup.threshold:
            raise self._fail(
                SecAggRefusedError(
                    f"only {len(agreeing)} of this worker's group signed the unmasking "
                    f"request, below the threshold {self.setup.threshold}; nothing revealed"
                )
            )
        return self._respond(request)

    def _check_request(self, request: UnmaskRequest) -> None:
        """What an honest worker requires of an unmasking request before acting on it."""
        both = request.survivors & request.dropped
        if both:
            raise self._fail(
                SecAggRefusedError(
                    f"the coordinator asked for both shares of worker(s) {sorted(both)}; "
                    "refusing, as that would reveal their input"
                )
            )
        if self.index in request.dropped or self.index not in request.survivors:
            raise self._fail(
                SecAggRefusedError("the coordinator calls this worker dropped after its input")
            )
        group = self._mask_peers | {self.index}
        if not request.dropped & group <= self._mask_peers:
            raise self._fail(SecAggRefusedError("a worker called dropped never shared with us"))
        # Only neighbours count: they are the survivors whose shares this worker holds.
        neighbours = len(request.survivors & group)
        if neighbours < self.setup.threshold:
            raise self._fail(
                SecAggRefusedError(
                    f"only {neighbours} survivors among this worker's group, below the "
                    f"threshold {self.setup.threshold}: unmasking would expose too small a sum"
                )
            )
        if len(request.survivors) < self.rules.min_survivors:
            raise self._fail(
                SecAggRefusedError(
                    f"only {len(request.survivors)} survivors, fewer than the "
                    f"{self.rules.min_survivors} updates this worker's DP noise share assumes"
                )
            )

    def _respond(self, request: UnmaskRequest) -> UnmaskResponse:
        group = self._mask_peers | {self.index}
        response = UnmaskResponse(
            self_mask_shares={
                v: self._self_mask_shares[v].value_bytes()
                for v in sorted(request.survivors & group)
            },
            key_shares={
                v: self._key_shares[v].value_bytes() for v in sorted(request.dropped & group)
            },
        )
        self.state = ClientState.DONE
        self._self_mask_shares.clear()
        self._key_shares.clear()
        return response
