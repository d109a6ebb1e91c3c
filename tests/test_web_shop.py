"""``fedrank shop``: the demo page in real headless Chromium -- search, rerank in the page, a click that becomes
on-device history (localStorage) and changes the next ranking, and no request leaving the page except the
bundle's own files and the page's own assets (every request recorded through Playwright's interception)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import numpy as np
import pytest
from test_web_runtime import fp32_compute_encoder, launch_browser, web_skip_reason

from export.shop import ShopServer, shop_items
from fedrank.cli import build_parser, main

pytestmark = pytest.mark.skipif(web_skip_reason() is not None, reason=str(web_skip_reason()))

COLOURS = [("red", (200, 30, 40)), ("blue", (30, 60, 200)), ("green", (40, 160, 60)), ("black", (20, 20, 20))]
KINDS = ["sneakers", "boots", "jacket", "dress", "backpack"]


@pytest.fixture(scope="module")
def bundle() -> Path:
    from test_export import tiny_setup  # the module pytest collected: its cached bundle is shared

    return tiny_setup()[2] / "b"


@pytest.fixture(scope="module")
def catalog(bundle: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A catalog for the bundle's items: titles from colour x kind, a photo (a coloured PNG) for every other item."""
    from PIL import Image

    root = tmp_path_factory.mktemp("shop-catalog")
    (root / "images").mkdir()
    ids = json.loads((bundle / "manifest.json").read_text())["catalog"]["item_ids"]
    rows = []
    for k, iid in enumerate(ids):
        name, rgb = COLOURS[k % len(COLOURS)]
        row: dict[str, Any] = {"item_id": iid, "title": f"{name.title()} {KINDS[k % len(KINDS)]} no. {k}",
                               "category": KINDS[k % len(KINDS)], "color": name, "price": 10.0 + k}
        if k % 2 == 0:
            Image.new("RGB", (64, 64), rgb).save(root / "images" / f"{iid}.png")
            row["image_path"] = f"images/{iid}.png"
        rows.append(row)
    path = root / "catalog.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture(scope="module")
def server(bundle: Path, catalog: Path) -> Iterator[ShopServer]:
    with ShopServer(bundle, catalog, port=0) as srv:
        yield srv


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        b = launch_browser(p)
        yield b
        b.close()


def _search(page: Any, query: str) -> list[dict[str, Any]]:
    before = page.evaluate("window.shop.results")
    page.fill("#query", query)
    page.click("#go")
    page.wait_for_function("(prev) => window.shop.results !== prev && window.shop.query === "
                           f"{json.dumps(query)}", arg=before)
    return list(page.evaluate("window.shop.results"))


def test_search_click_history_and_no_request_leaves_the_page(browser: Any, server: ShopServer,
                                                            tmp_path: Path) -> None:
    # Prepare: record every request; anything not for this server is aborted (and fails the test below)
    requests: list[tuple[str, str, str | None]] = []
    context = browser.new_context()

    def intercept(route: Any) -> None:
        req = route.request
        requests.append((req.method, req.url, req.post_data))
        if req.url.startswith(server.url):
            route.continue_()
        else:
            route.abort()

    context.route("**/*", intercept)
    page = context.new_page()
    page.goto(server.url)
    page.wait_for_function("window.shop.ready === true || window.shop.error !== undefined", timeout=60_000)
    assert page.evaluate("window.shop.error") is None

    # Execute: a search, a click on the third result, then the page re-ranks with the new history
    first = _search(page, "red sneakers")
    clicked = first[2]["id"]
    before_click = page.evaluate("window.shop.results")
    page.click(f".card[data-id='{clicked}']")
    page.wait_for_function("(prev) => window.shop.results !== prev", arg=before_click)
    second = list(page.evaluate("window.shop.results"))
    page.screenshot(path=str(tmp_path / "shop.png"), full_page=True)
    stored = page.evaluate("JSON.parse(localStorage.getItem('fedrank.recent-items'))")
    page.reload()
    page.wait_for_function("window.shop.ready === true", timeout=60_000)
    after_reload = page.evaluate("window.shop.recent.list()")
    context.close()

    # Assert: results with photos, reranked (scores sorted), the click in the on-device history and in effect
    assert len(first) == len(second) > 3
    assert [r["score"] for r in first] == sorted((r["score"] for r in first), reverse=True)
    assert stored == [clicked] and after_reload == [clicked]
    assert {r["id"] for r in first} == {r["id"] for r in second}
    assert any(abs(a["score"] - b["score"]) > 1e-6 for a, b in
               zip(sorted(first, key=lambda r: r["id"]), sorted(second, key=lambda r: r["id"]), strict=True))
    assert (tmp_path / "shop.png").stat().st_size > 10_000
    # ... and every request was a GET for this server's own files: the page, its scripts, onnxruntime-web,
    # the bundle's files, the item list and photos -- never the query, the clicks or the history
    allowed = set(server.routes) | {"/catalog/items.json"}
    assert requests, "no request recorded"
    for method, url, body in requests:
        assert url.startswith(server.url), f"request left the page's server: {url}"
        assert method == "GET" and body is None, (method, url)
        parts = urlsplit(url)
        assert parts.path in allowed and not parts.query, url
        assert "red" not in url.lower() and clicked not in parts.path, url
    paths = {urlsplit(u).path for _, u, _ in requests}
    assert {"/bundle/manifest.json", "/bundle/manifest.sha256", "/catalog/items.json"} <= paths
    assert any(p.startswith("/photos/") for p in paths)
    assert any(p.startswith("/ort/") and p.endswith(".wasm") for p in paths)


def test_shop_page_history_matches_python_runtime(browser: Any, server: ShopServer, bundle: Path) -> None:
    """The page's ranking with a history equals the Python runtime's for the same candidates, first-stage scores
    and history (the page's BM25 first stage is read back from the page; the query embedding of the native
    fp32-compute kernel, as in test_web_runtime's int8 parity test)."""
    from client.runtime import Reranker

    page = browser.new_page()
    page.goto(server.url)
    page.wait_for_function("window.shop.ready === true", timeout=60_000)
    recent = server.manifest["catalog"]["item_ids"][:3]
    got = page.evaluate("""async (recent) => {
      for (const id of recent) window.shop.recent.add(id);
      const hits = window.shop.index.search('blue boots', 50);
      const ids = hits.map((h) => window.shop.items[h.index].id);
      const ranked = await window.shop.rr.rerank('blue boots', ids, {recentItemIds: window.shop.recent.list(),
                                                  retrievalScores: hits.map((h) => h.score)});
      return {ids, scores: hits.map((h) => h.score), ranked};
    }""", recent)
    page.close()
    rr = Reranker.load(bundle)
    q = fp32_compute_encoder(bundle)(rr.tokenize("blue boots"))
    ids, scores = rr.score("blue boots", got["ids"], recent, retrieval_scores=got["scores"], query_emb=q)
    want = {i: float(s) for i, s in zip(ids, scores, strict=True)}
    assert len(got["ids"]) > 5
    assert [r["id"] for r in got["ranked"]][:5] == sorted(want, key=lambda i: -want[i])[:5]
    np.testing.assert_allclose([r["score"] for r in got["ranked"]], [want[r["id"]] for r in got["ranked"]], atol=1e-2)


def test_shop_items_photos_and_ids_without_catalog(bundle: Path, catalog: Path) -> None:
    from shared_model.catalog_io import load_catalog

    ids = json.loads((bundle / "manifest.json").read_text())["catalog"]["item_ids"]
    items, photos = shop_items(ids, load_catalog(catalog))
    assert [it["id"] for it in items] == ids and len(photos) == (len(ids) + 1) // 2
    assert items[0]["image"] == "/photos/0.png" and items[1]["image"] is None and items[0]["price"] == 10.0
    bare, none = shop_items(ids, None)
    assert bare[0]["title"] == ids[0] and not none


def test_cli_registers_shop_and_reports_a_missing_bundle(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    args = build_parser().parse_args(["shop", "--bundle", "b", "--port", "0"])
    assert args.command == "shop" and args.port == 0
    assert main(["shop", "--bundle", str(tmp_path / "nope")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("fedrank shop: error:") and "no such bundle directory" in err and len(err.splitlines()) == 1


def test_server_answers_only_its_own_paths(server: ShopServer) -> None:
    import urllib.error
    import urllib.request

    for path in ("/bundle/../manifest.json", "/etc/passwd", "/bundle/nope.onnx", "/src/../../README.md",
                 "/ort/ort.all.min.mjs", "/web/shop/index.html"):
        with pytest.raises(urllib.error.HTTPError) as e:
            urllib.request.urlopen(server.url.rstrip("/") + path)
        assert e.value.code == 404, path
    with urllib.request.urlopen(server.url + "ort/ort-wasm-simd-threaded.wasm") as r:
        assert r.headers["Content-Type"] == "application/wasm"
