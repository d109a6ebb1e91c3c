"""Row reading shared by catalog and judgments import (the generic format, see :mod:`shared_model.catalog_io`).

File kind by extension, UTF-8 text, CSV/TSV and JSON Lines rows, header checks, field coercion, and the error
and report types: :class:`CatalogError` names the file, line and field; :class:`LoadReport` lists what
``skip_bad=True`` left out.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import math
import os
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from shared_model.schema import CORE_FIELDS, Catalog, CatalogItem

__all__ = [
    "CSV_EXT",
    "GRADE_ALIASES",
    "ITEM_ID_ALIASES",
    "JSONL_EXT",
    "CatalogError",
    "LoadReport",
    "RowError",
    "SkippedRow",
    "as_number",
    "as_text",
    "check_header",
    "file_kind",
    "header_names",
    "iter_rows",
    "read_text",
]

CSV_EXT = {".csv": ",", ".tsv": "\t", ".tab": "\t"}
JSONL_EXT = {".jsonl", ".json-lines", ".jsonlines", ".ndjson"}
GRADE_ALIASES = ("grade", "relevance", "label", "esci_label")  # judgments: the grade column, first match wins
ITEM_ID_ALIASES = ("item_id", "product_id")  # judgments: the item column (ESCI calls it ``product_id``)


class CatalogError(ValueError):
    """A catalog or judgments file could not be read.

    Attributes
    ----------
    path : str
        The file.
    line : int or None
        1-based line number of the offending row (None for file-level problems).
    field : str or None
        The offending column, or a pseudo-field in parentheses: ``(json)``, ``(columns)``, ``(header)``,
        ``(encoding)``, ``(file)``.
    reason : str
        What is wrong.
    """

    def __init__(self, path: str | os.PathLike[str], line: int | None, field: str | None, reason: str) -> None:
        self.path = str(path)
        self.line = line
        self.field = field
        self.reason = reason
        where = self.path if line is None else f"{self.path}:{line}"
        what = f" field '{field}':" if field else ""
        super().__init__(f"{where}:{what} {reason}")


@dataclass
class SkippedRow:
    """One row left out by ``skip_bad=True``."""

    line: int
    field: str
    reason: str


@dataclass
class LoadReport:
    """What an import read, kept and skipped."""

    path: str
    rows: int = 0  # data rows seen (blank lines not counted)
    loaded: int = 0
    skipped: list[SkippedRow] = field(default_factory=list)
    labels: dict[str, int] = field(default_factory=dict)  # judgments: rows per text label read through a label map

    @property
    def num_skipped(self) -> int:
        return len(self.skipped)

    def summary(self, max_lines: int = 10) -> str:
        """A human-readable summary listing the first ``max_lines`` skipped rows."""
        out = [f"{self.path}: {self.loaded} of {self.rows} rows loaded, {self.num_skipped} skipped"]
        for s in self.skipped[:max_lines]:
            out.append(f"  line {s.line}: field '{s.field}': {s.reason}")
        if self.num_skipped > max_lines:
            out.append(f"  ... and {self.num_skipped - max_lines} more")
        return "\n".join(out)


class RowError(Exception):
    """A malformed row: the offending field and the reason (becomes a :class:`CatalogError` with the line)."""

    def __init__(self, field: str, reason: str) -> None:
        super().__init__(reason)
        self.field = field
        self.reason = reason


def file_kind(path: Path, more: dict[str, set[str]] | None = None) -> str:
    """``"csv"`` (CSV/TSV) or ``"jsonl"`` by extension, or a kind of ``more`` (kind -> extensions);
    :class:`CatalogError` for any other."""
    kinds: dict[str, Iterable[str]] = {"csv": CSV_EXT, "jsonl": JSONL_EXT, **(more or {})}
    suffix = path.suffix.lower()
    for kind, extensions in kinds.items():
        if suffix in extensions:
            return kind
    known = sorted(e for extensions in kinds.values() for e in extensions)
    raise CatalogError(path, None, "(file)", f"unknown extension {suffix!r}; expected one of {known}")


def read_text(path: Path) -> str:
    """The file as text (UTF-8, optional BOM); :class:`CatalogError` when missing, unreadable or not UTF-8."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise CatalogError(path, None, "(file)", "file not found") from None
    except OSError as e:
        raise CatalogError(path, None, "(file)", f"cannot read: {e.strerror or e}") from None
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = data[: e.start].count(b"\n") + 1
        raise CatalogError(path, line, "(encoding)", f"not valid UTF-8 (byte {e.start})") from None


def iter_rows(
    path: Path, kind: str, absorb_extra: str | None = None,
) -> Iterator[tuple[int, dict[str, Any] | RowError]]:
    """Yield ``(line, mapping)`` per data row, or ``(line, RowError)`` for rows that cannot be parsed.

    ``absorb_extra`` names a CSV column (any case) that, when it is the header's *last* column, takes a row's extra
    fields joined back with the delimiter: for files whose last column is free text written with unquoted commas
    (the Kaggle fashion ``styles.csv``). Otherwise a row with extra fields is a wrong column count.
    """
    text = read_text(path)
    if kind == "jsonl":
        for lineno, raw in enumerate(text.splitlines(), start=1):
            if not raw.strip():
                continue
            try:
                obj = json.loads(raw)
            except json.JSONDecodeError as e:
                yield lineno, RowError("(json)", f"invalid JSON: {e.msg} (column {e.colno})")
                continue
            if not isinstance(obj, dict):
                yield lineno, RowError("(json)", f"expected a JSON object, got {type(obj).__name__}")
                continue
            norm: dict[str, Any] = {}
            for k, v in obj.items():
                norm[str(k).strip().lower() if str(k).strip().lower() in CORE_FIELDS else str(k).strip()] = v
            yield lineno, norm
        return
    delim = CSV_EXT[path.suffix.lower()]
    reader = csv.reader(io.StringIO(text, newline=""), delimiter=delim)
    try:
        header = next(reader)
    except StopIteration:
        raise CatalogError(path, 1, "(header)", "empty file: a header row is required") from None
    except csv.Error as e:
        raise CatalogError(path, 1, "(header)", f"bad CSV: {e}") from None
    names = [h.strip() for h in header]
    names = [n.lower() if n.lower() in CORE_FIELDS or n.lower() in ("query", *GRADE_ALIASES) else n
             for n in names]
    for i, n in enumerate(names):
        if not n:
            raise CatalogError(path, 1, "(header)", f"column {i + 1} has an empty name")
        if names.index(n) != i:
            raise CatalogError(path, 1, n, "duplicate column name in header")
    start = reader.line_num + 1
    while True:
        try:
            row = next(reader)
        except StopIteration:
            return
        except csv.Error as e:
            yield start, RowError("(columns)", f"bad CSV: {e}")
            start = reader.line_num + 1
            continue
        line, start = start, reader.line_num + 1
        if not row or (len(row) == 1 and not row[0].strip()):
            continue
        if absorb_extra is not None and len(row) > len(names) and names[-1].lower() == absorb_extra.lower():
            row = [*row[: len(names) - 1], delim.join(row[len(names) - 1 :])]
        if len(row) != len(names):
            field_name = names[len(row)] if len(row) < len(names) else "(columns)"
            yield line, RowError(field_name, f"wrong column count: expected {len(names)}, found {len(row)}")
            continue
        yield line, dict(zip(names, row, strict=True))


def header_names(path: Path) -> set[str]:
    """The lower-cased column names of a CSV/TSV file's header row (empty set for an empty file)."""
    text = read_text(path)
    first = next(csv.reader(io.StringIO(text, newline=""), delimiter=CSV_EXT[path.suffix.lower()]), [])
    return {h.strip().lower() for h in first}


def check_header(path: Path, kind: str, required: tuple[str, ...]) -> None:
    """Raise :class:`CatalogError` when a CSV/TSV header lacks one of the ``required`` columns."""
    if kind != "csv":
        return
    names = header_names(path)
    for r in required:
        if r not in names:
            raise CatalogError(path, 1, r, f"required column missing from header (found {sorted(names)})")


def as_text(value: Any, name: str) -> str:
    """A field as stripped text (None and non-finite numbers: empty); :class:`RowError` for other types."""
    if value is None:
        return ""
    if isinstance(value, str):
        return value.strip()
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        if isinstance(value, float) and not math.isfinite(value):
            return ""
        return str(value)
    raise RowError(name, f"expected a text value, got {type(value).__name__}")


def as_number(value: Any, name: str, minimum: float | None = None) -> float:
    """A field as a finite number >= ``minimum`` (empty: NaN); :class:`RowError` otherwise."""
    if value is None or (isinstance(value, str) and not value.strip()):
        return float("nan")
    if isinstance(value, bool):
        raise RowError(name, f"not a number: {value!r}")
    if isinstance(value, int | float):
        x = float(value)
    elif isinstance(value, str):
        try:
            x = float(value.strip())
        except ValueError:
            raise RowError(name, f"not a number: {value.strip()!r}") from None
    else:
        raise RowError(name, f"not a number: {value!r}")
    if math.isnan(x):
        return x
    if not math.isfinite(x):
        raise RowError(name, f"not a finite number: {value!r}")
    if minimum is not None and x < minimum:
        raise RowError(name, f"must be >= {minimum:g}, got {x:g}")
    return x


def collect_items(
    path: Path,
    rows: Iterable[tuple[int, dict[str, Any] | RowError]],
    parse: Callable[[dict[str, Any]], CatalogItem],
    skip_bad: bool,
    id_field: str = "item_id",
) -> tuple[Catalog, LoadReport]:
    """The catalog of ``rows`` (from :func:`iter_rows`), each parsed by ``parse``. A malformed row or a duplicate
    id raises :class:`CatalogError` naming the line and field, or is skipped and listed in the report with
    ``skip_bad``; a file without one valid row is an error."""
    report = LoadReport(path=str(path))
    items: list[CatalogItem] = []
    first_line: dict[str, int] = {}
    for line, raw in rows:
        report.rows += 1
        try:
            if isinstance(raw, RowError):
                raise raw
            item = parse(raw)
            if item.item_id in first_line:
                raise RowError(id_field, f"duplicate {id_field} {item.item_id!r} "
                                         f"(first seen on line {first_line[item.item_id]})")
        except RowError as e:
            if not skip_bad:
                raise CatalogError(path, line, e.field, e.reason) from None
            report.skipped.append(SkippedRow(line, e.field, e.reason))
            continue
        first_line[item.item_id] = line
        items.append(item)
    report.loaded = len(items)
    if not items:
        raise CatalogError(path, None, "(file)", f"no valid product rows ({report.num_skipped} skipped)")
    if report.skipped:
        logging.getLogger("shared_model.catalog_io").warning("%s", report.summary())
    return Catalog(items=items, source=str(path)), report
