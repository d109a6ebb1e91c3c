"""``fedrank export``, ``fedrank rerank`` and ``fedrank bench ondevice``: registered by :func:`add_commands`.

Handlers parse arguments, call the library and print for people; they return an exit code (0 ok, 1 an exported
file failed its validation, 2 unusable input or bad usage: one line on stderr naming the file/field). Every id
file is read by :func:`read_id_file`.
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

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
    e.add_argument("--profile", default="full", choices=["full", "compact"],
                   help="full: MiniLM query encoder + image encoder; compact: a static query encoder distilled from "
                        "MiniLM and no image encoder (text-query reranking only, no search by photo)")
    e.add_argument("--query-encoder", choices=["minilm", "static"],
                   help="override the profile's query encoder (static: int8 token table, numpy on the device)")
    e.add_argument("--static-dim", type=int, default=128, help="width of the static encoder's table (default 128)")
    e.add_argument("--no-catalog", action="store_true",
                   help="ship no catalog.npz: the device reranks candidates whose rows come in the request "
                        "(Reranker.rerank_candidates); validated through such requests")
    e.add_argument("--photo-search", default="auto", choices=["auto", "learnt", "heuristic"],
                   help="search by photo: auto (default) ships a projection learnt from the catalog's photos "
                        "(same category and colour = similar) when the catalog has enough labelled photos, else "
                        "keeps the raw-cosine heuristic and says why in the manifest; learnt: that, or an error; "
                        "heuristic: no projection")
    e.add_argument("--overwrite", action="store_true", help="replace an existing bundle (atomically)")
    e.set_defaults(func=cmd_export)

    r = subparsers.add_parser("rerank", help="rerank candidates for a query with a bundle (on-device runtime)",
                              description="Rerank candidate items with an exported bundle; prints id and score.")
    r.add_argument("--bundle", required=True)
    r.add_argument("--query", help="text query")
    r.add_argument("--query-image", help="search by photo: an image file")
    r.add_argument("--request", help="instead of --candidates: a JSON candidates request (the candidates' int8 "
                                     "rows, as a search API sends them; format: Reranker.rerank_candidates)")
    r.add_argument("--candidates",
                   help="UTF-8 file with one candidate item id per line, in first-stage order (the whole line, "
                        "trimmed: spaces inside an id are kept); optionally a TAB and the first-stage score "
                        "(ID<TAB>SCORE), on every line or on none; blank lines are skipped, a repeated id is left "
                        "out with a warning")
    r.add_argument("--recent", help="UTF-8 file with the shopper's recently clicked item ids, one per line (the "
                                    "whole line, trimmed), most recent last; no score column")
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
    from export.bundle import export_from_checkpoint
    from export.errors import ExportError, ExportValidationError

    try:
        opts = export_options(args)
        man = export_from_checkpoint(args.checkpoint, args.out, catalog=args.catalog, data=args.data, options=opts)
    except ExportValidationError as e:
        print(f"fedrank export: error: {one_line(e)}", file=sys.stderr)
        return 1
    except ExportError as e:
        print(f"fedrank export: error: {one_line(e)}", file=sys.stderr)
        return EXIT_BAD_INPUT
    print_manifest(man, args.out)
    return 0


def export_options(args: argparse.Namespace) -> Any:
    """``ExportOptions`` from ``fedrank export``'s arguments: the profile's settings, then explicit flags."""
    from export.bundle import ExportOptions

    overrides: dict[str, Any] = {"targets": _split(args.targets), "quantize": args.quantize,
                                 "max_slates": args.max_slates, "overwrite": args.overwrite,
                                 "static_dim": args.static_dim, "ship_catalog": not args.no_catalog}
    if args.no_image_encoder:
        overrides["image_encoder"] = False
    if args.photo_search != "auto":
        overrides["photo_search"] = args.photo_search
    if args.query_encoder:
        overrides["query_encoder"] = args.query_encoder
    return ExportOptions.for_profile(args.profile, **overrides)


def cmd_rerank(args: argparse.Namespace) -> int:
    from client.runtime import BundleError, Reranker, RerankInputError

    try:
        if (args.candidates is None) == (args.request is None):
            raise RerankInputError("--candidates", "give --candidates (ids) or --request (a JSON request), one of them")
        recent = read_id_file(args.recent, "--recent") if args.recent else None
        if recent is not None:
            _warn_duplicates("rerank", args.recent, recent.duplicates)
        # the shopper's files first: a missing or malformed one is named before the bundle is loaded
        cands = read_id_file(args.candidates, "--candidates", scores=True) if args.request is None else None
        if cands is not None:
            _warn_duplicates("rerank", args.candidates, cands.duplicates)
        rr = Reranker.load(args.bundle, backend=args.backend)
        if cands is None:
            ranked = rr.rerank_candidates(args.query, _read_request(args.request),
                                          None if recent is None else recent.ids, query_image=args.query_image)
        else:
            ranked = rr.rerank(args.query, cands.ids, None if recent is None else recent.ids,
                               query_image=args.query_image, retrieval_scores=cands.scores,
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
    from rich.text import Text

    table = Table(title=Text(f"{args.query or args.query_image!s} ({args.backend})"))  # Text: no rich markup
    for col in ("rank", "item_id", "score"):
        table.add_column(col, justify="right" if col != "item_id" else "left")
    for k, (i, s) in enumerate(ranked, 1):
        table.add_row(str(k), Text(i), f"{s:.4f}")  # an id is data: "[red] shoe" prints as it is
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
    photo = man.get("photo_search")
    if photo and photo["mode"] == "learnt":
        tr, fid = photo["training"], photo.get("fidelity", {})
        con.print(f"search by photo: learnt projection {photo['input_dim']} -> {photo['dim']} from "
                  f"{tr['photos_used']} catalog photos; held-out mAP {tr['held_out_map_learnt']:.4f} vs "
                  f"{tr['held_out_map_raw_cosine']:.4f} raw cosine; runtime vs torch fp32: Kendall tau "
                  f"{fid.get('kendall_tau_mean', float('nan')):.4f}")
    elif photo:
        con.print(f"search by photo: heuristic (raw cosine): {photo['reason']}")
    cost = man.get("query_encoder_cost")
    if cost:
        exported = ", ".join(f"{b} {d:+.4f}" for b, d in cost["ndcg@10_delta_exported"].items())
        con.print(f"static query encoder vs the full text encoder on the same {cost['slates']} held-out slates: "
                  f"NDCG@10 {cost['ndcg@10_static_torch']:.4f} vs {cost['ndcg@10_text_encoder_torch']:.4f} (torch, "
                  f"delta {cost['ndcg@10_delta_torch']:+.4f}; exported pipelines: {exported})")


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


def _read_request(path: str) -> Any:
    """A JSON candidates request (``client.runtime_bundle.request_to_json`` writes the wire form)."""
    from client.runtime_bundle import RerankInputError

    text = _read_utf8(path, "--request", lambda line, field, problem: RerankInputError(
        "--request", f"{path}:{line}: {problem}"))
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise RerankInputError("--request", f"{path}:{e.lineno}: not valid JSON ({e.msg})") from e


def _split(s: str) -> tuple[str, ...]:
    return tuple(x.strip() for x in s.split(",") if x.strip())


# ---------------------------------------------------------------------------------------------- id files


class Duplicate(NamedTuple):
    """A repeated id, left out: its ``line`` and the ``first_line`` it was kept from."""

    item_id: str
    line: int
    first_line: int


@dataclass(frozen=True)
class IdList:
    """An id file as read: ``ids`` in file order, each once; their first-stage ``scores`` (``None`` when the file
    has no score column); the ``duplicates`` left out."""

    ids: list[str]
    scores: list[float] | None
    duplicates: list[Duplicate]


def read_id_file(path: str | os.PathLike[str], flag: str, scores: bool = False) -> IdList:
    """Read an id file (``--candidates``, ``--recent``): ids are data, not words.

    UTF-8 (a leading BOM is dropped), LF or CRLF line ends, one id per line: the whole line with the whitespace
    around it trimmed (``red shoe 1`` is one id); blank lines are skipped; a repeated id is left out, the first
    occurrence wins, and it is listed in ``duplicates``. With ``scores``, a line may end in a TAB and a
    first-stage score (``red shoe 1<TAB>0.83``): on every line or on none; a line without a TAB is all id.
    Without ``scores`` a TAB is an error. Errors are ``RerankInputError(flag, "FILE:LINE: field 'F': ...")``.
    """
    from client.runtime_bundle import RerankInputError

    def bad(line: int, field: str, problem: str) -> RerankInputError:
        return RerankInputError(flag, f"{path}:{line}: field {field!r}: {problem}")

    text = _read_utf8(path, flag, bad)
    ids: list[str] = []
    values: list[float] = []
    duplicates: list[Duplicate] = []
    first: dict[str, int] = {}
    scored = unscored = 0  # the first line with / without a score
    for n, raw in enumerate(text.split("\n"), 1):
        item_id, tab, value = raw.strip().partition("\t")
        item_id = item_id.strip()
        if not item_id:
            continue
        if tab and not scores:
            raise bad(n, "item_id", f"holds a TAB ({raw.strip()!r}): this file takes one id per line, no score")
        score = _parse_score(value.strip(), functools.partial(bad, n, "score")) if tab else 0.0
        if tab:
            scored = scored or n
        else:
            unscored = unscored or n
        if scored and unscored:  # this line is the first to differ from an earlier one
            problem = f"unexpected (line {unscored} has none)" if tab else f"missing (line {scored} has one)"
            raise bad(n, "score", f"{problem}: give a first-stage score on every line or on none")
        if item_id in first:
            duplicates.append(Duplicate(item_id, n, first[item_id]))
            continue
        first[item_id] = n
        ids.append(item_id)
        if tab:
            values.append(score)
    return IdList(ids, values if scored else None, duplicates)


def _read_utf8(path: str | os.PathLike[str], flag: str, bad: Callable[[int, str, str], Exception]) -> str:
    from client.runtime_bundle import RerankInputError

    try:
        data = Path(path).read_bytes().removeprefix(b"\xef\xbb\xbf")
    except OSError as e:
        raise RerankInputError(flag, f"cannot read {path}: {e}") from e
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise bad(data[: e.start].count(b"\n") + 1, "(encoding)", f"not valid UTF-8 (byte {e.start})") from e


def _parse_score(value: str, bad: Callable[[str], Exception]) -> float:
    if "\t" in value:
        raise bad(f"a third column ({value!r}): expected ID<TAB>SCORE")
    try:
        score = float(value)
    except ValueError as e:
        raise bad(f"not a number: {value!r}") from e
    if not math.isfinite(score):
        raise bad(f"not a finite number: {value!r}")
    return score


def _warn_duplicates(command: str, path: str, duplicates: list[Duplicate], shown: int = 10) -> None:
    for d in duplicates[:shown]:
        print(f"fedrank {command}: warning: {path}:{d.line}: duplicate id {d.item_id!r} (first on line "
              f"{d.first_line}); left out", file=sys.stderr)
    if len(duplicates) > shown:
        print(f"fedrank {command}: warning: {path}: {len(duplicates) - shown} more duplicate ids left out",
              file=sys.stderr)
