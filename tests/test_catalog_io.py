"""Catalog and judgments import/export: the generic format, clear errors, skip_bad, image checks."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from shared_model.catalog_io import (
    CatalogError,
    image_ok,
    load_catalog,
    load_catalog_with_report,
    load_judgments,
    load_judgments_with_report,
    save_catalog,
    save_catalog_csv,
    save_catalog_jsonl,
)
from shared_model.schema import Catalog, CatalogItem

HEADER = "item_id,title,description,category,brand,color,price,rating,image_path,video_frames,pattern"
GOOD_CSV = [
    HEADER,
    'a1,Red Tee,"Soft, cotton",t-shirt,Acme,red,12.5,4.2,img/a1.jpg,vid/a1/f0.jpg;vid/a1/f1.jpg,striped',
    "a2,Blue Mug,,mug,,blue,,,,,",
]


def _write(path: Path, lines: list[str]) -> Path:
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def _jsonl(path: Path, rows: list[object]) -> Path:
    path.write_text("\n".join(r if isinstance(r, str) else json.dumps(r) for r in rows) + "\n", encoding="utf-8")
    return path


def _good_rows() -> list[object]:
    return [
        {"item_id": "a1", "title": "Red Tee", "category": "t-shirt", "price": 12.5, "rating": "4.2",
         "image_path": "img/a1.jpg", "video_frames": ["vid/a1/f0.jpg", "vid/a1/f1.jpg"], "pattern": "striped"},
        {"item_id": "a2", "title": "Blue Mug", "price": None, "image_path": None, "video_frames": []},
    ]


def test_csv_import_resolves_paths_and_keeps_attributes(tmp_path: Path) -> None:
    path = _write(tmp_path / "shop.csv", GOOD_CSV)
    catalog, report = load_catalog_with_report(path)
    assert report.rows == 2 and report.loaded == 2 and report.num_skipped == 0
    a1, a2 = catalog.items
    assert a1.description == "Soft, cotton" and a1.brand == "Acme" and a1.price == 12.5 and a1.rating == 4.2
    assert a1.image_path == os.path.normpath(str(tmp_path / "img" / "a1.jpg"))
    assert a1.video_frames == [os.path.normpath(str(tmp_path / "vid/a1" / f)) for f in ("f0.jpg", "f1.jpg")]
    assert a1.attributes == {"pattern": "striped"} and a1.attribute("pattern") == "striped"
    assert math.isnan(a2.price) and math.isnan(a2.rating) and a2.image_path is None and a2.video_frames == []
    assert catalog.source == str(path)


def test_jsonl_import(tmp_path: Path) -> None:
    path = _jsonl(tmp_path / "shop.jsonl", [*_good_rows(), ""])
    catalog = load_catalog(path)
    assert catalog.ids() == ["a1", "a2"]
    assert catalog.items[0].rating == 4.2 and catalog.items[0].video_frames[1].endswith(os.path.join("a1", "f1.jpg"))
    assert os.path.isabs(catalog.items[0].image_path or "")
    assert math.isnan(catalog.items[1].price)


MALFORMED_CSV = [
    ("a3,,x,mug,,,1,,,,", 3, "title"),  # missing required field
    ("a3,Cup,x,mug,,,cheap,,,,", 3, "price"),  # non-numeric price
    ("a1,Again,x,mug,,,1,,,,", 3, "item_id"),  # duplicate id
    ("a3,Cup,x,mug", 3, "brand"),  # too few columns: names the first missing one
    ("a3,Cup,x,mug,,,1,,,,,extra", 3, "(columns)"),  # too many columns
    ("a3,Cup,x,mug,,,-2,,,,", 3, "price"),  # negative price
    ("a3,Cup,x,mug,,,1,abc,,,", 3, "rating"),
]


@pytest.mark.parametrize(("row", "line", "field"), MALFORMED_CSV)
def test_csv_malformed_rows(tmp_path: Path, row: str, line: int, field: str) -> None:
    path = _write(tmp_path / "bad.csv", [HEADER, GOOD_CSV[1], row, GOOD_CSV[2]])
    with pytest.raises(CatalogError) as ei:
        load_catalog(path)
    e = ei.value
    assert e.line == line and e.field == field
    assert str(path) in str(e) and f":{line}:" in str(e) and f"'{field}'" in str(e)
    catalog, report = load_catalog_with_report(path, skip_bad=True)
    assert catalog.ids() == ["a1", "a2"] and report.num_skipped == 1
    assert report.skipped[0].line == line and report.skipped[0].field == field
    assert "1 skipped" in report.summary()


MALFORMED_JSONL = [
    ('{"item_id": "a3", "title": "Cup", ', "(json)"),  # bad JSON
    ('["a3", "Cup"]', "(json)"),  # not an object
    ({"item_id": "a3"}, "title"),  # missing required field
    ({"item_id": "", "title": "Cup"}, "item_id"),
    ({"item_id": "a3", "title": "Cup", "price": "abc"}, "price"),
    ({"item_id": "a3", "title": "Cup", "price": True}, "price"),
    ({"item_id": "a1", "title": "Cup"}, "item_id"),  # duplicate id
    ({"item_id": "a3", "title": "Cup", "video_frames": [1, 2]}, "video_frames"),
    ({"item_id": "a3", "title": "Cup", "pattern": {"nested": 1}}, "pattern"),
]


@pytest.mark.parametrize(("row", "field"), MALFORMED_JSONL)
def test_jsonl_malformed_rows(tmp_path: Path, row: object, field: str) -> None:
    good = _good_rows()
    path = _jsonl(tmp_path / "bad.jsonl", [good[0], "   ", row, good[1]])
    with pytest.raises(CatalogError) as ei:
        load_catalog(path)
    assert ei.value.line == 3 and ei.value.field == field
    assert str(path) in str(ei.value) and ":3:" in str(ei.value)
    catalog, report = load_catalog_with_report(path, skip_bad=True)
    assert catalog.ids() == ["a1", "a2"] and [s.line for s in report.skipped] == [3]


def test_file_level_errors(tmp_path: Path) -> None:
    with pytest.raises(CatalogError, match="file not found"):
        load_catalog(tmp_path / "none.csv")
    with pytest.raises(CatalogError, match="unknown extension"):
        load_catalog(_write(tmp_path / "shop.xml", ["x"]))
    with pytest.raises(CatalogError, match="'title'") as ei:
        load_catalog(_write(tmp_path / "h.csv", ["item_id,name", "a,b"]))
    assert ei.value.line == 1
    with pytest.raises(CatalogError, match="no valid product rows"):
        load_catalog(_write(tmp_path / "e.csv", [HEADER, "a3,,x,mug,,,1,,,,"]), skip_bad=True)
    (tmp_path / "enc.csv").write_bytes(b"item_id,title\na,ok\nb,\xff\xfe\n")
    with pytest.raises(CatalogError, match="UTF-8") as ei:
        load_catalog(tmp_path / "enc.csv")
    assert ei.value.line == 3


def test_header_case_and_tsv(tmp_path: Path) -> None:
    path = _write(tmp_path / "shop.tsv", [" Item_ID\tTitle\tPrice\tMaterial", "z1\tChair\t99\toak"])
    item = load_catalog(path).items[0]
    assert item.item_id == "z1" and item.price == 99.0 and item.attributes == {"Material": "oak"}


def test_roundtrip_jsonl_and_csv(tmp_path: Path) -> None:
    (tmp_path / "img").mkdir()
    items = [
        CatalogItem("a1", "Red Tee", "Soft, cotton; nice", "t-shirt", "Acme", "red", 12.5, 4.2,
                    str(tmp_path / "img" / "a1.jpg"), [str(tmp_path / "img" / "f0.jpg")], {"pattern": "striped"}),
        CatalogItem("a2", "Mug \u00e9", attributes={"pattern": ""}),
    ]
    catalog = Catalog(items)
    out = tmp_path / "sub"
    out.mkdir()
    for name in ("c.jsonl", "c.csv"):
        save_catalog(catalog, out / name)
        back = load_catalog(out / name)
        for a, b in zip(catalog.items, back.items, strict=True):
            assert (a.item_id, a.title, a.description, a.category, a.brand, a.color, a.image_path, a.video_frames,
                    a.attributes) == (b.item_id, b.title, b.description, b.category, b.brand, b.color,
                                      b.image_path, b.video_frames, b.attributes)
            assert a.price == b.price or (math.isnan(a.price) and math.isnan(b.price))
    first = json.loads((out / "c.jsonl").read_text(encoding="utf-8").splitlines()[0])
    assert first["image_path"] == "../img/a1.jpg" and first["price"] == 12.5
    assert json.loads((out / "c.jsonl").read_text(encoding="utf-8").splitlines()[1])["price"] is None
    save_catalog_jsonl(catalog, out / "d.jsonl")
    save_catalog_csv(catalog, out / "d.csv")
    assert not [p for p in out.iterdir() if p.name.endswith(".tmp")]


def test_image_ok(tmp_path: Path) -> None:
    good = tmp_path / "g.jpg"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(good, quality=90)
    assert image_ok(good) and image_ok(str(good))
    data = good.read_bytes()
    (tmp_path / "t.jpg").write_bytes(data[: len(data) // 2])
    (tmp_path / "junk.jpg").write_bytes(b"not an image")
    assert not image_ok(tmp_path / "t.jpg")
    assert not image_ok(tmp_path / "junk.jpg")
    assert not image_ok(tmp_path / "missing.jpg")
    assert not image_ok(None) and not image_ok("")


def test_missing_image_is_not_an_import_error(tmp_path: Path) -> None:
    path = _write(tmp_path / "shop.csv", ["item_id,title,image_path", "a,Thing,nope/a.jpg"])
    item = load_catalog(path).items[0]
    assert item.image_path and not image_ok(item.image_path)


def test_judgments_formats(tmp_path: Path) -> None:
    csv_path = _write(tmp_path / "j.csv", ["query,item_id,grade", "red tee,a1,3", '"mug, blue",a2,0', "red tee,a1,3"])
    assert load_judgments(csv_path) == [("red tee", "a1", 3), ("mug, blue", "a2", 0)]
    tsv_path = _write(tmp_path / "j.tsv", ["Query\titem_id\trelevance", "red tee\ta1\t4"])
    assert load_judgments(tsv_path) == [("red tee", "a1", 4)]
    jl = _jsonl(tmp_path / "j.jsonl", [{"query": "red tee", "item_id": "a1", "grade": 2.0},
                                       {"query": "red tee", "item_id": "a2", "grade": 2.5}])
    assert load_judgments(jl) == [("red tee", "a1", 2), ("red tee", "a2", 2.5)]


@pytest.mark.parametrize(
    ("row", "field"),
    [("red tee,a1,x", "grade"), ("red tee,a1,-1", "grade"), ("red tee,a1,nan", "grade"), (",a1,1", "query"),
     ("red tee,,1", "item_id"), ("red tee,a1", "grade"), ("red tee,a2,1", "grade")],
)
def test_judgments_errors(tmp_path: Path, row: str, field: str) -> None:
    path = _write(tmp_path / "j.csv", ["query,item_id,grade", "red tee,a2,3", row])
    with pytest.raises(CatalogError) as ei:
        load_judgments(path)
    assert ei.value.line == 3 and ei.value.field == field and str(path) in str(ei.value)
    rows, report = load_judgments_with_report(path, skip_bad=True)
    assert rows == [("red tee", "a2", 3)] and report.num_skipped == 1


def test_judgments_scale_header_and_catalog(tmp_path: Path) -> None:
    path = _write(tmp_path / "j.csv", ["query,item_id,grade", "q,a1,4", "q,zz,1"])
    with pytest.raises(CatalogError, match=r"outside 0\.\.3"):
        load_judgments(path, max_grade=3)
    catalog = Catalog([CatalogItem("a1", "t")])
    with pytest.raises(CatalogError, match="unknown item_id 'zz'") as ei:
        load_judgments(path, catalog=catalog)
    assert ei.value.line == 3 and ei.value.field == "item_id"
    with pytest.raises(CatalogError, match="'grade'"):
        load_judgments(_write(tmp_path / "h.csv", ["query,item_id,score", "q,a1,1"]))
