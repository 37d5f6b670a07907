"""What a worker *claims*, tamed before the coordinator uses or prints it.

* **Example counts** weigh a worker's update in FedAvg. A worker that claims 10^9 examples
  would make the average its own update; so a claim is bounded by what the worker announced
  in its hello, and the hello by ``--max-examples``. A claim over the bound is clamped (with a
  logged reason) and the update still counts, at the bounded weight: the round goes on.
* **Strings** (dataset descriptions, metric names, error messages) reach terminals and logs;
  they pass :func:`fedcore.sanitize.printable` first.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Mapping

from fedcore.data.metadata import DatasetMetadata
from fedcore.sanitize import printable

__all__ = ["bound_announced_examples", "bound_claimed_examples", "clean_dataset", "clean_metrics"]

log = logging.getLogger("fedcore.server")

#: Characters kept of a metric name or a short field.
NAME_LIMIT = 64


def bound_announced_examples(name: str, announced: int, maximum: int) -> int:
    """The example count a hello may announce: at most ``maximum``."""
    if announced > maximum:
        log.warning(
            "worker %r announced %d examples, more than --max-examples %d; counting %d",
            name,
            announced,
            maximum,
            maximum,
        )
        return maximum
    return max(announced, 0)


def bound_claimed_examples(name: str, round_number: int, claimed: int, announced: int) -> int:
    """The example count a result may claim: at most what the worker announced at join (at
    least 1: a result always stands for some examples)."""
    bound = max(announced, 1)
    if claimed > bound:
        log.warning(
            "round %d: worker %r claims %d examples but announced %d at join; its update is "
            "weighted as %d examples",
            round_number,
            name,
            claimed,
            announced,
            bound,
        )
        return bound
    return claimed


def clean_metrics(metrics: Mapping[str, float]) -> dict[str, float]:
    """Metric names made printable; values that are not finite numbers dropped."""
    return {
        printable(key, NAME_LIMIT): float(value)
        for key, value in metrics.items()
        if math.isfinite(value)
    }


def clean_dataset(dataset: DatasetMetadata | None) -> DatasetMetadata | None:
    """A worker's dataset description with every string made printable."""
    if dataset is None:
        return None
    return dataclasses.replace(
        dataset,
        name=printable(dataset.name, NAME_LIMIT),
        description=printable(dataset.description),
        license=printable(dataset.license, NAME_LIMIT),
        features=tuple(
            dataclasses.replace(
                f,
                name=printable(f.name, NAME_LIMIT),
                dtype=printable(f.dtype, NAME_LIMIT),
                description=printable(f.description),
            )
            for f in dataset.features
        ),
    )
