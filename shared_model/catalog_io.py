"""Catalog import/export in fedrank's generic catalog format, and relevance-judgment import.

The generic catalog format
--------------------------
One product per row, as CSV (``.csv``, comma-separated, header row required), TSV (``.tsv``/``.tab``) or
JSON Lines (``.jsonl``, ``.json-lines``, ``.ndjson``; one JSON object per line, blank lines ignored).

========================  ======================================================================
column                    meaning
========================  ======================================================================
``item_id``               required, unique, non-empty
``title``                 required, non-empty
``description``           optional text
``category``              optional (the simulator builds query intents from it)
``brand``, ``color``      optional
``price``, ``rating``     optional numbers; empty/null means unknown (NaN); price must be >= 0
``image_path``            optional path of the product photo
``video_frames``          optional frame paths: a JSON list in JSONL, a ``;``-separated list in CSV
any other column          kept as a string in ``CatalogItem.attributes`` (pattern, material, ...)
========================  ======================================================================

Column names are matched case-insensitively (leading/trailing blanks ignored). Relative paths are relative
to the catalog file's folder and are resolved to absolute paths on import; ``http(s)://`` URLs are kept
as they are. A missing or unreadable image is *not* an import error -- the feature store masks that
modality; :func:`image_ok` tells whether a file is a decodable image.

A malformed row raises :class:`CatalogError`, whose message names the file, the line number and the
field. With ``skip_bad=True`` such rows are skipped instead and listed in the :class:`LoadReport`.
Problems with the file as a whole (missing file, unknown extension, bad header, undecodable UTF-8, no
valid row) always raise.

Judgments
---------
``query,item_id,grade`` rows (CSV/TSV with a header, or JSONL objects with those keys; ``relevance`` and
``label`` are accepted as aliases of ``grade``). Grades are integers. The simulator writes 0..3 (0 = not
relevant, 3 = exact match); files on a 0..4 scale (e.g. TREC-style) are accepted and returned unchanged,
since the metrics use the gain ``2**grade - 1`` whatever the top grade is. Pass ``max_grade=3`` to reject
anything above 3.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import math
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from PIL import Image

from shared_model.schema import CORE_FIELDS, Catalog, CatalogItem, atomic_write

__all__ = [
    "CatalogError",
    "LoadReport",
    "SkippedRow",
    "image_ok",
    "load_catalog",
    "load_catalog_with_report",
    "load_judgments",
    "load_judgments_with_report",
    "save_catalog",
    "save_catalog_csv",
    "save_catalog_jsonl",
]

log = logging.getLogger(__name__)

_CSV_EXT = {".csv": ",", ".tsv": "\t", ".tab": "\t"}
_JSONL_EXT = {".jsonl", ".json-lines", ".jsonlines", ".ndjson"}
_REQUIRED = ("item_id", "title")
_GRADE_ALIASES = ("grade", "relevance", "label")


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


class _RowError(Exception):
    def __init__(self, field: str, reason: str) -> None:
        super().__init__(reason)
        self.field = field
        self.reason = reason


# ---------------------------------------------------------------------------------------------- reading


def _file_kind(path: Path) -> str:
    suffix = path.suffix.lower()
    if suffix in _CSV_EXT:
        return "csv"
    if suffix in _JSONL_EXT:
        return "jsonl"
    raise CatalogError(
        path, None, "(file)",
        f"unknown extension {suffix!r}; expected one of {sorted([*_CSV_EXT, *_JSONL_EXT])}",
    )


def _read_text(path: Path) -> str:
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


def _iter_rows(path: Path, kind: str) -> Iterator[tuple[int, dict[str, Any] | _RowError]]:
    """Yield ``(line, mapping)`` per data row, or ``(line, _RowError)`` for rows that cannot be parsed."""
    text = _read_text(path)
    if kind == "jsonl":
        for lineno, raw in enumerate(text.splitlines(), start=1):
            if not raw.strip():
                continue
            try:
                obj = json.loads(raw)
            except json.JSONDecodeError as e:
                yield lineno, _RowError("(json)", f"invalid JSON: {e.msg} (column {e.colno})")
                continue
            if not isinstance(obj, dict):
                yield lineno, _RowError("(json)", f"expected a JSON object, got {type(obj).__name__}")
                continue
            norm: dict[str, Any] = {}
            for k, v in obj.items():
                norm[str(k).strip().lower() if str(k).strip().lower() in CORE_FIELDS else str(k).strip()] = v
            yield lineno, norm
        return
    delim = _CSV_EXT[path.suffix.lower()]
    reader = csv.reader(io.StringIO(text, newline=""), delimiter=delim)
    try:
        header = next(reader)
    except StopIteration:
        raise CatalogError(path, 1, "(header)", "empty file: a header row is required") from None
    except csv.Error as e:
        raise CatalogError(path, 1, "(header)", f"bad CSV: {e}") from None
    names = [h.strip() for h in header]
    names = [n.lower() if n.lower() in CORE_FIELDS or n.lower() in ("query", *_GRADE_ALIASES) else n
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
            yield start, _RowError("(columns)", f"bad CSV: {e}")
            start = reader.line_num + 1
            continue
        line, start = start, reader.line_num + 1
        if not row or (len(row) == 1 and not row[0].strip()):
            continue
        if len(row) != len(names):
            field_name = names[len(row)] if len(row) < len(names) else "(columns)"
            yield line, _RowError(field_name, f"wrong column count: expected {len(names)}, found {len(row)}")
            continue
        yield line, dict(zip(names, row, strict=True))


def _check_header(path: Path, kind: str, required: tuple[str, ...]) -> None:
    if kind != "csv":
        return
    text = _read_text(path)
    first = next(csv.reader(io.StringIO(text, newline=""), delimiter=_CSV_EXT[path.suffix.lower()]), [])
    names = {h.strip().lower() for h in first}
    for r in required:
        if r not in names:
            raise CatalogError(path, 1, r, f"required column missing from header (found {sorted(names)})")


def _as_text(value: Any, name: str) -> str:
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
    raise _RowError(name, f"expected a text value, got {type(value).__name__}")


def _as_number(value: Any, name: str, minimum: float | None = None) -> float:
    if value is None or (isinstance(value, str) and not value.strip()):
        return float("nan")
    if isinstance(value, bool):
        raise _RowError(name, f"not a number: {value!r}")
    if isinstance(value, int | float):
        x = float(value)
    elif isinstance(value, str):
        try:
            x = float(value.strip())
        except ValueError:
            raise _RowError(name, f"not a number: {value.strip()!r}") from None
    else:
        raise _RowError(name, f"not a number: {value!r}")
    if math.isnan(x):
        return x
    if not math.isfinite(x):
        raise _RowError(name, f"not a finite number: {value!r}")
    if minimum is not None and x < minimum:
        raise _RowError(name, f"must be >= {minimum:g}, got {x:g}")
    return x


def _resolve(p: str, base: Path) -> str:
    if p.startswith(("http://", "https://")):
        return p
    q = Path(p).expanduser()
    if not q.is_absolute():
        q = base / q
    return os.path.normpath(str(q))


def _as_frames(value: Any, kind: str, base: Path) -> list[str]:
    if value is None:
        return []
    if isinstance(value, str) and value.strip().startswith("["):
        try:
            value = json.loads(value)
        except json.JSONDecodeError:
            raise _RowError("video_frames", "looks like a JSON list but does not parse") from None
    if isinstance(value, str):
        parts = [v.strip() for v in value.split(";")]
    elif isinstance(value, list):
        parts = []
        for v in value:
            if not isinstance(v, str):
                raise _RowError("video_frames", f"frame paths must be strings, got {type(v).__name__}")
            parts.append(v.strip())
    else:
        raise _RowError("video_frames", f"expected a list of paths, got {type(value).__name__}")
    return [_resolve(v, base) for v in parts if v]


def _parse_item(raw: dict[str, Any], kind: str, base: Path) -> CatalogItem:
    for r in _REQUIRED:
        if r not in raw:
            raise _RowError(r, "required field missing")
        if not _as_text(raw[r], r):
            raise _RowError(r, "required field is empty")
    image = _as_text(raw.get("image_path"), "image_path")
    attributes: dict[str, str] = {}
    for k, v in raw.items():
        if k not in CORE_FIELDS:
            attributes[k] = _as_text(v, k)
    return CatalogItem(
        item_id=_as_text(raw["item_id"], "item_id"),
        title=_as_text(raw["title"], "title"),
        description=_as_text(raw.get("description"), "description"),
        category=_as_text(raw.get("category"), "category"),
        brand=_as_text(raw.get("brand"), "brand"),
        color=_as_text(raw.get("color"), "color"),
        price=_as_number(raw.get("price"), "price", minimum=0.0),
        rating=_as_number(raw.get("rating"), "rating"),
        image_path=_resolve(image, base) if image else None,
        video_frames=_as_frames(raw.get("video_frames"), kind, base),
        attributes=attributes,
    )


def load_catalog_with_report(path: str | os.PathLike[str], skip_bad: bool = False) -> tuple[Catalog, LoadReport]:
    """Read a catalog in the generic format and report what was skipped.

    Parameters
    ----------
    path : str or PathLike
        ``.csv``/``.tsv``/``.jsonl`` file (format chosen by extension).
    skip_bad : bool
        Skip malformed rows (listed in the report) instead of raising.

    Returns
    -------
    catalog : Catalog
        Items in file order, paths resolved to absolute.
    report : LoadReport
        Rows read, loaded and skipped (line and reason).

    Raises
    ------
    CatalogError
        On a malformed row (unless ``skip_bad``) or a problem with the file as a whole.
    """
    p = Path(path)
    kind = _file_kind(p)
    _check_header(p, kind, _REQUIRED)
    base = p.resolve().parent
    report = LoadReport(path=str(p))
    items: list[CatalogItem] = []
    first_line: dict[str, int] = {}
    for line, raw in _iter_rows(p, kind):
        report.rows += 1
        try:
            if isinstance(raw, _RowError):
                raise raw
            item = _parse_item(raw, kind, base)
            if item.item_id in first_line:
                raise _RowError(
                    "item_id", f"duplicate item_id {item.item_id!r} (first seen on line {first_line[item.item_id]})"
                )
        except _RowError as e:
            if not skip_bad:
                raise CatalogError(p, line, e.field, e.reason) from None
            report.skipped.append(SkippedRow(line, e.field, e.reason))
            continue
        first_line[item.item_id] = line
        items.append(item)
    report.loaded = len(items)
    if not items:
        raise CatalogError(p, None, "(file)", f"no valid product rows ({report.num_skipped} skipped)")
    if report.skipped:
        log.warning("%s", report.summary())
    return Catalog(items=items, source=str(p)), report


def load_catalog(path: str | os.PathLike[str], skip_bad: bool = False) -> Catalog:
    """Read a catalog in the generic format (see :func:`load_catalog_with_report`)."""
    return load_catalog_with_report(path, skip_bad=skip_bad)[0]


def image_ok(path: str | os.PathLike[str] | None) -> bool:
    """Whether ``path`` is an image PIL can open, verify and fully decode (False for None/empty/missing)."""
    if not path:
        return False
    try:
        with Image.open(path) as im:
            im.verify()
        with Image.open(path) as im:  # verify() does not decode pixel data: truncated JPEGs pass it
            im.load()
    except Exception:  # noqa: BLE001 -- any failure means "not usable"
        return False
    return True


# ---------------------------------------------------------------------------------------------- writing


def _rel(p: str, base: Path) -> str:
    if p.startswith(("http://", "https://")):
        return p
    try:
        return Path(os.path.relpath(p, base)).as_posix()
    except ValueError:  # different drive on Windows
        return p


def _num(x: float) -> float | None:
    return None if x is None or not math.isfinite(x) else float(x)


def _item_record(item: CatalogItem, base: Path) -> dict[str, Any]:
    rec: dict[str, Any] = {
        "item_id": item.item_id,
        "title": item.title,
        "description": item.description,
        "category": item.category,
        "brand": item.brand,
        "color": item.color,
        "price": _num(item.price),
        "rating": _num(item.rating),
        "image_path": _rel(item.image_path, base) if item.image_path else None,
        "video_frames": [_rel(f, base) for f in item.video_frames],
    }
    for k, v in item.attributes.items():
        if k in rec:
            raise ValueError(f"item {item.item_id!r}: attribute {k!r} clashes with a core column")
        rec[k] = v
    return rec


def save_catalog_jsonl(catalog: Catalog, path: str | os.PathLike[str]) -> None:
    """Write a catalog as JSON Lines (atomically), with paths relative to the file's folder.

    Parameters
    ----------
    catalog : Catalog
        The items to write.
    path : str or PathLike
        Destination ``.jsonl`` file.
    """
    p = Path(path)
    base = p.resolve().parent
    lines = [json.dumps(_item_record(it, base), ensure_ascii=False) for it in catalog]
    payload = ("\n".join(lines) + "\n").encode("utf-8")
    atomic_write(p, lambda f: f.write(payload))


def save_catalog_csv(catalog: Catalog, path: str | os.PathLike[str]) -> None:
    """Write a catalog as CSV/TSV (by extension, atomically), paths relative to the file's folder.

    Extra attribute columns are the union over items, in first-seen order; ``video_frames`` is written as
    a ``;``-separated list (a frame path containing ``;`` raises ``ValueError``).
    """
    p = Path(path)
    delim = _CSV_EXT.get(p.suffix.lower(), ",")
    base = p.resolve().parent
    extra: dict[str, None] = {}
    for it in catalog:
        for k in it.attributes:
            extra.setdefault(k, None)
    cols = [*CORE_FIELDS, *extra]
    buf = io.StringIO(newline="")
    w = csv.writer(buf, delimiter=delim, lineterminator="\n")
    w.writerow(cols)
    for it in catalog:
        rec = _item_record(it, base)
        frames = rec["video_frames"]
        if any(";" in f for f in frames):
            raise ValueError(f"item {it.item_id!r}: a frame path contains ';' and cannot be written to CSV")
        rec["video_frames"] = ";".join(frames)
        w.writerow(["" if rec.get(c) is None else rec.get(c, "") for c in cols])
    payload = buf.getvalue().encode("utf-8")
    atomic_write(p, lambda f: f.write(payload))


def save_catalog(catalog: Catalog, path: str | os.PathLike[str]) -> None:
    """Write a catalog in the generic format chosen by the extension (JSONL or CSV/TSV)."""
    p = Path(path)
    if _file_kind(p) == "jsonl":
        save_catalog_jsonl(catalog, p)
    else:
        save_catalog_csv(catalog, p)


# ---------------------------------------------------------------------------------------------- judgments


def _parse_grade(value: Any, max_grade: int) -> int:
    if isinstance(value, bool) or value is None:
        raise _RowError("grade", f"not an integer grade: {value!r}")
    try:
        x = float(value.strip()) if isinstance(value, str) else float(value)
    except (TypeError, ValueError):
        raise _RowError("grade", f"not an integer grade: {value!r}") from None
    if not math.isfinite(x) or x != int(x):
        raise _RowError("grade", f"not an integer grade: {value!r}")
    g = int(x)
    if not 0 <= g <= max_grade:
        raise _RowError("grade", f"grade {g} outside 0..{max_grade}")
    return g


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
    kind = _file_kind(p)
    if kind == "csv":
        text = _read_text(p)
        first = next(csv.reader(io.StringIO(text, newline=""), delimiter=_CSV_EXT[p.suffix.lower()]), [])
        names = {h.strip().lower() for h in first}
        for r in ("query", "item_id"):
            if r not in names:
                raise CatalogError(p, 1, r, f"required column missing from header (found {sorted(names)})")
        if not names & set(_GRADE_ALIASES):
            raise CatalogError(p, 1, "grade", f"required column missing from header (found {sorted(names)})")
    report = LoadReport(path=str(p))
    out: list[tuple[str, str, int]] = []
    seen: dict[tuple[str, str], tuple[int, int]] = {}
    for line, raw in _iter_rows(p, kind):
        report.rows += 1
        try:
            if isinstance(raw, _RowError):
                raise raw
            row = {k.lower(): v for k, v in raw.items()}
            query = _as_text(row.get("query"), "query")
            if not query:
                raise _RowError("query", "required field is empty" if "query" in row else "required field missing")
            item_id = _as_text(row.get("item_id"), "item_id")
            if not item_id:
                raise _RowError(
                    "item_id", "required field is empty" if "item_id" in row else "required field missing"
                )
            if catalog is not None:
                try:
                    catalog.row(item_id)
                except KeyError:
                    raise _RowError(
                        "item_id", f"unknown item_id {item_id!r} (not in {catalog.source or 'catalog'})"
                    ) from None
            key = next((k for k in _GRADE_ALIASES if k in row), None)
            if key is None:
                raise _RowError("grade", "required field missing")
            grade = _parse_grade(row[key], max_grade)
            prev = seen.get((query, item_id))
            if prev is not None:
                if prev[0] != grade:
                    raise _RowError(
                        "grade", f"conflicting grade {grade} for ({query!r}, {item_id!r}): "
                        f"line {prev[1]} gave {prev[0]}",
                    )
                continue
        except _RowError as e:
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
