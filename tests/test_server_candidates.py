"""Candidates from the server: ``Reranker.rerank_candidates`` takes each candidate's int8 rows in the request (the
format of ``catalog.npz``) instead of reading the bundle's catalog, and must give exactly what ``rerank`` gives
on the catalog for the same items -- whether the rows come from ``candidates_request``, from a server packing its
own float feature store, or through the JSON wire form. A bundle without a catalog reranks requests only.

Uses the stand-in-encoder bundle built once per session by ``tests/test_export.py`` (``tiny_setup``).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from test_export import TinyText, tiny_setup  # the module pytest collected: its cached bundle is shared

from client.runtime import Reranker
from client.runtime_bundle import (
    CANDIDATE_ARRAYS,
    BundleError,
    PackedCatalog,
    RerankInputError,
    candidates_request,
    pack_rows,
    request_to_json,
    write_manifest,
)
from export.catalog import packed_catalog
from export.probes import held_out, load_tokenizer
from export.validate import pipeline_fidelity

BACKENDS = ("onnx", "tflite")


@pytest.fixture(scope="module")
def built() -> Any:
    return tiny_setup()


@pytest.fixture(scope="module")
def bundle(built: Any) -> Path:
    return built[2] / "b"


@pytest.fixture(scope="module")
def rerankers(bundle: Path) -> dict[str, Reranker]:
    return {b: Reranker.load(bundle, backend=b) for b in BACKENDS}


def _slate(built: Any, n: int, seed: int) -> tuple[list[str], list[str], np.ndarray, np.ndarray]:
    """(candidate ids, recent ids, retrieval scores, first-stage ranks) of a random slate."""
    ids = built[0].store.item_ids
    rng = np.random.default_rng(seed)
    pick = rng.choice(len(ids), size=n + 5, replace=False)
    return ([ids[i] for i in pick[:n]], [ids[i] for i in pick[n:]], rng.normal(size=n).astype(np.float32),
            rng.permutation(n).astype(np.float32))


# ------------------------------------------------------------------------------------- equal to the catalog


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("n", [1, 7, 20, 64])
def test_request_path_equals_catalog_path(built: Any, rerankers: dict[str, Reranker], backend: str, n: int) -> None:
    # Prepare
    rr = rerankers[backend]
    cands, recent, scores, ranks = _slate(built, n, seed=n)
    assert rr.has_catalog
    # Execute
    want = rr.rerank("query 3", cands, recent, retrieval_scores=scores, first_stage_ranks=ranks)
    got = rr.rerank_candidates("query 3", candidates_request(rr.catalog, cands, scores, ranks), recent)
    plain_want = rr.rerank("query 1", cands)
    plain_got = rr.rerank_candidates("query 1", candidates_request(rr.catalog, cands))
    # Assert: same ids, same order, bit-identical scores
    assert got == want
    assert plain_got == plain_want


def test_request_arrays_are_the_catalog_rows(bundle: Path, rerankers: dict[str, Reranker], built: Any) -> None:
    # Prepare: the catalog read with plain numpy, independently of the runtime
    man = json.loads((bundle / "manifest.json").read_text())
    with np.load(bundle / "catalog.npz") as z:
        raw = {k: z[k] for k in z.files}
    cands, _, _, _ = _slate(built, 12, seed=5)
    rows = [man["catalog"]["item_ids"].index(i) for i in cands]
    # Execute
    req = candidates_request(rerankers["onnx"].catalog, cands)
    # Assert
    assert req["version"] == 1 and req["item_ids"] == cands
    for k in CANDIDATE_ARRAYS:
        np.testing.assert_array_equal(req[k], raw[k][rows])
    assert req["text_q"].dtype == np.int8 and req["text_scale"].dtype == np.float32
    assert req["mask"].dtype == bool and req["price"].dtype == np.float64
    want_text = req["text_q"].astype(np.float64) * req["text_scale"].astype(np.float64)[:, None]
    np.testing.assert_allclose(rerankers["onnx"].catalog.modality("text", np.asarray(rows)), want_text,
                               rtol=1e-6, atol=1e-7)


def test_server_packing_its_own_feature_store_gives_the_same_scores(built: Any, rerankers: dict[str, Reranker]
                                                                    ) -> None:
    # Prepare: a "search API" that quantizes its float feature store itself (pack_rows per row), no bundle catalog
    prep = built[0]
    store = prep.store
    cands, recent, scores, _ = _slate(built, 30, seed=11)
    rows = np.asarray([store.item_ids.index(i) for i in cands])
    prices = {it.item_id: it.price for it in prep.catalog}
    req: dict[str, Any] = {"version": 1, "item_ids": cands, "retrieval_scores": scores.tolist()}
    for name in ("text", "image", "video"):
        req[f"{name}_q"], req[f"{name}_scale"] = pack_rows(store.modality(name)[rows])
    req["mask"] = store.mask[rows].astype(int).tolist()  # 0/1 lists, as JSON would carry them
    req["dense"] = store.dense[rows]
    req["price"] = np.array([float(prices.get(i, np.nan)) for i in cands])
    rr = rerankers["onnx"]
    # Execute
    got = rr.rerank_candidates("query 2", req, recent)
    want = rr.rerank("query 2", cands, recent, retrieval_scores=scores)
    # Assert
    assert got == want


@pytest.mark.parametrize("form", ["json-base64", "nested-lists"])
def test_wire_forms_round_trip(built: Any, rerankers: dict[str, Reranker], form: str) -> None:
    # Prepare
    rr = rerankers["onnx"]
    cands, recent, scores, ranks = _slate(built, 25, seed=3)
    req = candidates_request(rr.catalog, cands, scores, ranks)
    if form == "json-base64":
        wire = json.loads(json.dumps(request_to_json(req)))
        assert wire["text_q"]["dtype"] == "int8" and wire["text_q"]["shape"] == [25, 384]
        assert wire["mask"]["dtype"] == "uint8"
    else:
        wire = {k: (v.tolist() if isinstance(v, np.ndarray) else v) for k, v in req.items()}
    # Execute
    got = rr.rerank_candidates("query 4", wire, recent)
    # Assert
    assert got == rr.rerank("query 4", cands, recent, retrieval_scores=scores, first_stage_ranks=ranks)


def test_recent_items_as_rows_equal_recent_ids(built: Any, rerankers: dict[str, Reranker]) -> None:
    # Prepare: more recent items than the history keeps, so the cut to the last ones is exercised too
    rr = rerankers["onnx"]
    ids = built[0].store.item_ids
    cands = list(ids[:15])
    recent = list(ids[20:20 + rr.history_len + 4])
    req = candidates_request(rr.catalog, cands)
    # Execute
    by_rows = rr.rerank_candidates("query 5", req, recent_items=candidates_request(rr.catalog, recent))
    no_history = rr.rerank_candidates("query 5", req, recent_items=candidates_request(rr.catalog, []))
    # Assert
    assert by_rows == rr.rerank("query 5", cands, recent)
    assert no_history == rr.rerank("query 5", cands)
    with pytest.raises(RerankInputError) as e:
        rr.rerank_candidates("query 5", req, recent, recent_items=candidates_request(rr.catalog, recent))
    assert e.value.field == "recent_items"


def test_search_by_photo_with_server_candidates(built: Any, rerankers: dict[str, Reranker]) -> None:
    rr = rerankers["onnx"]
    cands, _, _, _ = _slate(built, 20, seed=9)
    photo = np.full((224, 224, 3), 90, np.uint8)
    req = candidates_request(rr.catalog, cands)
    assert rr.rerank_candidates(query_image=photo, candidates=req) == rr.rerank(query_image=photo, candidate_ids=cands)


# ------------------------------------------------------------------------------------------------ bad requests


def _bad(rr: Reranker, req: dict[str, Any]) -> RerankInputError:
    with pytest.raises(RerankInputError) as e:
        rr.rerank_candidates("query 1", req)
    return e.value


@pytest.mark.parametrize(("change", "field", "words"), [
    (lambda r: r.pop("text_q"), "candidates.text_q", "missing"),
    (lambda r: r.update(text_q=r["text_q"][:, :100]), "candidates.text_q", "shape"),
    (lambda r: r.update(image_q=r["image_q"].astype(np.int32) * 300), "candidates.image_q", "int8"),
    (lambda r: r.update(video_q=r["video_q"] + 0.5), "candidates.video_q", "integers"),
    (lambda r: r.update(text_scale=np.full(len(r["item_ids"]), np.nan, np.float32)), "candidates.text_scale", "NaN"),
    (lambda r: r.update(image_scale=-r["image_scale"] - 1), "candidates.image_scale", "negative"),
    (lambda r: r.update(mask=np.full(r["mask"].shape, 2)), "candidates.mask", "0/1"),
    (lambda r: r.update(dense=r["dense"][:, :2]), "candidates.dense", "shape"),
    (lambda r: r.update(price=np.full(len(r["item_ids"]), np.inf)), "candidates.price", "infinite"),
    (lambda r: r.update(item_ids=[r["item_ids"][0]] * len(r["item_ids"])), "candidates.item_ids", "twice"),
    (lambda r: r.update(item_ids=[]), "candidates.item_ids", "no candidates"),
    (lambda r: r.update(version=2), "candidates.version", "version 1"),
    (lambda r: r.update(retrieval_scores=[1.0, 2.0]), "candidates.retrieval_scores", "shape"),
    (lambda r: r.update(text_q={"dtype": "int8", "shape": [3, 384], "data": "!!"}), "candidates.text_q", "base64"),
])
def test_bad_requests_name_the_field(built: Any, rerankers: dict[str, Reranker], change: Any, field: str,
                                     words: str) -> None:
    rr = rerankers["onnx"]
    req = candidates_request(rr.catalog, _slate(built, 6, seed=1)[0])
    change(req)
    err = _bad(rr, req)
    assert err.field == field and words in str(err)


def test_a_request_that_is_not_a_mapping(rerankers: dict[str, Reranker]) -> None:
    assert _bad(rerankers["onnx"], [1, 2, 3]).field == "candidates"  # type: ignore[arg-type]


# -------------------------------------------------------------------------------------- bundles without a catalog


def _without_catalog(bundle: Path, tmp_path: Path) -> Path:
    """The tiny bundle minus catalog.npz, its manifest re-sealed (what ``fedrank export --no-catalog`` writes)."""
    dst = tmp_path / "nocat"
    shutil.copytree(bundle, dst)
    man = json.loads((dst / "manifest.json").read_text())
    (dst / man["catalog"]["file"]).unlink()
    del man["files"][man["catalog"]["file"]]
    man.pop("catalog")
    write_manifest(dst, json.dumps(man, indent=1).encode())
    return dst


@pytest.mark.parametrize("backend", BACKENDS)
def test_bundle_without_catalog_reranks_requests(built: Any, bundle: Path, rerankers: dict[str, Reranker],
                                                 tmp_path: Path, backend: str) -> None:
    # Prepare
    rr = Reranker.load(_without_catalog(bundle, tmp_path), backend=backend)
    full = rerankers[backend]
    cands, recent, scores, ranks = _slate(built, 20, seed=21)
    req = candidates_request(full.catalog, cands, scores, ranks)
    rec = candidates_request(full.catalog, recent)
    # Execute / Assert
    assert not rr.has_catalog
    assert rr.rerank_candidates("query 7", req, recent_items=rec) == full.rerank("query 7", cands, recent, retrieval_scores=scores, first_stage_ranks=ranks)
    with pytest.raises(RerankInputError) as e:
        rr.rerank("query 7", cands)
    assert e.value.field == "candidate_ids" and "no catalog" in str(e.value)
    with pytest.raises(RerankInputError) as e:
        rr.rerank_candidates("query 7", req, recent)
    assert e.value.field == "recent_item_ids"


def test_pipeline_check_through_requests_equals_the_catalog_check(built: Any, bundle: Path) -> None:
    # Prepare: the export's pipeline check, once through the bundle catalog and once through requests built from
    # the feature store packed in memory (how an export with --no-catalog validates)
    prep, head, _ = built
    tok = load_tokenizer(bundle / "tokenizer.json")
    held = held_out(prep, prep.store, TinyText(), head, tok, 400, 64, 0)  # every held-out slate (160)
    # Execute
    via_catalog = pipeline_fidelity(bundle, "onnx", held)
    via_requests = pipeline_fidelity(bundle, "onnx", held, packed_catalog(prep.store, prep.catalog))
    # Assert
    assert via_requests == via_catalog


def test_packed_catalog_in_memory_equals_the_shipped_file(built: Any, bundle: Path) -> None:
    prep = built[0]
    man = json.loads((bundle / "manifest.json").read_text())
    shipped = PackedCatalog.from_bytes((bundle / "catalog.npz").read_bytes(), "catalog.npz",
                                       man["catalog"]["item_ids"], man["dims"])
    mem = packed_catalog(prep.store, prep.catalog)
    for k in CANDIDATE_ARRAYS:
        np.testing.assert_array_equal(mem.arrays[k], shipped.arrays[k])


def test_corrupt_catalog_is_still_a_bundle_error(bundle: Path, tmp_path: Path) -> None:
    dst = tmp_path / "c"
    shutil.copytree(bundle, dst)
    (dst / "catalog.npz").write_bytes(b"not a zip")
    with pytest.raises(BundleError) as e:
        Reranker.load(dst, verify=False)
    assert e.value.file == "catalog.npz"


def test_cli_rerank_with_a_json_request(built: Any, bundle: Path, rerankers: dict[str, Reranker], tmp_path: Path,
                                        capsys: pytest.CaptureFixture[str]) -> None:
    import argparse

    from export.cli import add_commands

    # Prepare
    rr = rerankers["onnx"]
    cands, recent, _, _ = _slate(built, 8, seed=4)
    (tmp_path / "req.json").write_text(json.dumps(request_to_json(candidates_request(rr.catalog, cands))))
    (tmp_path / "r.txt").write_text("\n".join(recent))
    (tmp_path / "bad.json").write_text("{not json")
    p = argparse.ArgumentParser()
    add_commands(p.add_subparsers(dest="command"))
    # Execute
    a = p.parse_args(["rerank", "--bundle", str(bundle), "--query", "query 6", "--request", str(tmp_path / "req.json"),
                      "--recent", str(tmp_path / "r.txt"), "--json"])
    assert a.func(a) == 0
    out = json.loads(capsys.readouterr().out)
    # Assert
    assert [(r["item_id"], r["score"]) for r in out] == rr.rerank("query 6", cands, recent)
    a = p.parse_args(["rerank", "--bundle", str(bundle), "--query", "q", "--request", str(tmp_path / "bad.json")])
    assert a.func(a) == 2 and "--request" in capsys.readouterr().err
    a = p.parse_args(["rerank", "--bundle", str(bundle), "--query", "q"])  # neither --candidates nor --request
    assert a.func(a) == 2 and "one of them" in capsys.readouterr().err
