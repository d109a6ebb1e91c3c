"""On-device reranking from an exported bundle (``fedrank export``), with ONNX Runtime or LiteRT.

Imports only numpy, ``tokenizers`` and ``onnxruntime`` or ``ai_edge_litert`` (``tflite_runtime`` as a fallback
import) -- never torch, and no fedrank module that imports torch (``client/runtime_*.py`` and
``shared_model/head_features.py`` are torch-free; a test runs this module where ``import torch`` fails). Pillow is
imported lazily, and only to decode a photo for search-by-photo. The pieces: the bundle format
(``runtime_bundle``), one wrapper over ONNX Runtime / LiteRT files (``runtime_models``), photo preprocessing
(``runtime_images``), and every feature the head gets (``shared_model.head_features``, shared with training).

Usage::

    rr = Reranker.load("bundles/b1", backend="onnx")          # or backend="tflite"
    rr.rerank("red canvas sneakers", candidate_ids, recent_item_ids=recent)  # [(item_id, score), ...] best first
    rr.rerank(query_image="photo.jpg", candidate_ids=candidate_ids)          # search by photo
    rr.rerank_candidates("red canvas sneakers", request)   # candidates' rows sent by the search API

What happens per request (the features come from ``shared_model.head_features``, the functions the torch
pipeline's ``shared_model.data.head_inputs`` calls, so scores match the pipeline the head was trained and
evaluated with):

* the query is tokenised (truncated at the manifest's ``max_length`` tokens, like the training pipeline) and
  encoded by the exported text encoder -- or, in a compact bundle, by the static query encoder (an int8 token
  table distilled from MiniLM: gather, mean, a 128 x 384 projection; numpy, ``runtime_models.StaticTextModel``);
* candidates' embeddings come from the bundle's catalog (int8 rows times their scale), or -- with
  :meth:`Reranker.rerank_candidates` -- from the request itself (a search API sends each candidate's int8 rows,
  so a bundle need not ship a catalog at all; the request format is in that method's docstring);
* the **user context** is computed here, on the device, from ``recent_item_ids`` (most recent last; the last
  ``history_len`` known ids): mean text embedding, mean image embedding (items without an image count as zero),
  ``user_mask = 1`` if any (``head_features.user_context``). It is never sent anywhere: nothing in this module
  does any I/O besides reading the bundle (and a photo's file).
* dense features = the item's 4 catalog features + 3 slate features (``head_features.slate_features``):
  first-stage rank / 50 (the candidates' order unless ``first_stage_ranks`` is given), the first-stage retrieval
  score z-scored within the slate (0 for every candidate when ``retrieval_scores`` is not given), log1p(price)
  minus the slate median;
* the head scores every candidate independently; with LiteRT a slate is padded up to the next signature size
  (``s20``/``s50``/``s100``) and a longer one is scored in chunks (exact: candidates do not interact).

Search by photo (``query_image=``): the photo is embedded by the exported image encoder, and each candidate gets

    score = z(visual) + w * z(head)

where ``visual`` compares the photo's embedding with the candidate's image embedding (its video embedding if it
has no image; -1 if it has neither): with the bundle's learnt projection (``photo_search.npz``, manifest
``photo_search.mode == "learnt"``) it is the cosine of the two *projected* embeddings (``(x - mean) * inv_std @
weight``, a 1333 -> 64 map trained on the catalog's photos so that photos of the same type and colour lie close:
``shared_model.photo_search``, whose numpy ``visual_scores`` is the one definition the export's parity gate and the
benchmark use too); without it (``--photo-search heuristic``, a catalog with too few labelled photos, or a
bundle from before the projection existed) it is the raw cosine of the two embeddings. ``head`` is the head's score
with the text query if one is given too ("like this photo, but in red"), else with the embedding of the empty
query (a generic query: the head then contributes the query-independent part it learnt -- price, rating, the shopper's history), ``z`` standardises
within the slate, and ``w = PHOTO_HEAD_WEIGHT`` (0.25) without text, ``PHOTO_TEXT_HEAD_WEIGHT`` (1.0) with text.
The head was never trained on photo queries, so the fusion with the head stays a fixed rule; only ``visual`` is
learnt. ``Reranker.photo_search`` is the projection in use (``None``: the raw cosine).

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
    IMAGE_INPUT,
    MANIFEST,
    BundleError,
    CandidateRows,
    PackedCatalog,
    RerankInputError,
    parse_candidates,
    photo_projection_from_bytes,
    read_bundle_file,
    read_manifest,
)
from client.runtime_images import to_pixels
from client.runtime_models import (
    ExportedModel,
    StaticTextModel,
    encode_tokens,
    load_interpreter_class,
    open_model,
    score_slate,
)
from shared_model.head_features import (
    DENSE_DIM,
    HISTORY_LEN,
    IMAGE_DIM,
    SLATE_DENSE_DIM,
    TEXT_DIM,
    head_feeds,
    log_prices,
    recent_history,
    slate_features,
    user_context,
)
from shared_model.photo_search import PhotoProjection, visual_scores

log = logging.getLogger(__name__)

MAX_QUERY_CHARS = 1000  # longer queries are rejected (tokens beyond max_length are truncated, as in training)
MAX_CANDIDATES = 2000
PHOTO_HEAD_WEIGHT = 0.25
PHOTO_TEXT_HEAD_WEIGHT = 1.0

Floats = Sequence[float] | np.ndarray  # per-candidate numbers

__all__ = ["Reranker", "BundleError", "RerankInputError", "load_interpreter_class"]


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
                 tokenizer: Any, text: ExportedModel, head: ExportedModel, catalog: PackedCatalog | None,
                 image_model: bytes | None = None, photo_search: PhotoProjection | None = None) -> None:
        self.bundle_dir = bundle_dir
        self.manifest = manifest
        self.backend = backend
        self.num_threads = num_threads
        self.tokenizer = tokenizer
        self.text = text
        self.head = head
        self._catalog = catalog  # None: a bundle without a catalog (candidates come from the server)
        dims = manifest.get("dims", {})  # read_manifest checks it; a hand-made manifest may leave it out
        self.dims = {"text": int(dims.get("text", TEXT_DIM)), "image": int(dims.get("image", IMAGE_DIM))}
        self.item_dense_dim = int(dims.get("dense", DENSE_DIM)) - SLATE_DENSE_DIM
        self.history_len = int(manifest.get("catalog", manifest.get("candidates", {})).get("history_len",
                                                                                       HISTORY_LEN))
        self._image: ExportedModel | None = None
        self._image_model = image_model  # the image encoder file's verified bytes, until the first photo query
        self._empty_query: np.ndarray | None = None
        self.photo_search = photo_search  # the learnt search-by-photo projection; None: the raw cosine

    @property
    def has_catalog(self) -> bool:
        """False for a bundle exported without a catalog (``--no-catalog``): it reranks server-sent rows only."""
        return self._catalog is not None

    @property
    def catalog(self) -> PackedCatalog:
        """The bundle's catalog; a bundle without one raises :class:`BundleError` (see :meth:`rerank_candidates`)."""
        if self._catalog is None:
            raise BundleError(MANIFEST, "this bundle has no catalog (exported with --no-catalog): rerank "
                                        "server-sent candidates with rerank_candidates")
        return self._catalog

    # ---------------------------------------------------------------------------------------- loading
    @classmethod
    def load(cls, bundle_dir: str | os.PathLike[str], backend: str = "onnx", num_threads: int = 1,
             verify: bool = True) -> Reranker:
        """Open a bundle: check the manifest against ``manifest.sha256`` (and its format, version, keys), read each
        file this backend needs once and check its sha256 (skipped with ``verify=False``; the manifest's digest is
        always checked), then build the tokenizer, text encoder, head and catalog from those bytes. The image
        encoder is read and checked now too, and built from its bytes on the first photo query."""
        if backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
        root = Path(bundle_dir)
        man = read_manifest(root)
        comps = man["components"]
        for comp in ("text_encoder", "head"):
            if backend not in comps.get(comp, {}).get("files", {}):
                raise BundleError(MANIFEST, f"no {backend} file for the {comp} (exported targets: "
                                            f"{sorted(comps.get(comp, {}).get('files', {}))})")
        names = {"tokenizer": man["tokenizer"]["file"], "text_encoder": comps["text_encoder"]["files"][backend],
                 "head": comps["head"]["files"][backend]}
        if "catalog" in man:  # a bundle without one reranks server-sent candidates only (rerank_candidates)
            names["catalog"] = man["catalog"]["file"]
        image = comps.get("image_encoder", {}).get("files", {}).get(backend)
        if image is not None:
            names["image_encoder"] = image
        photo = man.get("photo_search", {})
        if photo.get("mode") == "learnt":  # older bundles have no such key: the raw cosine
            names["photo_search"] = photo["file"]
        data = {part: read_bundle_file(root, man, name, verify) for part, name in names.items()}  # all, then build

        tokenizer = _load_tokenizer(data["tokenizer"], names["tokenizer"], int(man["tokenizer"]["max_length"]))
        text, head = (open_model(backend, data[comp], names[comp], man["files"][names[comp]], comp, num_threads)
                      for comp in ("text_encoder", "head"))
        if isinstance(text, StaticTextModel) and text.vocab_size != tokenizer.get_vocab_size():
            raise BundleError(names["text_encoder"], f"table of {text.vocab_size} rows for a tokenizer of "
                                                     f"{tokenizer.get_vocab_size()} tokens ({names['tokenizer']})")
        dims = {"text": int(man["dims"]["text"]), "image": int(man["dims"]["image"])}
        catalog = None if "catalog" not in names else PackedCatalog.from_bytes(
            data["catalog"], names["catalog"], list(man["catalog"]["item_ids"]), dims)
        projection = None if "photo_search" not in names else photo_projection_from_bytes(
            data["photo_search"], names["photo_search"], dims["image"])
        return cls(root, man, backend, num_threads, tokenizer, text, head, catalog, data.get("image_encoder"),
                   projection)

    def _image_encoder(self) -> ExportedModel:
        if self._image is None:
            name = self.manifest["components"].get("image_encoder", {}).get("files", {}).get(self.backend)
            if name is None or self._image_model is None:
                raise BundleError(MANIFEST, f"no {self.backend} image encoder in this bundle (search-by-photo)")
            self._image = open_model(self.backend, self._image_model, name, self.manifest["files"][name],
                                     "image_encoder", self.num_threads)
            self._image_model = None  # the model keeps what it needs
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
        return encode_tokens(self.text, self.tokenize(query))

    def embed_image(self, image: Any) -> np.ndarray:
        """``[Di]`` float32 image-encoder features of a photo (path, bytes, PIL image or HxWx3 uint8 array)."""
        return self._image_encoder().run({IMAGE_INPUT: to_pixels(image)})[0]

    def user_context(self, recent_item_ids: Sequence[str] | None) -> UserContext:
        """Mean text / image embedding of the last ``history_len`` known recent items (most recent last)."""
        ids = [] if recent_item_ids is None else _id_list(recent_item_ids, "recent_item_ids")
        if ids and self._catalog is None:
            raise RerankInputError("recent_item_ids", "this bundle has no catalog: pass recent_items (the rows of "
                                                      "the shopper's recent items, in the candidates format)")
        known = [] if self._catalog is None else [self._catalog.row(i) for i in ids]
        rows = np.asarray(recent_history(known, self.history_len), np.int64)  # [H]
        if None in known:
            log.info("ignoring %d recent item ids not in the bundle's catalog", known.count(None))
        if self._catalog is None:
            return self._user_from(np.zeros((0, self.dims["text"]), np.float32),
                                   np.zeros((0, self.dims["image"]), np.float32), np.zeros(0, bool))
        cat = self._catalog
        return self._user_from(cat.modality("text", rows), cat.modality("image", rows), cat.arrays["mask"][rows, 1])

    def user_context_from_rows(self, recent_items: Any) -> UserContext:
        """The user context from the rows of the shopper's recent items, most recent last, in the candidates
        format (:meth:`rerank_candidates`; ``retrieval_scores``/``first_stage_ranks`` are ignored): for a device
        without the bundle catalog, which keeps the rows of items it was shown and the shopper clicked."""
        rows, _, _ = parse_candidates(recent_items, self.dims, self.item_dense_dim, field="recent_items",
                                      history=True)
        last = slice(max(len(rows) - self.history_len, 0), len(rows))
        return self._user_from(rows.text[last], rows.image[last], rows.mask[last, 1])

    def _user_from(self, text: np.ndarray, image: np.ndarray, has_image: np.ndarray) -> UserContext:
        t, i, mask = user_context(text, image, has_image, np.ones(len(text), bool))
        return UserContext(t, i, float(mask[0]), len(text))

    def candidate_rows(self, candidate_ids: Sequence[str], skip_unknown: bool = False
                       ) -> tuple[list[str], np.ndarray, np.ndarray]:
        """``(kept ids, their catalog rows, keep [len(candidate_ids)] bool)``; unknown ids raise unless
        ``skip_unknown``."""
        ids = _id_list(candidate_ids, "candidate_ids")
        if not ids:
            raise RerankInputError("candidate_ids", "no candidates")
        if len(ids) > MAX_CANDIDATES:
            raise RerankInputError("candidate_ids", f"{len(ids)} candidates; at most {MAX_CANDIDATES}")
        if self._catalog is None:
            raise RerankInputError("candidate_ids", "this bundle has no catalog: send the candidates' rows "
                                                    "(rerank_candidates)")
        rows = [self._catalog.row(i) for i in ids]
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
        """The head's inputs for one slate (batch 1) of catalog ``rows``: see :meth:`candidate_inputs`."""
        if self._catalog is None:
            raise RerankInputError("candidate_ids", "this bundle has no catalog")
        cands = CandidateRows.from_catalog(self._catalog, [""] * len(rows), np.asarray(rows, np.int64))
        return self.candidate_inputs(query_emb, cands, user, retrieval_scores, first_stage_ranks)

    def candidate_inputs(self, query_emb: np.ndarray, cands: CandidateRows, user: UserContext,
                         retrieval_scores: Floats | None = None,
                         first_stage_ranks: Floats | None = None) -> dict[str, np.ndarray]:
        """The head's inputs for one slate (batch 1): the same functions as ``shared_model.data.head_inputs``."""
        s = len(cands)
        ranks = None if first_stage_ranks is None else _vector(first_stage_ranks, s, "first_stage_ranks")
        scores = None if retrieval_scores is None else _vector(retrieval_scores, s, "retrieval_scores")
        slate = slate_features(log_prices(cands.price), ranks, scores)  # [S, 3]
        return head_feeds(
            np.asarray(query_emb, np.float32).reshape(1, -1), cands.text[None], cands.image[None],
            cands.video[None], cands.mask[None], cands.dense[None], slate[None],
            (user.text[None], user.image[None], np.full((1, 1), user.mask, np.float32)))

    def head_scores(self, inputs: dict[str, np.ndarray]) -> np.ndarray:
        """Run the exported head on prepared inputs (:meth:`head_inputs`): scores ``[S]``."""
        return score_slate(self.head, inputs)

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
        cands = CandidateRows.from_catalog(self.catalog, ids, rows)
        user = self.user_context(recent_item_ids)
        return ids, self._score(query, cands, user, query_image, retrieval_scores, first_stage_ranks, query_emb)

    def _score(self, query: str | None, cands: CandidateRows, user: UserContext, query_image: Any,
               retrieval_scores: Floats | None, first_stage_ranks: Floats | None,
               query_emb: np.ndarray | None) -> np.ndarray:
        """Scores ``[S]`` of ``cands`` (the one path behind the catalog and the server-candidates calls)."""
        if query_emb is None:
            has_text = query is not None
            q = self.encode_query(query) if has_text else self._generic_query()  # type: ignore[arg-type]
        else:
            has_text, q = True, np.asarray(query_emb, np.float32)
        head = self.head_scores(self.candidate_inputs(q, cands, user, retrieval_scores, first_stage_ranks))
        if query_image is None:
            return head
        visual = self.visual_similarity(self.embed_image(query_image), cands)
        w = PHOTO_TEXT_HEAD_WEIGHT if has_text else PHOTO_HEAD_WEIGHT
        return (_z(visual) + w * _z(head)).astype(np.float32)

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

    def visual_similarity(self, photo: np.ndarray, cands: CandidateRows) -> np.ndarray:
        """``visual [S]`` of the photo embedding ``photo [Di]`` against ``cands``: the projected cosine with the
        bundle's learnt projection, else the raw cosine; each candidate's image (else video) embedding, -1 with
        neither (``shared_model.photo_search.visual_scores``)."""
        mask = cands.mask
        ref = np.where(mask[:, 1:2], cands.image, cands.video)  # [S, Di]
        return visual_scores(photo, ref, mask[:, 1] | mask[:, 2], self.photo_search)

    def _generic_query(self) -> np.ndarray:
        if self._empty_query is None:
            self._empty_query = encode_tokens(self.text, list(self.tokenizer.encode("").ids))
        return self._empty_query

    # ------------------------------------------------------------------------------- candidates from the server
    def score_candidates(self, query: str | None, candidates: Any, recent_item_ids: Sequence[str] | None = None,
                         *, recent_items: Any = None, query_image: Any = None,
                         query_emb: np.ndarray | None = None) -> tuple[list[str], np.ndarray]:
        """Scores in the request's order: ``(item ids, scores [S])``. See :meth:`rerank_candidates`."""
        if query is None and query_image is None and query_emb is None:
            raise RerankInputError("query", "give a query, a query_image, or both")
        cands, retrieval, ranks = parse_candidates(candidates, self.dims, self.item_dense_dim,
                                                   max_candidates=MAX_CANDIDATES)
        if recent_items is not None and recent_item_ids is not None:
            raise RerankInputError("recent_items", "give recent_item_ids (catalog) or recent_items (rows), not both")
        user = self.user_context_from_rows(recent_items) if recent_items is not None \
            else self.user_context(recent_item_ids)
        return cands.item_ids, self._score(query, cands, user, query_image, retrieval, ranks, query_emb)

    def rerank_candidates(self, query: str | None = None, candidates: Any = None,
                          recent_item_ids: Sequence[str] | None = None, *, recent_items: Any = None,
                          query_image: Any = None) -> list[tuple[str, float]]:
        """Rerank candidates whose embeddings come **in the request** (from the shop's search API), not from the
        bundle's catalog: a shop with millions of products ships no catalog to the device. ``[(item_id, score),
        ...]`` best first (ties keep the request's order); given the rows of the same items, the result equals
        :meth:`rerank` on the bundle catalog exactly (same dequantised numbers, same features, same head).

        Request format, version 1 (``candidates``): a mapping (Python dict; a JSON object), S candidates (1 to
        ``MAX_CANDIDATES`` = 2000) in first-stage order. The per-candidate arrays have exactly the names, dtypes and
        quantization of the bundle's ``catalog.npz`` (an item's row is the row ``catalog.npz`` would hold)::

            field              dtype     shape     meaning
            version            int       -         1 (CANDIDATES_VERSION)
            item_ids           string    [S]       unique, non-empty candidate ids, first-stage order
            text_q             int8      [S, Dt]   text embedding (MiniLM, L2-normalised), Dt = manifest dims.text
            text_scale         float32   [S]       its per-row scale: text = text_q * text_scale[:, None]
            image_q            int8      [S, Di]   image embedding (EfficientNet-Lite0), Di = manifest dims.image
            image_scale        float32   [S]
            video_q            int8      [S, Di]   video embedding (frames' mean)
            video_scale        float32   [S]
            mask               bool      [S, 3]    modality present: text, image, video (0/1 accepted)
            dense              float32   [S, F]    item features, F = dims.dense - 3 = 4: log_price_z,
                                                   rating_frac, has_price, has_rating (the feature store's numbers)
            price              float64   [S]       raw price (NaN = unknown; the slate price feature uses log1p)
            retrieval_scores   float32   [S]       optional: first-stage scores (z-scored within the slate here)
            first_stage_ranks  float32   [S]       optional: first-stage ranks, 0 = first (default 0, 1, 2, ...)

        Quantization (``client.runtime_bundle.pack_rows``): per row, ``scale = max|x| / 127`` and ``q =
        round(x / scale)`` clipped to [-127, 127]; an absent modality is an all-zero row with scale 0. Rows are
        C-order (row-major). Arrays may be numpy arrays, nested lists (values must fit the dtype: int8 fields
        integers in [-128, 127]; floats finite, ``price`` may be NaN), or -- the JSON wire form written by
        ``client.runtime_bundle.request_to_json`` -- objects ``{"dtype": "int8"|"uint8"|"float32"|"float64",
        "shape": [..], "data": base64 of the little-endian C-order bytes}`` (``mask`` as uint8 0/1). A bad field
        raises :class:`RerankInputError` naming it (``candidates.text_q``: missing / shape / dtype / range).
        ``client.runtime_bundle.candidates_request(catalog, item_ids)`` builds a request from a bundle catalog.

        Parameters
        ----------
        query : the text query (may be omitted when ``query_image`` is given)
        candidates : the request above
        recent_item_ids : the shopper's recent item ids, looked up in the bundle's catalog (as in :meth:`rerank`)
        recent_items : or, for a bundle without a catalog, the rows of the shopper's recent items (most recent
            last; may be empty, an id may repeat) in the same format (``version``, ``item_ids`` and the per-candidate
            arrays; the optional first-stage fields are ignored); the last ``history_len`` (10) rows count: the
            device keeps them from earlier responses, and they never leave it
        query_image : search by photo, as in :meth:`rerank` (needs the image encoder)
        """
        ids, scores = self.score_candidates(query, candidates, recent_item_ids, recent_items=recent_items,
                                            query_image=query_image)
        order = np.argsort(-scores, kind="stable")
        return [(ids[i], float(scores[i])) for i in order]


def _load_tokenizer(data: bytes, name: str, max_length: int) -> Any:
    from tokenizers import Tokenizer

    try:
        tok = Tokenizer.from_str(data.decode("utf-8"))
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
