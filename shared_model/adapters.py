"""Catalog layouts other than fedrank's generic format, read into the same :class:`~shared_model.schema.Catalog`.

Kaggle "Fashion Product Images" (``styles.csv`` + ``images/<id>.jpg``)
-----------------------------------------------------------------------
Header ``id,gender,masterCategory,subCategory,articleType,baseColour,season,year,usage,productDisplayName``
(recognised by ``id`` and ``productDisplayName`` without ``item_id``/``title``; names in any case; only those two
columns are required). Each row becomes one item:

=========================  ============================================================================
item field                 from
=========================  ============================================================================
``item_id``                ``id``
``title``                  ``productDisplayName`` (required, non-empty)
``category``               ``articleType`` (Tshirts, Watches, Casual Shoes, ...)
``color``                  ``baseColour``
``brand``                  the first word of the title (``Nike Men Blue T20 ...`` -> ``Nike``): the file has no
                           brand column and titles start with the brand; multi-word brands are cut to their
                           first word (``United Colors of Benetton`` -> ``United``, ``Red Tape`` -> ``Red``)
``image_path``             ``images/<id>.jpg`` beside the file when that file exists, else none (the feature
                           store masks the modality)
``attributes``             every other column as text: ``gender``, ``masterCategory``, ``subCategory``,
                           ``season``, ``year``, ``usage`` (and any extra column)
``price``, ``rating``      unknown (NaN): the file has none (a ``description``, ``price`` or ``rating``
                           column added to the file is read as in the generic format)
=========================  ============================================================================

Some rows of the published file have unquoted commas in ``productDisplayName`` (11 or more fields where the
header has 10). The title is the file's last column, so the extra fields are joined back into it with their
commas. Other malformed rows (empty id or title, duplicate id) raise :class:`CatalogError` naming the line and
the file's own column, or are skipped and counted with ``skip_bad=True``.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from shared_model.catalog_rows import (
    CatalogError,
    LoadReport,
    RowError,
    as_number,
    as_text,
    collect_items,
    header_names,
    iter_rows,
)
from shared_model.schema import CORE_FIELDS, Catalog, CatalogItem

__all__ = [
    "FASHION_STYLES_COLUMNS",
    "is_fashion_styles",
    "load_fashion_styles",
    "load_fashion_styles_with_report",
]

log = logging.getLogger(__name__)

FASHION_STYLES_COLUMNS = (
    "id", "gender", "masterCategory", "subCategory", "articleType", "baseColour", "season", "year", "usage",
    "productDisplayName",
)
_ID, _TITLE, _CATEGORY, _COLOR = "id", "productDisplayName", "articleType", "baseColour"
_CANONICAL = {c.lower(): c for c in FASHION_STYLES_COLUMNS}


def is_fashion_styles(names: Iterable[str]) -> bool:
    """Whether a CSV header (column names, any case) is the Kaggle fashion ``styles.csv`` layout."""
    lower = {n.strip().lower() for n in names}
    return {_ID, _TITLE.lower()} <= lower and not lower & {"item_id", "title"}


def _image_names(folder: Path) -> set[str]:
    """File names in ``folder`` (one listing instead of a stat per row); empty when it does not exist."""
    try:
        with os.scandir(folder) as it:
            return {e.name for e in it}
    except OSError:
        return set()


def _style_item(raw: dict[str, Any], images: Path, image_names: set[str]) -> CatalogItem:
    row = {_CANONICAL.get(k.strip().lower(), k.strip()): v for k, v in raw.items()}
    item_id = as_text(row.get(_ID), _ID)
    if not item_id:
        raise RowError(_ID, "required field is empty")
    title = as_text(row.get(_TITLE), _TITLE)
    if not title:
        raise RowError(_TITLE, "required field is empty (the product's title)")
    mapped = {_ID, _TITLE, _CATEGORY, _COLOR}
    attributes = {k: as_text(v, k) for k, v in row.items() if k not in mapped and k not in CORE_FIELDS}
    image = f"{item_id}.jpg"
    return CatalogItem(
        item_id=item_id,
        title=title,
        description=as_text(row.get("description"), "description"),
        category=as_text(row.get(_CATEGORY), _CATEGORY),
        brand=title.split()[0],
        color=as_text(row.get(_COLOR), _COLOR),
        price=as_number(row.get("price"), "price", minimum=0.0),
        rating=as_number(row.get("rating"), "rating"),
        image_path=str(images / image) if image in image_names else None,
        attributes=attributes,
    )


def load_fashion_styles_with_report(
    path: str | os.PathLike[str], skip_bad: bool = False,
) -> tuple[Catalog, LoadReport]:
    """Read a Kaggle fashion ``styles.csv`` (mapping in the module docstring) and report what was skipped.

    Parameters
    ----------
    path : str or PathLike
        The ``styles.csv`` file; photos are looked up in ``images/`` beside it.
    skip_bad : bool
        Skip malformed rows (listed in the report) instead of raising.

    Returns
    -------
    catalog : Catalog
        Items in file order, image paths absolute.
    report : LoadReport
        Rows read, loaded and skipped.

    Raises
    ------
    CatalogError
        On a malformed row (unless ``skip_bad``), a header without ``id``/``productDisplayName``, or no valid row.
    """
    p = Path(path)
    names = header_names(p)
    for required in (_ID, _TITLE):
        if required.lower() not in names:
            raise CatalogError(p, 1, required, f"required column missing from header (found {sorted(names)})")
    images = p.resolve().parent / "images"
    image_names = _image_names(images)
    rows = iter_rows(p, "csv", absorb_extra=_TITLE)
    return collect_items(p, rows, lambda raw: _style_item(raw, images, image_names), skip_bad, id_field=_ID)


def load_fashion_styles(path: str | os.PathLike[str], skip_bad: bool = False) -> Catalog:
    """Read a Kaggle fashion ``styles.csv`` (see :func:`load_fashion_styles_with_report`)."""
    return load_fashion_styles_with_report(path, skip_bad=skip_bad)[0]
