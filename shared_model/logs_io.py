"""Search-log import and export: fedrank's search-log format, version 1.

A shop's own search logs become a data folder that ``fedrank train | baselines | evaluate | simulate | deploy``
read like a simulated marketplace (:func:`import_logs`); a data folder's sessions can be written in the same
format (:func:`export_logs`), so the format is tested round-trip against the simulator.

The format (version 1)
----------------------
One row per result list shown to a shopper, as CSV (``.csv``; ``.tsv``/``.tab`` tab-separated; header row
required), JSON Lines (``.jsonl``, ``.ndjson``, ...; one object per line) or Parquet (``.parquet``/``.pq``, read
and written with pyarrow). Column names are matched case-insensitively. *Lists* are JSON lists in JSONL, Parquet
list columns, and in CSV either a JSON list (``["p1", "p2"]``, what the writer writes) or ``;``-separated values
(``p1;p2``); an empty cell is an empty list.

==================  ========  =====================================================================================
column              required  meaning
==================  ========  =====================================================================================
``user_id``         yes       the shopper (text); one simulated device per user id (``natural`` partition)
``session_id``      yes       the shopper's session (text); a session may show several lists (pages, refinements)
``timestamp``       yes       when the list was shown: an integer (any unit, e.g. epoch seconds or milliseconds)
                              or ISO 8601 text (``2026-12-01T10:15:00Z``; no zone = UTC), stored as epoch
                              milliseconds; one file uses one kind. Never decreasing within a session (file order)
``query``           yes       the query text; may be empty (a browse or category list)
``items``           yes       item ids in display order (top first); non-empty, no id twice, all in the catalog
``clicks``          one of    clicked item ids (each one shown in this list; a repeated click counts once) ...
``click_positions``  these    ... or clicked 1-based display positions (1 = top); give one of the two per row
``purchases``       no        purchased item ids (each one shown in this list)
``prices``          no        the price shown for each item (same length as ``items``; empty/null = not known);
                              fills prices the catalog lacks (median shown price) and is kept in ``log_extra.npz``
``resorted``        no        true when the shopper changed the sort order or filters: the list is kept for
                              training but left out of position-bias (propensity) estimation
``device``          no        free text (``ios``, ``android``, ``web``, ...), kept in ``log_extra.npz``
``log_version``     no        the format version; when given it must be ``1``
==================  ========  =====================================================================================

Booleans are ``true/false``, ``1/0``, ``yes/no`` (empty = false). Other columns are ignored.

Optional columns the simulator writes (a real log rarely has them; all default to "not known"):

* ``randomized`` (boolean) -- the list was shown in a uniformly random order (a randomization experiment);
  propensities are estimated on these lists. A ``resorted`` list never counts as randomized.
* ``ranks`` -- the first-stage (production) rank of each item, 0 = first; default: the display position.
* ``scores`` -- the first-stage retrieval score of each item; default: unknown (the head's feature is 0).
* ``grades`` (numbers >= 0) and ``utility`` (personal utility) -- **evaluation-only** ground truth per item
  (the simulator's, or human judgments of shown items); training never reads them. Without ``grades`` the graded
  metrics (NDCG@10, MRR, Recall@10) are undefined and ``fedrank evaluate`` reports the click metrics of
  :mod:`simulations.log_eval`.

Bad rows -- a missing required field, an unparseable value, an unknown item id, a click or purchase on an item
not shown, an item twice in one list, an empty list, a timestamp going backwards within a session, an
unsupported ``log_version`` -- raise :class:`shared_model.catalog_rows.CatalogError` naming the file, line (the
1-based row number for Parquet) and field, or are skipped and counted with ``skip_bad=True``.

The data folder :func:`import_logs` writes
------------------------------------------
``catalog.jsonl`` (the catalog, normalized; image paths point at the original files), ``sessions.npz`` (a
:class:`shared_model.schema.SessionLog`: one session per list, in file order; users numbered in the order of
their sorted ids -- numerically when every id is an integer), ``log_extra.npz`` (per list: the external
``user_id`` and ``session_id``, ``resorted``, ``device``; per impression: ``price_shown``), and ``meta.json``
(``generator``, ``log_format_version``, counts, which optional fields the log had, the load report). It is
built in a staging folder beside ``out`` and swapped into place (:func:`shared_model.outdir.staged_dir`): nothing
half-written is ever left, and an existing ``out`` is replaced only when it is empty or an earlier import.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import math
import os
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

from shared_model.catalog_io import load_catalog_with_report, save_catalog_jsonl
from shared_model.catalog_rows import (
    CSV_EXT,
    CatalogError,
    LoadReport,
    RowError,
    SkippedRow,
    as_text,
    file_kind,
    header_names,
    iter_rows,
)
from shared_model.outdir import staged_dir
from shared_model.schema import Catalog, SessionLog, atomic_write

__all__ = [
    "EXTRA_FILE",
    "LOG_FORMAT_VERSION",
    "LOG_GENERATOR",
    "LogExtra",
    "ParsedLog",
    "export_logs",
    "import_logs",
    "load_log_extra",
    "log_rows",
    "read_logs",
    "write_logs",
]

log = logging.getLogger(__name__)

LOG_FORMAT_VERSION = 1
LOG_GENERATOR = "fedrank.shared_model.logs_io"
EXTRA_FILE = "log_extra.npz"
PARQUET_EXT = {".parquet", ".pq"}
REQUIRED = ("user_id", "session_id", "timestamp", "query", "items")
LIST_FIELDS = ("items", "clicks", "click_positions", "purchases", "prices", "ranks", "scores", "grades", "utility")
OPTIONAL_PER_ITEM = ("prices", "ranks", "scores", "grades", "utility")
_TRUE = {"true", "1", "yes", "y", "t"}
_FALSE = {"false", "0", "no", "n", "f", ""}
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


def _kind(path: Path) -> str:
    return file_kind(path, {"parquet": PARQUET_EXT})


# ------------------------------------------------------------------------------------------------ fields
def _as_list(value: Any, name: str) -> list[Any]:
    if value is None:
        return []
    if isinstance(value, list | tuple):
        return list(value)
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, str):
        text = value.strip()
        if not text:
            return []
        if text.startswith("["):
            try:
                out = json.loads(text)
            except json.JSONDecodeError as e:
                raise RowError(name, f"looks like a JSON list but does not parse ({e.msg})") from None
            if not isinstance(out, list):
                raise RowError(name, "expected a list")
            return out
        return [v.strip() for v in text.split(";")]
    raise RowError(name, f"expected a list, got {type(value).__name__}")


def _ids(value: Any, name: str) -> list[str]:
    out = []
    for v in _as_list(value, name):
        if isinstance(v, bool) or not isinstance(v, str | int):
            raise RowError(name, f"item ids must be text, got {v!r}")
        s = str(v).strip()
        if not s:
            raise RowError(name, "empty item id in the list")
        out.append(s)
    return out


def _numbers(value: Any, name: str, n: int, minimum: float | None = None, missing_ok: bool = False) -> list[float]:
    raw = _as_list(value, name)
    if len(raw) != n:
        raise RowError(name, f"{len(raw)} values for {n} items (one per item shown)")
    out = []
    for v in raw:
        if v is None or (isinstance(v, str) and v.strip().lower() in ("", "null", "nan")):
            if not missing_ok:
                raise RowError(name, "missing value in the list")
            out.append(math.nan)
            continue
        if isinstance(v, bool):
            raise RowError(name, f"not a number: {v!r}")
        try:
            x = float(v)
        except (TypeError, ValueError):
            raise RowError(name, f"not a number: {v!r}") from None
        if not math.isfinite(x):
            raise RowError(name, f"not a finite number: {v!r}")
        if minimum is not None and x < minimum:
            raise RowError(name, f"must be >= {minimum:g}, got {x:g}")
        out.append(x)
    return out


def _ints(value: Any, name: str) -> list[int]:
    out = []
    for v in _as_list(value, name):
        try:
            x = float(v) if not isinstance(v, bool) else math.nan
        except (TypeError, ValueError):
            x = math.nan
        if not math.isfinite(x) or x != round(x):
            raise RowError(name, f"not an integer: {v!r}")
        out.append(int(x))
    return out


def _bool(value: Any, name: str) -> bool:
    if value is None:
        return False
    if isinstance(value, bool):
        return value
    if isinstance(value, int | float) and value in (0, 1):
        return bool(value)
    text = str(value).strip().lower()
    if text in _TRUE:
        return True
    if text in _FALSE:
        return False
    raise RowError(name, f"not a boolean: {value!r} (true/false, 1/0, yes/no)")


def _timestamp(value: Any) -> tuple[int, str]:
    """``(value, kind)``: an integer as given (``"number"``) or ISO 8601 text as epoch milliseconds (``"iso"``)."""
    if isinstance(value, datetime):  # a Parquet timestamp column
        dt = value if value.tzinfo else value.replace(tzinfo=UTC)
        return (dt - _EPOCH) // _MS, "iso"
    if value is None or isinstance(value, bool) or (isinstance(value, str) and not value.strip()):
        raise RowError("timestamp", "required field is empty" if value is not None else "required field missing")
    if isinstance(value, int):
        return value, "number"
    text = str(value).strip()
    try:
        x = float(text)
    except ValueError:
        try:
            dt = datetime.fromisoformat(text)
        except ValueError:
            raise RowError("timestamp", f"neither an integer nor ISO 8601 date-time: {text!r}") from None
        dt = dt if dt.tzinfo else dt.replace(tzinfo=UTC)
        return (dt - _EPOCH) // _MS, "iso"
    if not math.isfinite(x) or x != round(x):
        raise RowError("timestamp", f"not an integer timestamp: {text!r} (give integer units, e.g. milliseconds, "
                                    "or ISO 8601)")
    return int(x), "number"


_MS = datetime(1970, 1, 1, 0, 0, 0, 1000, tzinfo=UTC) - _EPOCH  # one millisecond


@dataclass
class _Row:
    user_id: str
    session_id: str
    timestamp: int
    timestamp_kind: str  # "number" or "iso"
    query: str
    items: list[int]  # catalog rows, display order
    clicks: list[int]  # 0-based display positions
    purchases: list[int]
    prices: list[float] | None
    resorted: bool
    device: str
    randomized: bool
    ranks: list[int] | None
    scores: list[float] | None
    grades: list[float] | None
    utility: list[float] | None


def _positions_of(ids: list[str], where: dict[str, int], name: str) -> list[int]:
    out: set[int] = set()
    for i in ids:
        if i not in where:
            raise RowError(name, f"{name[:-1] if name.endswith('s') else name} on item {i!r}, which is not shown "
                                 "in this list")
        out.add(where[i])
    return sorted(out)


def _parse_row(raw: dict[str, Any], catalog: Catalog) -> _Row:
    row = {str(k).strip().lower(): v for k, v in raw.items()}
    version = row.get("log_version")
    if version not in (None, "") and str(version).strip() != str(LOG_FORMAT_VERSION):
        raise RowError("log_version", f"unsupported log format version {version!r}: this fedrank reads version "
                                      f"{LOG_FORMAT_VERSION}")
    for r in REQUIRED:
        if r not in row:
            raise RowError(r, "required field missing")
    user_id = as_text(row["user_id"], "user_id")
    session_id = as_text(row["session_id"], "session_id")
    for name, v in (("user_id", user_id), ("session_id", session_id)):
        if not v:
            raise RowError(name, "required field is empty")
    ts, ts_kind = _timestamp(row["timestamp"])
    query = as_text(row["query"], "query")
    ids = _ids(row["items"], "items")
    if not ids:
        raise RowError("items", "empty list: a row is a list that was shown")
    where: dict[str, int] = {}
    rows = []
    for k, item_id in enumerate(ids):
        if item_id in where:
            raise RowError("items", f"item {item_id!r} shown twice in one list (positions {where[item_id] + 1} "
                                    f"and {k + 1})")
        where[item_id] = k
        try:
            rows.append(catalog.row(item_id))
        except KeyError:
            raise RowError("items", f"unknown item_id {item_id!r} (not in {catalog.source or 'the catalog'})") from None
    has_ids = row.get("clicks") not in (None, "", [])
    has_pos = row.get("click_positions") not in (None, "", [])
    if "clicks" not in row and "click_positions" not in row:
        raise RowError("clicks", "required field missing (clicks or click_positions)")
    if has_ids and has_pos:
        raise RowError("click_positions", "give clicks or click_positions, not both")
    if has_pos:
        pos = _ints(row["click_positions"], "click_positions")
        bad = [p for p in pos if not 1 <= p <= len(ids)]
        if bad:
            raise RowError("click_positions", f"position {bad[0]} outside 1..{len(ids)} (1-based, {len(ids)} items "
                                              "shown)")
        clicks = sorted({p - 1 for p in pos})
    else:
        clicks = _positions_of(_ids(row.get("clicks"), "clicks"), where, "clicks")
    purchases = _positions_of(_ids(row.get("purchases"), "purchases"), where, "purchases")
    n = len(ids)

    def per_item(name: str, minimum: float | None = None, missing_ok: bool = False) -> list[float] | None:
        v = row.get(name)
        if v is None or (isinstance(v, str) and not v.strip()):
            return None
        return _numbers(v, name, n, minimum, missing_ok)

    ranks_f = per_item("ranks", minimum=0)
    if ranks_f is not None and any(r != round(r) or r > 32767 for r in ranks_f):
        raise RowError("ranks", "ranks must be integers in 0..32767")
    resorted = _bool(row.get("resorted"), "resorted")
    return _Row(
        user_id=user_id, session_id=session_id, timestamp=ts, timestamp_kind=ts_kind, query=query, items=rows, clicks=clicks,
        purchases=purchases, prices=per_item("prices", minimum=0, missing_ok=True), resorted=resorted,
        device=as_text(row.get("device"), "device"), randomized=_bool(row.get("randomized"), "randomized")
        and not resorted, ranks=None if ranks_f is None else [int(r) for r in ranks_f],
        scores=per_item("scores"), grades=per_item("grades", minimum=0), utility=per_item("utility"),
    )


# ------------------------------------------------------------------------------------------------ reading
def _iter_parquet(path: Path) -> Iterator[tuple[int, dict[str, Any] | RowError]]:
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(path)
    except FileNotFoundError:
        raise CatalogError(path, None, "(file)", "file not found") from None
    except Exception as e:  # noqa: BLE001 -- ArrowInvalid, OSError...: not a Parquet file
        raise CatalogError(path, None, "(file)", f"not a readable Parquet file ({e})") from None
    meta = pf.schema_arrow.metadata or {}
    version = meta.get(b"fedrank.log_version")
    if version is not None and version.decode() != str(LOG_FORMAT_VERSION):
        raise CatalogError(path, None, "log_version", f"unsupported log format version {version.decode()!r}: this "
                                                      f"fedrank reads version {LOG_FORMAT_VERSION}")
    _check_columns(path, {n.lower() for n in pf.schema_arrow.names})
    line = 0
    for batch in pf.iter_batches(batch_size=8192):
        for rec in batch.to_pylist():
            line += 1
            yield line, rec


def _check_columns(path: Path, names: set[str]) -> None:
    for r in REQUIRED:
        if r not in names:
            raise CatalogError(path, 1, r, f"required column missing from header (found {sorted(names)})")
    if not names & {"clicks", "click_positions"}:
        raise CatalogError(path, 1, "clicks", f"required column missing from header: clicks or click_positions "
                                              f"(found {sorted(names)})")


def _rows(path: Path) -> Iterator[tuple[int, dict[str, Any] | RowError]]:
    kind = _kind(path)
    if kind == "parquet":
        yield from _iter_parquet(path)
        return
    if kind == "csv":
        if not path.is_file():
            raise CatalogError(path, None, "(file)", "file not found")
        _check_columns(path, header_names(path))
    yield from iter_rows(path, kind)


@dataclass
class ParsedLog:
    """A log read by :func:`read_logs`: the sessions and what the :class:`SessionLog` has no place for."""

    sessions: SessionLog
    extra: LogExtra
    fields: dict[str, bool]  # which optional fields the log had (on any row)
    report: LoadReport


@dataclass
class LogExtra:
    """Per list: external ``user_ids``/``session_ids``, ``resorted``, ``device``; per impression ``price_shown``."""

    user_ids: np.ndarray  # str [N]
    session_ids: np.ndarray  # str [N]
    resorted: np.ndarray  # bool [N]
    device: np.ndarray  # str [N]
    price_shown: np.ndarray  # float32 [M], NaN = not known

    def save(self, path: Path) -> None:
        arrays: dict[str, Any] = {k: np.asarray(v) for k, v in asdict(self).items()}
        arrays["log_format_version"] = np.array(LOG_FORMAT_VERSION)
        atomic_write(path, lambda f: np.savez_compressed(f, **arrays))


def load_log_extra(data_dir: str | os.PathLike[str]) -> LogExtra | None:
    """The ``log_extra.npz`` of an imported data folder, or None (a simulated marketplace has none)."""
    path = Path(data_dir) / EXTRA_FILE
    if not path.is_file():
        return None
    with np.load(path, allow_pickle=False) as z:
        return LogExtra(**{k: z[k] for k in LogExtra.__dataclass_fields__})


def _user_order(ids: list[str]) -> dict[str, int]:
    uniq = sorted(set(ids))
    if all(u.isdigit() for u in uniq):
        uniq.sort(key=int)
    return {u: i for i, u in enumerate(uniq)}


def read_logs(path: str | os.PathLike[str], catalog: Catalog, skip_bad: bool = False) -> ParsedLog:
    """Read a search log in the format of this module's docstring against ``catalog``.

    Raises
    ------
    CatalogError
        Naming the file, line and field of the first bad row (unless ``skip_bad``), or the file itself
        (missing, unknown extension, missing column, no valid row).
    """
    p = Path(path)
    report = LoadReport(path=str(p))
    parsed: list[_Row] = []
    last: dict[tuple[str, str], tuple[int, int]] = {}
    ts_kind: tuple[str, int] | None = None
    seen_fields = dict.fromkeys((*OPTIONAL_PER_ITEM, "randomized", "resorted", "device", "purchases"), False)
    for line, raw in _rows(p):
        report.rows += 1
        try:
            if isinstance(raw, RowError):
                raise raw
            r = _parse_row(raw, catalog)
            kind = r.timestamp_kind
            if ts_kind is None:
                ts_kind = (kind, line)
            elif kind != ts_kind[0]:
                raise RowError("timestamp", f"{'ISO 8601' if kind == 'iso' else 'a number'} where line {ts_kind[1]} "
                                            f"has {'ISO 8601' if ts_kind[0] == 'iso' else 'a number'}: one file uses one "
                                            "kind")
            key = (r.user_id, r.session_id)
            if key in last and r.timestamp < last[key][0]:
                raise RowError("timestamp", f"goes backwards within session {r.session_id!r} of user {r.user_id!r}: "
                                            f"{r.timestamp} after {last[key][0]} on line {last[key][1]}")
        except RowError as e:
            if not skip_bad:
                raise CatalogError(p, line, e.field, e.reason) from None
            report.skipped.append(SkippedRow(line, e.field, e.reason))
            continue
        last[key] = (r.timestamp, line)
        parsed.append(r)
        for name in OPTIONAL_PER_ITEM:
            seen_fields[name] |= getattr(r, name) is not None
        seen_fields["randomized"] |= r.randomized
        seen_fields["resorted"] |= r.resorted
        seen_fields["device"] |= bool(r.device)
        seen_fields["purchases"] |= bool(r.purchases)
    report.loaded = len(parsed)
    if not parsed:
        raise CatalogError(p, None, "(file)", f"no valid rows ({report.num_skipped} skipped)")
    if report.skipped:
        log.warning("%s", report.summary())
    return ParsedLog(_session_log(parsed), _extra(parsed), seen_fields, report)


def _session_log(rows: list[_Row]) -> SessionLog:
    users = _user_order([r.user_id for r in rows])
    queries: dict[str, int] = {}
    lens = np.array([len(r.items) for r in rows], np.int64)
    offsets = np.zeros(len(rows) + 1, np.int64)
    np.cumsum(lens, out=offsets[1:])
    m = int(offsets[-1])
    clicks = np.zeros(m, np.uint8)
    purchases = np.zeros(m, np.uint8)
    for r, o in zip(rows, offsets[:-1].tolist(), strict=True):
        clicks[[o + k for k in r.clicks]] = 1
        purchases[[o + k for k in r.purchases]] = 1

    def flat(name: str, dtype: type, default: Any) -> np.ndarray:
        parts = [np.asarray(getattr(r, name) if getattr(r, name) is not None else default(len(r.items)), np.float64)
                 for r in rows]
        return np.concatenate(parts).astype(dtype)

    return SessionLog(
        user=np.array([users[r.user_id] for r in rows], np.int32),
        query=np.array([queries.setdefault(r.query, len(queries)) for r in rows], np.int32),
        randomized=np.array([r.randomized for r in rows], bool),
        timestamp=np.array([r.timestamp for r in rows], np.int64),
        offsets=offsets,
        items=np.concatenate([np.asarray(r.items, np.int64) for r in rows]).astype(np.int32),
        clicks=clicks, purchases=purchases,
        prod_rank=flat("ranks", np.int16, np.arange),
        retrieval_score=flat("scores", np.float32, np.zeros),
        grades=flat("grades", np.float32, np.zeros),
        utility=flat("utility", np.float32, np.zeros),
        queries=list(queries),
    )


def _extra(rows: list[_Row]) -> LogExtra:
    return LogExtra(
        user_ids=np.array([r.user_id for r in rows], dtype=str),
        session_ids=np.array([r.session_id for r in rows], dtype=str),
        resorted=np.array([r.resorted for r in rows], bool),
        device=np.array([r.device for r in rows], dtype=str),
        price_shown=np.concatenate([np.asarray(r.prices if r.prices is not None else np.full(len(r.items), np.nan),
                                               np.float32) for r in rows]),
    )


# ------------------------------------------------------------------------------------------------ writing
def _f32(values: np.ndarray) -> list[float | None]:
    """float32 values as the shortest decimals that read back to the same float32 (NaN -> None)."""
    return [None if math.isnan(v) else float(np.format_float_positional(np.float32(v), unique=True, trim="0"))
            for v in values.tolist()]


def log_rows(
    sessions: SessionLog, item_ids: list[str], extra: LogExtra | None = None, evaluation: bool = True,
) -> list[dict[str, Any]]:
    """The rows of ``sessions`` in the log format (one per list, session order).

    Parameters
    ----------
    sessions : SessionLog
        ``items`` are rows of the catalog whose ids are ``item_ids``.
    extra : LogExtra, optional
        External user/session ids, ``resorted``, ``device`` and shown prices (an imported folder's); without
        it user ids are the user numbers and each list is its own session ``s<index>``.
    evaluation : bool
        Also write the simulator's fields (``randomized``, ``ranks``, ``scores``, ``grades``, ``utility``), so the
        round trip keeps everything; False writes only what a shop's log has.
    """
    out = []
    for s in range(len(sessions)):
        sl = sessions.slate(s)
        ids = [item_ids[i] for i in sessions.items[sl].tolist()]
        clk = np.flatnonzero(sessions.clicks[sl])
        pur = np.flatnonzero(sessions.purchases[sl])
        row: dict[str, Any] = {
            "log_version": LOG_FORMAT_VERSION,
            "user_id": str(extra.user_ids[s]) if extra is not None else str(int(sessions.user[s])),
            "session_id": str(extra.session_ids[s]) if extra is not None else f"s{s}",
            "timestamp": int(sessions.timestamp[s]),
            "query": sessions.queries[int(sessions.query[s])],
            "items": ids,
            "clicks": [ids[k] for k in clk.tolist()],
            "purchases": [ids[k] for k in pur.tolist()],
            "resorted": bool(extra.resorted[s]) if extra is not None else False,
            "device": str(extra.device[s]) if extra is not None else "",
        }
        prices = extra.price_shown[sl] if extra is not None else None
        row["prices"] = _f32(prices) if prices is not None and not np.isnan(prices).all() else None
        if evaluation:
            row["randomized"] = bool(sessions.randomized[s])
            row["ranks"] = sessions.prod_rank[sl].astype(int).tolist()
            row["scores"] = _f32(sessions.retrieval_score[sl])
            row["grades"] = _f32(sessions.grades[sl].astype(np.float32))
            row["utility"] = _f32(sessions.utility[sl])
        out.append(row)
    return out


def _csv_cell(v: Any) -> Any:
    if v is None:
        return ""
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, list):
        return json.dumps(v, ensure_ascii=False, separators=(",", ":"))
    return v


def write_logs(rows: list[dict[str, Any]], path: str | os.PathLike[str]) -> Path:
    """Write log rows (:func:`log_rows`) as CSV/TSV, JSONL or Parquet by the extension of ``path``, atomically."""
    p = Path(path)
    kind = _kind(p)
    if kind == "parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        types = {"log_version": pa.int32(), "timestamp": pa.int64(), "resorted": pa.bool_(),
                 "randomized": pa.bool_(), "ranks": pa.list_(pa.int32())}
        for name in ("items", "clicks", "purchases"):
            types[name] = pa.list_(pa.string())
        for name in ("prices", "scores", "grades", "utility"):
            types[name] = pa.list_(pa.float64())
        names = list(rows[0]) if rows else ["log_version", *REQUIRED, "clicks"]
        schema = pa.schema([(n, types.get(n, pa.string())) for n in names],
                           metadata={"fedrank.log_version": str(LOG_FORMAT_VERSION)})
        table = pa.Table.from_pylist(rows, schema=schema)
        atomic_write(p, lambda f: pq.write_table(table, f, compression="zstd"))
        return p
    if kind == "jsonl":
        payload = "".join(json.dumps(r, ensure_ascii=False, separators=(",", ":")) + "\n" for r in rows)
    else:
        buf = io.StringIO(newline="")
        names = list(rows[0]) if rows else ["log_version", *REQUIRED, "clicks"]
        w = csv.writer(buf, delimiter=CSV_EXT[p.suffix.lower()], lineterminator="\n")
        w.writerow(names)
        for r in rows:
            w.writerow([_csv_cell(r.get(n)) for n in names])
        payload = buf.getvalue()
    data = payload.encode("utf-8")
    atomic_write(p, lambda f: f.write(data))
    return p


def export_logs(data_dir: str | os.PathLike[str], out: str | os.PathLike[str], evaluation: bool = True) -> int:
    """Write a data folder's ``sessions.npz`` (+ ``log_extra.npz`` when imported) to ``out``; rows written."""
    from shared_model.catalog_io import load_catalog

    d = Path(data_dir)
    for name in ("catalog.jsonl", "sessions.npz"):
        if not (d / name).is_file():
            raise FileNotFoundError(f"{d / name}: missing; not a data folder (fedrank generate / import-logs)")
    catalog = load_catalog(d / "catalog.jsonl")
    sessions = SessionLog.load(d / "sessions.npz")
    sessions.check_catalog(len(catalog), str(d / "sessions.npz"))
    rows = log_rows(sessions, catalog.ids(), load_log_extra(d), evaluation=evaluation)
    write_logs(rows, out)
    return len(rows)


# ------------------------------------------------------------------------------------------------ import
def _fill_prices(catalog: Catalog, parsed: ParsedLog) -> int:
    """Catalog items without a price get the median price shown for them; how many were filled."""
    shown = parsed.extra.price_shown
    rows = parsed.sessions.items
    ok = ~np.isnan(shown)
    filled = 0
    if not ok.any():
        return 0
    order = np.argsort(rows[ok], kind="stable")
    r_sorted, p_sorted = rows[ok][order], shown[ok][order]
    uniq, start = np.unique(r_sorted, return_index=True)
    ends = np.r_[start[1:], len(r_sorted)]
    for r, a, b in zip(uniq.tolist(), start.tolist(), ends.tolist(), strict=True):
        item = catalog.items[r]
        if math.isnan(item.price):
            item.price = float(np.median(p_sorted[a:b]))
            filled += 1
    return filled


def _check_replaceable(out: Path) -> None:
    """An existing ``out`` must be an empty folder or an earlier import (which is then replaced whole)."""
    if not out.exists():
        return
    if not out.is_dir():
        raise FileExistsError(f"{out}: exists and is not a folder")
    meta = out / "meta.json"
    earlier = False
    if meta.is_file():
        try:
            earlier = json.loads(meta.read_text(encoding="utf-8")).get("generator") == LOG_GENERATOR
        except (OSError, json.JSONDecodeError, AttributeError):
            earlier = False
    if any(out.iterdir()) and not earlier:
        raise FileExistsError(f"{out}: exists and is not a folder written by import-logs; choose another --out")


def import_logs(
    catalog_path: str | os.PathLike[str], logs_path: str | os.PathLike[str], out_dir: str | os.PathLike[str],
    skip_bad: bool = False,
) -> dict[str, Any]:
    """Build a data folder from a catalog and a search log (both as in this module's docstring); the meta record.

    ``out_dir`` is written in a staging folder beside it and renamed into place; an existing ``out_dir`` is
    replaced only when it is empty or an earlier import.
    """
    out = Path(out_dir)
    catalog, cat_report = load_catalog_with_report(catalog_path, skip_bad=skip_bad)
    parsed = read_logs(logs_path, catalog, skip_bad=skip_bad)
    filled = _fill_prices(catalog, parsed)
    sessions = parsed.sessions
    n_imp = int(sessions.offsets[-1])
    meta: dict[str, Any] = {
        "generator": LOG_GENERATOR,
        "log_format_version": LOG_FORMAT_VERSION,
        "source_catalog": str(Path(catalog_path).resolve()),
        "source_logs": str(Path(logs_path).resolve()),
        "skip_bad": skip_bad,
        "fields": parsed.fields,
        "has_grades": parsed.fields["grades"],
        "counts": {
            "items": len(catalog), "users": int(sessions.user.max()) + 1, "sessions": len(sessions),
            "queries": len(sessions.queries), "impressions": n_imp, "clicks": int(sessions.clicks.sum()),
            "purchases": int(sessions.purchases.sum()), "randomized_sessions": int(sessions.randomized.sum()),
            "resorted_sessions": int(parsed.extra.resorted.sum()), "prices_filled_from_log": filled,
            "ctr": round(float(sessions.clicks.mean()), 5),
        },
        "load_report": {
            "catalog": {"rows": cat_report.rows, "loaded": cat_report.loaded, "skipped": cat_report.num_skipped},
            "logs": {"rows": parsed.report.rows, "loaded": parsed.report.loaded,
                     "skipped": parsed.report.num_skipped,
                     "skipped_rows": [asdict(r) for r in parsed.report.skipped[:100]]},
        },
        "files": {"catalog": "catalog.jsonl", "sessions": "sessions.npz", "extra": EXTRA_FILE},
    }
    _check_replaceable(out)
    with staged_dir(out) as staging:  # built beside out, swapped in whole; nothing half-written
        save_catalog_jsonl(catalog, staging / "catalog.jsonl")
        sessions.save(staging / "sessions.npz")
        parsed.extra.save(staging / EXTRA_FILE)
        payload = (json.dumps(meta, indent=1, ensure_ascii=False) + "\n").encode("utf-8")
        atomic_write(staging / "meta.json", lambda f: f.write(payload))
    log.info("imported %d lists (%d skipped) of %d users over %d items -> %s", len(sessions),
             parsed.report.num_skipped, meta["counts"]["users"], len(catalog), out)
    return meta
