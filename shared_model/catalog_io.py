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
``query,item_id,grade`` rows (CSV/TSV with a header, or JSONL objects with those keys), the shape of ESCI /
product-search relevance sets: ``product_id`` is accepted for ``item_id``; ``relevance``, ``label`` and
``esci_label`` for ``grade``. Grades are numbers >= 0, integer or decimal (averaged annotator scores such as
``1.33``), on any scale (0..3 as the simulator writes, 0..4, 0..6, ...), or text labels turned into grades by a
label map (default: ESCI's Exact = 3, Substitute = 2, Complement = 1, Irrelevant = 0). Pass ``max_grade`` to
reject grades above a scale's top. Details in :mod:`shared_model.judgments_io`.

Other catalog layouts
---------------------
A CSV whose header is the Kaggle "Fashion Product Images" ``styles.csv`` one (``id``, ``productDisplayName``,
no ``item_id``/``title``) is read by :func:`shared_model.adapters.load_fashion_styles` wherever a catalog is
loaded.

Modules
-------
This module reads and writes catalogs and re-exports the judgment readers
(:mod:`shared_model.judgments_io`) and the row/error types (:mod:`shared_model.catalog_rows`) they share; the
``styles.csv`` reader is in :mod:`shared_model.adapters`.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import math
import os
from pathlib import Path
from typing import Any

from PIL import Image

from shared_model.adapters import is_fashion_styles, load_fashion_styles_with_report
from shared_model.catalog_rows import (
    CSV_EXT,
    CatalogError,
    LoadReport,
    RowError,
    SkippedRow,
    as_number,
    as_text,
    check_header,
    collect_items,
    file_kind,
    header_names,
    iter_rows,
)
from shared_model.judgments_io import (
    DEFAULT_LABEL_MAP,
    Judgment,
    LabelMap,
    load_judgments,
    load_judgments_with_report,
    parse_label_map,
)
from shared_model.schema import CORE_FIELDS, Catalog, CatalogItem, atomic_write

__all__ = [
    "DEFAULT_LABEL_MAP",
    "CatalogError",
    "Judgment",
    "LabelMap",
    "LoadReport",
    "SkippedRow",
    "image_ok",
    "load_catalog",
    "load_catalog_with_report",
    "load_judgments",
    "load_judgments_with_report",
    "parse_label_map",
    "save_catalog",
    "save_catalog_csv",
    "save_catalog_jsonl",
]

log = logging.getLogger(__name__)

_REQUIRED = ("item_id", "title")


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
            raise RowError("video_frames", "looks like a JSON list but does not parse") from None
    if isinstance(value, str):
        parts = [v.strip() for v in value.split(";")]
    elif isinstance(value, list):
        parts = []
        for v in value:
            if not isinstance(v, str):
                raise RowError("video_frames", f"frame paths must be strings, got {type(v).__name__}")
            parts.append(v.strip())
    else:
        raise RowError("video_frames", f"expected a list of paths, got {type(value).__name__}")
    return [_resolve(v, base) for v in parts if v]


def _parse_item(raw: dict[str, Any], kind: str, base: Path) -> CatalogItem:
    for r in _REQUIRED:
        if r not in raw:
            raise RowError(r, "required field missing")
        if not as_text(raw[r], r):
            raise RowError(r, "required field is empty")
    image = as_text(raw.get("image_path"), "image_path")
    attributes: dict[str, str] = {}
    for k, v in raw.items():
        if k not in CORE_FIELDS:
            attributes[k] = as_text(v, k)
    return CatalogItem(
        item_id=as_text(raw["item_id"], "item_id"),
        title=as_text(raw["title"], "title"),
        description=as_text(raw.get("description"), "description"),
        category=as_text(raw.get("category"), "category"),
        brand=as_text(raw.get("brand"), "brand"),
        color=as_text(raw.get("color"), "color"),
        price=as_number(raw.get("price"), "price", minimum=0.0),
        rating=as_number(raw.get("rating"), "rating"),
        image_path=_resolve(image, base) if image else None,
        video_frames=_as_frames(raw.get("video_frames"), kind, base),
        attributes=attributes,
    )


def load_catalog_with_report(path: str | os.PathLike[str], skip_bad: bool = False) -> tuple[Catalog, LoadReport]:
    """Read a catalog in the generic format (or a Kaggle fashion ``styles.csv``) and report what was skipped.

    Parameters
    ----------
    path : str or PathLike
        ``.csv``/``.tsv``/``.jsonl`` file (format chosen by extension); a CSV with the ``styles.csv`` header is
        read by :func:`shared_model.adapters.load_fashion_styles_with_report`.
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
    kind = file_kind(p)
    if kind == "csv" and is_fashion_styles(header_names(p)):
        return load_fashion_styles_with_report(p, skip_bad=skip_bad)
    check_header(p, kind, _REQUIRED)
    base = p.resolve().parent
    return collect_items(p, iter_rows(p, kind), lambda raw: _parse_item(raw, kind, base), skip_bad)


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
    delim = CSV_EXT.get(p.suffix.lower(), ",")
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
    if file_kind(p) == "jsonl":
        save_catalog_jsonl(catalog, p)
    else:
        save_catalog_csv(catalog, p)
