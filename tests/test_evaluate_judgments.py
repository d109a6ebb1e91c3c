"""`fedrank evaluate --catalog --judgments`: a catalog without images, BM25, cosine and a head."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from sklearn.metrics import ndcg_score

from fedrank.cli import main
from shared_model.catalog_io import CatalogError, load_catalog, load_judgments
from shared_model.checkpoint import save_checkpoint
from shared_model.config import ModelConfig
from shared_model.head import build_head
from simulations.baselines import BM25Ranker
from simulations.centralized import checkpoint_names
from simulations.evaluate import JudgmentsError, evaluate_judgments, judged_sessions, results_bytes

ITEMS = [
    ("a1", "red cotton t-shirt", "tshirt", "red"), ("a2", "blue cotton t-shirt", "tshirt", "blue"),
    ("a3", "red leather handbag", "handbag", "red"), ("a4", "ceramic coffee mug", "mug", "white"),
    ("a5", "crimson summer dress", "dress", "red"), ("a6", "green running sneakers", "sneakers", "green"),
]


@pytest.fixture
def files(tmp_path: Path) -> tuple[Path, Path]:
    cat = tmp_path / "catalog.csv"
    rows = ["item_id,title,description,category,brand,color,price,rating,image_path,video_frames"]
    rows += [f"{i},{t},,{c},acme,{col},{10 + k},4.0,," for k, (i, t, c, col) in enumerate(ITEMS)]
    cat.write_text("\n".join(rows) + "\n")
    judg = tmp_path / "judgments.csv"
    judg.write_text("query,item_id,grade\nred t-shirt,a1,3\nred t-shirt,a2,1\nred t-shirt,a3,0\nred t-shirt,a4,0\n"
                    "coffee mug,a4,3\ncoffee mug,a1,0\ncoffee mug,a6,0\n")
    return cat, judg


def test_ranks_with_bm25_cosine_and_a_head(files: tuple[Path, Path], tmp_path: Path) -> None:
    # Prepare
    cat, judg = files
    ckpt = save_checkpoint(tmp_path / "myhead.pt", build_head(ModelConfig(), seed=0))
    out = tmp_path / "eval"
    # Execute
    rc = main(["evaluate", "--catalog", str(cat), "--judgments", str(judg), "--checkpoint", str(ckpt),
               "--out", str(out)])
    # Assert
    assert rc == 0
    res = json.loads((out / "results.json").read_text())
    assert set(res["rankers"]) == {"bm25", "cosine", "myhead"}
    assert res["num_queries"] == 2 and res["items_with_image"] == 0
    # both queries have their exact match ranked first by the lexical and embedding baselines
    assert res["rankers"]["bm25"]["mrr"] == pytest.approx(1.0)
    assert res["rankers"]["cosine"]["mrr"] == pytest.approx(1.0)
    assert 0.0 < res["rankers"]["myhead"]["ndcg@10"] <= 1.0


def test_unknown_item_in_judgments_names_the_line(files: tuple[Path, Path], tmp_path: Path) -> None:
    cat, judg = files
    judg.write_text("query,item_id,grade\nred t-shirt,a1,3\nred t-shirt,zz9,1\n")
    with pytest.raises(JudgmentsError, match="zz9"):
        evaluate_judgments(cat, judg, {}, tmp_path / "eval", progress=False)


# ---------------------------------------------------------------- real judgment shapes, strict JSON, unique names
def _strict_json(path: Path) -> dict[str, Any]:
    """``results.json`` parsed as strict JSON: ``NaN``/``Infinity`` are errors, not values."""
    def refuse(name: str) -> None:
        raise AssertionError(f"{path} holds the non-JSON constant {name}")

    out: dict[str, Any] = json.loads(path.read_text(), parse_constant=refuse)
    return out


def _sklearn_mean_ndcg(cat: Path, judg: Path, gain: Callable[[np.ndarray], np.ndarray]) -> float:
    """Mean sklearn ``ndcg_score@10`` of BM25 over the judged queries that have a positive gain."""
    catalog = load_catalog(cat)
    bm25 = BM25Ranker([it.text() for it in catalog.items])
    by_query: dict[str, list[tuple[int, float]]] = {}
    for q, item, g in load_judgments(judg):
        by_query.setdefault(q, []).append((catalog.row(item), g))
    values = []
    for q, pairs in by_query.items():
        rows = np.array([r for r, _ in pairs])
        gains = gain(np.array([g for _, g in pairs]))
        if gains.max() > 0:
            values.append(ndcg_score(gains[None, :], bm25.corpus_scores(q)[rows][None, :], k=10))
    return float(np.mean(values))


DECIMAL = ("query,item_id,grade\nred t-shirt,a1,2.67\nred t-shirt,a2,1.33\nred t-shirt,a3,0.33\nred t-shirt,a5,1.5\n"
           "red t-shirt,a4,0\ncoffee mug,a4,3\ncoffee mug,a1,0.67\ncoffee mug,a6,0\n")


def test_decimal_grades_and_two_last_checkpoints(files: tuple[Path, Path], tmp_path: Path) -> None:
    # Prepare: averaged annotator grades; two runs that both saved last.pt
    cat, judg = files
    judg.write_text(DECIMAL)
    ckpts = [save_checkpoint(tmp_path / run / "last.pt", build_head(ModelConfig(), seed=s))
             for s, run in enumerate(["run1", "run2"])]
    out = tmp_path / "eval"
    # Execute
    rc = main(["evaluate", "--catalog", str(cat), "--judgments", str(judg), "--checkpoint", str(ckpts[0]),
               "--checkpoint", str(ckpts[1]), "--gain", "linear", "--out", str(out)])
    # Assert
    assert rc == 0
    res = _strict_json(out / "results.json")
    assert set(res["rankers"]) == {"bm25", "cosine", "run1/last", "run2/last"}
    assert res["checkpoints"] == {"run1/last": str(ckpts[0]), "run2/last": str(ckpts[1])}
    assert res["gain"] == {"name": "linear", "formula": "grade"}
    assert res["grades"] == {"min": 0.0, "max": 3.0, "top": 3.0, "top_from": "largest grade judged", "decimal": True}
    assert res["label_map"]["source"] == "default (ESCI)" and res["label_map"]["labels_seen"] == {}
    assert res["rankers"]["bm25"]["ndcg@10"] == pytest.approx(_sklearn_mean_ndcg(cat, judg, lambda g: g))


def test_exp2_gain_on_decimal_grades_matches_sklearn(files: tuple[Path, Path], tmp_path: Path) -> None:
    cat, judg = files
    judg.write_text(DECIMAL)
    res = evaluate_judgments(cat, judg, {}, tmp_path / "eval", progress=False, gain="exp2")
    expected = _sklearn_mean_ndcg(cat, judg, lambda g: np.exp2(g) - 1.0)
    assert res["rankers"]["bm25"]["ndcg@10"] == pytest.approx(expected)
    assert res["gain"]["formula"] == "2**grade - 1"
    # MRR looks for the top grade (3): only "coffee mug" has one; recall counts grades >= 1.5
    assert res["queries_counted"] == {"ndcg@10": 2, "mrr": 1, "recall@10": 2}
    assert res["queries_excluded"] == {"ndcg@10": 0, "mrr": 1, "recall@10": 0}


def test_esci_file_with_a_label_map_on_the_command_line(files: tuple[Path, Path], tmp_path: Path) -> None:
    # Prepare: ESCI's own columns and labels; the KDD Cup 2022 gains
    cat, judg = files
    judg.write_text("query_id,query,product_id,esci_label\n1,red t-shirt,a1,E\n1,red t-shirt,a2,S\n"
                    "1,red t-shirt,a3,C\n1,red t-shirt,a4,I\n2,coffee mug,a4,e\n2,coffee mug,a1,i\n")
    out = tmp_path / "eval"
    # Execute
    rc = main(["evaluate", "--catalog", str(cat), "--judgments", str(judg), "--out", str(out),
               "--label-map", "E=1,S=0.1,C=0.01,I=0", "--gain", "linear"])
    # Assert
    assert rc == 0
    res = _strict_json(out / "results.json")
    assert res["label_map"] == {"source": "--label-map E=1,S=0.1,C=0.01,I=0",
                                "grades": {"E": 1.0, "S": 0.1, "C": 0.01, "I": 0.0},
                                "labels_seen": {"E": 1, "S": 1, "C": 1, "I": 1, "e": 1, "i": 1}}
    assert res["grades"]["top"] == 1.0 and res["num_judgments"] == 6


def test_unknown_label_is_a_named_error(files: tuple[Path, Path], tmp_path: Path) -> None:
    cat, judg = files
    judg.write_text("query,product_id,esci_label\nred t-shirt,a1,E\nred t-shirt,a2,X\n")
    with pytest.raises(CatalogError, match=r"judgments\.csv:3: field 'esci_label': not a grade: 'X'"):
        evaluate_judgments(cat, judg, {}, tmp_path / "eval", progress=False)


def test_no_relevant_item_gives_null_and_counts(files: tuple[Path, Path], tmp_path: Path) -> None:
    # Prepare: every judged item irrelevant: no metric is defined for any query
    cat, judg = files
    judg.write_text("query,item_id,grade\nred t-shirt,a1,0\nred t-shirt,a2,0\ncoffee mug,a4,0\n")
    out = tmp_path / "eval"
    # Execute
    rc = main(["evaluate", "--catalog", str(cat), "--judgments", str(judg), "--out", str(out)])
    # Assert
    assert rc == 0
    res = _strict_json(out / "results.json")
    assert res["rankers"]["bm25"] == {"ndcg@10": None, "mrr": None, "recall@10": None}
    assert res["queries_excluded"] == {"ndcg@10": 2, "mrr": 2, "recall@10": 2}


def test_queries_without_words_and_an_emoji_catalog(tmp_path: Path) -> None:
    # Prepare: titles of emoji only; queries BM25's analyzer reduces to nothing
    cat = tmp_path / "emoji.csv"
    cat.write_text("item_id,title\ne1,😀😀\ne2,🎉\ne3,👗👠\n", encoding="utf-8")
    judg = tmp_path / "j.csv"
    judg.write_text("query,item_id,grade\nthe,e1,2\nthe,e2,0\n!!!,e3,1\n!!!,e1,0\n😀,e1,3\n😀,e3,0\n",
                    encoding="utf-8")
    ckpt = save_checkpoint(tmp_path / "head.pt", build_head(ModelConfig(), seed=0))
    out = tmp_path / "eval"
    # Execute
    rc = main(["evaluate", "--catalog", str(cat), "--judgments", str(judg), "--checkpoint", str(ckpt),
               "--out", str(out)])
    # Assert
    assert rc == 0
    res = _strict_json(out / "results.json")
    assert set(res["rankers"]) == {"bm25", "cosine", "head"} and res["num_queries"] == 3
    assert res["rankers"]["bm25"]["ndcg@10"] is not None


def test_a_tied_first_stage_gives_tied_ranks(files: tuple[Path, Path]) -> None:
    # Prepare: "the" has no searchable word, so BM25 ties every candidate
    cat, _ = files
    catalog = load_catalog(cat)
    bm25 = BM25Ranker([it.text() for it in catalog.items])
    judgments = [("the", "a1", 3.0), ("the", "a2", 0.0), ("the", "a3", 1.0), ("red t-shirt", "a1", 3.0),
                 ("red t-shirt", "a3", 1.0), ("red t-shirt", "a4", 0.0)]
    # Execute
    log = judged_sessions(catalog, judgments, "j.csv", bm25)
    # Assert: the head sees no order nobody produced
    the = log.slate(log.queries.index("the"))
    assert log.prod_rank[the].tolist() == [0, 0, 0] and log.retrieval_score[the].tolist() == [0, 0, 0]
    red = log.slate(log.queries.index("red t-shirt"))
    assert log.prod_rank[red].tolist()[0] == 0 and log.retrieval_score[red][0] > 0
    assert log.grades.dtype == np.float32


def test_checkpoint_names_are_shortest_unique_suffixes(tmp_path: Path) -> None:
    assert checkpoint_names(["runs/central/head.pt"]) == {"head": "runs/central/head.pt"}
    assert list(checkpoint_names(["a/run1/last.pt", "b/run2/last.pt"])) == ["run1/last", "run2/last"]
    assert list(checkpoint_names(["a/x/last.pt", "b/y/last.pt", "c/y/last.pt"])) == ["x/last", "b/y/last",
                                                                                      "c/y/last"]
    assert list(checkpoint_names(["x/bm25.pt", "y/cosine.pt"])) == ["x/bm25", "y/cosine"]
    assert list(checkpoint_names(["a/head.pt", "a/head.ckpt"])) == ["head.pt", "head.ckpt"]
    with pytest.raises(ValueError, match="given twice"):
        checkpoint_names(["a/head.pt", "./a/head.pt"])


def test_results_bytes_is_strict_json() -> None:
    data = results_bytes({"a": float("nan"), "b": [np.float32("inf"), 1.5], "c": {"d": np.float64(2.0)}})
    assert json.loads(data) == {"a": None, "b": [None, 1.5], "c": {"d": 2.0}}
