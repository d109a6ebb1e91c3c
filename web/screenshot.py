"""Screenshot of the demo shop page (``fedrank shop``) after a search and a click, for the README (docs/shop.png).

    python web/screenshot.py --bundle DIR [--catalog FILE_OR_DATA_DIR] [--query "red sneakers"] [--out docs/shop.png]

Drives Debian's headless Chromium through Playwright, as the browser tests do: opens the page, searches, clicks
the ``--click``-th result (it goes into the page's on-device history and the page reranks), searches again and
saves the page.
"""

from __future__ import annotations

import argparse
import io
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--bundle", required=True)
    ap.add_argument("--catalog")
    ap.add_argument("--query", default="red sneakers")
    ap.add_argument("--click", type=int, default=3, help="which result to click (1 = the first)")
    ap.add_argument("--out", default=str(ROOT / "docs" / "shop.png"))
    args = ap.parse_args(argv)

    from playwright.sync_api import sync_playwright
    from test_web_runtime import launch_browser

    from export.shop import ShopServer

    with ShopServer(args.bundle, args.catalog, port=0) as srv, sync_playwright() as p:
        browser = launch_browser(p)
        page = browser.new_page(viewport={"width": 1280, "height": 860})
        page.goto(srv.url)
        page.wait_for_function("window.shop.ready === true || window.shop.error !== undefined", timeout=120_000)
        for step in range(2):
            before = page.evaluate("window.shop.results")
            page.fill("#query", args.query)
            page.click("#go")
            page.wait_for_function("(prev) => window.shop.results !== prev", arg=before)
            if step == 0:
                item = page.evaluate(f"window.shop.results[{args.click - 1}].id")
                before = page.evaluate("window.shop.results")
                page.click(f".card[data-id={json.dumps(item)}]")
                page.wait_for_function("(prev) => window.shop.results !== prev", arg=before)
        page.wait_for_load_state("networkidle")
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        png = page.screenshot()
        browser.close()
    from PIL import Image  # 256 colours: a third of the size, no visible loss on this page

    img = Image.open(io.BytesIO(png)).convert("RGB")
    img.quantize(colors=256, method=Image.Quantize.MEDIANCUT, dither=Image.Dither.NONE).save(args.out, optimize=True)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
