"""On-device runtime: reranking, padding/chunking, user context, search by photo, bad input, torch-free import.

Uses the stand-in-encoder bundle built once per session by ``tests/test_export.py`` (``tiny_setup``).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from test_export import tiny_setup  # the module pytest collected: its cached bundle is shared

from client.runtime import Reranker
from client.runtime_bundle import (
    BundleError,
    PackedCatalog,
    RerankInputError,
    pack_rows,
    unpack_rows,
    write_manifest,
)
from shared_model.head_features import HISTORY_LEN, IMAGE_DIM
from shared_model.metrics import kendall_tau

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def built() -> tuple[Any, torch.nn.Module, Path]:
    return tiny_setup()


@pytest.fixture(scope="module")
def bundle(built: tuple[Any, torch.nn.Module, Path]) -> Path:
    return built[2] / "b"


@pytest.fixture(scope="module")
def rr_onnx(bundle: Path) -> Reranker:
    return Reranker.load(bundle, backend="onnx")


@pytest.fixture(scope="module")
def rr_tflite(bundle: Path) -> Reranker:
    return Reranker.load(bundle, backend="tflite")


def _ids(built: tuple[Any, torch.nn.Module, Path], n: int, seed: int = 0) -> list[str]:
    ids = built[0].store.item_ids
    return [ids[i] for i in np.random.default_rng(seed).choice(len(ids), size=n, replace=n > len(ids))]


# --------------------------------------------------------------------------------------------- rerank


@pytest.mark.parametrize("backend", ["onnx", "tflite"])
def test_rerank_returns_every_candidate_best_first(built: Any, bundle: Path, backend: str) -> None:
    rr = Reranker.load(bundle, backend=backend)
    cands = _ids(built, 15)
    out = rr.rerank("red canvas sneakers", cands, recent_item_ids=_ids(built, 4, seed=1))
    assert sorted(i for i, _ in out) == sorted(cands)
    scores = [s for _, s in out]
    assert scores == sorted(scores, reverse=True) and all(np.isfinite(scores))


def test_backends_agree_with_each_other_and_with_torch(built: Any, rr_onnx: Reranker, rr_tflite: Reranker) -> None:
    """Same request through ONNX, TFLite and the torch head on the runtime's own inputs: same ranking."""
    head = built[1]
    cands = _ids(built, 40, seed=3)
    recent = _ids(built, 6, seed=4)
    q = rr_onnx.encode_query("waterproof hiking boots")
    _, rows, _ = rr_onnx.candidate_rows(cands)
    x = rr_onnx.head_inputs(q, rows, rr_onnx.user_context(recent))
    with torch.no_grad():
        want = head(**{k: torch.from_numpy(v) for k, v in x.items()}).numpy()[0]
    got_onnx = rr_onnx.head_scores(x)
    got_tfl = rr_tflite.head_scores(x)
    for got in (got_onnx, got_tfl):
        assert np.abs(got - want).max() < 0.2
        assert kendall_tau(want[None], got[None])[0] >= 0.9


@pytest.mark.parametrize("s", [1, 7, 20, 21, 100, 130])
def test_tflite_padding_and_chunking_match_onnx(built: Any, rr_onnx: Reranker, rr_tflite: Reranker, s: int) -> None:
    """A slate shorter than a signature is padded, a longer one scored in chunks: scores track ONNX's dynamic S."""
    cands = _ids(built, s, seed=s)
    _, rows, _ = rr_onnx.candidate_rows(cands)
    x = rr_onnx.head_inputs(rr_onnx.encode_query("gift"), rows, rr_onnx.user_context(None))
    a, b = rr_onnx.head_scores(x), rr_tflite.head_scores(x)
    assert a.shape == b.shape == (s,)
    assert np.abs(a - b).max() < 0.2
    if s >= 20:
        assert kendall_tau(a[None], b[None])[0] >= 0.85


def test_text_signature_choice_matches_onnx(rr_onnx: Reranker, rr_tflite: Reranker) -> None:
    for q in ("x", "striped cotton shirt " * 3, "long " * 40):  # 3, ~14, and > 64 tokens (truncated)
        a, b = rr_onnx.encode_query(q), rr_tflite.encode_query(q)
        assert a.shape == b.shape == (384,)
        assert float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b))) >= 0.99


def test_explicit_first_stage_features(built: Any, rr_onnx: Reranker) -> None:
    cands = _ids(built, 10, seed=5)
    base = dict(rr_onnx.rerank("q", cands))
    moved = dict(rr_onnx.rerank("q", cands, retrieval_scores=np.linspace(3, -3, 10)))
    assert base.keys() == moved.keys() and base != moved  # the slate features reach the head
    same = dict(rr_onnx.rerank("q", cands, first_stage_ranks=list(range(10))))
    assert same == base


# ------------------------------------------------------------------------------------ user context


def test_user_context_matches_training_definition(built: Any, rr_onnx: Reranker) -> None:
    store = built[0].store
    recent = _ids(built, 14, seed=6)
    ctx = rr_onnx.user_context(recent)
    rows = store.rows(recent[-HISTORY_LEN:])  # the last HISTORY_LEN, most recent last
    want_text = store.text[rows].mean(0)
    want_image = (store.image[rows] * store.mask[rows, 1:2]).sum(0) / len(rows)
    assert ctx.mask == 1.0 and ctx.num_items == HISTORY_LEN
    np.testing.assert_allclose(ctx.text, want_text, atol=2e-2)
    np.testing.assert_allclose(ctx.image, want_image, atol=5e-2)


def test_unknown_recent_items_are_skipped_and_no_history_means_no_user(built: Any, rr_onnx: Reranker) -> None:
    known = _ids(built, 3, seed=7)
    assert rr_onnx.user_context(["nope", *known, "gone"]).num_items == 3
    empty = rr_onnx.user_context(["nope"])
    assert empty.mask == 0.0 and not empty.text.any()
    cands = _ids(built, 12, seed=8)
    assert rr_onnx.rerank("tea", cands, recent_item_ids=[]) == rr_onnx.rerank("tea", cands)


# ------------------------------------------------------------------------------------ search by photo


def test_search_by_photo(built: Any, rr_onnx: Reranker, rr_tflite: Reranker, tmp_path: Path) -> None:
    from PIL import Image

    img = Image.fromarray(np.random.default_rng(0).integers(0, 255, (300, 200, 3), dtype=np.uint8))
    path = tmp_path / "photo.png"
    img.save(path)
    cands = _ids(built, 25, seed=9)
    for rr in (rr_onnx, rr_tflite):
        by_path = rr.rerank(query_image=str(path), candidate_ids=cands)
        by_pil = rr.rerank(query_image=img, candidate_ids=cands)
        assert [i for i, _ in by_path] == [i for i, _ in by_pil] and len(by_path) == 25
        with_text = rr.rerank("red", cands, query_image=path)
        assert sorted(i for i, _ in with_text) == sorted(cands)
    assert rr_onnx.embed_image(np.asarray(img.resize((224, 224)))).shape == (IMAGE_DIM,)


def test_unreadable_photo_is_a_typed_error(built: Any, rr_onnx: Reranker, tmp_path: Path) -> None:
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    for photo in (bad, tmp_path / "missing.jpg", b"garbage", np.zeros((5, 5), np.uint8)):
        with pytest.raises(RerankInputError) as e:
            rr_onnx.rerank(query_image=photo, candidate_ids=_ids(built, 3))
        assert e.value.field == "query_image"


# ------------------------------------------------------------------------------------ bad requests


@pytest.mark.parametrize("query,field", [("", "query"), ("   ", "query"), ("x" * 1001, "query"), (42, "query"),
                                         (None, "query")])
def test_bad_queries(built: Any, rr_onnx: Reranker, query: Any, field: str) -> None:
    with pytest.raises(RerankInputError) as e:
        rr_onnx.rerank(query, _ids(built, 3))
    assert e.value.field == field


def test_bad_candidates(built: Any, rr_onnx: Reranker) -> None:
    good = _ids(built, 4)
    for cands in ([], "i1", [*good, "nope"], ["x"] * 2001):
        with pytest.raises(RerankInputError) as e:
            rr_onnx.rerank("q", cands)
        assert e.value.field == "candidate_ids"
    assert "nope" in str(_raises(lambda: rr_onnx.rerank("q", [*good, "nope"])))
    kept = rr_onnx.rerank("q", [good[0], "nope", *good[1:]], skip_unknown=True,
                          retrieval_scores=[1, 2, 3, 4, 5])
    assert sorted(i for i, _ in kept) == sorted(good)
    with pytest.raises(RerankInputError, match="retrieval_scores"):
        rr_onnx.rerank("q", good, retrieval_scores=[1.0, 2.0])
    with pytest.raises(RerankInputError, match="retrieval_scores"):
        rr_onnx.rerank("q", good, retrieval_scores=[1.0, float("nan"), 0.0, 0.0])


def _raises(fn: Any) -> Exception:
    try:
        fn()
    except Exception as e:  # noqa: BLE001
        return e
    raise AssertionError("no exception")


# ------------------------------------------------------------------------------------ bad bundles


def _copy(bundle: Path, tmp_path: Path) -> Path:
    dst = tmp_path / "copy"
    shutil.copytree(bundle, dst)
    return dst


def test_missing_bundle_and_manifest(tmp_path: Path) -> None:
    with pytest.raises(BundleError, match="no such bundle"):
        Reranker.load(tmp_path / "nothing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(BundleError) as e:
        Reranker.load(tmp_path / "empty")
    assert e.value.file == "manifest.json"


def test_corrupt_manifest_and_incompatible_version(bundle: Path, tmp_path: Path) -> None:
    b = _copy(bundle, tmp_path)
    man = json.loads((b / "manifest.json").read_text())
    (b / "manifest.json").write_text("{not json")
    with pytest.raises(BundleError, match="not valid JSON"):
        Reranker.load(b)
    (b / "manifest.json").write_text(json.dumps({**man, "format_version": 99}))
    with pytest.raises(BundleError, match="version 99"):
        Reranker.load(b)
    (b / "manifest.json").write_text(json.dumps({**man, "format": "something-else"}))
    with pytest.raises(BundleError, match="not a fedrank-bundle"):
        Reranker.load(b)


@pytest.mark.parametrize("component", ["head", "text_encoder", "image_encoder"])
@pytest.mark.parametrize("backend", ["onnx", "tflite"])
def test_tampered_or_missing_file(bundle: Path, tmp_path: Path, component: str, backend: str) -> None:
    b = _copy(bundle, tmp_path)
    name = json.loads((b / "manifest.json").read_text())["components"][component]["files"][backend]
    data = bytearray((b / name).read_bytes())
    data[len(data) // 2] ^= 0xFF
    (b / name).write_bytes(bytes(data))
    with pytest.raises(BundleError, match="sha256 mismatch") as e:
        Reranker.load(b, backend=backend)
    assert e.value.file == name
    (b / name).unlink()
    with pytest.raises(BundleError, match="missing") as e:
        Reranker.load(b, backend=backend)
    assert e.value.file == name


def test_corrupt_files_without_verification_are_still_typed(bundle: Path, tmp_path: Path) -> None:
    man = json.loads((bundle / "manifest.json").read_text())
    for name in (man["components"]["head"]["files"]["onnx"], man["components"]["text_encoder"]["files"]["onnx"],
                 "catalog.npz", "tokenizer.json"):
        b = tmp_path / name.replace(".", "_")
        shutil.copytree(bundle, b)
        (b / name).write_bytes(b"\x00garbage" * 10)
        with pytest.raises(BundleError) as e:
            Reranker.load(b, backend="onnx", verify=False)
        assert e.value.file == name
    b = tmp_path / "tfl"
    shutil.copytree(bundle, b)
    (b / man["components"]["head"]["files"]["tflite"]).write_bytes(b"\x00garbage" * 10)
    with pytest.raises(BundleError):
        Reranker.load(b, backend="tflite", verify=False)


def test_backend_not_in_bundle(bundle: Path, tmp_path: Path) -> None:
    b = _copy(bundle, tmp_path)
    man = json.loads((b / "manifest.json").read_text())
    del man["components"]["head"]["files"]["tflite"]
    write_manifest(b, json.dumps(man).encode())  # a bundle exported for ONNX only
    with pytest.raises(BundleError, match="no tflite file for the head"):
        Reranker.load(b, backend="tflite")
    with pytest.raises(ValueError):
        Reranker.load(b, backend="coreml")


def test_catalog_packing_round_trip() -> None:
    x = np.random.default_rng(0).normal(size=(50, 16)).astype(np.float32)
    x[3] = 0.0
    q, s = pack_rows(x)
    assert q.dtype == np.int8 and s.shape == (50,) and s[3] == 0
    y = unpack_rows(q, s)
    assert np.abs(y - x).max() <= s.max() / 2 + 1e-6 and not y[3].any()
    cat = PackedCatalog.from_float([f"i{k}" for k in range(50)], x[:, :1].repeat(384, 1), np.zeros((50, IMAGE_DIM)),
                                   np.zeros((50, IMAGE_DIM)), np.ones((50, 3), bool), np.zeros((50, 4)), np.ones(50))
    assert "i7" in cat and cat.row("zz") is None


# ------------------------------------------------------------------------------------ torch-free


def test_runtime_runs_where_torch_cannot_be_imported(bundle: Path, tmp_path: Path) -> None:
    """The runtime, in a fresh process whose ``import torch`` raises: loads both backends and reranks. Of fedrank's
    other areas it may import only the torch-free feature definitions it shares with training (and the numpy
    scorer of search by photo, ``shared_model.photo_search``, which imports torch only to fit)."""
    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(textwrap.dedent("""
        import sys

        class _NoTorch:
            def find_spec(self, name, path=None, target=None):
                if name == "torch" or name.startswith("torch."):
                    raise ImportError("torch is blocked in this process")
                return None

        sys.meta_path.insert(0, _NoTorch())
    """))
    code = textwrap.dedent(f"""
        import json, sys
        try:
            import torch  # noqa: F401
            sys.exit("torch imported despite the block")
        except ImportError:
            pass
        from client.runtime import Reranker
        out = {{}}
        for backend in ("onnx", "tflite"):
            rr = Reranker.load({str(bundle)!r}, backend=backend)
            ids = rr.catalog.item_ids[:12]
            out[backend] = rr.rerank("red dress", ids, recent_item_ids=ids[:3])[:3]
        allowed = {{"shared_model", "shared_model.head_features", "shared_model.photo_search"}}
        mods = sorted(m for m in sys.modules if m not in allowed
                      and m.split(".")[0] in ("torch", "shared_model", "server", "export", "simulations"))
        print(json.dumps({{"top": out, "forbidden_modules": mods}}))
    """)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(site), str(REPO)])}
    proc = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    res = json.loads(proc.stdout.strip().splitlines()[-1])
    assert res["forbidden_modules"] == []
    assert len(res["top"]["onnx"]) == 3 and len(res["top"]["tflite"]) == 3


def test_bench_worker_reports_latency_and_memory_without_torch(bundle: Path, built: Any) -> None:
    spec = {"query": "blue jeans", "candidates": _ids(built, 30), "recent": _ids(built, 3, seed=2)}
    proc = subprocess.run(
        [sys.executable, "-m", "client.runtime_bench", "--bundle", str(bundle), "--backend", "tflite",
         "--spec", json.dumps(spec), "--iters", "3", "--warmup", "1", "--block-torch"],
        cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    res = json.loads(proc.stdout.strip().splitlines()[-1])
    assert len(res["e2e_ms"]) == 3 and res["peak_rss_mb"] > 0 and res["torch_imported"] is False


# ------------------------------------------------------------------------------------ CLI


def test_cli_rerank_prints_the_slate(built: Any, bundle: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
                                     ) -> None:
    import argparse

    from export.cli import add_commands

    cands = _ids(built, 6)
    (tmp_path / "c.txt").write_text("\n".join(cands) + "\n")
    (tmp_path / "r.txt").write_text("\n".join(_ids(built, 2, seed=3)))
    p = argparse.ArgumentParser()
    add_commands(p.add_subparsers(dest="command"))
    a = p.parse_args(["rerank", "--bundle", str(bundle), "--query", "linen shirt", "--candidates",
                      str(tmp_path / "c.txt"), "--recent", str(tmp_path / "r.txt"), "--json"])
    assert a.func(a) == 0
    out = json.loads(capsys.readouterr().out)
    assert sorted(r["item_id"] for r in out) == sorted(cands)
    a = p.parse_args(["rerank", "--bundle", str(bundle), "--query", "", "--candidates", str(tmp_path / "c.txt")])
    assert a.func(a) == 2
    assert "query: empty query" in capsys.readouterr().err
