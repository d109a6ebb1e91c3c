"""Judgments in the shapes real sets use: decimal grades, any range, ESCI columns and labels, label maps."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from shared_model.catalog_io import (
    DEFAULT_LABEL_MAP,
    CatalogError,
    load_judgments,
    load_judgments_with_report,
    parse_label_map,
)
from shared_model.metrics import mrr, recall_at_k, relevance_thresholds


def _write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


# ------------------------------------------------------------------------------------------- grades and ranges
def test_decimal_grades_load_as_floats(tmp_path: Path) -> None:
    # Prepare: averaged annotator scores
    path = _write(tmp_path / "j.csv", "query,item_id,grade\nred tee,a1,1.33\nred tee,a2,2.67\nred tee,a3,0\n")
    # Execute
    rows = load_judgments(path)
    # Assert
    assert rows == [("red tee", "a1", 1.33), ("red tee", "a2", 2.67), ("red tee", "a3", 0.0)]
    assert all(isinstance(g, float) for _, _, g in rows)


def test_any_integer_range_loads_0_to_6(tmp_path: Path) -> None:
    path = _write(tmp_path / "j.csv", "query,item_id,grade\nq,a1,5\nq,a2,6\nq,a3,0\n")
    assert [g for _, _, g in load_judgments(path)] == [5.0, 6.0, 0.0]


def test_max_grade_declares_the_top_of_the_scale(tmp_path: Path) -> None:
    path = _write(tmp_path / "j.csv", "query,item_id,grade\nq,a1,5\nq,a2,7\n")
    with pytest.raises(CatalogError, match=r"grade 7 outside 0\.\.6") as ei:
        load_judgments(path, max_grade=6)
    assert ei.value.line == 3 and ei.value.field == "grade"


@pytest.mark.parametrize(
    ("value", "reason"),
    [("-1", "negative grade -1"), ("nan", "not a finite grade"), ("inf", "not a finite grade"),
     ("high", "not a grade: 'high'"), ("", "not a grade: ''")],
)
def test_bad_grade_names_file_line_and_field(tmp_path: Path, value: str, reason: str) -> None:
    path = _write(tmp_path / "j.csv", f"query,item_id,grade\nq,a1,1\nq,a2,{value}\n")
    with pytest.raises(CatalogError, match=reason) as ei:
        load_judgments(path)
    assert (ei.value.path, ei.value.line, ei.value.field) == (str(path), 3, "grade")
    rows, report = load_judgments_with_report(path, skip_bad=True)
    assert rows == [("q", "a1", 1.0)] and report.num_skipped == 1


def test_conflicting_decimal_grades_are_an_error(tmp_path: Path) -> None:
    path = _write(tmp_path / "j.csv", "query,item_id,grade\nq,a1,1.5\nq,a1,1.5\nq,a1,2.5\n")
    with pytest.raises(CatalogError, match=r"conflicting grade 2\.5 .* line 2 gave 1\.5") as ei:
        load_judgments(path)
    assert ei.value.line == 4


# ------------------------------------------------------------------------------------------------- ESCI shapes
ESCI = ("query_id,query,product_id,product_locale,esci_label\n"
        "1,revent 80 cfm,B000MOO21W,us,I\n1,revent 80 cfm,B07X3Y6B1V,us,E\n"
        "2,!qscreen fence without holes,B07DHX8YH6,us,S\n2,!qscreen fence without holes,B07G3PDK2C,us,C\n")


def test_esci_columns_load_as_they_are(tmp_path: Path) -> None:
    # Prepare: ESCI's examples table, columns and labels untouched
    path = _write(tmp_path / "esci.csv", ESCI)
    # Execute
    rows, report = load_judgments_with_report(path)
    # Assert: the default label map E=3, S=2, C=1, I=0
    assert rows == [("revent 80 cfm", "B000MOO21W", 0.0), ("revent 80 cfm", "B07X3Y6B1V", 3.0),
                    ("!qscreen fence without holes", "B07DHX8YH6", 2.0),
                    ("!qscreen fence without holes", "B07G3PDK2C", 1.0)]
    assert report.labels == {"I": 1, "E": 1, "S": 1, "C": 1}


def test_esci_labels_in_any_case_and_spelled_out(tmp_path: Path) -> None:
    path = _write(tmp_path / "j.jsonl", "\n".join(json.dumps({"query": "q", "product_id": f"p{i}", "esci_label": lab})
                                                  for i, lab in enumerate(["exact", "e", "Substitute", " c ",
                                                                           "IRRELEVANT"])) + "\n")
    assert [g for _, _, g in load_judgments(path)] == [3.0, 3.0, 2.0, 1.0, 0.0]


def test_unknown_label_names_the_line_and_the_column(tmp_path: Path) -> None:
    path = _write(tmp_path / "esci.csv", ESCI + "2,q,B1,us,X\n")
    with pytest.raises(CatalogError, match=r"esci\.csv:6: field 'esci_label': not a grade: 'X'"):
        load_judgments(path)


def test_missing_item_column_lists_the_accepted_names(tmp_path: Path) -> None:
    path = _write(tmp_path / "j.csv", "query,asin,esci_label\nq,B1,E\n")
    with pytest.raises(CatalogError, match="item_id, product_id") as ei:
        load_judgments(path)
    assert ei.value.line == 1 and ei.value.field == "item_id"


# -------------------------------------------------------------------------------------------------- label maps
def test_inline_label_map_overrides_the_default(tmp_path: Path) -> None:
    # Prepare: the KDD Cup 2022 ESCI gains
    path = _write(tmp_path / "esci.csv", ESCI)
    labels = parse_label_map("E=1, S=0.1, C=0.01, I=0")
    # Execute
    grades = [g for _, _, g in load_judgments(path, label_map=labels)]
    # Assert
    assert grades == [0.0, 1.0, 0.1, 0.01]
    assert labels.to_json() == {"source": "--label-map E=1, S=0.1, C=0.01, I=0",
                                "grades": {"E": 1.0, "S": 0.1, "C": 0.01, "I": 0.0}}


@pytest.mark.parametrize(("name", "text"), [
    ("labels.json", '{"E": 3, "S": 2, "C": 1, "I": 0}'),
    ("labels.toml", "E = 3\nS = 2\nC = 1\nI = 0\n"),
    ("labels.toml", '[label-map]\nE = 3\nS = 2\nC = 1\nI = 0\n'),
])
def test_label_map_files(tmp_path: Path, name: str, text: str) -> None:
    labels = parse_label_map(_write(tmp_path / name, text))
    assert labels.grades == {"E": 3.0, "S": 2.0, "C": 1.0, "I": 0.0}
    assert labels.source == str(tmp_path / name) and labels.get("exact") is None and labels.get(" s ") == 2.0


def test_numeric_label_map_renames_a_scale(tmp_path: Path) -> None:
    path = _write(tmp_path / "j.csv", "query,item_id,grade\nq,a1,1\nq,a2,5\nq,a3,2.5\n")
    rows = load_judgments(path, label_map=parse_label_map("1=0,2=1,3=2,4=3,5=4"))
    assert [g for _, _, g in rows] == [0.0, 4.0, 2.5]


@pytest.mark.parametrize(("spec", "match"), [
    ("E=3,S=x", r"--label-map E=3,S=x: field 'S': grade must be a number, got 'x'"),
    ("E=3,S=-1", "field 'S': grade must be a finite number >= 0"),
    ("E=3,e=2", "field 'e': label given twice"),
    ("E3", "field 'E3': expected LABEL=GRADE pairs"),
    ("nope.json", r"nope\.json: field '\(file\)': label map file not found"),
])
def test_bad_label_maps_are_named(spec: str, match: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    with pytest.raises(CatalogError, match=match):
        parse_label_map(spec)


def test_bad_label_map_file(tmp_path: Path) -> None:
    with pytest.raises(CatalogError, match=r"labels\.json: field '\(file\)': invalid JSON"):
        parse_label_map(_write(tmp_path / "labels.json", "{E: 3"))
    with pytest.raises(CatalogError, match=r"labels\.toml: field 'S': grade must be a number"):
        parse_label_map(_write(tmp_path / "labels.toml", 'E = 3\nS = "x"\n'))


def test_default_label_map_is_esci() -> None:
    assert {k: DEFAULT_LABEL_MAP.get(k) for k in "ESCI"} == {"E": 3.0, "S": 2.0, "C": 1.0, "I": 0.0}


# --------------------------------------------------------------------------------- thresholds for any scale
@pytest.mark.parametrize(("top", "expected"), [(3, (3.0, 1.5)), (4, (4.0, 2.0)), (6, (6.0, 3.0)),
                                               (2.67, (2.67, 1.335)), (0, (np.inf, np.inf))])
def test_relevance_thresholds_scale_with_the_top_grade(top: float, expected: tuple[float, float]) -> None:
    assert relevance_thresholds(top) == pytest.approx(expected)


def test_thresholds_on_0_to_3_match_the_simulator_rule() -> None:
    # the simulator's rule: MRR finds the first grade-3 item, recall counts grades >= 2
    rng = np.random.default_rng(0)
    g = rng.integers(0, 4, size=(50, 12)).astype(np.float64)
    s = rng.normal(size=g.shape)
    mrr_t, rec_t = relevance_thresholds(3)
    np.testing.assert_array_equal(mrr(s, g, threshold=mrr_t), mrr(s, g, threshold=3))
    np.testing.assert_array_equal(recall_at_k(s, g, threshold=rec_t), recall_at_k(s, g, threshold=2))
