"""Validation of exported files, run right after each export and before anything reaches the bundle.

Per file (optimum-onnx's order): input and output **names**, then **shapes** (dynamic axes stay dynamic in
ONNX; every TFLite signature has its fixed sizes), then **values** against the torch fp32 module at sizes other
than the traced ones (ONNX: ``spec.checks``; TFLite: every signature, with inputs other than the trace's):

* encoders: cosine of each output row to torch's -- the bar is on the minimum over probe inputs;
* head: Kendall tau of each probe slate's scores to torch's -- the bar is on the mean over slates;
* unquantised (fp32) files must also match within ``spec.atol_fp32``.

For the whole pipeline (:func:`pipeline_fidelity`) the bundle is opened with the on-device runtime
(``client.runtime.Reranker``) and scores held-out slates from their query strings, candidate ids and the
shoppers' recent clicks, against torch fp32 (text encoder + head on the float feature store): NDCG@10 delta and
Kendall tau. A miss raises :class:`ExportValidationError` naming the file, the check, the value and the bar.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from export.errors import ExportValidationError
from export.spec import ExportSpec
from shared_model.head_features import weigh_image
from shared_model.metrics import kendall_tau, ndcg_at_k

Feeds = dict[str, np.ndarray]

PROBE_TEXTS = (
    "red dress",
    "usb c charger",
    "waterproof hiking boots for women size 38",
    "stainless steel insulated travel mug, 500 ml, keeps drinks hot for 12 hours",
    "gift",
    "noise cancelling wireless headphones with long battery life and a carrying case",
    "organic cotton t-shirt striped navy",
    "Original Bramble Scarlet Sneakers. Canvas sneakers by Bramble. Designed to last.",
    "cheap",
    "a considerably longer product description: hand-made ceramic coffee cup with a matte glaze, dishwasher "
    "safe, microwave safe, sold as a set of four in assorted earthy colours with a gift box",
)


@dataclass
class Probe:
    """One set of inputs at concrete sizes, and torch fp32's output for them."""

    sizes: dict[str, int]
    feeds: Feeds
    reference: np.ndarray


def torch_reference(module: torch.nn.Module, spec: ExportSpec) -> Callable[[Feeds], np.ndarray]:
    def run(feeds: Feeds) -> np.ndarray:
        module.eval()
        with torch.inference_mode():
            args = [torch.from_numpy(np.ascontiguousarray(feeds[n])) for n in spec.input_names]
            return module(*args).float().numpy()

    return run


def make_probes(spec: ExportSpec, sizes_list: Sequence[dict[str, int]] | Sequence[Any],
                feeds_for: Callable[[dict[str, int], int], Feeds], reference: Callable[[Feeds], np.ndarray]
                ) -> list[Probe]:
    out = []
    for i, sizes in enumerate(sizes_list):
        feeds = feeds_for(dict(sizes), 1000 + i)
        out.append(Probe(dict(sizes), feeds, reference(feeds)))
    return out


# --------------------------------------------------------------------------------------------- compare


def compare(spec: ExportSpec, got: np.ndarray, want: np.ndarray, feeds: Feeds) -> dict[str, float]:
    """Fidelity numbers of one output against torch's (``metric`` per spec + max abs diff)."""
    got = np.asarray(got, np.float64)
    want = np.asarray(want, np.float64)
    if spec.metric == "cosine":
        cos = (got * want).sum(-1) / (np.linalg.norm(got, axis=-1) * np.linalg.norm(want, axis=-1) + 1e-12)
        return {"cosine_min": float(cos.min()), "cosine_mean": float(cos.mean()),
                "max_abs_diff": float(np.abs(got - want).max())}
    valid = feeds["item_mask"][..., 0] > 0  # real candidates (text is always present; padding is all-zero)
    tau = kendall_tau(want, got, valid)
    return {"kendall_tau_mean": float(np.nanmean(tau)) if np.isfinite(tau).any() else 1.0,
            "kendall_tau_min": float(np.nanmin(tau)) if np.isfinite(tau).any() else 1.0,
            "max_abs_diff": float(np.abs(np.where(valid, got - want, 0.0)).max())}


def merge(stats: Sequence[dict[str, float]]) -> dict[str, float]:
    """Worst case over several probes (min of mins, mean of means, max of diffs)."""
    out: dict[str, float] = {}
    for k in stats[0]:
        vals = [s[k] for s in stats]
        out[k] = float(min(vals) if k.endswith("_min") else max(vals) if k.startswith("max") else np.mean(vals))
    return out


def check_values(file: str, spec: ExportSpec, stats: dict[str, float], quantized: bool) -> None:
    key = "cosine_min" if spec.metric == "cosine" else "kendall_tau_mean"
    if not stats[key] >= spec.bar:
        raise ExportValidationError(file, key, stats[key], spec.bar)
    if not quantized and not stats["max_abs_diff"] <= spec.atol_fp32:
        raise ExportValidationError(file, "max_abs_diff (fp32)", stats["max_abs_diff"], spec.atol_fp32)


# ------------------------------------------------------------------------------------------------ ONNX


def validate_onnx(path: Path, spec: ExportSpec, probes: Sequence[Probe], quantized: bool) -> dict[str, Any]:
    """Names, shapes (dynamic axes dynamic), values at each probe's sizes. Returns the fidelity record."""
    import onnxruntime as ort

    file = path.name
    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    so.log_severity_level = 3
    try:
        sess = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    except Exception as e:
        raise ExportValidationError(file, "loads in onnxruntime", f"{e.__class__.__name__}: {e}", "loads") from e
    ins, outs = sess.get_inputs(), sess.get_outputs()
    if [i.name for i in ins] != spec.input_names:
        raise ExportValidationError(file, "input names", [i.name for i in ins], spec.input_names)
    if [o.name for o in outs] != [spec.output.name]:
        raise ExportValidationError(file, "output names", [o.name for o in outs], [spec.output.name])
    for got_t, want_t in ((*zip(ins, spec.inputs, strict=True), (outs[0], spec.output))):
        if not _shape_matches(list(got_t.shape), want_t.shape):
            raise ExportValidationError(file, f"shape of {want_t.name}", list(got_t.shape), list(want_t.shape))
    stats = []
    for p in probes:
        out = sess.run(None, p.feeds)[0]
        want_shape = spec.output.concrete(p.sizes)
        if tuple(out.shape) != want_shape:
            raise ExportValidationError(file, f"output shape at {p.sizes}", tuple(out.shape), want_shape)
        stats.append(compare(spec, out, p.reference, p.feeds))
    merged = merge(stats)
    check_values(file, spec, merged, quantized)
    return {**merged, "checked_at": [p.sizes for p in probes]}


def _shape_matches(got: list[Any], want: tuple[int | str, ...]) -> bool:
    if len(got) != len(want):
        return False
    return all((isinstance(g, int) and g == w) if isinstance(w, int) else not isinstance(g, int)
               for g, w in zip(got, want, strict=True))


# ---------------------------------------------------------------------------------------------- TFLite


def validate_tflite(path: Path, spec: ExportSpec, probes: Sequence[Probe], quantized: bool) -> dict[str, Any]:
    """Each signature: input/output names, fixed shapes, values on probes at its sizes (one or more each)."""
    from client.runtime_models import load_interpreter_class

    file = path.name
    try:
        interp = load_interpreter_class()(model_path=str(path), num_threads=1)
        sigs = interp.get_signature_list()
    except Exception as e:
        raise ExportValidationError(file, "loads in LiteRT", f"{e.__class__.__name__}: {e}", "loads") from e
    want_keys = sorted(spec.signature_key(s) for s in spec.signatures)
    if sorted(sigs) != want_keys:
        raise ExportValidationError(file, "signatures", sorted(sigs), want_keys)
    stats = []
    for sizes in spec.signatures:
        key = spec.signature_key(sizes)
        runner = interp.get_signature_runner(key)
        in_det, out_det = runner.get_input_details(), runner.get_output_details()
        if sorted(in_det) != sorted(spec.input_names):
            raise ExportValidationError(file, f"input names [{key}]", sorted(in_det), sorted(spec.input_names))
        if list(out_det) != [spec.output.name]:
            raise ExportValidationError(file, f"output names [{key}]", list(out_det), [spec.output.name])
        for t in spec.inputs:
            got = tuple(int(d) for d in in_det[t.name]["shape"])
            if got != t.concrete(sizes):
                raise ExportValidationError(file, f"shape of {t.name} [{key}]", got, t.concrete(sizes))
        mine = [p for p in probes if p.sizes == dict(sizes)]
        if not mine:
            raise ExportValidationError(file, f"probes [{key}]", 0, ">= 1")
        for p in mine:
            feeds = {n: np.ascontiguousarray(v, dtype=in_det[n]["dtype"]) for n, v in p.feeds.items()}
            out = np.asarray(runner(**feeds)[spec.output.name])
            if tuple(out.shape) != spec.output.concrete(sizes):
                raise ExportValidationError(file, f"output shape [{key}]", tuple(out.shape),
                                            spec.output.concrete(sizes))
            stats.append(compare(spec, out, p.reference, p.feeds))
    merged = merge(stats)
    check_values(file, spec, merged, quantized)
    return {**merged, "checked_at": [dict(s) for s in spec.signatures]}


# ---------------------------------------------------------------------------------------------- pipeline


@dataclass
class HeldOut:
    """Held-out slates as the runtime sees them (ids and strings), plus torch fp32's scores for them."""

    queries: list[str]
    candidates: list[list[str]]
    recent: list[list[str]]
    retrieval: list[np.ndarray]
    ranks: list[np.ndarray]
    grades: np.ndarray  # [N, S] padded with 0
    mask: np.ndarray  # [N, S]
    reference: np.ndarray  # [N, S] torch fp32 pipeline scores (0 at padding)


def pipeline_fidelity(bundle_dir: Path, backend: str, held: HeldOut, requests_from: Any = None
                      ) -> dict[str, float]:
    """Score ``held`` through the runtime and compare with torch fp32 (raises on a miss of a bar).

    ``requests_from`` (a ``PackedCatalog``): score through server-style candidates requests built from it
    (``Reranker.score_candidates``, recent items as rows too) instead of the bundle's catalog -- for a bundle
    that ships none."""
    from client.runtime import Reranker
    from client.runtime_bundle import candidates_request
    from export.spec import PIPELINE_NDCG_BAR, PIPELINE_TAU_BAR

    rr = Reranker.load(bundle_dir, backend=backend, num_threads=1)
    q_cache: dict[str, np.ndarray] = {}
    got = np.zeros_like(held.reference)
    for i, q in enumerate(held.queries):
        if q not in q_cache:
            q_cache[q] = rr.encode_query(q)
        if requests_from is None:
            _, s = rr.score(q, held.candidates[i], held.recent[i], retrieval_scores=held.retrieval[i],
                            first_stage_ranks=held.ranks[i], query_emb=q_cache[q])
        else:
            req = candidates_request(requests_from, held.candidates[i], held.retrieval[i], held.ranks[i])
            recent = candidates_request(requests_from, held.recent[i]) if held.recent[i] else None
            _, s = rr.score_candidates(q, req, recent_items=recent, query_emb=q_cache[q])
        got[i, : len(s)] = s
    ref_ndcg = float(np.nanmean(ndcg_at_k(np.where(held.mask, held.reference, -1e9), held.grades, held.mask)))
    exp_ndcg = float(np.nanmean(ndcg_at_k(np.where(held.mask, got, -1e9), held.grades, held.mask)))
    tau = kendall_tau(held.reference, got, held.mask)
    res = {"slates": len(held.queries), "ndcg@10_torch": ref_ndcg, "ndcg@10_exported": exp_ndcg,
           "ndcg@10_delta": exp_ndcg - ref_ndcg, "kendall_tau_mean": float(np.nanmean(tau)),
           "kendall_tau_min": float(np.nanmin(tau)),
           "max_abs_diff": float(np.abs(np.where(held.mask, got - held.reference, 0)).max())}
    file = f"pipeline[{backend}]"
    if not abs(res["ndcg@10_delta"]) <= PIPELINE_NDCG_BAR:
        raise ExportValidationError(file, "|ndcg@10 delta| vs torch fp32", abs(res["ndcg@10_delta"]),
                                    PIPELINE_NDCG_BAR)
    if not res["kendall_tau_mean"] >= PIPELINE_TAU_BAR:
        raise ExportValidationError(file, "kendall tau vs torch fp32", res["kendall_tau_mean"], PIPELINE_TAU_BAR)
    return res


# ---------------------------------------------------------------------------------------------- search by photo


@dataclass
class PhotoProbes:
    """Catalog photos asked as search-by-photo queries, with the fp32 torch reference of the learnt ``visual``."""

    photos: np.ndarray  # [Q, Di] the query photos' embeddings (the float feature store's)
    candidates: list[list[str]]  # Q slates of catalog item ids (the query item itself left out)
    grades: np.ndarray  # [Q, S] 3 same (category, colour), 1 same category, 0 other; padded with 0
    mask: np.ndarray  # [Q, S]
    reference: np.ndarray  # [Q, S] torch fp32 projected cosines (0 at padding)


def photo_probes(store: Any, rows: np.ndarray, labels: Sequence[str], projection: Any, num: int, slate: int,
                 seed: int) -> PhotoProbes:
    """``num`` labelled catalog photos as queries (seeded), each against a slate of up to ``slate`` other items
    with a photo: up to a third of the query's (category, colour), the rest random. The reference is computed
    with torch in float32 from the fp32 projection on the float embeddings -- independently of the numpy scorer
    the runtime uses (``shared_model.photo_search.visual_scores``)."""
    rng = np.random.default_rng([seed, 11])
    lab = np.asarray(labels)
    cat = np.array([x.split("|", 1)[0] for x in labels])
    queries = rng.permutation(len(rows))[:num]
    w = torch.from_numpy(np.asarray(projection.weight, np.float32))
    mean, inv = (torch.from_numpy(np.asarray(a, np.float32)) for a in (projection.mean, projection.inv_std))

    def project(x: np.ndarray) -> torch.Tensor:
        return torch.nn.functional.normalize((torch.from_numpy(np.asarray(x, np.float32)) - mean) * inv @ w, dim=-1)

    photos, cands, grades, refs = [], [], [], []
    for q in queries:
        others = np.flatnonzero(np.arange(len(rows)) != q)
        same = others[lab[others] == lab[q]]
        pick = list(rng.permutation(same)[: slate // 3])
        rest = np.setdiff1d(others, pick)
        pick += list(rng.permutation(rest)[: slate - len(pick)])
        pick = list(rng.permutation(pick))
        x_q, x_c = store.image[rows[q]], store.image[rows[pick]]
        with torch.inference_mode():
            ref = (project(x_c) @ project(x_q[None])[0]).double().numpy()
            if projection.raw_weight:
                ref = ref + projection.raw_weight * torch.nn.functional.cosine_similarity(  # weighed as the runtime
                    torch.from_numpy(weigh_image(x_c)), torch.from_numpy(weigh_image(x_q))[None], dim=-1
                ).double().numpy()
        photos.append(x_q)
        cands.append([store.item_ids[rows[i]] for i in pick])
        grades.append([3.0 if lab[i] == lab[q] else 1.0 if cat[i] == cat[q] else 0.0 for i in pick])
        refs.append(ref)
    s = max((len(c) for c in cands), default=0)
    mask = np.array([[j < len(c) for j in range(s)] for c in cands], bool).reshape(len(cands), s)

    def pad(vs: Sequence[Any]) -> np.ndarray:  # [Q, s], zeros after each slate
        return np.array([list(v) + [0.0] * (s - len(v)) for v in vs], np.float64).reshape(len(vs), s)

    return PhotoProbes(np.asarray(photos, np.float32).reshape(len(photos), -1), cands, pad(grades), mask, pad(refs))


def photo_search_fidelity(bundle_dir: Path, backend: str, probes: PhotoProbes, requests_from: Any = None
                          ) -> dict[str, Any]:
    """The runtime's learnt ``visual`` (``Reranker.visual_similarity``, the projection read from the bundle, the
    candidates' int8 rows from its catalog -- or from ``requests_from`` for a bundle without one) against the fp32
    torch reference on ``probes``: Kendall tau and NDCG@10. Raises :class:`ExportValidationError` on a miss."""
    from client.runtime import Reranker
    from client.runtime_bundle import PHOTO_SEARCH, CandidateRows
    from export.spec import PHOTO_SEARCH_NDCG_BAR, PHOTO_SEARCH_TAU_BAR

    rr = Reranker.load(bundle_dir, backend=backend, num_threads=1)
    if rr.photo_search is None:
        raise ExportValidationError(PHOTO_SEARCH, "loaded by the runtime", "not loaded", "loaded")
    refs = rr.catalog if rr.has_catalog else requests_from
    got = np.zeros_like(probes.reference)
    for i, ids in enumerate(probes.candidates):
        cands = CandidateRows.from_catalog(refs, ids, np.array([refs.row(x) for x in ids], np.int64))
        got[i, : len(ids)] = rr.visual_similarity(probes.photos[i], cands)
    ref_ndcg = float(np.nanmean(ndcg_at_k(np.where(probes.mask, probes.reference, -1e9), probes.grades,
                                          probes.mask)))
    exp_ndcg = float(np.nanmean(ndcg_at_k(np.where(probes.mask, got, -1e9), probes.grades, probes.mask)))
    tau = kendall_tau(probes.reference, got, probes.mask)
    res: dict[str, Any] = {"queries": len(probes.candidates), "slate": int(probes.mask.shape[1]), "ndcg@10_reference": ref_ndcg,
           "ndcg@10_runtime": exp_ndcg, "ndcg@10_delta": exp_ndcg - ref_ndcg,
           "kendall_tau_mean": float(np.nanmean(tau)), "kendall_tau_min": float(np.nanmin(tau)),
           "max_abs_diff": float(np.abs(np.where(probes.mask, got - probes.reference, 0)).max()),
           "reference": "torch fp32 projection on the float feature store", "runtime": f"{backend}: the bundle's "
           "float16 projection on its int8 catalog rows"}
    if not res["kendall_tau_mean"] >= PHOTO_SEARCH_TAU_BAR:
        raise ExportValidationError(PHOTO_SEARCH, "kendall tau of visual scores vs torch fp32",
                                    res["kendall_tau_mean"], PHOTO_SEARCH_TAU_BAR)
    if not abs(res["ndcg@10_delta"]) <= PHOTO_SEARCH_NDCG_BAR:
        raise ExportValidationError(PHOTO_SEARCH, "|ndcg@10 delta| of visual scores vs torch fp32",
                                    abs(res["ndcg@10_delta"]), PHOTO_SEARCH_NDCG_BAR)
    return res
