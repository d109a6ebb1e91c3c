"""`fedrank train --catalog C --judgments J`: query-grouped splits, grade labels, the judged data folder, the CLI
end to end, and (slow) the federated head trained through Flower's simulation engine."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from fedrank.cli import main
from shared_model.checkpoint import load_checkpoint
from shared_model.config import ModelConfig, TrainConfig, parse_run_config
from shared_model.data import split_by_time
from shared_model.metrics import NDCG10
from shared_model.prepared import TEST_FRAC, prepare
from shared_model.schema import SessionLog
from shared_model.shards import ensure_shards, load_shard
from simulations.evaluate import GradeScale, judged_metrics
from simulations.judged_data import JudgedDataError, held_out_slots, write_judged_data
from simulations.judged_training import (
    HEAD,
    JudgedData,
    flower_overrides,
    label_values,
    load_judged,
    partition_queries,
    split_queries,
    training_labels,
)
from simulations.runner import scenario_config
from tests.procs import fedrank

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
               "--loss", "lambdaloss"])
    return rc, out


@pytest.fixture(scope="module")
def judged(fixture_files: tuple[Path, Path]) -> JudgedData:
    cat, judg = fixture_files
    return load_judged(cat, judg, progress=False)


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


# ---------------------------------------------------------------- the CLI end to end
def _random_ndcg(judged: JudgedData) -> float:
    """Mean judged NDCG@10 on the held-out queries of a numpy random ranker, averaged over 200 draws."""
    test = judged.slates.select(split_queries(judged.queries, seed=0)["test"])
    rng = np.random.default_rng(0)
    return float(np.mean([np.nanmean(judged_metrics(rng.random(test.items.shape), test, judged.scale)[NDCG10])
                          for _ in range(200)]))


def test_cli_writes_checkpoints_and_strict_results(trained: tuple[int, Path]) -> None:
    rc, out = trained
    assert rc == 0
    res = _strict(out / "results.json")
    assert set(res["rankers"]) == {"bm25", "cosine", HEAD}
    q = res["split"]["queries"]
    assert q["train"] + q["validation"] + q["test"] == res["num_queries"] == 30
    model, payload = load_checkpoint(out / "head.pt")
    assert payload["run_config"]["judged"] is True and payload["run_config"]["train"]["ips"] is False
    assert res["checkpoints"][HEAD] == str(out / "head.pt")
    assert not (out / "data").exists()  # no data folder without --devices


def test_trained_head_beats_random_on_held_out_queries(trained: tuple[int, Path], judged: JudgedData) -> None:
    # Prepare
    rc, out = trained
    assert rc == 0
    # Execute
    res = _strict(out / "results.json")
    # Assert
    assert res["rankers"][HEAD][NDCG10] > _random_ndcg(judged) + 0.15


# ---------------------------------------------------------------- the judged data folder
def _one_user_log(n: int) -> SessionLog:
    return SessionLog(user=np.zeros(n, np.int32), query=np.zeros(n, np.int32), randomized=np.zeros(n, bool),
                      timestamp=np.arange(n, dtype=np.int64), offsets=np.arange(n + 1, dtype=np.int64),
                      items=np.zeros(n, np.int32), clicks=np.zeros(n, np.uint8), purchases=np.zeros(n, np.uint8),
                      prod_rank=np.zeros(n, np.int16), retrieval_score=np.zeros(n, np.float32),
                      grades=np.zeros(n, np.float32), utility=np.zeros(n, np.float32), queries=["q"])


@pytest.mark.parametrize("num_train", [*range(1, 41), 97, 124])
def test_held_out_slots_are_exactly_what_split_by_time_holds_out(num_train: int) -> None:
    k = held_out_slots(num_train)
    _, test = split_by_time(_one_user_log(num_train + k), TEST_FRAC)
    assert test.tolist() == list(range(num_train, num_train + k))


@pytest.fixture(scope="module")
def data_folder(judged: JudgedData, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Any]]:
    # a sibling of the fixture's folder: the same embedding cache (shared_model.embedding_cache.feature_cache_dir)
    out = tmp_path_factory.mktemp("judged-data") / "data"
    split = split_queries(judged.queries, seed=0)
    labels = label_values(judged.sessions.grades, "softmax", "exp2")
    layout = write_judged_data(out, judged.catalog, judged.sessions, labels, split, num_devices=3, seed=0)
    return out, layout


def test_data_folder_round_trips_through_prepare_with_held_out_queries_only_in_test(
        judged: JudgedData, data_folder: tuple[Path, dict[str, Any]]) -> None:
    # Prepare
    out, layout = data_folder
    split = split_queries(judged.queries, seed=0)
    train_q = {judged.queries[i] for i in split["train"]}
    held_q = {judged.queries[i] for i in (*split["validation"], *split["test"])}
    # Execute
    prep = prepare(out, progress=False)
    lg = prep.log

    def queries_of(sessions: np.ndarray) -> list[str]:
        return [lg.queries[int(lg.query[s])] for s in sessions]

    # Assert: every training query trains exactly once, and only held-out queries are in the test split
    assert sorted(queries_of(prep.train_idx)) == sorted(train_q)
    assert prep.test_idx.size > 0 and set(queries_of(prep.test_idx)) <= held_q
    assert set(queries_of(prep.test_idx)) <= {judged.queries[i] for i in split["test"]}  # test queries come first
    assert layout["held_out"]["sessions"] == len(prep.test_idx)
    # one user id per device, holding its own share of the training queries
    shares = partition_queries(split["train"], 3, seed=0)
    for dev, share in enumerate(shares):
        mine = prep.train_idx[lg.user[prep.train_idx] == dev]
        assert sorted(queries_of(mine)) == sorted(judged.queries[i] for i in share)
    # clicks carry the training labels, grades the judgments; no position bias is estimated from the lists
    for s in range(len(lg)):
        q = judged.queries.index(lg.queries[int(lg.query[s])])
        src = judged.sessions.slate(q)
        assert np.array_equal(lg.items[lg.slate(s)], judged.sessions.items[src])
        assert np.allclose(lg.grades[lg.slate(s)], judged.sessions.grades[src])
        assert np.allclose(lg.clicks[lg.slate(s)], np.exp2(judged.sessions.grades[src]) - 1, atol=1e-5)
    assert not lg.randomized.any() and float(prep.eta) == 0.0


def test_client_shards_hold_each_device_its_own_queries(judged: JudgedData,
                                                        data_folder: tuple[Path, dict[str, Any]]) -> None:
    # Prepare: the run config fedrank train gives the judged scenario
    out, layout = data_folder
    flat = scenario_config("judged", extra=flower_overrides(ModelConfig(), TrainConfig(), 3, out.parent, 2, 2, 0))
    settings = parse_run_config(flat)
    # Execute
    paths = ensure_shards(prepare(out, progress=False), settings)
    # Assert
    assert settings.partition.scheme == "natural" and not settings.train.ips and not settings.model.use_user
    assert settings.data.dir == str(out) and settings.partition.num_clients == 3
    for cid, path in enumerate(paths):
        shard = load_shard(path)
        assert len(shard.train) == layout["queries_per_device"][cid]
        assert len(shard.test) == layout["held_out_per_device"][cid]


def test_data_folder_refuses_to_replace_another_folder(judged: JudgedData, tmp_path: Path) -> None:
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "mine.txt").write_text("keep me")
    split = split_queries(judged.queries, seed=0)
    labels = label_values(judged.sessions.grades, "softmax", "exp2")
    with pytest.raises(JudgedDataError, match="not a judged data folder"):
        write_judged_data(tmp_path / "data", judged.catalog, judged.sessions, labels, split, 3)
    assert (tmp_path / "data" / "mine.txt").read_text() == "keep me"


# ---------------------------------------------------------------- federated through Flower (slow)
@pytest.fixture(scope="module")
def federated(fixture_files: tuple[Path, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    cat, judg = fixture_files
    tmp = tmp_path_factory.mktemp("flower")
    out = tmp / "out"
    proc = fedrank(tmp, "train", "--catalog", str(cat), "--judgments", str(judg), "--out", str(out), "--epochs", "15",
                   "--devices", "3", "--rounds", "2", "--local-epochs", "3", timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return out


FED = "federated head (Flower fedavg, 3 devices)"


@pytest.mark.slow
def test_federated_head_trains_through_flower(federated: Path, judged: JudgedData) -> None:
    # Execute
    res = _strict(federated / "results.json")
    run = json.loads((federated / "federated" / "results.json").read_text())  # the Flower run's own (NaN allowed)
    # Assert: the project's ServerApp ran 2 rounds, every device answered, over the judged data folder
    assert set(res["rankers"]) == {"bm25", "cosine", HEAD, FED}
    info = res["training"][FED]
    assert "Flower" in info["kind"] and info["rounds_run"] == 2 and info["best_round"] in (1, 2)
    assert sum(info["queries_per_device"]) == res["split"]["queries"]["train"]
    assert [(r["sampled"], r["accepted"]) for r in run["rounds"]] == [(3, 3), (3, 3)]
    assert run["run_config"]["data.dir"] == str(federated / "data") and run["run_config"]["train.ips"] is False
    assert len(list((federated / "federated" / "checkpoints").glob("round-*.pt"))) == 2
    # the selected round's head is a fedrank checkpoint, scored on the same held-out queries as the others
    model, payload = load_checkpoint(federated / "federated.pt")
    assert payload["run_config"]["judged"] is True and payload["run_config"]["train"]["ips"] is False
    assert payload["round"] == info["best_round"]
    assert 0.0 < res["rankers"][FED][NDCG10] <= 1.0
    assert max(h["val_ndcg@10"] for h in info["history"]) == info["best_val_ndcg@10"]


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
