"""First-stage retrieval: the candidate slate of each session and its production (text-only) order.

A slate holds ``slate_min..slate_max`` candidates: the intent's target, items sharing a requested attribute,
same-category items and a few from other categories. The production score (IDF-weighted token overlap of query
and title, popularity, noise) is informative but blind to image- and video-only attributes. The same item for the
same query lands at different positions across sessions (per-session score noise, different candidate sets and,
when ``ranker_update_days > 0``, periodic ranker versions): the natural interventions from which position bias is
harvested when no session was randomized.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import numpy as np

from shared_model.schema import Catalog, SessionLog
from simulations.market_config import MarketConfig, random_streams
from simulations.market_index import CatalogIndex
from simulations.market_queries import Intents, QueryBook

__all__ = ["Slates", "draw_slates", "production_ranks", "ranker_multipliers"]


@dataclass(frozen=True)
class Slates:
    """The candidate slates of ``S`` sessions, flattened to ``M`` impressions (grouped by session).

    Attributes
    ----------
    items : ndarray of int [M]
        Catalog rows, in candidate order within each session.
    session : ndarray of int [M]
        Each impression's session (0..S-1, non-decreasing).
    lengths : ndarray of int [S]
        Slate lengths.
    offsets : ndarray of int [S + 1]
        Start of each session's impressions.
    """

    items: np.ndarray
    session: np.ndarray
    lengths: np.ndarray
    offsets: np.ndarray


def _attribute_matches(index: CatalogIndex, intents: Intents, match: np.ndarray, rng: np.random.Generator) -> None:
    """Replace, in place, the ``match [S, Mm]`` draws of specific intents by items sharing a requested value."""
    A = len(index.attr_names)
    cat, req, ival = intents.cat, intents.req, intents.ival
    Mm = match.shape[1]
    spec = np.nonzero(~intents.vague)[0]
    a_pick = np.argmax(rng.random((len(spec), Mm, A)) * req[spec][:, None, :], axis=2)
    v_pick = ival[spec[:, None], a_pick]
    key = (cat[spec][:, None] * A + a_pick) * index.vmax + v_pick
    lo = np.searchsorted(index.pool_keys, key, side="left")
    n_m = np.searchsorted(index.pool_keys, key, side="right") - lo
    u_m = rng.random(key.shape)
    good = n_m > 0
    pos = lo + np.minimum((u_m * n_m).astype(np.int64), np.maximum(n_m - 1, 0))
    drawn = index.pool_items[np.minimum(pos, max(len(index.pool_items) - 1, 0))] if len(index.pool_items) \
        else np.zeros_like(pos)
    match[spec] = np.where(good, drawn, match[spec])


def draw_slates(index: CatalogIndex, cfg: MarketConfig, intents: Intents, rng: np.random.Generator) -> Slates:
    """Slates: target + attribute-matching draws + same-category draws + other-category draws, deduplicated."""
    cat = intents.cat
    S = len(cat)
    I = index.n  # noqa: E741
    L = np.minimum(rng.integers(cfg.slate_min, cfg.slate_max + 1, size=S), I)
    Mm = max(1, math.ceil(cfg.match_share * cfg.slate_max))
    Mu = cfg.slate_max
    Mo = cfg.slate_max
    match = index.draw_in_category(rng, cat, (S, Mm))
    if index.attr_names:
        _attribute_matches(index, intents, match, rng)
    same = index.draw_in_category(rng, cat, (S, Mu))
    n_out = I - index.cat_size[cat]
    j = (rng.random((S, Mo)) * n_out[:, None]).astype(np.int64)
    j = j + (j >= index.cat_start[cat][:, None]) * index.cat_size[cat][:, None]
    other = np.where(n_out[:, None] > 0, index.by_cat[np.minimum(j, I - 1)], -1)
    R = np.concatenate([intents.target[:, None], match, same, other], axis=1)
    K = R.shape[1]
    valid = R >= 0
    order = np.argsort(R, axis=1, kind="stable")
    sr = np.take_along_axis(R, order, axis=1)
    dup = np.zeros_like(valid)
    np.put_along_axis(dup, order[:, 1:], sr[:, 1:] == sr[:, :-1], axis=1)
    valid &= ~dup
    n_other = rng.binomial(L, cfg.other_category_share)
    n_match = np.rint(cfg.match_share * L).astype(np.int64)
    n_same = np.maximum(L - 1 - n_match - n_other, 0)
    chosen = np.zeros((S, K), dtype=bool)
    bounds = [(0, 1, np.ones(S, dtype=np.int64)), (1, 1 + Mm, n_match), (1 + Mm, 1 + Mm + Mu, n_same),
              (1 + Mm + Mu, K, n_other)]
    for b0, b1, quota in bounds:
        v = valid[:, b0:b1]
        chosen[:, b0:b1] = v & (np.cumsum(v, axis=1) <= quota[:, None])
    fill = L - chosen.sum(1)
    rem = valid & ~chosen
    chosen |= rem & (np.cumsum(rem, axis=1) <= fill[:, None])
    lengths = chosen.sum(1)
    offsets = np.zeros(S + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    return Slates(items=R[chosen], session=np.repeat(np.arange(S), lengths), lengths=lengths, offsets=offsets)


def ranker_multipliers(cfg: MarketConfig, days: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Text and popularity weight multipliers ``[S]`` of the ranker version serving each session.

    ``days [S]``: session time in days since the first possible session. Version ``v = floor(days /
    ranker_update_days)`` multiplies both weights by ``exp(ranker_drift * N(0, 1))``, drawn from the ``ranker``
    stream keyed by ``v`` (so a version's weights do not depend on which sessions are simulated together).
    Without updates (``ranker_update_days == 0``) all ones.
    """
    S = len(days)
    if cfg.ranker_update_days <= 0:
        return np.ones(S), np.ones(S)
    version = np.floor(np.asarray(days, dtype=np.float64) / cfg.ranker_update_days).astype(np.int64)
    root = random_streams(cfg.seed)["ranker"]
    uv, inv = np.unique(version, return_inverse=True)
    mult = np.array([np.exp(cfg.ranker_drift * np.random.default_rng(
        np.random.SeedSequence(root.entropy, spawn_key=(*root.spawn_key, int(v)))).standard_normal(2))
        for v in uv]).reshape(len(uv), 2)
    return mult[inv, 0], mult[inv, 1]


def production_ranks(index: CatalogIndex, cfg: MarketConfig, book: QueryBook, qid: np.ndarray, slates: Slates,
                     rng: np.random.Generator, days: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """The production (text-only) score ``[M]`` of each impression and its rank ``[M]`` within the slate.

    Score = ``text_weight * idf_overlap + popularity_weight * popularity + retrieval_noise * N(0, 1)``, where
    ``idf_overlap`` is the IDF-weighted share of the query's tokens found in the title; with ranker updates the
    two weights are those of the version serving the session (:func:`ranker_multipliers`; ``days [S]``: session
    times in days since the first possible session, needed only then).
    """
    it, sid = slates.items, slates.session
    M = len(it)
    uq, qloc = np.unique(qid, return_inverse=True)
    q_len = np.array([len(book.tok[q]) for q in uq], dtype=np.int64)
    q_ptr = np.zeros(len(uq) + 1, dtype=np.int64)
    np.cumsum(q_len, out=q_ptr[1:])
    q_tok = np.concatenate([book.tok[q] for q in uq] + [np.zeros(0, dtype=np.int64)])
    q_w = np.concatenate([book.w[q] for q in uq] + [np.zeros(0)])
    q_norm = np.array([max(float(book.w[q].sum()), 1e-9) for q in uq])
    mq = qloc[sid]
    ntok = q_len[mq]
    rep = np.repeat(np.arange(M), ntok)
    within = np.arange(len(rep)) - np.repeat(np.cumsum(ntok) - ntok, ntok)
    tpos = q_ptr[mq][rep] + within
    tok = q_tok[tpos]
    pk = it[rep] * index.V + tok
    ppos = np.minimum(np.searchsorted(index.pairs, pk), max(len(index.pairs) - 1, 0))
    found = (tok >= 0) & (index.pairs[ppos] == pk) if len(index.pairs) else np.zeros(len(pk), dtype=bool)
    sim = np.bincount(rep, weights=q_w[tpos] * found, minlength=M) / q_norm[mq]
    pop = index.popularity[it]
    if cfg.ranker_update_days > 0:
        if days is None:
            raise ValueError("ranker_update_days > 0 needs the session times (days)")
        tw, pw = ranker_multipliers(cfg, days)
        text_w, pop_w = cfg.text_weight * tw[sid], cfg.popularity_weight * pw[sid]
        rscore = (text_w * sim + pop_w * pop + cfg.retrieval_noise * rng.standard_normal(M)).astype(np.float32)
    else:  # the original expression, so the default marketplace stays byte-identical
        rscore = (cfg.text_weight * sim + cfg.popularity_weight * pop
                  + cfg.retrieval_noise * rng.standard_normal(M)).astype(np.float32)
    porder = np.lexsort((-rscore.astype(np.float64), sid))
    prod_rank = np.empty(M, dtype=np.int64)
    prod_rank[porder] = np.arange(M) - slates.offsets[sid[porder]]
    return rscore, prod_rank


def production_first_stage(sessions: SessionLog, catalog: Catalog, cfg: MarketConfig,
                           rng: np.random.Generator) -> SessionLog:
    """``sessions`` (candidates over ``catalog``) with the simulator's production ranker as their first stage.

    Each slate's ``prod_rank`` and ``retrieval_score`` are replaced by :func:`production_ranks` of the session's
    query string (``sessions.queries``) over ``catalog``'s titles, with ``cfg``'s weights and noise and a
    popularity drawn as the simulator draws it for a catalog: the same kind of first stage that ordered the
    simulated training logs, for slates the simulator never showed (judged slates). Candidates, grades and
    everything else are unchanged. ``cfg.ranker_update_days`` is ignored (the first version serves every slate).
    """
    if len(sessions) and int(sessions.items.max()) >= len(catalog.items):
        raise ValueError(f"sessions name catalog row {int(sessions.items.max())}, but {catalog.source or 'the catalog'} "
                         f"has {len(catalog.items)} items")
    index = CatalogIndex(catalog, replace(cfg, ranker_update_days=0.0))
    book = QueryBook(index)
    qid = np.array([book.add(sessions.queries[int(q)]) for q in sessions.query], dtype=np.int64)
    lengths = np.diff(sessions.offsets).astype(np.int64)
    slates = Slates(items=sessions.items.astype(np.int64), session=np.repeat(np.arange(len(lengths)), lengths),
                    lengths=lengths, offsets=sessions.offsets.astype(np.int64))
    score, rank = production_ranks(index, index.cfg, book, qid, slates, rng)
    return replace(sessions, prod_rank=rank.astype(sessions.prod_rank.dtype),
                   retrieval_score=score.astype(sessions.retrieval_score.dtype))
