"""``fedrank export``, ``fedrank rerank`` and ``fedrank bench ondevice``: registered by :func:`add_commands`.

Handlers parse arguments, call the library and print for people; they return an exit code (0 ok, 1 an exported
file failed its validation, 2 unusable input or bad usage: one line on stderr naming the file/field).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from shared_model.console import EXIT_BAD_INPUT, one_line


def add_commands(subparsers: Any) -> None:
    """Register ``export``, ``rerank`` and ``bench`` on an ``argparse`` ``add_subparsers()`` object."""
    e = subparsers.add_parser("export", help="export a trained head + encoders + catalog as an on-device bundle",
                              description="Export, validate against torch fp32, and atomically write a bundle.")
    e.add_argument("--checkpoint", required=True, help="head checkpoint (fedrank train / simulate)")
    e.add_argument("--out", required=True, help="bundle directory to create")
    e.add_argument("--targets", default="onnx,tflite", help="comma-separated: onnx, tflite (default both)")
    e.add_argument("--quantize", default="int8", choices=["int8", "fp16", "none"],
                   help="text encoder and head precision; the image encoder goes only as far as fidelity allows")
    e.add_argument("--catalog", help="data folder or catalog file (CSV/JSONL) whose items the bundle ships")
    e.add_argument("--data", help="data folder for the held-out fidelity check (default: the checkpoint's)")
    e.add_argument("--max-slates", type=int, default=2000, help="held-out slates for the pipeline check")
    e.add_argument("--no-image-encoder", action="store_true", help="leave out the image encoder (no photo search)")
    e.add_argument("--overwrite", action="store_true", help="replace an existing bundle (atomically)")
    e.set_defaults(func=cmd_export)

    r = subparsers.add_parser("rerank", help="rerank candidates for a query with a bundle (on-device runtime)",
                              description="Rerank candidate items with an exported bundle; prints id and score.")
    r.add_argument("--bundle", required=True)
    r.add_argument("--query", help="text query")
    r.add_argument("--query-image", help="search by photo: an image file")
    r.add_argument("--candidates", required=True,
                   help="file with one candidate item id per line (optional 2nd column: first-stage score)")
    r.add_argument("--recent", help="file with the shopper's recently clicked item ids, one per line, most recent last")
    r.add_argument("--backend", default="onnx", choices=["onnx", "tflite"])
    r.add_argument("--top", type=int, default=0, help="print only the best N (default all)")
    r.add_argument("--skip-unknown", action="store_true", help="drop candidate ids missing from the bundle")
    r.add_argument("--json", action="store_true", help="print JSON instead of a table")
    r.set_defaults(func=cmd_rerank)

    b = subparsers.add_parser("bench", help="benchmarks (bench ondevice: latency, size and memory of a bundle)",
                              description="Benchmarks. ondevice: 1-thread latency of the exported pipeline "
                                          "(ONNX, TFLite) against torch fp32 eager, bundle sizes, peak memory.")
    b.add_argument("suite", choices=["ondevice"])
    b.add_argument("--bundle", required=True)
    b.add_argument("--checkpoint", help="head checkpoint for the torch baseline (default: the manifest's)")
    b.add_argument("--iters", type=int, default=200)
    b.add_argument("--warmup", type=int, default=20)
    b.add_argument("--backends", default="onnx,tflite,torch")
    b.add_argument("--out", help="also write the results as JSON here")
    b.set_defaults(func=cmd_bench)


# ---------------------------------------------------------------------------------------------- handlers


def cmd_export(args: argparse.Namespace) -> int:
    from export.bundle import ExportOptions, export_from_checkpoint
    from export.errors import ExportError, ExportValidationError

    try:
        opts = ExportOptions(targets=_split(args.targets), quantize=args.quantize, max_slates=args.max_slates,
                             image_encoder=not args.no_image_encoder, overwrite=args.overwrite)
        man = export_from_checkpoint(args.checkpoint, args.out, catalog=args.catalog, data=args.data, options=opts)
    except ExportValidationError as e:
        print(f"fedrank export: error: {one_line(e)}", file=sys.stderr)
        return 1
    except ExportError as e:
        print(f"fedrank export: error: {one_line(e)}", file=sys.stderr)
        return EXIT_BAD_INPUT
    print_manifest(man, args.out)
    return 0


def cmd_rerank(args: argparse.Namespace) -> int:
    from client.runtime import BundleError, Reranker, RerankInputError

    try:
        cands, scores = _read_candidates(args.candidates)
        recent = _read_ids(args.recent, "--recent") if args.recent else None
        rr = Reranker.load(args.bundle, backend=args.backend)
        ranked = rr.rerank(args.query, cands, recent, query_image=args.query_image, retrieval_scores=scores,
                           skip_unknown=args.skip_unknown)
    except (BundleError, RerankInputError) as e:
        print(f"fedrank rerank: error: {one_line(e)}", file=sys.stderr)
        return EXIT_BAD_INPUT
    if args.top > 0:
        ranked = ranked[: args.top]
    if args.json:
        print(json.dumps([{"item_id": i, "score": s} for i, s in ranked]))
        return 0
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"{args.query or args.query_image!s} ({args.backend})")
    for col in ("rank", "item_id", "score"):
        table.add_column(col, justify="right" if col != "item_id" else "left")
    for k, (i, s) in enumerate(ranked, 1):
        table.add_row(str(k), i, f"{s:.4f}")
    Console().print(table)
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    from client.runtime_bundle import BundleError
    from export.bench import run_ondevice

    try:
        run_ondevice(args.bundle, checkpoint=args.checkpoint, iters=args.iters, warmup=args.warmup,
                     backends=_split(args.backends), out=args.out)
    except (BundleError, FileNotFoundError) as e:
        print(f"fedrank bench: error: {one_line(e)}", file=sys.stderr)
        return EXIT_BAD_INPUT
    return 0


# ---------------------------------------------------------------------------------------------- helpers


def print_manifest(man: dict[str, Any], out: str) -> None:
    from rich.console import Console
    from rich.table import Table

    con = Console()
    t = Table(title=f"bundle {out} (format v{man['format_version']}, quantize={man['quantize']})")
    for col in ("file", "precision", "KiB", "fidelity vs torch fp32"):
        t.add_column(col, justify="right" if col == "KiB" else "left")
    for name, rec in man["files"].items():
        t.add_row(name, rec.get("precision", "-"), f"{rec['bytes'] / 1024:.0f}", _fidelity_text(rec))
    con.print(t)
    p = Table(title="pipeline on held-out slates (through the on-device runtime)")
    for col in ("backend", "slates", "NDCG@10 torch", "NDCG@10 exported", "delta", "Kendall tau"):
        p.add_column(col, justify="right")
    for backend, r in man.get("pipeline_fidelity", {}).items():
        p.add_row(backend, str(r["slates"]), f"{r['ndcg@10_torch']:.4f}", f"{r['ndcg@10_exported']:.4f}",
                  f"{r['ndcg@10_delta']:+.5f}", f"{r['kendall_tau_mean']:.4f}")
    con.print(p)


def _fidelity_text(rec: dict[str, Any]) -> str:
    f = rec.get("fidelity", {})
    if "cosine_min" in f:
        text = f"cosine min {f['cosine_min']:.4f}"
        tried = rec.get("precision_search", {})
        failed = [f"{k}: {v.get('cosine_min', float('nan')):.3f}" for k, v in tried.items() if not v.get("passed")]
        return text + (f" (rejected {', '.join(failed)})" if failed else "")
    if "kendall_tau_mean" in f:
        return f"Kendall tau {f['kendall_tau_mean']:.4f}, max |diff| {f['max_abs_diff']:.3g}"
    if "text_cosine_min" in f:
        return ", ".join(f"{k.split('_')[0]} cos min {v:.4f}" for k, v in f.items())
    return ""


def _split(s: str) -> tuple[str, ...]:
    return tuple(x.strip() for x in s.split(",") if x.strip())


def _read_ids(path: str, flag: str) -> list[str]:
    from client.runtime import RerankInputError

    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise RerankInputError(flag, f"cannot read {path}: {e}") from e
    return [ln.split()[0] for ln in lines if ln.strip() and not ln.lstrip().startswith("#")]


def _read_candidates(path: str) -> tuple[list[str], list[float] | None]:
    from client.runtime import RerankInputError

    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise RerankInputError("--candidates", f"cannot read {path}: {e}") from e
    rows = [ln.split() for ln in lines if ln.strip() and not ln.lstrip().startswith("#")]
    ids = [r[0] for r in rows]
    if rows and all(len(r) >= 2 for r in rows):
        try:
            return ids, [float(r[1]) for r in rows]
        except ValueError as e:
            raise RerankInputError("--candidates", f"second column must be a number: {e}") from e
    return ids, None
