"""`fedrank evaluate --catalog --judgments`: a catalog without images, BM25, cosine and a head."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from fedrank.cli import main
from shared_model.checkpoint import save_checkpoint
from shared_model.config import ModelConfig
from shared_model.head import build_head
from simulations.evaluate import JudgmentsError, evaluate_judgments

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
