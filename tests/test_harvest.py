"""Position bias from logs that never randomized: intervention harvesting (AllPairs) against a known curve."""

from __future__ import annotations

import numpy as np
import pytest

from shared_model.prepared import estimate_from_log
from shared_model.propensity import (
    allpairs_curve,
    harvest_counts,
    harvest_propensities,
    power_law_propensities,
)
from simulations.market_slates import ranker_multipliers
from simulations.marketplace import generate_catalog, make_config, simulate_over_catalog

P = 10
STEPPED = np.array([1.0, 0.8, 0.62, 0.55, 0.5, 0.32, 0.27, 0.2, 0.16, 0.12])  # not a power law


def simulate_logged(
    exam: np.ndarray, n_sessions: int = 40000, n_queries: int = 300, docs: int = 14, noise: float = 0.15,
    seed: int = 0,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Production-order sessions under the position-based model, never randomized.

    Each query has ``docs`` candidates with relevance ``rel [Q, D]``; a session shows the top ``len(exam)`` by a
    ranker score ``rel + noise * N(0, 1)`` (drawn per session: ranker updates, personalization), so the order is
    strongly correlated with relevance and naive CTR ratios are biased. Click ~ Bernoulli(exam[k] * rel).

    Returns groups, positions, clicks, each ``[n_sessions * len(exam)]``.
    """
    rng = np.random.default_rng(seed)
    k = len(exam)
    rel = rng.beta(1.2, 2.0, size=(n_queries, docs))
    q = rng.integers(0, n_queries, size=n_sessions)
    score = rel[q] + noise * rng.standard_normal((n_sessions, docs))
    shown = np.argsort(-score, axis=1)[:, :k]  # [S, k] doc ids in display order
    r = np.take_along_axis(rel[q], shown, axis=1)
    clicks = (rng.random((n_sessions, k)) < exam[None, :] * r).astype(np.uint8)
    groups = q[:, None] * docs + shown
    positions = np.broadcast_to(np.arange(k), (n_sessions, k))
    return groups.ravel(), positions.ravel(), clicks.ravel()


def naive_curve(positions: np.ndarray, clicks: np.ndarray, k: int) -> np.ndarray:
    ctr = np.bincount(positions, weights=clicks, minlength=k)[:k] / np.bincount(positions, minlength=k)[:k]
    return ctr / ctr[0]


@pytest.mark.parametrize("truth", [power_law_propensities(1.0, P), STEPPED], ids=["power-law", "stepped"])
def test_allpairs_recovers_the_curve_where_naive_ctr_does_not(truth: np.ndarray) -> None:
    # Prepare
    groups, pos, clk = simulate_logged(truth)
    # Execute
    c, n = harvest_counts(groups, pos, clk, max_positions=P)
    curve, info = allpairs_curve(c, n)
    eta, smoothed, _ = harvest_propensities(c, n, smoothing="empirical")
    # Assert
    assert np.max(np.abs(curve - truth)) < 0.05
    assert np.max(np.abs(smoothed - truth)) < 0.05
    assert np.all(info > 0)
    assert np.max(np.abs(naive_curve(pos, clk, P) - truth)) > 0.05  # the order is confounded with relevance


def test_powerlaw_smoothing_recovers_eta() -> None:
    groups, pos, clk = simulate_logged(power_law_propensities(0.7, P), seed=1)
    eta, p, _ = harvest_propensities(*harvest_counts(groups, pos, clk, max_positions=P), smoothing="powerlaw")
    assert abs(eta - 0.7) < 0.1
    np.testing.assert_allclose(p, power_law_propensities(eta, P))


def test_harvest_counts_by_hand() -> None:
    # group 7: position 0 twice (1 click), position 2 once (1 click); group 9: position 1 only (no intervention)
    groups = [7, 7, 7, 9, 9]
    positions = [0, 0, 2, 1, 1]
    clicks = [1, 0, 1, 0, 1]
    c, n = harvest_counts(groups, positions, clicks, max_positions=3)
    w = 2 * 2 * 1 / (2 + 1)  # harmonic mean of 2 and 1 impressions
    expected_n = np.zeros((3, 3))
    expected_n[0, 2] = expected_n[2, 0] = w
    expected_c = np.zeros((3, 3))
    expected_c[0, 2] = w * 0.5  # ctr at position 0
    expected_c[2, 0] = w * 1.0  # ctr at position 2
    np.testing.assert_allclose(n, expected_n)
    np.testing.assert_allclose(c, expected_c)


def test_shards_add_up_over_disjoint_groups() -> None:
    groups, pos, clk = simulate_logged(STEPPED, n_sessions=3000, seed=2)
    parts = [groups % 3 == i for i in range(3)]
    shard = [harvest_counts(groups[m], pos[m], clk[m], max_positions=P) for m in parts]
    c, n = harvest_counts(groups, pos, clk, max_positions=P)
    np.testing.assert_allclose(sum(s[0] for s in shard), c)
    np.testing.assert_allclose(sum(s[1] for s in shard), n)


def test_positions_beyond_max_are_dropped_and_unlinked_positions_are_not_identified() -> None:
    # positions 0 and 1 share group 1; position 3 only shares group 2 with position 4 (never with 0 or 1)
    groups = [1, 1, 1, 2, 2, 3]
    positions = [0, 1, 1, 3, 4, 9]
    clicks = [1, 0, 1, 1, 0, 1]
    c, n = harvest_counts(groups, positions, clicks, max_positions=5)
    assert n[:, :].sum() > 0 and n[3, 4] > 0
    curve, info = allpairs_curve(c, n)
    assert curve[0] == 1.0 and np.isfinite(curve[1])
    assert np.all(np.isnan(curve[2:]))
    assert info[3] == 0
    eta, p, _ = harvest_propensities(c, n, smoothing="empirical")
    assert p[0] == 1.0 and np.all(p > 0) and np.all(np.diff(p) <= 0)


def test_no_interventions_gives_uniform_with_warning() -> None:
    with pytest.warns(RuntimeWarning, match="harvested"):
        eta, p, curve = harvest_propensities(*harvest_counts([1, 2, 3], [0, 1, 2], [1, 1, 0], max_positions=4))
    assert eta == 0.0
    np.testing.assert_array_equal(p, np.ones(4))
    c, n = harvest_counts([], [], [], max_positions=4)
    assert not n.any()


def test_bad_input() -> None:
    with pytest.raises(ValueError, match="same length"):
        harvest_counts([1, 2], [0], [0], max_positions=3)
    with pytest.raises(ValueError, match="same length"):
        harvest_counts([1], [0, 1], [0, 1], max_positions=3)
    with pytest.raises(ValueError, match=">= 0"):
        harvest_counts([1, 1], [-1, 0], [0, 1], max_positions=3)
    with pytest.raises(ValueError, match="integers"):
        harvest_counts([1, 1], [0.5, 0], [0, 1], max_positions=3)
    with pytest.raises(ValueError, match="square"):
        allpairs_curve(np.zeros((2, 3)), np.zeros((2, 3)))
    with pytest.raises(ValueError, match="smoothing"):
        harvest_propensities(np.zeros((3, 3)), np.zeros((3, 3)), smoothing="kde")


# ----------------------------------------------------------------------------------------- on the simulator
def _never_randomized(**overrides: float) -> tuple[np.ndarray, object]:
    cfg = make_config("tiny", seed=7, sessions_per_user=60, randomized_share=0.0, **overrides)
    catalog, _ = generate_catalog(cfg, "/nonexistent")
    log = simulate_over_catalog(catalog, cfg, progress=False)
    return np.arange(len(log)), log


@pytest.mark.parametrize("updates", [0.0, 7.0], ids=["one-ranker", "weekly-ranker-updates"])
def test_simulator_log_without_randomization_falls_back_to_harvesting(updates: float) -> None:
    # Prepare: a tiny marketplace that never randomized
    sessions, log = _never_randomized(ranker_update_days=updates)
    assert not log.randomized.any()  # type: ignore[attr-defined]
    # Execute
    eta, props, info = estimate_from_log(log, sessions)  # type: ignore[arg-type]
    # Assert: the simulator's true curve is (1 / (k + 1)) ** 1
    assert info["estimator"] == "harvest"
    truth = power_law_propensities(1.0, len(props))
    assert abs(eta - 1.0) < 0.15
    assert np.max(np.abs(props[:10] - truth[:10])) < 0.05
    raw = np.array([np.nan if v is None else v for v in info["allpairs_curve"]])
    assert np.max(np.abs(raw[:5] - truth[:5])) < 0.08  # a small log: the raw curve is noisier
    with pytest.raises(ValueError, match="no randomized sessions"):
        estimate_from_log(log, sessions, "randomized")  # type: ignore[arg-type]


def test_auto_uses_randomized_sessions_when_there_are_some() -> None:
    cfg = make_config("tiny", seed=7)
    catalog, _ = generate_catalog(cfg, "/nonexistent")
    log = simulate_over_catalog(catalog, cfg, progress=False)
    sessions = np.arange(len(log))
    assert estimate_from_log(log, sessions)[2]["estimator"] == "randomized"
    assert estimate_from_log(log, sessions, "harvest")[2]["estimator"] == "harvest"
    with pytest.raises(ValueError, match="estimator"):
        estimate_from_log(log, sessions, "kde")


def test_ranker_updates_vary_the_production_order_by_version() -> None:
    base = make_config("tiny", seed=7)
    updated = make_config("tiny", seed=7, ranker_update_days=7.0)
    days = np.array([0.5, 3.0, 8.0, 13.9, 30.0])
    tw, pw = ranker_multipliers(base, days)
    np.testing.assert_array_equal(tw, np.ones(5))  # off by default: one fixed ranker
    tw, pw = ranker_multipliers(updated, days)
    assert tw[0] == tw[1] and pw[0] == pw[1]  # same week, same version
    assert tw[1] != tw[2] and tw[2] == tw[3] and tw[3] != tw[4]
    tw_alone, _ = ranker_multipliers(updated, days[2:3])  # a version's weights do not depend on the batch
    assert tw_alone[0] == tw[2]
    catalog, _ = generate_catalog(base, "/nonexistent")
    a = simulate_over_catalog(catalog, base, progress=False)
    b = simulate_over_catalog(catalog, updated, progress=False)
    assert a.query.tolist() == b.query.tolist()  # same intents, queries and slates: only the ranker changed
    np.testing.assert_array_equal(a.offsets, b.offsets)
    sid = np.repeat(np.arange(len(a)), np.diff(a.offsets))
    np.testing.assert_array_equal(a.items[np.lexsort((a.items, sid))], b.items[np.lexsort((b.items, sid))])
    assert not np.array_equal(a.prod_rank, b.prod_rank)
