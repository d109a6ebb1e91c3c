"""Search sessions over a catalog: timestamps, intents, queries, slates, clicks and purchases.

Sessions are simulated in vectorized chunks of users, each chunk with its own random stream, so the result
depends only on the configuration (the chunk size is part of the algorithm and fixed).
"""

from __future__ import annotations

import math

import numpy as np
from tqdm.auto import tqdm

from shared_model.schema import Catalog, SessionLog
from simulations.market_clicks import click_model, display_order, relevance_grades
from simulations.market_config import MarketConfig, random_streams
from simulations.market_index import CatalogIndex
from simulations.market_queries import QueryBook, draw_intents, render_queries
from simulations.market_slates import draw_slates, production_ranks
from simulations.market_users import Users, build_users

__all__ = ["simulate_over_catalog", "simulate_sessions"]

_CHUNK_SESSIONS = 16384  # sessions simulated per vectorized chunk (part of the algorithm: fixed)
_T0 = 1_700_000_000  # first timestamp (2023-11-14, seconds)


def _timestamps(cfg: MarketConfig, counts: np.ndarray, t_start: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Session timestamps ``[S]`` (seconds), increasing per user; ``counts [U]`` sessions from ``t_start [U]``."""
    S = int(counts.sum())
    gaps = rng.exponential(cfg.mean_gap_days * 86400.0, size=S) + 60.0
    cs = np.cumsum(gaps)
    first = np.cumsum(counts) - counts
    ts = t_start[np.repeat(np.arange(len(counts)), counts)] + (cs - np.repeat(cs[first] - gaps[first], counts))
    return ts.astype(np.int64)


def _simulate_chunk(
    index: CatalogIndex, users: Users, cfg: MarketConfig, book: QueryBook, user_ids: np.ndarray,
    counts: np.ndarray, t_start: np.ndarray, rng: np.random.Generator,
) -> dict[str, np.ndarray]:
    """The :class:`SessionLog` arrays of users ``user_ids`` (``counts`` sessions each), in display order."""
    su = np.repeat(user_ids, counts)
    ts = _timestamps(cfg, counts, t_start, rng)
    intents = draw_intents(index, users, cfg, su, rng)
    qid = render_queries(book, intents, rng)
    slates = draw_slates(index, cfg, intents, rng)
    it, sid = slates.items, slates.session
    grade = relevance_grades(index, intents, slates)
    util = users.utility(su[sid], it).astype(np.float32)
    rscore, prod_rank = production_ranks(index, cfg, book, qid, slates, rng, days=(ts - _T0) / 86400.0)
    randomized, dorder = display_order(cfg, slates, prod_rank, rng)
    it, grade, util, rscore, prod_rank = it[dorder], grade[dorder], util[dorder], rscore[dorder], prod_rank[dorder]
    pos = np.arange(len(it)) - slates.offsets[sid]
    clicks, buys = click_model(cfg, pos, grade, util, rng)
    return {
        "user": su.astype(np.int32), "query": qid.astype(np.int32), "randomized": randomized,
        "timestamp": ts, "lengths": slates.lengths.astype(np.int64), "items": it.astype(np.int32),
        "clicks": clicks.astype(np.uint8), "purchases": buys.astype(np.uint8),
        "prod_rank": prod_rank.astype(np.int16), "retrieval_score": rscore, "grades": grade,
        "utility": util,
    }


def simulate_sessions(
    catalog: Catalog, cfg: MarketConfig, users: Users | None = None, progress: bool = True,
) -> SessionLog:
    """Simulate search sessions over a catalog: intents, queries, slates, clicks and purchases.

    Parameters
    ----------
    catalog : Catalog
        Generated or imported; needs a non-empty ``category`` on at least some items. Images are not used.
    cfg : MarketConfig
        Users, session counts, slate bounds, click model, seed.
    users : Users, optional
        From :func:`build_users` (built here when omitted).
    progress : bool
        Show a progress bar.

    Returns
    -------
    SessionLog
        Sessions grouped by user, in time order per user.
    """
    if users is not None and users.item_color.shape[0] != len(catalog):
        raise ValueError("users were built for a different catalog")
    index = users._index if users is not None and users._index is not None else None
    if index is None or index.cfg != cfg or index.n != len(catalog):
        index = CatalogIndex(catalog, cfg)
    if users is None:
        users = build_users(catalog, cfg, index=index)
    st = random_streams(cfg.seed)["sessions"]
    plan_ss, chunk_root = st.spawn(2)
    plan = np.random.default_rng(plan_ss)
    U = len(users)
    lo = max(1, math.ceil(cfg.sessions_per_user * (1 - cfg.sessions_jitter)))
    hi = max(lo, math.floor(cfg.sessions_per_user * (1 + cfg.sessions_jitter)))
    counts = plan.integers(lo, hi + 1, size=U)
    t_start = _T0 + plan.integers(0, 14 * 86400, size=U).astype(np.float64)
    per_chunk = max(1, _CHUNK_SESSIONS // cfg.sessions_per_user)
    n_chunks = math.ceil(U / per_chunk)
    chunk_ss = chunk_root.spawn(n_chunks)
    book = QueryBook(index)
    parts: list[dict[str, np.ndarray]] = []
    bar = tqdm(total=int(counts.sum()), desc="sessions", unit="session", disable=not progress, dynamic_ncols=True)
    try:
        for k in range(n_chunks):
            uids = np.arange(k * per_chunk, min(U, (k + 1) * per_chunk))
            part = _simulate_chunk(index, users, cfg, book, uids, counts[uids], t_start[uids],
                                   np.random.default_rng(chunk_ss[k]))
            parts.append(part)
            bar.update(int(counts[uids].sum()))
    finally:
        bar.close()

    def cat(name: str) -> np.ndarray:
        return np.concatenate([p[name] for p in parts])

    lengths = cat("lengths")
    offsets = np.zeros(len(lengths) + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    return SessionLog(
        user=cat("user"), query=cat("query"), randomized=cat("randomized"), timestamp=cat("timestamp"),
        offsets=offsets, items=cat("items"), clicks=cat("clicks"), purchases=cat("purchases"),
        prod_rank=cat("prod_rank"), retrieval_score=cat("retrieval_score"), grades=cat("grades"),
        utility=cat("utility"), queries=book.queries,
    )


def simulate_over_catalog(catalog: Catalog, cfg: MarketConfig, progress: bool = True) -> SessionLog:
    """Run the users/queries/slates/clicks simulation over any catalog (e.g. an imported one).

    Intents use the catalog's own categories and attribute columns (``color``, ``brand`` and extra columns
    with a modest number of distinct values; empty values are skipped), so nothing assumes the generated
    vocabularies. Only ``cfg``'s user/session/click settings and seed matter.

    Parameters
    ----------
    catalog : Catalog
        From :func:`shared_model.catalog_io.load_catalog` (images optional).
    cfg : MarketConfig
        Simulation settings.
    progress : bool
        Show a progress bar.

    Returns
    -------
    SessionLog
    """
    return simulate_sessions(catalog, cfg, progress=progress)
