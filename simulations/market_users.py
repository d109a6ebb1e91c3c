"""Simulated shoppers: segments with preferences, and per-user latent preferences around them (non-IID clients).

The preferences are ground truth kept for evaluation only; :meth:`Users.utility` turns them into the personal
utility in [-1, 1] that drives targets, clicks and purchases.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from shared_model.schema import Catalog
from simulations.market_config import MarketConfig, random_streams
from simulations.market_index import CatalogIndex, norm

__all__ = ["Users", "build_users"]


@dataclass
class Users:
    """Latent user preferences (evaluation only) and the item-side codes utility needs.

    Attributes
    ----------
    segment : ndarray of int [U]
    category_pref : ndarray [U, C]
        Probability of searching each category (``categories``).
    color_pref, brand_pref : ndarray [U, Vc] and [U, Vb]
        Preference distributions over ``colors`` and ``brands``.
    color_aff, brand_aff : ndarray [U, Vc + 1] and [U, Vb + 1]
        Affinities in [-1, 1] derived from the preferences (last column 0: unknown value).
    price_sensitivity : ndarray [U]
        In [-0.6, 1]: positive dislikes expensive items (within category), negative likes them.
    """

    segment: np.ndarray
    category_pref: np.ndarray
    color_pref: np.ndarray
    brand_pref: np.ndarray
    color_aff: np.ndarray
    brand_aff: np.ndarray
    price_sensitivity: np.ndarray
    categories: list[str]
    colors: list[str]
    brands: list[str]
    item_color: np.ndarray  # [I] index into colors, or len(colors) for unknown
    item_brand: np.ndarray
    item_price_z: np.ndarray
    segment_prefs: list[dict[str, Any]] = field(default_factory=list)
    weights: tuple[float, float, float] = (0.5, 0.35, 0.35)
    _index: CatalogIndex | None = field(default=None, repr=False, compare=False)  # catalog index they were built on

    def __len__(self) -> int:
        return int(self.segment.shape[0])

    def utility(self, users: np.ndarray, items: np.ndarray) -> np.ndarray:
        """Personal utility in [-1, 1] of catalog rows ``items`` for ``users`` (broadcasting)."""
        wc, wb, wp = self.weights
        u = (wc * self.color_aff[users, self.item_color[items]]
             + wb * self.brand_aff[users, self.item_brand[items]]
             - wp * self.price_sensitivity[users] * np.tanh(self.item_price_z[items]))
        return np.clip(u, -1.0, 1.0)

    def to_json(self) -> dict[str, Any]:
        """``users.json`` content: segments and each user's segment and preferences."""
        def top(p: np.ndarray, names: list[str]) -> dict[str, float]:
            return {names[k]: round(float(p[k]), 4) for k in np.argsort(-p, kind="stable") if p[k] >= 1e-4}

        users = [
            {
                "user": u,
                "segment": int(self.segment[u]),
                "price_sensitivity": round(float(self.price_sensitivity[u]), 4),
                "category_pref": top(self.category_pref[u], self.categories),
                "color_pref": top(self.color_pref[u], self.colors),
                "brand_pref": top(self.brand_pref[u], self.brands),
            }
            for u in range(len(self))
        ]
        return {"segments": self.segment_prefs, "users": users}


def _affinity(p: np.ndarray) -> np.ndarray:
    """Preference probabilities -> affinities in [-1, 1] (0 at the uniform preference 1/V)."""
    v = p.shape[-1]
    return np.tanh(0.6 * (v * p - 1.0))


def _top_values(values: list[str], k: int) -> list[str]:
    counts: dict[str, int] = {}
    for v in values:
        if v:
            counts[v] = counts.get(v, 0) + 1
    return sorted(counts, key=lambda v: (-counts[v], v))[:k]


def build_users(catalog: Catalog, cfg: MarketConfig, index: CatalogIndex | None = None) -> Users:
    """Draw users: segments with preferences, and per-user preferences around them (non-IID clients).

    Parameters
    ----------
    catalog : Catalog
        Preferences range over its categories, colours (top 32) and brands (top 64).
    cfg : MarketConfig
        ``num_users``, ``num_segments``, ``segment_concentration``, ``seed``.
    index : optional
        A prebuilt catalog index (internal).

    Returns
    -------
    Users
    """
    index = index or CatalogIndex(catalog, cfg)
    rng = np.random.default_rng(random_streams(cfg.seed)["users"])
    colors = _top_values([norm(it.color) for it in catalog], 32)
    brands = _top_values([norm(it.brand) for it in catalog], 64)
    C, Vc, Vb, G, U = len(index.categories), len(colors), len(brands), cfg.num_segments, cfg.num_users

    def dirichlet(alpha: np.ndarray, size: int | None = None) -> np.ndarray:
        if alpha.shape[-1] == 0:
            return np.zeros((*(() if size is None else (size,)), 0))
        return rng.dirichlet(alpha, size=size)

    seg_cat = np.stack([dirichlet(np.full(C, 0.8)) for _ in range(G)])
    seg_col = np.stack([dirichlet(np.full(Vc, 0.6)) for _ in range(G)]) if Vc else np.zeros((G, 0))
    seg_brand = np.stack([dirichlet(np.full(Vb, 0.6)) for _ in range(G)]) if Vb else np.zeros((G, 0))
    seg_price = rng.uniform(-0.4, 1.0, size=G)
    segment = rng.integers(0, G, size=U)
    k = cfg.segment_concentration
    cat_pref = np.stack([dirichlet(k * seg_cat[s] + 0.05) for s in segment])
    col_pref = np.stack([dirichlet(k * seg_col[s] + 0.1) for s in segment]) if Vc else np.zeros((U, 0))
    brand_pref = np.stack([dirichlet(k * seg_brand[s] + 0.1) for s in segment]) if Vb else np.zeros((U, 0))
    price_sens = np.clip(seg_price[segment] + rng.normal(0.0, 0.25, size=U), -0.6, 1.0)

    zeros = np.zeros((U, 1))
    color_aff = np.hstack([_affinity(col_pref) if Vc else np.zeros((U, 0)), zeros])
    brand_aff = np.hstack([_affinity(brand_pref) if Vb else np.zeros((U, 0)), zeros])
    cpos = {c: i for i, c in enumerate(colors)}
    bpos = {b: i for i, b in enumerate(brands)}
    item_color = np.array([cpos.get(norm(it.color), Vc) for it in catalog], dtype=np.int64)
    item_brand = np.array([bpos.get(norm(it.brand), Vb) for it in catalog], dtype=np.int64)

    def top(p: np.ndarray, names: list[str], n: int = 5) -> dict[str, float]:
        return {names[i]: round(float(p[i]), 4) for i in np.argsort(-p, kind="stable")[:n]}

    segs = [
        {"segment": g, "price_sensitivity": round(float(seg_price[g]), 4),
         "top_categories": top(seg_cat[g], index.categories), "top_colors": top(seg_col[g], colors),
         "top_brands": top(seg_brand[g], brands), "num_users": int((segment == g).sum())}
        for g in range(G)
    ]
    return Users(
        segment=segment.astype(np.int32), category_pref=cat_pref, color_pref=col_pref, brand_pref=brand_pref,
        color_aff=color_aff, brand_aff=brand_aff, price_sensitivity=price_sens, categories=index.categories,
        colors=colors, brands=brands, item_color=item_color, item_brand=item_brand,
        item_price_z=index.price_z, segment_prefs=segs, _index=index,
    )
