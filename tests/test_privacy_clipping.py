"""Clipping holds for every update (property-based), and adaptive clipping tracks a quantile."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from fedcore.errors import ConfigError
from fedcore.privacy import AdaptiveClipping, ClientDP, clip_update, l2_norm, privatize_update
from fedcore.privacy.client import UNCLIPPED_METRIC
from fedcore.weights import Weights

_floats = st.floats(-1e6, 1e6, allow_nan=False, allow_infinity=False, width=32)


@st.composite
def updates(draw: st.DrawFn) -> Weights:
    out: Weights = {}
    for i in range(draw(st.integers(1, 4))):
        dtype = draw(st.sampled_from([np.float32, np.float64, np.float16, np.int64]))
        shape = draw(hnp.array_shapes(min_dims=0, max_dims=3, max_side=6))
        if np.dtype(dtype).kind == "f":
            elements = st.floats(-6e4, 6e4, width=16) if dtype is np.float16 else _floats
        else:
            elements = st.integers(-1000, 1000)
        out[f"t{i}"] = draw(hnp.arrays(dtype, shape, elements=elements))
    return out


@settings(max_examples=300, deadline=None)
@given(update=updates(), clip=st.floats(1e-3, 1e3))
@pytest.mark.slow
def test_clipping_holds_for_every_update(update: Weights, clip: float) -> None:
    result = clip_update(update, clip)
    assert l2_norm(result.update) <= clip
    assert set(result.update) == set(update)
    for name, array in update.items():
        out = result.update[name]
        assert out.dtype == array.dtype
        assert out.shape == array.shape
        if array.dtype.kind != "f":
            assert not out.any()  # integer buffers are not released
    if result.norm <= clip:
        assert not result.clipped
        for name, array in update.items():
            if array.dtype.kind == "f":
                np.testing.assert_array_equal(result.update[name], array)


@settings(max_examples=100, deadline=None)
@given(
    received=hnp.arrays(np.float32, (3, 5), elements=_floats),
    trained=hnp.arrays(np.float32, (3, 5), elements=_floats),
    clip=st.floats(1e-3, 1e3),
)
def test_every_worker_update_leaves_clipped(
    received: np.ndarray, trained: np.ndarray, clip: float
) -> None:
    out = privatize_update({"w": received}, {"w": trained}, ClientDP(clip_norm=clip))
    assert l2_norm(out.delta) <= clip
    expected = trained.astype(np.float64) - received
    norm = float(np.linalg.norm(expected))
    if norm > 0:  # same direction as the true delta
        cosine = float(np.dot(out.delta["w"].ravel(), expected.ravel()))
        assert cosine >= 0


def test_clipping_scales_down_along_the_update() -> None:
    update: Weights = {"a": np.array([3.0, 0.0], np.float32), "b": np.array([[4.0]], np.float64)}
    result = clip_update(update, 1.0)
    assert result.norm == 5.0
    assert result.clipped
    np.testing.assert_allclose(result.update["a"], [0.6, 0.0], rtol=1e-6)
    np.testing.assert_allclose(result.update["b"], [[0.8]], rtol=1e-6)
    assert update["a"][0] == 3.0  # the input is untouched


def test_clipping_refuses_bad_input() -> None:
    with pytest.raises(ConfigError, match="clip norm"):
        clip_update({"a": np.ones(2)}, 0.0)
    with pytest.raises(ValueError, match="NaN"):
        clip_update({"a": np.array([np.nan])}, 1.0)


def _bit_sensitivity() -> float:
    """How far one worker moves the unclipped count, measured on the worker's own code path:
    its data replaced so that its update goes from fitting the clip norm to exceeding it."""
    g = {"w": np.zeros(4)}
    request = ClientDP(clip_norm=1.0, report_unclipped=True)
    fits = privatize_update(g, {"w": np.full(4, 0.1)}, request).metrics[UNCLIPPED_METRIC]
    exceeds = privatize_update(g, {"w": np.full(4, 10.0)}, request).metrics[UNCLIPPED_METRIC]
    return abs(fits - exceeds)


@pytest.mark.parametrize(("z", "count_noise"), [(1.0, 2.5), (2.0, 5.0), (0.5, 1.0), (1.0, 1.2)])
def test_adaptive_noise_split_costs_exactly_the_charged_multiplier(
    z: float, count_noise: float
) -> None:
    """The update sum (sensitivity C, noise z_update C) and the bit count (sensitivity as the
    worker's bits really move, noise count_noise) are one Gaussian mechanism whose multiplier
    is (z_update^-2 + (count_noise / sensitivity)^-2)^(-1/2): it must be the z the accountant
    charges. (Andrew et al.'s split for bits centred at +-1/2 fails this for 0/1 bits.)"""
    sensitivity = _bit_sensitivity()
    assert sensitivity == 1.0
    adaptive = AdaptiveClipping(clip_norm=1.0, count_noise_std=count_noise)
    z_update = adaptive.update_noise_multiplier(z)
    combined = (z_update**-2 + (count_noise / sensitivity) ** -2) ** -0.5
    assert combined == pytest.approx(z, rel=1e-12)
    assert z_update > z  # the count's share is paid for by more update noise


def test_adaptive_noise_split_refuses_a_count_noise_that_spends_the_budget() -> None:
    with pytest.raises(ConfigError, match="count noise"):
        AdaptiveClipping(clip_norm=1.0, count_noise_std=1.0).update_noise_multiplier(1.0)


def test_adaptive_clip_norm_converges_to_the_target_quantile() -> None:
    norms = np.linspace(1.0, 10.0, 100)
    adaptive = AdaptiveClipping(
        clip_norm=0.1, target_quantile=0.3, learning_rate=0.2, count_noise_std=1.0
    )
    for _ in range(300):
        unclipped = float((norms <= adaptive.clip_norm).sum())
        adaptive.update(unclipped, len(norms))
    assert adaptive.clip_norm == pytest.approx(np.quantile(norms, 0.3), rel=0.1)


def test_count_noise_default_follows_andrew_et_al_but_keeps_the_update_noise_sane() -> None:
    many = AdaptiveClipping(clip_norm=1.0)
    many.resolve(noise_multiplier=1.0, expected_updates=1000)
    assert many.count_noise_std == 50.0  # expected updates / 20
    few = AdaptiveClipping(clip_norm=1.0)
    few.resolve(noise_multiplier=1.0, expected_updates=4)
    assert few.count_noise_std == 2.0
    assert few.update_noise_multiplier(1.0) <= 1.16
