"""A job's settings: what a data scientist may choose, turned into the job's ``ServerConfig``.

A training job's settings are a JSON object (or a job TOML's table) named like ``fed-server``'s
flags: the job settings of :class:`~..state.config.ServerConfig` (model, strategy, rounds,
training config, minimum workers, tags that select silos, compression, secure aggregation,
client-level DP). Everything else, the process settings (listen address, limits, security,
outputs), is the network's and cannot be set by a job. :func:`job_config` is the one place
the two meet: the network's config with the job's fields replaced, validated by the same
``__post_init__`` checks as ``fed-server``'s flags.
"""

from __future__ import annotations

from dataclasses import fields, replace
from typing import Any

from fedcore.errors import ConfigError
from fedcore.flags import flag_fields, flag_name
from fedcore.models import available_models
from fedcore.plan import ModelSpec, TrainConfig
from fedcore.secagg.params import SecAggParams
from fedcore.strategy.registry import BUILTIN_STRATEGIES
from fedcore.v1 import fedcore_pb2 as pb

from ..state.config import Output, ServerConfig
from ..state.privacy import DPSettings

__all__ = ["JOB_FLAGS", "JOB_KEYS", "QUERY_KEYS", "check_query", "job_config", "rounds_of"]

_TOP = ("rounds", "min_workers", "min_results", "strategy", "strategy_options", "seed")
_TRAIN = tuple(f.name for f in fields(TrainConfig) if f.name not in ("extra", "trainable"))
_DP = {f"dp_{f.name}": f.name for f in fields(DPSettings)}
_SECAGG = {f"secagg_{f.name}": f.name for f in fields(SecAggParams) if f.name != "job"}

#: Every key a training job's settings may hold.
JOB_KEYS = frozenset(
    {
        "model",
        "model_params",
        "require_tags",
        "compression",
        "secagg",
        "fed_eval_every",
        *_TOP,
        *_TRAIN,
        *_DP,
        *_SECAGG,
    }
)
#: The ``fed-server`` flag of each job setting: a job TOML's key is the setting's name, a
#: one-shot federation's flag this (tests/test_settings_flags.py checks both mean the same).
JOB_FLAGS = (
    {key: "--" + key.replace("_", "-") for key in sorted(JOB_KEYS)}
    | {"learning_rate": "--lr", "require_tags": "--require-tag"}
    # The DP and secure aggregation flags are their settings fields' (fedcore.flags).
    | {f"dp_{f.name}": flag_name(f) for f in flag_fields(DPSettings)}
    | {f"secagg_{f.name}": flag_name(f) for f in flag_fields(SecAggParams) if f.name != "job"}
)
#: Every key an analytics query job's settings may hold.
QUERY_KEYS = frozenset({"query", "epsilon", "delta", "tags"})


def _check_keys(settings: dict[str, Any], allowed: frozenset[str], what: str) -> None:
    unknown = sorted(set(settings) - allowed)
    if unknown:
        raise ConfigError(
            f"unknown {what} setting(s) {', '.join(unknown)}; a job may set: "
            f"{', '.join(sorted(allowed))}"
        )


def _check_named(settings: dict[str, Any]) -> None:
    """Nothing named by a job is imported: its model is one of the coordinator's registered
    models (or a shipped plan) and its strategy a built-in one. ``fed-server``'s
    ``package.module:factory`` paths are the operator's, never a data scientist's."""
    model = settings.get("model", ServerConfig().model.name)
    if not isinstance(model, str) or model not in available_models():
        raise ConfigError(
            f"a job's model is one of the network's registered models "
            f"({', '.join(available_models())}) or a plan (fed-job submit --plan); "
            f"not {str(model)[:80]!r}"
        )
    strategy = settings.get("strategy", ServerConfig.strategy)
    if not isinstance(strategy, str) or strategy not in BUILTIN_STRATEGIES:
        raise ConfigError(
            f"a job's strategy is a built-in one ({', '.join(sorted(BUILTIN_STRATEGIES))}); "
            f"not {str(strategy)[:80]!r}"
        )


def rounds_of(settings: dict[str, Any]) -> int:
    """The rounds a training job asks for (ServerConfig's default when it names none)."""
    return int(settings.get("rounds", ServerConfig.rounds))


def check_query(settings: dict[str, Any]) -> None:
    """Refuse a query job's settings that are not a query (the query itself is parsed and
    admitted when it runs, by the same code as ``fed-query``)."""
    _check_keys(settings, QUERY_KEYS, "query")
    if not isinstance(settings.get("query"), str) or not settings["query"].strip():
        raise ConfigError("a query job needs its query text ('query')")
    if not isinstance(settings.get("epsilon"), int | float) or settings["epsilon"] <= 0:
        raise ConfigError("a query job needs a positive 'epsilon'")


def job_config(
    network: ServerConfig,
    settings: dict[str, Any],
    job_id: str,
    plan: tuple[ModelSpec, pb.PlanProgram] | None = None,
) -> ServerConfig:
    """The config a training job runs under: ``network``'s process settings, the job's own.

    Raises:
        ConfigError: an unknown key, or settings ``fed-server`` would refuse too.
    """
    _check_keys(settings, JOB_KEYS, "training job")
    try:
        return _job_config(network, settings, job_id, plan)
    except (TypeError, ValueError) as exc:  # a value of the wrong type reached a constructor
        raise ConfigError(f"invalid job settings: {exc}") from None


def _job_config(
    network: ServerConfig,
    settings: dict[str, Any],
    job_id: str,
    plan: tuple[ModelSpec, pb.PlanProgram] | None,
) -> ServerConfig:
    _check_named(settings)
    top: dict[str, Any] = {k: settings[k] for k in _TOP if k in settings}
    if "model" in settings or "model_params" in settings:
        top["model"] = ModelSpec(
            str(settings.get("model", "mnist-cnn")), dict(settings.get("model_params", {}))
        )
    if plan is not None:
        top["model"], top["plan"] = plan
    else:
        top["plan"] = None
    top["train"] = TrainConfig(**{k: settings[k] for k in _TRAIN if k in settings})
    top["require_tags"] = tuple(settings.get("require_tags", ()))
    top["compression"] = settings.get("compression", "none")
    dp = {name: settings[key] for key, name in _DP.items() if key in settings}
    top["dp"] = DPSettings(**dp) if dp else None
    secagg = {name: settings[key] for key, name in _SECAGG.items() if key in settings}
    # Signed rounds are bound to the job: its id is what workers key participation by.
    top["secagg"] = SecAggParams(**secagg, job=job_id) if settings.get("secagg") or secagg else None
    # A job writes no process-wide outputs: its rows go to the job store, its model to the
    # job's folder; central evaluation and threads stay the network's.
    out = network.output
    top["output"] = Output(
        eval_data=out.eval_data,
        eval_batch_size=out.eval_batch_size,
        fed_eval_every=settings.get("fed_eval_every"),
        progress="plain",
        threads=out.threads,
        device=out.device,
    )
    top["analytics"] = None
    # A job waits for its workers as long as it takes (a one-shot's --join-timeout is the
    # process's wait for its one job's workers): other jobs run meanwhile.
    if network.limits.join_timeout is not None:
        top["limits"] = replace(network.limits, join_timeout=None)
    return replace(network, **top)
