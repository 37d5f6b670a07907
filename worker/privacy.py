"""Client-level DP on the worker: what the plan's ``dp.*`` settings do to a training result.

Applied by the runtime to every fit result, whatever :class:`~fedcore.worker.Trainer` produced
it, before the update is sent or masked for secure aggregation. The settings are the ones the
gate checked (:class:`~fedcore.worker.gate.CheckedTask`); the noise share is derived from them
and from the worker's own policy (``[training] honest-silos``), never read from the plan, and
under secure aggregation it is exact discrete-Gaussian noise on the round's grid.
"""

from __future__ import annotations

import logging

from fedcore.privacy import ClientDP, privatize_update
from fedcore.weights import Weights

from .trainer import FitOutput

__all__ = ["apply_client_dp"]

log = logging.getLogger("fedcore.worker")


def apply_client_dp(fit: FitOutput, received: Weights, request: ClientDP | None) -> FitOutput:
    """``fit`` unchanged when the plan asks for no DP; else its clipped (and, in distributed
    mode, noised) delta, with a weight of 1 (bounded weights: DP-FedAvg counts every worker
    the same)."""
    if request is None:
        return fit
    private = privatize_update(received, fit.weights, request, is_delta=fit.is_delta)
    exact = " (discrete Gaussian on the secure round's grid)" if request.ring_step else ""
    log.info(
        "update clipped to L2 norm %g%s",
        request.clip_norm,
        f", noise share std {request.noise_std:g} added{exact}" if request.noise_std else "",
    )
    return FitOutput(private.delta, 1, {**fit.metrics, **private.metrics}, is_delta=True)
