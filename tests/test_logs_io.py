"""The search-log format (shared_model/logs_io.py): round trips, import into a data folder, bad rows."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from fedrank.cli import main
from shared_model.catalog_io import save_catalog_jsonl
from shared_model.catalog_rows import CatalogError
from shared_model.logs_io import (
    EXTRA_FILE,
    LOG_FORMAT_VERSION,
    import_logs,
    load_log_extra,
    log_rows,
    read_logs,
    write_logs,
)
from shared_model.schema import IMAGE_DIM, Catalog, CatalogItem, SessionLog
from tests.synthetic import synthetic_prepared

HEADER = "user_id,session_id,timestamp,query,items,clicks,purchases,prices,resorted,device"


def _catalog_csv(tmp: Path, n: int = 6, price: bool = True) -> Path:
    p = tmp / "catalog.csv"
    rows = ["item_id,title,price"] + [f"p{k},item {k},{10 + k if price and k else ''}" for k in range(n)]
    p.write_text("\n".join(rows) + "\n")
    return p


def _log_csv(tmp: Path, rows: list[str], header: str = HEADER, name: str = "log.csv") -> Path:
    p = tmp / name
    p.write_text("\n".join([header, *rows]) + "\n")
    return p


GOOD = [
    'u1,s1,100,red shirt,"p0;p1;p2",p1,,"[9.5,11,12]",false,ios',
    'u1,s1,105,red shirt,"p2;p1;p0",,,,true,ios',
    'u2,a,50,,"[""p3"",""p4""]","[""p4""]","[""p4""]",,,web',
    'u10,b,70,mug,p5;p0,,,,0,',
]


def _same_log(a: SessionLog, b: SessionLog) -> None:
    for k in SessionLog.ARRAYS:
        if k == "query":  # numbered in order of first appearance: compared as texts below
            continue
        np.testing.assert_array_equal(getattr(a, k).astype(np.float64), getattr(b, k).astype(np.float64), err_msg=k)
    assert [a.queries[i] for i in a.query] == [b.queries[i] for i in b.query]


@pytest.mark.parametrize("ext", [".csv", ".tsv", ".jsonl", ".parquet"])
def test_round_trip_keeps_every_array(tmp_path: Path, ext: str) -> None:
    # Prepare: a simulator-like log with randomized lists, production ranks, scores, grades and utility
    prep = synthetic_prepared(tmp_path / "d")
    log_ = prep.log
    log_.utility = np.random.default_rng(1).uniform(-1, 1, len(log_.items)).astype(np.float32)
    log_.purchases = (np.random.default_rng(2).random(len(log_.items)) < 0.05).astype(np.uint8)
    # Execute
    path = write_logs(log_rows(log_, prep.catalog.ids()), tmp_path / f"log{ext}")
    back = read_logs(path, prep.catalog)
    # Assert
    _same_log(log_, back.sessions)
    assert back.fields["grades"] and back.fields["randomized"] and back.report.loaded == len(log_)


def test_import_builds_a_data_folder(tmp_path: Path) -> None:
    # Prepare
    cat = _catalog_csv(tmp_path)  # p0 has no price: the log's shown price fills it
    logs = _log_csv(tmp_path, GOOD)
    out = tmp_path / "data"
    # Execute
    meta = import_logs(cat, logs, out)
    # Assert
    assert sorted(p.name for p in out.iterdir()) == ["catalog.jsonl", EXTRA_FILE, "meta.json", "sessions.npz"]
    lg = SessionLog.load(out / "sessions.npz")
    assert lg.user.tolist() == [0, 0, 2, 1]  # ids that are not all integers sort as text: u1 < u10 < u2
    assert lg.offsets.tolist() == [0, 3, 6, 8, 10]
    assert lg.clicks.tolist() == [0, 1, 0, 0, 0, 0, 0, 1, 0, 0]
    assert lg.purchases.tolist() == [0, 0, 0, 0, 0, 0, 0, 1, 0, 0]
    assert lg.prod_rank.tolist() == [0, 1, 2, 0, 1, 2, 0, 1, 0, 1]  # no ranks given: display positions
    assert not lg.randomized.any() and not lg.grades.any()
    assert lg.queries[lg.query[2]] == ""  # a browse list
    extra = load_log_extra(out)
    assert extra is not None
    assert extra.resorted.tolist() == [False, True, False, False]
    assert extra.device.tolist() == ["ios", "ios", "web", ""]
    assert extra.user_ids.tolist() == ["u1", "u1", "u2", "u10"]
    np.testing.assert_allclose(extra.price_shown[:3], [9.5, 11, 12])
    assert meta["counts"]["prices_filled_from_log"] == 1 and meta["has_grades"] is False
    first = json.loads((out / "catalog.jsonl").read_text().splitlines()[0])
    assert first["item_id"] == "p0" and first["price"] == 9.5
    assert meta["log_format_version"] == LOG_FORMAT_VERSION


def test_user_ids_that_are_integers_are_numbered_numerically(tmp_path: Path) -> None:
    # Prepare
    rows = ["10,s,1,q,p0,p0,,,,", "2,s,1,q,p1,,,,,", "33,s,1,q,p2,,,,,"]
    # Execute
    parsed = read_logs(_log_csv(tmp_path, rows), Catalog([CatalogItem(f"p{k}", f"t{k}") for k in range(3)]))
    # Assert
    assert parsed.sessions.user.tolist() == [1, 0, 2]


def test_click_positions_and_iso_timestamps(tmp_path: Path) -> None:
    # Prepare
    header = "user_id,session_id,timestamp,query,items,click_positions,resorted,randomized"
    rows = ["u,s,2026-12-01T10:00:00Z,q,p0;p1;p2,1;3,,true",
            "u,s,2026-12-01T10:00:01.500,q,p1;p2,2,yes,true"]
    cat = Catalog([CatalogItem(f"p{k}", f"t{k}") for k in range(3)])
    # Execute
    parsed = read_logs(_log_csv(tmp_path, rows, header), cat)
    # Assert
    lg = parsed.sessions
    assert lg.clicks.tolist() == [1, 0, 1, 0, 1]
    assert lg.timestamp.tolist() == [1796119200000, 1796119201500]  # epoch milliseconds
    assert lg.randomized.tolist() == [True, False]  # a resorted list never counts as randomized


def test_cli_import_then_export_round_trip(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # Prepare
    cat = _catalog_csv(tmp_path)
    out = tmp_path / "data"
    assert main(["import-logs", "--catalog", str(cat), "--logs", str(_log_csv(tmp_path, GOOD)), "--out", str(out)]) == 0
    # Execute: export the imported folder (its own user/session ids), import that again
    assert main(["export-logs", "--data", str(out), "--out", str(tmp_path / "again.jsonl")]) == 0
    assert main(["import-logs", "--catalog", str(out / "catalog.jsonl"), "--logs", str(tmp_path / "again.jsonl"),
                 "--out", str(tmp_path / "data2")]) == 0
    # Assert
    _same_log(SessionLog.load(out / "sessions.npz"), SessionLog.load(tmp_path / "data2" / "sessions.npz"))
    a, b = load_log_extra(out), load_log_extra(tmp_path / "data2")
    assert a is not None and b is not None
    for k in ("user_ids", "session_ids", "resorted", "device"):
        assert getattr(a, k).tolist() == getattr(b, k).tolist()
    np.testing.assert_array_equal(a.price_shown, b.price_shown)
    assert "4 lists" in capsys.readouterr().out


def test_export_of_a_simulated_folder_writes_shop_fields_only_on_request(tmp_path: Path) -> None:
    # Prepare
    prep = synthetic_prepared(tmp_path / "d")
    save_catalog_jsonl(prep.catalog, tmp_path / "d" / "catalog.jsonl")
    prep.log.save(tmp_path / "d" / "sessions.npz")
    # Execute
    rc = main(["export-logs", "--data", str(tmp_path / "d"), "--out", str(tmp_path / "l.jsonl"), "--shop-fields-only"])
    # Assert
    assert rc == 0
    row = json.loads((tmp_path / "l.jsonl").read_text().splitlines()[0])
    assert row["log_version"] == LOG_FORMAT_VERSION and row["user_id"] == "0" and row["session_id"] == "s0"
    assert not {"grades", "randomized", "ranks", "scores", "utility"} & set(row)


BAD = [
    ('u,s,1,q,p0;p9,,,,,', "items", "unknown item_id 'p9'"),
    ('u,s,1,q,p0;p1,p2,,,,', "clicks", "not shown"),
    ('u,s,1,q,p0;p1,,p3,,,', "purchases", "not shown"),
    ('u,s,1,q,p0;p1;p0,,,,,', "items", "shown twice"),
    ('u,s,1,q,,,,,,', "items", "empty list"),
    ('u,s,yesterday,q,p0,,,,,', "timestamp", "neither an integer nor ISO 8601"),
    ('u,s,1.5,q,p0,,,,,', "timestamp", "not an integer"),
    ('u,s,1,q,p0;p1,,,"[1,2,3]",,', "prices", "3 values for 2 items"),
    ('u,s,1,q,p0;p1,,,1;x,,', "prices", "not a number"),
    ('u,s,1,q,p0,,,,maybe,', "resorted", "not a boolean"),
    (',s,1,q,p0,,,,,', "user_id", "empty"),
    ('u,s,1,q,"[p0",,,,,', "items", "does not parse"),
]


@pytest.mark.parametrize(("row", "field", "reason"), BAD, ids=[b[1] + ":" + b[2] for b in BAD])
def test_bad_row_names_file_line_and_field(tmp_path: Path, row: str, field: str, reason: str) -> None:
    # Prepare
    cat = _catalog_csv(tmp_path)
    logs = _log_csv(tmp_path, [GOOD[0], row])
    out = tmp_path / "data"
    # Execute
    with pytest.raises(CatalogError) as err:
        import_logs(cat, logs, out)
    # Assert
    assert err.value.line == 3 and err.value.field == field and reason in err.value.reason
    assert str(logs) in str(err.value)
    assert not out.exists() and [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_timestamp_going_backwards_within_a_session(tmp_path: Path) -> None:
    # Prepare
    logs = _log_csv(tmp_path, ['u,s,10,q,p0,,,,,', 'v,s,5,q,p0,,,,,', 'u,s,9,q,p1,,,,,'])
    # Execute
    with pytest.raises(CatalogError) as err:
        read_logs(logs, Catalog([CatalogItem(f"p{k}", f"t{k}") for k in range(3)]))
    # Assert: another user's session of the same id is no conflict; line 4 goes back in u's session
    assert (err.value.line, err.value.field) == (4, "timestamp") and "backwards" in err.value.reason


def test_skip_bad_counts_and_keeps_the_good_rows(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # Prepare
    cat = _catalog_csv(tmp_path)
    logs = _log_csv(tmp_path, [*GOOD, BAD[0][0], BAD[1][0]])
    out = tmp_path / "data"
    # Execute
    rc = main(["import-logs", "--catalog", str(cat), "--logs", str(logs), "--out", str(out), "--skip-bad"])
    # Assert
    assert rc == 0
    meta = json.loads((out / "meta.json").read_text())
    assert meta["load_report"]["logs"]["skipped"] == 2 and meta["counts"]["sessions"] == 4
    assert [r["line"] for r in meta["load_report"]["logs"]["skipped_rows"]] == [6, 7]
    assert "2 skipped" in capsys.readouterr().out


def test_cli_bad_row_exits_2_and_writes_nothing(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # Prepare
    cat = _catalog_csv(tmp_path)
    logs = _log_csv(tmp_path, [GOOD[0], BAD[0][0]])
    # Execute
    rc = main(["import-logs", "--catalog", str(cat), "--logs", str(logs), "--out", str(tmp_path / "data")])
    # Assert
    assert rc == 2
    err = capsys.readouterr().err
    assert f"{logs}:3: field 'items':" in err and "p9" in err
    assert not (tmp_path / "data").exists()


def test_missing_column_unsupported_version_and_wrong_extension(tmp_path: Path) -> None:
    # Prepare
    cat = Catalog([CatalogItem("p0", "t0")])
    no_clicks = _log_csv(tmp_path, ["u,s,1,q,p0"], "user_id,session_id,timestamp,query,items", "a.csv")
    v2 = tmp_path / "b.jsonl"
    v2.write_text(json.dumps({"log_version": 2, "user_id": "u", "session_id": "s", "timestamp": 1, "query": "",
                              "items": ["p0"], "clicks": []}) + "\n")
    # Execute / Assert
    with pytest.raises(CatalogError, match="clicks or click_positions"):
        read_logs(no_clicks, cat)
    with pytest.raises(CatalogError, match="unsupported log format version") as err:
        read_logs(v2, cat)
    assert err.value.line == 1
    with pytest.raises(CatalogError, match="unknown extension"):
        read_logs(tmp_path / "log.xlsx", cat)


def test_an_existing_folder_that_is_no_import_is_left_alone(tmp_path: Path) -> None:
    # Prepare
    cat = _catalog_csv(tmp_path)
    logs = _log_csv(tmp_path, GOOD)
    out = tmp_path / "data"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    # Execute
    with pytest.raises(FileExistsError, match="not a folder written by import-logs"):
        import_logs(cat, logs, out)
    # Assert: an earlier import, though, is replaced whole
    assert (out / "keep.txt").read_text() == "mine"
    import_logs(cat, logs, tmp_path / "data2")
    import_logs(cat, _log_csv(tmp_path, GOOD[:2], name="two.csv"), tmp_path / "data2")
    assert len(SessionLog.load(tmp_path / "data2" / "sessions.npz")) == 2


def test_parquet_bad_row_is_named_by_row_number(tmp_path: Path) -> None:
    # Prepare
    cat = Catalog([CatalogItem(f"p{k}", f"t{k}") for k in range(3)])
    rows = [{"user_id": "u", "session_id": "s", "timestamp": t, "query": "q", "items": items, "clicks": []}
            for t, items in ((1, ["p0", "p1"]), (2, ["p2", "p7"]))]
    path = write_logs(rows, tmp_path / "log.parquet")
    # Execute
    with pytest.raises(CatalogError) as err:
        read_logs(path, cat)
    # Assert
    assert (err.value.line, err.value.field) == (2, "items") and "'p7'" in err.value.reason
    assert len(read_logs(path, cat, skip_bad=True).sessions) == 1


def test_resorted_lists_are_left_out_of_the_position_bias_estimate(tmp_path: Path,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    # Prepare: an imported log whose first list was re-sorted by the shopper
    import shared_model.prepared as prepared_mod

    rows = ['u1,s1,100,red shirt,"p0;p1;p2",p1,,,true,ios', 'u1,s1,105,red shirt,"p2;p1;p0",p0,,,false,ios',
            'u1,s2,200,mug,"p3;p4",p4,,,false,ios', 'u1,s3,300,mug,"p4;p3",,,,false,ios',
            'u2,a,50,mug,"p3;p4",p3,,,false,web', 'u2,b,60,mug,"p4;p3",p3,,,false,web']
    out = tmp_path / "data"
    import_logs(_catalog_csv(tmp_path), _log_csv(tmp_path, rows), out)
    seen: list[np.ndarray] = []

    def capture(log_: SessionLog, sessions: np.ndarray, estimator: str = "auto") -> tuple[float, np.ndarray, dict]:
        seen.append(np.asarray(sessions))
        return 1.0, np.ones(50, np.float32), {"estimator": "captured"}

    monkeypatch.setattr(prepared_mod, "estimate_from_log", capture)
    monkeypatch.setattr(prepared_mod, "build_feature_store", lambda catalog, *a, **k: synthetic_store(len(catalog)))
    monkeypatch.setattr(prepared_mod, "encode_queries",
                        lambda queries, *a, **k: np.zeros((len(queries), 384), np.float32))
    # Execute
    prep = prepared_mod.prepare(out, progress=False)
    # Assert: every training list but the re-sorted one (list 0) reaches the estimator
    extra = load_log_extra(out)
    assert extra is not None
    want = [int(s) for s in prep.train_idx if not extra.resorted[s]]
    assert extra.resorted.tolist() == [True, False, False, False, False, False]
    assert 0 in prep.train_idx.tolist()  # the re-sorted list is a training list...
    assert seen[0].tolist() == want and 0 not in want and len(want) >= 2  # ...that the estimator never sees


def synthetic_store(n: int) -> Any:
    from shared_model.features import FeatureStore

    return FeatureStore(item_ids=[f"p{k}" for k in range(n)], text=np.zeros((n, 384)), image=np.zeros((n, IMAGE_DIM)),
                        video=np.zeros((n, IMAGE_DIM)), mask=np.zeros((n, 3), bool), dense=np.zeros((n, 4)))
