"""Record-level DP inside a silo: DP-SGD (Abadi et al., CCS 2016) through Opacus.

Each optimizer step clips every example's gradient to L2 norm ``max_grad_norm`` and adds
Gaussian noise of standard deviation ``noise_multiplier * max_grad_norm`` to their sum; batches
are Poisson-sampled with rate ``batch_size / silo size``. The silo's own accountant composes
its steps across rounds, so the ``(epsilon, delta)`` it reports after every round is what the
whole federation has cost each of its records so far. Silos hold disjoint records, so a
record's guarantee is its own silo's (parallel composition).

The privacy unit is one record of the silo *replaced* by another: a silo's size is public (its
hello states it), so add/remove neighbours, which Opacus' accountants assume, would be of a
different, known size. A replaced record moves the clipped sum by up to ``2 C``; the accountant
charges for that (``relation="replace-one"``, see :mod:`fedcore.privacy.accountant`), up to
twice the add/remove figure.

Use it as a :class:`~fedcore.worker.TorchTrainer` training loop::

    trainer = TorchTrainer(shard, train_fn=DPSGD(noise_multiplier=1.0, max_grad_norm=1.0))

``secure_mode=True`` runs Opacus' secure mode: noise and batch sampling come from
``torchcsprng``'s ``/dev/urandom`` generator, and each noise value is the sum of four draws
halved, which defeats the floating-point attacks on Gaussian sampling (Holohan and Braghin
2021; Jin et al. 2022). It needs the ``torchcsprng`` package; without it the silo refuses to
start (:class:`~fedcore.errors.ConfigError`) rather than train without it.
"""

from __future__ import annotations

import importlib
import json
import logging
import math
import secrets
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, TensorDataset

from fedcore.atomic import write_atomically
from fedcore.errors import ConfigError, PrivacyBudgetExhausted
from fedcore.plan import TrainConfig
from fedcore.training import Batch, TrainResult, make_optimizer

from .accountant import Mechanism, PrivacyAccountant, Relation

if TYPE_CHECKING:
    from opacus.optimizers import DPOptimizer

log = logging.getLogger("fedcore.privacy")

# Opacus is imported when a DP-SGD silo first trains, not here: it costs most of a second per
# process (torch.distributed, scipy), which workers without DP-SGD never need.

__all__ = ["DPSGD", "DPSGD_METRICS", "RELATION"]

#: The neighbouring relation DP-SGD's epsilon is stated for (see the module docstring); a
#: calibration for a DP-SGD silo must use it too.
RELATION: Relation = "replace-one"

_CSPRNG = "torchcsprng"


def _csprng_available() -> bool:
    try:
        importlib.import_module(_CSPRNG)
    except ImportError:
        return False
    return True


#: Metrics a DP-SGD silo reports after each round.
DPSGD_METRICS = ("dpsgd_epsilon", "dpsgd_delta")


def _as_tensor_dataset(dataset: Dataset[Batch]) -> Dataset[Any]:
    x, y = getattr(dataset, "x", None), getattr(dataset, "y", None)
    if isinstance(x, torch.Tensor) and isinstance(y, torch.Tensor):
        return TensorDataset(x, y)
    return dataset


@dataclass
class _Stats:
    loss_sum: float = 0.0
    correct: int = 0
    seen: int = 0
    steps: int = 0


def _epoch(
    model: nn.Module,
    optimizer: DPOptimizer,
    loader: DataLoader[Any],
    device: torch.device,
    stats: _Stats,
) -> None:
    loss_fn = nn.CrossEntropyLoss()
    with warnings.catch_warnings():
        # Opacus' per-example hooks fire on module outputs when inputs need no gradient
        # (always the case for data); torch warns about it, harmlessly.
        warnings.filterwarnings("ignore", message="Full backward hook is firing")
        for inputs, targets in loader:
            inputs, targets = inputs.to(device), targets.to(device)
            optimizer.zero_grad(set_to_none=True)
            logits = model(inputs)
            loss = loss_fn(logits, targets)
            loss.backward()
            optimizer.step()  # clips per example, adds noise (an empty batch gets noise only)
            stats.steps += 1
            if len(targets):
                stats.loss_sum += float(loss.detach()) * len(targets)
                stats.correct += int((logits.detach().argmax(1) == targets).sum())
                stats.seen += len(targets)


class DPSGD:
    """A DP-SGD training loop (Opacus) with the silo's privacy accountant.

    Args:
        noise_multiplier: noise std divided by ``max_grad_norm``.
        max_grad_norm: per-example gradient clip norm.
        delta: the delta at which the silo reports its epsilon (well below 1 / silo size).
        max_epsilon: the silo's budget: a round that would exceed it is refused.
        mechanism: accountant, ``"rdp"``, ``"pld"`` or ``"best"`` (the smaller of the two).
        state_file: where the accountant's history is kept (JSON, written atomically before
            each round trains), so a restarted worker keeps counting toward ``max_epsilon``.
        secure_mode: Opacus' secure mode (see the module docstring); needs ``torchcsprng``.
    """

    def __init__(
        self,
        *,
        noise_multiplier: float,
        max_grad_norm: float,
        delta: float = 1e-5,
        max_epsilon: float | None = None,
        mechanism: Mechanism = "best",
        state_file: Path | None = None,
        secure_mode: bool = False,
    ) -> None:
        if not noise_multiplier > 0:
            raise ConfigError(f"DP-SGD needs a positive noise multiplier, got {noise_multiplier}")
        if not max_grad_norm > 0:
            raise ConfigError(f"DP-SGD needs a positive clip norm, got {max_grad_norm}")
        if not 0 < delta < 1:
            raise ConfigError(f"DP-SGD delta must be in (0, 1), got {delta}")
        if secure_mode and not _csprng_available():
            raise ConfigError(
                "DP-SGD secure mode (required by this worker's policy: "
                "differential-privacy.dpsgd-secure-mode) needs Opacus' cryptographically secure "
                f"generator from the {_CSPRNG!r} package, which is not installed (it has no "
                f"build for torch {torch.__version__}); install a torchcsprng built for this "
                "torch, or lift the requirement from the policy: this silo will not train "
                "without it"
            )
        self.secure_mode = secure_mode
        self.noise_multiplier = noise_multiplier
        self.max_grad_norm = max_grad_norm
        self.delta = delta
        self.max_epsilon = max_epsilon
        self.accountant = PrivacyAccountant(mechanism=mechanism, relation=RELATION)
        self.state_file = state_file
        if state_file is not None and state_file.exists():
            try:
                self.accountant.load_state_dict(json.loads(state_file.read_text()))
            except (OSError, ValueError, TypeError) as exc:
                raise ConfigError(
                    f"cannot read the DP-SGD accountant state {state_file}: {exc}; it is never "
                    "reset silently (remove it only if this silo's records were never trained on)"
                ) from None

    def _save(self) -> None:
        """Write the accountant's history before the round it counts trains (a crash in
        between over-counts: the safe side)."""
        if self.state_file is None:
            return
        state = json.dumps(self.accountant.state_dict()).encode("utf-8")
        try:
            write_atomically(self.state_file, state, mode=0o600)
        except OSError as exc:
            raise ConfigError(
                f"cannot write the DP-SGD accountant state {self.state_file}: {exc.strerror}"
            ) from None

    @property
    def epsilon(self) -> float:
        """Epsilon spent so far by this silo's records (one replaced), at ``delta``."""
        return self.accountant.get_epsilon(delta=self.delta)

    def __call__(
        self, model: nn.Module, dataset: Dataset[Batch], config: TrainConfig, device: torch.device
    ) -> TrainResult:
        from opacus.data_loader import DPDataLoader
        from opacus.grad_sample import GradSampleModule
        from opacus.optimizers import DPOptimizer
        from opacus.validators import ModuleValidator

        n = len(dataset)  # type: ignore[arg-type]
        if n == 0:
            raise ConfigError("DP-SGD needs a non-empty training set")
        if not getattr(model, "opacus_compatible", True):
            # A plan's module is a graph of ATen calls: Opacus' per-example gradient hooks
            # sit on nn.Linear/nn.Conv2d modules, which it does not have.
            raise ConfigError(
                "DP-SGD cannot train a plan: Opacus computes per-example gradients with hooks "
                "on layer modules (nn.Linear, nn.Conv2d, ...), and a verified plan is a graph "
                "of ATen operations without them; run this silo without DP-SGD for plans, or "
                "federate a registered model"
            )
        model.train()
        errors = ModuleValidator.validate(model, strict=False)
        if errors:
            raise ConfigError(
                f"the model cannot be trained with DP-SGD: {errors[0]}; "
                "replace BatchNorm with GroupNorm (opacus ModuleValidator.fix)"
            )
        loader = DataLoader(_as_tensor_dataset(dataset), batch_size=config.batch_size)
        # Poisson sampling decides which records each step sees: seeded from the OS's CSPRNG,
        # never from the plan's seed (a coordinator that knew the batches could tell which
        # records a step's noise protects least). Secure mode draws from /dev/urandom itself.
        generator = self._generator()
        with warnings.catch_warnings():
            # Opacus warns that its RNG is not cryptographically secure unless secure_mode is
            # on (which needs torchcsprng); the README states this limit.
            warnings.filterwarnings("ignore", message=".*[Ss]ecure.*", module="opacus")
            dp_loader = DPDataLoader.from_data_loader(loader, generator=generator)
        sample_rate = float(dp_loader.sample_rate)  # Poisson rate: 1 / batches per epoch
        steps = config.epochs * len(dp_loader)
        if self.max_epsilon is not None:
            after = self.accountant.epsilon_after(
                noise_multiplier=self.noise_multiplier,
                sample_rate=sample_rate,
                delta=self.delta,
                steps=steps,
            )
            if after > self.max_epsilon:
                raise PrivacyBudgetExhausted(
                    f"this round would take the silo's records to epsilon {after:.3f} > "
                    f"{self.max_epsilon:g} (delta {self.delta:g}); the silo stops training. "
                    "Raise --dpsgd-max-epsilon or the noise multiplier to train longer"
                )
        model.to(device)
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*[Ss]ecure.*", module="opacus")
            gsm = GradSampleModule(model)
            optimizer = DPOptimizer(
                make_optimizer(gsm, config),
                noise_multiplier=self.noise_multiplier,
                max_grad_norm=self.max_grad_norm,
                expected_batch_size=config.batch_size,
                generator=generator if self.secure_mode else None,
                secure_mode=self.secure_mode,
            )
        # Charged before training, and persisted: a crash or an error mid-round over-counts.
        self.accountant.step(
            noise_multiplier=self.noise_multiplier, sample_rate=sample_rate, steps=steps
        )
        self._save()
        started = time.perf_counter()
        stats = _Stats()
        try:
            for _ in range(config.epochs):
                _epoch(gsm, optimizer, dp_loader, device, stats)
        finally:
            gsm._close()
        # The silo's own record-level guarantee, whether or not a policy keeps a ledger.
        log.info(
            "DP-SGD: %d steps this round; this silo's records are at epsilon %.3f (delta %g)",
            steps,
            self.epsilon,
            self.delta,
        )
        total_loss, correct, seen = stats.loss_sum, stats.correct, stats.seen
        return TrainResult(
            num_examples=n,
            loss=total_loss / seen if seen else math.nan,
            accuracy=correct / seen if seen else math.nan,
            seconds=time.perf_counter() - started,
            metrics=self.metrics(),
        )

    def _generator(self) -> torch.Generator:
        if self.secure_mode:
            csprng = importlib.import_module(_CSPRNG)
            generator: torch.Generator = csprng.create_random_device_generator("/dev/urandom")
            return generator
        return torch.Generator().manual_seed(secrets.randbits(63))

    def metrics(self) -> dict[str, float]:
        """What the silo reports to the coordinator after a round."""
        return {"dpsgd_epsilon": self.epsilon, "dpsgd_delta": self.delta}
