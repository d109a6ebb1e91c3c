"""The on-disk, content-addressed embedding cache of the feature store, and the one rule for where it lives
(:func:`feature_cache_dir`). Rebuilding after a catalog change only encodes what changed.

Layout of ``cache_dir`` (one sub-folder per modality and encoder version)::

    cache_dir/
      text/<sha256(version)[:16]>/
        VERSION                      the full encoder version tag (for humans)
        shard-<time>-<uuid>.npz      keys S64 [n] (hex sha256), vecs float32 [n, D], ok bool [n]
      image/<...>/...                (same)
      video/<...>/...                (same)

* key = sha256(version tag + NUL + content digest); content = the text string (UTF-8) for text, the image file
  bytes for image, the frames' bytes for video (each frame as <8-byte length><bytes>, a missing frame as a
  marker; so the concatenation is unambiguous).
* Every shard is written under a temporary name and renamed into place (``schema.atomic_write``): an interrupted
  build leaves only ``.*.tmp`` files, which are never read. A shard that fails to load is logged and ignored
  (its entries are recomputed). One shard per encoded batch; when a folder holds more than
  ``COMPACT_THRESHOLD`` shards at the end of a build they are merged into one (merged shard written first,
  then the old ones removed: an interruption only leaves harmless duplicates).
* Corrupt images are cached too (``ok=False``): the same bytes are always corrupt. Missing files have no bytes,
  hence no key; they are simply ``mask=False``.
"""

from __future__ import annotations

import hashlib
import logging
import os
import time
import uuid
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from shared_model.schema import atomic_write

log = logging.getLogger(__name__)

COMPACT_THRESHOLD = 64

CACHE_ENV = "FEDRANK_CACHE"
CACHE_DIRNAME = ".feature-cache"


def feature_cache_dir(data: str | os.PathLike[str]) -> Path:
    """The one cache rule, used by prepare, evaluate and export: ``$FEDRANK_CACHE`` if set, else
    ``.feature-cache`` beside the data folder ``data`` (a catalog file counts as its folder). Entries are keyed by
    content hash, so every data folder and catalog under one parent shares the embeddings of the items they hold."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV])
    folder = Path(data).resolve()
    if not folder.is_dir():
        folder = folder.parent
    return folder.parent / CACHE_DIRNAME


class EmbeddingCache:
    """Content-addressed embedding cache for one modality and encoder version (see module docstring)."""

    def __init__(self, root: str | os.PathLike[str], modality: str, version: str, dim: int):
        self.version = version
        self.dim = dim
        tag = hashlib.sha256(version.encode()).hexdigest()[:16]
        self.dir = Path(root) / modality / tag
        self.dir.mkdir(parents=True, exist_ok=True)
        vfile = self.dir / "VERSION"
        if not vfile.exists():
            atomic_write(vfile, lambda f: f.write(version.encode() + b"\n"))
        self._prefix = version.encode() + b"\x00"
        self._index: dict[bytes, tuple[Path, int]] | None = None

    def key(self, content_digest: bytes) -> bytes:
        """Cache key (hex sha256 as bytes) of a content digest under this encoder version."""
        return hashlib.sha256(self._prefix + content_digest).hexdigest().encode()

    def shards(self) -> list[Path]:
        return sorted(p for p in self.dir.glob("shard-*.npz") if not p.name.startswith("."))

    def _load_index(self) -> dict[bytes, tuple[Path, int]]:
        if self._index is None:
            index: dict[bytes, tuple[Path, int]] = {}
            for shard in self.shards():
                try:
                    with np.load(shard, allow_pickle=False) as z:
                        keys = z["keys"]
                except Exception as e:
                    log.warning("ignoring unreadable cache shard %s: %s", shard, e)
                    continue
                for r, k in enumerate(keys.tolist()):
                    index[k] = (shard, r)
            self._index = index
        return self._index

    def __len__(self) -> int:
        return len(self._load_index())

    def get(self, keys: Sequence[bytes]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """``(found [n] bool, vecs [n, dim] float32, ok [n] bool)``; each shard is opened at most once."""
        index = self._load_index()
        n = len(keys)
        found = np.zeros(n, dtype=bool)
        vecs = np.zeros((n, self.dim), dtype=np.float32)
        ok = np.zeros(n, dtype=bool)
        by_shard: dict[Path, list[tuple[int, int]]] = {}
        for i, k in enumerate(keys):
            hit = index.get(k)
            if hit is not None:
                by_shard.setdefault(hit[0], []).append((i, hit[1]))
        for shard, pairs in by_shard.items():
            dst = np.array([p[0] for p in pairs], dtype=np.int64)
            src = np.array([p[1] for p in pairs], dtype=np.int64)
            try:
                with np.load(shard, allow_pickle=False) as z:
                    v, o = z["vecs"], z["ok"]
                if v.shape[1] != self.dim:
                    raise ValueError(f"dimension {v.shape[1]} != {self.dim}")
                vecs[dst], ok[dst] = v[src], o[src]
                found[dst] = True
            except Exception as e:  # vanished (concurrent compaction) or damaged: recompute those entries
                log.warning("cache shard %s unusable, recomputing its entries: %s", shard, e)
        return found, vecs, ok

    def put(self, keys: Sequence[bytes], vecs: np.ndarray, ok: np.ndarray) -> None:
        """Persist a batch of entries as one new shard (atomic)."""
        if not len(keys):
            return
        vecs = np.asarray(vecs, dtype=np.float32).reshape(len(keys), self.dim)
        ok = np.asarray(ok, dtype=bool).reshape(len(keys))
        karr = np.array(list(keys), dtype="S64")
        shard = self.dir / f"shard-{time.time_ns():020d}-{uuid.uuid4().hex[:8]}.npz"
        atomic_write(shard, lambda f: np.savez(f, keys=karr, vecs=vecs, ok=ok))
        index = self._load_index()
        for r, k in enumerate(karr.tolist()):
            index[k] = (shard, r)

    def compact(self, threshold: int | None = None) -> bool:
        """Merge all shards into one when there are more than ``threshold`` (default ``COMPACT_THRESHOLD``)."""
        threshold = COMPACT_THRESHOLD if threshold is None else threshold
        shards = self.shards()
        if len(shards) <= threshold:
            return False
        index = self._load_index()
        live = set(shards)
        keys = [k for k, (s, _) in index.items() if s in live]
        _, vecs, ok = self.get(keys)
        merged = self.dir / f"shard-{time.time_ns():020d}-{uuid.uuid4().hex[:8]}.npz"
        karr = np.array(keys, dtype="S64")
        atomic_write(merged, lambda f: np.savez(f, keys=karr, vecs=vecs, ok=ok))
        for s in shards:
            s.unlink(missing_ok=True)
        self._index = None
        log.info("compacted %d shards into %s (%d entries)", len(shards), merged.name, len(keys))
        return True
