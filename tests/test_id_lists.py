"""Id files (``fedrank rerank --candidates FILE``, ``--recent FILE``): ids are data, not words.

One id per line; a UTF-8 BOM stripped; CRLF or LF; surrounding whitespace trimmed, inner spaces kept; blank lines
ignored; duplicates left out (first occurrence wins) and reported with their line; an optional TAB-separated
first-stage score on every line of a candidates file, or on none.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from client.runtime import RerankInputError
from export.cli import read_id_file


def _file(tmp_path: Path, content: str | bytes, name: str = "c.txt") -> Path:
    path = tmp_path / name
    if isinstance(content, str):
        path.write_text(content, encoding="utf-8", newline="")
    else:
        path.write_bytes(content)
    return path


def _error(path: Path, flag: str = "--candidates", scores: bool = True) -> str:
    with pytest.raises(RerankInputError) as e:
        read_id_file(path, flag, scores=scores)
    assert e.value.field == flag
    return str(e.value)


def test_bom_is_stripped_from_the_first_id(tmp_path: Path) -> None:
    path = _file(tmp_path, b"\xef\xbb\xbfa1\na2\n")
    assert read_id_file(path, "--recent").ids == ["a1", "a2"]


def test_crlf_line_ends(tmp_path: Path) -> None:
    got = read_id_file(_file(tmp_path, "a1\t0.5\r\nred shoe 1\t-2\r\n"), "--candidates", scores=True)
    assert got.ids == ["a1", "red shoe 1"] and got.scores == [0.5, -2.0]


def test_spaces_inside_ids_are_kept_and_surrounding_whitespace_trimmed(tmp_path: Path) -> None:
    path = _file(tmp_path, "  red shoe 1  \n\tblue  hat\t\nx\u00a0y\n")
    assert read_id_file(path, "--candidates", scores=True).ids == ["red shoe 1", "blue  hat", "x\u00a0y"]


def test_blank_lines_are_ignored_and_line_numbers_kept(tmp_path: Path) -> None:
    got = read_id_file(_file(tmp_path, "\n\na1\n   \n\t\r\na2\n\na1\n\n"), "--recent")
    assert got.ids == ["a1", "a2"]
    assert [(d.item_id, d.line, d.first_line) for d in got.duplicates] == [("a1", 8, 3)]


def test_duplicates_are_left_out_first_occurrence_wins(tmp_path: Path) -> None:
    got = read_id_file(_file(tmp_path, "a1\t1\na2\t2\na1\t3\na2\t4\na3\t5\n"), "--candidates", scores=True)
    assert got.ids == ["a1", "a2", "a3"] and got.scores == [1.0, 2.0, 5.0]
    assert [(d.item_id, d.line, d.first_line) for d in got.duplicates] == [("a1", 3, 1), ("a2", 4, 2)]


def test_tab_separates_the_score_column(tmp_path: Path) -> None:
    got = read_id_file(_file(tmp_path, "red shoe 1\t0.25\nblue hat \t -1e-3\n"), "--candidates", scores=True)
    assert got.ids == ["red shoe 1", "blue hat"] and got.scores == [0.25, -0.001]


def test_without_a_tab_the_whole_line_is_the_id(tmp_path: Path) -> None:
    got = read_id_file(_file(tmp_path, "red shoe 1\nitem 2 0.5\n"), "--candidates", scores=True)
    assert got.ids == ["red shoe 1", "item 2 0.5"] and got.scores is None


def test_hash_is_part_of_an_id_not_a_comment(tmp_path: Path) -> None:
    assert read_id_file(_file(tmp_path, "#42\na1\n"), "--recent").ids == ["#42", "a1"]


def test_empty_file_gives_no_ids(tmp_path: Path) -> None:
    got = read_id_file(_file(tmp_path, b"\xef\xbb\xbf\r\n\r\n"), "--candidates", scores=True)
    assert got.ids == [] and got.scores is None and got.duplicates == []


def test_bad_score_value_is_named_by_file_and_line(tmp_path: Path) -> None:
    path = _file(tmp_path, "a1\t0.5\n\na2\tabc\n")
    assert f"{path}:3: field 'score': not a number: 'abc'" in _error(path)


@pytest.mark.parametrize("value", ["nan", "inf", "-inf"])
def test_non_finite_score_is_named_by_file_and_line(tmp_path: Path, value: str) -> None:
    path = _file(tmp_path, f"a1\t0.5\na2\t{value}\n")
    assert f"{path}:2: field 'score'" in _error(path)


def test_third_column_is_an_error(tmp_path: Path) -> None:
    path = _file(tmp_path, "a1\t0.5\textra\n")
    assert f"{path}:1: field 'score'" in _error(path)


def test_score_on_some_lines_only_is_an_error(tmp_path: Path) -> None:
    path = _file(tmp_path, "a1\na2\t0.5\n")
    message = _error(path)
    assert f"{path}:2: field 'score'" in message and "line 1" in message


def test_a_tab_in_a_file_without_a_score_column_is_an_error(tmp_path: Path) -> None:
    path = _file(tmp_path, "a1\na2\t0.5\n", name="r.txt")
    assert f"{path}:2: field 'item_id'" in _error(path, "--recent", scores=False)


def test_unreadable_files_are_named(tmp_path: Path) -> None:
    assert "nope.txt" in _error(tmp_path / "nope.txt")
    path = _file(tmp_path, b"a1\ncaf\xe9\n")
    assert f"{path}" in _error(path) and "UTF-8" in _error(path)
