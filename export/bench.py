"""``fedrank bench ondevice``: one-thread latency, bundle sizes and peak memory of the exported pipeline against
the same pipeline in torch fp32 eager, all measured in one run.

Each backend runs in its own fresh process, so ``ru_maxrss`` is that runtime's own peak: ``onnx`` and
``tflite`` through ``client.runtime_bench`` (with ``import torch`` blocked), ``torch`` through this module's
worker (``TextEncoder`` + the checkpoint's head, fp32, eager, ``torch.set_num_threads(1)``, catalog embeddings
cached as float32 arrays, features from ``shared_model.head_features`` as in training and on the device). Every process times the same request: a 16-token query, 100 candidates, 10 recent
items. Stages: query encoding (tokenise + text encoder), the head alone on 100 candidates (inputs prepared
once), and end to end (``rerank``: query encoding, catalog gather, user context, dense features, head, sort).

    python benchmarks/ondevice.py --bundle B      (same as: fedrank bench ondevice --bundle B)
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[1]
STAGES = (("query_ms", "query encoding"), ("head_ms", "head, 100 candidates"), ("e2e_ms", "end to end"))
QUERY_WORDS = ["lightweight", "waterproof", "hiking", "boots", "for", "women", "with", "ankle", "support", "breathable", "mesh", "lining", "and", "a", "grippy", "rubber", "sole", "in", "grey", "suede", "leather"]


def bench_spec(bundle: str | os.PathLike[str], tokens: int = 16, candidates: int = 100, recent: int = 10,
               seed: int = 0) -> dict[str, Any]:
    """The request every backend times: a query of exactly ``tokens`` tokens, candidates and recent items."""
    from tokenizers import Tokenizer

    from client.runtime_bundle import MANIFEST, BundleError, read_manifest

    man = read_manifest(bundle)
    if "catalog" not in man:
        raise BundleError(MANIFEST, "this bundle has no catalog (exported with --no-catalog): the benchmark draws "
                                    "its candidates from a catalog; benchmark the same export with its catalog")
    tok = Tokenizer.from_file(str(Path(bundle) / man["tokenizer"]["file"]))
    tok.no_padding()
    tok.no_truncation()
    query = " ".join(QUERY_WORDS[:1])
    for k in range(1, len(QUERY_WORDS) + 1):
        q = " ".join(QUERY_WORDS[:k])
        if len(tok.encode(q).ids) > tokens:
            break
        query = q
    ids = list(man["catalog"]["item_ids"])
    rng = np.random.default_rng(seed)
    cands = rng.choice(len(ids), size=candidates, replace=len(ids) < candidates)
    rec = rng.choice(len(ids), size=recent, replace=len(ids) < recent)
    return {"query": query, "candidates": [ids[i] for i in cands], "recent": [ids[i] for i in rec]}


def run_ondevice(bundle: str | os.PathLike[str], checkpoint: str | None = None, iters: int = 200, warmup: int = 20,
                 backends: tuple[str, ...] = ("onnx", "tflite", "torch"), out: str | None = None) -> dict[str, Any]:
    """Run every backend in its own process, print the tables, return (and optionally write) the results."""
    from client.runtime_bundle import read_manifest

    man = read_manifest(bundle)
    spec = bench_spec(bundle)
    results: dict[str, Any] = {"spec": {**spec, "candidates": len(spec["candidates"])}, "iters": iters,
                               "backends": {}, "sizes": bundle_sizes(bundle, man)}
    for backend in backends:
        if backend == "torch":
            ckpt = checkpoint or man.get("checkpoint", {}).get("path")
            if not ckpt or not Path(ckpt).is_file():
                raise FileNotFoundError(f"torch baseline: checkpoint {ckpt!r} not found (pass --checkpoint)")
            cmd = [sys.executable, "-m", "export.bench", "--worker", "--bundle", str(bundle), "--checkpoint", ckpt]
        elif backend in man["targets"]:
            cmd = [sys.executable, "-m", "client.runtime_bench", "--bundle", str(bundle), "--backend", backend,
                   "--block-torch"]
        else:
            continue
        cmd += ["--spec", json.dumps(spec), "--iters", str(iters), "--warmup", str(warmup)]
        proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, env=_one_thread_env())
        if proc.returncode != 0:
            raise RuntimeError(f"{backend} benchmark process failed:\n{proc.stderr[-3000:]}")
        results["backends"][backend] = json.loads(proc.stdout.strip().splitlines()[-1])
    results["summary"] = summarize(results)
    print_results(results)
    if out:
        Path(out).write_text(json.dumps(results, indent=1), encoding="utf-8")
    return results


def _one_thread_env() -> dict[str, str]:
    env = dict(os.environ)
    for k in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        env[k] = "1"
    env["OMP_WAIT_POLICY"] = "PASSIVE"  # no spinning threads (see shared_model/__init__.py)
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    env.setdefault("HF_HUB_OFFLINE", "1")
    env.setdefault("TRANSFORMERS_OFFLINE", "1")
    return env


def bundle_sizes(bundle: str | os.PathLike[str], man: dict[str, Any]) -> dict[str, Any]:
    """Bytes per file, and the on-device set without the catalog (text encoder + head + tokenizer) per backend."""
    files = {name: (Path(bundle) / name).stat().st_size for name in man["files"]}
    ondevice = {}
    for backend in man["targets"]:
        names = [man["components"][c]["files"][backend] for c in ("text_encoder", "head")]
        ondevice[backend] = {"files": [*names, man["tokenizer"]["file"]],
                             "bytes": sum(files[n] for n in names) + files[man["tokenizer"]["file"]]}
    return {"files": files, "ondevice_without_catalog": ondevice}


def summarize(results: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    torch_res = results["backends"].get("torch")
    for backend, r in results["backends"].items():
        row: dict[str, Any] = {"peak_rss_mb": r["peak_rss_mb"]}
        for key, _ in STAGES:
            x = np.asarray(r[key])
            row[key] = {"min": float(x.min()), "p50": float(np.median(x)), "p95": float(np.percentile(x, 95)),
                        "max": float(x.max())}
            if torch_res is not None and backend != "torch":
                row[key]["speedup_vs_torch_p50"] = float(np.median(torch_res[key]) / np.median(x))
        out[backend] = row
    return out


def print_results(results: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    con = Console()
    spec = results["spec"]
    t = Table(title=f"1-thread latency, ms ({results['iters']} calls each; query {spec['query']!r}, "
                    f"{spec['candidates']} candidates)")
    for col in ("stage", "backend", "min", "p50", "p95", "max", "x torch (p50)"):
        t.add_column(col, justify="left" if col in ("stage", "backend") else "right")
    for key, label in STAGES:
        for backend, row in results["summary"].items():
            s = row[key]
            ratio = s.get("speedup_vs_torch_p50")
            t.add_row(label, backend, f"{s['min']:.3f}", f"{s['p50']:.3f}", f"{s['p95']:.3f}", f"{s['max']:.3f}",
                      "-" if ratio is None else f"{ratio:.2f}x")
    con.print(t)
    m = Table(title="peak memory of each runtime process (ru_maxrss)")
    m.add_column("backend")
    m.add_column("MiB", justify="right")
    for backend, row in results["summary"].items():
        m.add_row(backend, f"{row['peak_rss_mb']:.0f}")
    con.print(m)
    s = Table(title="bundle files")
    s.add_column("file")
    s.add_column("KiB", justify="right")
    for name, b in results["sizes"]["files"].items():
        s.add_row(name, f"{b / 1024:.1f}")
    for backend, d in results["sizes"]["ondevice_without_catalog"].items():
        s.add_row(f"[bold]on-device {backend} (text encoder + head + tokenizer)", f"{d['bytes'] / 1024:.1f}")
    con.print(s)


# ----------------------------------------------------------------------------------------- torch worker


def torch_worker(bundle: str, checkpoint: str, spec: dict[str, Any], iters: int, warmup: int) -> dict[str, Any]:
    """The same pipeline in torch fp32 eager, one thread; catalog embeddings cached as float32 arrays, the head's
    inputs from the shared feature functions (``shared_model.head_features``), the head in torch."""
    import time

    import torch

    from client.runtime_bench import time_calls
    from client.runtime_bundle import PackedCatalog, read_manifest
    from shared_model.checkpoint import load_checkpoint
    from shared_model.encoders import TextEncoder
    from shared_model.head_features import (
        HISTORY_LEN,
        head_feeds,
        log_prices,
        recent_history,
        slate_features,
        user_context,
    )

    torch.set_num_threads(1)
    t0 = time.perf_counter()
    man = read_manifest(bundle)
    cat = PackedCatalog.load(Path(bundle) / man["catalog"]["file"], list(man["catalog"]["item_ids"]),
                             {"text": man["dims"]["text"], "image": man["dims"]["image"]})
    rows_all = np.arange(len(cat))
    table = {m: cat.modality(m, rows_all) for m in ("text", "image", "video")}  # float32 [N, D]
    mask, dense = cat.arrays["mask"].astype(np.float32), cat.arrays["dense"].astype(np.float32)
    log_price = log_prices(cat.arrays["price"])
    text = TextEncoder().eval()
    head, _ = load_checkpoint(checkpoint)
    tok = text.tokenizer(int(man["tokenizer"]["max_length"]))
    load_s = time.perf_counter() - t0
    hist_len = int(man["catalog"].get("history_len", HISTORY_LEN))

    def encode(q: str) -> torch.Tensor:
        x = torch.tensor([tok.encode(q).ids], dtype=torch.long)
        return text(x, torch.ones_like(x))

    def inputs(qv: torch.Tensor, cands: list[str], recent: list[str]) -> dict[str, torch.Tensor]:
        r = np.asarray([cat.row(i) for i in cands], np.int64)  # [S]
        h = np.asarray(recent_history((cat.row(i) for i in recent), hist_len), np.int64)  # [H]
        user = user_context(table["text"][h], table["image"][h], mask[h, 1], np.ones(len(h), bool))
        feeds = head_feeds(qv.numpy(), table["text"][r][None], table["image"][r][None], table["video"][r][None],
                           mask[r][None], dense[r][None], slate_features(log_price[r])[None],
                           (user[0][None], user[1][None], user[2][None]))
        return {k: torch.from_numpy(v) for k, v in feeds.items()}

    query, cands, recent = spec["query"], spec["candidates"], spec.get("recent") or []

    def e2e() -> list[tuple[str, float]]:
        s = head(**inputs(encode(query), cands, recent))[0]
        order = torch.argsort(-s, stable=True)
        return [(cands[i], float(s[i])) for i in order.tolist()]

    with torch.inference_mode():
        prepared = inputs(encode(query), cands, recent)
        res = {
            "backend": "torch", "load_s": load_s, "query_tokens": len(tok.encode(query).ids),
            "num_candidates": len(cands),
            "query_ms": time_calls(lambda: encode(query), iters, warmup),
            "head_ms": time_calls(lambda: head(**prepared), iters, warmup),
            "e2e_ms": time_calls(e2e, iters, warmup),
            "top5": e2e()[:5],
        }
    res["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0
    return res


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="On-device benchmark of an exported bundle (see module docstring).")
    p.add_argument("--bundle", default="bundles/default")
    p.add_argument("--checkpoint")
    p.add_argument("--iters", type=int, default=200)
    p.add_argument("--warmup", type=int, default=20)
    p.add_argument("--backends", default="onnx,tflite,torch")
    p.add_argument("--out")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--spec", help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.worker:
        print(json.dumps(torch_worker(a.bundle, a.checkpoint, json.loads(a.spec), a.iters, a.warmup)))
        return 0
    if not Path(a.bundle).is_dir():
        print(f"no bundle at {a.bundle}: export one first (fedrank export --checkpoint CKPT --out {a.bundle})",
              file=sys.stderr)
        return 1
    run_ondevice(a.bundle, a.checkpoint, a.iters, a.warmup, tuple(x for x in a.backends.split(",") if x), a.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
