"""Compact bundle against full bundle, in one run: 1-thread query-encoding latency (MiniLM ONNX / TFLite against
the static query encoder), end-to-end rerank latency, bundle sizes without the catalog, and the NDCG@10 the
static encoder costs on the held-out slates (from the two manifests: both bundles' exports score the same
held-out slates when exported from the same checkpoint and data with the same ``--max-slates`` and seed).

Each (bundle, backend) runs in its own fresh process through ``client.runtime_bench`` with ``import torch``
blocked and every thread pool at 1 (as ``fedrank bench ondevice`` does); every process times the same request.

    fedrank export --checkpoint CKPT --out bundles/full
    fedrank export --checkpoint CKPT --out bundles/compact --profile compact
    python benchmarks/compact_bundle.py --full bundles/full --compact bundles/compact [--iters 500] [--out r.json]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from client.runtime_bundle import CATALOG, MANIFEST, MANIFEST_DIGEST, read_manifest  # noqa: E402
from export.bench import _one_thread_env, bench_spec  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
STAGES = (("query_ms", "query encoding"), ("e2e_ms", "end to end (100 candidates)"))


def sizes(bundle: Path, man: dict[str, Any]) -> dict[str, Any]:
    """Bytes of the whole bundle without the catalog (manifest included), and per backend of the files a device
    running that backend needs without the catalog (query encoder + head + tokenizer + manifest)."""
    files = {name: (bundle / name).stat().st_size for name in man["files"]}
    meta = sum((bundle / n).stat().st_size for n in (MANIFEST, MANIFEST_DIGEST))
    per_backend = {}
    for backend in man["targets"]:
        names = {man["components"][c]["files"][backend] for c in ("text_encoder", "head")}
        names.add(man["tokenizer"]["file"])
        per_backend[backend] = sum(files[n] for n in names) + meta
    return {"files": files, "without_catalog": sum(b for n, b in files.items() if n != CATALOG) + meta,
            "per_backend_without_catalog": per_backend, "manifest_bytes": meta}


def run(full: Path, compact: Path, iters: int, warmup: int) -> dict[str, Any]:
    spec = bench_spec(full)
    out: dict[str, Any] = {"spec": {**spec, "candidates": len(spec["candidates"])}, "iters": iters, "runs": {}}
    for label, bundle in (("full", full), ("compact", compact)):
        man = read_manifest(bundle)
        out.setdefault("manifests", {})[label] = man
        out.setdefault("sizes", {})[label] = sizes(bundle, man)
        for backend in man["targets"]:
            cmd = [sys.executable, "-m", "client.runtime_bench", "--bundle", str(bundle), "--backend", backend,
                   "--block-torch", "--spec", json.dumps(spec), "--iters", str(iters), "--warmup", str(warmup)]
            proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, env=_one_thread_env())
            if proc.returncode != 0:
                raise RuntimeError(f"{label}/{backend} benchmark process failed:\n{proc.stderr[-3000:]}")
            out["runs"][f"{label}/{backend}"] = json.loads(proc.stdout.strip().splitlines()[-1])
    out["ndcg"] = ndcg_delta(out["manifests"]["full"], out["manifests"]["compact"])
    out.pop("manifests")
    return out


def ndcg_delta(full: dict[str, Any], compact: dict[str, Any]) -> dict[str, Any]:
    """NDCG@10 of the compact pipeline minus the full one: exported, per backend (same held-out slates when
    both were exported alike), and torch fp32 from the compact export's own comparison."""
    res: dict[str, Any] = {"query_encoder_cost": compact.get("query_encoder_cost")}
    for backend, r in compact.get("pipeline_fidelity", {}).items():
        f = full.get("pipeline_fidelity", {}).get(backend)
        if f is None or f["slates"] != r["slates"] or f["ndcg@10_torch"] == 0:
            continue
        res[backend] = {"ndcg@10_full": f["ndcg@10_exported"], "ndcg@10_compact": r["ndcg@10_exported"],
                        "delta": r["ndcg@10_exported"] - f["ndcg@10_exported"], "slates": r["slates"]}
    return res


def stats(x: list[float]) -> dict[str, float]:
    a = np.asarray(x)
    return {"min": float(a.min()), "p50": float(np.median(a)), "p95": float(np.percentile(a, 95)),
            "max": float(a.max())}


def print_results(res: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    con = Console(width=130)
    t = Table(title=f"1-thread latency, ms ({res['iters']} calls each; query {res['spec']['query']!r}, "
                    f"{res['spec']['candidates']} candidates)")
    for col in ("stage", "bundle/backend", "query encoder", "min", "p50", "p95", "max"):
        t.add_column(col, justify="right" if col in ("min", "p50", "p95", "max") else "left")
    for key, label in STAGES:
        for run_name, r in res["runs"].items():
            s = stats(r[key])
            enc = "static (numpy)" if run_name.startswith("compact") else f"MiniLM ({r['backend']})"
            run_name = run_name.replace("[", "(")
            t.add_row(label, run_name, enc, *(f"{s[k]:.4f}" for k in ("min", "p50", "p95", "max")))
    con.print(t)
    z = Table(title="bundle bytes without the catalog")
    for col in ("bundle", "whole bundle (KiB)", "onnx device set (KiB)", "tflite device set (KiB)"):
        z.add_column(col, justify="left" if col == "bundle" else "right")
    for label, s in res["sizes"].items():
        per = s["per_backend_without_catalog"]
        z.add_row(label, f"{s['without_catalog'] / 1024:,.0f}", *(f"{per[b] / 1024:,.0f}" if b in per else "-"
                                                                  for b in ("onnx", "tflite")))
    con.print(z)
    n = res["ndcg"]
    cost = n.get("query_encoder_cost") or {}
    if cost:
        con.print(f"NDCG@10 on {cost['slates']} held-out slates, torch fp32: static "
                  f"{cost['ndcg@10_static_torch']:.4f} vs MiniLM {cost['ndcg@10_text_encoder_torch']:.4f} "
                  f"(delta {cost['ndcg@10_delta_torch']:+.4f})")
    for backend in ("onnx", "tflite"):
        if backend in n:
            d = n[backend]
            con.print(f"NDCG@10 exported pipelines ({backend}), {d['slates']} slates: compact "
                      f"{d['ndcg@10_compact']:.4f} vs full {d['ndcg@10_full']:.4f} (delta {d['delta']:+.4f})")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="Compact vs full bundle (see module docstring).")
    p.add_argument("--full", required=True, help="a bundle with the MiniLM query encoder")
    p.add_argument("--compact", required=True, help="a bundle exported with --profile compact")
    p.add_argument("--iters", type=int, default=500)
    p.add_argument("--warmup", type=int, default=50)
    p.add_argument("--out", help="also write the results as JSON here")
    a = p.parse_args(argv)
    for b in (a.full, a.compact):
        if not Path(b).is_dir():
            print(f"no bundle at {b}: export it first (see the module docstring)", file=sys.stderr)
            return 1
    res = run(Path(a.full), Path(a.compact), a.iters, a.warmup)
    for r in res["runs"].values():
        r["summary"] = {k: stats(r[k]) for k, _ in (*STAGES, ("head_ms", ""))}
    print_results(res)
    if a.out:
        Path(a.out).write_text(json.dumps(res, indent=1), encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
