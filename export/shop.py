"""``fedrank shop``: a demo shop page that reranks search results in the browser with an exported bundle.

One local HTTP server (standard library ``http.server``, bound to 127.0.0.1) serves exactly these paths:

    /                    the shop page (``web/shop/index.html``); ``/shop/*`` its script and style
    /harness.html        a bare page with the same import map (browser tests and ``benchmarks/web_latency.py``)
    /src/*.js            the browser runtime (``web/src``: bundle check, WordPiece tokenizer, features, reranker)
    /ort/*               onnxruntime-web's ES modules and .wasm files from ``web/node_modules`` (no CDN)
    /bundle/NAME         ``manifest.json``, ``manifest.sha256`` and the files the manifest lists -- nothing else
    /catalog/items.json  the bundle's items for display (id, title, brand, category, colour, price, photo URL)
    /photos/N.EXT        the catalog's product photos, by item index (only files the catalog names)

The first-stage search (a small BM25 over titles) and the reranking both run in the page: the query, the clicks
and the shopper's history never reach this server (the page keeps the history in localStorage). Every other
path is a 404. Bad input (no bundle, a tampered manifest, a missing ``web/node_modules``) is a one-line error
naming the file.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import mimetypes
import threading
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit

from client.runtime_bundle import MANIFEST, MANIFEST_DIGEST, BundleError, read_manifest

log = logging.getLogger(__name__)

WEB_DIR = Path(__file__).resolve().parents[1] / "web"
ORT_DIST = Path("node_modules") / "onnxruntime-web" / "dist"
ORT_FILES = ("ort.wasm.min.mjs", "ort-wasm-simd-threaded.mjs", "ort-wasm-simd-threaded.wasm")
DEFAULT_PORT = 8765
_TYPES = {".js": "text/javascript", ".mjs": "text/javascript", ".wasm": "application/wasm", ".json": "application/json",
          ".html": "text/html; charset=utf-8", ".css": "text/css", ".onnx": "application/octet-stream",
          ".npz": "application/octet-stream", ".sha256": "text/plain; charset=utf-8", ".png": "image/png"}


class ShopError(ValueError):
    """The shop cannot be served (``web/`` or its ``node_modules`` missing, an unusable catalog)."""


def add_commands(subparsers: Any) -> None:
    """Register ``shop`` on an ``argparse`` ``add_subparsers()`` object."""
    from shared_model.console import add_command

    sp = add_command(subparsers, "shop", cmd_shop,
                     "serve a demo shop page that searches and reranks in the browser with a bundle "
                     "(onnxruntime-web; the shopper's history stays in the page)")
    sp.add_argument("--bundle", required=True, help="bundle directory (fedrank export)")
    sp.add_argument("--catalog", help="catalog file (CSV/JSONL/styles.csv) or data folder with titles and photos "
                                      "(default: the data folder the bundle was exported from, if any)")
    sp.add_argument("--port", type=int, default=DEFAULT_PORT, help=f"port on 127.0.0.1 (default {DEFAULT_PORT}; 0: any)")


def cmd_shop(args: argparse.Namespace) -> int:
    server = ShopServer(args.bundle, args.catalog, port=args.port)
    print(f"fedrank shop: {server.num_items} items ({server.num_photos} photos) from {server.bundle_dir}")
    print(f"open {server.url}   (Ctrl-C stops)")
    try:
        server.serve_forever()
    finally:
        server.close()
    return 0


# ----------------------------------------------------------------------------------------------- catalog


def _catalog_path(catalog: str | Path | None, manifest: dict[str, Any]) -> Path | None:
    if catalog is not None:
        p = Path(catalog)
        if p.is_dir():
            p = p / "catalog.jsonl"
        if not p.is_file():
            raise ShopError(f"--catalog {catalog}: no such catalog file (or data folder with catalog.jsonl)")
        return p
    data_dir = manifest.get("checkpoint", {}).get("data_dir")
    if isinstance(data_dir, str) and (Path(data_dir) / "catalog.jsonl").is_file():
        return Path(data_dir) / "catalog.jsonl"
    return None


def shop_items(item_ids: list[str], catalog: Any | None) -> tuple[list[dict[str, Any]], dict[str, Path]]:
    """``(items, photos)``: one display record per bundle item (bundle order; an item the catalog lacks shows its
    id as title), and photo URL name -> file for the items whose photo exists."""
    by_id = {it.item_id: it for it in catalog} if catalog is not None else {}
    items: list[dict[str, Any]] = []
    photos: dict[str, Path] = {}
    for k, iid in enumerate(item_ids):
        it = by_id.get(iid)
        rec: dict[str, Any] = {"id": iid, "title": iid, "brand": "", "category": "", "color": "", "price": None,
                               "image": None}
        if it is not None:
            rec.update(title=it.title, brand=it.brand, category=it.category, color=it.color,
                       price=None if math.isnan(it.price) else round(float(it.price), 2))
            if it.image_path and Path(it.image_path).is_file():
                name = f"{k}{Path(it.image_path).suffix.lower() or '.jpg'}"
                photos[name] = Path(it.image_path)
                rec["image"] = f"/photos/{name}"
        items.append(rec)
    return items, photos


# ----------------------------------------------------------------------------------------------- server


class ShopServer:
    """The shop's HTTP server on 127.0.0.1 (``port=0``: any free port); ``start()`` serves in a thread (tests),
    ``serve_forever()`` in the caller's; ``close()`` stops it. Use as a context manager for the threaded form."""

    def __init__(self, bundle_dir: str | Path, catalog: str | Path | None = None, port: int = DEFAULT_PORT,
                 web_dir: Path = WEB_DIR, require_catalog: bool = True) -> None:
        self.bundle_dir = Path(bundle_dir).resolve()
        self.manifest = read_manifest(self.bundle_dir)  # BundleError naming the file
        if "catalog" not in self.manifest and require_catalog:
            raise BundleError(MANIFEST, "this bundle has no catalog (exported for server-sent candidates): the demo "
                                        "shop searches the bundle's catalog in the page; export one with a catalog")
        self.web_dir = web_dir
        ort = web_dir / ORT_DIST
        missing = [f for f in ORT_FILES if not (ort / f).is_file()]
        if not (web_dir / "shop" / "index.html").is_file():
            raise ShopError(f"{web_dir / 'shop' / 'index.html'}: missing (fedrank shop runs from a source checkout)")
        if missing:
            raise ShopError(f"{ort}: missing {missing}; install the browser runtime's packages with "
                            "`make install` (or `cd web && npm ci`)")
        cat_path = _catalog_path(catalog, self.manifest)
        cat = None
        if cat_path is not None:
            from shared_model.catalog_io import load_catalog

            cat = load_catalog(cat_path)
        items, self.photos = shop_items(list(self.manifest.get("catalog", {}).get("item_ids", [])), cat)
        self.items_json = json.dumps({"items": items, "catalog": str(cat_path) if cat_path else None}).encode()
        self.routes = self._routes()
        handler = type("Handler", (_Handler,), {"shop": self})
        self.httpd = ThreadingHTTPServer(("127.0.0.1", port), handler)
        self.httpd.daemon_threads = True
        self._thread: threading.Thread | None = None

    @property
    def num_items(self) -> int:
        return len(self.manifest.get("catalog", {}).get("item_ids", []))

    @property
    def num_photos(self) -> int:
        return len(self.photos)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.httpd.server_address[1]}/"

    def _routes(self) -> dict[str, Path]:
        """Every static path this server answers, mapped to its file (built once: no path is ever joined from a
        request)."""
        web = self.web_dir
        routes = {"/": web / "shop" / "index.html", "/harness.html": web / "harness.html"}
        for sub in ("shop", "src"):
            for f in sorted((web / sub).glob("*")):
                if f.is_file() and f.suffix in (".js", ".css", ".html"):
                    routes[f"/{sub}/{f.name}"] = f
        for name in ORT_FILES:
            routes[f"/ort/{name}"] = web / ORT_DIST / name
        for name in (MANIFEST, MANIFEST_DIGEST, *self.manifest["files"]):
            routes[f"/bundle/{name}"] = self.bundle_dir / name
        for name, path in self.photos.items():
            routes[f"/photos/{name}"] = path
        return routes

    def start(self) -> ShopServer:
        self._thread = threading.Thread(target=self.httpd.serve_forever, name="fedrank-shop", daemon=True)
        self._thread.start()
        return self

    def serve_forever(self) -> None:
        self.httpd.serve_forever()

    def close(self) -> None:
        if self._thread is not None:
            self.httpd.shutdown()
            self._thread.join(timeout=5)
            self._thread = None
        self.httpd.server_close()

    def __enter__(self) -> ShopServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()


class _Handler(BaseHTTPRequestHandler):
    shop: ShopServer
    server_version = "fedrank-shop"

    def do_GET(self) -> None:  # noqa: N802 (http.server's name)
        path = unquote(urlsplit(self.path).path)
        if path == "/catalog/items.json":
            self._send(HTTPStatus.OK, self.shop.items_json, _TYPES[".json"])
            return
        file = self.shop.routes.get(path)
        if file is None:
            self._send(HTTPStatus.NOT_FOUND, b"not found\n", "text/plain; charset=utf-8")
            return
        try:
            body = file.read_bytes()
        except OSError:
            self._send(HTTPStatus.NOT_FOUND, b"not found\n", "text/plain; charset=utf-8")
            return
        kind = _TYPES.get(file.suffix.lower()) or mimetypes.guess_type(file.name)[0] or "application/octet-stream"
        self._send(HTTPStatus.OK, body, kind)

    def _send(self, status: HTTPStatus, body: bytes, kind: str) -> None:
        self.send_response(status)
        self.send_header("Content-Type", kind)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-cache")
        self.send_header("X-Content-Type-Options", "nosniff")
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 (http.server's signature)
        log.debug("%s %s", self.address_string(), format % args)
