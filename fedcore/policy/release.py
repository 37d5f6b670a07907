"""The one statistic of the records a worker may advertise: a label histogram with DP noise.

The privacy unit is one record replaced (the silo's size is public: its hello advertises
it). Replacing a record moves it from one label to another: two counts change by one, an L2
sensitivity of ``sqrt(2)``, so Gaussian noise of standard deviation ``z`` is the Gaussian
mechanism with noise multiplier ``z / sqrt(2)``, and that is what is charged (issue 22:
charging ``z`` assumed add/remove while the size was published). The noise comes from the
operating system's CSPRNG (floating-point noise from a seeded generator would be
predictable); the histogram is released once per study and reused from the ledger.
"""

from __future__ import annotations

import math
import secrets

import numpy as np
import numpy.typing as npt

from .ledger import Charge

__all__ = ["LABEL_HISTOGRAM", "REPLACE_ONE_SENSITIVITY", "noisy_label_histogram"]

#: The key of the released histogram in the ledger.
LABEL_HISTOGRAM = "label-histogram"
#: The histogram's L2 sensitivity when one record is replaced.
REPLACE_ONE_SENSITIVITY = math.sqrt(2.0)


def noisy_label_histogram(
    labels: npt.ArrayLike,
    *,
    num_labels: int,
    noise_multiplier: float,
    rng: np.random.Generator | None = None,
) -> tuple[tuple[float, ...], Charge]:
    """Counts of labels ``0 .. num_labels-1`` (others are not counted) plus Gaussian noise of
    std ``noise_multiplier``, and the charge the release costs (multiplier
    ``noise_multiplier / sqrt(2)``: one record replaced)."""
    y = np.asarray(labels).astype(np.int64).reshape(-1)
    counts = np.bincount(y[(y >= 0) & (y < num_labels)], minlength=num_labels).astype(np.float64)
    generator = rng if rng is not None else np.random.default_rng(secrets.randbits(128))
    noisy = counts + generator.normal(0.0, noise_multiplier, size=num_labels)
    charge = Charge(
        noise_multiplier=noise_multiplier / REPLACE_ONE_SENSITIVITY, what="label histogram"
    )
    return tuple(float(round(c, 1)) for c in noisy), charge
