"""Ranking metrics vs sklearn/scipy and brute-force enumeration of tie-breakings; padding and NaN handling."""

from __future__ import annotations

import itertools
import warnings
from collections.abc import Callable

import numpy as np
import pytest
import torch
from scipy.stats import kendalltau
from sklearn.metrics import ndcg_score

from shared_model.metrics import (
    MRR,
    NDCG10,
    RECALL10,
    compute_metrics,
    count_defined,
    kendall_tau,
    mean_ndcg,
    mrr,
    ndcg_at_k,
    recall_at_k,
    summarize,
)


def random_lists(
    seed: int, ties: bool, b: int = 40, n: int = 12
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Scores/grades/mask with random-length lists (>= 2 real items), padding interleaved, junk at padding."""
    rng = np.random.default_rng(seed)
    s = rng.integers(0, 4, size=(b, n)).astype(np.float64) if ties else rng.normal(size=(b, n))
    g = rng.integers(0, 4, size=(b, n)).astype(np.float64)
    m = rng.random((b, n)) < 0.7
    m[:, :2] = True
    g[:, 0] = np.maximum(g[:, 0], 1.0)  # every list has a positive grade
    s = np.where(m, s, rng.choice([1e9, -1e9], size=(b, n)))
    g = np.where(m, g, 3.0)
    return s, g, m


# ----------------------------------------------------------------------------------------------- NDCG
@pytest.mark.parametrize("ties", [False, True])
@pytest.mark.parametrize("k", [1, 3, 5, 10, None])
@pytest.mark.parametrize("gain", ["exp2", "linear"])
def test_ndcg_matches_sklearn(ties: bool, k: int | None, gain: str) -> None:
    s, g, m = random_lists(k or 0, ties)
    got = ndcg_at_k(s, g, m, k=k, gain=gain)
    for i in range(len(s)):
        y_true = g[i][m[i]]
        if gain == "exp2":
            y_true = 2.0**y_true - 1.0
        want = ndcg_score([y_true], [s[i][m[i]]], k=k, ignore_ties=False)
        assert got[i] == pytest.approx(want, abs=1e-12), i


def test_ndcg_ties_average_over_group() -> None:
    # all tied: expected DCG of a random order
    got = ndcg_at_k([[0.0, 0.0]], [[1.0, 0.0]], k=None)[0]
    assert got == pytest.approx(0.5 * (1.0 + 1.0 / np.log2(3.0)))
    # a tie straddling the cutoff k=1: half the gain at rank 0
    assert ndcg_at_k([[1.0, 1.0, 0.0]], [[1.0, 0.0, 0.0]], k=1)[0] == pytest.approx(0.5)


def test_ndcg_nan_and_edge_cases() -> None:
    s = np.array([[0.3, 0.2, 0.1], [0.3, 0.2, 0.1], [0.5, 0.0, 0.0], [1.0, 2.0, 3.0]])
    g = np.array([[0, 0, 0], [0, 0, 3], [2, 0, 0], [3, 0, 0]], dtype=float)
    m = np.array([[1, 1, 1], [1, 1, 0], [1, 0, 0], [0, 0, 0]], dtype=bool)
    got = ndcg_at_k(s, g, m, k=10)
    assert np.isnan(got[0])  # no positive grade
    assert np.isnan(got[1])  # the only positive is padding
    assert got[2] == 1.0  # single real item
    assert np.isnan(got[3])  # empty list
    assert mean_ndcg(s, g, m) == 1.0  # NaN lists skipped, not counted as 0
    assert np.isnan(mean_ndcg(s[[0, 1, 3]], g[[0, 1, 3]], m[[0, 1, 3]]))  # no list with a positive grade
    with pytest.raises(ValueError):
        ndcg_at_k(s, g, m, k=0)
    with pytest.raises(ValueError):
        ndcg_at_k(s, g, m, gain="cubic")
    with pytest.raises(ValueError, match="NaN"):
        ndcg_at_k([[np.nan, 1.0]], [[1.0, 0.0]])
    # NaN on padding is fine
    assert ndcg_at_k([[np.nan, 1.0, 0.5]], [[3.0, 1.0, 0.0]], [[False, True, True]])[0] == 1.0


def test_ndcg_padding_invariance_and_inputs() -> None:
    s, g, m = random_lists(3, ties=True)
    base = ndcg_at_k(s, g, m)
    pad = np.concatenate([s, np.full((len(s), 5), 1e12)], axis=1)
    padg = np.concatenate([g, np.full((len(s), 5), 3.0)], axis=1)
    padm = np.concatenate([m, np.zeros((len(s), 5), dtype=bool)], axis=1)
    np.testing.assert_allclose(ndcg_at_k(pad, padg, padm), base, rtol=1e-13)
    np.testing.assert_allclose(
        ndcg_at_k(torch.tensor(s, requires_grad=True), torch.tensor(g), torch.tensor(m)), base
    )
    # 1-D input is one list; mask=None means all real
    assert ndcg_at_k(s[0][m[0]], g[0][m[0]]).shape == (1,)
    assert ndcg_at_k(s[0][m[0]], g[0][m[0]])[0] == pytest.approx(base[0])
    # infinite scores on real items are fine
    assert ndcg_at_k([[np.inf, -np.inf, 0.0]], [[0.0, 1.0, 0.0]], k=None)[0] == pytest.approx(0.5)


# ----------------------------------------------------------------------------------------------- brute force
def orderings(s: np.ndarray) -> list[tuple[int, ...]]:
    """All orderings of the items consistent with descending scores (the valid tie-breakings)."""
    return [
        p
        for p in itertools.permutations(range(len(s)))
        if all(s[p[i]] >= s[p[i + 1]] for i in range(len(p) - 1))
    ]


def brute(s: np.ndarray, g: np.ndarray, metric: Callable[[np.ndarray], float]) -> tuple[float, float, float]:
    vals = [metric(g[list(p)]) for p in orderings(s)]
    return float(np.mean(vals)), float(np.min(vals)), float(np.max(vals))


def rr(ranked: np.ndarray, threshold: float) -> float:
    hits = np.flatnonzero(ranked >= threshold)
    return 1.0 / (hits[0] + 1.0)


def small_tied_lists(seed: int, b: int = 25, n: int = 6) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    s = rng.integers(0, 3, size=(b, n)).astype(np.float64)
    g = rng.integers(0, 4, size=(b, n)).astype(np.float64)
    m = rng.random((b, n)) < 0.85
    s[0] = 1.0  # fully tied list
    m[0] = True
    return s, g, m


@pytest.mark.parametrize("threshold", [1, 2, 3])
def test_mrr_tie_modes_vs_enumeration(threshold: int) -> None:
    s, g, m = small_tied_lists(threshold)
    got = {t: mrr(s, g, m, threshold=threshold, ties=t) for t in ("average", "pessimistic", "optimistic")}
    for i in range(len(s)):
        si, gi = s[i][m[i]], g[i][m[i]]
        if not (gi >= threshold).any():
            assert all(np.isnan(v[i]) for v in got.values())
            continue
        avg, lo, hi = brute(si, gi, lambda r: rr(r, threshold))
        assert got["average"][i] == pytest.approx(avg, abs=1e-12)
        assert got["pessimistic"][i] == pytest.approx(lo, abs=1e-12)
        assert got["optimistic"][i] == pytest.approx(hi, abs=1e-12)


def test_mrr_examples() -> None:
    assert mrr([[3.0, 2.0, 1.0]], [[0, 0, 1]])[0] == pytest.approx(1 / 3)
    tied = ([[1.0, 1.0, 1.0]], [[0, 1, 0]])
    assert mrr(*tied, ties="average")[0] == pytest.approx((1 + 1 / 2 + 1 / 3) / 3)
    assert mrr(*tied, ties="pessimistic")[0] == pytest.approx(1 / 3)
    assert mrr(*tied, ties="optimistic")[0] == 1.0
    # padding ahead of the relevant item does not count
    assert mrr([[9.0, 1.0]], [[0, 1]], [[False, True]])[0] == 1.0
    assert np.isnan(mrr([[1.0, 2.0]], [[0, 0]])[0])
    with pytest.raises(ValueError):
        mrr([[1.0]], [[1.0]], ties="random")


@pytest.mark.parametrize("k", [1, 2, 4])
def test_recall_vs_enumeration(k: int) -> None:
    s, g, m = small_tied_lists(10 + k)
    got = recall_at_k(s, g, m, k=k, threshold=2)
    for i in range(len(s)):
        si, gi = s[i][m[i]], g[i][m[i]]
        n_rel = (gi >= 2).sum()
        if n_rel == 0:
            assert np.isnan(got[i])
            continue
        def recall(r: np.ndarray, n_rel: int = n_rel) -> float:
            return float((r[:k] >= 2).sum()) / n_rel

        avg, _, _ = brute(si, gi, recall)
        assert got[i] == pytest.approx(avg, abs=1e-12)


def test_recall_examples() -> None:
    s = [[5.0, 4.0, 3.0, 2.0, 1.0]]
    g = [[3, 0, 2, 0, 2]]
    assert recall_at_k(s, g, k=1)[0] == pytest.approx(1 / 3)
    assert recall_at_k(s, g, k=3)[0] == pytest.approx(2 / 3)
    assert recall_at_k(s, g, k=10)[0] == 1.0
    assert recall_at_k([[1.0, 1.0, 0.0]], [[2, 0, 0]], k=1)[0] == pytest.approx(0.5)
    assert np.isnan(recall_at_k(s, [[1, 1, 1, 0, 0]], k=2)[0])


def test_ndcg_matches_enumeration_too() -> None:
    s, g, m = small_tied_lists(7)
    got = ndcg_at_k(s, g, m, k=3)
    for i in range(len(s)):
        si, gi = s[i][m[i]], g[i][m[i]]
        ideal = np.sort(2.0**gi - 1)[::-1][:3]
        idcg = (ideal / np.log2(np.arange(len(ideal)) + 2)).sum()
        if idcg == 0:
            assert np.isnan(got[i])
            continue

        def dcg3(r: np.ndarray, idcg: float = idcg) -> float:
            return float(((2.0 ** r[:3] - 1) / np.log2(np.arange(len(r[:3])) + 2)).sum()) / idcg

        avg, _, _ = brute(si, gi, dcg3)
        assert got[i] == pytest.approx(avg, abs=1e-12)


# ----------------------------------------------------------------------------------------------- Kendall
@pytest.mark.parametrize("ties", [False, True])
def test_kendall_tau_matches_scipy(ties: bool) -> None:
    rng = np.random.default_rng(int(ties))
    b, n = 30, 10
    a = rng.integers(0, 4, size=(b, n)).astype(float) if ties else rng.normal(size=(b, n))
    c = a + rng.normal(scale=1.0, size=(b, n))
    if ties:
        c = np.round(c)
    m = rng.random((b, n)) < 0.8
    m[:, :2] = True
    a = np.where(m, a, 1e6)
    got = kendall_tau(a, c, m)
    for i in range(b):
        want = kendalltau(a[i][m[i]], c[i][m[i]]).statistic
        if np.isnan(want):
            assert np.isnan(got[i])
        else:
            assert got[i] == pytest.approx(want, abs=1e-12)


def test_kendall_tau_edge_cases() -> None:
    got = kendall_tau(
        [[1.0, 2.0, 3.0], [1.0, 1.0, 1.0], [1.0, 2.0, 3.0], [1.0, 2.0, 3.0]],
        [[3.0, 2.0, 1.0], [1.0, 2.0, 3.0], [1.0, 2.0, 3.0], [5.0, 6.0, 7.0]],
        [[1, 1, 1], [1, 1, 1], [1, 0, 0], [1, 1, 1]],
    )
    assert got[0] == -1.0
    assert np.isnan(got[1])  # constant a
    assert np.isnan(got[2])  # one real item
    assert got[3] == 1.0
    assert kendall_tau(np.zeros((0, 4)), np.zeros((0, 4))).shape == (0,)


def test_kendall_tau_chunking(monkeypatch: pytest.MonkeyPatch) -> None:
    import shared_model.metrics as metrics_mod

    rng = np.random.default_rng(0)
    a, c = rng.normal(size=(9, 7)), rng.normal(size=(9, 7))
    full = kendall_tau(a, c)
    monkeypatch.setattr(metrics_mod, "_KENDALL_CHUNK", 2 * 49)
    np.testing.assert_allclose(kendall_tau(a, c), full)


# ----------------------------------------------------------------------------------------------- summary
def test_compute_metrics_and_summarize() -> None:
    s, g, m = random_lists(5, ties=True)
    g[3] = 0.0  # a list without any relevant item
    per_list = compute_metrics(s, g, m)
    assert list(per_list) == [NDCG10, MRR, RECALL10]
    assert all(v.shape == (len(s),) for v in per_list.values())
    assert np.isnan(per_list[NDCG10][3]) and np.isnan(per_list[MRR][3])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        summary = summarize(per_list)
        empty = summarize({"mrr": np.array([np.nan, np.nan]), "x": np.array([])})
    for key, values in per_list.items():
        assert summary[key] == pytest.approx(np.nanmean(values))
        assert isinstance(summary[key], float)
    assert np.isnan(empty["mrr"]) and np.isnan(empty["x"])
    assert list(compute_metrics(s, g, m, k=5)) == ["ndcg@5", MRR, "recall@5"]


def test_shape_errors() -> None:
    with pytest.raises(ValueError):
        ndcg_at_k(np.zeros((2, 3)), np.zeros((2, 4)), None)
    with pytest.raises(ValueError):
        recall_at_k(np.zeros((2, 3)), np.zeros((2, 3)), np.ones((3, 3), dtype=bool))


@pytest.mark.parametrize("gain", ["exp2", "linear"])
def test_ndcg_decimal_grades_match_sklearn(gain: str) -> None:
    # Prepare: averaged annotator grades on 0..3 and on 0..6, with ties in the scores
    rng = np.random.default_rng(7)
    for top in (3, 6):
        g = np.round(rng.integers(0, 3 * top + 1, size=(30, 9)) / 3.0, 2)
        g[:, 0] = np.maximum(g[:, 0], 0.33)
        s = rng.integers(0, 5, size=g.shape).astype(np.float64)
        # Execute
        ours = ndcg_at_k(s, g, k=5, gain=gain)
        # Assert: sklearn uses y_true as the gain
        gains = np.exp2(g) - 1.0 if gain == "exp2" else g
        expected = [ndcg_score(gains[i : i + 1], s[i : i + 1], k=5) for i in range(len(g))]
        np.testing.assert_allclose(ours, expected, rtol=1e-12)


def test_compute_metrics_gain_and_count_defined() -> None:
    s = np.array([[0.9, 0.1, 0.5], [0.3, 0.2, 0.1]])
    g = np.array([[1.5, 3.0, 0.0], [0.0, 0.0, 0.0]])
    per_list = compute_metrics(s, g, mrr_threshold=3, recall_threshold=1.5, gain="linear")
    np.testing.assert_allclose(per_list[NDCG10][:1], ndcg_score(g[:1], s[:1], k=10))
    assert count_defined(per_list) == {NDCG10: 1, MRR: 1, RECALL10: 1}
    assert np.isnan(per_list[NDCG10][1])
