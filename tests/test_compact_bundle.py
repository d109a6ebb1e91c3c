"""The compact bundle: a static query encoder distilled from the text encoder (``export/static_encoder.py``),
no image encoder, one numpy encoder file for both backends, and its parity gates.

Fast tests distil the stand-in text encoder of ``tests/test_export.py`` (same inputs and outputs as MiniLM, same
tokenizer.json) and export a compact bundle over the same synthetic data and head (``tiny_setup``). The head is
exported unquantised here: this file tests the static encoder and the compact layout, and ``test_export.py``
covers the head's int8 export.
"""

from __future__ import annotations

import functools
import json
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from test_export import TinyText, tiny_setup  # the module pytest collected: its cached bundle is shared

from client.runtime import Reranker
from client.runtime_bundle import (
    STATIC_ENCODER_ARRAYS,
    STATIC_ENCODER_FILE,
    BundleError,
    candidates_request,
    write_manifest,
)
from export.bundle import ExportOptions, Sources, _query_encoder_cost, export_bundle
from export.cli import export_options
from export.errors import ExportError, ExportValidationError
from export.probes import load_tokenizer
from export.static_encoder import (
    StaticTables,
    _pca,
    _ridge,
    _sif_weights,
    distill_static,
    special_ids,
    validate_static,
)
from export.validate import HeldOut
from shared_model.encoders import make_tokenizer, tokenizer_path

REPO = Path(__file__).resolve().parents[1]
TEXTS = ["red dress", "", "usb c charger", "Waterproof hiking boots for women, size 38 " * 8, "zzqx ##ing [UNK]",
         "organic cotton t-shirt striped navy"]


@functools.cache
def compact_setup() -> tuple[Any, Any, Path]:
    """(synthetic Prepared, head, the compact bundle) -- exported once, over tiny_setup's data and head."""
    prep, head, root = tiny_setup()
    out = root / "compact"
    export_bundle(Sources(head, prep, TinyText(), checkpoint_info={"path": "synthetic"}), out,
                  ExportOptions.for_profile("compact", quantize="none", static_dim=64))
    return prep, head, out


@pytest.fixture(scope="module")
def compact() -> Path:
    return compact_setup()[2]


@pytest.fixture(scope="module")
def manifest(compact: Path) -> dict[str, Any]:
    return json.loads((compact / "manifest.json").read_text())


def _numpy_encode(npz: Path, tokenizer: Any, text: str) -> np.ndarray:
    """The static encoder from its file with plain numpy (float64), independently of the runtime."""
    with np.load(npz) as z:
        q, scale, proj, bias, skip = (z[k] for k in STATIC_ENCODER_ARRAYS)
    ids = [t for t in tokenizer.encode(text).ids if t not in set(skip.tolist())]
    v = (q[ids].astype(np.float64) * scale[ids, None]).mean(0) if ids else np.zeros(q.shape[1])
    e = v @ proj.astype(np.float64) + bias
    return e / np.linalg.norm(e)


# ------------------------------------------------------------------------------------------------ the bundle


def test_compact_manifest_and_layout(compact: Path, manifest: dict[str, Any]) -> None:
    files = manifest["files"]
    assert manifest["profile"] == "compact" and manifest["query_encoder"] == "static"
    assert "image_encoder" not in manifest["components"]
    assert not [n for n in files if n.startswith("image_encoder") or n.startswith("text_encoder.int8")]
    te = manifest["components"]["text_encoder"]
    assert te["kind"] == "static" and te["files"] == {"onnx": STATIC_ENCODER_FILE, "tflite": STATIC_ENCODER_FILE}
    rec = files[STATIC_ENCODER_FILE]
    assert rec["kind"] == "static" and rec["fidelity"]["cosine_min"] >= rec["fidelity"]["bar"] == 0.99
    assert rec["arrays"]["table_q"] == {"dtype": "int8", "shape": [30522, 64]}
    assert rec["arrays"]["projection"] == {"dtype": "float32", "shape": [64, 384]}
    assert te["distillation"]["vocabulary"] == 30522 and te["distillation"]["fit_texts"] > 0
    cost = manifest["query_encoder_cost"]
    assert cost["slates"] == manifest["pipeline_fidelity"]["onnx"]["slates"]
    assert cost["ndcg@10_delta_torch"] == pytest.approx(cost["ndcg@10_static_torch"]
                                                        - cost["ndcg@10_text_encoder_torch"])
    for backend in ("onnx", "tflite"):
        assert abs(manifest["pipeline_fidelity"][backend]["ndcg@10_delta"]) <= 0.002


def test_runtime_static_encoder_equals_numpy_reference(compact: Path) -> None:
    # Prepare
    tok = load_tokenizer(compact / "tokenizer.json")
    tok.enable_truncation(max_length=64)
    rr = {b: Reranker.load(compact, backend=b) for b in ("onnx", "tflite")}
    for text in TEXTS:
        want = _numpy_encode(compact / STATIC_ENCODER_FILE, tok, text)
        for r in rr.values():
            # Execute
            got = r.encode_query(text) if text else r._generic_query()
            # Assert
            np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
            assert abs(float(np.linalg.norm(got)) - 1.0) < 1e-5


def test_truncation_at_max_length_like_the_text_encoder(compact: Path) -> None:
    rr = Reranker.load(compact)
    long = "red " * 200
    assert len(rr.tokenize(long)) == 64
    np.testing.assert_array_equal(rr.encode_query(long), rr.encode_query("red " * 62))  # 62 words + CLS/SEP


def test_compact_bundle_reranks_on_both_backends(compact: Path) -> None:
    prep = compact_setup()[0]
    ids = prep.store.item_ids
    cands, recent = list(ids[:40]), list(ids[50:55])
    onnx, tfl = (Reranker.load(compact, backend=b) for b in ("onnx", "tflite"))
    a = onnx.rerank("query 3", cands, recent)
    b = tfl.rerank("query 3", cands, recent)
    assert sorted(i for i, _ in a) == sorted(cands)
    np.testing.assert_allclose([s for _, s in a], [dict(b)[i] for i, _ in a], atol=1e-4)
    assert onnx.rerank_candidates("query 3", candidates_request(onnx.catalog, cands), recent) == a
    with pytest.raises(BundleError) as e:  # no image encoder: no search by photo
        onnx.rerank(query_image=np.zeros((8, 8, 3), np.uint8), candidate_ids=cands)
    assert "image encoder" in str(e.value)


def test_compact_bundle_runs_where_torch_cannot_be_imported(compact: Path) -> None:
    code = textwrap.dedent(f"""
        import sys
        from client.runtime_bench import block_torch
        block_torch()
        from client.runtime import Reranker
        rr = Reranker.load({str(compact)!r}, backend="onnx")
        ids = list(rr.catalog.item_ids[:20])
        out = rr.rerank("red dress", ids)
        assert len(out) == 20 and "torch" not in sys.modules
        print("ok")
    """)
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip().endswith("ok")


# ------------------------------------------------------------------------------------------- bad files


def _reseal(bundle: Path, name: str) -> None:
    man = json.loads((bundle / "manifest.json").read_text())
    from client.runtime_bundle import sha256_file

    man["files"][name]["sha256"] = sha256_file(bundle / name)
    write_manifest(bundle, json.dumps(man, indent=1).encode())


@pytest.mark.parametrize(("edit", "words"), [
    (lambda a: a.pop("bias"), "missing arrays ['bias']"),
    (lambda a: a.update(table_q=a["table_q"][:1000], table_scale=a["table_scale"][:1000]), "tokenizer of 30522 tokens"),
    (lambda a: a.update(table_q=a["table_q"][:1000]), "array table_scale has shape (30522,), expected (1000,)"),
    (lambda a: a.update(table_q=a["table_q"].astype(np.int16)), "array table_q is int16"),
    (lambda a: a.update(projection=a["projection"][:, :10]), "array projection has shape"),
    (lambda a: a.update(skip_ids=np.array([10 ** 6])), "skip_ids holds ids outside"),
    (lambda a: a.update(bias=np.full_like(a["bias"], np.nan)), "NaN"),
])
def test_bad_static_encoder_files_are_bundle_errors(compact: Path, tmp_path: Path, edit: Any, words: str) -> None:
    dst = tmp_path / "b"
    shutil.copytree(compact, dst)
    with np.load(dst / STATIC_ENCODER_FILE) as z:
        arrays = {k: z[k] for k in z.files}
    edit(arrays)
    np.savez(dst / STATIC_ENCODER_FILE, **arrays)
    _reseal(dst, STATIC_ENCODER_FILE)
    with pytest.raises(BundleError) as e:
        Reranker.load(dst)
    assert e.value.file == STATIC_ENCODER_FILE and words in str(e.value)


def test_parity_gate_catches_a_wrong_file(tmp_path: Path) -> None:
    # Prepare: a small table, and a file written from a different one
    tok = make_tokenizer(64)
    tables = _small_tables(tok)
    other = StaticTables(tables.table, -tables.projection, tables.bias, tables.skip_ids, {})
    path = tmp_path / STATIC_ENCODER_FILE
    np.savez(path, **other.packed())  # type: ignore[arg-type]
    # Execute / Assert
    with pytest.raises(ExportValidationError) as e:
        validate_static(path, tables, tok, TEXTS, 64, 0.99)
    assert e.value.file == STATIC_ENCODER_FILE and e.value.check == "cosine_min"
    np.savez(path, **tables.packed())  # type: ignore[arg-type]
    assert validate_static(path, tables, tok, TEXTS, 64, 0.99)["cosine_min"] > 0.999


def _small_tables(tok: Any, dim: int = 16) -> StaticTables:
    rng = np.random.default_rng(0)
    v = tok.get_vocab_size()
    skip, _ = special_ids(tok)
    return StaticTables(rng.normal(size=(v, dim)).astype(np.float32), rng.normal(size=(dim, 384)).astype(np.float32),
                        rng.normal(size=384).astype(np.float32), np.asarray(skip, np.int64), {})


# ------------------------------------------------------------------------------------------- distillation


def test_sif_weights_follow_model2vec() -> None:
    w = _sif_weights(5, 1e-4)
    p = (1 / np.arange(2, 7)) / (1 / np.arange(2, 7)).sum()
    np.testing.assert_allclose(w, 1e-4 / (1e-4 + p), rtol=1e-6)
    assert np.all(np.diff(w) > 0)  # rarer (later) tokens weigh more


def test_pca_matches_numpy_svd() -> None:
    rng = np.random.default_rng(1)
    x = (rng.normal(size=(500, 12)) @ rng.normal(size=(12, 12))).astype(np.float32)
    comps, mean, explained = _pca(x, 4)
    _, s, vt = np.linalg.svd(x - x.mean(0), full_matrices=False)
    for k in range(4):  # the same directions (up to sign), by decreasing variance
        assert abs(float(comps[:, k] @ vt[k])) == pytest.approx(1.0, abs=1e-4)
    assert explained == pytest.approx(float((s[:4] ** 2).sum() / (s**2).sum()), rel=1e-5)
    np.testing.assert_allclose(mean, x.mean(0), rtol=1e-5, atol=1e-6)


def test_ridge_matches_sklearn() -> None:
    from sklearn.linear_model import Ridge

    rng = np.random.default_rng(2)
    x = rng.normal(size=(300, 8))
    y = x @ rng.normal(size=(8, 5)) + 0.3 + 0.05 * rng.normal(size=(300, 5))
    w, b = _ridge(x, y)
    xc = x - x.mean(0)
    lam = 1e-3 * float(np.trace(xc.T @ xc)) / 8
    ref = Ridge(alpha=lam, fit_intercept=True).fit(x, y)
    np.testing.assert_allclose(w, ref.coef_.T, rtol=1e-6, atol=1e-8)
    np.testing.assert_allclose(b, ref.intercept_, rtol=1e-6, atol=1e-8)


def test_distillation_aligns_with_the_encoder_it_distils() -> None:
    # Prepare: the stand-in encoder is a mean of token vectors ([CLS]/[SEP] included) through a linear map and an
    # L2 norm, so its distillation must come close to it on texts it never saw
    tok = make_tokenizer(64)
    text = TinyText()
    fit = [f"{c} {w} shirt {i}" for i, (c, w) in enumerate(zip(["red", "blue", "green", "black"] * 50,
                                                                ["cotton", "silk", "wool", "linen"] * 50, strict=True))]
    # Execute
    tables = distill_static(text, tok, fit, dim=128, max_length=64)
    # Assert
    unseen = ["yellow denim jacket", "leather boots", "a gift for my mother"]
    with torch.inference_mode():
        ref = [text(torch.tensor([tok.encode(t).ids]), torch.ones(1, len(tok.encode(t).ids), dtype=torch.long))[0]
               .numpy() for t in unseen]
    cos = [float(tables.encode_ids(tok.encode(t).ids) @ r) for t, r in zip(unseen, ref, strict=True)]
    assert float(np.mean(cos)) > 0.8 and min(cos) > 0.7, cos  # an unaligned table scores ~0 here
    skip, unused = special_ids(tok)
    assert np.abs(tables.table[unused]).max() == 0.0  # [PAD] and [unusedN] rows stay zero
    assert set(skip) == {tok.token_to_id(t) for t in ("[CLS]", "[SEP]", "[PAD]")}
    assert tables.info["fit_texts"] == len(set(fit)) and tables.info["vocabulary"] == tok.get_vocab_size()


def test_tokenizer_is_the_bundle_one(compact: Path) -> None:
    assert (compact / "tokenizer.json").read_bytes() == tokenizer_path().read_bytes()


# ------------------------------------------------------------------------------------------- options, gates


def test_profiles_and_options() -> None:
    full, compact = ExportOptions.for_profile("full"), ExportOptions.for_profile("compact")
    assert (full.query_encoder, full.image_encoder, full.profile) == ("minilm", True, "full")
    assert (compact.query_encoder, compact.image_encoder, compact.profile) == ("static", False, "compact")
    assert ExportOptions.for_profile("compact", image_encoder=True).profile == "custom"
    for bad in ({"query_encoder": "bert"}, {"static_dim": 0}, {"static_dim": 385}):
        with pytest.raises(ExportError):
            ExportOptions(**bad)
    with pytest.raises(ExportError):
        ExportOptions.for_profile("tiny")


def test_cli_flags_map_to_options() -> None:
    import argparse

    from export.cli import add_commands

    parser = argparse.ArgumentParser()
    add_commands(parser.add_subparsers())
    args = parser.parse_args(["export", "--checkpoint", "c.pt", "--out", "o", "--profile", "compact",
                              "--static-dim", "96", "--no-catalog"])
    opts = export_options(args)
    assert (opts.query_encoder, opts.image_encoder, opts.static_dim, opts.ship_catalog) == ("static", False, 96, False)
    args = parser.parse_args(["export", "--checkpoint", "c.pt", "--out", "o", "--query-encoder", "static"])
    opts = export_options(args)
    assert (opts.query_encoder, opts.image_encoder, opts.profile) == ("static", True, "custom")


def test_ndcg_cost_gate() -> None:
    # Prepare: two pipelines over the same 2 slates; the static one swaps the best item down in one slate
    grades = np.array([[3, 0, 0], [0, 2, 0]], np.float32)
    mask = np.ones((2, 3), bool)
    full_scores = np.array([[3, 2, 1], [1, 3, 2]], np.float32)
    static_scores = np.array([[1, 2, 3], [1, 3, 2]], np.float32)

    def held(ref: np.ndarray) -> HeldOut:
        return HeldOut(["a", "b"], [["1", "2", "3"], ["4", "5", "6"]], [[], []], [], [], grades, mask, ref)

    pipeline = {"onnx": {"ndcg@10_exported": 0.75}}
    # Execute
    loose = _query_encoder_cost(held(static_scores), held(full_scores), pipeline,
                                ExportOptions(query_encoder="static", static_ndcg_cost_bar=0.9))
    # Assert: NDCG@10 of slate 0 with the top item last = 3/log2(4) / (3/log2(2)) ... as sklearn defines it
    from sklearn.metrics import ndcg_score

    want = float(np.mean([ndcg_score(grades[i:i + 1], static_scores[i:i + 1], k=10) for i in range(2)]))
    assert loose["ndcg@10_static_torch"] == pytest.approx(want, abs=1e-6)
    assert loose["ndcg@10_text_encoder_torch"] == pytest.approx(1.0)
    assert loose["ndcg@10_delta_exported"]["onnx"] == pytest.approx(0.75 - 1.0)
    with pytest.raises(ExportValidationError) as e:
        _query_encoder_cost(held(static_scores), held(full_scores), pipeline,
                            ExportOptions(query_encoder="static", static_ndcg_cost_bar=0.01))
    assert e.value.file == STATIC_ENCODER_FILE and e.value.measured == pytest.approx(1.0 - want)
