"""On-device reranking from an exported bundle (``fedrank export``), with ONNX Runtime or LiteRT.

Imports only numpy, ``tokenizers`` and ``onnxruntime`` or ``ai_edge_litert`` (``tflite_runtime`` as a fallback
import) -- never torch, and no fedrank module that imports torch (``client/__init__.py`` and
``client/runtime_bundle.py`` are torch-free; a test runs this module where ``import torch`` fails). Pillow is
imported lazily, and only to decode a photo for search-by-photo.

Usage::

    rr = Reranker.load("bundles/b1", backend="onnx")          # or backend="tflite"
    rr.rerank("red canvas sneakers", candidate_ids, recent_item_ids=recent)  # [(item_id, score), ...] best first
    rr.rerank(query_image="photo.jpg", candidate_ids=candidate_ids)          # search by photo

What happens per request (the same function as ``shared_model.data.head_inputs`` + the head, so scores match
the torch pipeline the head was trained and evaluated with):

* the query is tokenised (truncated at the manifest's ``max_length`` tokens, like the training pipeline) and
  encoded by the exported text encoder;
* candidates' embeddings come from the bundle's catalog (int8 rows times their scale);
* the **user context** is computed here, on the device, from ``recent_item_ids`` (most recent last; the last
  ``history_len`` known ids): mean text embedding, mean image embedding (items without an image count as zero),
  ``user_mask = 1`` if any. It is never sent anywhere: nothing in this module does any I/O besides reading the
  bundle (and a photo's file).
* dense features = the item's 4 catalog features + 3 slate features: first-stage rank / 50 (the candidates'
  order unless ``first_stage_ranks`` is given), the first-stage retrieval score z-scored within the slate
  (0 for every candidate when ``retrieval_scores`` is not given), log1p(price) minus the slate median;
* the head scores every candidate independently; with LiteRT a slate is padded up to the next signature size
  (``s20``/``s50``/``s100``) and a longer one is scored in chunks (exact: candidates do not interact).

Search by photo (``query_image=``): the photo is embedded by the exported image encoder, and each candidate gets

    score = z(visual) + w * z(head)

where ``visual`` is the cosine between the photo's embedding and the candidate's image embedding (its video
embedding if it has no image; -1 if it has neither), ``head`` is the head's score with the text query if one is
given too ("like this photo, but in red"), else with the embedding of the empty query (a generic query: the head
then contributes the query-independent part it learnt -- price, rating, the shopper's history), ``z`` standardises
within the slate, and ``w = PHOTO_HEAD_WEIGHT`` (0.25) without text, ``PHOTO_TEXT_HEAD_WEIGHT`` (1.0) with text.
The head was never trained on photo queries, so this is an honest heuristic, not a learnt fusion.

Bad input raises :class:`RerankInputError` naming the argument; bundle problems raise :class:`BundleError` naming
the file. Documented skips: unknown ``recent_item_ids`` are ignored (logged); unknown ``candidate_ids`` raise
unless ``skip_unknown=True`` (then they are left out of the result, logged).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from client.runtime_bundle import (
    BACKENDS,
    HEAD_OUTPUT,
    IMAGE_INPUT,
    IMAGE_OUTPUT,
    MANIFEST,
    TEXT_OUTPUT,
    BundleError,
    PackedCatalog,
    RerankInputError,
    read_manifest,
    verify_file,
)

log = logging.getLogger(__name__)

MAX_QUERY_CHARS = 1000  # longer queries are rejected (tokens beyond max_length are truncated, as in training)
MAX_CANDIDATES = 2000
PHOTO_HEAD_WEIGHT = 0.25
PHOTO_TEXT_HEAD_WEIGHT = 1.0
IMAGE_SIZE = 224
PIXEL_MEAN = 127.0
PIXEL_SCALE = 128.0

Floats = Sequence[float] | np.ndarray  # per-candidate numbers

__all__ = ["Reranker", "BundleError", "RerankInputError", "load_interpreter_class"]


# ------------------------------------------------------------------------------------------- backends


def load_interpreter_class() -> Any:
    """LiteRT's ``Interpreter`` (``ai_edge_litert``), else ``tflite_runtime``'s (older, slower; a fallback)."""
    try:
        from ai_edge_litert.interpreter import Interpreter
    except ImportError:
        try:
            from tflite_runtime.interpreter import Interpreter
        except ImportError as e:
            raise ImportError("the tflite backend needs ai-edge-litert (or tflite-runtime)") from e
    return Interpreter


class _OnnxModel:
    """One ONNX Runtime session, single-threaded by default, no spinning."""

    def __init__(self, path: Path, name: str, num_threads: int) -> None:
        import onnxruntime as ort

        so = ort.SessionOptions()
        so.intra_op_num_threads = num_threads
        so.inter_op_num_threads = 1
        so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        so.add_session_config_entry("session.intra_op.allow_spinning", "0")
        so.log_severity_level = 3
        try:
            self.session = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
        except Exception as e:  # ORT raises its own Fail/InvalidProtobuf/... types
            raise BundleError(name, f"ONNX Runtime cannot load it ({e.__class__.__name__}: {str(e)[:300]})") from e
        self.inputs = {i.name: i for i in self.session.get_inputs()}
        self.output = self.session.get_outputs()[0].name

    def run(self, feeds: dict[str, np.ndarray]) -> np.ndarray:
        return np.asarray(self.session.run([self.output], feeds)[0])


class _TfliteModel:
    """One LiteRT interpreter with all its signatures (one per fixed input size)."""

    def __init__(self, path: Path, name: str, num_threads: int) -> None:
        interpreter_cls = load_interpreter_class()
        try:
            self.interpreter = interpreter_cls(model_path=str(path), num_threads=num_threads)
            self.runners = {k: self.interpreter.get_signature_runner(k) for k in self.interpreter.get_signature_list()}
        except Exception as e:  # ValueError/RuntimeError on a corrupt flatbuffer
            raise BundleError(name, f"LiteRT cannot load it ({e.__class__.__name__}: {str(e)[:300]})") from e
        self.dtypes = {k: {n: d["dtype"] for n, d in r.get_input_details().items()} for k, r in self.runners.items()}

    def run(self, signature: str, feeds: dict[str, np.ndarray], output: str) -> np.ndarray:
        dt = self.dtypes[signature]
        out = self.runners[signature](**{k: np.ascontiguousarray(v, dtype=dt[k]) for k, v in feeds.items()})
        return np.asarray(out[output])


def _signatures(entry: dict[str, Any], axis: str, name: str) -> list[tuple[int, str]]:
    sigs = sorted((int(s["sizes"][axis]), str(s["key"])) for s in entry.get("signatures", []))
    if not sigs:
        raise BundleError(name, "the manifest lists no signatures for this TFLite file")
    return sigs


# ------------------------------------------------------------------------------------------ components


class _TextEncoder:
    def __init__(self, backend: str, path: Path, name: str, entry: dict[str, Any], num_threads: int) -> None:
        self.backend = backend
        if backend == "onnx":
            self.onnx = _OnnxModel(path, name, num_threads)
        else:
            self.tfl = _TfliteModel(path, name, num_threads)
            self.sigs = _signatures(entry, "tokens", name)

    def __call__(self, ids: list[int]) -> np.ndarray:
        """``[384]`` float32 embedding of one tokenised text (``ids`` incl. [CLS]/[SEP])."""
        t = len(ids)
        if self.backend == "onnx":
            x = np.asarray(ids, dtype=np.int64)[None, :]
            return self.onnx.run({"input_ids": x, "attention_mask": np.ones_like(x)})[0]
        size, key = next(((s, k) for s, k in self.sigs if s >= t), self.sigs[-1])
        ids = ids[:size]
        x = np.zeros((1, size), np.int64)
        m = np.zeros((1, size), np.int64)
        x[0, : len(ids)] = ids
        m[0, : len(ids)] = 1
        return self.tfl.run(key, {"input_ids": x, "attention_mask": m}, TEXT_OUTPUT)[0]


class _ImageEncoder:
    def __init__(self, backend: str, path: Path, name: str, entry: dict[str, Any], num_threads: int) -> None:
        self.backend = backend
        if backend == "onnx":
            self.onnx = _OnnxModel(path, name, num_threads)
        else:
            self.tfl = _TfliteModel(path, name, num_threads)
            self.key = _signatures(entry, "batch", name)[0][1]

    def __call__(self, pixels: np.ndarray) -> np.ndarray:
        """``[1280]`` features of one preprocessed image ``[1, 3, 224, 224]``."""
        if self.backend == "onnx":
            return self.onnx.run({IMAGE_INPUT: pixels})[0]
        return self.tfl.run(self.key, {IMAGE_INPUT: pixels}, IMAGE_OUTPUT)[0]


class _Head:
    def __init__(self, backend: str, path: Path, name: str, entry: dict[str, Any], num_threads: int) -> None:
        self.backend = backend
        if backend == "onnx":
            self.onnx = _OnnxModel(path, name, num_threads)
        else:
            self.tfl = _TfliteModel(path, name, num_threads)
            self.sigs = _signatures(entry, "slate", name)

    def __call__(self, feeds: dict[str, np.ndarray]) -> np.ndarray:
        """Scores ``[S]`` for one slate; ``feeds`` are the head's inputs with batch 1 and ``S`` candidates."""
        if self.backend == "onnx":
            return self.onnx.run(feeds)[0]
        s_total = feeds["item_text"].shape[1]
        max_size = self.sigs[-1][0]
        out = np.empty(s_total, np.float32)
        for lo in range(0, s_total, max_size):
            hi = min(lo + max_size, s_total)
            size, key = next((s, k) for s, k in self.sigs if s >= hi - lo)
            chunk = {}
            for k, v in feeds.items():
                if v.ndim == 3:  # per-candidate input [1, S, D]: slice, then pad with zero rows
                    part = np.zeros((1, size, v.shape[2]), np.float32)
                    part[:, : hi - lo] = v[:, lo:hi]
                    chunk[k] = part
                else:
                    chunk[k] = v
            out[lo:hi] = self.tfl.run(key, chunk, HEAD_OUTPUT)[0, : hi - lo]
        return out


# ---------------------------------------------------------------------------------------------- images


def _to_pixels(image: Any) -> np.ndarray:
    """A path, bytes, PIL image or ``HxWx3`` uint8 array -> float32 ``[1, 3, 224, 224]``, as the encoder saw them
    in training (alpha composited over white, RGB, bilinear resize to 224x224, ``(x - 127) / 128``)."""
    if isinstance(image, np.ndarray):
        if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
            raise RerankInputError("query_image", f"an array must be HxWx3 uint8, got {image.shape} {image.dtype}")
        arr = image if image.shape[:2] == (IMAGE_SIZE, IMAGE_SIZE) else _resize(_pil_image().fromarray(image))
    else:
        arr = _resize(_decode(image))
    x = arr.astype(np.float32).transpose(2, 0, 1)[None]
    return np.ascontiguousarray((x - PIXEL_MEAN) / PIXEL_SCALE)


def _pil_image() -> Any:
    """``PIL.Image``, imported lazily: only search-by-photo needs Pillow."""
    try:
        from PIL import Image
    except ImportError as e:
        raise RerankInputError("query_image", "decoding a photo needs Pillow; pass a 224x224x3 uint8 array") from e
    return Image


def _decode(image: Any) -> Any:
    """An RGB PIL image from a PIL image, bytes or a path (as ``shared_model.encoders.decode_image``)."""
    import io

    pil = _pil_image()
    if isinstance(image, pil.Image):
        img = image
    else:
        name = "<bytes>" if isinstance(image, bytes | bytearray) else str(image)
        try:
            data = image if isinstance(image, bytes | bytearray) else Path(os.fspath(image)).read_bytes()
        except (OSError, TypeError) as e:
            raise RerankInputError("query_image", f"cannot read {name}: {e}") from e
        try:
            with pil.open(io.BytesIO(data)) as probe:
                probe.verify()  # broken chunks / CRCs
            img = pil.open(io.BytesIO(data))
            img.load()  # truncated data
        except Exception as e:  # PIL raises OSError, SyntaxError, ValueError, DecompressionBombError...
            raise RerankInputError("query_image", f"unreadable image {name}: {e.__class__.__name__}: {e}") from e
    if img.width < 1 or img.height < 1:
        raise RerankInputError("query_image", "empty image")
    if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
        rgba = img.convert("RGBA")
        img = pil.alpha_composite(pil.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba)
    return img.convert("RGB")


def _resize(img: Any) -> np.ndarray:
    pil = _pil_image()
    if img.mode != "RGB":
        img = img.convert("RGB")
    if img.size != (IMAGE_SIZE, IMAGE_SIZE):
        img = img.resize((IMAGE_SIZE, IMAGE_SIZE), pil.BILINEAR)
    return np.asarray(img, dtype=np.uint8)


# ---------------------------------------------------------------------------------------------- reranker


@dataclass
class UserContext:
    """The on-device user vector (never leaves the device): ``text [Dt]``, ``image [Di]``, ``mask`` 0/1."""

    text: np.ndarray
    image: np.ndarray
    mask: float
    num_items: int


class Reranker:
    """Reranks candidate items for a query with the bundle's text encoder, catalog and head (see module doc)."""

    def __init__(self, bundle_dir: Path, manifest: dict[str, Any], backend: str, num_threads: int,
                 tokenizer: Any, text: _TextEncoder, head: _Head, catalog: PackedCatalog) -> None:
        self.bundle_dir = bundle_dir
        self.manifest = manifest
        self.backend = backend
        self.num_threads = num_threads
        self.tokenizer = tokenizer
        self.text = text
        self.head = head
        self.catalog = catalog
        cat = manifest["catalog"]
        self.history_len = int(cat.get("history_len", 10))
        self.price_log = np.log1p(np.nan_to_num(catalog.arrays["price"].astype(np.float64), nan=0.0))
        self._image: _ImageEncoder | None = None
        self._empty_query: np.ndarray | None = None

    # ---------------------------------------------------------------------------------------- loading
    @classmethod
    def load(cls, bundle_dir: str | os.PathLike[str], backend: str = "onnx", num_threads: int = 1,
             verify: bool = True) -> Reranker:
        """Open a bundle: check the manifest (format, version), each needed file's sha256 (``verify``), load the
        tokenizer, text encoder, head and catalog. The image encoder loads on the first photo query."""
        if backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
        root = Path(bundle_dir)
        man = read_manifest(root)
        comps = man["components"]
        for comp in ("text_encoder", "head"):
            if backend not in comps.get(comp, {}).get("files", {}):
                raise BundleError(MANIFEST, f"no {backend} file for the {comp} (exported targets: "
                                            f"{sorted(comps.get(comp, {}).get('files', {}))})")
        if "catalog" not in man:
            raise BundleError(MANIFEST, "this bundle has no catalog: pass --catalog to fedrank export")

        def path_of(name: str) -> Path:
            return verify_file(root, man, name) if verify else root / name

        tok_name = man["tokenizer"]["file"]
        tokenizer = _load_tokenizer(path_of(tok_name), tok_name, int(man["tokenizer"]["max_length"]))
        parts: dict[str, Any] = {}
        for comp, klass in (("text_encoder", _TextEncoder), ("head", _Head)):
            name = comps[comp]["files"][backend]
            parts[comp] = klass(backend, path_of(name), name, man["files"][name], num_threads)
        cat = man["catalog"]
        dims = {"text": int(man["dims"]["text"]), "image": int(man["dims"]["image"])}
        catalog = PackedCatalog.load(path_of(cat["file"]), list(cat["item_ids"]), dims)
        rr = cls(root, man, backend, num_threads, tokenizer, parts["text_encoder"], parts["head"], catalog)
        if verify:  # fail now, not on the first photo, if the image encoder is damaged
            img = comps.get("image_encoder", {}).get("files", {}).get(backend)
            if img is not None:
                verify_file(root, man, img)
        return rr

    def _image_encoder(self) -> _ImageEncoder:
        if self._image is None:
            files = self.manifest["components"].get("image_encoder", {}).get("files", {})
            name = files.get(self.backend)
            if name is None:
                raise BundleError(MANIFEST, f"no {self.backend} image encoder in this bundle (search-by-photo)")
            path = self.bundle_dir / name
            if not path.is_file():
                raise BundleError(name, "missing from the bundle")
            self._image = _ImageEncoder(self.backend, path, name, self.manifest["files"][name], self.num_threads)
        return self._image

    # ---------------------------------------------------------------------------------------- pieces
    def tokenize(self, query: str) -> list[int]:
        if not isinstance(query, str):
            raise RerankInputError("query", f"expected a string, got {type(query).__name__}")
        if not query.strip():
            raise RerankInputError("query", "empty query")
        if len(query) > MAX_QUERY_CHARS:
            raise RerankInputError("query", f"{len(query)} characters; at most {MAX_QUERY_CHARS}")
        return list(self.tokenizer.encode(query).ids)

    def encode_query(self, query: str) -> np.ndarray:
        """``[Dt]`` float32 text embedding of a query (L2-normalised by the exported encoder)."""
        return self.text(self.tokenize(query))

    def embed_image(self, image: Any) -> np.ndarray:
        """``[Di]`` float32 image-encoder features of a photo (path, bytes, PIL image or HxWx3 uint8 array)."""
        return self._image_encoder()(_to_pixels(image))

    def user_context(self, recent_item_ids: Sequence[str] | None) -> UserContext:
        """Mean text / image embedding of the last ``history_len`` known recent items (most recent last)."""
        dt, di = int(self.manifest["dims"]["text"]), int(self.manifest["dims"]["image"])
        ids = [] if recent_item_ids is None else _id_list(recent_item_ids, "recent_item_ids")
        rows = [r for r in (self.catalog.row(i) for i in ids) if r is not None]
        if len(rows) < len(ids):
            log.info("ignoring %d recent item ids not in the bundle's catalog", len(ids) - len(rows))
        rows = rows[-self.history_len :]
        if not rows:
            return UserContext(np.zeros(dt, np.float32), np.zeros(di, np.float32), 0.0, 0)
        r = np.asarray(rows, np.int64)
        has_img = self.catalog.arrays["mask"][r, 1].astype(np.float32)
        text = self.catalog.modality("text", r).sum(0) / len(r)
        image = (self.catalog.modality("image", r) * has_img[:, None]).sum(0) / len(r)
        return UserContext(text.astype(np.float32), image.astype(np.float32), 1.0, len(r))

    def candidate_rows(self, candidate_ids: Sequence[str], skip_unknown: bool = False
                       ) -> tuple[list[str], np.ndarray, np.ndarray]:
        """``(kept ids, their catalog rows, keep [len(candidate_ids)] bool)``; unknown ids raise unless
        ``skip_unknown``."""
        ids = _id_list(candidate_ids, "candidate_ids")
        if not ids:
            raise RerankInputError("candidate_ids", "no candidates")
        if len(ids) > MAX_CANDIDATES:
            raise RerankInputError("candidate_ids", f"{len(ids)} candidates; at most {MAX_CANDIDATES}")
        rows = [self.catalog.row(i) for i in ids]
        keep = np.array([r is not None for r in rows], dtype=bool)
        if not keep.all():
            unknown = [i for i, k in zip(ids, keep, strict=True) if not k]
            if not skip_unknown:
                raise RerankInputError("candidate_ids", f"{len(unknown)} unknown item id(s), e.g. {unknown[:5]}")
            log.info("skipping %d unknown candidate ids", len(unknown))
            if not keep.any():
                raise RerankInputError("candidate_ids", "none of the candidates is in the bundle's catalog")
        kept = [i for i, k in zip(ids, keep, strict=True) if k]
        return kept, np.asarray([r for r in rows if r is not None], np.int64), keep

    def head_inputs(self, query_emb: np.ndarray, rows: np.ndarray, user: UserContext,
                    retrieval_scores: Floats | None = None,
                    first_stage_ranks: Floats | None = None) -> dict[str, np.ndarray]:
        """The head's inputs for one slate (batch 1): the same function as ``shared_model.data.head_inputs``."""
        s = len(rows)
        ranks = np.arange(s, dtype=np.float32) if first_stage_ranks is None else _vector(
            first_stage_ranks, s, "first_stage_ranks")
        slate = np.zeros((s, 3), np.float32)
        slate[:, 0] = ranks / 50.0
        if retrieval_scores is not None:
            rs = _vector(retrieval_scores, s, "retrieval_scores")
            slate[:, 1] = (rs - rs.mean()) / (rs.std() + 1e-6)
        lp = self.price_log[rows]
        slate[:, 2] = lp - np.median(lp)
        dense = np.concatenate([self.catalog.arrays["dense"][rows], slate], axis=1)
        cat = self.catalog
        return {
            "query": np.asarray(query_emb, np.float32).reshape(1, -1),
            "item_text": cat.modality("text", rows)[None],
            "item_image": cat.modality("image", rows)[None],
            "item_video": cat.modality("video", rows)[None],
            "item_mask": cat.arrays["mask"][rows].astype(np.float32)[None],
            "dense": dense.astype(np.float32)[None],
            "user_text": user.text[None],
            "user_image": user.image[None],
            "user_mask": np.full((1, 1), user.mask, np.float32),
        }

    def head_scores(self, inputs: dict[str, np.ndarray]) -> np.ndarray:
        """Run the exported head on prepared inputs (:meth:`head_inputs`): scores ``[S]``."""
        return np.asarray(self.head(inputs), np.float32)

    # ---------------------------------------------------------------------------------------- request
    def score(self, query: str | None, candidate_ids: Sequence[str], recent_item_ids: Sequence[str] | None = None,
              *, query_image: Any = None, retrieval_scores: Floats | None = None,
              first_stage_ranks: Floats | None = None, skip_unknown: bool = False,
              query_emb: np.ndarray | None = None) -> tuple[list[str], np.ndarray]:
        """Scores in the candidates' order: ``(kept candidate ids, scores [S])``. See :meth:`rerank`."""
        if query is None and query_image is None and query_emb is None:
            raise RerankInputError("query", "give a query, a query_image, or both")
        ids, rows, keep = self.candidate_rows(candidate_ids, skip_unknown)
        if retrieval_scores is not None:
            retrieval_scores = _vector(retrieval_scores, len(keep), "retrieval_scores")[keep]
        if first_stage_ranks is not None:
            first_stage_ranks = _vector(first_stage_ranks, len(keep), "first_stage_ranks")[keep]
        if query_emb is None:
            has_text = query is not None
            q = self.encode_query(query) if has_text else self._generic_query()  # type: ignore[arg-type]
        else:
            has_text, q = True, np.asarray(query_emb, np.float32)
        user = self.user_context(recent_item_ids)
        head = self.head_scores(self.head_inputs(q, rows, user, retrieval_scores, first_stage_ranks))
        if query_image is None:
            return ids, head
        photo = self.embed_image(query_image)
        visual = self._visual_similarity(photo, rows)
        w = PHOTO_TEXT_HEAD_WEIGHT if has_text else PHOTO_HEAD_WEIGHT
        return ids, (_z(visual) + w * _z(head)).astype(np.float32)

    def rerank(self, query: str | None = None, candidate_ids: Sequence[str] = (),
               recent_item_ids: Sequence[str] | None = None, *, query_image: Any = None,
               retrieval_scores: Floats | None = None, first_stage_ranks: Floats | None = None,
               skip_unknown: bool = False) -> list[tuple[str, float]]:
        """``[(item_id, score), ...]`` sorted best first (ties keep the candidates' order).

        Parameters
        ----------
        query : the shopper's text query (may be omitted when ``query_image`` is given)
        candidate_ids : item ids from the first stage, in its order (their rank is a feature)
        recent_item_ids : the shopper's recently clicked item ids, most recent last (stay on the device)
        query_image : search by photo: a path, bytes, PIL image or HxWx3 uint8 array (see module doc)
        retrieval_scores : optional first-stage scores ``[S]`` (z-scored within the slate)
        first_stage_ranks : optional first-stage ranks ``[S]`` (default: 0, 1, 2, ... in the given order)
        skip_unknown : leave candidate ids missing from the catalog out instead of raising
        """
        ids, scores = self.score(query, candidate_ids, recent_item_ids, query_image=query_image,
                                 retrieval_scores=retrieval_scores, first_stage_ranks=first_stage_ranks,
                                 skip_unknown=skip_unknown)
        order = np.argsort(-scores, kind="stable")
        return [(ids[i], float(scores[i])) for i in order]

    def _generic_query(self) -> np.ndarray:
        if self._empty_query is None:
            self._empty_query = self.text(list(self.tokenizer.encode("").ids))
        return self._empty_query

    def _visual_similarity(self, photo: np.ndarray, rows: np.ndarray) -> np.ndarray:
        mask = self.catalog.arrays["mask"][rows]
        img = self.catalog.modality("image", rows)
        vid = self.catalog.modality("video", rows)
        ref = np.where(mask[:, 1:2], img, vid)
        has = mask[:, 1] | mask[:, 2]
        denom = np.linalg.norm(ref, axis=1) * (np.linalg.norm(photo) + 1e-12) + 1e-12
        return np.where(has, ref @ photo / denom, -1.0)


def _load_tokenizer(path: Path, name: str, max_length: int) -> Any:
    from tokenizers import Tokenizer

    try:
        tok = Tokenizer.from_file(str(path))
    except Exception as e:  # tokenizers raises its own Exception type on bad JSON
        raise BundleError(name, f"cannot load the tokenizer ({e.__class__.__name__}: {e})") from e
    tok.no_padding()
    tok.enable_truncation(max_length=max_length)
    return tok


def _id_list(ids: Any, field: str) -> list[str]:
    if isinstance(ids, str | bytes) or not isinstance(ids, Sequence | np.ndarray):
        raise RerankInputError(field, f"expected a sequence of item ids, got {type(ids).__name__}")
    out = [str(i) for i in ids]
    return out


def _vector(values: Floats, n: int, field: str) -> np.ndarray:
    try:
        v = np.asarray(values, dtype=np.float32).reshape(-1)
    except (TypeError, ValueError) as e:
        raise RerankInputError(field, f"expected numbers: {e}") from e
    if v.shape[0] != n:
        raise RerankInputError(field, f"{v.shape[0]} values for {n} candidates")
    if not np.isfinite(v).all():
        raise RerankInputError(field, "NaN or infinite values")
    return v


def _z(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, np.float64)
    return (x - x.mean()) / (x.std() + 1e-6)
