"""Does a dataset fit a model? Checked once, before any round, in one line.

A shard of the wrong shape, or with labels beyond the model's classes, loads fine and then
fails deep inside training with a PyTorch traceback. :func:`check_data_fits` runs the model on
the first two examples, the way training and evaluation call it, and compares the label range
with the model's outputs, so the worker (its shard, before it joins) and the coordinator (its
``--eval-data``, before round 1) can refuse such data up front.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.data import Dataset

from fedcore.errors import DataError
from fedcore.training import Batch, iter_batches

__all__ = ["check_data_fits"]


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__


@torch.no_grad()
def check_data_fits(
    model: nn.Module, dataset: Dataset[Batch], *, model_name: str, what: str
) -> None:
    """Raise :class:`DataError` unless ``model`` can train and evaluate on ``dataset``.

    Checks that inputs are floating point, that the model accepts their shape and returns
    ``(batch, classes)`` logits, and that labels are integers in ``[0, classes)`` (all of them
    when the dataset holds its labels in memory as ``y``, else those of the probe batch).
    ``what`` names the data in the message (e.g. ``"shard shards/a.npz"``).
    """
    inputs, targets = next(iter_batches(dataset, 2, shuffle=False, generator=None))
    prefix = f"{what} does not fit model {model_name}"
    shape = tuple(inputs.shape[1:])
    if not inputs.is_floating_point():
        raise DataError(f"{prefix}: its inputs are {inputs.dtype}, the model needs floats")
    if targets.is_floating_point() or targets.dtype == torch.bool:
        raise DataError(f"{prefix}: its labels are {targets.dtype}, the model needs integers")
    parameter = next(model.parameters(), None)
    device = parameter.device if parameter is not None else torch.device("cpu")
    was_training = model.training
    model.eval()
    try:
        logits = model(inputs.to(device))
    except (RuntimeError, ValueError, TypeError, IndexError) as exc:
        raise DataError(
            f"{prefix}: examples of shape {shape} make the model fail ({_first_line(exc)})"
        ) from None
    finally:
        model.train(was_training)
    if logits.ndim != 2 or logits.shape[0] != inputs.shape[0]:
        raise DataError(
            f"{prefix}: examples of shape {shape} give outputs of shape "
            f"{tuple(logits.shape[1:])}, not one score per class"
        )
    classes = int(logits.shape[1])
    labels = getattr(dataset, "y", None)
    if not isinstance(labels, torch.Tensor) or labels.ndim != 1:
        labels = targets
    low, high = int(labels.min()), int(labels.max())
    if low < 0 or high >= classes:
        raise DataError(
            f"{prefix}: its labels range over {low}..{high}, the model has {classes} classes "
            f"(labels 0..{classes - 1})"
        )
