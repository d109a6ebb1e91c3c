"""The data schema shared by the simulator, the importers, the feature store, server and clients.

Two objects travel between the areas of fedrank:

* :class:`Catalog` -- the products (text, attributes, dense fields, optional image and video frames).
  Its on-disk form is the documented generic catalog format (JSONL or CSV, see ``shared_model/catalog_io.py``).
* :class:`SessionLog` -- search sessions: a query, the slate shown (catalog rows in display order),
  clicks and purchases, plus evaluation-only ground truth (graded relevance, personal utility).
  Stored as one ragged ``.npz`` (``offsets`` delimit each session's slate in the flat per-impression arrays).
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

# the embedding dimensions and modality order live with the head's other inputs (shared_model/head_features.py)
from shared_model.head_features import IMAGE_DIM as IMAGE_DIM
from shared_model.head_features import MODALITIES as MODALITIES
from shared_model.head_features import TEXT_DIM as TEXT_DIM
from shared_model.head_features import VIDEO_DIM as VIDEO_DIM

CORE_FIELDS = (
    "item_id", "title", "description", "category", "brand", "color",
    "price", "rating", "image_path", "video_frames",
)


@dataclass
class CatalogItem:
    """One product. ``image_path``/``video_frames`` are absolute paths or None/empty (missing modality)."""

    item_id: str
    title: str
    description: str = ""
    category: str = ""
    brand: str = ""
    color: str = ""
    price: float = float("nan")
    rating: float = float("nan")
    image_path: str | None = None
    video_frames: list[str] = field(default_factory=list)
    attributes: dict[str, str] = field(default_factory=dict)  # extra attribute columns (pattern, material, ...)

    def text(self) -> str:
        """The text the text encoder sees: title and description."""
        return f"{self.title}. {self.description}".strip() if self.description else self.title

    def attribute(self, name: str) -> str:
        """Any attribute by name: core columns first, then extra columns; '' if absent."""
        if name in ("category", "brand", "color"):
            return str(getattr(self, name))
        return self.attributes.get(name, "")


@dataclass
class Catalog:
    items: list[CatalogItem]
    source: str = ""  # file the catalog was read from (for error messages and provenance)

    def __post_init__(self) -> None:
        self._row = {it.item_id: i for i, it in enumerate(self.items)}
        if len(self._row) != len(self.items):
            raise ValueError(f"{self.source or 'catalog'}: duplicate item_id values")

    def __len__(self) -> int:
        return len(self.items)

    def __iter__(self) -> Iterator[CatalogItem]:
        return iter(self.items)

    def row(self, item_id: str) -> int:
        """Row index of an item id (KeyError names the id)."""
        try:
            return self._row[item_id]
        except KeyError:
            raise KeyError(f"unknown item_id {item_id!r} in {self.source or 'catalog'}") from None

    def ids(self) -> list[str]:
        return [it.item_id for it in self.items]


class SessionLogError(ValueError):
    """A session log (``sessions.npz``) is unreadable or inconsistent; names the file and the array (``field``)."""

    def __init__(self, path: str | os.PathLike[str], field: str, reason: str) -> None:
        self.path, self.field, self.reason = str(path), field, reason
        super().__init__(f"{self.path}: field '{field}': {reason}")


@dataclass
class SessionLog:
    """Search sessions, ragged by slate.

    Per session (length N): ``user``, ``query`` (index into ``queries``), ``randomized`` (slate shown in a
    random order, used to estimate position propensities), ``timestamp``.
    Per impression (length M = offsets[-1]), in display order within each session: ``items`` (catalog rows),
    ``clicks``, ``purchases``, ``prod_rank`` (rank given by first-stage retrieval, 0 = first),
    ``retrieval_score`` (first-stage score), and evaluation-only ``grades`` (0..3) and ``utility``
    (personal utility in [-1, 1]). Training code must never read ``grades`` or ``utility``.
    """

    user: np.ndarray  # int32 [N]
    query: np.ndarray  # int32 [N]
    randomized: np.ndarray  # bool [N]
    timestamp: np.ndarray  # int64 [N]
    offsets: np.ndarray  # int64 [N+1]
    items: np.ndarray  # int32 [M]
    clicks: np.ndarray  # uint8 [M]
    purchases: np.ndarray  # uint8 [M]
    prod_rank: np.ndarray  # int16 [M]
    retrieval_score: np.ndarray  # float32 [M]
    grades: np.ndarray  # uint8 [M]  (evaluation only)
    utility: np.ndarray  # float32 [M]  (evaluation only)
    queries: list[str]

    ARRAYS = (
        "user", "query", "randomized", "timestamp", "offsets", "items", "clicks", "purchases",
        "prod_rank", "retrieval_score", "grades", "utility",
    )

    def __len__(self) -> int:
        return int(self.user.shape[0])

    def slate(self, s: int) -> slice:
        return slice(int(self.offsets[s]), int(self.offsets[s + 1]))

    def subset(self, sessions: np.ndarray) -> SessionLog:
        """The log restricted to the given session indices (order kept); queries list is shared."""
        sessions = np.asarray(sessions, dtype=np.int64)
        lens = self.offsets[sessions + 1] - self.offsets[sessions]
        flat = (
            np.concatenate([np.arange(self.offsets[s], self.offsets[s + 1]) for s in sessions])
            if len(sessions) else np.zeros(0, dtype=np.int64)
        )
        offsets = np.zeros(len(sessions) + 1, dtype=np.int64)
        np.cumsum(lens, out=offsets[1:])
        per_session = {k: getattr(self, k)[sessions] for k in ("user", "query", "randomized", "timestamp")}
        per_item = {
            k: getattr(self, k)[flat]
            for k in ("items", "clicks", "purchases", "prod_rank", "retrieval_score", "grades", "utility")
        }
        return SessionLog(offsets=offsets, queries=self.queries, **per_session, **per_item)

    def save(self, path: str | os.PathLike[str]) -> None:
        """Atomic save to ``.npz`` (queries stored as a JSON string)."""
        path = Path(path)
        arrays = {k: getattr(self, k) for k in self.ARRAYS}
        arrays["queries_json"] = np.array(json.dumps(self.queries))
        atomic_write(path, lambda f: np.savez_compressed(f, **arrays))  # see marketplace.save_session_log for
        # a byte-reproducible variant (fixed zip timestamps)

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> SessionLog:
        """Read and check a log saved by :meth:`save`; :class:`SessionLogError` names the file and the array."""
        if not Path(path).is_file():
            raise FileNotFoundError(f"{path}: session log not found")
        with open(path, "rb") as f:
            if f.read(2) != b"PK":
                raise SessionLogError(path, "(file)", "not an .npz file (no zip header)")
        try:
            with np.load(path, allow_pickle=False) as z:
                missing = [k for k in (*cls.ARRAYS, "queries_json") if k not in z.files]
                if missing:
                    raise SessionLogError(path, "(file)", f"not a fedrank session log (missing arrays {missing})")
                kw = {}
                for k in (*cls.ARRAYS, "queries_json"):
                    try:
                        kw[k] = z[k]
                    except Exception as e:  # noqa: BLE001 -- zlib/zip/npy errors of all kinds: a corrupt member
                        raise SessionLogError(path, k, f"unreadable ({e.__class__.__name__}: {e})") from None
        except SessionLogError:
            raise
        except Exception as e:  # noqa: BLE001 -- BadZipFile, pickled data, truncated file...
            raise SessionLogError(path, "(file)", f"not a readable .npz session log ({e.__class__.__name__}: "
                                                  f"{e})") from None
        try:
            queries = json.loads(str(kw.pop("queries_json")))
        except json.JSONDecodeError as e:
            raise SessionLogError(path, "queries_json", f"not valid JSON ({e})") from None
        if not isinstance(queries, list) or not all(isinstance(q, str) for q in queries):
            raise SessionLogError(path, "queries_json", "expected a JSON list of query strings")
        log_ = cls(queries=queries, **kw)
        log_.validate(str(path))
        return log_

    def validate(self, source: str = "session log") -> None:
        """Check shapes, dtypes and index ranges (raises :class:`SessionLogError` naming ``source`` and the array)."""
        per_session = ("user", "query", "randomized", "timestamp")
        per_item = ("items", "clicks", "purchases", "prod_rank", "retrieval_score", "grades", "utility")
        for k in self.ARRAYS:
            a = getattr(self, k)
            if not isinstance(a, np.ndarray) or a.ndim != 1:
                raise SessionLogError(source, k, f"expected a 1-D array, got shape {getattr(a, 'shape', None)}")
            if a.dtype.kind not in "biuf":
                raise SessionLogError(source, k, f"expected numbers, got dtype {a.dtype}")
        n = len(self.user)
        for k in per_session:
            if len(getattr(self, k)) != n:
                raise SessionLogError(source, k, f"{len(getattr(self, k))} entries, but 'user' has {n} sessions")
        off = self.offsets
        if len(off) != n + 1:
            raise SessionLogError(source, "offsets", f"{len(off)} entries, expected sessions + 1 = {n + 1}")
        for k in ("user", "query", "offsets", "items", "prod_rank"):
            if getattr(self, k).dtype.kind not in "iu":
                raise SessionLogError(source, k, f"expected integers, got dtype {getattr(self, k).dtype}")
        if off[0] != 0 or np.any(np.diff(off) < 0):
            raise SessionLogError(source, "offsets", "must start at 0 and never decrease")
        m = int(off[-1])
        for k in per_item:
            if len(getattr(self, k)) != m:
                raise SessionLogError(source, k, f"{len(getattr(self, k))} entries, but offsets[-1] = {m} impressions")
        if n and (self.query.min() < 0 or self.query.max() >= len(self.queries)):
            raise SessionLogError(source, "query", f"indices must be in [0, {len(self.queries)}) (the queries list), "
                                                   f"found {self.query.min()}..{self.query.max()}")
        if m and self.items.min() < 0:
            raise SessionLogError(source, "items", f"negative catalog row {self.items.min()}")

    def check_catalog(self, num_items: int, source: str = "session log") -> None:
        """Every impression must name a row of a catalog of ``num_items`` items."""
        if len(self.items) and self.items.max() >= num_items:
            raise SessionLogError(source, "items", f"catalog row {int(self.items.max())} out of range: the catalog "
                                                   f"has {num_items} items")


def atomic_write(path: Path, write: object) -> None:
    """Write through a temporary file in the same folder, then rename: no half-written file is ever left."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    umask = os.umask(0)
    os.umask(umask)
    os.fchmod(fd, 0o666 & ~umask)  # mkstemp creates 0600; give the file ordinary permissions
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)  # type: ignore[operator]
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def json_ready(obj: Any) -> Any:
    """``obj`` with every non-finite float (NaN, inf; NumPy's too) replaced by None, NumPy scalars made Python's."""
    if isinstance(obj, dict):
        return {str(k): json_ready(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [json_ready(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return json_ready(obj.tolist())
    if isinstance(obj, np.generic):
        obj = obj.item()
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return obj


def results_bytes(payload: dict[str, Any]) -> bytes:
    """Strict JSON (``allow_nan=False``: NaN becomes ``null``, never the non-standard ``NaN``)."""
    return json.dumps(json_ready(payload), indent=2, allow_nan=False).encode()
