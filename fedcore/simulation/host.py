"""A host: one OS process (or Ray actor) running many virtual workers on one event loop.

Each virtual worker is the deployment's :class:`~fedcore.worker.Worker` runtime, unchanged:
it opens its own gRPC stream to the coordinator, says hello, runs the plans it is sent
(policy review, training, client-level DP, secure-aggregation masking, compression), and
exits when the coordinator says the federation is over. What differs from ``fed-worker`` is
only the set-up: its shard comes from the seeded partition (:mod:`.clients`) and its trainer
releases the model after every task (:mod:`.trainer`).

Run as a process by the local engine (:func:`main`): reads a :class:`~.clients.HostSpec` as JSON on
stdin, prints a :class:`HostReport` as one JSON line on stdout when its workers are done.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import resource
import sys
import threading
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import torch

from fedcore.policy import Policy, RecordDPSetup, load_policy
from fedcore.privacy.dpsgd import DPSGD
from fedcore.training import warm_up
from fedcore.worker import PolicyGuard, Worker

from .clients import (
    HostSpec,
    WorkerSettings,
    client_name,
    client_shards,
    load_source,
    shard_dataset,
)
from .trainer import TransientTrainer

__all__ = ["HostReport", "main", "run_host"]

log = logging.getLogger("fedcore.simulation")


@dataclass
class HostReport:
    """What a host did: per-client outcomes and its process's peak memory."""

    pid: int
    clients: int
    tasks: int
    refused: int
    seconds: float
    peak_rss_bytes: int
    #: Client name -> the error that ended it (empty when all finished normally).
    errors: dict[str, str] = field(default_factory=dict)

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, text: str) -> HostReport:
        raw: dict[str, Any] = json.loads(text)
        return cls(**raw)


def peak_rss_bytes() -> int:
    """This process's peak resident memory so far (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _policy_for(policy: Policy, name: str, ledger_dir: Path) -> Policy:
    """The policy of one virtual silo: the shared rules, its own ledger file."""
    if policy.budget is None:
        return policy
    return replace(policy, budget=replace(policy.budget, ledger=ledger_dir / f"{name}.json"))


def _make_worker(
    spec: HostSpec,
    index: int,
    x: npt.NDArray[Any],
    y: npt.NDArray[np.int64],
    indices: npt.NDArray[np.int64],
    slots: threading.Semaphore,
    policy: Policy | None,
) -> tuple[Worker, TransientTrainer]:
    """One virtual worker, set up as ``fed-worker`` sets itself up from its flags."""
    settings = spec.workers
    name = client_name(index, spec.data.num_clients)
    dpsgd = None
    if settings.dpsgd_noise_multiplier is not None:
        # Its own accountant: every silo counts its own records' epsilon.
        dpsgd = DPSGD(
            noise_multiplier=settings.dpsgd_noise_multiplier,
            max_grad_norm=settings.dpsgd_clip,
            delta=settings.dpsgd_delta,
            max_epsilon=settings.dpsgd_max_epsilon,
            secure_mode=policy is not None and policy.privacy.dpsgd_secure_mode,
        )
    trainer = TransientTrainer(
        lambda: shard_dataset(x, y, indices),
        len(indices),
        slots,
        device=settings.device,
        train_fn=dpsgd,
    )
    guard = None
    if policy is not None:
        assert settings.ledger_dir is not None
        guard = PolicyGuard(
            _policy_for(policy, name, Path(settings.ledger_dir)),
            num_examples=len(indices),
            record_dp=(
                RecordDPSetup(settings.dpsgd_noise_multiplier, settings.dpsgd_clip)
                if settings.dpsgd_noise_multiplier is not None
                else None
            ),
        )
    worker = Worker(spec.server, name, trainer, guard=guard, give_up_after=settings.give_up_after)
    return worker, trainer


def _load_policy(settings: WorkerSettings) -> Policy | None:
    if settings.policy is None:
        return None
    return load_policy(Path(settings.policy))


async def run_host(spec: HostSpec) -> HostReport:
    """Run ``spec``'s virtual workers until the coordinator ends the federation."""
    started = time.perf_counter()
    torch.set_num_threads(spec.workers.threads)
    # Torch's one-time imports now, before joining, not inside round 1 (see training.warm_up).
    await asyncio.to_thread(warm_up)
    x, y = load_source(spec.data)
    shards = client_shards(spec.data, y)
    policy = _load_policy(spec.workers)
    slots = threading.BoundedSemaphore(spec.concurrency)
    made = [_make_worker(spec, i, x, y, shards[i], slots, policy) for i in spec.clients]
    outcomes = await asyncio.gather(*(w.run() for w, _ in made), return_exceptions=True)
    errors = {
        w.name: f"{type(o).__name__}: {o}"
        for (w, _), o in zip(made, outcomes, strict=True)
        if isinstance(o, BaseException)
    }
    return HostReport(
        pid=os.getpid(),
        clients=len(made),
        tasks=sum(t.tasks for _, t in made),
        refused=sum(w.tasks_refused for w, _ in made),
        seconds=round(time.perf_counter() - started, 3),
        peak_rss_bytes=peak_rss_bytes(),
        errors=errors,
    )


def host_main(spec_json: str) -> str:
    """Run a host from its JSON spec; its report as JSON (what engines call)."""
    spec = HostSpec.from_json(spec_json)
    logging.basicConfig(
        level=spec.log_level,
        format=f"%(asctime)s host-{os.getpid()} %(name)s %(levelname)s %(message)s",
        stream=sys.stderr,
    )
    return asyncio.run(run_host(spec)).to_json()


def main() -> int:
    """A host process: spec on stdin, report on stdout."""
    report = host_main(sys.stdin.read())
    print(report, flush=True)
    return 0
