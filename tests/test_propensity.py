"""Position-bias propensities from result-randomised click logs: recovery on simulated data, invariants."""

from __future__ import annotations

import numpy as np
import pytest

from shared_model.propensity import (
    aggregate_position_counts,
    empirical_propensities,
    estimate_propensities,
    fit_power_law,
    power_law_propensities,
    propensities_from_counts,
)


def simulate(
    eta: float, n_sessions: int = 3000, slate: int = 20, seed: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """Randomised sessions under the position-based model: click ~ Bernoulli((k+1)^-eta * attractiveness)."""
    rng = np.random.default_rng(seed)
    attract = rng.uniform(0.05, 0.95, size=(n_sessions, slate))  # random order => independent of position
    positions = np.broadcast_to(np.arange(slate), (n_sessions, slate))
    exam = (positions + 1.0) ** -eta
    clicks = (rng.random((n_sessions, slate)) < exam * attract).astype(np.uint8)
    return positions.ravel(), clicks.ravel()


def assert_valid(p: np.ndarray, n: int) -> None:
    assert p.shape == (n,)
    assert p[0] == 1.0
    assert np.all(p > 0)
    assert np.all(np.diff(p) <= 0)


@pytest.mark.parametrize("eta", [1.0, 0.5])
def test_recovers_power_law_eta(eta: float) -> None:
    pos, clk = simulate(eta)
    fitted, p = fit_power_law(*aggregate_position_counts(pos, clk, 20))
    assert abs(fitted - eta) < 0.1
    assert_valid(p, 20)
    np.testing.assert_allclose(p, power_law_propensities(fitted, 20))


def test_estimates_close_to_truth() -> None:
    pos, clk = simulate(1.0, seed=1)
    truth = power_law_propensities(1.0, 50)
    for smoothing in ("powerlaw", "empirical"):
        p = estimate_propensities(pos, clk, max_positions=50, smoothing=smoothing)
        assert_valid(p, 50)
        assert np.max(np.abs(p[:20] - truth[:20])) < 0.06, smoothing
    # the power law extrapolates beyond the observed positions
    p = estimate_propensities(pos, clk, max_positions=50)
    assert np.max(np.abs(p - truth)) < 0.06


def test_federated_counts_equal_pooled() -> None:
    pos, clk = simulate(1.0, n_sessions=600, seed=2)
    parts = np.array_split(np.arange(len(pos)), 3)
    counts = [aggregate_position_counts(pos[i], clk[i], 30) for i in parts]
    imp = sum(c[0] for c in counts)
    cl = sum(c[1] for c in counts)
    pooled = aggregate_position_counts(pos, clk, 30)
    np.testing.assert_array_equal(imp, pooled[0])
    np.testing.assert_array_equal(cl, pooled[1])
    assert isinstance(imp, np.ndarray) and isinstance(cl, np.ndarray)
    assert imp.dtype == np.int64 and cl.dtype == np.int64
    for smoothing in ("powerlaw", "empirical"):
        np.testing.assert_allclose(
            propensities_from_counts(imp, cl, smoothing=smoothing),
            estimate_propensities(pos, clk, max_positions=30, smoothing=smoothing),
        )


def test_aggregate_counts() -> None:
    imp, cl = aggregate_position_counts([0, 0, 1, 3, 7, 2.0], [1, 0, 1, 0, 1, 1], max_positions=4)
    np.testing.assert_array_equal(imp, [2, 1, 1, 1])  # position 7 dropped
    np.testing.assert_array_equal(cl, [1, 1, 1, 0])
    imp, cl = aggregate_position_counts([], [], max_positions=3)
    np.testing.assert_array_equal(imp, [0, 0, 0])
    for bad_pos, bad_clk in (([-1, 0], [0, 0]), ([0, 1], [0]), ([0.5], [1]), ([0], [-1]), ([0], [0.5])):
        with pytest.raises(ValueError):
            aggregate_position_counts(bad_pos, bad_clk, max_positions=3)
    with pytest.raises(ValueError):
        aggregate_position_counts([0], [0], max_positions=0)


@pytest.mark.filterwarnings("ignore:.*propensities:RuntimeWarning")
@pytest.mark.parametrize("smoothing", ["powerlaw", "empirical"])
def test_invariants_on_sparse_and_noisy_counts(smoothing: str) -> None:
    rng = np.random.default_rng(3)
    for _ in range(20):
        n = rng.integers(0, 30, size=15).astype(float)
        n[rng.random(15) < 0.3] = 0.0  # positions never shown
        c = np.minimum(rng.integers(0, 10, size=15), n)
        c[0] += 1
        n[0] += 1
        noisy_n = n + rng.normal(scale=2.0, size=15)  # e.g. DP noise: may be negative / non-integer
        noisy_c = c + rng.normal(scale=2.0, size=15)
        for imp, cl in ((n, c), (noisy_n, noisy_c)):
            with np.errstate(all="raise"):  # no division by zero, no log(0), no overflow
                p = propensities_from_counts(imp, cl, smoothing=smoothing)
            assert_valid(p, 15)


def test_increasing_ctr_clips_eta_at_zero() -> None:
    imp = np.full(5, 1000)
    cl = np.array([10, 20, 40, 80, 160])
    eta, p = fit_power_law(imp, cl)
    assert eta == 0.0
    np.testing.assert_array_equal(p, np.ones(5))
    assert_valid(empirical_propensities(imp, cl), 5)


def test_no_clicks_gives_uniform_with_warning() -> None:
    for smoothing in ("powerlaw", "empirical"):
        with pytest.warns(RuntimeWarning):
            p = propensities_from_counts(np.full(4, 10), np.zeros(4), smoothing=smoothing)
        np.testing.assert_array_equal(p, np.ones(4))
    with pytest.warns(RuntimeWarning):
        eta, p = fit_power_law([10, 0, 0], [3, 0, 0])  # a single observed position
    assert eta == 0.0


def test_empirical_shrinks_unseen_positions() -> None:
    imp = np.array([100, 100, 0, 100])
    cl = np.array([50, 25, 0, 30])
    p = empirical_propensities(imp, cl, pseudo_impressions=1e-9)
    np.testing.assert_allclose(p, [1.0, 0.5, 0.5, 0.5], rtol=1e-6)  # running min; unseen -> pooled, then min
    with pytest.raises(ValueError):
        empirical_propensities(imp, cl, pseudo_impressions=0.0)


def test_errors() -> None:
    with pytest.raises(ValueError, match="smoothing"):
        estimate_propensities([0, 1], [1, 0], smoothing="kde")
    with pytest.raises(ValueError, match="smoothing"):
        propensities_from_counts([1, 1], [1, 0], smoothing="kde")
    with pytest.raises(ValueError):
        fit_power_law([1, 2], [1])
    with pytest.raises(ValueError):
        fit_power_law([np.nan, 2], [1, 1])
