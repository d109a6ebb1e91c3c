"""`fedrank train --catalog C --judgments J`: query-grouped splits, grade labels, FedAvg, the CLI end to end."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from fedrank.cli import main
from shared_model.checkpoint import load_checkpoint
from shared_model.metrics import NDCG10
from simulations.evaluate import GradeScale, judged_metrics
from simulations.judged_training import (
    HEAD,
    fedavg,
    load_judged,
    partition_queries,
    split_queries,
    training_labels,
)

TYPES = ["dress", "sneakers", "handbag", "jacket", "scarf", "watch"]
COLOURS = ["red", "blue", "green", "black", "white"]
FILLER = ["classic", "slim"]


def _write_fixture(root: Path) -> tuple[Path, Path]:
    """60 items (type x colour x 2) and 30 queries ``colour type``: grade 2.5 = both words, 1 = type, 0 = other."""
    rows = ["item_id,title,category,color,price"]
    items: list[tuple[str, str, str]] = []
    for t in TYPES:
        for c in COLOURS:
            for f in FILLER:
                iid = f"{t[:3]}-{c}-{f}"
                items.append((iid, t, c))
                rows.append(f"{iid},{f} {c} {t},{t},{c},{10 + len(items)}")
    cat = root / "catalog.csv"
    cat.write_text("\n".join(rows) + "\n")
    rng = np.random.default_rng(0)
    lines = ["query,item_id,grade"]
    for t in TYPES:
        for c in COLOURS:
            same_type = [i for i in items if i[1] == t]
            others = [items[k] for k in rng.permutation(len(items)) if items[k][1] != t][:6]
            for iid, it, ic in same_type + others:
                g = 2.5 if (it, ic) == (t, c) else 1.0 if it == t else 0.0
                lines.append(f"{c} {t},{iid},{g}")
    judg = root / "judgments.csv"
    judg.write_text("\n".join(lines) + "\n")
    return cat, judg


@pytest.fixture(scope="module")
def fixture_files(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    return _write_fixture(tmp_path_factory.mktemp("judged"))


@pytest.fixture(scope="module")
def trained(fixture_files: tuple[Path, Path], tmp_path_factory: pytest.TempPathFactory) -> tuple[int, Path]:
    cat, judg = fixture_files
    out = tmp_path_factory.mktemp("run") / "out"
    rc = main(["train", "--catalog", str(cat), "--judgments", str(judg), "--out", str(out), "--epochs", "15",
               "--devices", "3", "--rounds", "6", "--loss", "lambdaloss"])
    return rc, out


def _strict(path: Path) -> dict[str, Any]:
    def refuse(name: str) -> None:
        raise AssertionError(f"{path} holds {name}")

    out: dict[str, Any] = json.loads(path.read_text(), parse_constant=refuse)
    return out


# ---------------------------------------------------------------- splits and partitions
def test_split_groups_queries_equal_up_to_case_and_blanks() -> None:
    # Prepare
    queries = [f"query {k}" for k in range(40)] + ["Red Dress", "red  dress", "red dress"]
    # Execute
    split = split_queries(queries, seed=3)
    # Assert: disjoint, complete, and the three spellings in one split
    sets = [set(v.tolist()) for v in split.values()]
    assert sum(len(s) for s in sets) == len(queries) and set.union(*sets) == set(range(len(queries)))
    assert all(not (a & b) for i, a in enumerate(sets) for b in sets[i + 1:])
    assert sum({40, 41, 42} <= s for s in sets) == 1
    assert all(len(s) > 0 for s in sets)


def test_split_is_seeded() -> None:
    queries = [f"q{k}" for k in range(30)]
    a, b, c = split_queries(queries, 1), split_queries(queries, 1), split_queries(queries, 2)
    assert all(np.array_equal(a[k], b[k]) for k in a)
    assert any(not np.array_equal(a[k], c[k]) for k in a)


def test_partition_queries_each_device_its_own_share() -> None:
    train = np.arange(100, 123)
    parts = partition_queries(train, 5, seed=0)
    assert len(parts) == 5 and all(len(p) >= 4 for p in parts)
    assert np.array_equal(np.sort(np.concatenate(parts)), train)
    with pytest.raises(ValueError, match="devices"):
        partition_queries(np.arange(3), 4)


# ---------------------------------------------------------------- labels and aggregation
def test_training_labels_match_the_gain_for_every_loss(fixture_files: tuple[Path, Path]) -> None:
    # Prepare
    cat, judg = fixture_files
    data = load_judged(cat, judg, progress=False)
    grades = data.slates.grades.double()
    valid = data.slates.valid
    # Execute
    soft_exp2 = training_labels(data.slates, "softmax", GradeScale("exp2", 2.5, False)).clicks.double()
    soft_lin = training_labels(data.slates, "softmax", GradeScale("linear", 2.5, False)).clicks.double()
    lam_exp2 = training_labels(data.slates, "lambdaloss", GradeScale("exp2", 2.5, False)).clicks.double()
    lam_lin = training_labels(data.slates, "LambdaLoss", GradeScale("linear", 2.5, False)).clicks.double()
    # Assert: softmax sees the gains; lambdaloss's own 2**y - 1 gives back the gains
    assert torch.allclose(soft_exp2[valid], torch.exp2(grades[valid]) - 1, atol=1e-5)
    assert torch.allclose(soft_lin[valid], grades[valid], atol=1e-5)
    assert torch.allclose(lam_exp2[valid], grades[valid], atol=1e-5)
    assert torch.allclose(torch.exp2(lam_lin[valid]) - 1, grades[valid], atol=1e-5)
    assert float(soft_exp2[~valid].abs().sum()) == 0.0
    assert float(data.slates.clicks.sum()) == 0.0  # the source slates are not changed


def test_fedavg_is_the_weighted_mean_and_keeps_integer_entries() -> None:
    a = {"w": torch.tensor([0.0, 2.0]), "n": torch.tensor(3)}
    b = {"w": torch.tensor([4.0, 6.0]), "n": torch.tensor(5)}
    out = fedavg([a, b], [3.0, 1.0])
    assert torch.allclose(out["w"], torch.tensor([1.0, 3.0]))
    assert int(out["n"]) == 3


# ---------------------------------------------------------------- the CLI end to end
def test_cli_writes_checkpoints_and_strict_results(trained: tuple[int, Path]) -> None:
    rc, out = trained
    assert rc == 0
    res = _strict(out / "results.json")
    fed = "federated head (FedAvg, 3 devices)"
    assert set(res["rankers"]) == {"bm25", "cosine", HEAD, fed}
    q = res["split"]["queries"]
    assert q["train"] + q["validation"] + q["test"] == res["num_queries"] == 30
    assert res["training"][fed]["queries_per_device"] and sum(res["training"][fed]["queries_per_device"]) == q["train"]
    for name, file in ((HEAD, "head.pt"), (fed, "federated.pt")):
        model, payload = load_checkpoint(out / file)
        assert payload["run_config"]["judged"] is True and payload["run_config"]["train"]["ips"] is False
        assert res["checkpoints"][name] == str(out / file)


def test_trained_head_beats_random_on_held_out_queries(trained: tuple[int, Path],
                                                       fixture_files: tuple[Path, Path]) -> None:
    # Prepare: the same held-out queries, a numpy random ranker averaged over 200 draws
    rc, out = trained
    assert rc == 0
    cat, judg = fixture_files
    data = load_judged(cat, judg, progress=False)
    test = data.slates.select(split_queries(data.queries, seed=0)["test"])
    rng = np.random.default_rng(0)
    random_ndcg = np.mean([np.nanmean(judged_metrics(rng.random(test.items.shape), test, data.scale)[NDCG10])
                           for _ in range(200)])
    # Execute
    res = _strict(out / "results.json")
    # Assert
    assert res["rankers"][HEAD][NDCG10] > random_ndcg + 0.15
    assert res["rankers"]["federated head (FedAvg, 3 devices)"][NDCG10] > random_ndcg + 0.1


def test_checkpoint_scores_in_fedrank_evaluate(trained: tuple[int, Path], fixture_files: tuple[Path, Path],
                                               tmp_path: Path) -> None:
    rc, out = trained
    cat, judg = fixture_files
    rc = main(["evaluate", "--catalog", str(cat), "--judgments", str(judg), "--checkpoint", str(out / "head.pt"),
               "--out", str(tmp_path / "eval")])
    assert rc == 0
    assert "head" in _strict(tmp_path / "eval" / "results.json")["rankers"]


# ---------------------------------------------------------------- bad input
def test_bad_grade_exits_2_naming_file_line_and_field(fixture_files: tuple[Path, Path], tmp_path: Path,
                                                       capsys: pytest.CaptureFixture[str]) -> None:
    cat, _ = fixture_files
    judg = tmp_path / "bad.csv"
    judg.write_text("query,item_id,grade\nred dress,dre-red-slim,3\nred dress,dre-red-classic,very\n")
    rc = main(["train", "--catalog", str(cat), "--judgments", str(judg), "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1
    assert "bad.csv" in err and "3" in err and "grade" in err
    assert not (tmp_path / "o" / "results.json").exists()


def test_unknown_item_and_too_few_queries_exit_2(fixture_files: tuple[Path, Path], tmp_path: Path,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    cat, _ = fixture_files
    unknown = tmp_path / "unknown.csv"
    unknown.write_text("query,item_id,grade\nred dress,zz-9,3\n")
    few = tmp_path / "few.csv"
    few.write_text("query,item_id,grade\nred dress,dre-red-slim,3\nblue dress,dre-blue-slim,3\n")
    assert main(["train", "--catalog", str(cat), "--judgments", str(unknown), "--out", str(tmp_path / "a")]) == 2
    assert "zz-9" in capsys.readouterr().err
    assert main(["train", "--catalog", str(cat), "--judgments", str(few), "--out", str(tmp_path / "b")]) == 2
    assert "at least 3" in capsys.readouterr().err


def test_judgments_without_catalog_exit_2(fixture_files: tuple[Path, Path], tmp_path: Path) -> None:
    _, judg = fixture_files
    assert main(["train", "--judgments", str(judg), "--out", str(tmp_path / "o")]) == 2
