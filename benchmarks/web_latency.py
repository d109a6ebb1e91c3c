"""Browser rerank latency (onnxruntime-web, wasm, 1 thread, headless Chromium) beside the Python runtime (ONNX
Runtime, 1 thread), on the same bundle, in the same run.

    python benchmarks/web_latency.py [--bundle DIR] [--iters 200] [--warmup 20] [--sizes 20,50,100] [--out FILE]

Without ``--bundle`` it uses the tests' tiny bundle (stand-in encoders, the default head; built in about a
minute). One request = what ``rerank`` does end to end: tokenise and encode the query, the user context from 5
recent items, the features, the head, the sort. The same requests (query, candidates, history) go to both
runtimes, in alternating turns of 25 (a loaded machine slows both alike). The browser times each call with ``performance.now()`` (Chromium coarsens it to 0.1 ms on a page
without cross-origin isolation); Python with ``time.perf_counter``. Prints min / p50 / p95 / max / mean in ms.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from client.runtime import Reranker  # noqa: E402
from export.shop import ShopServer  # noqa: E402

CHUNK = 25  # requests per turn: the browser and Python take turns
QUERIES = ["red canvas sneakers", "waterproof hiking boots for men", "striped cotton shirt", "gift", "black leather bag",
           "summer dress with floral pattern, size M"]

BROWSER_LOOP = """async ([reqs, warmup]) => {
  const rr = window.rr;
  const times = [];
  for (let k = 0; k < reqs.length; k++) {
    const r = reqs[k];
    const t0 = performance.now();
    await rr.rerank(r.query, r.candidates, {recentItemIds: r.recent});
    const dt = performance.now() - t0;
    if (k >= warmup) times.push(dt);
  }
  return times;
}"""


def requests(item_ids: list[str], size: int, n: int, seed: int) -> list[dict[str, Any]]:
    rng = np.random.default_rng(seed)
    return [{"query": QUERIES[k % len(QUERIES)],
             "candidates": [item_ids[i] for i in rng.choice(len(item_ids), size, replace=size > len(item_ids))],
             "recent": [item_ids[i] for i in rng.choice(len(item_ids), 5)]} for k in range(n)]


def summary(ms: list[float]) -> dict[str, float]:
    a = np.asarray(ms, np.float64)
    return {"min": float(a.min()), "p50": float(np.percentile(a, 50)), "p95": float(np.percentile(a, 95)),
            "max": float(a.max()), "mean": float(a.mean()), "n": int(a.size)}


def python_times(rr: Reranker, reqs: list[dict[str, Any]], warmup: int) -> list[float]:
    out = []
    for k, r in enumerate(reqs):
        t0 = time.perf_counter()
        rr.rerank(r["query"], r["candidates"], r["recent"])
        dt = (time.perf_counter() - t0) * 1e3
        if k >= warmup:
            out.append(dt)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--bundle", help="bundle directory (default: the tests' tiny bundle, built now)")
    ap.add_argument("--iters", type=int, default=200)
    ap.add_argument("--warmup", type=int, default=20)
    ap.add_argument("--sizes", default="20,50,100")
    ap.add_argument("--out", help="also write the figures as JSON here")
    args = ap.parse_args(argv)

    from playwright.sync_api import sync_playwright
    from test_web_runtime import launch_browser, open_harness

    if args.bundle:
        bundle = Path(args.bundle)
    else:
        from test_export import tiny_setup

        print("building the tests' tiny bundle ...", flush=True)
        bundle = tiny_setup()[2] / "b"
    rr = Reranker.load(bundle, backend="onnx", num_threads=1)
    if rr.catalog is None:
        ap.error(f"{bundle}: this benchmark reranks catalog ids; the bundle has no catalog")
    ids = rr.catalog.item_ids
    sizes = [int(s) for s in args.sizes.split(",")]
    results: dict[str, dict[str, dict[str, float]]] = {"browser (onnxruntime-web wasm)": {},
                                                       "python (onnxruntime)": {}}
    with ShopServer(bundle, port=0) as srv, sync_playwright() as p:
        browser = launch_browser(p)
        page = open_harness(browser, srv)
        version = page.evaluate("window.fedrank.ort.env.versions.web")
        chromium = browser.version
        for size in sizes:
            reqs = requests(ids, size, args.iters + args.warmup, seed=size)
            web: list[float] = page.evaluate(BROWSER_LOOP, [reqs[: args.warmup], args.warmup])
            py = python_times(rr, reqs[: args.warmup], args.warmup)
            for lo in range(args.warmup, len(reqs), CHUNK):  # alternate, so both see the same machine load
                web += page.evaluate(BROWSER_LOOP, [reqs[lo : lo + CHUNK], 0])
                py += python_times(rr, reqs[lo : lo + CHUNK], 0)
            results["browser (onnxruntime-web wasm)"][str(size)] = summary(web)
            results["python (onnxruntime)"][str(size)] = summary(py)
        browser.close()

    print(f"\nrerank latency, ms per request ({args.iters} requests after {args.warmup} warm-up, 1 thread); "
          f"bundle {bundle}; onnxruntime-web {version}, Chromium {chromium}")
    print(f"{'runtime':34} {'S':>4} {'min':>7} {'p50':>7} {'p95':>7} {'max':>7} {'mean':>7}")
    for name, per_size in results.items():
        for slate, st in per_size.items():
            print(f"{name:34} {slate:>4} {st['min']:7.2f} {st['p50']:7.2f} {st['p95']:7.2f} {st['max']:7.2f} "
                  f"{st['mean']:7.2f}")
    if args.out:
        Path(args.out).write_text(json.dumps({"bundle": str(bundle), "iters": args.iters, "warmup": args.warmup,
                                              "onnxruntime_web": version, "results": results}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
