"""Click metrics and counterfactual estimates (simulations/log_eval.py) against independent references, and the
held-out evaluation of a data folder (simulations/evaluate.py: evaluate_data)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from sklearn.metrics import ndcg_score

from shared_model.config import ModelConfig
from shared_model.head import build_head
from shared_model.training import ranking_metrics
from simulations.evaluate import evaluate_data, print_data_table, results_bytes
from simulations.log_eval import (
    CLICK_MRR,
    CLICK_NDCG10,
    IPS_CLICKS10,
    SNIPS_CLICKS10,
    Bootstrap,
    click_labels,
    click_metrics,
    click_statistics,
)
from tests.synthetic import synthetic_prepared

P = 1.0 / (np.arange(30) + 1.0) ** 0.8  # examination by position


def _fixture(seed: int = 0, n: int = 40, s: int = 15) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    lens = rng.integers(3, s + 1, n)
    mask = np.arange(s)[None, :] < lens[:, None]
    clicks = (rng.random((n, s)) < 0.25) & mask
    purchases = clicks & (rng.random((n, s)) < 0.3)
    clicks[0] = False  # a list without a click
    purchases[0] = False
    return {"scores": rng.normal(size=(n, s)), "clicks": clicks.astype(float), "purchases": purchases.astype(float),
            "positions": np.broadcast_to(np.arange(s), (n, s)).copy(), "mask": mask}


def _ref_ips(f: dict[str, np.ndarray], k: int, clip: float, normalise: bool) -> float:
    """Loop reference: each click counts p[new rank] / p[logged position] (clipped) when new rank < k."""
    total, weights, n_clicks = 0.0, 0.0, 0.0
    for i in range(len(f["scores"])):
        real = np.flatnonzero(f["mask"][i])
        order = real[np.argsort(-f["scores"][i][real])]
        rank = {int(j): r for r, j in enumerate(order)}
        for j in real:
            if f["clicks"][i, j]:
                w = min(1.0 / P[f["positions"][i, j]], clip)
                weights += w
                n_clicks += 1
                if rank[int(j)] < k:
                    total += P[rank[int(j)]] * w
    n = len(f["scores"])
    return total / weights * n_clicks / n if normalise else total / n


def test_click_ndcg_matches_sklearn_with_purchase_2_click_1() -> None:
    # Prepare
    f = _fixture()
    labels = click_labels(f["clicks"], f["purchases"])
    # Execute
    st = click_statistics(f["scores"], f["clicks"], f["purchases"], f["positions"], f["mask"], P)
    # Assert: sklearn per list over the real items (it uses y_true as the gain: linear)
    for i in range(len(labels)):
        m = f["mask"][i]
        if labels[i][m].sum() == 0:
            assert np.isnan(st.click_ndcg[i])
            continue
        ref = ndcg_score(labels[i][m][None, :], f["scores"][i][m][None, :], k=10)
        assert st.click_ndcg[i] == pytest.approx(ref, abs=1e-12)


def test_click_ndcg_with_ties_matches_sklearn() -> None:
    # Prepare: integer scores, many ties (sklearn averages tied gains like the metrics here)
    f = _fixture(seed=3)
    f["scores"] = np.round(f["scores"])
    labels = click_labels(f["clicks"], f["purchases"])
    # Execute
    st = click_statistics(f["scores"], f["clicks"], f["purchases"], f["positions"], f["mask"], P)
    # Assert
    for i in np.flatnonzero(~np.isnan(st.click_ndcg)):
        m = f["mask"][i]
        assert st.click_ndcg[i] == pytest.approx(ndcg_score(labels[i][m][None], f["scores"][i][m][None], k=10))


def test_click_mrr_is_the_reciprocal_rank_of_the_best_ranked_click() -> None:
    # Prepare
    f = _fixture(seed=1)
    # Execute
    st = click_statistics(f["scores"], f["clicks"], f["purchases"], f["positions"], f["mask"], P)
    # Assert
    for i in range(len(f["scores"])):
        m = f["mask"][i]
        order = np.argsort(-f["scores"][i][m])
        hit = np.flatnonzero((f["clicks"][i][m] + f["purchases"][i][m])[order] > 0)
        if len(hit) == 0:
            assert np.isnan(st.click_mrr[i])
        else:
            assert st.click_mrr[i] == pytest.approx(1.0 / (hit[0] + 1))


@pytest.mark.parametrize("clip", [1e9, 3.0])
@pytest.mark.parametrize("normalise", [False, True])
def test_ips_and_snips_match_a_loop_reference(clip: float, normalise: bool) -> None:
    # Prepare
    f = _fixture(seed=2)
    # Execute
    st = click_statistics(f["scores"], f["clicks"], f["purchases"], f["positions"], f["mask"], P, k=5, clip=clip)
    point, _ = click_metrics(st)
    # Assert
    assert point[SNIPS_CLICKS10 if normalise else IPS_CLICKS10] == pytest.approx(_ref_ips(f, 5, clip, normalise))


def test_ips_of_the_logging_order_is_the_logged_clicks_in_the_top_k() -> None:
    # Prepare: the production order is the display order
    f = _fixture(seed=4)
    production = -f["positions"].astype(float)
    # Execute
    st = click_statistics(production, f["clicks"], f["purchases"], f["positions"], f["mask"], P, k=10, clip=1e9)
    point, _ = click_metrics(st)
    # Assert
    logged = (f["clicks"][:, :10] * f["mask"][:, :10]).sum() / len(f["clicks"])
    assert point[IPS_CLICKS10] == pytest.approx(logged)


def test_tied_scores_average_the_examination_over_the_tied_positions() -> None:
    # Prepare: one list, a constant scorer, a click at display position 2 of 4
    clicks = np.array([[0.0, 0, 1, 0]])
    # Execute
    st = click_statistics(np.zeros((1, 4)), clicks, np.zeros((1, 4)), np.arange(4)[None], np.ones((1, 4), bool), P,
                          k=10, clip=1e9)
    # Assert
    assert st.ips[0] == pytest.approx(P[:4].mean() / P[2])


def test_bootstrap_intervals_are_a_numpy_percentile_bootstrap() -> None:
    # Prepare
    f = _fixture(seed=5, n=60)
    st = click_statistics(f["scores"], f["clicks"], f["purchases"], f["positions"], f["mask"], P)
    boot = Bootstrap(resamples=300, seed=7)
    # Execute
    point, ci = click_metrics(st, boot)
    # Assert: the same resamples drawn by hand
    idx = np.random.default_rng(7).integers(0, 60, size=(300, 60))
    means = [np.nanmean(st.click_mrr[r]) for r in idx]
    assert ci[CLICK_MRR] == pytest.approx([np.quantile(means, 0.025), np.quantile(means, 0.975)])
    ips = [st.ips[r].mean() for r in idx]
    assert ci[IPS_CLICKS10] == pytest.approx([np.quantile(ips, 0.025), np.quantile(ips, 0.975)])
    for k in (CLICK_MRR, CLICK_NDCG10, IPS_CLICKS10, SNIPS_CLICKS10):
        assert ci[k][0] <= point[k] <= ci[k][1]


def test_evaluate_data_reports_graded_and_click_metrics(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Prepare
    monkeypatch.setenv("COLUMNS", "200")  # rich's table width
    prep = synthetic_prepared(tmp_path)
    head = build_head(ModelConfig(), seed=0)
    # Execute
    res = evaluate_data(prep, {"head": head}, {"head": "x/head.pt"}, Bootstrap(resamples=50))
    print_data_table("held-out", res)
    # Assert
    assert list(res["rankers"]) == ["production order", "bm25", "cosine", "head"]
    assert res["graded"] and res["num_test_sessions"] == len(prep.test_idx)
    test = prep.slates("test")
    prod = res["rankers"]["production order"]
    assert prod["ndcg@10"] == pytest.approx(ranking_metrics(-test.slate_dense[..., 0].numpy(), test)["ndcg@10"])
    logged = (test.clicks.numpy()[:, :10]).sum() / len(test)  # propensities 1/(k+1): the clip (20) never binds
    assert prod[IPS_CLICKS10] == pytest.approx(logged)
    for name, row in res["rankers"].items():
        assert set(res["ci95"][name]) == set(row)
    assert json.loads(results_bytes(res))["checkpoints"] == {"head": "x/head.pt"}
    out = capsys.readouterr().out
    assert "snips" in out and "production order" in out and "±" in out


def test_evaluate_data_without_grades_reports_click_metrics_only(tmp_path: Path) -> None:
    # Prepare: a shop's log: no grades
    prep = synthetic_prepared(tmp_path)
    prep.log.grades[:] = 0
    # Execute
    res = evaluate_data(prep, {}, boot=Bootstrap(resamples=20))
    # Assert
    assert not res["graded"]
    assert set(res["rankers"]["bm25"]) == {CLICK_MRR, CLICK_NDCG10, IPS_CLICKS10, SNIPS_CLICKS10}
    json.loads(results_bytes(res))  # strict JSON
