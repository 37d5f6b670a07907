"""``--mlflow-uri``: every round's metrics in an MLflow tracking store.

One MLflow run per federation, in the experiment ``--mlflow-experiment``: the federation's
settings as parameters, each round's :meth:`~.metrics.RoundMetrics.scalars` as metrics at
step = round. A local store is ``sqlite:///path/mlflow.db``; a tracking server is
``http://host:5000``. MLflow is imported only when this sink is used (it takes seconds).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING

from fedcore.errors import ConfigError

from .metrics import CoordinatorStatus, RoundMetrics

if TYPE_CHECKING:
    from mlflow.tracking import MlflowClient

__all__ = ["MlflowSink"]

log = logging.getLogger("fedcore.server")


class MlflowSink:
    """A :class:`~.sink.Sink` that logs to an MLflow run.

    Args:
        uri: the tracking URI (``sqlite:///mlflow.db``, ``http://host:5000``, ...).
        experiment: the experiment's name; created when missing.
        params: the federation's settings, logged once as the run's parameters.
        run: the run's name (:func:`~.sink.run_name`).
    """

    def __init__(self, uri: str, experiment: str, params: Mapping[str, str], run: str) -> None:
        try:
            from mlflow.entities import Param
            from mlflow.exceptions import MlflowException
            from mlflow.tracking import MlflowClient
        except ImportError:
            raise ConfigError(
                "--mlflow-uri needs MLflow: pip install 'fedcore[tracking]'"
            ) from None
        try:
            client = MlflowClient(tracking_uri=uri)
            found = client.get_experiment_by_name(experiment)
            experiment_id = (
                found.experiment_id if found is not None else client.create_experiment(experiment)
            )
            created = client.create_run(experiment_id, run_name=run)
            client.log_batch(
                created.info.run_id, params=[Param(k, v) for k, v in sorted(params.items())]
            )
        except MlflowException as exc:
            raise ConfigError(
                f"cannot log to MLflow at {uri!r}: {exc.message}; a local store is "
                "--mlflow-uri sqlite:///mlflow.db"
            ) from None
        self._client: MlflowClient = client
        #: The MLflow run of this federation.
        self.run_id: str = created.info.run_id
        log.info("logging rounds to MLflow run %s (%s) at %s", run, self.run_id, uri)

    def update(self, status: CoordinatorStatus) -> None:
        pass

    def round_completed(self, metrics: RoundMetrics) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self._client.log_batch(
            self.run_id,
            metrics=[Metric(k, v, now, metrics.round) for k, v in metrics.scalars().items()],
        )

    def close(self, status: CoordinatorStatus, rows: Sequence[RoundMetrics]) -> None:
        done = bool(rows) and rows[-1].round >= status.rounds
        self._client.set_terminated(self.run_id, "FINISHED" if done else "KILLED")
