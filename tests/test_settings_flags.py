"""One source per setting (issue 24): fed-server's flags are built from the settings'
dataclass fields, so a flag's default is its field's; every job setting a data scientist may
submit (job TOML, ``fed-job submit --set``) is a fed-server flag with the same meaning."""

from __future__ import annotations

import dataclasses
from typing import Any

import pytest

from fedcore.flags import flag_dest, flag_fields, flag_values
from fedcore.plan import TrainConfig
from fedcore.server import ServerConfig
from fedcore.server.cli import TRAIN_FLAGS, build_parser, config_from_args
from fedcore.server.jobs.spec import JOB_FLAGS, JOB_KEYS, job_config
from fedcore.server.network import NetworkSettings
from fedcore.server.state.config import Limits, Output, Recovery, Security

GROUPS = (ServerConfig, Limits, Output, Security, Recovery, NetworkSettings)


def _defaults() -> Any:
    return build_parser().parse_args([])


@pytest.mark.parametrize("cls", GROUPS, ids=lambda c: c.__name__)
def test_every_flag_defaults_to_its_dataclass_field(cls: type) -> None:
    assert flag_fields(cls), "the harness sees no flag of this group"
    parsed = flag_values(cls, _defaults())
    assert parsed == {f.name: f.default for f in flag_fields(cls)}


def test_the_training_flags_default_to_train_config() -> None:
    args = _defaults()
    defaults = TrainConfig()
    for name, flag in TRAIN_FLAGS.items():
        assert getattr(args, flag.removeprefix("--").replace("-", "_")) == getattr(defaults, name)


def test_no_flags_make_the_default_config() -> None:
    """The CLI's config without flags is the dataclasses' default config, group by group."""
    assert config_from_args(_defaults()) == ServerConfig()


def test_a_flag_reaches_its_field() -> None:
    """Positive control: the comparison above sees a flag's value."""
    args = build_parser().parse_args(
        ["--round-timeout", "7", "--require-tag", "x", "--progress", "plain", "--insecure"]
    )
    config = config_from_args(args)
    assert config.limits.round_timeout == 7.0
    assert config.require_tags == ("x",)
    assert config.output.progress == "plain"
    assert config.security.insecure is True
    assert config != ServerConfig()


def test_a_setting_without_help_has_no_flag() -> None:
    names = {f.name for f in flag_fields(Limits)}
    assert "shutdown_grace" not in names
    assert "round_timeout" in names
    assert flag_dest(next(f for f in flag_fields(ServerConfig) if f.name == "require_tags")) == (
        "require_tag"
    )


#: Job settings and values to try; secure aggregation and DP need their switch and a round
#: big enough. Together they name every job key.
_SAMPLES: list[dict[str, Any]] = [
    {"model": "mnist-mlp", "model_params": {"hidden": 16}},
    {"rounds": 7, "min_workers": 4, "min_results": 3, "seed": 5},
    {"strategy": "fedadam", "strategy_options": {"server-lr": 0.1}},
    {"epochs": 2, "batch_size": 8, "optimizer": "adam", "learning_rate": 0.01},
    {"momentum": 0.9, "weight_decay": 0.001},
    {"require_tags": ["mnist"], "compression": "int8", "fed_eval_every": 2},
    {
        "secagg": True,
        "min_workers": 4,
        "secagg_threshold": 3,
        "secagg_neighbours": 2,
        "secagg_bits": 20,
        "secagg_clip": 0.5,
        "secagg_phase_timeout": 9.0,
        "secagg_signed": True,
    },
    {
        "min_workers": 10,
        "dp_noise_multiplier": 1.5,
        "dp_clip": 0.7,
        "dp_delta": 1e-6,
        "dp_mode": "central",
        "dp_adaptive_quantile": 0.5,
        "dp_clip_learning_rate": 0.1,
        "dp_count_noise": 5.0,
        "dp_accountant": "rdp",
    },
    {"min_workers": 10, "dp_target_epsilon": 4.0, "rounds": 5},
]


def _argv(settings: dict[str, Any]) -> list[str]:
    import json

    argv: list[str] = []
    for key, value in settings.items():
        flag = JOB_FLAGS[key]
        if value is True:
            argv.append(flag)
        elif isinstance(value, list):
            for item in value:
                argv += [flag, str(item)]
        else:
            argv += [flag, json.dumps(value) if isinstance(value, dict) else str(value)]
    return argv


def _job_part(config: ServerConfig) -> dict[str, Any]:
    """What a job's settings decide of a config (a job's secure rounds are bound to its id)."""
    secagg = dataclasses.replace(config.secagg, job="") if config.secagg is not None else None
    return {
        "model": config.model,
        "rounds": config.rounds,
        "min_workers": config.min_workers,
        "min_results": config.min_results,
        "strategy": config.strategy,
        "strategy_options": config.strategy_options,
        "seed": config.seed,
        "train": config.train,
        "require_tags": config.require_tags,
        "compression": config.compression,
        "fed_eval_every": config.output.fed_eval_every,
        "secagg": secagg,
        "dp": config.dp,
    }


def test_the_samples_name_every_job_setting_and_every_one_has_a_flag() -> None:
    assert set().union(*_SAMPLES) == JOB_KEYS
    assert set(JOB_FLAGS) == JOB_KEYS


@pytest.mark.parametrize("settings", _SAMPLES, ids=lambda s: ",".join(s)[:40])
def test_a_job_setting_means_what_its_flag_means(settings: dict[str, Any]) -> None:
    from_flags = config_from_args(build_parser().parse_args(_argv(settings)))
    from_job = job_config(ServerConfig(), settings, "job1")
    assert _job_part(from_job) == _job_part(from_flags)
    # Positive control: the settings changed something, on both sides.
    assert _job_part(from_flags) != _job_part(ServerConfig())
