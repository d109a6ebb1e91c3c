"""LightGBM LambdaRank baseline: features against numpy / sklearn references, IPS encoding, determinism, padding,
and that it learns a ranking signal the clicks follow."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import lightgbm as lgb
import numpy as np
import pytest
from sklearn.decomposition import PCA
from synthetic import synthetic_prepared

from shared_model.config import ModelConfig, TrainConfig
from shared_model.data import build_slates
from shared_model.features import FeatureStore
from shared_model.head_features import IMAGE_DIM, ITEM_DENSE_DIM, SLATE_DENSE_DIM, image_gain
from shared_model.prepared import Prepared
from shared_model.schema import SessionLog
from shared_model.training import ranking_metrics
from simulations.baselines import BM25Ranker
from simulations.centralized import run_baselines
from simulations.ltr import (
    ItemProjection,
    LambdaRankRanker,
    LtrConfig,
    candidate_features,
    feature_names,
    fit_prepared,
    ips_gain_encoding,
    score_judged_slates,
    slate_queries,
)

TEXTS = ["red running shoes", "blue denim jeans", "red leather handbag", "blue running shirt", "green wool hat",
         "black running shoes"]
SMALL = LtrConfig(image_components=2, video_components=1, min_data_in_leaf=5, max_rounds=60, early_stopping=20)


def hand_made() -> tuple[FeatureStore, SessionLog, np.ndarray]:
    """Six items (item 2 without image, items 1 and 4 without video), one shopper, two sessions of 3 and 5
    candidates (the first padded), the second seeing the first's click as history."""
    rng = np.random.default_rng(3)
    n = len(TEXTS)
    mask = np.ones((n, 3), bool)
    mask[2, 1] = False
    mask[[1, 4], 2] = False
    image = rng.normal(size=(n, IMAGE_DIM)).astype(np.float32) * mask[:, 1:2]
    video = rng.normal(size=(n, IMAGE_DIM)).astype(np.float32) * mask[:, 2:3]
    store = FeatureStore(item_ids=[f"i{k}" for k in range(n)], text=rng.normal(size=(n, 384)), image=image,
                         video=video, mask=mask, dense=rng.normal(size=(n, ITEM_DENSE_DIM)))
    log = SessionLog(
        user=np.zeros(2, np.int32), query=np.array([0, 1], np.int32), randomized=np.zeros(2, bool),
        timestamp=np.array([0, 1], np.int64), offsets=np.array([0, 3, 8], np.int64),
        items=np.array([0, 2, 4, 5, 3, 1, 0, 2], np.int32), clicks=np.array([0, 1, 0, 1, 0, 0, 0, 0], np.uint8),
        purchases=np.zeros(8, np.uint8), prod_rank=np.array([0, 1, 2, 0, 1, 2, 3, 4], np.int16),
        retrieval_score=rng.normal(size=8).astype(np.float32), grades=np.zeros(8, np.uint8),
        utility=np.zeros(8, np.float32), queries=["red shoes", "running shoes"],
    )
    query_emb = rng.normal(size=(2, 384)).astype(np.float32)
    return store, log, query_emb


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    na, nb = np.linalg.norm(a), np.linalg.norm(b)
    return 0.0 if na == 0 or nb == 0 else float(a @ b / (na * nb))


def test_features_match_numpy_and_sklearn_on_a_hand_made_padded_slate() -> None:
    # Prepare
    store, log, qemb = hand_made()
    slates = build_slates(log, qemb, np.linspace(5.0, 30.0, len(TEXTS)))
    bm25 = BM25Ranker(TEXTS)
    proj = ItemProjection.fit(store, np.arange(len(TEXTS)), SMALL)
    # Execute
    x = candidate_features(slates, log.queries, store, bm25, proj)
    # Assert
    names = feature_names(SMALL)
    col = {name: x[..., k] for k, name in enumerate(names)}
    assert x.shape == (2, 5, len(names)) and x.dtype == np.float32
    np.testing.assert_array_equal(x[0, 3:], 0.0)  # padding
    image = store.image * image_gain(IMAGE_DIM)  # the colour descriptor weighed as the head weighs it
    video = store.video * image_gain(IMAGE_DIM)
    img_ref = PCA(2, svd_solver="full").fit(image[store.mask[:, 1]])
    vid_ref = PCA(1, svd_solver="full").fit(video[store.mask[:, 2]])
    for s, sl in enumerate((slice(0, 3), slice(3, 8))):
        rows = log.items[sl]
        q = log.queries[s]
        np.testing.assert_allclose(col["bm25"][s, : len(rows)], bm25.corpus_scores(q)[rows], rtol=1e-6)
        for j, r in enumerate(rows):
            assert col["query_title_cosine"][s, j] == pytest.approx(cosine(qemb[s], store.text[r]), abs=1e-5)
            np.testing.assert_allclose(x[s, j, 2:2 + ITEM_DENSE_DIM], store.dense[r], rtol=1e-6)
            assert col["has_image"][s, j] == store.mask[r, 1] and col["has_video"][s, j] == store.mask[r, 2]
            pc = [col[f"image_pc{k}"][s, j] for k in range(2)]
            ref = img_ref.transform(image[r:r + 1])[0] if store.mask[r, 1] else np.zeros(2)
            np.testing.assert_allclose(np.abs(pc), np.abs(ref), rtol=1e-4, atol=1e-4)  # PCA up to sign
            vref = vid_ref.transform(video[r:r + 1])[0] if store.mask[r, 2] else np.zeros(1)
            np.testing.assert_allclose(np.abs(col["video_pc0"][s, j]), np.abs(vref[0]), rtol=1e-4, atol=1e-4)
        np.testing.assert_allclose(x[s, : len(rows), 2 + ITEM_DENSE_DIM:2 + ITEM_DENSE_DIM + SLATE_DENSE_DIM],
                                   slates.slate_dense[s, : len(rows)].numpy(), rtol=1e-6)
    # user context: session 0 has no history; session 1's history is the item clicked in session 0 (row 2)
    np.testing.assert_array_equal(col["has_history"][0, :3], 0.0)
    np.testing.assert_array_equal(col["user_text_cosine"][0], 0.0)
    assert (col["has_history"][1] == 1.0).all()
    for j, r in enumerate(log.items[3:8]):
        assert col["user_text_cosine"][1, j] == pytest.approx(cosine(store.text[2], store.text[r]), abs=1e-5)
        assert col["user_image_cosine"][1, j] == 0.0  # the history item has no image


def test_ips_gain_encoding_reference_values() -> None:
    # Prepare: slate 0 one click at position 2; slate 1 a click at 0 and a purchase at 3; slate 2 no click
    labels = np.array([[0, 0, 1, 0], [1, 0, 0, 2], [0, 0, 0, 0]])
    w = np.tile([1.0, 2.0, 4.0, 5.0], (3, 1))
    valid = np.ones((3, 4), bool)
    # Execute
    codes, gains, idcg = ips_gain_encoding(labels, w, valid, truncation=30)
    # Assert
    g = np.asarray(gains)
    assert g[0] == 0.0 and (np.diff(g) > 0).all()
    np.testing.assert_allclose(g[codes], [[0, 0, 4, 0], [1, 0, 0, 15], [0, 0, 0, 0]])
    np.testing.assert_allclose(idcg, [4.0, 15.0 + 1.0 / np.log2(3.0), 0.0])


def test_lightgbm_lambdarank_uses_row_weights_not_only_their_query_mean() -> None:
    # Prepare: two weightings with the same per-query mean; were weights per query only, the models would agree
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(400, 4)), (rng.random(400) < 0.3).astype(int)
    group = np.full(40, 10)
    w1 = np.ones(400)
    w2 = np.tile([1.9, 0.1] * 5, 40)
    params = {"objective": "lambdarank", "verbosity": -1, "deterministic": True, "num_threads": 1, "min_data_in_leaf": 5}
    # Execute
    p1, p2 = (lgb.train(params, lgb.Dataset(x, y, weight=w, group=group), 5).predict(x) for w in (w1, w2))
    # Assert
    assert not np.allclose(p1, p2)


@pytest.fixture(scope="module")
def prep(tmp_path_factory: pytest.TempPathFactory) -> Prepared:
    return synthetic_prepared(tmp_path_factory.mktemp("ltr"), num_items=120, num_users=30, sessions_per_user=10)


@pytest.mark.parametrize("cfg", [SMALL, replace(SMALL, ips="rows"), replace(SMALL, objective="binary", ips="rows")],
                         ids=["lambdarank-ips-gain", "lambdarank-ips-rows", "binary-ips-rows"])
def test_beats_random_and_production_order_when_clicks_follow_a_feature(prep: Prepared, cfg: LtrConfig) -> None:
    # Prepare: synthetic clicks follow grades, which follow the query-title cosine
    test = prep.slates("test")
    bm25 = BM25Ranker([it.text() for it in prep.catalog.items])
    # Execute
    ranker, info = fit_prepared(prep, cfg, val_frac=0.1)
    ndcg = ranking_metrics(ranker.score(test, slate_queries(prep.log, test), prep.store, bm25), test)["ndcg@10"]
    # Assert
    production = ranking_metrics(-test.slate_dense[..., 0].numpy(), test)["ndcg@10"]
    rng = np.random.default_rng(0)
    random = np.mean([ranking_metrics(rng.random(test.items.shape), test)["ndcg@10"] for _ in range(5)])
    assert ndcg > production + 0.05 and ndcg > random + 0.05
    assert 1 <= info["best_iteration"] <= info["rounds_run"] <= cfg.max_rounds


def test_two_fits_give_equal_scores_and_save_load_round_trips(prep: Prepared, tmp_path: Path) -> None:
    # Prepare
    test = prep.slates("test")
    bm25 = BM25Ranker([it.text() for it in prep.catalog.items])
    queries = slate_queries(prep.log, test)
    # Execute
    a, _ = fit_prepared(prep, SMALL, val_frac=0.1)
    b, _ = fit_prepared(prep, SMALL, val_frac=0.1)
    a.save(tmp_path / "ranker.json")
    c = LambdaRankRanker.load(tmp_path / "ranker.json")
    # Assert
    sa = a.score(test, queries, prep.store, bm25)
    np.testing.assert_array_equal(sa, b.score(test, queries, prep.store, bm25))
    np.testing.assert_array_equal(sa, c.score(test, queries, prep.store, bm25))
    np.testing.assert_array_equal(sa, score_judged_slates(c, prep.log, test, prep.store, bm25))


def test_padding_gets_minus_inf_and_does_not_change_real_scores(prep: Prepared) -> None:
    # Prepare: the same sessions padded to 12 (their length) and to 20
    ranker, _ = fit_prepared(prep, SMALL, val_frac=0.1)
    bm25 = BM25Ranker([it.text() for it in prep.catalog.items])
    tight = prep.slates("test")
    wide = build_slates(prep.log, prep.query_emb, prep.prices, sessions=prep.test_idx, max_slate=20)
    # Execute
    s_tight = ranker.score(tight, slate_queries(prep.log, tight), prep.store, bm25)
    s_wide = ranker.score(wide, slate_queries(prep.log, wide), prep.store, bm25)
    # Assert
    assert np.isneginf(s_wide[:, 12:]).all() and np.isfinite(s_tight).all()
    np.testing.assert_array_equal(s_wide[:, :12], s_tight)


def test_unfitted_ranker_and_bad_config_raise() -> None:
    with pytest.raises(ValueError, match="lambdarank"):
        LtrConfig(objective="binary", ips="gain")
    with pytest.raises(ValueError, match="ips must be"):
        LtrConfig(ips="weights")
    store, log, qemb = hand_made()
    with pytest.raises(RuntimeError, match="fit it"):
        LambdaRankRanker().score(build_slates(log, qemb, np.ones(6)), log.queries, store, BM25Ranker(TEXTS))


def test_run_baselines_adds_the_lightgbm_rows_and_files(prep: Prepared, tmp_path: Path) -> None:
    # Execute
    res = run_baselines(prep, tmp_path, ModelConfig(), TrainConfig(), epochs=1, seed=0)
    # Assert
    names = list(res["rankers"])
    ltr = ["lightgbm lambdarank (naive clicks)", "lightgbm lambdarank (IPS clicks)"]
    assert names[:3] == ["production order", "bm25", "cosine"] and names[3:5] == ltr
    assert names[5:] == ["text-only head", "fused head (naive clicks)", "fused head"]
    for name in ltr:
        assert res["training"][name]["seconds"] > 0 and res["training"][name]["config"]["seed"] == 0
        assert 0.0 <= res["rankers"][name]["ndcg@10"] <= 1.0
    ranker = LambdaRankRanker.load(tmp_path / "lightgbm_lambdarank_IPS_clicks.json")
    assert ranker.config.ips == "gain" and ranker.config.ips_clip == TrainConfig().ips_clip
    assert json.loads((tmp_path / "results.json").read_text())["rankers"] == res["rankers"]
