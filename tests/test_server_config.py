"""ServerConfig's groups: flat keywords named like the flags land in their group, unknown ones
are refused, and the CLI fills the same groups (its flags are unchanged)."""

from __future__ import annotations

from pathlib import Path

import pytest

from fedcore.errors import ConfigError
from fedcore.server import ServerConfig
from fedcore.server.cli import build_parser, config_from_args
from fedcore.server.state.config import Limits, Output


def test_from_flags_puts_each_setting_in_its_group() -> None:
    config = ServerConfig.from_flags(
        rounds=4, round_timeout=30.0, metrics_out=Path("m.jsonl"), resume=False, insecure=False
    )
    assert config.rounds == 4
    assert config.limits == Limits(round_timeout=30.0)
    assert config.output.metrics_out == Path("m.jsonl")
    with pytest.raises(ConfigError, match="unknown coordinator setting 'round_timout'"):
        ServerConfig.from_flags(round_timout=30.0)


def test_federated_evaluation_period_is_resolved_once() -> None:
    assert Output().fed_eval_every == 1  # no centralized test set: evaluate on the workers
    assert Output(eval_data=Path("test.npz")).fed_eval_every == 0
    assert Output(eval_data=Path("test.npz"), fed_eval_every=3).fed_eval_every == 3
    with pytest.raises(ConfigError, match="--fed-eval-every cannot be negative"):
        Output(fed_eval_every=-1)


def test_the_cli_flags_fill_the_groups() -> None:
    args = build_parser().parse_args(
        ["--round-timeout", "12", "--upload-slots", "2", "--progress", "plain", "--resume",
         "--checkpoint-dir", "ckpt", "--tensorboard-dir", "tb", "--mlflow-uri", "sqlite:///m.db"]
    )  # fmt: skip
    config = config_from_args(args)
    assert (config.limits.round_timeout, config.limits.upload_slots) == (12.0, 2)
    assert config.output.progress == "plain"
    assert config.output.tensorboard_dir == Path("tb")
    assert config.output.mlflow_uri == "sqlite:///m.db"
    assert config.recovery.resume
    assert config.recovery.checkpoint_dir == Path("ckpt")
    with pytest.raises(ConfigError, match="--resume needs --checkpoint-dir"):
        config_from_args(build_parser().parse_args(["--resume"]))


def test_the_approval_wait_backs_off_to_approval_poll() -> None:
    assert Limits().approval_poll == 30.0  # a person approves: asking every 30 s at most is enough
    args = build_parser().parse_args(["--approval-poll", "0.5"])
    assert config_from_args(args).limits.approval_poll == 0.5
    with pytest.raises(ConfigError, match="--approval-poll must be positive"):
        Limits(approval_poll=0)
