"""`fedrank evaluate --judgments` with LightGBM LambdaRank: trained on a data folder's clicks (``--ltr-data``) and on
the judged queries themselves (``--ltr-judgments``, scored on held-out queries only, beside every other ranker).

The reported figures are checked against an independent path: the saved LightGBM model's ``Booster.predict`` on
the feature matrix, and sklearn's ``ndcg_score`` on the judged slates."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import lightgbm as lgb
import numpy as np
import pytest
from sklearn.metrics import ndcg_score

import simulations.evaluate as evaluate_mod
from fedrank.cli import main
from shared_model.catalog_io import load_catalog, load_judgments, save_catalog_jsonl
from shared_model.data import build_slates
from shared_model.embedding_cache import feature_cache_dir
from shared_model.features import build_feature_store, encode_queries
from shared_model.prepared import Prepared
from simulations.baselines import BM25Ranker
from simulations.evaluate import LTR_CLICKS, LTR_JUDGED, JudgmentsError, evaluate_judgments, judged_sessions
from simulations.judged_training import split_queries
from simulations.ltr import (
    ItemProjection,
    LtrConfig,
    candidate_features,
    gain_labels,
    grade_gains,
    judged_config,
)
from tests.synthetic import synthetic_prepared

SMALL = LtrConfig(image_components=2, video_components=1, min_data_in_leaf=5, max_rounds=60, early_stopping=20,
                  num_threads=1)
COLORS = ("red", "blue", "green", "black", "white")
KINDS = ("shirt", "dress", "mug", "sneakers", "handbag", "hat", "jeans", "lamp")


@pytest.fixture(scope="module")
def judged(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """40 items (a colour x a kind, a seeded rating) and 40 queries "colour kind", each judging the 5 items of its
    kind and 3 others: the kind's items 3 when rated >= 4, else 2 in the query's colour and 1 in another; other kinds
    0 (BM25 cannot see the rating; a ranker with the dense features can)."""
    folder = tmp_path_factory.mktemp("judged_ltr")
    rng = np.random.default_rng(7)
    items = [(f"x{c}{k}", color, kind, int(rng.integers(1, 6)))
             for c, color in enumerate(COLORS) for k, kind in enumerate(KINDS)]
    rows = ["item_id,title,description,category,brand,color,price,rating,image_path,video_frames"]
    rows += [f"{i},{color} {kind},,{kind},acme,{color},{20 + 3 * n},{r},," for n, (i, color, kind, r) in enumerate(items)]
    cat = folder / "catalog.csv"
    cat.write_text("\n".join(rows) + "\n")
    lines = ["query,item_id,grade"]
    for color in COLORS:
        for kind in KINDS:
            same = [it for it in items if it[2] == kind]
            others = [items[int(j)] for j in rng.choice(len(items), 12, replace=False) if items[int(j)][2] != kind][:3]
            for i, c2, _, r in same:
                lines.append(f"{color} {kind},{i},{3 if r >= 4 else 2 if c2 == color else 1}")
            lines += [f"{color} {kind},{it[0]},0" for it in others]
    judg = folder / "judgments.csv"
    judg.write_text("\n".join(lines) + "\n")
    return cat, judg


@pytest.fixture(scope="module")
def clicks(tmp_path_factory: pytest.TempPathFactory) -> Prepared:
    return synthetic_prepared(tmp_path_factory.mktemp("clicks"), num_items=80, num_users=20, sessions_per_user=8)


def _independent_ndcg(cat: Path, judg: Path, model_file: Path, queries: np.ndarray | None = None) -> float:
    """Mean sklearn NDCG@10 (gain 2**g - 1, queries with a positive grade) of the saved model's
    ``Booster.predict`` on the candidate features of the judged slates (``queries``: indices; default all)."""
    d = json.loads(model_file.read_text())
    booster = lgb.Booster(model_str=d["model"])
    proj = ItemProjection(**{k: np.asarray(v, np.float64) for k, v in d["projection"].items()})
    catalog = load_catalog(cat)
    bm25 = BM25Ranker([it.text() for it in catalog.items])
    sessions = judged_sessions(catalog, load_judgments(judg), str(judg), bm25)
    store = build_feature_store(catalog, feature_cache_dir(cat), progress=False)
    qemb = encode_queries(sessions.queries, feature_cache_dir(cat), progress=False)
    slates = build_slates(sessions, qemb, np.array([it.price for it in catalog.items], np.float64))
    idx = np.arange(len(sessions)) if queries is None else queries
    slates = slates.select(idx)
    x = candidate_features(slates, [sessions.queries[i] for i in idx], store, bm25, proj)  # [N, S, F]
    valid = slates.valid.numpy()
    grades = slates.grades.numpy().astype(np.float64)
    per = []
    for n in range(len(idx)):
        g = grades[n, valid[n]]
        if (g > 0).any():
            pred = booster.predict(x[n, valid[n]], num_iteration=d["best_iteration"])
            per.append(ndcg_score([np.exp2(g) - 1.0], [pred], k=10))
    return float(np.mean(per))


def test_lightgbm_rows_match_booster_predict_and_sklearn(judged: tuple[Path, Path], clicks: Prepared,
                                                        tmp_path: Path) -> None:
    # Prepare
    cat, judg = judged
    out = tmp_path / "eval"
    # Execute
    res = evaluate_judgments(cat, judg, {}, out, progress=False, ltr_data=clicks, ltr_judgments=split_queries,
                             ltr_config=SMALL, seed=0)
    # Assert: LightGBM on clicks scores every query, beside the baselines; LightGBM on judgments only held out
    assert list(res["rankers"]) == ["bm25", "cosine", LTR_CLICKS]
    held = res["held_out"]
    assert list(held["rankers"]) == ["bm25", "cosine", LTR_CLICKS, LTR_JUDGED]
    split = split_queries(sorted({q for q, _, _ in load_judgments(judg)}), 0)
    assert held["num_queries"] == len(split["test"]) == held["split"]["queries"]["test"] > 0
    assert held["split"]["by"] == "simulations.judged_training.split_queries"
    for rows in (res["rankers"], held["rankers"]):
        for name, m in rows.items():
            assert all(np.isfinite(v) and 0.0 <= v <= 1.0 for v in m.values()), name
    assert res["rankers"][LTR_CLICKS] != res["rankers"]["bm25"]
    assert held["rankers"][LTR_JUDGED] != held["rankers"]["bm25"]
    # the figures, recomputed from the saved models by Booster.predict and sklearn
    clicks_file, judged_file = out / res["lightgbm"][LTR_CLICKS]["model"], out / res["lightgbm"][LTR_JUDGED]["model"]
    assert res["rankers"][LTR_CLICKS]["ndcg@10"] == pytest.approx(_independent_ndcg(cat, judg, clicks_file), abs=1e-6)
    assert held["rankers"][LTR_JUDGED]["ndcg@10"] == pytest.approx(
        _independent_ndcg(cat, judg, judged_file, split["test"]), abs=1e-6)
    assert held["rankers"][LTR_CLICKS]["ndcg@10"] == pytest.approx(
        _independent_ndcg(cat, judg, clicks_file, split["test"]), abs=1e-6)
    assert json.loads((out / "results.json").read_text())["held_out"] == held


def test_judged_lightgbm_learns_what_bm25_cannot_see(judged: tuple[Path, Path], tmp_path: Path) -> None:
    # Execute: within a kind, grades follow the rating, which BM25 ignores
    res = evaluate_judgments(*judged, {}, tmp_path, progress=False, ltr_judgments=split_queries, ltr_config=SMALL)
    # Assert
    held = res["held_out"]["rankers"]
    assert held[LTR_JUDGED]["ndcg@10"] > held["bm25"]["ndcg@10"] + 0.05
    assert res["lightgbm"][LTR_JUDGED]["best_iteration"] >= 1
    assert LTR_JUDGED not in res["rankers"]


def test_cli_ltr_data_and_ltr_judgments(judged: tuple[Path, Path], clicks: Prepared, tmp_path: Path) -> None:
    # Prepare: the synthetic click log as a data folder `prepare` reads (its titles are embedded for real)
    data = tmp_path / "data"
    data.mkdir()
    save_catalog_jsonl(clicks.catalog, data / "catalog.jsonl")
    clicks.log.save(data / "sessions.npz")
    cat, judg = judged
    out = tmp_path / "eval"
    # Execute
    rc = main(["evaluate", "--catalog", str(cat), "--judgments", str(judg), "--ltr-data", str(data),
               "--ltr-judgments", "--seed", "1", "--out", str(out)])
    # Assert
    assert rc == 0
    res = json.loads((out / "results.json").read_text())
    assert LTR_CLICKS in res["rankers"] and LTR_JUDGED in res["held_out"]["rankers"]
    assert res["held_out"]["split"]["seed"] == 1
    assert res["lightgbm"][LTR_CLICKS]["config"]["seed"] == 1
    assert (out / res["lightgbm"][LTR_CLICKS]["model"]).is_file()


def test_ltr_flags_without_judgments_are_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rc = main(["evaluate", "--data", str(tmp_path), "--ltr-judgments"])
    assert rc == 2 and "--ltr-judgments" in capsys.readouterr().err


def test_too_few_queries_for_a_split_is_a_named_error(judged: tuple[Path, Path], tmp_path: Path) -> None:
    cat, _ = judged
    judg = tmp_path / "two.csv"
    judg.write_text("query,item_id,grade\nred shirt,x00,3\nred shirt,x01,0\nblue mug,x12,3\nblue mug,x00,0\n")
    with pytest.raises(JudgmentsError, match="at least 3"):
        evaluate_judgments(cat, judg, {}, tmp_path / "eval", progress=False, ltr_judgments=split_queries, ltr_config=SMALL)


def test_without_lightgbm_the_ltr_rows_are_a_named_error(judged: tuple[Path, Path], tmp_path: Path,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(evaluate_mod, "_ltr", None)
    with pytest.raises(JudgmentsError, match="lightgbm"):
        evaluate_judgments(*judged, {}, tmp_path, progress=False, ltr_judgments=split_queries)
    res = evaluate_judgments(*judged, {}, tmp_path, progress=False)  # the rest still runs
    assert list(res["rankers"]) == ["bm25", "cosine"] and "held_out" not in res


def test_a_head_named_like_a_lightgbm_row_is_refused(judged: tuple[Path, Path], tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="baseline's name"):
        evaluate_judgments(*judged, {LTR_CLICKS: None}, tmp_path, progress=False)  # type: ignore[dict-item]


@pytest.mark.parametrize("gain", ["exp2", "linear"])
def test_gain_labels_of_decimal_grades_and_padding(gain: str) -> None:
    # Prepare: decimal grades, a padded slot holding a grade that must not count
    grades = np.array([[0.0, 1.5, 3.0], [2.0, 0.0, 9.0]])
    valid = np.array([[True, True, True], [True, True, False]])
    # Execute
    labels, table = gain_labels(grade_gains(grades, gain), valid)
    # Assert
    expected = np.exp2(grades) - 1.0 if gain == "exp2" else grades
    np.testing.assert_allclose(np.asarray(table)[labels][valid], expected[valid])
    assert table[0] == 0.0 and labels[1, 2] == 0 and len(table) == 4


def test_judged_config_loosens_min_data_in_leaf_for_small_files() -> None:
    base = LtrConfig()
    assert judged_config(base, 60).min_data_in_leaf == 5
    assert judged_config(base, 2000).min_data_in_leaf == 100
    assert judged_config(base, 10**6).min_data_in_leaf == base.min_data_in_leaf
    assert replace(judged_config(base, 60), min_data_in_leaf=base.min_data_in_leaf) == base
