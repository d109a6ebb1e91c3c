"""Evaluate rankers on a catalog + relevance-judgments file (the shape of ESCI / product-search sets).

Each judged query becomes one slate made of its judged items. The first-stage order the head sees as a dense
feature is BM25's order over that slate (there is no production system here). The shopper has no history.
"""

from __future__ import annotations

import json
import logging
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np

from shared_model.catalog_io import CatalogError, load_catalog, load_judgments
from shared_model.data import ItemTable, build_slates
from shared_model.embedding_cache import feature_cache_dir
from shared_model.features import build_feature_store, encode_queries
from shared_model.head import FusedRankingHead
from shared_model.schema import Catalog, SessionLog, atomic_write
from shared_model.training import ranking_metrics, score_slates
from simulations.baselines import BM25Ranker, CosineRanker

log = logging.getLogger(__name__)


class JudgmentsError(ValueError):
    """The judgments do not fit the catalog."""


def judged_sessions(catalog: Catalog, judgments: list[tuple[str, str, int]], source: str, bm25: BM25Ranker) -> SessionLog:
    """One session per judged query; candidates in BM25 order; grades from the judgments."""
    by_query: dict[str, dict[int, int]] = defaultdict(dict)
    for n, (query, item_id, grade) in enumerate(judgments, start=1):
        try:
            row = catalog.row(item_id)
        except KeyError:
            raise JudgmentsError(f"{source}: judgment {n} (query {query!r}) names item_id {item_id!r}, "
                                 f"which is not in the catalog {catalog.source}") from None
        by_query[query][row] = max(grade, by_query[query].get(row, 0))
    queries = sorted(by_query)
    offsets = [0]
    items, grades, ranks, scores = [], [], [], []
    for q in queries:
        rows = np.array(sorted(by_query[q]), np.int32)
        s = bm25.corpus_scores(q)[rows]
        order = np.argsort(-s, kind="stable")
        rows, s = rows[order], s[order]
        items.append(rows)
        grades.append(np.array([by_query[q][r] for r in rows], np.uint8))
        ranks.append(np.arange(len(rows), dtype=np.int16))
        scores.append(s.astype(np.float32))
        offsets.append(offsets[-1] + len(rows))
    n, m = len(queries), offsets[-1]

    def cat(xs: list[np.ndarray], dt: type) -> np.ndarray:
        return np.concatenate(xs).astype(dt) if xs else np.zeros(0, dt)

    return SessionLog(
        user=np.arange(n, dtype=np.int32), query=np.arange(n, dtype=np.int32),
        randomized=np.zeros(n, bool), timestamp=np.zeros(n, np.int64),
        offsets=np.array(offsets, np.int64), items=cat(items, np.int32),
        clicks=np.zeros(m, np.uint8), purchases=np.zeros(m, np.uint8),
        prod_rank=cat(ranks, np.int16), retrieval_score=cat(scores, np.float32),
        grades=cat(grades, np.uint8), utility=np.zeros(m, np.float32), queries=queries,
    )


def evaluate_judgments(
    catalog_path: str | Path,
    judgments_path: str | Path,
    heads: dict[str, FusedRankingHead],
    out_dir: str | Path,
    skip_bad: bool = False,
    progress: bool = True,
) -> dict[str, Any]:
    """Score BM25, cosine and every head; write ``out_dir/results.json`` keyed by ranker name."""
    out_dir = Path(out_dir)
    catalog = load_catalog(catalog_path, skip_bad=skip_bad)
    try:  # with the catalog, an unknown item_id is a bad row: named by line (or skipped with skip_bad)
        judgments = load_judgments(judgments_path, skip_bad=skip_bad, catalog=catalog)
    except CatalogError as e:
        if e.field == "item_id" and e.reason.startswith("unknown item_id"):
            raise JudgmentsError(str(e)) from None
        raise
    if not judgments:
        raise JudgmentsError(f"{judgments_path}: no judgments")
    bm25 = BM25Ranker([it.text() for it in catalog.items])
    sessions = judged_sessions(catalog, judgments, str(judgments_path), bm25)
    cache = feature_cache_dir(catalog_path)
    store = build_feature_store(catalog, cache, progress=progress)
    query_emb = encode_queries(sessions.queries, cache, progress=progress)
    prices = np.array([it.price for it in catalog.items], np.float64)
    slates = build_slates(sessions, query_emb, prices)
    items = slates.items.numpy()
    rankers: dict[str, dict[str, float]] = {
        "bm25": ranking_metrics(bm25.score(sessions.queries, items), slates),
        "cosine": ranking_metrics(CosineRanker(store.text).score(query_emb, items), slates),
    }
    table = ItemTable.from_store(store)
    for name, model in heads.items():
        rankers[name] = ranking_metrics(score_slates(model, slates, table), slates)
    payload = {
        "catalog": str(catalog_path), "judgments": str(judgments_path),
        "num_queries": len(sessions), "num_judgments": len(judgments),
        "items_with_image": int(store.mask[:, 1].sum()), "rankers": rankers,
    }
    atomic_write(out_dir / "results.json", lambda f: f.write(json.dumps(payload, indent=2).encode()))
    return payload
