"""The Kaggle "Fashion Product Images" layout (``styles.csv`` + ``images/<id>.jpg``) read as a catalog."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from PIL import Image

from fedrank.cli import main
from shared_model.adapters import is_fashion_styles, load_fashion_styles, load_fashion_styles_with_report
from shared_model.catalog_io import CatalogError, load_catalog, load_catalog_with_report

HEADER = "id,gender,masterCategory,subCategory,articleType,baseColour,season,year,usage,productDisplayName"
ROWS = [
    "1163,Men,Apparel,Topwear,Tshirts,Blue,Summer,2011,Sports,Nike Sahara Team India Fanwear Round Neck Jersey",
    "1525,Unisex,Accessories,Bags,Backpacks,Navy Blue,Fall,2010,Casual,Puma Deck Navy Blue Backpack",
    # extra unquoted commas in the title, as some rows of the published file have
    "11293,Women,Accessories,Watches,Watches,Gold,Winter,2016,Casual,Maxima Women Attivo Gold Dial Watch, 28112LMLI",
    '7491,Women,Apparel,Bottomwear,Shorts,Pink,Summer,2011,Sports,"Nike Women\'s EM Tempo 3.5"" Pink Short"',
]


def _styles(folder: Path, rows: list[str] = ROWS, images: tuple[str, ...] = ("1163", "11293")) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "images").mkdir(exist_ok=True)
    for i in images:
        Image.new("RGB", (60, 80), (200, 30, 30)).save(folder / "images" / f"{i}.jpg")
    path = folder / "styles.csv"
    path.write_text("\n".join([HEADER, *rows]) + "\n", encoding="utf-8")
    return path


def test_styles_rows_map_to_catalog_items(tmp_path: Path) -> None:
    # Prepare
    path = _styles(tmp_path / "fashion")
    # Execute
    catalog = load_fashion_styles(path)
    # Assert
    assert catalog.ids() == ["1163", "1525", "11293", "7491"]
    first = catalog.items[0]
    assert first.title == "Nike Sahara Team India Fanwear Round Neck Jersey"
    assert (first.category, first.color, first.brand) == ("Tshirts", "Blue", "Nike")
    assert first.attributes == {"gender": "Men", "masterCategory": "Apparel", "subCategory": "Topwear",
                                "season": "Summer", "year": "2011", "usage": "Sports"}
    assert math.isnan(first.price) and math.isnan(first.rating) and first.video_frames == []
    assert catalog.items[3].title == "Nike Women's EM Tempo 3.5\" Pink Short"


def test_extra_commas_in_the_title_are_kept_in_the_title(tmp_path: Path) -> None:
    watch = load_fashion_styles(_styles(tmp_path / "fashion")).items[2]
    assert watch.title == "Maxima Women Attivo Gold Dial Watch, 28112LMLI"
    assert (watch.brand, watch.color, watch.attribute("usage")) == ("Maxima", "Gold", "Casual")


def test_image_path_only_when_the_photo_exists(tmp_path: Path) -> None:
    path = _styles(tmp_path / "fashion")
    catalog = load_fashion_styles(path)
    by_id = {it.item_id: it.image_path for it in catalog.items}
    assert by_id["1163"] == str((tmp_path / "fashion" / "images" / "1163.jpg").resolve())
    assert by_id["1525"] is None and by_id["7491"] is None  # no photo: the modality is masked


def test_load_catalog_detects_the_styles_header(tmp_path: Path) -> None:
    path = _styles(tmp_path / "fashion")
    catalog, report = load_catalog_with_report(path)
    assert catalog.ids() == load_fashion_styles(path).ids() and catalog.source == str(path)
    assert (report.rows, report.loaded, report.num_skipped) == (4, 4, 0)
    assert is_fashion_styles(HEADER.upper().split(",")) and not is_fashion_styles(["item_id", "title", "id"])


@pytest.mark.parametrize(("row", "field", "reason"), [
    ("1164,Men,Apparel,Topwear,Tshirts,Blue,Summer,2015,Sports,", "productDisplayName", "required field is empty"),
    (",Men,Apparel,Topwear,Tshirts,Blue,Summer,2015,Sports,Nike Tee", "id", "required field is empty"),
    ("1163,Men,Apparel,Topwear,Tshirts,Blue,Summer,2015,Sports,Nike Tee", "id", "duplicate id '1163'"),
    ("1164,Men,Apparel", "subCategory", "wrong column count"),
])
def test_bad_rows_name_line_and_column(tmp_path: Path, row: str, field: str, reason: str) -> None:
    path = _styles(tmp_path / "fashion", [*ROWS, row])
    with pytest.raises(CatalogError, match=reason) as ei:
        load_catalog(path)
    assert (ei.value.path, ei.value.line, ei.value.field) == (str(path), 6, field)
    catalog, report = load_fashion_styles_with_report(path, skip_bad=True)
    assert len(catalog) == 4 and report.num_skipped == 1 and report.skipped[0].line == 6


def test_header_needs_id_and_title(tmp_path: Path) -> None:
    empty = tmp_path / "styles.csv"
    empty.write_text("id,gender,productDisplayName\n", encoding="utf-8")
    with pytest.raises(CatalogError, match="no valid product rows"):
        load_catalog(empty)
    no_title = tmp_path / "h.csv"
    no_title.write_text("id,gender,articleType\n1,Men,Tshirts\n", encoding="utf-8")
    with pytest.raises(CatalogError, match="required column missing") as ei:
        load_fashion_styles(no_title)
    assert ei.value.field == "productDisplayName"


def test_generate_simulates_shoppers_over_a_styles_file(tmp_path: Path) -> None:
    # Prepare: enough items in two article types for the simulator's intents
    rows = [f"{1000 + i},{'Men' if i % 2 else 'Women'},Apparel,Topwear,{'Tshirts' if i % 3 else 'Shirts'},"
            f"{['Blue', 'Red', 'Black'][i % 3]},Summer,2012,Casual,{['Nike', 'Puma'][i % 2]} Cotton Top {i}"
            for i in range(40)]
    path = _styles(tmp_path / "fashion", rows, images=("1000", "1001"))
    out = tmp_path / "gen"
    # Execute
    rc = main(["generate", "--catalog", str(path), "--out", str(out), "--preset", "tiny"])
    # Assert
    assert rc == 0
    meta = json.loads((out / "meta.json").read_text())
    assert meta["load_report"]["loaded"] == 40 and meta["counts"]["items"] == 40
    written = load_catalog(out / "catalog.jsonl")
    assert [it.brand for it in written.items[:2]] == ["Nike", "Puma"]
    assert sum(1 for it in written.items if it.image_path) == 2
