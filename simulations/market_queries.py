"""Shopping intents and the queries that express them.

An intent is a category plus some attributes of a target product the user would like (~20% vague = category
only; ~10% request a rare attribute, such as the video-only feature, where it exists). It is rendered as a
query with synonyms, so a query and the titles it should find often use different words.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from simulations.market_config import MarketConfig
from simulations.market_index import CatalogIndex
from simulations.market_users import Users
from simulations.market_vocab import ADJ_ORDER, SYNONYMS

__all__ = ["Intents", "QueryBook", "draw_intents", "render_queries"]

_TARGET_CANDIDATES = 16  # same-category items a target product is chosen from


def _words(attr: str, value: str) -> tuple[str, ...]:
    return SYNONYMS.get(attr, {}).get(value, (value,))


def _choose(words: tuple[str, ...], c: int) -> str:
    """Canonical word for half of the choice ints ``c`` in 0..59, a synonym otherwise."""
    if len(words) == 1 or c % 10 < 5:
        return words[0]
    return words[1 + (c // 10) % (len(words) - 1)]


class QueryBook:
    """Query strings (deduplicated, in first-use order) and their token ids/IDF weights."""

    def __init__(self, index: CatalogIndex) -> None:
        self.index = index
        self.queries: list[str] = []
        self.ids: dict[str, int] = {}
        self.tok: list[np.ndarray] = []
        self.w: list[np.ndarray] = []
        self._cache: dict[tuple[int, ...], int] = {}

    def render(self, key: tuple[int, ...]) -> int:
        """Query id for ``key = (category, value codes per attribute ..., choice ints ...)``."""
        qid = self._cache.get(key)
        if qid is not None:
            return qid
        idx = self.index
        A = len(idx.attr_names)
        cat = key[0]
        vals = key[1:1 + A]
        ch = key[1 + A:]
        cat_name = idx.categories[cat]
        cat_word = _choose(_words("category", cat_name), ch[A])
        adjs: list[tuple[int, str]] = []
        brand = ""
        for a, v in enumerate(vals):
            if v < 0:
                continue
            name = idx.attr_names[a]
            word = _choose(_words(name, idx.attr_values[a][v]), ch[a])
            if name == "brand":
                brand = word
            else:
                order = ADJ_ORDER.index(name) if name in ADJ_ORDER else len(ADJ_ORDER) + a
                adjs.append((order, word))
        phrase = " ".join([w for _, w in sorted(adjs)] + [cat_word])
        if brand:
            form = ch[A + 1] % 5
            phrase = f"{brand} {phrase}" if form < 3 else (f"{phrase} by {brand}" if form == 3 else f"{phrase} {brand}")
        qid = self.add(phrase.lower())
        self._cache[key] = qid
        return qid

    def add(self, query: str) -> int:
        """Query id of the string ``query`` (tokenized against the catalog's titles when first seen)."""
        qid = self.ids.get(query)
        if qid is None:
            qid = len(self.queries)
            self.ids[query] = qid
            self.queries.append(query)
            t, w = self.index.query_tokens(query)
            self.tok.append(t)
            self.w.append(w)
        return qid


@dataclass(frozen=True)
class Intents:
    """What each of ``S`` sessions is looking for (ground truth for grades and slate composition).

    Attributes
    ----------
    user : ndarray of int [S]
        The session's user.
    cat : ndarray of int [S]
        Requested category (index into ``CatalogIndex.categories``).
    vague : ndarray of bool [S]
        Category-only intent.
    target : ndarray of int [S]
        The catalog row of the product the intent was drawn from.
    req : ndarray of bool [S, A]
        Which intent attributes are requested.
    ival : ndarray of int [S, A]
        Requested value code per attribute (-1: not requested).
    n_req : ndarray of int [S]
        Number of requested attributes.
    """

    user: np.ndarray
    cat: np.ndarray
    vague: np.ndarray
    target: np.ndarray
    req: np.ndarray
    ival: np.ndarray
    n_req: np.ndarray


def draw_intents(index: CatalogIndex, users: Users, cfg: MarketConfig, su: np.ndarray,
                 rng: np.random.Generator) -> Intents:
    """Draw one intent per session of users ``su [S]``: category, target product, requested attributes."""
    S = len(su)
    A = len(index.attr_names)
    C = len(index.categories)
    cdf = np.cumsum(users.category_pref[su], axis=1)
    cat = np.minimum((rng.random(S)[:, None] * cdf[:, -1:] > cdf).sum(1), C - 1)
    vague = rng.random(S) < cfg.vague_share
    rare_attr = np.full(S, -1, dtype=np.int64)
    r_rare = rng.random(S)
    for a in index.rare:
        pick = (rare_attr < 0) & ~vague & (index.rare_n[cat, a] > 0) & (r_rare < cfg.rare_share)
        rare_attr[pick] = a
    is_rare = rare_attr >= 0
    KT = _TARGET_CANDIDATES
    cand = index.draw_in_category(rng, cat, (S, KT))
    u_r = rng.random((S, KT))
    if is_rare.any():
        ra = rare_attr[is_rare]
        lo = index.rare_lo[cat[is_rare], ra][:, None]
        n_r = index.rare_n[cat[is_rare], ra][:, None]
        cand[is_rare] = index.rare_items[lo + np.minimum((u_r[is_rare] * n_r).astype(np.int64), n_r - 1)]
    pref = cfg.target_utility_beta * users.utility(su[:, None], cand) + 0.3 * index.rating_z[cand]
    gumbel = -np.log(-np.log(np.clip(rng.random((S, KT)), 1e-12, 1 - 1e-12)))
    target = cand[np.arange(S), np.argmax(pref + gumbel, axis=1)]

    codes = index.attr_codes[:, target].T if A else np.zeros((S, 0), dtype=np.int64)
    has = codes >= 0
    req = (rng.random((S, A)) < index.attr_prob[None, :]) & has & ~vague[:, None]
    if is_rare.any():
        req[np.nonzero(is_rare)[0], rare_attr[is_rare]] = True
    score = rng.random((S, A)) * index.attr_prob[None, :] * has
    none = ~vague & ~req.any(1)
    best = np.argmax(score, axis=1) if A else np.zeros(S, dtype=np.int64)
    ok = score.max(1) > 0 if A else np.zeros(S, dtype=bool)
    fix = np.nonzero(none & ok)[0]
    req[fix, best[fix]] = True
    vague = vague | (none & ~ok)
    ival = np.where(req, codes, -1)
    return Intents(user=su, cat=cat, vague=vague, target=target, req=req, ival=ival, n_req=req.sum(1))


def render_queries(book: QueryBook, intents: Intents, rng: np.random.Generator) -> np.ndarray:
    """Query ids ``[S]``: each intent rendered with drawn word choices (new strings are added to ``book``)."""
    S, A = intents.ival.shape
    choice = (rng.random((S, A + 2)) * 60).astype(np.int64)
    keys = np.concatenate([intents.cat[:, None], intents.ival, choice], axis=1).tolist()
    return np.fromiter((book.render(tuple(k)) for k in keys), dtype=np.int64, count=S)
