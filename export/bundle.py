"""``export_bundle``: checkpoint + data -> a validated on-device bundle directory (layout: client/runtime_bundle.py).

Every file is exported into a private staging directory beside the destination, validated there
(export/validate.py), and only when every file and the whole pipeline (through the on-device runtime, per backend)
pass their bars is the staging directory swapped into place (:func:`shared_model.outdir.stage_into`: one atomic
exchange), under a lock on the destination. Any failure or interruption raises (``ExportValidationError`` names
the file, check, measured value and bar) and leaves no bundle and no staging directory behind; staging left by a
killed export is removed by the next one.

Precision per file, from ``quantize`` (``int8`` | ``fp16`` | ``none``):

* text encoder and head: exactly the requested precision; a miss of a bar is an error;
* image encoder: "as far as fidelity allows" -- the candidates are tried from the smallest (``int8``: ONNX
  static QDQ int8 / LiteRT dynamic-range int8, then fp16, then fp32) and the first that reaches the cosine bar is
  kept; every tried precision and its measured cosine are recorded in the manifest.

Query encoder (``query_encoder``): ``minilm`` (default) exports the text encoder as above; ``static`` distils a
static token-embedding table from it instead (``export/static_encoder.py``; int8 table, numpy on the device, one
file for both backends), validated against its own fp32 reference (cosine) and, through the runtime, on the
held-out slates like any bundle; its ranking cost against the full text encoder (torch NDCG@10 on the same
slates) is measured and must stay within ``static_ndcg_cost_bar``. Profiles (:meth:`ExportOptions.for_profile`):
``full`` (MiniLM + image encoder) and ``compact`` (static query encoder, no image encoder: text-query reranking
only, no search by photo).

Search by photo (``photo_search``, bundles with an image encoder): ``auto`` (default) fits the learnt projection
(``shared_model.photo_search``) on the photos of the catalog the bundle ships, labelled by (category, colour), and
writes it as ``photo_search.npz`` (float16 weights) -- unless the catalog has too few labelled photos, or the
projection does not beat the raw cosine on its held-out photos: then the bundle keeps the heuristic and the
manifest's ``photo_search.reason`` says why; ``learnt`` makes either an error; ``heuristic`` ships no projection.
A shipped projection is gated like every file: the runtime's visual scores (float16 projection, int8 catalog rows)
against the fp32 torch reference on catalog photos asked as queries (``validate.photo_search_fidelity``).
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import importlib.metadata
import json
import logging
import os
import shutil
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from client.runtime_bundle import (
    BUNDLE_FORMAT,
    BUNDLE_VERSION,
    CANDIDATE_ARRAYS,
    CANDIDATE_OPTIONAL,
    CANDIDATES_VERSION,
    CATALOG,
    PHOTO_SEARCH,
    PROFILES,
    STATIC_KIND,
    TOKENIZER,
    sha256_file,
    write_manifest,
)
from export.catalog import pack_catalog, packed_catalog
from export.errors import ExportError, ExportValidationError
from export.onnx_export import export_onnx, quantize_onnx, share_weights
from export.probes import (
    head_probe_feeds,
    held_out,
    load_tokenizer,
    probe_images,
    probe_texts,
    sample_at,
    text_feeds,
    text_probes,
)
from export.spec import (
    DEFAULT_MAX_LENGTH,
    HEAD_SIGNATURE_SLATES,
    PHOTO_SEARCH_NDCG_BAR,
    PHOTO_SEARCH_PROBES,
    PHOTO_SEARCH_SLATE,
    PHOTO_SEARCH_TAU_BAR,
    PIPELINE_NDCG_BAR,
    PIPELINE_TAU_BAR,
    STATIC_NDCG_COST_BAR,
    TEXT_COSINE_BAR,
    ExportSpec,
    head_spec,
    image_spec,
    random_head_inputs,
    text_spec,
)
from export.tflite_export import convert_tflite, finalize_tflite, quantize_tflite
from export.validate import (
    HeldOut,
    PhotoProbes,
    Probe,
    photo_probes,
    photo_search_fidelity,
    pipeline_fidelity,
    torch_reference,
    validate_onnx,
    validate_tflite,
)
from shared_model.head import FusedRankingHead
from shared_model.head_features import DENSE_DIM, HISTORY_LEN, IMAGE_DIM, SLATE_DENSE_NAMES
from shared_model.outdir import locked_dir, scratch_dir, stage_into
from shared_model.photo_search import PhotoSearchConfig, PhotoSearchError, fit_from_catalog, photo_labels

log = logging.getLogger(__name__)

QUANTIZE_CHOICES = ("int8", "fp16", "none")
TARGETS = ("onnx", "tflite")
QUERY_ENCODERS = ("minilm", "static")
PHOTO_SEARCH_CHOICES = ("auto", "learnt", "heuristic")
VALUE_CHECKS = ("cosine_min", "kendall_tau_mean")  # misses that make the image encoder fall back
_PACKAGES = ("torch", "onnx", "onnxruntime", "onnxscript", "litert-torch", "ai-edge-litert", "ai-edge-quantizer",
             "tokenizers", "numpy", "transformers")


@dataclass
class ExportOptions:
    targets: tuple[str, ...] = TARGETS
    quantize: str = "int8"
    max_length: int = DEFAULT_MAX_LENGTH
    head_slates: tuple[int, ...] = HEAD_SIGNATURE_SLATES
    image_encoder: bool = True
    max_slates: int = 2000  # held-out slates scored for the pipeline check (a sample is noisy near the bar)
    seed: int = 0
    overwrite: bool = False
    query_encoder: str = "minilm"  # or "static": a distilled token-embedding table (export/static_encoder.py)
    static_dim: int = 128  # the static table's width (30,522 x 128 int8 = 3.9 MB)
    static_ndcg_cost_bar: float | None = STATIC_NDCG_COST_BAR  # max NDCG@10 lost to MiniLM (torch, held out)
    ship_catalog: bool = True  # False: no catalog.npz; the device reranks server-sent candidates only
    photo_search: str = "auto"  # learnt projection when the catalog allows (auto), always (learnt), or never
    photo_search_config: PhotoSearchConfig | None = None  # default: PhotoSearchConfig(seed=seed)

    def __post_init__(self) -> None:
        bad = [t for t in self.targets if t not in TARGETS]
        if bad or not self.targets:
            raise ExportError(f"targets {list(self.targets)}: choose from {TARGETS}")
        if self.quantize not in QUANTIZE_CHOICES:
            raise ExportError(f"quantize {self.quantize!r}: choose from {QUANTIZE_CHOICES}")
        if self.query_encoder not in QUERY_ENCODERS:
            raise ExportError(f"query_encoder {self.query_encoder!r}: choose from {QUERY_ENCODERS}")
        if not 1 <= self.static_dim <= 384:
            raise ExportError(f"static_dim {self.static_dim}: must be in 1..384")
        if self.photo_search not in PHOTO_SEARCH_CHOICES:
            raise ExportError(f"photo_search {self.photo_search!r}: choose from {PHOTO_SEARCH_CHOICES}")
        if self.photo_search == "learnt" and not self.image_encoder:
            raise ExportError("photo_search 'learnt' needs the image encoder (the compact profile and "
                              "--no-image-encoder have no search by photo)")

    @classmethod
    def for_profile(cls, profile: str, **overrides: Any) -> ExportOptions:
        """``full``: MiniLM query encoder + image encoder (the defaults); ``compact``: the static query encoder and
        no image encoder (text-query reranking only; no search by photo). ``overrides`` win."""
        if profile not in PROFILES:
            raise ExportError(f"profile {profile!r}: choose from {PROFILES}")
        base: dict[str, Any] = {"query_encoder": "static", "image_encoder": False} if profile == "compact" else {}
        return cls(**{**base, **overrides})

    @property
    def profile(self) -> str:
        """``full``, ``compact``, or ``custom`` (any other mix)."""
        if self.query_encoder == "static" and not self.image_encoder:
            return "compact"
        return "full" if self.query_encoder == "minilm" and self.image_encoder else "custom"


@dataclass
class Sources:
    """What the bundle is made from. ``prepared`` is a ``shared_model.prepared.Prepared`` (or the synthetic one)."""

    head: FusedRankingHead
    prepared: Any
    text_encoder: torch.nn.Module | None = None  # default: shared_model.encoders.TextEncoder()
    image_encoder: torch.nn.Module | None = None  # default: shared_model.encoders.ImageEncoder()
    checkpoint_info: dict[str, Any] = field(default_factory=dict)
    catalog_store: Any = None  # a FeatureStore to ship instead of prepared.store ...
    catalog: Any = None  # ... and its Catalog (for the raw prices)


def export_from_checkpoint(checkpoint: str | os.PathLike[str], out: str | os.PathLike[str],
                           catalog: str | os.PathLike[str] | None = None, data: str | os.PathLike[str] | None = None,
                           options: ExportOptions | None = None) -> dict[str, Any]:
    """``fedrank export``: load the head, prepare the data it was trained on, export (see :func:`export_bundle`).

    ``catalog`` is a data folder (its feature store is shipped) or a catalog file (CSV/JSONL, embedded through
    the feature cache of :func:`shared_model.embedding_cache.feature_cache_dir`). Held-out slates for the pipeline check come from ``data``, else from
    ``catalog`` when it is a data folder, else from the checkpoint's ``run_config["data.dir"]``.
    """
    with locked_dir(out):  # before the slow part: a second export to ``out`` fails at once
        return _export_from_checkpoint(checkpoint, out, catalog, data, options)


def _export_from_checkpoint(checkpoint: str | os.PathLike[str], out: str | os.PathLike[str],
                            catalog: str | os.PathLike[str] | None, data: str | os.PathLike[str] | None,
                            options: ExportOptions | None) -> dict[str, Any]:
    from shared_model.checkpoint import CheckpointError, load_checkpoint
    from shared_model.prepared import prepare

    try:
        head, payload = load_checkpoint(checkpoint)
    except CheckpointError as e:
        raise ExportError(str(e)) from e
    cat_path = Path(catalog) if catalog is not None else None
    if cat_path is not None and not cat_path.exists():
        raise ExportError(f"--catalog {cat_path}: no such file or folder")
    data_dir = data or (cat_path if cat_path is not None and cat_path.is_dir() else None) \
        or payload.get("run_config", {}).get("data.dir")
    if not data_dir or not Path(data_dir).is_dir():
        raise ExportError(f"no data folder to validate on ({data_dir!r}): pass --data (or --catalog DATA_DIR); "
                          "the checkpoint's run_config has no usable data.dir")
    try:
        prep = prepare(Path(data_dir), progress=False)
    except (OSError, ValueError) as e:  # missing files, a malformed catalog or session log
        raise ExportError(f"data folder {data_dir}: {e}") from e
    store = cat = None
    if cat_path is not None and cat_path.is_file():
        from shared_model.catalog_io import load_catalog
        from shared_model.embedding_cache import feature_cache_dir
        from shared_model.features import build_feature_store

        cat = load_catalog(cat_path)
        store = build_feature_store(cat, feature_cache_dir(cat_path), progress=False)
    info = {"path": str(Path(checkpoint).resolve()), "sha256": sha256_file(checkpoint),
            "round": payload.get("round", 0), "data_dir": str(Path(data_dir).resolve())}
    return export_bundle(Sources(head, prep, checkpoint_info=info, catalog_store=store, catalog=cat), out, options)


def export_bundle(sources: Sources, out: str | os.PathLike[str], options: ExportOptions | None = None
                  ) -> dict[str, Any]:
    """Export, validate, and atomically write the bundle to ``out``; returns the manifest."""
    opts = options or ExportOptions()
    out = Path(out)
    if out.exists() and not opts.overwrite:
        raise ExportError(f"{out} exists (pass overwrite=True / --overwrite to replace it)")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # torch references: more threads than free cores makes OpenMP crawl (measured 50x)
    try:
        with locked_dir(out, reentrant=True) as target:
            if target.exists() and not opts.overwrite:  # written by another export meanwhile
                raise ExportError(f"{out} exists (pass overwrite=True / --overwrite to replace it)")
            with stage_into(target) as staging, scratch_dir(target) as work:
                manifest = _build(sources, staging, work, opts)
        log.info("bundle written to %s", out)
        return manifest
    finally:
        torch.set_num_threads(threads)


# ------------------------------------------------------------------------------------------------ build


def _build(src: Sources, staging: Path, work: Path, opts: ExportOptions) -> dict[str, Any]:
    from shared_model.encoders import tokenizer_path

    t0 = time.perf_counter()
    prep = src.prepared
    store = src.catalog_store if src.catalog_store is not None else prep.store
    head = src.head.eval()
    text = (src.text_encoder if src.text_encoder is not None else _default_text_encoder()).eval()
    files: dict[str, dict[str, Any]] = {}
    components: dict[str, dict[str, Any]] = {}
    tok_file = staging / TOKENIZER
    shutil.copyfile(tokenizer_path(), tok_file)
    tokenizer = load_tokenizer(tok_file)
    rng = np.random.default_rng(opts.seed)

    # text encoder ---------------------------------------------------------------------------------------------
    tspec = text_spec(opts.max_length)
    texts = probe_texts(prep, store, rng)
    query_text: torch.nn.Module = text  # what encodes queries on the device (the held-out reference uses it)
    if opts.query_encoder == "static":
        query_text = _export_static_encoder(src, text, tokenizer, texts, opts, staging, files, components)
    else:
        tprobes = text_probes(tspec, tokenizer, texts, torch_reference(text, tspec))
        components["text_encoder"] = _export_component(
            tspec, text, text_feeds(tokenizer, texts, 0), tprobes, _precisions(opts.quantize, fallback=False),
            opts, staging, work, files)
        components["text_encoder"].update(dim=tspec.output.shape[1], version=_version(text, opts.max_length),
                                          **tspec.notes)
    log.info("text encoder exported (%.1f s)", time.perf_counter() - t0)

    # image encoder --------------------------------------------------------------------------------------------
    if opts.image_encoder:
        image = (src.image_encoder if src.image_encoder is not None else _default_image_encoder()).eval()
        ispec = image_spec()
        pix, calib = probe_images(prep, store)
        iref = torch_reference(image, ispec)
        iprobes = [Probe(dict(s), {"pixels": pix[i : i + s["batch"]]}, iref({"pixels": pix[i : i + s["batch"]]}))
                   for i, s in enumerate([*ispec.checks, *[ispec.signatures[0]] * 4])]
        components["image_encoder"] = _export_component(
            ispec, image, {"pixels": pix[:2]}, iprobes, _precisions(opts.quantize, fallback=True), opts,
            staging, work, files, calibration=[{"pixels": calib[i : i + 1]} for i in range(len(calib))])
        components["image_encoder"].update(dim=ispec.output.shape[1], version=_version(image), **ispec.notes)
        log.info("image encoder exported (%.1f s)", time.perf_counter() - t0)

    # head -----------------------------------------------------------------------------------------------------
    hspec = head_spec(int(head.cfg.dense_dim), tuple(opts.head_slates))
    hfeeds = head_probe_feeds(prep, hspec)
    href = torch_reference(head, hspec)
    sizes = [*hspec.checks, *[s for s in hspec.signatures for _ in range(3)]]
    hprobes = [Probe(dict(s), f, href(f)) for s, f in ((s, hfeeds(dict(s), 100 + i)) for i, s in enumerate(sizes))]
    components["head"] = _export_component(
        hspec, head, random_head_inputs(hspec, hspec.trace, opts.seed), hprobes,
        _precisions(opts.quantize, fallback=False), opts, staging, work, files)
    components["head"].update(model_config=head.cfg.to_dict(), dense_layout=_dense_layout(store))
    log.info("head exported (%.1f s)", time.perf_counter() - t0)

    # tokenizer, catalog, manifest -----------------------------------------------------------------------------
    files[TOKENIZER] = {"component": "tokenizer", "bytes": tok_file.stat().st_size, "sha256": sha256_file(tok_file)}
    item_catalog = src.catalog if src.catalog is not None else prep.catalog
    requests_from = None  # without a shipped catalog, the pipeline is checked through server-style requests
    if opts.ship_catalog:
        files[CATALOG] = pack_catalog(store, item_catalog, staging / CATALOG)
    else:
        requests_from = packed_catalog(store, item_catalog)
    photo, probes = (_photo_search(store, item_catalog, opts, staging, files) if opts.image_encoder
                     else (None, None))
    manifest = _manifest(src, opts, files, components, store, tspec)
    if photo is not None:
        manifest["photo_search"] = photo
    _write_manifest(staging, manifest)
    if photo is not None and probes is not None:  # the shipped projection, through the runtime, against its fp32 torch reference
        photo["fidelity"] = photo_search_fidelity(staging, opts.targets[0], probes, requests_from)
        manifest["bars"]["photo_search"] = {"kendall_tau_mean_min": PHOTO_SEARCH_TAU_BAR,
                                            "abs_ndcg@10_delta_max": PHOTO_SEARCH_NDCG_BAR}
        log.info("photo search: kendall tau %.4f vs torch fp32 over %d catalog photos",
                 photo["fidelity"]["kendall_tau_mean"], photo["fidelity"]["queries"])

    # whole pipeline through the on-device runtime -------------------------------------------------------------
    held = held_out(prep, store, query_text, head, tokenizer, opts.max_slates, opts.max_length, opts.seed)
    manifest["pipeline_fidelity"] = {}
    for backend in opts.targets:
        res = pipeline_fidelity(staging, backend, held, requests_from)
        manifest["pipeline_fidelity"][backend] = {**res, "via": "catalog" if opts.ship_catalog else "requests"}
        log.info("pipeline[%s]: ndcg@10 delta %+.5f, kendall tau %.4f over %d held-out slates", backend,
                 res["ndcg@10_delta"], res["kendall_tau_mean"], res["slates"])
    manifest["bars"]["pipeline"] = {"abs_ndcg@10_delta_max": PIPELINE_NDCG_BAR, "kendall_tau_mean_min": PIPELINE_TAU_BAR}
    if opts.query_encoder == "static":  # what the static encoder costs against the full one, same slates
        full = held_out(prep, store, text, head, tokenizer, opts.max_slates, opts.max_length, opts.seed)
        manifest["query_encoder_cost"] = _query_encoder_cost(held, full, manifest["pipeline_fidelity"], opts)
    manifest["export_seconds"] = round(time.perf_counter() - t0, 1)
    _write_manifest(staging, manifest)
    return manifest


def _export_static_encoder(src: Sources, text: torch.nn.Module, tokenizer: Any, texts: list[str],
                           opts: ExportOptions, staging: Path, files: dict[str, dict[str, Any]],
                           components: dict[str, dict[str, Any]]) -> torch.nn.Module:
    """Distil, write and validate the static query encoder; returns its fp32 module (the held-out reference)."""
    from export.static_encoder import distill_static, encode_texts, export_static, fit_texts

    rng = np.random.default_rng(opts.seed + 1)
    catalog = src.catalog if src.catalog is not None else src.prepared.catalog
    tables = distill_static(text, tokenizer, fit_texts(src.prepared, catalog, rng), opts.static_dim,
                            opts.max_length, opts.seed)
    tokenizer.enable_truncation(max_length=opts.max_length)
    name, rec = export_static(tables, staging, tokenizer, texts, opts.max_length, TEXT_COSINE_BAR,
                              reference=encode_texts(text, tokenizer, texts))
    files[name] = rec
    components["text_encoder"] = {
        "files": {backend: name for backend in opts.targets}, "kind": STATIC_KIND,
        "dim": int(tables.projection.shape[1]), "table_dim": tables.dim,
        "version": f"static|{_version(text, opts.max_length)}|dim={tables.dim}|v1",
        "distilled_from": _version(text, opts.max_length), "distillation": tables.info,
        "pooling": "mean of the table rows of the token ids not in skip_ids (zeros if none), then projection + "
                   "bias, then L2 normalisation", "max_length": opts.max_length,
    }
    return tables.module()


def _photo_search(store: Any, catalog: Any, opts: ExportOptions, staging: Path, files: dict[str, dict[str, Any]]
                  ) -> tuple[dict[str, Any], PhotoProbes | None]:
    """Fit and write the learnt search-by-photo projection (see the module docstring); returns the manifest's
    ``photo_search`` entry and the parity probes (``None`` when the bundle keeps the heuristic)."""
    if opts.photo_search == "heuristic":
        return {"mode": "heuristic", "reason": "turned off (--photo-search heuristic)"}, None
    cfg = opts.photo_search_config or PhotoSearchConfig(seed=opts.seed)
    rows, labels = photo_labels(store.item_ids, store.mask[:, 1], catalog)
    try:
        proj = fit_from_catalog(store.item_ids, store.image, store.mask[:, 1], catalog, cfg)
        learnt, raw = proj.info["held_out_map_learnt"], proj.info["held_out_map_raw_cosine"]
        if not learnt > raw:
            raise PhotoSearchError(f"the learnt projection did not beat the raw cosine on its held-out photos "
                                   f"(mean average precision {learnt:.4f} vs {raw:.4f})")
    except PhotoSearchError as e:
        if opts.photo_search == "learnt":
            raise ExportError(f"--photo-search learnt: {e}") from e
        log.warning("search by photo keeps the heuristic (raw cosine): %s", e)
        return {"mode": "heuristic", "reason": str(e)}, None
    path = staging / PHOTO_SEARCH
    path.write_bytes(proj.to_bytes())
    files[PHOTO_SEARCH] = {"component": "photo_search", "precision": "fp16", "bytes": path.stat().st_size,
                           "sha256": sha256_file(path),
                           "arrays": {"mean": [proj.input_dim], "inv_std": [proj.input_dim],
                                      "weight": [proj.input_dim, proj.dim], "raw_weight": []}}
    entry = {"mode": "learnt", "file": PHOTO_SEARCH, "dim": proj.dim, "input_dim": proj.input_dim,
             "visual": "cos(l2norm((x_photo - mean) * inv_std @ weight), l2norm((x_item - mean) * inv_std @ "
                       "weight)) + raw_weight * cos(x_photo, x_item)", "training": proj.info}
    probes = photo_probes(store, rows, labels, proj, PHOTO_SEARCH_PROBES, PHOTO_SEARCH_SLATE, opts.seed)
    return entry, probes


def _query_encoder_cost(held: HeldOut, full: HeldOut, pipeline: dict[str, Any], opts: ExportOptions
                        ) -> dict[str, Any]:
    """NDCG@10 of the static query encoder's pipeline against the full text encoder's, on the same held-out
    slates (torch fp32 both; and each backend's exported pipeline). Raises when the loss exceeds the bar."""
    from shared_model.metrics import ndcg_at_k

    def ndcg(scores: np.ndarray, h: HeldOut) -> float:
        return float(np.nanmean(ndcg_at_k(np.where(h.mask, scores, -1e9), h.grades, h.mask)))

    if not (np.array_equal(held.mask, full.mask) and held.candidates == full.candidates):
        raise ExportError("internal: the static and full held-out slates differ")  # same selection by design
    base, mine = ndcg(full.reference, full), ndcg(held.reference, held)
    out: dict[str, Any] = {"slates": len(held.queries), "ndcg@10_text_encoder_torch": base,
                           "ndcg@10_static_torch": mine, "ndcg@10_delta_torch": mine - base,
                           "ndcg@10_delta_exported": {b: r["ndcg@10_exported"] - base for b, r in pipeline.items()},
                           "bar_abs_loss_max": opts.static_ndcg_cost_bar}
    log.info("static query encoder: ndcg@10 %.4f vs %.4f with the full text encoder (delta %+.4f)", mine, base,
             mine - base)
    if opts.static_ndcg_cost_bar is not None and not base - mine <= opts.static_ndcg_cost_bar:
        raise ExportValidationError("text_encoder.static.npz", "ndcg@10 loss vs the full text encoder (torch)",
                                    base - mine, opts.static_ndcg_cost_bar)
    return out


def _export_component(spec: ExportSpec, module: torch.nn.Module, trace_sample: dict[str, np.ndarray],
                      probes: list[Probe], precisions: list[str], opts: ExportOptions, staging: Path, work: Path,
                      files: dict[str, dict[str, Any]],
                      calibration: Sequence[dict[str, np.ndarray]] | None = None) -> dict[str, Any]:
    """Export one component for every target; returns its ``components`` manifest entry (files per backend)."""
    entry: dict[str, Any] = {"files": {}}
    onnx_probes = [p for p in probes if p.sizes in [dict(c) for c in spec.checks]]
    tfl_probes = [p for p in probes if p.sizes in [dict(s) for s in spec.signatures]]
    if "onnx" in opts.targets:
        fp32 = work / f"{spec.component}.fp32.onnx"
        with _quiet_root():
            export_onnx(module, spec, trace_sample, fp32)
        share_weights(fp32)

        def onnx_candidate(prec: str) -> tuple[Path, str, dict[str, Any]]:
            onnx_prec = "int8-static" if (prec == "int8" and spec.component == "image_encoder") else prec
            dst = work / f"{spec.component}.{prec}.candidate.onnx"  # not the fp32 export itself (quantize none)
            with _quiet_root():
                desc = quantize_onnx(fp32, dst, onnx_prec, calibration, spec.onnx_weight_only,
                                     spec.onnx_block_size, spec.onnx_accuracy_level, spec.onnx_float_scopes)
            return dst, desc, validate_onnx(dst, spec, onnx_probes, quantized=prec != "fp32")

        name, rec = _choose(spec, "onnx", precisions, onnx_candidate, staging)
        rec.update(inputs=[t.to_json() for t in spec.inputs], outputs=[spec.output.to_json()])
        files[name] = rec
        entry["files"]["onnx"] = name
    if "tflite" in opts.targets:
        samples = [sample_at(spec, trace_sample, probes, dict(s)) for s in spec.signatures]
        with _quiet_root():  # litert-torch logs every lowering on the root logger
            base = convert_tflite(module, spec, samples)

        def tflite_candidate(prec: str) -> tuple[Path, str, dict[str, Any]]:
            with _quiet_root():
                model, desc = quantize_tflite(base, prec)
            dst = work / f"{spec.component}.{prec}.tflite"
            dst.write_bytes(finalize_tflite(model, spec))
            return dst, desc, validate_tflite(dst, spec, tfl_probes, quantized=prec != "fp32")

        name, rec = _choose(spec, "tflite", precisions, tflite_candidate, staging)
        rec["signatures"] = [{"key": spec.signature_key(s), "sizes": dict(s),
                              "inputs": [t.to_json(s) for t in spec.inputs], "outputs": [spec.output.to_json(s)]}
                             for s in spec.signatures]
        files[name] = rec
        entry["files"]["tflite"] = name
    return entry


def _choose(spec: ExportSpec, backend: str, precisions: list[str],
            make: Callable[[str], tuple[Path, str, dict[str, Any]]], staging: Path) -> tuple[str, dict[str, Any]]:
    """Try ``precisions`` in order; keep the first that passes validation (only value misses fall through)."""
    tried: dict[str, Any] = {}
    for i, prec in enumerate(precisions):
        try:
            path, desc, fidelity = make(prec)
        except ExportValidationError as e:
            if i == len(precisions) - 1 or e.check.split("[")[0] not in VALUE_CHECKS:
                raise
            tried[prec] = {"passed": False, e.check: e.measured, "bar": e.bar}
            log.info("%s %s at %s: %s %.4f < %.4f; trying %s", spec.component, backend, prec, e.check,
                     float(e.measured), float(e.bar), precisions[i + 1])  # type: ignore[arg-type]
            continue
        tried[prec] = {"passed": True}
        name = f"{spec.component}.{prec}.{ 'onnx' if backend == 'onnx' else 'tflite'}"
        shutil.move(str(path), staging / name)
        rec = {"component": spec.component, "backend": backend, "precision": prec, "quantization": desc,
               "bytes": (staging / name).stat().st_size, "sha256": sha256_file(staging / name),
               "fidelity": {**fidelity, "metric": spec.metric, "bar": spec.bar, "reference": "torch fp32"}}
        if len(precisions) > 1:
            rec["precision_search"] = tried
        return name, rec
    raise ExportError(f"{spec.component}: no precision to try")  # unreachable: the last one raises


@contextlib.contextmanager
def _quiet_root() -> Iterator[None]:
    root = logging.getLogger()
    level = root.level
    root.setLevel(max(level, logging.ERROR))
    try:
        yield
    finally:
        root.setLevel(level)


def _precisions(quantize: str, fallback: bool) -> list[str]:
    order = {"int8": ["int8", "fp16", "fp32"], "fp16": ["fp16", "fp32"], "none": ["fp32"]}[quantize]
    return order if fallback else order[:1]


# ------------------------------------------------------------------------------------------------ probes

# ------------------------------------------------------------------------------------------------ manifest


def _manifest(src: Sources, opts: ExportOptions, files: dict[str, Any], components: dict[str, Any], store: Any,
              tspec: ExportSpec) -> dict[str, Any]:
    return {
        "format": BUNDLE_FORMAT,
        "format_version": BUNDLE_VERSION,
        "created": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
        "targets": list(opts.targets),
        "quantize": opts.quantize,
        "profile": opts.profile,
        "query_encoder": opts.query_encoder,
        "checkpoint": src.checkpoint_info,
        "dims": {"text": int(tspec.output.shape[1]), "image": IMAGE_DIM, "dense": int(src.head.cfg.dense_dim)},
        "tokenizer": {"file": TOKENIZER, "max_length": opts.max_length, "padding": "none (exact length) for ONNX; "
                      "zero-padded to the next signature for TFLite"},
        "components": components,
        **({"catalog": {"file": CATALOG, "num_items": len(store.item_ids), "item_ids": list(store.item_ids),
                        "dense_names": list(store.dense_names), "history_len": HISTORY_LEN,
                        "embeddings": "int8 per row with float32 scales: x = q * scale"}} if opts.ship_catalog else {}),
        "candidates": {"version": CANDIDATES_VERSION, "arrays": list(CANDIDATE_ARRAYS),
                       "optional": list(CANDIDATE_OPTIONAL), "dense_names": list(store.dense_names),
                       "history_len": HISTORY_LEN, "format": "client.runtime.Reranker.rerank_candidates"},
        "files": files,
        "bars": {"text_encoder_cosine_min": tspec.bar, "image_encoder_cosine_min": image_spec().bar,
                 "head_kendall_tau_mean_min": head_spec(DENSE_DIM).bar},
        "packages": _package_versions(),
    }


def _write_manifest(staging: Path, manifest: dict[str, Any]) -> None:
    """``manifest.json`` and the ``manifest.sha256`` that seals it (client/runtime_bundle.py: integrity)."""
    write_manifest(staging, json.dumps(manifest, indent=1, default=_json_default).encode("utf-8"))


def _json_default(x: Any) -> Any:
    if isinstance(x, np.generic):
        return x.item()
    if isinstance(x, np.ndarray):
        return x.tolist()
    raise TypeError(f"not JSON serialisable: {type(x).__name__}")


def _package_versions() -> dict[str, str]:
    out = {}
    for p in _PACKAGES:
        try:
            out[p] = importlib.metadata.version(p)
        except importlib.metadata.PackageNotFoundError:
            continue
    return out


def _dense_layout(store: Any) -> list[str]:
    return [*store.dense_names, *SLATE_DENSE_NAMES]


def _version(module: torch.nn.Module, *args: Any) -> str:
    """The encoder's cache/version tag (``TextEncoder.version(max_length)``), else its class name."""
    v = getattr(module, "version", None)
    if not callable(v):
        return type(module).__name__
    try:
        return str(v(*args))
    except TypeError:
        return str(v())


def _default_text_encoder() -> torch.nn.Module:
    from shared_model.encoders import TextEncoder

    return TextEncoder()


def _default_image_encoder() -> torch.nn.Module:
    from shared_model.encoders import ImageEncoder

    return ImageEncoder(channels_last=False)
