"""The on-device bundle format, shared by the exporter (``export/``) and the runtime (``client/runtime.py``).

Torch-free on purpose: it imports only the standard library, numpy and ``shared_model.head_features`` (numpy
only), so the runtime can use it on a device.

A bundle is one directory::

    manifest.json            format + version, every file's sha256 / size / IO names and shapes / quantization /
                             measured fidelity, embedding dims, package versions, catalog item ids
    manifest.sha256          the sha256 of manifest.json's bytes, one ``sha256sum`` line (``sha256sum -c`` checks it)
    tokenizer.json           the text encoder's tokenizer (``tokenizers`` library)
    text_encoder.<q>.onnx    text encoder with pooling and L2 norm: input_ids, attention_mask -> text_embedding
    text_encoder.<q>.tflite  the same, one signature per token length (``t16``, ``t32``, ``t64``; batch 1)
    text_encoder.static.npz  OR (compact bundles, ``--query-encoder static``) instead of the two above: a static
                             token-embedding table for both backends (:data:`STATIC_ENCODER_ARRAYS`, numpy only)
    image_encoder.<q>.onnx   EfficientNet-Lite0 trunk + average pooling: pixels -> image_embedding
    image_encoder.<q>.tflite the same, one signature ``b1`` (batch 1)
    head.<q>.onnx            the fused ranking head: 9 inputs -> scores [batch, slate] (dynamic batch and slate)
    head.<q>.tflite          the same, one signature per slate size (``s20``, ``s50``, ``s100``; batch 1)
    catalog.npz              item embeddings as int8 with one float32 scale per row (text, image, video),
                             modality mask, item dense features, raw price; rows in manifest ``catalog.item_ids``
    photo_search.npz         optional (bundles with an image encoder): the learnt search-by-photo projection
                             (``shared_model.photo_search``: mean, inv_std, float16 weight [Di, K], raw_weight);
                             manifest ``photo_search``: ``{"mode": "learnt", "file": ..., "training": ...,
                             "fidelity": ...}`` or ``{"mode": "heuristic", "reason": ...}``; without the file the
                             runtime uses the raw cosine (the heuristic), as for bundles from before it existed

``<q>`` names the precision actually stored (``int8``, ``fp16``, ``fp32``).

Integrity: ``manifest.sha256`` covers the manifest, and the manifest lists every other file's sha256, so one chain
of digests covers the whole bundle (the ids in ``catalog.item_ids`` included: they say which product each catalog
row is). A reader takes each file's bytes once (:func:`read_bundle_file`), checks them, and builds everything from
those bytes -- never from the path again, so a file that changes on disk afterwards changes nothing it loaded.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import io
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from shared_model.head_features import HEAD_INPUTS as HEAD_INPUTS  # the head's inputs, in forward() order
from shared_model.head_features import NUM_MODALITIES
from shared_model.photo_search import PhotoProjection, PhotoSearchError

BUNDLE_FORMAT = "fedrank-bundle"
BUNDLE_VERSION = 2  # bump on any incompatible change of the layout or of a file's inputs/outputs (2: manifest.sha256)
MANIFEST = "manifest.json"
MANIFEST_DIGEST = "manifest.sha256"
TOKENIZER = "tokenizer.json"
CATALOG = "catalog.npz"
PHOTO_SEARCH = "photo_search.npz"
PHOTO_SEARCH_MODES = ("learnt", "heuristic")
COMPONENTS = ("text_encoder", "image_encoder", "head")
BACKENDS = ("onnx", "tflite")
PROFILES = ("full", "compact")  # compact: static query encoder, no image encoder (manifest "profile")
CATALOG_ARRAYS = (
    "text_q", "text_scale", "image_q", "image_scale", "video_q", "video_scale", "mask", "dense", "price",
)

# The static query encoder (``text_encoder.static.npz``; manifest: the text encoder's file for both backends, its
# ``files`` entry has ``"kind": "static"``). Arrays, all little-endian, no pickles:
#   table_q     int8    [V, K]  token rows (V = the tokenizer's vocabulary size), row t ~ table_q[t] * table_scale[t]
#   table_scale float32 [V]     one scale per row (0 for an all-zero row)
#   projection  float32 [K, D]  into the text encoder's space (D = manifest dims.text)
#   bias        float32 [D]
#   skip_ids    int64   [n]     token ids left out of the mean ([CLS], [SEP], [PAD])
# encode(text) = l2norm(mean(rows of the kept ids, else zeros [K]) @ projection + bias), ids from tokenizer.json
# truncated at tokenizer.max_length (export/static_encoder.py has the recipe).
STATIC_ENCODER_FILE = "text_encoder.static.npz"
STATIC_ENCODER_ARRAYS = ("table_q", "table_scale", "projection", "bias", "skip_ids")
STATIC_KIND = "static"

HEAD_OUTPUT = "scores"
TEXT_INPUTS = ("input_ids", "attention_mask")
TEXT_OUTPUT = "text_embedding"
IMAGE_INPUT = "pixels"
IMAGE_OUTPUT = "image_embedding"


class BundleError(ValueError):
    """A bundle file is missing, corrupt, tampered with (sha256) or from an incompatible version.

    ``file`` names the offending file (relative to the bundle) or the bundle directory itself.
    """

    def __init__(self, file: str | os.PathLike[str], problem: str) -> None:
        self.file = str(file)
        self.problem = problem
        super().__init__(f"{self.file}: {problem}")


class RerankInputError(ValueError):
    """A request to the runtime is invalid; ``field`` names the argument (``query``, ``candidate_ids``, ...)."""

    def __init__(self, field: str, problem: str) -> None:
        self.field = field
        self.problem = problem
        super().__init__(f"{field}: {problem}")


def sha256_file(path: str | os.PathLike[str], chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def manifest_digest_line(manifest: bytes) -> str:
    """The content of ``manifest.sha256`` for the manifest's bytes: one ``sha256sum`` line."""
    return f"{hashlib.sha256(manifest).hexdigest()}  {MANIFEST}\n"


def write_manifest(bundle_dir: str | os.PathLike[str], manifest: bytes) -> None:
    """Write ``manifest.json`` (its bytes, as serialised by the exporter) and the ``manifest.sha256`` sealing it."""
    root = Path(bundle_dir)
    (root / MANIFEST).write_bytes(manifest)
    (root / MANIFEST_DIGEST).write_text(manifest_digest_line(manifest), encoding="utf-8")


def read_manifest(bundle_dir: str | os.PathLike[str]) -> dict[str, Any]:
    """Read ``manifest.json`` once, and check it: format, version, its sha256 against ``manifest.sha256``, then the
    keys and types the runtime relies on. The dict is parsed from the very bytes that were verified."""
    root = Path(bundle_dir)
    if not root.is_dir():
        raise BundleError(root, "no such bundle directory")
    try:
        data = (root / MANIFEST).read_bytes()
    except OSError as e:
        raise BundleError(MANIFEST, f"cannot read the manifest ({e.__class__.__name__}: {e})") from e
    try:
        man = json.loads(data.decode("utf-8"))
    except UnicodeDecodeError as e:
        raise BundleError(MANIFEST, f"not valid UTF-8 ({e})") from e
    except json.JSONDecodeError as e:
        raise BundleError(MANIFEST, f"not valid JSON ({e})") from e
    if not isinstance(man, dict) or man.get("format") != BUNDLE_FORMAT:
        raise BundleError(MANIFEST, f"not a {BUNDLE_FORMAT} manifest")
    version = man.get("format_version")
    if version != BUNDLE_VERSION:  # before the digest: a bundle of format 1 has no manifest.sha256
        raise BundleError(MANIFEST, f"bundle format version {version!r} is not supported by this runtime "
                                    f"(expects {BUNDLE_VERSION}); re-export the bundle")
    _check_manifest_digest(root, data)
    for key in ("files", "components", "tokenizer"):
        if key not in man:
            raise BundleError(MANIFEST, f"missing key {key!r}")
    _check_manifest_types(man)
    return man


def _check_manifest_digest(root: Path, manifest: bytes) -> None:
    """``manifest`` (the bytes of manifest.json) must hash to the digest in ``manifest.sha256``."""
    try:
        text = (root / MANIFEST_DIGEST).read_bytes().decode("utf-8", errors="replace")
    except FileNotFoundError as e:
        raise BundleError(MANIFEST_DIGEST, f"missing from the bundle, so {MANIFEST} cannot be verified; "
                                           "re-export the bundle") from e
    except OSError as e:
        raise BundleError(MANIFEST_DIGEST, f"cannot read it ({e.__class__.__name__}: {e})") from e
    fields = text.split()
    want = fields[0].lower() if fields else ""
    if (len(fields) > 2 or len(want) != 64 or any(c not in "0123456789abcdef" for c in want)
            or (len(fields) == 2 and fields[1].removeprefix("*") != MANIFEST)):
        raise BundleError(MANIFEST_DIGEST, f"expected one line '<sha256 of {MANIFEST}: 64 hex digits>  {MANIFEST}', "
                                           f"got {text[:100]!r}")
    got = hashlib.sha256(manifest).hexdigest()
    if got != want:
        raise BundleError(MANIFEST, f"sha256 mismatch (file {got[:12]}..., {MANIFEST_DIGEST} {want[:12]}...): the "
                                    "manifest is corrupt or was modified; re-export the bundle")


def _check_manifest_types(man: dict[str, Any]) -> None:
    """The structure the runtime indexes into: a wrong type is a BundleError naming the key, not a KeyError."""

    def need(ok: bool, key: str, what: str) -> None:
        if not ok:
            raise BundleError(MANIFEST, f"key {key!r} must be {what}")

    files, comps, tok = man["files"], man["components"], man["tokenizer"]
    need(isinstance(files, dict), "files", "an object of file name -> entry")
    for name, entry in files.items():
        need(isinstance(entry, dict) and isinstance(entry.get("sha256"), str), f"files.{name}",
             "an object with a sha256 string")
    need(isinstance(comps, dict), "components", "an object of component -> entry")
    for comp, entry in comps.items():
        need(isinstance(entry, dict) and isinstance(entry.get("files", {}), dict), f"components.{comp}",
             "an object with a 'files' object (backend -> file name)")
        for backend, name in entry.get("files", {}).items():
            need(name in files, f"components.{comp}.files.{backend}", f"a file listed under 'files' (got {name!r})")
    need(isinstance(tok, dict) and isinstance(tok.get("file"), str) and isinstance(tok.get("max_length"), int),
         "tokenizer", "an object with 'file' (string) and 'max_length' (integer)")
    dims = man.get("dims")
    need(isinstance(dims, dict) and all(isinstance(dims.get(k), int) for k in ("text", "image")), "dims",
         "an object with integer 'text' and 'image'")
    if "photo_search" in man:
        ps = man["photo_search"]
        need(isinstance(ps, dict) and ps.get("mode") in PHOTO_SEARCH_MODES, "photo_search",
             f"an object with 'mode' one of {PHOTO_SEARCH_MODES}")
        if ps["mode"] == "learnt":
            need(isinstance(ps.get("file"), str) and ps["file"] in files, "photo_search.file",
                 f"a file listed under 'files' (got {ps.get('file')!r})")
    if "catalog" in man:
        cat = man["catalog"]
        need(isinstance(cat, dict) and isinstance(cat.get("file"), str) and isinstance(cat.get("item_ids"), list),
             "catalog", "an object with 'file' (string) and 'item_ids' (list)")
        need(all(isinstance(i, str) for i in cat["item_ids"]), "catalog.item_ids", "a list of strings")
        seen: set[str] = set()
        for item_id in cat["item_ids"]:
            if item_id in seen:
                raise BundleError(MANIFEST, f"key 'catalog.item_ids' holds item id {item_id!r} twice (a duplicate): "
                                            "one catalog row per id")
            seen.add(item_id)


def read_bundle_file(bundle_dir: str | os.PathLike[str], manifest: dict[str, Any], name: str,
                     verify: bool = True) -> bytes:
    """The bytes of bundle file ``name``, read once; with ``verify`` their sha256 must match the manifest's.

    Build from these bytes, never from the path again: what was checked is then exactly what runs, and a file
    that changes on disk later (a re-export, a sync, a truncation) cannot reach a model already loaded.
    """
    entry = manifest["files"].get(name)
    if entry is None:
        raise BundleError(name, "not listed in the manifest")
    try:
        data = (Path(bundle_dir) / name).read_bytes()
    except FileNotFoundError as e:
        raise BundleError(name, "missing from the bundle") from e
    except OSError as e:
        raise BundleError(name, f"cannot read it ({e.__class__.__name__}: {e})") from e
    if verify:
        digest = hashlib.sha256(data).hexdigest()
        if digest != entry.get("sha256"):
            raise BundleError(name, f"sha256 mismatch (file {digest[:12]}..., manifest "
                                    f"{str(entry.get('sha256'))[:12]}...): the file is corrupt or was modified")
    return data


def photo_projection_from_bytes(data: bytes, name: str, image_dim: int) -> PhotoProjection:
    """The learnt search-by-photo projection from the bytes of ``photo_search.npz`` (``name`` in errors)."""
    try:
        return PhotoProjection.from_bytes(data, image_dim)
    except PhotoSearchError as e:
        raise BundleError(name, f"bad search-by-photo projection: {e}") from e


# ------------------------------------------------------------------------------------------- catalog


def pack_rows(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric per-row int8: ``x [N, D] float -> (q int8 [N, D], scale float32 [N])`` with ``x ~ q * scale``.

    ``scale = max|row| / 127``; an all-zero row (missing modality) gets scale 0 and dequantises to exact zeros.
    """
    x = np.asarray(x, dtype=np.float32)
    amax = np.abs(x).max(axis=1) if x.size else np.zeros(len(x), np.float32)
    scale = (amax / 127.0).astype(np.float32)
    safe = np.where(scale > 0, scale, 1.0)[:, None]
    q = np.clip(np.rint(x / safe), -127, 127).astype(np.int8)
    return q, scale


def unpack_rows(q: np.ndarray, scale: np.ndarray) -> np.ndarray:
    """Inverse of :func:`pack_rows`: float32 ``[N, D]``."""
    return q.astype(np.float32) * scale.astype(np.float32)[:, None]


@dataclass
class PackedCatalog:
    """The bundle's catalog: int8 embeddings (per-row scales), mask, dense features and raw prices."""

    item_ids: list[str]
    arrays: dict[str, np.ndarray]

    def __post_init__(self) -> None:
        self._row = {iid: r for r, iid in enumerate(self.item_ids)}

    def __len__(self) -> int:
        return len(self.item_ids)

    def __contains__(self, item_id: object) -> bool:
        return item_id in self._row

    def row(self, item_id: str) -> int | None:
        return self._row.get(item_id)

    def modality(self, name: str, rows: np.ndarray) -> np.ndarray:
        """Dequantised ``text``/``image``/``video`` embeddings of ``rows``: float32 ``[len(rows), D]``."""
        return unpack_rows(self.arrays[f"{name}_q"][rows], self.arrays[f"{name}_scale"][rows])

    @classmethod
    def from_float(cls, item_ids: list[str], text: np.ndarray, image: np.ndarray, video: np.ndarray,
                   mask: np.ndarray, dense: np.ndarray, price: np.ndarray) -> PackedCatalog:
        arrays: dict[str, np.ndarray] = {}
        for name, x in (("text", text), ("image", image), ("video", video)):
            arrays[f"{name}_q"], arrays[f"{name}_scale"] = pack_rows(x)
        arrays["mask"] = np.asarray(mask, dtype=bool)
        arrays["dense"] = np.asarray(dense, dtype=np.float32)
        arrays["price"] = np.asarray(price, dtype=np.float64)  # log1p(price) as in training
        return cls(list(item_ids), arrays)

    def save(self, path: str | os.PathLike[str]) -> None:
        with open(path, "wb") as f:
            np.savez(f, **self.arrays)  # type: ignore[arg-type]

    @classmethod
    def load(cls, path: str | os.PathLike[str], item_ids: list[str], dims: dict[str, int]) -> PackedCatalog:
        """Load ``catalog.npz`` from a file (see :meth:`from_bytes`)."""
        try:
            data = Path(path).read_bytes()
        except OSError as e:
            raise BundleError(Path(path).name, f"cannot read the catalog ({e.__class__.__name__}: {e})") from e
        return cls.from_bytes(data, Path(path).name, item_ids, dims)

    @classmethod
    def from_bytes(cls, data: bytes, name: str, item_ids: list[str], dims: dict[str, int]) -> PackedCatalog:
        """The catalog from the bytes of ``catalog.npz`` (``name`` in errors); every array is checked against
        ``item_ids`` and the embedding ``dims``."""
        try:
            with np.load(io.BytesIO(data), allow_pickle=False) as z:
                arrays = {k: z[k] for k in z.files}
        except Exception as e:  # zip/npy errors of all kinds: a corrupt file
            raise BundleError(name, f"cannot read the catalog ({e.__class__.__name__}: {e})") from e
        missing = [k for k in CATALOG_ARRAYS if k not in arrays]
        if missing:
            raise BundleError(name, f"missing arrays {missing}")
        n = len(item_ids)
        want = {"text_q": (n, dims["text"]), "image_q": (n, dims["image"]), "video_q": (n, dims["image"]),
                "text_scale": (n,), "image_scale": (n,), "video_scale": (n,), "mask": (n, NUM_MODALITIES), "price": (n,)}
        for k, shape in want.items():
            if arrays[k].shape != shape:
                raise BundleError(name, f"array {k} has shape {arrays[k].shape}, expected {shape}")
        if arrays["dense"].ndim != 2 or arrays["dense"].shape[0] != n:
            raise BundleError(name, f"array dense has shape {arrays['dense'].shape}, expected ({n}, D)")
        return cls(list(item_ids), arrays)


# ------------------------------------------------------------------------------------ candidates from the server

CANDIDATES_VERSION = 1
CANDIDATE_ARRAYS = CATALOG_ARRAYS  # the request's per-candidate arrays: the names (and layout) of catalog.npz
CANDIDATE_OPTIONAL = ("retrieval_scores", "first_stage_ranks")
_INT8_FIELDS = ("text_q", "image_q", "video_q")


@dataclass
class CandidateRows:
    """Candidates as the head gets them, in the request's order (float32 unless said otherwise).

    ``text [S, Dt]``, ``image [S, Di]``, ``video [S, Di]`` dequantised embeddings; ``mask [S, NUM_MODALITIES]``
    bool; ``dense [S, ITEM_DENSE_DIM]``; ``price [S]`` float64 raw prices (NaN = unknown).
    """

    item_ids: list[str]
    text: np.ndarray
    image: np.ndarray
    video: np.ndarray
    mask: np.ndarray
    dense: np.ndarray
    price: np.ndarray

    def __len__(self) -> int:
        return len(self.item_ids)

    @classmethod
    def from_catalog(cls, catalog: PackedCatalog, item_ids: list[str], rows: np.ndarray) -> CandidateRows:
        a = catalog.arrays
        return cls(list(item_ids), catalog.modality("text", rows), catalog.modality("image", rows),
                   catalog.modality("video", rows), a["mask"][rows].astype(bool), a["dense"][rows].astype(np.float32),
                   a["price"][rows].astype(np.float64))


def parse_candidates(request: Any, dims: dict[str, int], dense_dim: int, field: str = "candidates",
                     max_candidates: int | None = None, history: bool = False
                     ) -> tuple[CandidateRows, np.ndarray | None, np.ndarray | None]:
    """Check and decode a candidates request (format: ``client.runtime.Reranker.rerank_candidates``).

    Returns ``(rows, retrieval_scores [S] | None, first_stage_ranks [S] | None)``. ``dims``: the manifest's
    ``{"text": Dt, "image": Di}``; ``dense_dim``: the per-item dense width; ``history``: the rows of a shopper's
    recent items (may be empty, an item may repeat). A bad field raises :class:`RerankInputError` naming it
    (``candidates.text_q``, ...).
    """
    if not isinstance(request, dict):
        raise RerankInputError(field, f"expected a mapping of field -> array, got {type(request).__name__}")
    version = request.get("version")
    if version != CANDIDATES_VERSION:
        raise RerankInputError(f"{field}.version", f"{version!r}: this runtime reads version {CANDIDATES_VERSION}")
    ids = request.get("item_ids")
    if isinstance(ids, np.ndarray):
        ids = ids.tolist()
    if not isinstance(ids, list | tuple) or not all(isinstance(i, str) and i for i in ids):
        raise RerankInputError(f"{field}.item_ids", "expected a list of non-empty strings")
    s = len(ids)
    if s == 0 and not history:
        raise RerankInputError(f"{field}.item_ids", "no candidates")
    if max_candidates is not None and s > max_candidates:
        raise RerankInputError(f"{field}.item_ids", f"{s} candidates; at most {max_candidates}")
    if len(set(ids)) != s and not history:
        dup = next(i for n, i in enumerate(ids) if i in ids[:n])
        raise RerankInputError(f"{field}.item_ids", f"item id {dup!r} twice: one row per candidate")
    want: dict[str, tuple[str, tuple[int, ...]]] = {
        "text_q": ("int8", (s, dims["text"])), "image_q": ("int8", (s, dims["image"])),
        "video_q": ("int8", (s, dims["image"])), "text_scale": ("float32", (s,)), "image_scale": ("float32", (s,)),
        "video_scale": ("float32", (s,)), "mask": ("bool", (s, NUM_MODALITIES)), "dense": ("float32", (s, dense_dim)),
        "price": ("float64", (s,)),
    }
    arrays = {k: _field_array(request, k, dtype, shape, field) for k, (dtype, shape) in want.items()}
    for k in ("text_scale", "image_scale", "video_scale"):
        if (arrays[k] < 0).any():
            raise RerankInputError(f"{field}.{k}", "negative scale")
    extra = {k: _field_array(request, k, "float32", (s,), field) if request.get(k) is not None else None
             for k in CANDIDATE_OPTIONAL}
    rows = CandidateRows(list(ids), unpack_rows(arrays["text_q"], arrays["text_scale"]),
                         unpack_rows(arrays["image_q"], arrays["image_scale"]),
                         unpack_rows(arrays["video_q"], arrays["video_scale"]), arrays["mask"], arrays["dense"],
                         arrays["price"])
    return rows, extra["retrieval_scores"], extra["first_stage_ranks"]


def _field_array(request: dict[str, Any], key: str, dtype: str, shape: tuple[int, ...], field: str) -> np.ndarray:
    name = f"{field}.{key}"
    if key not in request or request[key] is None:
        raise RerankInputError(name, "missing")
    value = request[key]
    try:
        if isinstance(value, dict):  # the JSON form: {"dtype", "shape", "data": base64 of little-endian bytes}
            value = _from_b64(value)
        raw = np.asarray(value)
    except (TypeError, ValueError) as e:
        raise RerankInputError(name, f"not an array: {e}") from e
    if raw.shape != shape:
        raise RerankInputError(name, f"shape {raw.shape}, expected {shape}")
    if dtype == "bool":
        if raw.dtype != bool and not (np.issubdtype(raw.dtype, np.number) and np.isin(raw, (0, 1)).all()):
            raise RerankInputError(name, "expected 0/1 (or booleans)")
        return raw.astype(bool)
    if raw.dtype == bool or not np.issubdtype(raw.dtype, np.number):
        raise RerankInputError(name, f"expected numbers ({dtype}), got {raw.dtype}")
    if dtype == "int8":
        if raw.dtype == np.int8:
            return raw
        if not np.issubdtype(raw.dtype, np.integer) and not np.array_equal(raw, np.round(raw)):
            raise RerankInputError(name, "expected integers (int8)")
        if ((raw < -128) | (raw > 127)).any():
            raise RerankInputError(name, "values outside int8 [-128, 127]")
        return raw.astype(np.int8)
    out = raw.astype(dtype)
    bad = ~np.isfinite(out) if key != "price" else np.isinf(out)  # a missing price is NaN
    if bad.any():
        raise RerankInputError(name, "NaN or infinite values" if key != "price" else "infinite values")
    return out


def candidates_request(catalog: PackedCatalog, item_ids: list[str], retrieval_scores: Any = None,
                       first_stage_ranks: Any = None) -> dict[str, Any]:
    """The candidates request a search API would send for ``item_ids``, built from a bundle's catalog rows (tests,
    the JS parity test, and a server that packs its feature store the same way). Arrays are numpy; see
    :func:`request_to_json` for the wire form. Unknown ids raise ``RerankInputError("item_ids", ...)``."""
    rows = [catalog.row(i) for i in item_ids]
    unknown = [i for i, r in zip(item_ids, rows, strict=True) if r is None]
    if unknown:
        raise RerankInputError("item_ids", f"{len(unknown)} id(s) not in the catalog, e.g. {unknown[:5]}")
    idx = np.asarray(rows, np.int64)
    req: dict[str, Any] = {"version": CANDIDATES_VERSION, "item_ids": list(item_ids)}
    for k in CANDIDATE_ARRAYS:
        a = catalog.arrays[k][idx]
        req[k] = a.astype(bool) if k == "mask" else a
    if retrieval_scores is not None:
        req["retrieval_scores"] = np.asarray(retrieval_scores, np.float32)
    if first_stage_ranks is not None:
        req["first_stage_ranks"] = np.asarray(first_stage_ranks, np.float32)
    return req


def request_to_json(request: dict[str, Any]) -> dict[str, Any]:
    """A JSON-ready copy of a request: every array as ``{"dtype", "shape", "data"}`` with ``data`` the base64 of
    its little-endian, C-order bytes (``mask`` as uint8 0/1); ``version`` and ``item_ids`` as they are."""
    out: dict[str, Any] = {}
    for k, v in request.items():
        if k in ("version", "item_ids") or v is None:
            out[k] = list(v) if k == "item_ids" else v
            continue
        a = np.asarray(v)
        a = a.astype(np.uint8) if a.dtype == bool else a.astype(a.dtype.newbyteorder("<"))
        out[k] = {"dtype": a.dtype.name, "shape": list(a.shape),
                  "data": base64.b64encode(np.ascontiguousarray(a).tobytes()).decode("ascii")}
    return out


_B64_DTYPES = ("int8", "uint8", "float32", "float64")


def _from_b64(obj: dict[str, Any]) -> np.ndarray:
    dtype, shape, data = obj.get("dtype"), obj.get("shape"), obj.get("data")
    if dtype not in _B64_DTYPES:
        raise ValueError(f"dtype {dtype!r}: expected one of {_B64_DTYPES}")
    if not isinstance(shape, list) or not all(isinstance(d, int) and d >= 0 for d in shape):
        raise ValueError("'shape' must be a list of non-negative integers")
    if not isinstance(data, str):
        raise ValueError("'data' must be a base64 string")
    try:
        raw = base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError) as e:
        raise ValueError(f"'data' is not valid base64 ({e})") from e
    a = np.frombuffer(raw, dtype=np.dtype(dtype).newbyteorder("<"))
    if a.size != int(np.prod(shape)):
        raise ValueError(f"{a.size} values for shape {shape}")
    return a.reshape(shape).astype(np.dtype(dtype))
