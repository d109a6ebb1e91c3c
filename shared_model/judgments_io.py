"""Relevance-judgment import: ``query,item_id,grade`` rows (format in :mod:`shared_model.catalog_io`)."""

from __future__ import annotations

import logging
import math
import os
from pathlib import Path
from typing import Any

from shared_model.catalog_rows import (
    GRADE_ALIASES,
    CatalogError,
    LoadReport,
    RowError,
    SkippedRow,
    as_text,
    file_kind,
    header_names,
    iter_rows,
)
from shared_model.schema import Catalog

__all__ = ["load_judgments", "load_judgments_with_report"]

# import warnings keep the logger name they had before judgments moved out of catalog_io
log = logging.getLogger("shared_model.catalog_io")


def _parse_grade(value: Any, max_grade: int) -> int:
    if isinstance(value, bool) or value is None:
        raise RowError("grade", f"not an integer grade: {value!r}")
    try:
        x = float(value.strip()) if isinstance(value, str) else float(value)
    except (TypeError, ValueError):
        raise RowError("grade", f"not an integer grade: {value!r}") from None
    if not math.isfinite(x) or x != int(x):
        raise RowError("grade", f"not an integer grade: {value!r}")
    g = int(x)
    if not 0 <= g <= max_grade:
        raise RowError("grade", f"grade {g} outside 0..{max_grade}")
    return g


def _check_judgments_header(path: Path) -> None:
    names = header_names(path)
    for r in ("query", "item_id"):
        if r not in names:
            raise CatalogError(path, 1, r, f"required column missing from header (found {sorted(names)})")
    if not names & set(GRADE_ALIASES):
        raise CatalogError(path, 1, "grade", f"required column missing from header (found {sorted(names)})")


def _parse_judgment(raw: dict[str, Any], max_grade: int, catalog: Catalog | None) -> tuple[str, str, int]:
    """One row as ``(query, item_id, grade)``; :class:`RowError` when a field is missing or invalid."""
    row = {k.lower(): v for k, v in raw.items()}
    query = as_text(row.get("query"), "query")
    if not query:
        raise RowError("query", "required field is empty" if "query" in row else "required field missing")
    item_id = as_text(row.get("item_id"), "item_id")
    if not item_id:
        raise RowError("item_id", "required field is empty" if "item_id" in row else "required field missing")
    if catalog is not None:
        try:
            catalog.row(item_id)
        except KeyError:
            raise RowError(
                "item_id", f"unknown item_id {item_id!r} (not in {catalog.source or 'catalog'})"
            ) from None
    key = next((k for k in GRADE_ALIASES if k in row), None)
    if key is None:
        raise RowError("grade", "required field missing")
    return query, item_id, _parse_grade(row[key], max_grade)


def load_judgments_with_report(
    path: str | os.PathLike[str], skip_bad: bool = False, max_grade: int = 4, catalog: Catalog | None = None,
) -> tuple[list[tuple[str, str, int]], LoadReport]:
    """Read graded relevance judgments ``(query, item_id, grade)``.

    Parameters
    ----------
    path : str or PathLike
        CSV/TSV with a ``query,item_id,grade`` header, or JSONL objects with those keys.
    skip_bad : bool
        Skip malformed rows (listed in the report) instead of raising.
    max_grade : int
        Largest accepted grade (4 by default so 0..4 scales load; the simulator writes 0..3).
    catalog : Catalog, optional
        When given, an ``item_id`` not in the catalog is a malformed row.

    Returns
    -------
    judgments : list of (str, str, int)
        In file order; exact duplicates dropped.
    report : LoadReport
        Rows read, loaded and skipped.

    Raises
    ------
    CatalogError
        Naming file, line and field; also for one (query, item_id) pair given two different grades.
    """
    p = Path(path)
    kind = file_kind(p)
    if kind == "csv":
        _check_judgments_header(p)
    report = LoadReport(path=str(p))
    out: list[tuple[str, str, int]] = []
    seen: dict[tuple[str, str], tuple[int, int]] = {}
    for line, raw in iter_rows(p, kind):
        report.rows += 1
        try:
            if isinstance(raw, RowError):
                raise raw
            query, item_id, grade = _parse_judgment(raw, max_grade, catalog)
            prev = seen.get((query, item_id))
            if prev is not None:
                if prev[0] != grade:
                    raise RowError(
                        "grade", f"conflicting grade {grade} for ({query!r}, {item_id!r}): "
                        f"line {prev[1]} gave {prev[0]}",
                    )
                continue
        except RowError as e:
            if not skip_bad:
                raise CatalogError(p, line, e.field, e.reason) from None
            report.skipped.append(SkippedRow(line, e.field, e.reason))
            continue
        seen[(query, item_id)] = (grade, line)
        out.append((query, item_id, grade))
    report.loaded = len(out)
    if report.skipped:
        log.warning("%s", report.summary())
    return out, report


def load_judgments(
    path: str | os.PathLike[str], skip_bad: bool = False, max_grade: int = 4, catalog: Catalog | None = None,
) -> list[tuple[str, str, int]]:
    """Read graded relevance judgments (see :func:`load_judgments_with_report`)."""
    return load_judgments_with_report(path, skip_bad=skip_bad, max_grade=max_grade, catalog=catalog)[0]
