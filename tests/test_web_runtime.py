"""The browser runtime (``web/src``) in real headless Chromium with onnxruntime-web, against the Python runtime.

The bundle is the stand-in-encoder bundle that ``tests/test_export.py`` builds once per session (``tiny_setup``);
the pages come from ``fedrank shop``'s server (``export/shop.py``). Chromium is Debian's (``/usr/bin/chromium``),
driven by Playwright's Python API without any browser download; ``make install`` installs both, and the browser
runtime's npm packages (``cd web && npm ci``). Where either is missing, the tests skip with the reason.

One kernel differs between the two runtimes, and the tests pin it down rather than hide it: the text encoder's
``MatMulNBits`` carries ``accuracy_level=4``, which native ONNX Runtime on this CPU computes with int8 activations,
while onnxruntime-web's wasm kernel computes in fp32 (as ``accuracy_level=0`` does natively). The browser's query
embedding is therefore checked against the same file run natively at ``accuracy_level=0`` (within 1e-5), and the
end-to-end scores against the Python runtime fed that embedding (within 1e-4, same order); against the Python
runtime as shipped (its own int8-activation embedding) the rankings are checked to agree closely.
"""

from __future__ import annotations

import functools
import json
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from client.runtime import Reranker
from export.shop import ORT_DIST, WEB_DIR, ShopServer
from shared_model.metrics import kendall_tau

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
# without the networking flags Chromium's own background connections are refused by this closed network
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]


def web_skip_reason() -> str | None:
    """Why the browser tests cannot run here (``None``: they can)."""
    if not Path(CHROMIUM).is_file():
        return f"{CHROMIUM} not found: `make install` installs Debian's chromium (apt-get install -y chromium)"
    if not (WEB_DIR / ORT_DIST / "ort.wasm.min.mjs").is_file():
        return f"{WEB_DIR / ORT_DIST} missing: `make install` runs `cd web && npm ci`"
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        return "playwright is not installed: `make install` installs the dev extras"
    return None


pytestmark = pytest.mark.skipif(web_skip_reason() is not None, reason=str(web_skip_reason()))


def launch_browser(playwright: Any) -> Any:
    return playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)


def open_harness(browser: Any, server: ShopServer) -> Any:
    """A page on the server's harness with ``window.rr`` = the bundle's Reranker, loaded and verified."""
    page = browser.new_page()
    page.goto(server.url + "harness.html")
    page.wait_for_function("window.fedrankReady === true")
    page.evaluate("async () => { const f = window.fedrank; "
                  "window.rr = await f.Reranker.load('/bundle/', {ort: f.ort, wasmPaths: f.wasmPaths}); }")
    return page


# --------------------------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def bundle() -> Path:
    from test_export import tiny_setup  # the module pytest collected: its cached bundle is shared

    return tiny_setup()[2] / "b"


@pytest.fixture(scope="module")
def rr(bundle: Path) -> Reranker:
    return Reranker.load(bundle, backend="onnx")


@pytest.fixture(scope="module")
def server(bundle: Path) -> Iterator[ShopServer]:
    with ShopServer(bundle, port=0) as srv:
        yield srv


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        b = launch_browser(p)
        yield b
        b.close()


@pytest.fixture(scope="module")
def page(browser: Any, server: ShopServer) -> Iterator[Any]:
    pg = open_harness(browser, server)
    yield pg
    pg.close()


# ----------------------------------------------------------------------------------------------- slates

WORDS = ["red", "Blue", "canvas", "sneakers", "leather", "boots", "waterproof", "hiking", "jacket", "cotton",
         "striped", "shirt", "gift", "for", "her", "Café", "naïve", "t-shirt", "size", "42", "XL", "kids'",
         "summer", "dress", "über", "cheap!", "bag,", "(new)", "denim", "jeans"]


def random_slates(item_ids: list[str], n: int = 100, seed: int = 0) -> list[dict[str, Any]]:
    """``n`` requests: a query, 1-100 candidates, a history of 0-14 items (some unknown), and first-stage scores
    or ranks on some."""
    rng = np.random.default_rng(seed)
    out = []
    for k in range(n):
        s = int(rng.choice([1, 2, 5, 20, 37, 50, 64, 100])) if k % 3 else int(rng.integers(1, 101))
        cands = [item_ids[i] for i in rng.choice(len(item_ids), size=min(s, len(item_ids)), replace=False)]
        recent = [item_ids[i] for i in rng.choice(len(item_ids), size=int(rng.integers(0, 15)))]
        if k % 7 == 3:
            recent.insert(int(rng.integers(0, len(recent) + 1)), "not-an-item")
        req: dict[str, Any] = {"query": " ".join(rng.choice(WORDS, size=int(rng.integers(1, 7)))),
                               "candidates": cands, "recent": recent, "scores": None, "ranks": None}
        if k % 4 == 1:
            req["scores"] = rng.normal(size=len(cands)).round(4).tolist()
        if k % 5 == 2:
            req["ranks"] = rng.permutation(len(cands)).tolist()
        out.append(req)
    return out


BROWSER_SCORE = """async (reqs) => {
  const out = [];
  for (const r of reqs) {
    const res = await window.rr.score(r.query, r.candidates, {recentItemIds: r.recent, retrievalScores: r.scores,
                                                              firstStageRanks: r.ranks});
    out.push({ids: res.ids, scores: Array.from(res.scores), tokens: window.rr.tokenize(r.query),
              emb: Array.from(await window.rr.encodeQuery(r.query))});
  }
  return out;
}"""


def fp32_compute_encoder(bundle: Path) -> Any:
    """The bundle's ONNX text encoder run natively with MatMulNBits' ``accuracy_level`` set to 0 (fp32 compute,
    what onnxruntime-web's wasm kernel does): ``ids -> [Dt]``."""
    import onnx
    import onnxruntime as ort

    man = json.loads((bundle / "manifest.json").read_text())
    model = onnx.load(str(bundle / man["components"]["text_encoder"]["files"]["onnx"]))
    for node in model.graph.node:
        for a in node.attribute:
            if node.op_type == "MatMulNBits" and a.name == "accuracy_level":
                a.i = 0
    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    sess = ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])

    def encode(ids: list[int]) -> np.ndarray:
        x = np.asarray([ids], np.int64)
        return np.asarray(sess.run(None, {"input_ids": x, "attention_mask": np.ones_like(x)})[0][0])

    return encode


# ------------------------------------------------------------------------------------------------ parity


@functools.cache
def fp16_bundle() -> Path:
    """The tiny setup's head and stand-in encoders exported once more, ONNX only, fp16 weights computed in fp32
    (``quantize="fp16"``): no int8 kernel whose rounding can differ between native x86 and wasm, so the browser must
    match the Python runtime as shipped. (``quantize="none"`` with an ONNX target fails in export/: it copies the
    fp32 file onto itself.)"""
    from test_export import TinyImage, TinyText, tiny_setup

    from export.bundle import ExportOptions, Sources, export_bundle

    prep, head, root = tiny_setup()
    out = root / "b-fp16-onnx"
    if not (out / "manifest.json").is_file():
        export_bundle(Sources(head, prep, TinyText(), TinyImage()), out,
                      ExportOptions(targets=("onnx",), quantize="fp16", image_encoder=False, max_slates=400))
    return out


@functools.cache
def compact_bundle() -> Path:
    """A compact bundle (static query encoder distilled from the stand-in text encoder) without a catalog: the
    device reranks server-sent candidates only. ONNX head with fp16 weights (about 5 s on top of tiny_setup)."""
    from test_export import TinyText, tiny_setup

    from export.bundle import ExportOptions, Sources, export_bundle

    prep, head, root = tiny_setup()
    out = root / "compact-no-catalog"
    if not (out / "manifest.json").is_file():
        export_bundle(Sources(head, prep, TinyText(), checkpoint_info={"path": "synthetic"}), out,
                      ExportOptions.for_profile("compact", targets=("onnx",), quantize="fp16", static_dim=64,
                                                ship_catalog=False))
    return out


def _parity(browser: Any, bundle: Path, reference_encoder: Any | None) -> dict[str, Any]:
    """Score the 100 slates in the browser and with the Python runtime (fed ``reference_encoder``'s query
    embedding when given, else its own); per-slate results for the asserts."""
    rr = Reranker.load(bundle, backend="onnx")
    assert rr.catalog is not None
    reqs = random_slates(rr.catalog.item_ids)
    with ShopServer(bundle, port=0) as srv:
        pg = open_harness(browser, srv)
        got = pg.evaluate(BROWSER_SCORE, reqs)
        pg.close()
    out: dict[str, Any] = {"diffs": [], "same_order": [], "taus": [], "emb": [], "n": 0}
    for req, g in zip(reqs, got, strict=True):
        assert g["tokens"] == rr.tokenize(req["query"]), req["query"]
        q = None if reference_encoder is None else reference_encoder(g["tokens"])
        ids, want = rr.score(req["query"], req["candidates"], req["recent"], retrieval_scores=req["scores"],
                             first_stage_ranks=req["ranks"], query_emb=q)
        assert g["ids"] == ids
        scores = np.asarray(g["scores"])
        out["emb"].append(float(np.abs(np.asarray(g["emb"]) - (rr.encode_query(req["query"]) if q is None else q)).max()))
        out["diffs"].append(np.abs(scores - want))
        out["same_order"].append(bool((np.argsort(-scores, kind="stable") == np.argsort(-want, kind="stable")).all()))
        if len(ids) >= 5:
            out["taus"].append(float(kendall_tau(want[None], scores[None])[0]))
        out["n"] += len(ids)
    return out


def test_parity_fp16_weights_bundle_on_100_slates(browser: Any) -> None:
    """fp16-weight bundle (fp32 compute): the same tokens, scores within 1e-4 of the Python runtime's and the same order on every one
    of 100 slates (1-100 candidates, histories with unknown ids, first-stage scores and ranks)."""
    res = _parity(browser, fp16_bundle(), None)
    assert max(res["emb"]) < 1e-5
    worst = max(float(d.max()) for d in res["diffs"])
    assert worst < 1e-4, f"max |browser - python| {worst:.2e}"
    assert all(res["same_order"])


def test_parity_int8_bundle_on_100_slates(browser: Any, bundle: Path) -> None:
    """The default int8 bundle. The wasm MatMulNBits computes in fp32 where native ORT uses int8 activations
    (``accuracy_level=4``): the browser's query embedding equals the native fp32-compute kernel's (1e-5), and fed
    that embedding the Python runtime agrees within 1e-4 on all but a few scores, where the head's dynamic int8
    activation quantisation rounds a value to the neighbouring step (measured: 2-3 of 3,108, up to 4e-3)."""
    res = _parity(browser, bundle, fp32_compute_encoder(bundle))
    assert max(res["emb"]) < 1e-5
    diffs = np.concatenate(res["diffs"])
    assert (diffs > 1e-4).mean() <= 0.005, f"{int((diffs > 1e-4).sum())} of {diffs.size} scores off by > 1e-4"
    assert diffs.max() < 2e-2
    assert np.mean(res["same_order"]) >= 0.95 and min(res["taus"]) >= 0.9


def test_rerank_sorts_best_first_with_stable_ties(page: Any, rr: Reranker) -> None:
    assert rr.catalog is not None
    cands = rr.catalog.item_ids[:30]
    got = page.evaluate("async (c) => await window.rr.rerank('red leather boots', c)", cands)
    scores = [r["score"] for r in got]
    assert sorted(r["id"] for r in got) == sorted(cands)
    assert scores == sorted(scores, reverse=True)


TRICKY = ["Hello, World!", "  spaces\tand\nnewlines  ", "CAFÉ crème brûlée", "naïve façade", "東京 sneakers 北京",
          "über-cool t-shirt (size: XL)", "price<$50 & free+shipping=yes", "emoji 👟 shoes", "[CLS] [MASK] x [SEP]",
          "a" * 150, "superlongunknownwordxyzqq", "Ελληνικά ΣΟΦΙΑ", "don't stop", "x\u200by\u00adz", "ﬁne ½ ⅓",
          "İstanbul", "word " * 80, "\u0000null\ufffd", "tab\u3000ideographic space", "MiXeD CaSe"]


def test_tokenizer_matches_tokenizers_library(page: Any, rr: Reranker) -> None:
    got = page.evaluate("(qs) => qs.map((q) => window.rr.tokenizer.encode(q))", TRICKY)
    for q, ids in zip(TRICKY, got, strict=True):
        assert ids == list(rr.tokenizer.encode(q).ids), q


def test_bad_requests_name_the_field(page: Any, rr: Reranker) -> None:
    errs = page.evaluate("""async (id) => {
      const out = {};
      const tries = {empty: () => window.rr.rerank('  ', [id]), none: () => window.rr.rerank('q', []),
                     unknown: () => window.rr.rerank('q', [id, 'nope']), scores: () => window.rr.rerank('q', [id],
                     {retrievalScores: [1, 2]}), ids: () => window.rr.rerank('q', 'abc')};
      for (const [k, f] of Object.entries(tries)) {
        try { await f(); out[k] = 'no error'; } catch (e) { out[k] = `${e.name}: ${e.message}`; }
      }
      out.skipped = (await window.rr.rerank('q', [id, 'nope'], {skipUnknown: true})).map((r) => r.id);
      return out;
    }""", rr.catalog.item_ids[0])
    assert errs["empty"] == "RerankInputError: query: empty query"
    assert errs["none"] == "RerankInputError: candidateIds: no candidates"
    assert errs["unknown"].startswith("RerankInputError: candidateIds: 1 unknown item id(s)")
    assert errs["scores"] == "RerankInputError: retrievalScores: 2 values for 1 expected"
    assert errs["ids"].startswith("RerankInputError: candidateIds: expected a list")
    assert errs["skipped"] == [rr.catalog.item_ids[0]]


# --------------------------------------------------------------------------------------- bundle integrity


def _load_error(browser: Any, bundle: Path, tamper: Any) -> str:
    """Serve ``bundle``, then ``tamper(bundle)`` on disk (the server checked the manifest at start and serves
    files as they are now), then load it in the browser: the error it raises, as ``Name: message``."""
    with ShopServer(bundle, port=0) as srv:
        tamper(bundle)
        pg = browser.new_page()
        try:
            pg.goto(srv.url + "harness.html")
            pg.wait_for_function("window.fedrankReady === true")
            return str(pg.evaluate("""async () => { const f = window.fedrank;
              try { await f.Reranker.load('/bundle/', {ort: f.ort, wasmPaths: f.wasmPaths}); return 'loaded'; }
              catch (e) { return `${e.name}: ${e.message}`; } }"""))
        finally:
            pg.close()


def _flip_middle_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("what", ["head", "catalog", "tokenizer"])
def test_tampered_file_is_refused_naming_it(browser: Any, bundle: Path, tmp_path: Path, what: str) -> None:
    copy = tmp_path / "b"
    shutil.copytree(bundle, copy)
    man = json.loads((copy / "manifest.json").read_text())
    name = {"head": man["components"]["head"]["files"]["onnx"], "catalog": man["catalog"]["file"],
            "tokenizer": man["tokenizer"]["file"]}[what]
    err = _load_error(browser, copy, lambda b: _flip_middle_byte(b / name))
    assert err.startswith(f"BundleError: {name}: sha256 mismatch"), err


def test_tampered_manifest_and_missing_file_are_refused(browser: Any, bundle: Path, tmp_path: Path) -> None:
    copy = tmp_path / "b"
    shutil.copytree(bundle, copy)
    catalog = json.loads((copy / "manifest.json").read_text())["catalog"]["file"]
    err = _load_error(browser, copy, lambda b: (b / catalog).unlink())
    assert err == f"BundleError: {catalog}: missing from the bundle (HTTP 404)"
    shutil.copy(bundle / catalog, copy / catalog)
    text = (bundle / "manifest.json").read_text()
    err = _load_error(browser, copy, lambda b: (b / "manifest.json").write_text(text.replace('"int8"', '"fp32"', 1)))
    assert err.startswith("BundleError: manifest.json: sha256 mismatch"), err
    (copy / "manifest.json").write_text(text)
    err = _load_error(browser, copy, lambda b: (b / "manifest.sha256").write_text("nonsense\n"))
    assert err.startswith("BundleError: manifest.sha256: expected one line"), err


def test_server_refuses_a_tampered_manifest(bundle: Path, tmp_path: Path) -> None:
    from client.runtime_bundle import BundleError

    copy = tmp_path / "b"
    shutil.copytree(bundle, copy)
    (copy / "manifest.json").write_text((bundle / "manifest.json").read_text() + " ")
    with pytest.raises(BundleError, match="manifest.json: sha256 mismatch"):
        ShopServer(copy, port=0)


# ------------------------------------------------------------------------------- candidates from a request


def _requests(cat: Any, n: int, seed: int) -> list[dict[str, Any]]:
    """``n`` candidates requests (request_to_json's wire form) for random slates of ``cat``'s items, each with a
    query, first-stage scores on every other one, and recent item ids."""
    from client.runtime_bundle import candidates_request, request_to_json

    rng = np.random.default_rng(seed)
    out = []
    for k in range(n):
        ids = [cat.item_ids[i] for i in rng.choice(len(cat.item_ids), size=int(rng.integers(1, 60)), replace=False)]
        scores = rng.normal(size=len(ids)) if k % 2 else None
        out.append({"query": " ".join(rng.choice(WORDS, size=3)), "ids": ids,
                    "scores": None if scores is None else scores.astype(np.float32).tolist(),
                    "request": request_to_json(candidates_request(cat, ids, retrieval_scores=scores)),
                    "recent": [cat.item_ids[i] for i in rng.choice(len(cat.item_ids), size=int(rng.integers(0, 12)))]})
    return out


def test_candidates_from_request_parity_with_python(browser: Any) -> None:
    """``rerankCandidates`` (rows in the request, JSON wire form) equals the Python runtime's ``score_candidates``
    (1e-4, same order) and the browser's own catalog path; nested JSON lists read the same as the wire form."""
    bundle = fp16_bundle()
    rr = Reranker.load(bundle)
    assert rr.catalog is not None
    reqs = _requests(rr.catalog, 20, seed=1)
    with ShopServer(bundle, port=0) as srv:
        pg = open_harness(browser, srv)
        got = pg.evaluate("""async (reqs) => { const out = [];
          for (const r of reqs) {
            const a = await window.rr.scoreCandidates(r.query, r.request, {recentItemIds: r.recent});
            const b = await window.rr.score(r.query, r.ids, {recentItemIds: r.recent, retrievalScores: r.scores});
            out.push({ids: a.ids, scores: Array.from(a.scores), catalog: Array.from(b.scores)});
          }
          return out; }""", reqs)
        nested = pg.evaluate("async (r) => Array.from((await window.rr.scoreCandidates(r.q, r.req, "
                             "{recentItemIds: r.recent})).scores)",
                             {"q": reqs[0]["query"], "req": _nested(rr, reqs[0]["ids"]), "recent": reqs[0]["recent"]})
        pg.close()
    for req, g in zip(reqs, got, strict=True):
        ids, want = rr.score_candidates(req["query"], req["request"], req["recent"])
        assert g["ids"] == ids
        np.testing.assert_allclose(g["scores"], want, atol=1e-4, rtol=0)
        assert list(np.argsort(-np.asarray(g["scores"]), kind="stable")) == list(np.argsort(-want, kind="stable"))
        np.testing.assert_allclose(g["scores"], g["catalog"], atol=1e-6, rtol=0)
    np.testing.assert_allclose(nested, got[0]["scores"], atol=1e-6, rtol=0)


def _nested(rr: Reranker, ids: list[str]) -> dict[str, Any]:
    from client.runtime_bundle import candidates_request

    assert rr.catalog is not None
    req = candidates_request(rr.catalog, ids)
    return {k: (v.astype(int).tolist() if k == "mask" else v.tolist()) if isinstance(v, np.ndarray) else v
            for k, v in req.items()}


def test_compact_bundle_static_encoder_and_rows_history_parity(browser: Any, bundle: Path) -> None:
    """A compact bundle without a catalog: the static query encoder equals the Python runtime's (1e-5); server-sent
    candidates with the shopper's history as rows (``recentItems``) score as in Python (1e-4, same order)."""
    from client.runtime_bundle import candidates_request, request_to_json

    compact = compact_bundle()
    rr = Reranker.load(compact)
    assert not rr.has_catalog
    cat = Reranker.load(bundle).catalog  # the rows a search API would send (same items, same dims)
    assert cat is not None
    reqs = _requests(cat, 15, seed=2)
    for r in reqs:
        r["rows"] = request_to_json(candidates_request(cat, r["recent"]))
    with ShopServer(compact, port=0, require_catalog=False) as srv:
        pg = open_harness(browser, srv)
        got = pg.evaluate("""async ([reqs, texts]) => {
          const out = {kind: window.rr.queryEncoder.kind, slates: [], emb: []};
          for (const t of texts) out.emb.push(Array.from(await window.rr.encodeQuery(t)));
          for (const r of reqs) {
            const a = await window.rr.scoreCandidates(r.query, r.request, {recentItems: r.rows});
            out.slates.push({ids: a.ids, scores: Array.from(a.scores)});
          }
          const errs = [];
          for (const f of [() => window.rr.rerank('q', [reqs[0].ids[0]]),
                           () => window.rr.scoreCandidates('q', reqs[0].request, {recentItemIds: ['x']})]) {
            try { await f(); errs.push('no error'); } catch (e) { errs.push(e.message); }
          }
          out.errs = errs;
          return out; }""", [reqs, [*TRICKY, *WORDS]])
        pg.close()
    assert got["kind"] == "static"
    for text, emb in zip([*TRICKY, *WORDS], got["emb"], strict=True):
        np.testing.assert_allclose(emb, rr.encode_query(text), atol=1e-5, rtol=0, err_msg=text)
    for req, g in zip(reqs, got["slates"], strict=True):
        ids, want = rr.score_candidates(req["query"], req["request"], recent_items=req["rows"])
        assert g["ids"] == ids
        np.testing.assert_allclose(g["scores"], want, atol=1e-4, rtol=0)
        assert list(np.argsort(-np.asarray(g["scores"]), kind="stable")) == list(np.argsort(-want, kind="stable"))
    assert got["errs"][0].startswith("candidateIds: this bundle has no catalog")
    assert got["errs"][1].startswith("recentItemIds: this bundle has no catalog")


def _break(req: dict[str, Any], how: str) -> dict[str, Any]:
    r = {k: (list(v) if isinstance(v, list) else v) for k, v in req.items()}
    if how == "missing":
        del r["dense"]
    elif how == "version":
        r["version"] = 2
    elif how == "shape":
        r["text_q"] = r["text_q"][:-1]
    elif how == "range":
        r["image_q"] = [[200, *row[1:]] for row in r["image_q"]]
    elif how == "duplicate":
        r["item_ids"] = [r["item_ids"][0], *r["item_ids"][:-1]]
    elif how == "scale":
        r["video_scale"] = [-1.0, *r["video_scale"][1:]]
    elif how == "mask":
        r["mask"] = [[2, 1, 0], *r["mask"][1:]]
    return r


@pytest.mark.parametrize("how", ["missing", "version", "shape", "range", "duplicate", "scale", "mask"])
def test_bad_candidate_requests_fail_as_in_python(page: Any, rr: Reranker, how: str) -> None:
    """A broken request raises the Python runtime's error, word for word (field and problem)."""
    from client.runtime_bundle import RerankInputError

    req = _break(_nested(rr, rr.catalog.item_ids[:3]), how)
    with pytest.raises(RerankInputError) as want:
        rr.score_candidates("q", req)
    got = page.evaluate("""async (req) => { try { await window.rr.scoreCandidates('q', req); return 'no error'; }
                           catch (e) { return `${e.name}: ${e.message}`; } }""", req)
    assert got == f"RerankInputError: {want.value}"


@pytest.mark.parametrize("compressed", [False, True])
def test_npz_reader_matches_numpy(page: Any, compressed: bool) -> None:
    """web/src/npz.js reads what np.savez / np.savez_compressed write (zip64 entries, deflate), every dtype the
    bundle uses, shapes and values exact."""
    import base64
    import io

    rng = np.random.default_rng(0)
    arrays = {"q": rng.integers(-127, 128, size=(7, 5)).astype(np.int8), "s": rng.random(7).astype(np.float32),
              "p": np.r_[rng.random(3) * 100, np.nan], "m": rng.random((4, 3)) < 0.5,
              "ids": np.arange(6, dtype=np.int64).reshape(2, 3), "e": np.zeros((0, 4), np.float32)}
    buf = io.BytesIO()
    (np.savez_compressed if compressed else np.savez)(buf, **arrays)
    got = page.evaluate("""async (b64) => {
      const { readNpz } = await import('/src/npz.js');
      const bytes = Uint8Array.from(atob(b64), (c) => c.charCodeAt(0));
      const arrays = await readNpz(bytes, 'x.npz');
      return Object.fromEntries(Object.entries(arrays).map(([k, a]) =>
        [k, {dtype: a.dtype, shape: a.shape, data: Array.from(a.data, (v) => Number.isNaN(Number(v)) ? 'nan' : Number(v))}]));
    }""", base64.b64encode(buf.getvalue()).decode())
    assert sorted(got) == sorted(arrays)
    for k, a in arrays.items():
        assert got[k]["dtype"] == a.dtype.str and got[k]["shape"] == list(a.shape), k
        want = ["nan" if np.isnan(v) else float(v) for v in a.ravel().astype(np.float64)]
        assert got[k]["data"] == want, k
