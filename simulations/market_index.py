"""Integer view of a catalog for the vectorized simulation: categories, intent attributes, title tokens.

Works over any catalog (generated or imported): intents use the catalog's own categories and attribute columns
(derived from the titles by :mod:`simulations.title_intents` when a catalog has none).
"""

from __future__ import annotations

import re

import numpy as np

from shared_model.schema import Catalog
from simulations.market_config import MarketConfig, random_streams

__all__ = ["CatalogIndex", "norm", "tokens"]

_STOP = frozenset({"by", "the", "and", "a", "an", "for", "with", "of", "in", "from", "to"})
_TOKEN = re.compile(r"[a-z0-9]+")


def tokens(text: str) -> list[str]:
    """Lower-case word tokens of ``text`` (single characters and stop words dropped)."""
    return [t for t in _TOKEN.findall(text.lower()) if len(t) > 1 and t not in _STOP]


def norm(v: str) -> str:
    """An attribute value compared case- and blank-insensitively."""
    return " ".join(v.strip().lower().split())


def _is_number(v: str) -> bool:
    try:
        float(v)
    except ValueError:
        return False
    return True


def _popularity(n: int, rating_z: np.ndarray, seed: int) -> np.ndarray:
    """Latent item popularity (standardized): noise plus a rating effect."""
    rng = np.random.default_rng(random_streams(seed)["spare"])
    pop = rng.standard_normal(n) + 0.5 * rating_z
    return (pop - pop.mean()) / (pop.std() or 1.0)


def _sorted_pool(keys: list[np.ndarray], owners: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    if not keys:
        return np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.int64)
    k = np.concatenate(keys)
    o = np.concatenate(owners)
    order = np.lexsort((o, k))
    return k[order], o[order]


class CatalogIndex:
    """Integer view of a catalog for the vectorized simulation.

    Attributes
    ----------
    n : int
        Items ``I``.
    categories : list of str
        Normalized category names ``C``; ``cat [I]`` is each item's index in it (-1: none).
    by_cat, cat_start, cat_size : ndarray of int
        Item rows sorted by category, and each category's start and size in that order.
    attr_names, attr_values : list
        Intent attributes ``A`` and each one's vocabulary; ``attr_codes [A, I]`` (-1: no value).
    pool_keys, pool_items : ndarray of int
        Items by ``(category * A + attribute) * vmax + value`` (sorted), for attribute-matching draws.
    rare_items, rare_lo, rare_n : ndarray of int
        Items having a rare attribute, and each ``[C, A]`` pool's start and size in ``rare_items``.
    rating, rating_z, price_z, popularity : ndarray [I]
        Dense item fields (``price_z`` standardized within category).
    pairs, idf : ndarray
        Sorted ``item * V + token`` pairs of title tokens, and each token's IDF ``[V]``.
    """

    def __init__(self, catalog: Catalog, cfg: MarketConfig) -> None:
        self.cfg = cfg
        n = len(catalog.items)
        if n == 0:
            raise ValueError("cannot simulate over an empty catalog")
        self.n = n
        self._index_categories(catalog)
        self._index_attributes(catalog, cfg)
        self._index_pools()
        self._index_dense_fields(catalog)
        self._index_title_tokens(catalog)
        self.popularity = _popularity(self.n, self.rating_z, cfg.seed)

    def _index_categories(self, catalog: Catalog) -> None:
        items = catalog.items
        cat_names = sorted({norm(it.category) for it in items} - {""})
        if not cat_names:
            raise ValueError(
                f"{catalog.source or 'catalog'}: no item has a category; the simulator builds query intents "
                "from the category column (derive one from the titles first: "
                "simulations.title_intents.fill_missing_intents, as fedrank generate --catalog does)"
            )
        self.categories = cat_names
        cpos = {c: k for k, c in enumerate(cat_names)}
        self.cat = np.array([cpos.get(norm(it.category), -1) for it in items], dtype=np.int64)
        self.by_cat = np.argsort(self.cat, kind="stable").astype(np.int64)
        sorted_cat = self.cat[self.by_cat]
        self.cat_start = np.searchsorted(sorted_cat, np.arange(len(cat_names)), side="left").astype(np.int64)
        self.cat_size = (np.searchsorted(sorted_cat, np.arange(len(cat_names)), side="right")
                         - self.cat_start).astype(np.int64)

    def _index_attributes(self, catalog: Catalog, cfg: MarketConfig) -> None:
        items = catalog.items
        if cfg.intent_attributes is not None:
            names = list(cfg.intent_attributes)
        else:
            names = ["color", "brand"]
            for it in items:
                for k in it.attributes:
                    if k not in names:
                        names.append(k)
        values: list[list[str]] = []
        codes: list[np.ndarray] = []
        kept: list[str] = []
        for name in names:
            raw = [norm(it.attribute(name)) for it in items]
            vocab = sorted(set(raw) - {""})
            auto = cfg.intent_attributes is None
            if not vocab or (auto and (len(vocab) > cfg.max_attr_values or all(_is_number(v) for v in vocab))):
                continue
            pos = {v: k for k, v in enumerate(vocab)}
            kept.append(name)
            values.append(vocab)
            codes.append(np.array([pos.get(v, -1) for v in raw], dtype=np.int64))
        self.attr_names = kept
        self.attr_values = values
        self.attr_codes = np.stack(codes) if codes else np.zeros((0, self.n), dtype=np.int64)
        probs = dict(cfg.attr_request_probs)
        self.rare = [a for a, nm in enumerate(kept) if nm in cfg.rare_attributes]
        self.attr_prob = np.array(
            [0.0 if a in self.rare else float(probs.get(nm, cfg.other_attr_prob)) for a, nm in enumerate(kept)]
        )
        self.vmax = max([len(v) for v in values] + [1]) + 1

    def _index_pools(self) -> None:
        """(category, attribute, value) pools and (category, rare attribute) pools."""
        A = len(self.attr_names)
        C = len(self.categories)
        keys, owners = [], []
        rare_keys, rare_owners = [], []
        ok_cat = self.cat >= 0
        for a in range(A):
            has = ok_cat & (self.attr_codes[a] >= 0)
            idx = np.nonzero(has)[0]
            keys.append((self.cat[idx] * A + a) * self.vmax + self.attr_codes[a, idx])
            owners.append(idx)
            if a in self.rare:
                rare_keys.append(self.cat[idx] * A + a)
                rare_owners.append(idx)
        self.pool_keys, self.pool_items = _sorted_pool(keys, owners)
        rk, ri = _sorted_pool(rare_keys, rare_owners)
        self.rare_items = ri
        grid = np.arange(C * max(A, 1))
        self.rare_lo = np.searchsorted(rk, grid, side="left").reshape(C, max(A, 1))
        self.rare_n = (np.searchsorted(rk, grid, side="right").reshape(C, max(A, 1)) - self.rare_lo)

    def _index_dense_fields(self, catalog: Catalog) -> None:
        items = catalog.items
        self.rating = np.array([it.rating for it in items], dtype=np.float64)
        r = np.where(np.isfinite(self.rating), self.rating, np.nan)
        mu, sd = (np.nanmean(r), np.nanstd(r)) if np.isfinite(r).any() else (0.0, 1.0)
        self.rating_z = np.nan_to_num((r - mu) / (sd if sd > 0 else 1.0))
        logp = np.log(np.array([it.price if it.price > 0 else np.nan for it in items], dtype=np.float64))
        self.price_z = np.zeros(self.n)
        for c in range(len(self.categories)):
            m = (self.cat == c) & np.isfinite(logp)
            if m.sum() >= 2:
                s = logp[m].std()
                self.price_z[m] = (logp[m] - logp[m].mean()) / (s if s > 0 else 1.0)

    def _index_title_tokens(self, catalog: Catalog) -> None:
        """Title tokens: sorted (item * V + token) pairs and IDF."""
        n = self.n
        vocab_tok: dict[str, int] = {}
        per_item = [[vocab_tok.setdefault(t, len(vocab_tok)) for t in dict.fromkeys(tokens(it.title))]
                    for it in catalog.items]
        V = max(len(vocab_tok), 1)
        self.tok_vocab = vocab_tok
        self.V = V
        lens = np.array([len(t) for t in per_item], dtype=np.int64)
        flat = np.fromiter((k for t in per_item for k in t), dtype=np.int64, count=int(lens.sum()))
        self.pairs = np.sort(np.repeat(np.arange(n, dtype=np.int64), lens) * V + flat)
        df = np.bincount(flat, minlength=V).astype(np.float64)
        self.idf = np.log(1.0 + n / (df + 1.0))
        self.idf_unknown = float(np.log(1.0 + n))

    def query_tokens(self, query: str) -> tuple[np.ndarray, np.ndarray]:
        """Token ids (-1 = not in any title) and IDF weights of a query's distinct tokens."""
        toks = list(dict.fromkeys(tokens(query)))
        ids = np.array([self.tok_vocab.get(t, -1) for t in toks], dtype=np.int64)
        w = np.array([self.idf[k] if k >= 0 else self.idf_unknown for k in ids], dtype=np.float64)
        return ids, w

    def draw_in_category(self, rng: np.random.Generator, cats: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
        """Uniform draws of items in each row's category (``cats [S]`` broadcast against ``shape [S(, K)]``)."""
        u = rng.random(shape)
        size = self.cat_size[cats]
        start = self.cat_start[cats]
        if u.ndim == 2:
            size, start = size[:, None], start[:, None]
        pos = start + np.minimum((u * size).astype(np.int64), np.maximum(size - 1, 0))
        return self.by_cat[pos]
