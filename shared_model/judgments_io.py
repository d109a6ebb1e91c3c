"""Relevance-judgment import: ``query,item_id,grade`` rows, decimal grades, any range, text labels through a label map.

Format (see also :mod:`shared_model.catalog_io`)
------------------------------------------------
CSV/TSV with a header, or JSONL objects. Columns, matched case-insensitively (first alias present wins):

* ``query`` -- the query text, non-empty.
* ``item_id`` or ``product_id`` (ESCI's name) -- must be in the catalog when one is given.
* ``grade``, ``relevance``, ``label`` or ``esci_label`` (ESCI's name) -- a number >= 0 (integer or decimal, e.g.
  ``1.33`` for averaged annotator scores; any top grade: 0..3, 0..4, 0..6, ...), or a text label looked up in the
  label map.

Other columns (ESCI's ``query_id``, ``product_locale``, ...) are ignored. So ESCI's examples table loads as it is.

Label maps
----------
A label map turns text labels into grades. The default, :data:`DEFAULT_LABEL_MAP`, is ESCI's: Exact = 3,
Substitute = 2, Complement = 1, Irrelevant = 0, matched case-insensitively as the full word or its initial
(``E``, ``exact``, ``Exact`` ...). It keeps fedrank's 0..3 scale, where grade 3 is the exact match MRR looks for.
A map of your own (:func:`parse_label_map`: ``"E=3,S=2,C=1,I=0"``, or a JSON/TOML file of label -> grade)
replaces the default; e.g. the KDD Cup 2022 ESCI gains are ``E=1,S=0.1,C=0.01,I=0`` with the linear gain.
A label is looked up before a value is read as a number, so a map can also rename numeric grades
(``"1=0,2=1,3=2,4=3,5=4"`` turns a 1..5 scale into 0..4).
"""

from __future__ import annotations

import json
import logging
import math
import os
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from shared_model.catalog_rows import (
    GRADE_ALIASES,
    ITEM_ID_ALIASES,
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

__all__ = [
    "DEFAULT_LABEL_MAP",
    "Judgment",
    "LabelMap",
    "load_judgments",
    "load_judgments_with_report",
    "parse_label_map",
]

# import warnings keep the logger name they had before judgments moved out of catalog_io
log = logging.getLogger("shared_model.catalog_io")

Judgment = tuple[str, str, float]  # (query, item_id, grade)


@dataclass(frozen=True)
class LabelMap:
    """Text label -> grade, matched case-insensitively (blanks around a label ignored).

    Attributes
    ----------
    grades : dict[str, float]
        As written by its author (kept for ``results.json``).
    source : str
        Where it came from: ``"default (ESCI)"``, a file path or ``"--label-map E=3,..."``.
    """

    grades: dict[str, float]
    source: str
    _lookup: dict[str, float] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "_lookup", {k.strip().lower(): float(v) for k, v in self.grades.items()})

    def get(self, label: str) -> float | None:
        """The grade of ``label``, or None when the map does not have it."""
        return self._lookup.get(label.strip().lower())

    def to_json(self) -> dict[str, Any]:
        return {"source": self.source, "grades": dict(self.grades)}


DEFAULT_LABEL_MAP = LabelMap(
    {"E": 3.0, "S": 2.0, "C": 1.0, "I": 0.0, "Exact": 3.0, "Substitute": 2.0, "Complement": 1.0, "Irrelevant": 0.0},
    "default (ESCI)",
)


def _label_entries(items: Mapping[Any, Any], source: str) -> LabelMap:
    grades: dict[str, float] = {}
    seen: dict[str, str] = {}
    for key, value in items.items():
        label = str(key).strip()
        if not label:
            raise CatalogError(source, None, "(label-map)", "empty label")
        if isinstance(value, bool) or not isinstance(value, int | float | str):
            raise CatalogError(source, None, label, f"grade must be a number, got {value!r}")
        try:
            g = float(value)
        except ValueError:
            raise CatalogError(source, None, label, f"grade must be a number, got {value!r}") from None
        if not math.isfinite(g) or g < 0:
            raise CatalogError(source, None, label, f"grade must be a finite number >= 0, got {value!r}")
        if label.lower() in seen:
            raise CatalogError(source, None, label, f"label given twice (also as {seen[label.lower()]!r})")
        seen[label.lower()] = label
        grades[label] = g
    if not grades:
        raise CatalogError(source, None, "(label-map)", "no labels")
    return LabelMap(grades, source)


def _label_file(path: Path) -> LabelMap:
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise CatalogError(path, None, "(file)", f"cannot read label map: {e}") from None
    suffix = path.suffix.lower()
    try:
        doc: Any = tomllib.loads(text) if suffix == ".toml" else json.loads(text)
    except (tomllib.TOMLDecodeError, json.JSONDecodeError) as e:
        raise CatalogError(path, None, "(file)", f"invalid {'TOML' if suffix == '.toml' else 'JSON'}: {e}") from None
    if isinstance(doc, dict) and len(doc) == 1 and isinstance(next(iter(doc.values())), dict):
        doc = next(iter(doc.values()))  # one table, e.g. [label-map]
    if not isinstance(doc, dict):
        raise CatalogError(path, None, "(file)", "a label map is an object/table of label -> grade")
    return _label_entries(doc, str(path))


def parse_label_map(spec: str | os.PathLike[str] | Mapping[str, float]) -> LabelMap:
    """A label map from a mapping, a ``.json``/``.toml`` file, or inline ``"E=3,S=2,C=1,I=0"``.

    Raises
    ------
    CatalogError
        Naming the file (or ``--label-map``) and the label: not a number, negative, given twice, no labels.
    """
    if isinstance(spec, Mapping):
        return _label_entries(spec, "label map")
    text = os.fspath(spec)
    path = Path(text).expanduser()
    if path.suffix.lower() in (".json", ".toml") or path.is_file():
        if not path.is_file():
            raise CatalogError(path, None, "(file)", "label map file not found")
        return _label_file(path)
    source = f"--label-map {text}"
    pairs: dict[str, str] = {}
    for part in text.split(","):
        if not part.strip():
            continue
        label, sep, value = part.partition("=")
        if not sep:
            raise CatalogError(source, None, part.strip(), "expected LABEL=GRADE pairs separated by commas, "
                               "or a .json/.toml file")
        if label.strip().lower() in {k.lower() for k in pairs}:
            raise CatalogError(source, None, label.strip(), "label given twice")
        pairs[label.strip()] = value.strip()
    return _label_entries(pairs, source)


@dataclass
class _GradeReader:
    """Reads one grade field: a label of ``labels``, else a number >= 0 (and <= ``max_grade`` when given)."""

    labels: LabelMap
    max_grade: float | None
    seen: dict[str, int] = field(default_factory=dict)

    def __call__(self, value: Any) -> float:
        if isinstance(value, bool) or value is None:
            raise RowError("grade", f"not a grade: {value!r}")
        if isinstance(value, str | int):
            g = self.labels.get(str(value))
            if g is not None:
                name = str(value).strip()
                self.seen[name] = self.seen.get(name, 0) + 1
                return self._in_range(g, value)
        if isinstance(value, str):
            try:
                x = float(value.strip())
            except ValueError:
                some = ", ".join(list(self.labels.grades)[:8])
                raise RowError("grade", f"not a grade: {value!r} (neither a number nor a label of the label map "
                                        f"[{some}])") from None
        elif isinstance(value, int | float):
            x = float(value)
        else:
            raise RowError("grade", f"not a grade: {value!r}")
        if not math.isfinite(x):
            raise RowError("grade", f"not a finite grade: {value!r}")
        if x < 0:
            raise RowError("grade", f"negative grade {x:g}: grades are >= 0 (a label map can rename a scale)")
        return self._in_range(x, value)

    def _in_range(self, g: float, raw: Any) -> float:
        if self.max_grade is not None and g > self.max_grade:
            raise RowError("grade", f"grade {g:g} outside 0..{self.max_grade:g}" + (
                f" (label {raw!r})" if isinstance(raw, str) and self.labels.get(raw) is not None else ""))
        return g


def _check_judgments_header(path: Path) -> None:
    names = header_names(path)
    found = f"found {sorted(names)}"
    if "query" not in names:
        raise CatalogError(path, 1, "query", f"required column missing from header ({found})")
    if not names & set(ITEM_ID_ALIASES):
        raise CatalogError(path, 1, "item_id", f"required column missing from header ({found}; "
                                               f"accepted names: {', '.join(ITEM_ID_ALIASES)})")
    if not names & set(GRADE_ALIASES):
        raise CatalogError(path, 1, "grade", f"required column missing from header ({found}; "
                                             f"accepted names: {', '.join(GRADE_ALIASES)})")


def _parse_judgment(raw: dict[str, Any], grade: _GradeReader, catalog: Catalog | None) -> Judgment:
    """One row as ``(query, item_id, grade)``; :class:`RowError` when a field is missing or invalid."""
    row = {k.lower(): v for k, v in raw.items()}
    query = as_text(row.get("query"), "query")
    if not query:
        raise RowError("query", "required field is empty" if "query" in row else "required field missing")
    id_key = next((k for k in ITEM_ID_ALIASES if k in row), "item_id")
    item_id = as_text(row.get(id_key), id_key)
    if not item_id:
        raise RowError(id_key, "required field is empty" if id_key in row else "required field missing")
    if catalog is not None:
        try:
            catalog.row(item_id)
        except KeyError:
            raise RowError(
                id_key, f"unknown item_id {item_id!r} (not in {catalog.source or 'catalog'})"
            ) from None
    key = next((k for k in GRADE_ALIASES if k in row), None)
    if key is None:
        raise RowError("grade", "required field missing")
    try:
        return query, item_id, grade(row[key])
    except RowError as e:
        raise RowError(key, e.reason) from None


def load_judgments_with_report(
    path: str | os.PathLike[str],
    skip_bad: bool = False,
    max_grade: float | None = None,
    catalog: Catalog | None = None,
    label_map: LabelMap | None = None,
) -> tuple[list[Judgment], LoadReport]:
    """Read graded relevance judgments ``(query, item_id, grade)`` (format in the module docstring).

    Parameters
    ----------
    path : str or PathLike
        CSV/TSV with a header, or JSONL objects.
    skip_bad : bool
        Skip malformed rows (listed in the report) instead of raising.
    max_grade : float, optional
        Largest accepted grade (after the label map); None (default) accepts any grade >= 0.
    catalog : Catalog, optional
        When given, an item not in the catalog is a malformed row.
    label_map : LabelMap, optional
        Text label -> grade; :data:`DEFAULT_LABEL_MAP` (ESCI's E/S/C/I) when None.

    Returns
    -------
    judgments : list of (str, str, float)
        In file order; exact duplicates dropped.
    report : LoadReport
        Rows read, loaded and skipped; ``labels``: how many rows each text label graded.

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
    grade = _GradeReader(label_map or DEFAULT_LABEL_MAP, None if max_grade is None else float(max_grade))
    out: list[Judgment] = []
    seen: dict[tuple[str, str], tuple[float, int]] = {}
    for line, raw in iter_rows(p, kind):
        report.rows += 1
        try:
            if isinstance(raw, RowError):
                raise raw
            query, item_id, g = _parse_judgment(raw, grade, catalog)
            prev = seen.get((query, item_id))
            if prev is not None:
                if prev[0] != g:
                    raise RowError(
                        "grade", f"conflicting grade {g:g} for ({query!r}, {item_id!r}): "
                        f"line {prev[1]} gave {prev[0]:g}",
                    )
                continue
        except RowError as e:
            if not skip_bad:
                raise CatalogError(p, line, e.field, e.reason) from None
            report.skipped.append(SkippedRow(line, e.field, e.reason))
            continue
        seen[(query, item_id)] = (g, line)
        out.append((query, item_id, g))
    report.loaded = len(out)
    report.labels = dict(grade.seen)
    if report.skipped:
        log.warning("%s", report.summary())
    return out, report


def load_judgments(
    path: str | os.PathLike[str],
    skip_bad: bool = False,
    max_grade: float | None = None,
    catalog: Catalog | None = None,
    label_map: LabelMap | None = None,
) -> list[Judgment]:
    """Read graded relevance judgments (see :func:`load_judgments_with_report`)."""
    return load_judgments_with_report(path, skip_bad=skip_bad, max_grade=max_grade, catalog=catalog,
                                      label_map=label_map)[0]
