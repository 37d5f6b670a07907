"""Strategies by name: the built-ins, ``package.module:Class`` for your own, and their options.

Options are keyword arguments of the strategy's constructor (dashes or underscores), plus the
sampling options every strategy takes (:data:`SAMPLING_OPTIONS`).
"""

from __future__ import annotations

import importlib
import inspect
from collections.abc import Callable, Mapping
from typing import Any

from fedcore.errors import ConfigError

from .base import Strategy
from .fedavg import FedAvg, FedProx
from .fedbuff import FedBuff
from .fedopt import FedAdagrad, FedAdam, FedAvgM, FedYogi
from .robust import CoordinateMedian, Krum, MultiKrum, TrimmedMean
from .sampling import ClientSampler

__all__ = [
    "BUILTIN_STRATEGIES",
    "SAMPLING_OPTIONS",
    "describe_strategies",
    "load_strategy",
    "strategy_by_name",
    "strategy_options",
]

BUILTIN_STRATEGIES: dict[str, type[Strategy]] = {
    "fedavg": FedAvg,
    "fedavgm": FedAvgM,
    "fedprox": FedProx,
    "fedadagrad": FedAdagrad,
    "fedadam": FedAdam,
    "fedyogi": FedYogi,
    "median": CoordinateMedian,
    "trimmed-mean": TrimmedMean,
    "krum": Krum,
    "multi-krum": MultiKrum,
    "fedbuff": FedBuff,
}

_SUMMARIES = {
    "fedavg": "example-weighted mean of the workers' models (McMahan et al. 2017)",
    "fedavgm": "FedAvg with server momentum (Hsu et al. 2019)",
    "fedprox": "FedAvg + proximal term mu/2 ||w - w_global||^2 on the workers (Li et al. 2020)",
    "fedadagrad": "server Adagrad on the mean update (Reddi et al. 2021)",
    "fedadam": "server Adam on the mean update (Reddi et al. 2021)",
    "fedyogi": "server Yogi on the mean update (Reddi et al. 2021)",
    "median": "coordinate-wise median (Yin et al. 2018); robust, buffers all updates",
    "trimmed-mean": "coordinate-wise beta-trimmed mean (Yin et al. 2018); robust, buffers",
    "krum": "the update nearest its n-f-2 neighbours (Blanchard et al. 2017); robust, buffers",
    "multi-krum": "mean of the m best Krum scores, m=0 means n-f (Blanchard et al. 2017)",
    "fedbuff": "asynchronous buffered, staleness-weighted (Nguyen et al. 2022); --rounds = updates",
}

#: Options every strategy accepts, mapped to :class:`ClientSampler` fields.
SAMPLING_OPTIONS = {
    "fraction_fit": "fraction",
    "min_fit_workers": "min_workers",
    "sample_seed": "seed",
}


def _resolve(spec: str) -> Callable[..., Strategy]:
    if ":" not in spec:
        try:
            return BUILTIN_STRATEGIES[spec.lower()]
        except KeyError:
            raise ConfigError(
                f"unknown strategy {spec!r}; built-in strategies: "
                f"{', '.join(BUILTIN_STRATEGIES)}, or give package.module:Class"
            ) from None
    module_name, _, attr = spec.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ConfigError(f"cannot import strategy module {module_name!r}: {exc}") from None
    factory = getattr(module, attr, None)
    if factory is None:
        raise ConfigError(f"module {module_name!r} has no attribute {attr!r}")
    if not callable(factory):
        raise ConfigError(f"strategy {spec!r} is not a class or factory")
    return factory  # type: ignore[no-any-return]


def strategy_options(factory: Callable[..., Any]) -> dict[str, Any]:
    """The keyword options of a strategy class or factory, with their defaults."""
    params = inspect.signature(factory).parameters.values()
    return {
        p.name: (None if p.default is inspect.Parameter.empty else p.default)
        for p in params
        if p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD)
    }


def load_strategy(spec: str, options: Mapping[str, Any] | None = None) -> Strategy:
    """A strategy from a built-in name or ``package.module:Class``, built with ``options``."""
    factory = _resolve(spec)
    given = {k.replace("-", "_"): v for k, v in (options or {}).items()}
    sampling = {SAMPLING_OPTIONS[k]: given.pop(k) for k in list(given) if k in SAMPLING_OPTIONS}
    known = strategy_options(factory)
    unknown = sorted(set(given) - set(known))
    if unknown:
        accepted = [k.replace("_", "-") for k in (*known, *SAMPLING_OPTIONS)]
        raise ConfigError(
            f"strategy {spec!r} has no option {', '.join(repr(u.replace('_', '-')) for u in unknown)}; "
            f"its options: {', '.join(accepted)}"
        )
    try:
        strategy = factory(**given)
    except TypeError as exc:
        raise ConfigError(f"strategy {spec!r}: {exc}") from None
    if not isinstance(strategy, Strategy):
        raise ConfigError(f"{spec!r} made a {type(strategy).__name__}, not a fedcore.Strategy")
    if sampling:
        try:
            strategy.sampler = ClientSampler(**sampling)
        except TypeError as exc:
            raise ConfigError(f"strategy {spec!r}: bad sampling option: {exc}") from None
    return strategy


def strategy_by_name(name: str) -> Strategy:
    """A built-in strategy with default options."""
    return load_strategy(name)


def describe_strategies() -> str:
    """One entry per built-in strategy with its options and defaults (for ``--help``)."""
    lines = []
    for name, cls in BUILTIN_STRATEGIES.items():
        summary = _SUMMARIES.get(name, "")
        opts = ", ".join(f"{k.replace('_', '-')}={v}" for k, v in strategy_options(cls).items())
        lines.append(f"  {name:<14}{summary}")
        if opts:
            lines.append(f"  {'':<14}options: {opts}")
    sampler = ClientSampler()
    lines.append(
        "  every strategy also takes: "
        f"fraction-fit={sampler.fraction}, min-fit-workers={sampler.min_workers}, "
        f"sample-seed={sampler.seed}"
    )
    return "\n".join(lines)
