"""Feature store: build through the content-hash cache, missing modalities, robustness, persistence."""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

from shared_model import embedding_cache as EC  # noqa: E402
from shared_model.embedding_cache import EmbeddingCache  # noqa: E402
from shared_model.encoders import load_image_encoder, load_text_encoder  # noqa: E402
from shared_model.features import (  # noqa: E402
    DENSE_NAMES,
    FeatureStore,
    build_feature_store,
    dense_features,
    encode_queries,
)
from shared_model.schema import IMAGE_DIM, TEXT_DIM, Catalog, CatalogItem  # noqa: E402


@pytest.fixture(autouse=True)
def _one_thread():
    prev = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(prev)


class Counting:
    """Wraps an encoder and counts the items it is asked to encode."""

    def __init__(self, inner: Any):
        self.inner = inner
        self.calls = 0
        self.items = 0

    def version(self, *a: Any) -> str:
        return self.inner.version(*a)

    def encode(self, texts: Sequence[str], batch_size: int = 64, max_length: int = 64) -> np.ndarray:
        self.calls += 1
        self.items += len(texts)
        return self.inner.encode(texts, batch_size=batch_size, max_length=max_length)

    def encode_images(self, images: Sequence[Any], batch_size: int = 32) -> np.ndarray:
        self.calls += 1
        self.items += len(images)
        return self.inner.encode_images(images, batch_size=batch_size)


@pytest.fixture(scope="module")
def encoders() -> tuple[Any, Any]:
    return load_text_encoder(), load_image_encoder()


def _png(path: Path, color: tuple[int, int, int], size: tuple[int, int] = (96, 96)) -> str:
    img = Image.new("RGB", size, color)
    img.paste((255, 255, 255), (10, 10, 30, 30))
    img.save(path)
    return str(path)


def _catalog(d: Path) -> Catalog:
    d.mkdir(parents=True, exist_ok=True)
    red = _png(d / "red.png", (210, 20, 20))
    blue = _png(d / "blue.png", (20, 30, 210))
    red_copy = _png(d / "red_copy.png", (210, 20, 20))  # same bytes as red.png: one cache entry
    corrupt = d / "corrupt.jpg"
    corrupt.write_bytes(b"\xff\xd8\xff\xe0 definitely truncated")
    frames = [_png(d / f"v{k}.png", c) for k, c in enumerate([(200, 0, 0), (0, 200, 0), (0, 0, 200)])]
    items = [
        CatalogItem("a", "red dress", "a crimson evening gown", price=49.9, rating=4.5, image_path=red,
                    video_frames=frames[:2]),
        CatalogItem("b", "stainless steel mug", price=12.0, rating=float("nan"), image_path=blue),
        CatalogItem("c", "red dress", "a crimson evening gown", price=float("nan"), rating=3.0,
                    image_path=red_copy, video_frames=[frames[0], str(d / "gone.png"), frames[2]]),
        CatalogItem("d", "broken photo", image_path=str(corrupt), video_frames=[str(corrupt)]),
        CatalogItem("e", "no photo", image_path=str(d / "missing.png"), price=-3.0),
        CatalogItem("f", "", image_path=None, price=0.0, rating=7.0),  # blank text
    ]
    return Catalog(items, source=str(d / "catalog.jsonl"))


def _build(cat: Catalog, cache: Path, encoders: tuple[Any, Any], **kw: Any) -> tuple[FeatureStore, Counting, Counting]:
    t, i = Counting(encoders[0]), Counting(encoders[1])
    store = build_feature_store(cat, cache, progress=False, batch_size=4, text_encoder=t, image_encoder=i, **kw)
    return store, t, i


def test_build_masks_values_and_cache_reuse(tmp_path: Path, encoders: tuple[Any, Any]) -> None:
    cat = _catalog(tmp_path / "data")
    cache = tmp_path / "cache"
    s1, t1, i1 = _build(cat, cache, encoders)

    assert s1.item_ids == ["a", "b", "c", "d", "e", "f"]
    assert s1.text.shape == (6, TEXT_DIM) and s1.image.shape == (6, IMAGE_DIM) and s1.video.shape == (6, IMAGE_DIM)
    assert s1.mask.tolist() == [
        [True, True, True],
        [True, True, False],
        [True, True, True],
        [True, False, False],
        [True, False, False],
        [False, False, False],
    ]
    for m, arr in enumerate((s1.text, s1.image, s1.video)):
        assert not arr[~s1.mask[:, m]].any(), "missing modality must be a zero row"
    # duplicated text / identical image bytes are encoded once
    assert t1.items == 4  # 'red dress...' x1, mug, broken photo, no photo
    np.testing.assert_array_equal(s1.text[0], s1.text[2])
    np.testing.assert_array_equal(s1.image[0], s1.image[2])
    # values equal the encoders' own output
    te, ie = encoders
    np.testing.assert_allclose(s1.text[:5], te.encode([it.text() for it in cat.items[:5]]), atol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(s1.text[:5], axis=1), 1.0, atol=1e-5)
    vid, ok = ie.encode_video(cat.items[2].video_frames)
    assert ok
    np.testing.assert_allclose(s1.video[2], vid, atol=1e-5)
    # image semantics survive the store: red item closer to red copy than to blue
    cos = s1.image @ s1.image.T / np.outer(np.linalg.norm(s1.image, axis=1) + 1e-9, np.linalg.norm(s1.image, axis=1) + 1e-9)
    assert cos[0, 2] > cos[0, 1]

    # second build: nothing recomputed, identical arrays
    s2, t2, i2 = _build(cat, cache, encoders)
    assert (t2.calls, i2.calls) == (0, 0)
    for k in FeatureStore.ARRAYS:
        np.testing.assert_array_equal(getattr(s1, k), getattr(s2, k))

    # one new item: only its modalities are encoded
    new = _png(tmp_path / "data" / "green.png", (10, 200, 10))
    cat3 = Catalog([*cat.items, CatalogItem("g", "green kettle", image_path=new)])
    s3, t3, i3 = _build(cat3, cache, encoders)
    assert (t3.items, i3.items) == (1, 1)
    np.testing.assert_array_equal(s3.image[:6], s1.image)


def test_default_encoders_and_version_in_key(tmp_path: Path, encoders: tuple[Any, Any]) -> None:
    cat = Catalog([CatalogItem("x", "blue mug")])
    cache = tmp_path / "cache"
    s = build_feature_store(cat, cache, progress=True)  # default (process-wide) encoders + tqdm
    assert s.mask.tolist() == [[True, False, False]]
    assert s.meta["text_version"] == encoders[0].version(64)
    # another truncation length is another encoder version: its own cache folder, recomputed
    _, t, _ = _build(cat, cache, encoders, text_max_length=32)
    assert t.items == 1
    assert len(list((cache / "text").iterdir())) == 2


def test_interrupted_and_damaged_shards_are_ignored(tmp_path: Path, encoders: tuple[Any, Any]) -> None:
    cat = _catalog(tmp_path / "data")
    cache = tmp_path / "cache"
    s1, _, _ = _build(cat, cache, encoders)
    text_dir = EmbeddingCache(cache, "text", encoders[0].version(64), TEXT_DIM).dir
    (text_dir / ".shard-99999999999999999999-deadbeef.npz.abc.tmp").write_bytes(b"half written")
    shards = sorted(text_dir.glob("shard-*.npz"))
    shards[0].write_bytes(shards[0].read_bytes()[:50])  # damage one real shard
    s2, t2, i2 = _build(cat, cache, encoders)
    assert t2.items >= 1 and i2.calls == 0  # the damaged shard's entries are recomputed, nothing else
    np.testing.assert_allclose(s2.text, s1.text, atol=1e-6)


def test_compaction_keeps_entries(tmp_path: Path, encoders: tuple[Any, Any], monkeypatch: pytest.MonkeyPatch) -> None:
    cat = _catalog(tmp_path / "data")
    cache = tmp_path / "cache"
    monkeypatch.setattr(EC, "COMPACT_THRESHOLD", 1000)
    s1, _, _ = _build(cat, cache, encoders)
    c = EmbeddingCache(cache, "text", encoders[0].version(64), TEXT_DIM)
    c.put([c.key(b"extra-1")], np.ones((1, TEXT_DIM)), np.ones(1, bool))
    c.put([c.key(b"extra-2")], np.full((1, TEXT_DIM), 2.0), np.ones(1, bool))
    n_entries = len(c)
    assert len(c.shards()) >= 2
    assert c.compact(threshold=1)
    c2 = EmbeddingCache(cache, "text", encoders[0].version(64), TEXT_DIM)
    assert len(c2.shards()) == 1 and len(c2) == n_entries
    found, vecs, _ = c2.get([c2.key(b"extra-2"), c2.key(b"nope")])
    assert found.tolist() == [True, False] and (vecs[0] == 2.0).all() and not vecs[1].any()
    s2, t2, i2 = _build(cat, cache, encoders)
    assert (t2.calls, i2.calls) == (0, 0)
    np.testing.assert_array_equal(s1.text, s2.text)


def test_encode_queries_cached(tmp_path: Path, encoders: tuple[Any, Any]) -> None:
    cache = tmp_path / "cache"
    t = Counting(encoders[0])
    q = ["red dress", "steel mug", "red dress"]
    e1 = encode_queries(q, cache, text_encoder=t)
    assert e1.shape == (3, TEXT_DIM) and e1.dtype == np.float32 and t.items == 2
    np.testing.assert_array_equal(e1[0], e1[2])
    t2 = Counting(encoders[0])
    e2 = encode_queries(q, cache, text_encoder=t2)
    assert t2.calls == 0
    np.testing.assert_array_equal(e1, e2)
    # item texts and queries share the text cache
    s, t3, _ = _build(Catalog([CatalogItem("m", "steel mug")]), cache, encoders)
    assert t3.calls == 0
    np.testing.assert_array_equal(s.text[0], e1[1])
    assert encode_queries([], cache, text_encoder=t2).shape == (0, TEXT_DIM)


def test_dense_features_nan_safe() -> None:
    items = [
        CatalogItem("a", "x", price=9.0, rating=4.0),
        CatalogItem("b", "x", price=99.0, rating=float("nan")),
        CatalogItem("c", "x", price=float("nan"), rating=10.0),
        CatalogItem("d", "x", price=float("inf"), rating=-1.0),
        CatalogItem("e", "x", price="oops", rating=None),  # type: ignore[arg-type]
    ]
    dense, stats = dense_features(Catalog(items))
    assert dense.shape == (5, len(DENSE_NAMES)) and np.isfinite(dense).all()
    assert dense[:, 2].tolist() == [1, 1, 0, 0, 0] and dense[:, 3].tolist() == [1, 0, 1, 1, 0]
    np.testing.assert_allclose(dense[:2, 0], [-1.0, 1.0], atol=1e-5)  # two prices standardise to -1, +1
    np.testing.assert_allclose(dense[:, 1], [0.8, 0, 1.0, 0.0, 0.0])
    assert math.isclose(stats["log_price_mean"], (math.log1p(9) + math.log1p(99)) / 2)
    single, _ = dense_features(Catalog([CatalogItem("z", "x", price=5.0)]))
    assert np.isfinite(single).all()


def test_save_load_subset_roundtrip(tmp_path: Path, encoders: tuple[Any, Any]) -> None:
    cat = _catalog(tmp_path / "data")
    s, _, _ = _build(cat, tmp_path / "cache", encoders)
    path = s.save(tmp_path / "store")
    assert path.name == "features.npz" and not [p for p in path.parent.iterdir() if p.name.endswith(".tmp")]
    back = FeatureStore.load(tmp_path / "store")
    assert back.item_ids == s.item_ids and back.dense_names == s.dense_names and back.meta == s.meta
    for k in FeatureStore.ARRAYS:
        np.testing.assert_array_equal(getattr(back, k), getattr(s, k))
        assert getattr(back, k).dtype == getattr(s, k).dtype

    sub = s.subset(["e", "a"])
    assert sub.item_ids == ["e", "a"] and sub.row("a") == 1
    np.testing.assert_array_equal(sub.image[1], s.image[s.row("a")])
    np.testing.assert_array_equal(sub.mask, s.mask[[4, 0]])
    np.testing.assert_array_equal(s.subset(np.array([4, 0])).text, sub.text)
    part = FeatureStore.load(path, item_ids=["c"])
    assert len(part) == 1 and part.mask[0].tolist() == [True, True, True]
    assert len(s.subset([])) == 0
    with pytest.raises(KeyError, match="zzz"):
        s.row("zzz")
    bad = tmp_path / "bad.npz"
    np.savez(bad, text=np.zeros((1, TEXT_DIM)))
    with pytest.raises(ValueError, match="not a fedrank feature store"):
        FeatureStore.load(bad)


def test_interrupted_build_resumes(tmp_path: Path, encoders: tuple[Any, Any]) -> None:
    """A build killed mid-way keeps the batches it finished; the next build only encodes the rest."""
    d = tmp_path / "data"
    d.mkdir()
    items = [CatalogItem(f"i{k}", f"item number {k}", image_path=_png(d / f"{k}.png", (20 * k, 100, 200 - 20 * k)))
             for k in range(6)]
    cat = Catalog(items)

    class Boom(Counting):
        def encode_images(self, images: Sequence[Any], batch_size: int = 32) -> np.ndarray:
            if self.calls >= 1:
                raise KeyboardInterrupt
            return super().encode_images(images, batch_size)

    cache = tmp_path / "cache"
    with pytest.raises(KeyboardInterrupt):
        build_feature_store(cat, cache, progress=False, batch_size=4, text_encoder=Counting(encoders[0]),
                            image_encoder=Boom(encoders[1]))
    assert not list(cache.rglob("*.tmp"))
    s, t, i = _build(cat, cache, encoders)
    assert t.calls == 0 and i.items == 2  # texts all done, 4 of 6 images done before the interruption
    np.testing.assert_allclose(s.image, encoders[1].encode_paths([it.image_path for it in items])[0], atol=1e-5)
