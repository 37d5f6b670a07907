"""The experiment-tracker sinks: a federation's rounds read back from a real MLflow store
(SQLite) and from TensorBoard event files; their libraries load only when their flag is used;
an unusable store is refused with a clear error before serving."""

from __future__ import annotations

import asyncio
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from test_coordinator import TIMEOUT, ScriptedTrainer, config, run_worker

from fedcore.errors import ConfigError


@pytest.mark.slow
async def test_mlflow_and_tensorboard_record_every_round(
    coordinator_factory: Any, tmp_path: Path
) -> None:
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    events = tmp_path / "tb"
    coordinator, task = await coordinator_factory(
        config(
            rounds=2,
            fed_eval_every=1,
            mlflow_uri=uri,
            mlflow_experiment="sinks-test",
            tensorboard_dir=events,
        )
    )
    await asyncio.gather(
        run_worker(coordinator.port, "a", ScriptedTrainer(1.0, 10)),
        run_worker(coordinator.port, "b", ScriptedTrainer(1.0, 30)),
    )
    result = await asyncio.wait_for(task, TIMEOUT)
    sent = [float(r.bytes_sent) for r in result.rounds]
    assert len(sent) == 2
    assert all(s > 0 for s in sent)

    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    experiment = client.get_experiment_by_name("sinks-test")
    assert experiment is not None
    (run,) = client.search_runs([experiment.experiment_id])
    assert run.info.status == "FINISHED"
    assert run.data.params["rounds"] == "2"
    assert run.data.params["strategy"] == "fedavg"
    assert run.data.params["trainable"] == "all"  # full fine-tuning, not LoRA

    def history(key: str) -> list[tuple[int, float]]:
        metrics = client.get_metric_history(run.info.run_id, key)
        return sorted((m.step, m.value) for m in metrics)

    assert history("federated/accuracy") == [(1, 0.5), (2, 0.5)]
    assert history("test/accuracy") == [(1, 0.5), (2, 0.5)]
    assert history("round/workers") == [(1, 2.0), (2, 2.0)]
    assert history("round/bytes_sent") == list(zip([1, 2], sent, strict=True))

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    # One subdirectory per run, named as the MLflow run.
    (run_dir,) = events.iterdir()
    assert run_dir.name == run.info.run_name
    assert run_dir.name.endswith("-logreg-fedavg"), run_dir.name
    accumulator = EventAccumulator(str(run_dir))
    accumulator.Reload()

    def scalars(tag: str) -> list[tuple[int, float]]:
        return [(e.step, e.value) for e in accumulator.Scalars(tag)]

    assert scalars("test/accuracy") == [(1, 0.5), (2, 0.5)]
    assert scalars("round/workers") == [(1, 2.0), (2, 2.0)]
    assert [step for step, _ in scalars("round/bytes_sent")] == [1, 2]


def test_two_runs_into_one_tensorboard_dir_stay_two_runs(tmp_path: Path) -> None:
    """Issue 27: two federations with the same --tensorboard-dir merged into one run."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from fedcore.server.reporting.metrics import CoordinatorStatus, RoundMetrics
    from fedcore.server.reporting.tensorboard import TensorBoardSink

    status = CoordinatorStatus("finished", 1, 1, 0, 0, 0, 1, 0, 0, 0.0, None)
    for workers in (3, 5):  # started in the same second: the same name, made unique
        sink = TensorBoardSink(tmp_path, "20261207-130000-logreg-fedavg")
        sink.round_completed(RoundMetrics(1, workers, 0, 1.0, 0, 0))
        sink.close(status, [])
    runs = sorted(p.name for p in tmp_path.iterdir())
    assert runs == ["20261207-130000-logreg-fedavg", "20261207-130000-logreg-fedavg-2"]
    seen = []
    for name in runs:
        accumulator = EventAccumulator(str(tmp_path / name))
        accumulator.Reload()
        seen.append([(e.step, e.value) for e in accumulator.Scalars("round/workers")])
    assert seen == [[(1, 3.0)], [(1, 5.0)]]


def test_trainable_parameters_are_a_run_parameter() -> None:
    """LoRA (named trainable parameters) and full fine-tuning runs must not look alike."""
    lora = config(trainable=("*.lora_A.*", "*.lora_B.*")).describe()
    assert lora["trainable"] == "*.lora_A.*,*.lora_B.*"
    assert config().describe()["trainable"] == "all"


def test_an_unusable_mlflow_store_is_refused_with_advice(tmp_path: Path) -> None:
    from fedcore.server.reporting.mlflow import MlflowSink

    # MLflow 3 refuses its file store unless told otherwise: say what works instead.
    with pytest.raises(ConfigError, match=r"sqlite:///mlflow\.db"):
        MlflowSink(f"file://{tmp_path / 'mlruns'}", "fedcore", {}, "run")


@pytest.mark.slow
def test_tracker_libraries_load_only_when_their_flag_is_used() -> None:
    code = (
        "import sys, fedcore.server.cli, fedcore.server.coordinator\n"
        "print(sorted(m for m in ('mlflow', 'tensorboard', 'torch.utils.tensorboard') "
        "if m in sys.modules))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], check=True, capture_output=True, text=True, timeout=120
    ).stdout
    assert out.strip() == "[]"
