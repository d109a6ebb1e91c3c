"""Search by photo, learnt: the projection's training, its numpy scorer, its bundle file and the runtime's use of it.

Synthetic embeddings only (no ../shared/data): a planted problem where the (category, colour) signal hides in a few
low-variance dimensions under large nuisance ones, so the raw cosine mostly sees the nuisance. One small bundle
(stand-in encoders, ONNX only) is exported with a labelled catalog for the round trip.
"""

from __future__ import annotations

import functools
import io
import json
import shutil
import tempfile
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from scipy.spatial.distance import cosine as scipy_cosine_distance
from test_export import TinyImage, TinyText

from client.runtime import Reranker
from client.runtime_bundle import (
    PHOTO_SEARCH,
    BundleError,
    CandidateRows,
    photo_projection_from_bytes,
    sha256_file,
    write_manifest,
)
from export.bundle import ExportOptions, Sources, _photo_search, export_bundle
from export.errors import ExportError
from shared_model.config import ModelConfig, TrainConfig
from shared_model.features import FeatureStore
from shared_model.head import build_head
from shared_model.photo_search import (
    PhotoProjection,
    PhotoSearchConfig,
    PhotoSearchError,
    fit_projection,
    mean_average_precision,
    photo_labels,
    visual_scores,
)
from shared_model.schema import IMAGE_DIM, Catalog
from shared_model.training import train_epochs
from tests.synthetic import synthetic_prepared

CATEGORIES = ("shoe", "shirt", "bag", "watch")
COLOURS = ("red", "blue", "black")
FAST = PhotoSearchConfig(dim=8, steps=60, eval_every=20, lr=1e-2, min_photos=20, min_groups=3)


def planted(n: int, dim: int = 64, seed: int = 0) -> tuple[np.ndarray, list[str]]:
    """``[n, dim]`` embeddings and labels ``cat|colour``: signal in 4 small dims, nuisance in the rest."""
    rng = np.random.default_rng(seed)
    labels = [f"{CATEGORIES[i % 4]}|{COLOURS[(i // 4) % 3]}" for i in rng.permutation(n)]
    centres = {lab: np.random.default_rng([99, k]).normal(size=4) for k, lab in enumerate(sorted(set(labels)))}
    x = rng.normal(size=(n, dim)) * 3.0 + 5.0  # nuisance, large
    x[:, :4] = np.stack([centres[lab] for lab in labels]) * 0.5 + 0.15 * rng.normal(size=(n, 4))
    return x.astype(np.float32), labels


# ------------------------------------------------------------------------------------------------ training


def test_fit_beats_raw_cosine_on_new_photos_of_a_planted_problem() -> None:
    # Prepare
    x, labels = planted(240, seed=0)
    x_new, labels_new = planted(120, seed=1)  # photos the fit never saw
    y_new = np.unique(labels_new, return_inverse=True)[1]
    # Execute
    proj = fit_projection(x, labels, FAST)
    # Assert
    anchors = np.arange(len(y_new))
    raw = mean_average_precision(x_new / np.linalg.norm(x_new, axis=1, keepdims=True), y_new, anchors)
    learnt = mean_average_precision(proj.project(x_new), y_new, anchors)
    assert learnt > raw + 0.3, (learnt, raw)
    assert proj.info["held_out_map_learnt"] > proj.info["held_out_map_raw_cosine"]
    assert proj.dim == 8 and proj.input_dim == 64 and proj.info["photos"] == 240


def test_fit_is_deterministic_by_seed() -> None:
    x, labels = planted(120, seed=2)
    a, b = fit_projection(x, labels, FAST), fit_projection(x, labels, FAST)
    c = fit_projection(x, labels, replace(FAST, seed=1))
    assert np.array_equal(a.weight, b.weight) and a.info["selected_steps"] == b.info["selected_steps"]
    assert not np.array_equal(a.weight, c.weight)


def test_too_few_labelled_photos_is_refused_with_the_counts() -> None:
    x, labels = planted(30, seed=3)
    with pytest.raises(PhotoSearchError, match=r"30 photos .* \(need 50\)"):
        fit_projection(x, labels, PhotoSearchConfig())
    with pytest.raises(PhotoSearchError, match="groups with two or more photos"):  # every label once
        fit_projection(x, [str(i) for i in range(30)], replace(FAST, min_photos=10))


def test_bad_training_input_is_named() -> None:
    x, labels = planted(60, seed=4)
    with pytest.raises(PhotoSearchError, match="expected \\[N, Di\\], N labels"):
        fit_projection(x, labels[:-1], FAST)
    x[3, 5] = np.nan
    with pytest.raises(PhotoSearchError, match="NaN"):
        fit_projection(x, labels, FAST)


def test_photo_labels_leave_out_items_without_image_category_or_colour() -> None:
    from shared_model.schema import CatalogItem

    items = [CatalogItem("a", "t", category="shoe", color="red"), CatalogItem("b", "t", category="shoe"),
             CatalogItem("c", "t", color="red"), CatalogItem("d", "t", category="bag", color="blue"),
             CatalogItem("e", "t", category="bag", color="blue")]
    rows, labels = photo_labels(["a", "b", "c", "d", "e", "zz"], np.array([1, 1, 1, 0, 1, 1], bool), Catalog(items))
    assert rows.tolist() == [0, 4] and labels == ["shoe|red", "bag|blue"]


# ------------------------------------------------------------------------------------------------ scoring


def _projection(dim: int = 16, k: int = 4, raw_weight: float = 0.0, seed: int = 0) -> PhotoProjection:
    rng = np.random.default_rng(seed)
    return PhotoProjection(rng.normal(size=dim), rng.uniform(0.5, 2, size=dim), rng.normal(size=(dim, k)),
                           raw_weight)


@pytest.mark.parametrize("raw_weight", [0.0, 0.5])
def test_visual_scores_match_an_independent_computation(raw_weight: float) -> None:
    # Prepare
    rng = np.random.default_rng(5)
    proj = _projection(raw_weight=raw_weight)
    photo, refs = rng.normal(size=16), rng.normal(size=(7, 16))
    present = np.array([1, 1, 0, 1, 1, 1, 0], bool)
    # Execute
    got = visual_scores(photo, refs, present, proj)
    raw = visual_scores(photo, refs, present, None)
    # Assert: scipy's cosine distance on the explicitly standardised and projected vectors
    hp = ((photo - proj.mean) * proj.inv_std) @ proj.weight
    want = []
    for r, ok in zip(refs, present, strict=True):
        hr = ((r - proj.mean) * proj.inv_std) @ proj.weight
        s = 1 - scipy_cosine_distance(hp, hr) + raw_weight * (1 - scipy_cosine_distance(photo, r))
        want.append(s if ok else -1.0)
    np.testing.assert_allclose(got, want, rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(raw, [1 - scipy_cosine_distance(photo, r) if ok else -1.0
                                     for r, ok in zip(refs, present, strict=True)], atol=1e-12)


def test_projection_file_round_trip_stores_float16_weights() -> None:
    proj = _projection(raw_weight=0.25)
    back = PhotoProjection.from_bytes(proj.to_bytes(), image_dim=16)
    np.testing.assert_array_equal(back.weight, proj.weight.astype(np.float16).astype(np.float32))
    np.testing.assert_array_equal(back.mean, proj.mean)
    np.testing.assert_array_equal(back.inv_std, proj.inv_std)
    assert back.raw_weight == 0.25


def _npz(**arrays: Any) -> bytes:
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    return buf.getvalue()


@pytest.mark.parametrize("data, problem", [
    (b"not a zip", "cannot read the projection"),
    (_npz(mean=np.zeros(16, np.float32)), "missing arrays"),
    (_npz(mean=np.zeros(16), inv_std=np.ones(16), weight=np.zeros((15, 4), np.float16), raw_weight=np.float32(0),
          version=np.int64(1)), "shapes do not fit"),
    (_npz(mean=np.full(16, np.nan), inv_std=np.ones(16), weight=np.zeros((16, 4), np.float16),
          raw_weight=np.float32(0), version=np.int64(1)), "array mean holds NaN"),
    (_npz(mean=np.zeros(16), inv_std=np.ones(16), weight=np.zeros((16, 4), np.float16), raw_weight=np.float32(0),
          version=np.int64(7)), "file version 7"),
    (_projection().to_bytes(), "the bundle's image embeddings have 1280"),
])
def test_bad_projection_file_is_a_bundle_error_naming_the_file(data: bytes, problem: str) -> None:
    with pytest.raises(BundleError, match=problem) as e:
        photo_projection_from_bytes(data, PHOTO_SEARCH, 1280)
    assert e.value.file == PHOTO_SEARCH


# ------------------------------------------------------------------------------------------------ export


def _labelled(prep: Any) -> tuple[FeatureStore, Catalog]:
    """The synthetic prepared data's store with planted photo embeddings, and its catalog with (category, colour)."""
    store = prep.store
    x, labels = planted(len(store.item_ids), dim=IMAGE_DIM, seed=6)
    image = store.image.copy()
    image[:, :4] = x[:, :4]  # the head was trained on these embeddings: only 4 of IMAGE_DIM dims change
    items = [replace(it, category=lab.split("|")[0], color=lab.split("|")[1])
             for it, lab in zip(prep.catalog.items, labels, strict=True)]
    return (FeatureStore(store.item_ids, store.text, image, store.video, store.mask, store.dense,
                         store.dense_names, store.meta), Catalog(items, "labelled synthetic"))


@functools.cache
def labelled_bundle() -> tuple[Any, Path]:
    """(synthetic Prepared, a folder holding ``b``: an ONNX bundle exported with a labelled catalog), built once."""
    root = Path(tempfile.mkdtemp(prefix="fedrank-test-photo-"))
    prep = synthetic_prepared(root / "data", num_items=150, num_users=40, sessions_per_user=10, slate=20)
    head = build_head(ModelConfig(), seed=0)
    train_epochs(head, prep.slates("train"), prep.table(), TrainConfig(ips=False, lr=1e-2), None, epochs=3, seed=0)
    store, catalog = _labelled(prep)
    opts = ExportOptions(targets=("onnx",), max_slates=500, photo_search="learnt",
                         photo_search_config=replace(FAST, dim=16))
    export_bundle(Sources(head.eval(), prep, TinyText(), TinyImage(), checkpoint_info={"path": "synthetic"},
                          catalog_store=store, catalog=catalog), root / "b", opts)
    return prep, root


@pytest.fixture(scope="module")
def bundle() -> Path:
    return labelled_bundle()[1] / "b"


def test_bundle_ships_the_projection_listed_with_its_sha256(bundle: Path) -> None:
    man = json.loads((bundle / "manifest.json").read_text())
    photo = man["photo_search"]
    assert photo["mode"] == "learnt" and photo["file"] == PHOTO_SEARCH and photo["dim"] == 16
    assert man["files"][PHOTO_SEARCH]["sha256"] == sha256_file(bundle / PHOTO_SEARCH)
    assert man["files"][PHOTO_SEARCH]["bytes"] < IMAGE_DIM * 16 * 2 + 16_000  # float16 weights
    assert photo["training"]["labels"] == ["category", "color"] and photo["training"]["photos"] > 50
    fid = photo["fidelity"]
    assert fid["queries"] > 0 and fid["kendall_tau_mean"] >= 0.95 and abs(fid["ndcg@10_delta"]) <= 0.01


def test_runtime_scores_photos_with_the_shipped_projection(bundle: Path) -> None:
    # Prepare
    rr = Reranker.load(bundle)
    with np.load(bundle / PHOTO_SEARCH) as z:  # the file read independently of the runtime
        weight, mean, inv_std = z["weight"].astype(np.float64), z["mean"], z["inv_std"]
    ids = rr.catalog.item_ids[:25]
    cands = CandidateRows.from_catalog(rr.catalog, ids, np.arange(25))
    photo = np.random.default_rng(7).normal(size=IMAGE_DIM).astype(np.float32)
    # Execute
    got = rr.visual_similarity(photo, cands)
    ranked = rr.rerank(query_image=np.random.default_rng(8).integers(0, 255, (64, 64, 3), np.uint8),
                       candidate_ids=ids)
    # Assert
    assert rr.photo_search is not None
    ref = np.where(cands.mask[:, 1:2], cands.image, cands.video)
    h = ((ref - mean) * inv_std) @ weight
    hp = ((photo - mean) * inv_std) @ weight
    want = h @ hp / (np.linalg.norm(h, axis=1) * np.linalg.norm(hp))
    present = cands.mask[:, 1] | cands.mask[:, 2]
    np.testing.assert_allclose(got, np.where(present, want, -1.0), atol=1e-6)  # float32 inputs
    assert sorted(i for i, _ in ranked) == sorted(ids)


def _copy(bundle: Path, tmp_path: Path) -> Path:
    b = tmp_path / "b"
    shutil.copytree(bundle, b)
    return b


def test_tampered_projection_is_refused(bundle: Path, tmp_path: Path) -> None:
    b = _copy(bundle, tmp_path)
    data = bytearray((b / PHOTO_SEARCH).read_bytes())
    data[-40] ^= 0xFF
    (b / PHOTO_SEARCH).write_bytes(bytes(data))
    with pytest.raises(BundleError, match="sha256 mismatch") as e:
        Reranker.load(b)
    assert e.value.file == PHOTO_SEARCH


def test_bundle_without_the_projection_falls_back_to_the_raw_cosine(bundle: Path, tmp_path: Path) -> None:
    # Prepare: a bundle as exported before the projection existed (no file, no manifest key)
    b = _copy(bundle, tmp_path)
    man = json.loads((b / "manifest.json").read_text())
    del man["photo_search"], man["files"][PHOTO_SEARCH]
    (b / PHOTO_SEARCH).unlink()
    write_manifest(b, json.dumps(man).encode())
    # Execute
    rr = Reranker.load(b)
    ids = rr.catalog.item_ids[:10]
    cands = CandidateRows.from_catalog(rr.catalog, ids, np.arange(10))
    photo = np.random.default_rng(9).normal(size=IMAGE_DIM).astype(np.float32)
    # Assert
    assert rr.photo_search is None
    np.testing.assert_allclose(rr.visual_similarity(photo, cands),
                               visual_scores(photo, np.where(cands.mask[:, 1:2], cands.image, cands.video),
                                             cands.mask[:, 1] | cands.mask[:, 2]))
    assert len(rr.rerank(query_image=np.zeros((32, 32, 3), np.uint8), candidate_ids=ids)) == 10


def test_manifest_naming_a_missing_projection_is_a_bundle_error(bundle: Path, tmp_path: Path) -> None:
    b = _copy(bundle, tmp_path)
    man = json.loads((b / "manifest.json").read_text())
    man["photo_search"]["file"] = "elsewhere.npz"
    write_manifest(b, json.dumps(man).encode())
    with pytest.raises(BundleError, match="photo_search.file"):
        Reranker.load(b)


def test_export_keeps_the_heuristic_when_the_catalog_has_no_labels(tmp_path: Path) -> None:
    # Prepare: the synthetic catalog has no category or colour
    prep, _ = labelled_bundle()
    staging = tmp_path / "staging"
    staging.mkdir()
    files: dict[str, Any] = {}
    # Execute
    entry, probes = _photo_search(prep.store, prep.catalog, ExportOptions(photo_search_config=FAST), staging, files)
    # Assert
    assert entry["mode"] == "heuristic" and "too few labelled photos" in entry["reason"]
    assert probes is None and not files and not any(staging.iterdir())
    with pytest.raises(ExportError, match="--photo-search learnt: too few labelled photos"):
        _photo_search(prep.store, prep.catalog, ExportOptions(photo_search="learnt"), staging, files)
    off, _ = _photo_search(prep.store, prep.catalog, ExportOptions(photo_search="heuristic"), staging, files)
    assert off == {"mode": "heuristic", "reason": "turned off (--photo-search heuristic)"}


def test_learnt_photo_search_needs_the_image_encoder() -> None:
    with pytest.raises(ExportError, match="needs the image encoder"):
        ExportOptions.for_profile("compact", photo_search="learnt")
    assert ExportOptions.for_profile("compact").photo_search == "auto"  # auto: nothing to fit, no error
    with pytest.raises(ExportError, match="photo_search 'clever'"):
        ExportOptions(photo_search="clever")


def test_cli_flag_reaches_the_options() -> None:
    import argparse

    from export.cli import add_commands, export_options

    p = argparse.ArgumentParser()
    add_commands(p.add_subparsers())
    args = p.parse_args(["export", "--checkpoint", "c.pt", "--out", "o", "--photo-search", "heuristic"])
    assert export_options(args).photo_search == "heuristic"
    assert export_options(p.parse_args(["export", "--checkpoint", "c.pt", "--out", "o"])).photo_search == "auto"


def test_parity_gate_through_server_rows_for_a_bundle_without_catalog(bundle: Path, tmp_path: Path) -> None:
    # Prepare: the bundle without its catalog (--no-catalog); candidates' rows come from the packed catalog
    from client.runtime_bundle import CATALOG, PackedCatalog
    from export.validate import photo_probes, photo_search_fidelity

    prep, _ = labelled_bundle()
    store, catalog = _labelled(prep)
    b = _copy(bundle, tmp_path)
    man = json.loads((b / "manifest.json").read_text())
    packed = PackedCatalog.load(b / CATALOG, man["catalog"]["item_ids"], man["dims"])
    del man["catalog"], man["files"][CATALOG]
    (b / CATALOG).unlink()
    write_manifest(b, json.dumps(man).encode())
    proj = PhotoProjection.from_bytes((b / PHOTO_SEARCH).read_bytes())
    rows, labels = photo_labels(store.item_ids, store.mask[:, 1], catalog)
    probes = photo_probes(store, rows, labels, proj, 5, 30, seed=0)
    # Execute
    res = photo_search_fidelity(b, "onnx", probes, requests_from=packed)
    # Assert
    assert res["queries"] == 5 and res["kendall_tau_mean"] >= 0.95
    assert set(probes.grades[probes.mask].tolist()) <= {0.0, 1.0, 3.0} and (probes.grades == 3).any()
