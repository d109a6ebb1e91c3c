"""The feature store: frozen per-item embeddings (text, image, video) + dense item features, with an on-disk
content-addressed embedding cache so that rebuilding after a catalog change only encodes what changed.

The cache (layout, keys, atomic shards, compaction) and its location rule live in
:mod:`shared_model.embedding_cache`.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from shared_model.embedding_cache import EmbeddingCache
from shared_model.head_features import ITEM_DENSE_NAMES
from shared_model.schema import IMAGE_DIM, MODALITIES, TEXT_DIM, VIDEO_DIM, Catalog, atomic_write

log = logging.getLogger(__name__)

FEATURES_FILE = "features.npz"
DENSE_NAMES = ITEM_DENSE_NAMES
_MISSING_FRAME = b"\x00fedrank-missing-frame\x00"


# ------------------------------------------------------------------------------------- feature store


@dataclass
class FeatureStore:
    """Per-item features, row-aligned with ``item_ids``. A missing modality is a zero row with mask False."""

    item_ids: list[str]
    text: np.ndarray  # float32 [N, 384] (L2-normalised; zero if missing)
    image: np.ndarray  # float32 [N, 1280]
    video: np.ndarray  # float32 [N, 1280]
    mask: np.ndarray  # bool [N, 3]: text, image, video present (order of schema.MODALITIES)
    dense: np.ndarray  # float32 [N, D]
    dense_names: list[str] = field(default_factory=lambda: list(DENSE_NAMES))
    meta: dict[str, Any] = field(default_factory=dict)  # encoder versions, dense standardisation stats

    ARRAYS = ("text", "image", "video", "mask", "dense")

    def __post_init__(self) -> None:
        self.item_ids = [str(i) for i in self.item_ids]
        n = len(self.item_ids)
        self.text = np.asarray(self.text, dtype=np.float32).reshape(n, TEXT_DIM)
        self.image = np.asarray(self.image, dtype=np.float32).reshape(n, IMAGE_DIM)
        self.video = np.asarray(self.video, dtype=np.float32).reshape(n, VIDEO_DIM)
        self.mask = np.asarray(self.mask, dtype=bool).reshape(n, len(MODALITIES))
        self.dense = np.asarray(self.dense, dtype=np.float32).reshape(n, len(self.dense_names))
        self._row = {iid: r for r, iid in enumerate(self.item_ids)}
        if len(self._row) != n:
            raise ValueError("FeatureStore: duplicate item_ids")

    def __len__(self) -> int:
        return len(self.item_ids)

    def row(self, item_id: str) -> int:
        """Row of an item id (KeyError names the id)."""
        try:
            return self._row[item_id]
        except KeyError:
            raise KeyError(f"unknown item_id {item_id!r} in feature store") from None

    def rows(self, item_ids: Iterable[str]) -> np.ndarray:
        return np.array([self.row(i) for i in item_ids], dtype=np.int64)

    def modality(self, name: str) -> np.ndarray:
        """``text``/``image``/``video`` embedding matrix."""
        if name not in MODALITIES:
            raise KeyError(f"unknown modality {name!r}; expected one of {MODALITIES}")
        return getattr(self, name)

    def subset(self, rows: Sequence[int] | Sequence[str] | np.ndarray) -> FeatureStore:
        """The store restricted to ``rows`` (int row indices or item ids), in the given order."""
        rows_list = list(rows)
        if rows_list and isinstance(rows_list[0], str):
            idx = self.rows(rows_list)
        else:
            idx = np.asarray(rows_list, dtype=np.int64).reshape(-1)
        return FeatureStore(
            item_ids=[self.item_ids[i] for i in idx],
            **{k: getattr(self, k)[idx] for k in self.ARRAYS},
            dense_names=list(self.dense_names),
            meta=dict(self.meta),
        )

    def save(self, directory: str | os.PathLike[str]) -> Path:
        """Atomic save to ``directory/features.npz`` (uncompressed: float embeddings do not compress)."""
        path = Path(directory) / FEATURES_FILE
        arrays = {k: getattr(self, k) for k in self.ARRAYS}
        arrays["item_ids"] = np.array(self.item_ids, dtype=np.str_)
        arrays["dense_names"] = np.array(self.dense_names, dtype=np.str_)
        arrays["meta_json"] = np.array(json.dumps(self.meta))
        atomic_write(path, lambda f: np.savez(f, **arrays))
        return path

    @classmethod
    def load(
        cls, directory: str | os.PathLike[str], item_ids: Sequence[str] | None = None
    ) -> FeatureStore:
        """Load from a folder (or the ``features.npz`` itself); ``item_ids`` keeps only those rows."""
        path = Path(directory)
        if path.is_dir():
            path = path / FEATURES_FILE
        with np.load(path, allow_pickle=False) as z:
            need = (*cls.ARRAYS, "item_ids", "dense_names", "meta_json")
            missing = [k for k in need if k not in z.files]
            if missing:
                raise ValueError(f"{path}: not a fedrank feature store (missing arrays {missing})")
            store = cls(
                item_ids=z["item_ids"].tolist(),
                **{k: z[k] for k in cls.ARRAYS},
                dense_names=z["dense_names"].tolist(),
                meta=json.loads(str(z["meta_json"])),
            )
        return store if item_ids is None else store.subset(list(item_ids))


# ----------------------------------------------------------------------------------- dense features


def dense_features(catalog: Catalog, stats: dict[str, float] | None = None) -> tuple[np.ndarray, dict[str, float]]:
    """``[N, 4]`` float32: standardised log1p(price), rating/5 (clipped to [0,1]), has_price, has_rating.

    NaN/inf/negative prices and NaN/inf ratings count as missing (value 0, flag 0). ``stats`` (price mean/std
    in log1p space) default to the catalog's own; pass the training catalog's to featurise another one alike.
    """
    n = len(catalog)
    price = np.array([_num(it.price) for it in catalog], dtype=np.float64).reshape(n)
    rating = np.array([_num(it.rating) for it in catalog], dtype=np.float64).reshape(n)
    has_price = np.isfinite(price) & (price >= 0)
    has_rating = np.isfinite(rating)
    lp = np.log1p(np.where(has_price, price, 0.0))
    if stats is None:
        mu = float(lp[has_price].mean()) if has_price.any() else 0.0
        sd = float(lp[has_price].std()) if has_price.sum() > 1 else 1.0
        stats = {"log_price_mean": mu, "log_price_std": sd if sd > 1e-6 else 1.0}
    z = np.where(has_price, (lp - stats["log_price_mean"]) / stats["log_price_std"], 0.0)
    r = np.where(has_rating, np.clip(np.nan_to_num(rating) / 5.0, 0.0, 1.0), 0.0)
    dense = np.stack([z, r, has_price, has_rating], axis=1).astype(np.float32)
    return dense, stats


def _num(x: object) -> float:
    try:
        return float(x)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return float("nan")


# --------------------------------------------------------------------------------------- encoders


class TextEncoderLike(Protocol):
    def version(self, max_length: int = ...) -> str: ...
    def encode(self, texts: Sequence[str], batch_size: int = ..., max_length: int = ...) -> np.ndarray: ...


class ImageEncoderLike(Protocol):
    def version(self) -> str: ...
    def encode_images(self, images: Sequence[Any], batch_size: int = ...) -> np.ndarray: ...


def _default_text_encoder(backend: str) -> TextEncoderLike:
    from shared_model.encoders import load_text_encoder

    return load_text_encoder(backend)


def _default_image_encoder(backend: str) -> ImageEncoderLike:
    from shared_model.encoders import load_image_encoder

    return load_image_encoder(backend)


def _progress(total: int, desc: str, enabled: bool) -> Any:
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit="item", disable=not enabled, leave=False, dynamic_ncols=True)


def _sha(data: bytes) -> bytes:
    return hashlib.sha256(data).digest()


# --------------------------------------------------------------------------------------- text


def _encode_texts_cached(
    texts: Sequence[str],
    cache: EmbeddingCache,
    encoder: Callable[[], TextEncoderLike],
    max_length: int,
    batch_size: int,
    progress: bool,
    desc: str,
) -> np.ndarray:
    keys = [cache.key(_sha(t.encode("utf-8"))) for t in texts]
    found, out, _ = cache.get(keys)
    todo: dict[bytes, list[int]] = {}  # unique missing texts -> rows
    for i in np.flatnonzero(~found):
        todo.setdefault(keys[i], []).append(int(i))
    with _progress(len(texts), desc, progress) as bar:
        bar.update(int(found.sum()))
        # similar lengths in one batch -> less padding (character length as a cheap proxy for tokens)
        pending = sorted(todo.items(), key=lambda kv: len(texts[kv[1][0]]))
        enc = encoder() if pending else None
        for start in range(0, len(pending), batch_size):
            chunk = pending[start : start + batch_size]
            batch_texts = [texts[rows[0]] for _, rows in chunk]
            vecs = np.asarray(enc.encode(batch_texts, batch_size=batch_size, max_length=max_length),  # type: ignore[union-attr]
                              dtype=np.float32)
            cache.put([k for k, _ in chunk], vecs, np.ones(len(chunk), dtype=bool))
            for (_, rows), v in zip(chunk, vecs, strict=True):
                out[rows] = v
            bar.update(sum(len(rows) for _, rows in chunk))
    return out


def encode_queries(
    queries: Sequence[str],
    cache_dir: str | os.PathLike[str],
    progress: bool = False,
    text_encoder: TextEncoderLike | None = None,
    batch_size: int = 64,
    max_length: int = 64,
    backend: str = "auto",
) -> np.ndarray:
    """float32 ``[Q, 384]`` query embeddings through the same content-hash text cache as item texts.

    ``backend`` (``auto``/``onnx``/``torch``) picks the default encoder, loaded only if a query is not cached.
    """
    holder: list[TextEncoderLike] = [text_encoder] if text_encoder is not None else []

    def get() -> TextEncoderLike:
        if not holder:
            holder.append(_default_text_encoder(backend))
        return holder[0]

    version = (text_encoder if text_encoder is not None else _TextVersion).version(max_length)
    cache = EmbeddingCache(cache_dir, "text", version, TEXT_DIM)
    out = _encode_texts_cached(list(queries), cache, get, max_length, batch_size, progress, "queries")
    cache.compact()
    return out


class _TextVersion:
    """Version tag of the default text encoder without loading its weights."""

    @staticmethod
    def version(max_length: int = 64) -> str:
        from shared_model.encoders import TextEncoder

        return TextEncoder.version(max_length)


class _ImageVersion:
    @staticmethod
    def version() -> str:
        from shared_model.encoders import ImageEncoder

        return ImageEncoder.version()


# --------------------------------------------------------------------------------------- images / video


def _image_digest(path: str | None) -> bytes | None:
    from shared_model.encoders import read_bytes

    data = read_bytes(path)
    return None if data is None else _sha(data)


def _video_digest(frames: Sequence[str]) -> bytes | None:
    """sha256 over the frames' bytes, each length-prefixed; None if no frame is readable."""
    from shared_model.encoders import read_bytes

    h = hashlib.sha256()
    any_ok = False
    for p in frames:
        data = read_bytes(p)
        if data is None:
            h.update(_MISSING_FRAME)
        else:
            any_ok = True
            h.update(len(data).to_bytes(8, "little"))
            h.update(data)
    return h.digest() if any_ok else None


def _encode_image_batch(
    paths: Sequence[str], enc: ImageEncoderLike, batch_size: int
) -> tuple[np.ndarray, np.ndarray]:
    from shared_model.encoders import load_image

    vecs = np.zeros((len(paths), IMAGE_DIM), dtype=np.float32)
    ok = np.zeros(len(paths), dtype=bool)
    imgs, rows = [], []
    for i, p in enumerate(paths):
        img = load_image(p)
        if img is not None:
            imgs.append(img)
            rows.append(i)
    if imgs:
        vecs[rows] = np.asarray(enc.encode_images(imgs, batch_size=batch_size), dtype=np.float32)
        ok[rows] = True
    return vecs, ok


def _encode_images_cached(
    paths: Sequence[str | None],
    cache: EmbeddingCache,
    encoder: Callable[[], ImageEncoderLike],
    batch_size: int,
    progress: bool,
) -> tuple[np.ndarray, np.ndarray]:
    n = len(paths)
    digests = [_image_digest(p) for p in paths]
    rows_with = [i for i, d in enumerate(digests) if d is not None]
    keys = [cache.key(digests[i]) for i in rows_with]  # type: ignore[arg-type]
    out = np.zeros((n, IMAGE_DIM), dtype=np.float32)
    ok = np.zeros(n, dtype=bool)
    found, vecs, okc = cache.get(keys)
    out[rows_with], ok[rows_with] = vecs, okc
    todo: dict[bytes, list[int]] = {}
    for j in np.flatnonzero(~found):
        todo.setdefault(keys[j], []).append(rows_with[j])
    with _progress(n, "image", progress) as bar:
        bar.update(n - sum(len(r) for r in todo.values()))
        pending = list(todo.items())
        enc = encoder() if pending else None
        for start in range(0, len(pending), batch_size):
            chunk = pending[start : start + batch_size]
            v, o = _encode_image_batch([paths[rows[0]] for _, rows in chunk], enc, batch_size)  # type: ignore[misc,arg-type]
            cache.put([k for k, _ in chunk], v, o)
            for (_, rows), vi, oi in zip(chunk, v, o, strict=True):
                out[rows], ok[rows] = vi, oi
            bar.update(sum(len(rows) for _, rows in chunk))
    return out, ok


def _encode_videos_cached(
    videos: Sequence[Sequence[str]],
    cache: EmbeddingCache,
    encoder: Callable[[], ImageEncoderLike],
    batch_size: int,
    progress: bool,
) -> tuple[np.ndarray, np.ndarray]:
    n = len(videos)
    digests = [_video_digest(v) if v else None for v in videos]
    rows_with = [i for i, d in enumerate(digests) if d is not None]
    keys = [cache.key(digests[i]) for i in rows_with]  # type: ignore[arg-type]
    out = np.zeros((n, VIDEO_DIM), dtype=np.float32)
    ok = np.zeros(n, dtype=bool)
    found, vecs, okc = cache.get(keys)
    out[rows_with], ok[rows_with] = vecs, okc
    todo: dict[bytes, list[int]] = {}
    for j in np.flatnonzero(~found):
        todo.setdefault(keys[j], []).append(rows_with[j])
    with _progress(n, "video", progress) as bar:
        bar.update(n - sum(len(r) for r in todo.values()))
        pending = list(todo.items())
        enc = encoder() if pending else None
        # group whole videos so that about batch_size frames go through the encoder at a time
        start = 0
        while start < len(pending):
            chunk: list[tuple[bytes, list[int]]] = []
            nframes = 0
            while start < len(pending) and (not chunk or nframes + len(videos[pending[start][1][0]]) <= batch_size):
                chunk.append(pending[start])
                nframes += len(videos[pending[start][1][0]])
                start += 1
            frames = [f for _, rows in chunk for f in videos[rows[0]]]
            fv, fo = _encode_image_batch(frames, enc, batch_size)  # type: ignore[arg-type]
            v = np.zeros((len(chunk), VIDEO_DIM), dtype=np.float32)
            o = np.zeros(len(chunk), dtype=bool)
            pos = 0
            for c, (_, rows) in enumerate(chunk):
                k = len(videos[rows[0]])
                good = fo[pos : pos + k]
                if good.any():
                    v[c] = fv[pos : pos + k][good].mean(axis=0)
                    o[c] = True
                pos += k
            cache.put([k for k, _ in chunk], v, o)
            for (_, rows), vi, oi in zip(chunk, v, o, strict=True):
                out[rows], ok[rows] = vi, oi
            bar.update(sum(len(rows) for _, rows in chunk))
    return out, ok


# --------------------------------------------------------------------------------------- build


def build_feature_store(
    catalog: Catalog,
    cache_dir: str | os.PathLike[str],
    progress: bool = True,
    batch_size: int = 32,
    text_encoder: TextEncoderLike | None = None,
    image_encoder: ImageEncoderLike | None = None,
    text_max_length: int = 64,
    dense_stats: dict[str, float] | None = None,
    backend: str = "auto",
) -> FeatureStore:
    """Embed every item of ``catalog`` (text, image, video) through the on-disk cache; dense features too.

    Encoders default to the process-wide pretrained ones (``backend``: ``auto`` = ONNX Runtime when it loads and
    matches torch, else torch; ``onnx``; ``torch``), loaded only if something is not cached. Pass
    encoder objects (anything with the same ``version``/``encode``/``encode_images`` methods) to wrap or
    replace them. ``batch_size`` = items (texts, images, or frames for video) per encoder call and per cache
    shard. Torch threads are left as the caller set them (``torch.set_num_threads``).
    """
    t_holder: list[TextEncoderLike] = [text_encoder] if text_encoder is not None else []
    i_holder: list[ImageEncoderLike] = [image_encoder] if image_encoder is not None else []

    def get_text() -> TextEncoderLike:
        if not t_holder:
            t_holder.append(_default_text_encoder(backend))
        return t_holder[0]

    def get_image() -> ImageEncoderLike:
        if not i_holder:
            i_holder.append(_default_image_encoder(backend))
        return i_holder[0]

    text_version = (text_encoder if text_encoder is not None else _TextVersion).version(text_max_length)
    image_version = (image_encoder if image_encoder is not None else _ImageVersion).version()
    caches = {
        "text": EmbeddingCache(cache_dir, "text", text_version, TEXT_DIM),
        "image": EmbeddingCache(cache_dir, "image", image_version, IMAGE_DIM),
        "video": EmbeddingCache(cache_dir, "video", image_version, VIDEO_DIM),
    }
    items = catalog.items
    t0 = time.perf_counter()
    texts = [it.text() for it in items]
    text_ok = np.array([bool(t.strip()) for t in texts], dtype=bool)  # blank text = missing modality
    text = np.zeros((len(items), TEXT_DIM), dtype=np.float32)
    text_rows = np.flatnonzero(text_ok)
    text[text_rows] = _encode_texts_cached([texts[i] for i in text_rows], caches["text"], get_text,
                                           text_max_length, batch_size, progress, "text")
    t1 = time.perf_counter()
    image, image_ok = _encode_images_cached([it.image_path for it in items], caches["image"], get_image,
                                            batch_size, progress)
    t2 = time.perf_counter()
    video, video_ok = _encode_videos_cached([list(it.video_frames or []) for it in items], caches["video"],
                                            get_image, batch_size, progress)
    t3 = time.perf_counter()
    for c in caches.values():
        c.compact()
    dense, stats = dense_features(catalog, dense_stats)
    log.info("feature store: %d items (text %.1fs, image %.1fs, video %.1fs); present text %d image %d video %d",
             len(items), t1 - t0, t2 - t1, t3 - t2, text_ok.sum(), image_ok.sum(), video_ok.sum())
    return FeatureStore(
        item_ids=catalog.ids(),
        text=text,
        image=image,
        video=video,
        mask=np.stack([text_ok, image_ok, video_ok], axis=1),
        dense=dense,
        dense_names=list(DENSE_NAMES),
        meta={"text_version": text_version, "image_version": image_version, "dense_stats": stats,
              "source": catalog.source},
    )
