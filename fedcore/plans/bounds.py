"""Bounds on the memory a plan's graph makes: every tensor, and all of them together.

From the fresh storages :mod:`.propagate` found (fake tensors: nothing was allocated), each
tensor's size is a polynomial in the batch size. A plan's sizes must be *linear* in it (a
tensor that grows as batch² is refused: it is how a small request becomes an enormous one),
each tensor stays within :class:`~.verify.Limits` at one example, and the sum of every
storage the forward pass creates, an upper bound on its activation memory (nothing freed),
is :class:`Activation`: ``fixed + per_example * batch`` bytes. A plan whose activation
memory exceeds ``max_activation_bytes`` for a single example is refused at verification;
:func:`check_batch` refuses a batch size that would exceed it.
"""

from __future__ import annotations

from dataclasses import dataclass

import sympy

from fedcore.errors import PlanRejectedError

from .propagate import NodeFacts

__all__ = ["Activation", "activation_of", "check_batch"]


@dataclass(frozen=True)
class Activation:
    """Bytes the forward pass allocates at most: ``fixed + per_example * batch``."""

    fixed: int = 0
    per_example: int = 0

    def at(self, batch: int) -> int:
        return self.fixed + self.per_example * batch

    def max_batch(self, limit: int) -> int:
        """The largest batch that stays within ``limit`` bytes (0: not even one)."""
        if self.per_example == 0:
            return 1 << 62 if self.fixed <= limit else 0
        return max(0, (limit - self.fixed) // self.per_example)


def _linear(expr: sympy.Expr, batch: sympy.Symbol, where: str) -> tuple[int, int]:
    try:
        poly = sympy.Poly(sympy.expand(expr), batch)
    except sympy.PolynomialError:
        raise PlanRejectedError(
            f"{where}: its size {expr} is not a polynomial in the batch"
        ) from None
    if poly.free_symbols - {batch}:
        raise PlanRejectedError(f"{where}: its size {expr} depends on more than the batch")
    if poly.degree() > 1:
        raise PlanRejectedError(
            f"{where}: its size {expr} grows faster than the batch (degree {poly.degree()})"
        )
    coeffs = [int(c) for c in poly.all_coeffs()]
    per_example, fixed = (coeffs[0], coeffs[1]) if len(coeffs) == 2 else (0, coeffs[0])
    if per_example < 0 or fixed + per_example < 0:
        raise PlanRejectedError(f"{where}: its size {expr} can be negative")
    return fixed, per_example


def activation_of(
    facts: list[NodeFacts],
    batch: sympy.Symbol,
    *,
    max_tensor_elements: int,
    max_example_elements: int,
    max_activation_bytes: int,
    what: str,
) -> Activation:
    """The graph's :class:`Activation`, once every tensor in it is within the limits.

    Raises:
        PlanRejectedError: a tensor too big, or growing faster than the batch; or activation
            memory above ``max_activation_bytes`` for one example.
    """
    fixed = per_example = 0
    for f in facts:
        for elements, itemsize in zip(f.fresh, f.itemsizes, strict=True):
            where = f"{what}: node {f.name!r} ({f.op})"
            const, coeff = _linear(elements, batch, where)
            if const + coeff > max_tensor_elements or coeff > max_example_elements:
                raise PlanRejectedError(
                    f"{where} makes a tensor of {const + coeff:,} elements at batch 1"
                    + (f" (+{coeff:,} per example)" if coeff else "")
                    + f", above the limit of {max_tensor_elements:,}"
                )
            fixed += max(const, 0) * itemsize
            per_example += coeff * itemsize
    activation = Activation(fixed, per_example)
    if activation.at(1) > max_activation_bytes:
        raise PlanRejectedError(
            f"{what}: its tensors take {activation.at(1):,} bytes for one example, above "
            f"this worker's max-activation-bytes ({max_activation_bytes:,})"
        )
    return activation


def check_batch(activation: Activation, batch: int, max_activation_bytes: int) -> None:
    """Refuse a batch size at which the graph's tensors would exceed the limit."""
    need = activation.at(batch)
    if need > max_activation_bytes:
        raise PlanRejectedError(
            f"at batch {batch} the plan's tensors take {need:,} bytes, above this worker's "
            f"max-activation-bytes ({max_activation_bytes:,}); the largest batch that fits "
            f"is {activation.max_batch(max_activation_bytes)}"
        )
