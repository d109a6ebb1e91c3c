"""Titles-only catalogs: categories, brands, colours and keywords derived from the titles, and the simulator over them.

The fixture is written by the tests: 200 titles from 5 planted product types, brands leading the titles (one of them
two words long) and colour words, so the derived fields can be checked against what was planted.
"""

from __future__ import annotations

import csv
import json
import random
from pathlib import Path

import numpy as np
import pytest
from sklearn.metrics import adjusted_rand_score

from shared_model.catalog_io import load_catalog
from shared_model.schema import Catalog, CatalogItem
from simulations.market_config import make_config
from simulations.market_index import CatalogIndex
from simulations.marketplace import simulate_catalog_dir
from simulations.title_intents import (
    KEYWORD_ATTRIBUTE,
    TitleIntentSettings,
    derive_brands,
    derive_colors,
    fill_missing_intents,
    missing_intent_fields,
    spherical_kmeans,
)

TYPES = {  # planted category -> (head nouns, type-specific words)
    "sneakers": (["sneakers", "trainers"], ["running", "lace-up", "mesh", "sole", "sports"]),
    "dress": (["dress", "maxi dress"], ["floral", "sleeveless", "midi", "party", "wrap"]),
    "mug": (["mug", "coffee mug"], ["ceramic", "350ml", "dishwasher", "handle", "tea"]),
    "lamp": (["lamp", "desk lamp"], ["led", "dimmable", "bedside", "shade", "bulb"]),
    "backpack": (["backpack", "rucksack"], ["laptop", "zip", "travel", "padded", "school"]),
}
BRANDS = ["Nordvik", "Lumio", "Kestrel", "Allen Solly", "Brisa"]
COLOURS = ["Navy Blue", "Red", "Black", "Off White", "Green"]
N_PER_TYPE = 40


def _titles(seed: int = 0) -> list[tuple[str, str, str, str, str]]:
    """``(item_id, title, type, brand, colour)`` rows: brand, optional colour, 1-2 type words, the head noun."""
    rng = random.Random(seed)
    rows: list[tuple[str, str, str, str, str]] = []
    for t, (heads, words) in TYPES.items():
        for _ in range(N_PER_TYPE):
            brand = rng.choice(BRANDS)
            colour = rng.choice(COLOURS) if rng.random() < 0.8 else ""
            extra = rng.sample(words, rng.choice([1, 2]))
            title = " ".join(x for x in [brand, colour, *extra, rng.choice(heads)] if x)
            rows.append((f"p{len(rows):03d}", title, t, brand, colour))
    rng.shuffle(rows)
    return rows


@pytest.fixture(scope="module")
def titles_csv(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("titles") / "titles.csv"
    with path.open("w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["item_id", "title"])
        w.writerows((r[0], r[1]) for r in _titles())
    return path


def _planted() -> dict[str, tuple[str, str, str]]:
    return {r[0]: (r[2], r[3], r[4]) for r in _titles()}


def _stable(record: dict[str, object]) -> dict[str, object]:
    return {k: v for k, v in record.items() if k not in ("seconds", "timings")}


# --------------------------------------------------------------------------------------------- reading


def test_titles_only_csv_loads_with_every_intent_field_missing(titles_csv: Path) -> None:
    catalog = load_catalog(titles_csv)

    assert len(catalog) == len(TYPES) * N_PER_TYPE
    assert all(it.category == it.brand == it.color == "" and it.image_path is None for it in catalog)
    assert missing_intent_fields(catalog) == ["category", "brand", "color"]
    with pytest.raises(ValueError, match="no item has a category.*title_intents"):
        CatalogIndex(catalog, make_config("tiny"))


# --------------------------------------------------------------------------------------------- derivation


def test_derivation_is_deterministic_by_seed(titles_csv: Path) -> None:
    a, b, c = load_catalog(titles_csv), load_catalog(titles_csv), load_catalog(titles_csv)

    ra = fill_missing_intents(a, seed=7)
    rb = fill_missing_intents(b, seed=7)
    rc = fill_missing_intents(c, TitleIntentSettings(num_categories=9, restarts=1), seed=8)

    assert ra is not None and rb is not None and rc is not None
    assert _stable(ra) == _stable(rb)
    fields = [(it.category, it.brand, it.color, it.attributes[KEYWORD_ATTRIBUTE]) for it in a]
    assert fields == [(it.category, it.brand, it.color, it.attributes[KEYWORD_ATTRIBUTE]) for it in b]
    assert rc["seed"] == 8 and rc["k"] == 9


@pytest.mark.parametrize("method", ["tfidf"])
def test_clusters_recover_planted_categories(titles_csv: Path, method: str) -> None:
    catalog = load_catalog(titles_csv)
    planted = _planted()

    record = fill_missing_intents(catalog, TitleIntentSettings(method=method, num_categories=len(TYPES)))

    assert record is not None and record["k"] == len(TYPES)
    truth = [planted[it.item_id][0] for it in catalog]
    got = [it.category for it in catalog]
    assert adjusted_rand_score(truth, got) > 0.8
    names = [c["name"] for c in record["categories"]]
    assert len(set(names)) == len(names) and sum(c["size"] for c in record["categories"]) == len(catalog)
    # each cluster is named by a word of its planted type
    for c in record["categories"]:
        members = [planted[it.item_id][0] for it in catalog if it.category == c["name"]]
        majority = max(set(members), key=members.count)
        heads, words = TYPES[majority]
        assert set(c["name"].split()) & {w for x in [*heads, *words] for w in x.split("-") + x.split()}, c


def test_automatic_k_still_separates_the_planted_types(titles_csv: Path) -> None:
    catalog = load_catalog(titles_csv)
    planted = _planted()

    record = fill_missing_intents(catalog)

    assert record is not None and record["method"] == "tfidf" and record["k"] >= 2
    truth = [planted[it.item_id][0] for it in catalog]
    assert adjusted_rand_score(truth, [it.category for it in catalog]) > 0.5


def test_brands_and_colours_from_titles(titles_csv: Path) -> None:
    catalog = load_catalog(titles_csv)
    planted = _planted()

    fill_missing_intents(catalog)

    brand_ok = [it.brand == planted[it.item_id][1].lower() for it in catalog]
    assert np.mean(brand_ok) == 1.0  # "Allen Solly" kept whole
    colour_map = {"navy blue": "navy", "red": "red", "black": "black", "off white": "off white", "green": "green",
                  "": ""}
    assert all(it.color == colour_map[planted[it.item_id][2].lower()] for it in catalog)
    assert all(it.attributes[KEYWORD_ATTRIBUTE] not in (it.brand, it.color) for it in catalog
               if it.attributes[KEYWORD_ATTRIBUTE])


def test_brand_rules_edge_cases() -> None:
    titles = [t.split() for t in (
        ["acme men blue shirt"] * 3 + ["acme women red top"] * 2 + ["gini and jony men tee"] * 3
        + ["men black shoe"] * 4 + ["classic men shoe"] * 2 + ["2015 edition watch"] * 3 + ["solo"] * 3
    )]

    brands = derive_brands(titles, min_items=3, lead_share=0.8, exclude=frozenset({"black"}))

    assert brands[:5] == ["acme"] * 5  # "men"/"women" never extend a brand: they occur everywhere
    assert brands[5:8] == ["gini and jony"] * 3  # a joiner is judged with the word after it
    assert brands[8:12] == [""] * 4  # "men" leads only some of the titles it is in
    assert brands[12:14] == [""] * 2  # below min_items
    assert brands[14:17] == [""] * 3  # numbers are never brands
    assert brands[17:] == [""] * 3  # the whole title is no brand
    assert derive_colors([["light", "blue", "navy", "blue"], ["grey"], ["gray", "mug"], ["plain"]]) == [
        "light blue", "grey", "grey", ""]


def test_only_missing_fields_are_derived(titles_csv: Path) -> None:
    catalog = load_catalog(titles_csv)
    planted = _planted()
    for it in catalog:
        it.category = planted[it.item_id][0]

    record = fill_missing_intents(catalog)

    assert record is not None and record["fields"] == ["brand", "color"]
    assert "categories" not in record and "k" not in record
    assert [it.category for it in catalog] == [planted[it.item_id][0] for it in catalog]
    assert all(KEYWORD_ATTRIBUTE not in it.attributes for it in catalog)
    assert fill_missing_intents(catalog) is None  # nothing left to derive


def test_spherical_kmeans_separates_blobs_and_numbers_by_size() -> None:
    rng = np.random.default_rng(0)
    centres = np.eye(4)[:3] * 5
    sizes = [10, 30, 20]
    x = np.concatenate([c + rng.normal(0, 0.3, (n, 4)) for c, n in zip(centres, sizes, strict=True)])
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    truth = np.repeat([0, 1, 2], sizes)

    labels = spherical_kmeans(x, 3, seed=1)

    assert adjusted_rand_score(truth, labels) == pytest.approx(1.0)
    assert np.bincount(labels).tolist() == [30, 20, 10]  # largest cluster first
    assert np.array_equal(labels, spherical_kmeans(x, 3, seed=1))
    assert spherical_kmeans(x[:2], 5).tolist() in ([0, 1], [1, 0])  # k capped at the row count


def test_settings_are_checked() -> None:
    with pytest.raises(ValueError, match="unknown title-intent method"):
        TitleIntentSettings(method="lda")
    with pytest.raises(ValueError, match="num_categories"):
        TitleIntentSettings(num_categories=0)


def test_a_catalog_with_every_field_is_left_alone() -> None:
    catalog = Catalog([CatalogItem("a", "Red mug", category="mug", brand="x", color="red"),
                       CatalogItem("b", "Blue cup", category="mug", brand="y", color="blue")])

    assert fill_missing_intents(catalog) is None
    assert [it.attributes for it in catalog] == [{}, {}]


# --------------------------------------------------------------------------------------------- end to end


def test_generate_over_a_titles_only_catalog_records_the_derivation(titles_csv: Path, tmp_path: Path) -> None:
    out = tmp_path / "data"

    simulate_catalog_dir(titles_csv, out, preset="tiny", seed=4, progress=False, num_users=20, sessions_per_user=8)

    meta = json.loads((out / "meta.json").read_text())
    derived = meta["derived_intents"]
    assert derived["fields"] == ["category", "brand", "color", KEYWORD_ATTRIBUTE]
    assert derived["method"] == "tfidf" and derived["seed"] == 4 and derived["k"] >= 2
    assert derived["settings"]["method"] == "tfidf"
    assert len(derived["categories"]) == derived["k"]
    assert {"color", "brand", KEYWORD_ATTRIBUTE} <= set(meta["intent_attributes"])
    assert meta["counts"]["sessions"] > 0 and meta["counts"]["clicks"] > 0
    written = load_catalog(out / "catalog.jsonl")
    assert {it.category for it in written} == {c["name"] for c in derived["categories"]}
    assert all(it.image_path is None for it in written)
    first = (out / "sessions.npz").read_bytes()

    again = tmp_path / "again"
    simulate_catalog_dir(titles_csv, again, preset="tiny", seed=4, progress=False, num_users=20,
                         sessions_per_user=8)

    assert (again / "sessions.npz").read_bytes() == first
    assert (again / "catalog.jsonl").read_bytes() == (out / "catalog.jsonl").read_bytes()


@pytest.mark.slow
def test_embedding_method_and_imageless_features(titles_csv: Path, tmp_path: Path) -> None:
    """MiniLM clusters through the data folder's feature cache; prepare then masks the missing images."""
    from shared_model.embedding_cache import feature_cache_dir
    from shared_model.prepared import prepare

    catalog = load_catalog(titles_csv)
    planted = _planted()
    data = tmp_path / "data"
    data.mkdir()

    record = fill_missing_intents(catalog, TitleIntentSettings(method="embedding", num_categories=len(TYPES)),
                                  data_dir=data)

    assert record is not None and record["method"] == "embedding" and "MiniLM" in record["encoder"]
    truth = [planted[it.item_id][0] for it in catalog]
    assert adjusted_rand_score(truth, [it.category for it in catalog]) > 0.6
    assert any(feature_cache_dir(data).iterdir())

    simulate_catalog_dir(titles_csv, data / "sim", preset="tiny", seed=0, progress=False, num_users=10,
                         sessions_per_user=5)
    prep = prepare(data / "sim", progress=False)

    mask = prep.store.mask
    assert mask[:, 0].all() and not mask[:, 1].any() and not mask[:, 2].any()
    assert not prep.store.image.any()
