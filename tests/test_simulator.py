"""The marketplace simulator: determinism, log contract, click model, title/image/video ground truth."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageFilter

from shared_model.catalog_io import load_catalog, load_judgments
from shared_model.schema import CatalogItem, SessionLog
from simulations.marketplace import (
    FEATURE,
    SYNONYMS,
    generate_catalog,
    generate_marketplace,
    make_config,
    render_seed,
    save_session_log,
    simulate_catalog_dir,
    simulate_over_catalog,
)
from simulations.render import COLOR_RGB, ItemLook, nearest_color, render_still

SMALL = {"num_items": 120, "num_users": 12, "sessions_per_user": 10}


@pytest.fixture(scope="module")
def market(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("market") / "m"
    return generate_marketplace(out, preset="tiny", seed=3, progress=False, workers=1, **SMALL)


@pytest.fixture(scope="module")
def big_log() -> SessionLog:
    """More sessions (no rendering) for statistical checks."""
    cfg = make_config("tiny", seed=5)
    catalog, _ = generate_catalog(cfg, "/nonexistent")
    return simulate_over_catalog(catalog, cfg, progress=False)


def _sid(log: SessionLog) -> tuple[np.ndarray, np.ndarray]:
    lens = np.diff(log.offsets)
    sid = np.repeat(np.arange(len(log)), lens)
    return sid, np.arange(int(log.offsets[-1])) - log.offsets[sid]


def test_output_layout(market: Path) -> None:
    for name in ("catalog.jsonl", "sessions.npz", "users.json", "judgments.csv", "meta.json"):
        assert (market / name).is_file(), name
    meta = json.loads((market / "meta.json").read_text())
    assert meta["ground_truth"]["eta"] == pytest.approx(1.0)
    assert meta["config"]["seed"] == 3
    assert meta["counts"]["items"] == 120
    catalog = load_catalog(market / "catalog.jsonl")
    assert all(it.image_path is not None and Path(it.image_path).is_file() for it in catalog)
    videos = [it for it in catalog if it.video_frames]
    assert videos and all(len(it.video_frames) == 4 and all(Path(f).is_file() for f in it.video_frames)
                          for it in videos)
    raw = (market / "catalog.jsonl").read_text().splitlines()[0]
    assert json.loads(raw)["image_path"] == "images/p000000.jpg"  # relative in the file
    users = json.loads((market / "users.json").read_text())
    assert len(users["users"]) == 12 and {"segment", "color_pref", "brand_pref"} <= set(users["users"][0])
    judgments = load_judgments(market / "judgments.csv", catalog=catalog)
    assert judgments and all(0 <= g <= 3 for _, _, g in judgments)


def test_deterministic_bytes_and_idempotent(market: Path, tmp_path: Path) -> None:
    again = generate_marketplace(tmp_path / "m", preset="tiny", seed=3, progress=False, workers=1, **SMALL)
    for name in ("catalog.jsonl", "sessions.npz"):
        assert (market / name).read_bytes() == (again / name).read_bytes(), name
    stamp = (again / "sessions.npz").stat().st_mtime_ns
    generate_marketplace(again, preset="tiny", seed=3, progress=False, workers=1, **SMALL)
    assert (again / "sessions.npz").stat().st_mtime_ns == stamp  # same config: nothing redone


def test_different_seed_differs(market: Path) -> None:
    log = SessionLog.load(market / "sessions.npz")
    catalog = load_catalog(market / "catalog.jsonl")
    other = simulate_over_catalog(catalog, make_config("tiny", seed=4, **SMALL), progress=False)
    assert len(other.items) != len(log.items) or not np.array_equal(other.items, log.items)
    cat_a, _ = generate_catalog(make_config("tiny", seed=3, **SMALL), "/x")
    cat_b, _ = generate_catalog(make_config("tiny", seed=4, **SMALL), "/x")
    assert [it.title for it in cat_a] != [it.title for it in cat_b]


def test_imported_catalog_reproduces_generated_sessions(market: Path) -> None:
    """The generic simulation over the exported catalog is the generator's own simulation."""
    log = SessionLog.load(market / "sessions.npz")
    again = simulate_over_catalog(load_catalog(market / "catalog.jsonl"), make_config("tiny", seed=3, **SMALL),
                                  progress=False)
    for k in SessionLog.ARRAYS:
        np.testing.assert_array_equal(getattr(log, k), getattr(again, k), err_msg=k)
    assert log.queries == again.queries


def test_session_log_contract_and_roundtrip(market: Path, tmp_path: Path) -> None:
    log = SessionLog.load(market / "sessions.npz")
    assert log.user.dtype == np.int32 and log.items.dtype == np.int32 and log.prod_rank.dtype == np.int16
    assert log.offsets.dtype == np.int64 and log.grades.dtype == np.uint8 and log.randomized.dtype == bool
    lens = np.diff(log.offsets)
    assert lens.min() >= 20 and lens.max() <= 50
    assert set(np.unique(log.grades)) <= {0, 1, 2, 3}
    assert np.all(np.abs(log.utility) <= 1.0)
    assert np.all(log.purchases <= log.clicks)
    assert log.query.min() >= 0 and log.query.max() < len(log.queries) and len(set(log.queries)) == len(log.queries)
    for s in range(len(log)):
        sl = log.slate(s)
        assert sorted(log.prod_rank[sl].tolist()) == list(range(sl.stop - sl.start))
        assert len(set(log.items[sl].tolist())) == sl.stop - sl.start  # no duplicates in a slate
        assert log.grades[sl].max() >= 2  # the intent's target item is always retrieved
        if not log.randomized[s]:
            assert np.array_equal(log.prod_rank[sl], np.arange(sl.stop - sl.start))
            assert np.all(np.diff(log.retrieval_score[sl]) <= 0)
    for u in np.unique(log.user):
        assert np.all(np.diff(log.timestamp[log.user == u]) > 0)
    save_session_log(log, tmp_path / "a.npz")
    log.save(tmp_path / "b.npz")
    for path in (tmp_path / "a.npz", tmp_path / "b.npz"):
        back = SessionLog.load(path)
        for k in SessionLog.ARRAYS:
            np.testing.assert_array_equal(getattr(back, k), getattr(log, k), err_msg=k)
        assert back.queries == log.queries


def test_position_bias_and_randomized_sessions(big_log: SessionLog) -> None:
    log = big_log
    assert 0.02 < log.randomized.mean() < 0.1
    sid, pos = _sid(log)
    ctr = [log.clicks[(pos >= a) & (pos < b)].mean() for a, b in ((0, 3), (3, 10), (10, 20), (20, 50))]
    assert ctr[0] > ctr[1] > ctr[2] > ctr[3]
    rnd = log.randomized[sid]  # random display order: the decline is position bias alone
    assert log.clicks[rnd & (pos < 5)].mean() > 2 * log.clicks[rnd & (pos >= 10)].mean()
    # production order is informative: grades fall with production rank
    assert log.grades[log.prod_rank < 5].mean() > log.grades[log.prod_rank >= 20].mean()
    # clicks prefer relevant items
    assert log.clicks[log.grades == 3].mean() > 3 * log.clicks[log.grades <= 1].mean()


def test_queries_use_intents(big_log: SessionLog) -> None:
    qs = big_log.queries
    assert any(len(q.split()) == 1 for q in qs)  # vague queries
    feature_words = SYNONYMS["feature"][FEATURE]
    assert any(any(w in q for w in feature_words) for q in qs)
    assert any("crimson" in q for q in qs) and any(re.search(r"\bred\b", q) for q in qs)


def _color_words() -> dict[str, str]:
    return {w: c for c, ws in SYNONYMS["color"].items() for w in ws}


def test_titles_omit_colour_but_image_shows_it(market: Path) -> None:
    catalog = load_catalog(market / "catalog.jsonl")
    words = _color_words()
    omitted = 0
    for i, it in enumerate(catalog):
        text = f" {it.title} {it.description} ".lower()
        if not any(re.search(rf"\b{re.escape(w)}\b", text) for w in words):
            omitted += 1
        look = ItemLook(it.category, COLOR_RGB[it.color], it.attributes["pattern"])
        _, mask = render_still(look, render_seed(3, i))
        inner = np.asarray(Image.fromarray(mask.astype(np.uint8) * 255).filter(ImageFilter.MinFilter(5))) > 0
        assert it.image_path is not None
        pixels = np.asarray(Image.open(it.image_path).convert("RGB"))[inner]
        assert nearest_color(pixels.mean(0)) == it.color, (it.item_id, it.color, pixels.mean(0))
    assert 0.25 < omitted / len(catalog) < 0.65


def test_video_only_feature(market: Path) -> None:
    catalog = load_catalog(market / "catalog.jsonl")
    lit = [it for it in catalog if it.attributes.get("feature")]
    assert lit and all(it.attributes["feature"] == FEATURE and it.video_frames for it in lit)
    banned = re.compile(r"light|\bled\b|glow", re.IGNORECASE)
    assert not any(banned.search(it.title) or banned.search(it.description) for it in catalog)

    def warm_shift(it: CatalogItem) -> float:  # yellow glow raises R - B from frame 0 to the last frame
        f0, f3 = (np.asarray(Image.open(f).convert("RGB"), dtype=np.float64) for f in it.video_frames[::3])
        return float((f3[..., 0] - f3[..., 2]).mean() - (f0[..., 0] - f0[..., 2]).mean())

    others = [it for it in catalog if it.video_frames and not it.attributes.get("feature")]
    assert np.mean([warm_shift(it) for it in lit]) > np.mean([warm_shift(it) for it in others]) + 3.0


def test_simulation_over_imported_catalog_without_images(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    rows = ["item_id,title,category,brand,color,price,rating,image_path,video_frames,style,size"]
    cats, brands, colors = ["shoe", "bag", "book"], ["Acme", "Globex", ""], ["Navy", "tan", ""]
    for i in range(60):
        c = cats[i % 3] if i % 17 else ""
        rows.append(f"x{i},Item {i} {c},{c},{brands[i % 3]},{colors[(i // 3) % 3]},{'' if i % 7 == 0 else 10 + i},"
                    f"{rng.uniform(1, 5):.1f},,,{'casual' if i % 2 else 'formal'},{40 + i % 5}")
    path = tmp_path / "shop.csv"
    path.write_text("\n".join(rows) + "\n")
    catalog = load_catalog(path)
    assert all(it.image_path is None for it in catalog)
    cfg = make_config("tiny", seed=1, num_users=10, sessions_per_user=8)
    log = simulate_over_catalog(catalog, cfg, progress=False)
    assert len(log) >= 10 and set(np.unique(log.grades)) <= {0, 1, 2, 3}
    lens = np.diff(log.offsets)
    assert lens.min() >= 20 and lens.max() <= 50
    assert any("casual" in q or "formal" in q for q in log.queries)
    assert not any(re.search(r"\b4[0-4]\b", q) for q in log.queries)  # numeric column not used for intents
    assert any("navy" in q for q in log.queries)

    out = simulate_catalog_dir(path, tmp_path / "data", preset="tiny", seed=1, progress=False,
                               num_users=10, sessions_per_user=8)
    back = SessionLog.load(out / "sessions.npz")
    np.testing.assert_array_equal(back.items, log.items)
    assert json.loads((out / "meta.json").read_text())["counts"]["items"] == 60


def test_config_validation() -> None:
    with pytest.raises(TypeError, match="num_itemz"):
        make_config("tiny", num_itemz=3)
    with pytest.raises(ValueError, match="preset"):
        make_config("huge")
    with pytest.raises(ValueError, match="slate_min"):
        make_config("tiny", slate_min=60)
