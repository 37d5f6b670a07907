"""Centralized evaluation of the global model on a test set held by the coordinator."""

from __future__ import annotations

from pathlib import Path

from fedcore.data import load_shard
from fedcore.fit_check import check_data_fits
from fedcore.models import build_model, set_weights
from fedcore.plan import ModelSpec
from fedcore.training import EvalResult, evaluate
from fedcore.weights import Weights

from ..state.config import ServerConfig

__all__ = ["CentralEvaluator", "central_evaluator"]


class CentralEvaluator:
    """Loads ``--eval-data`` once and evaluates weights on it (thread-safe per call order).

    Raises:
        DataError: the data cannot be read, or does not fit the model (shapes, labels).
    """

    def __init__(self, model: ModelSpec, data: Path, batch_size: int, device: str) -> None:
        self._dataset = load_shard(data)
        self._model = build_model(model)
        # Before round 1: data that cannot fit the model is refused now, not after training.
        check_data_fits(
            self._model, self._dataset, model_name=str(model), what=f"--eval-data {data}"
        )
        self._batch_size = batch_size
        self._device = device

    @property
    def num_examples(self) -> int:
        return len(self._dataset)

    def evaluate(self, weights: Weights) -> EvalResult:
        set_weights(self._model, weights)
        return evaluate(
            self._model, self._dataset, batch_size=self._batch_size, device=self._device
        )


def central_evaluator(config: ServerConfig) -> CentralEvaluator | None:
    """The coordinator's own evaluation (``--eval-data``), or None without it."""
    out = config.output
    if out.eval_data is None:
        return None
    return CentralEvaluator(config.model, out.eval_data, out.eval_batch_size, out.device)
