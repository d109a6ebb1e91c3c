"""``fedrank import-logs | export-logs``: a shop's search logs in and out of a data folder (registered by
:func:`add_commands`). The format is documented in :mod:`shared_model.logs_io`."""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from shared_model.console import add_command


def cmd_import_logs(args: argparse.Namespace) -> int:
    from shared_model.logs_io import import_logs

    meta = import_logs(args.catalog, args.logs, args.out, skip_bad=args.skip_bad)
    rep = meta["load_report"]["logs"]
    print(f"data folder {args.out}: {json.dumps(meta['counts'])}")
    print(f"log rows: {rep['loaded']} of {rep['rows']} imported, {rep['skipped']} skipped"
          + ("" if meta["has_grades"] else "; no grades: fedrank evaluate reports click metrics"))
    for r in rep["skipped_rows"][:10]:
        print(f"  skipped line {r['line']}: field '{r['field']}': {r['reason']}")
    return 0


def cmd_export_logs(args: argparse.Namespace) -> int:
    from shared_model.logs_io import export_logs

    n = export_logs(args.data, args.out, evaluation=not args.shop_fields_only)
    print(f"{n} lists from {Path(args.data) / 'sessions.npz'} -> {args.out}")
    return 0


def add_commands(subparsers: Any) -> None:
    """Register ``import-logs`` and ``export-logs`` on an ``argparse`` ``add_subparsers()`` object."""

    def add(name: str, fn: Callable[[argparse.Namespace], int], help_: str) -> argparse.ArgumentParser:
        return add_command(subparsers, name, fn, help_)

    i = add("import-logs", cmd_import_logs, "turn a catalog and a search log (CSV/TSV/JSONL/Parquet, fedrank's "
                                            "log format v1) into a data folder for train/evaluate/simulate")
    i.add_argument("--catalog", required=True, help="the catalog (generic CSV/TSV/JSONL, or a fashion styles.csv)")
    i.add_argument("--logs", required=True, help="one row per result list shown (see shared_model/logs_io.py)")
    i.add_argument("--out", required=True, help="the data folder to write (replaced only if an earlier import)")
    i.add_argument("--skip-bad", action="store_true", help="skip and count malformed catalog and log rows")

    e = add("export-logs", cmd_export_logs, "write a data folder's sessions in the search-log format")
    e.add_argument("--data", required=True, help="data folder (fedrank generate / import-logs)")
    e.add_argument("--out", required=True, help="log file: .csv, .tsv, .jsonl or .parquet")
    e.add_argument("--shop-fields-only", action="store_true",
                   help="leave out the simulator's fields (randomized, ranks, scores, grades, utility)")
