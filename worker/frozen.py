"""Where a worker keeps a plan's frozen parameters, so that they travel at most once.

Three sources, by digest (:func:`fedcore.frozen.frozen_digest`): the last ones used (memory),
the cache directory (:class:`~fedcore.frozen.FrozenCache`, which survives restarts), and a file
the data owner names (``--frozen-weights``). With such a file the worker uses *only* it: a
plan whose frozen parameters have another digest is refused, never downloaded.
"""

from __future__ import annotations

import logging
import threading
from pathlib import Path

from fedcore.errors import PayloadError
from fedcore.frozen import FrozenCache, frozen_digest, load_frozen_file, verify_frozen
from fedcore.weights import ModelSignature, Weights

__all__ = ["FrozenStore"]

log = logging.getLogger("fedcore.worker")


class FrozenStore:
    """A worker's frozen parameters.

    Args:
        cache_dir: keep received frozen parameters here across restarts (None: memory only).
        owner_file: the data owner's safetensors file of frozen parameters; plans must match it.
    """

    def __init__(self, cache_dir: Path | None = None, owner_file: Path | None = None) -> None:
        self._cache = FrozenCache(cache_dir) if cache_dir is not None else None
        self._owner: tuple[str, Weights] | None = None
        self.owner_path = owner_file
        if owner_file is not None:
            weights = load_frozen_file(owner_file)
            self._owner = (frozen_digest(weights), weights)
            log.info("frozen parameters from %s (sha256 %s)", owner_file, self._owner[0][:12])
        self._memory: tuple[str, Weights] | None = None
        self._lock = threading.Lock()  # loads and stores run in worker threads

    @property
    def pinned(self) -> str | None:
        """The digest of the data owner's file, when one is named: the only one accepted."""
        return self._owner[0] if self._owner is not None else None

    def held(self) -> list[str]:
        """Digests of frozen parameters available without a download (for the hello)."""
        if self._owner is not None:
            return [self._owner[0]]
        digests = set(self._cache.digests()) if self._cache is not None else set()
        if self._memory is not None:
            digests.add(self._memory[0])
        return sorted(digests)

    def holds(self, digest: str) -> bool:
        return digest in self.held()

    def get(self, digest: str) -> Weights:
        """The frozen parameters ``digest``, verified; PayloadError if they are not here or
        do not hash to ``digest`` (a damaged cache entry is deleted)."""
        with self._lock:
            if self._owner is not None:
                if digest != self._owner[0]:
                    raise PayloadError(
                        f"the plan's frozen parameters (sha256 {digest[:12]}) are not the data "
                        f"owner's file {self.owner_path} (sha256 {self._owner[0][:12]})"
                    )
                return self._owner[1]  # hashed when loaded
            if self._memory is not None and self._memory[0] == digest:
                return self._memory[1]
            weights = self._cache.load(digest) if self._cache is not None else None
            if weights is None:
                raise PayloadError(f"frozen parameters {digest[:12]} are not held here")
            log.info(
                "frozen parameters %s loaded from the cache",
                digest[:12],
                extra={"event": "frozen_loaded", "digest": digest},
            )
            self._memory = (digest, weights)
            return weights

    def put(self, digest: str, weights: Weights, signature: ModelSignature) -> Weights:
        """Verify received frozen parameters against ``digest`` and keep them."""
        with self._lock:
            verified = verify_frozen(weights, digest, signature, "the received frozen parameters")
            if self._cache is not None:
                self._cache.store(digest, verified)
            self._memory = (digest, verified)
            size = sum(a.nbytes for a in verified.values())
            cached = self._cache is not None
            log.info(
                "frozen parameters %s received (%.1f MB)%s",
                digest[:12],
                size / 1e6,
                ", cached" if cached else "",
                extra={
                    "event": "frozen_received",
                    "digest": digest,
                    "bytes": size,
                    "cached": cached,
                },
            )
            return verified
