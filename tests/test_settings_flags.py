"""One source per setting (issue 24): fed-server's flags are built from the settings'
dataclass fields, so a flag's default is its field's; every job setting a data scientist may
submit (job TOML, ``fed-job submit --set``) is a fed-server flag with the same meaning."""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path
from typing import Any, Literal

import pytest

from fedcore.console import ConsoleSettings, console_settings_from_args
from fedcore.flags import (
    add_flags,
    flag_default,
    flag_dest,
    flag_fields,
    flag_name,
    flag_values,
    setting_metadata,
)
from fedcore.flags import setting as flag_setting
from fedcore.plan import TrainConfig
from fedcore.secagg import SecAggParams
from fedcore.server import ServerConfig
from fedcore.server.cli import TRAIN_FLAGS, build_parser, config_from_args
from fedcore.server.jobs.spec import JOB_FLAGS, JOB_KEYS, job_config
from fedcore.server.network import NetworkSettings
from fedcore.server.state.analytics import AnalyticsSettings
from fedcore.server.state.config import Limits, Output, Recovery, Security
from fedcore.server.state.privacy import DPSettings

GROUPS = (
    ServerConfig,
    TrainConfig,
    Limits,
    Output,
    Security,
    Recovery,
    NetworkSettings,
    SecAggParams,
    DPSettings,
    AnalyticsSettings,
    ConsoleSettings,
)


def _defaults() -> Any:
    return build_parser().parse_args([])


@pytest.mark.parametrize("cls", GROUPS, ids=lambda c: c.__name__)
def test_every_flag_defaults_to_its_dataclass_field(cls: type) -> None:
    assert flag_fields(cls), "the harness sees no flag of this group"
    parsed = flag_values(cls, _defaults())
    assert parsed == {f.name: flag_default(f) for f in flag_fields(cls)}


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


PASSWORD = "correct horse battery"

#: Per group: flags that set every one of its fields to a value other than its default (with
#: what they need: --secagg, enough workers), and where the group lands in the config.
_GROUP_ARGV: dict[type, list[str]] = {
    SecAggParams: [
        *("--secagg", "--min-workers", "4", "--secagg-threshold", "3"),
        *("--secagg-neighbours", "2", "--secagg-bits", "20", "--secagg-clip", "0.5"),
        *("--secagg-phase-timeout", "9", "--secagg-signed", "--secagg-job", "j1"),
    ],
    DPSettings: [
        *("--min-workers", "10", "--dp-noise-multiplier", "1.5", "--dp-target-epsilon", "4"),
        *("--dp-clip", "0.7", "--dp-delta", "1e-6", "--dp-mode", "distributed"),
        *("--dp-adaptive-quantile", "0.5", "--dp-clip-lr", "0.1", "--dp-count-noise", "5"),
        *("--dp-accountant", "rdp"),
    ],
    AnalyticsSettings: [
        *("--scientists", "s.json", "--analytics-only", "--analytics-delta", "1e-7"),
        *("--analytics-phase-timeout", "5", "--analytics-refusal-limit", "3"),
        *("--analytics-refusal-window", "60"),
    ],
    ConsoleSettings: [
        *("--console", "127.0.0.1:0", "--console-tls-cert", "c.pem"),
        *("--console-tls-key", "k.pem"),
    ],
}
_EXPECTED: dict[type, object] = {
    SecAggParams: SecAggParams(3.0, 2, 20, 0.5, 9.0, signed=True, job="j1"),
    DPSettings: DPSettings(
        clip=0.7,
        noise_multiplier=1.5,
        target_epsilon=4.0,
        delta=1e-6,
        mode="distributed",
        adaptive_quantile=0.5,
        clip_learning_rate=0.1,
        count_noise=5.0,
        accountant="rdp",
    ),
    AnalyticsSettings: AnalyticsSettings(
        Path("s.json"),
        only=True,
        default_delta=1e-7,
        phase_timeout=5.0,
        refusal_limit=3,
        refusal_window=60.0,
    ),
    ConsoleSettings: ConsoleSettings("127.0.0.1:0", PASSWORD, Path("c.pem"), Path("k.pem")),
}


def _group_of(cls: type, argv: list[str], tmp_path: Path) -> object:
    """The ``cls`` settings fed-server builds from ``argv``."""
    if cls is ConsoleSettings:
        secret = tmp_path / "secret"
        secret.write_text(PASSWORD)
        argv = [*argv, "--console-password-file", str(secret)]
        return console_settings_from_args(build_parser().parse_args(argv))
    config = config_from_args(build_parser().parse_args(argv))
    return {
        SecAggParams: config.secagg,
        DPSettings: config.dp,
        AnalyticsSettings: config.analytics,
    }[cls]


@pytest.mark.parametrize("cls", list(_GROUP_ARGV), ids=lambda c: c.__name__)
def test_each_groups_flags_build_its_settings(cls: type, tmp_path: Path) -> None:
    argv = _GROUP_ARGV[cls]
    # Every flag of the group is given, and every one changes its field.
    assert {a for a in argv if a.startswith("--")} >= {flag_name(f) for f in flag_fields(cls)}
    built = _group_of(cls, argv, tmp_path)
    assert built == _EXPECTED[cls]
    for f in flag_fields(cls):
        assert getattr(built, f.name) != flag_default(f), f.name


#: fed-server flags with a default that no settings dataclass declares, and why.
_UNSOURCED = {
    "model": "ServerConfig.model is a ModelSpec made of --model and --model-params",
    "model_params": "JSON, part of ServerConfig.model",
    "strategy_options": "JSON or a [strategy] table, not one value",
    "plan_input_shape": "server/plans.py: a --ship-plan export option, no setting",
    "log_level": "fedcore.cli_support: every CLI's own logging flag",
}


def _unsourced_defaults(parser: argparse.ArgumentParser) -> set[str]:
    """Flags of ``parser`` with a default that comes from no settings field (nor the list)."""
    declared = {flag_dest(f) for cls in GROUPS for f in flag_fields(cls)}
    defaults = vars(parser.parse_args([]))
    return {
        dest
        for dest, value in defaults.items()
        if value not in (None, False, []) and dest not in declared and dest not in _UNSOURCED
    }


def test_no_fed_server_default_is_written_twice() -> None:
    """A hand-written ``add_argument(..., default=...)`` for a setting fails here: declare
    the setting with ``fedcore.flags.setting`` in its dataclass instead."""
    assert _unsourced_defaults(build_parser()) == set()


def test_the_guard_sees_a_hand_written_default() -> None:
    """Positive control: a flag whose default is written by hand beside its field is found."""
    parser = build_parser()
    parser.add_argument("--dp-foo", type=float, default=2.0)
    assert _unsourced_defaults(parser) == {"dp_foo"}


@dataclasses.dataclass(frozen=True)
class _Sample:
    path: Path = dataclasses.field(metadata=setting_metadata("turns it on", metavar="FILE"))
    mode: Literal["a", "b"] = flag_setting("a", "a mode", flag="--sample-mode")
    order: Literal["x", "y", "z"] = flag_setting("y", "ordered", choices=("z", "y", "x"))


def test_required_and_literal_settings() -> None:
    parser = argparse.ArgumentParser()
    add_flags(parser, _Sample)
    off = parser.parse_args([])
    assert off.path is None  # a required field's flag is optional: absent reads as None
    assert flag_values(_Sample, off) == {"path": None, "mode": "a", "order": "y"}
    on = parser.parse_args(["--path", "f", "--sample-mode", "b", "--order", "x"])
    assert _Sample(**flag_values(_Sample, on)) == _Sample(Path("f"), "b", "x")
    with pytest.raises(TypeError):
        _Sample()  # type: ignore[call-arg]  # the dataclass field has no default
    with pytest.raises(SystemExit):
        parser.parse_args(["--path", "f", "--sample-mode", "c"])  # a Literal's values only
    text = parser.format_help()
    assert "{a,b}" in text
    assert "{z,y,x}" in text  # explicit choices keep their order
    assert "FILE" in text


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
