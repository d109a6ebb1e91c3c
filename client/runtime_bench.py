"""Latency and peak memory of the on-device runtime, measured in its own process (``fedrank bench ondevice``
starts one per backend). Torch-free like the runtime; ``--block-torch`` makes ``import torch`` fail first, so a
run also proves that nothing on this path needs torch.

    python -m client.runtime_bench --bundle B --backend onnx --spec '{"query": ..., "candidates": [...]}'

prints one JSON object: per-call milliseconds of query encoding, the head alone (inputs prepared once) and the
whole ``rerank`` call, the load time, and ``ru_maxrss`` of this process.
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import time
from collections.abc import Callable
from typing import Any


class _BlockTorch:
    """A meta-path finder that refuses ``torch`` and its submodules."""

    def find_spec(self, name: str, path: Any = None, target: Any = None) -> None:
        if name == "torch" or name.startswith("torch."):
            raise ImportError(f"import of {name!r} blocked: the on-device runtime must not need torch")
        return None


def block_torch() -> None:
    sys.meta_path.insert(0, _BlockTorch())


def time_calls(fn: Callable[[], Any], iters: int, warmup: int) -> list[float]:
    """Milliseconds of each of ``iters`` calls after ``warmup`` untimed ones."""
    for _ in range(warmup):
        fn()
    out = []
    for _ in range(iters):
        t = time.perf_counter_ns()
        fn()
        out.append((time.perf_counter_ns() - t) / 1e6)
    return out


def run(bundle: str, backend: str, spec: dict[str, Any], iters: int, warmup: int) -> dict[str, Any]:
    from client.runtime import Reranker

    t0 = time.perf_counter()
    rr = Reranker.load(bundle, backend=backend, num_threads=1)
    load_s = time.perf_counter() - t0
    query, cands, recent = spec["query"], spec["candidates"], spec.get("recent")
    q = rr.encode_query(query)
    _, rows, _ = rr.candidate_rows(cands)
    inputs = rr.head_inputs(q, rows, rr.user_context(recent))
    res = {
        "backend": backend,
        "load_s": load_s,
        "query_tokens": len(rr.tokenize(query)),
        "num_candidates": len(cands),
        "query_ms": time_calls(lambda: rr.encode_query(query), iters, warmup),
        "head_ms": time_calls(lambda: rr.head_scores(inputs), iters, warmup),
        "e2e_ms": time_calls(lambda: rr.rerank(query, cands, recent), iters, warmup),
        "top5": rr.rerank(query, cands, recent)[:5],
    }
    res["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0
    res["torch_imported"] = "torch" in sys.modules
    return res


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--bundle", required=True)
    p.add_argument("--backend", required=True, choices=["onnx", "tflite"])
    p.add_argument("--spec", required=True, help="JSON: query, candidates, recent")
    p.add_argument("--iters", type=int, default=200)
    p.add_argument("--warmup", type=int, default=20)
    p.add_argument("--block-torch", action="store_true")
    a = p.parse_args(argv)
    if a.block_torch:
        block_torch()
    print(json.dumps(run(a.bundle, a.backend, json.loads(a.spec), a.iters, a.warmup)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
