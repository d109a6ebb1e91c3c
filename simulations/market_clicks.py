"""What shoppers see and do: ground-truth relevance, display order, position-biased clicks and purchases.

Graded relevance 0..3 comes from the intent; personal utility in [-1, 1] from the user's preferences (both kept
for evaluation only). A share of sessions (``randomized_share``, 5% by default; 0 = a log that never randomized)
show the slate in a uniformly random order (for position-propensity estimation); the others in production order.
"""

from __future__ import annotations

import numpy as np

from simulations.market_config import MarketConfig
from simulations.market_index import CatalogIndex
from simulations.market_queries import Intents
from simulations.market_slates import Slates

__all__ = ["click_model", "display_order", "relevance_grades"]


def relevance_grades(index: CatalogIndex, intents: Intents, slates: Slates) -> np.ndarray:
    """Graded relevance ``[M]`` (uint8) of each impression to its session's intent.

    Other category: 0. Vague intent: 3 for items rated >= 4.2, else 2. Specific intent: 3 when every requested
    attribute matches, 2 when at least half do, else 1.
    """
    it, sid = slates.items, slates.session
    same_cat = index.cat[it] == intents.cat[sid]
    nm = np.zeros(len(it), dtype=np.int64)
    for a in range(len(index.attr_names)):
        iv = intents.ival[sid, a]
        nm += (iv >= 0) & (index.attr_codes[a, it] == iv)
    nr = intents.n_req[sid]
    g_spec = np.where(nm == nr, 3, np.where(2 * nm >= nr, 2, 1))
    g_vague = np.where(index.rating[it] >= 4.2, 3, 2)
    return np.where(same_cat, np.where(intents.vague[sid], g_vague, g_spec), 0).astype(np.uint8)


def display_order(cfg: MarketConfig, slates: Slates, prod_rank: np.ndarray,
                  rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Which sessions are randomized ``[S]``, and the permutation ``[M]`` that puts impressions in display order.

    Display order is the production order, or a uniformly random permutation in randomized sessions.
    """
    sid = slates.session
    randomized = rng.random(len(slates.lengths)) < cfg.randomized_share
    dkey = np.where(randomized[sid], rng.random(len(sid)) * 1e6, prod_rank.astype(np.float64))
    return randomized, np.lexsort((dkey, sid))


def click_model(cfg: MarketConfig, pos: np.ndarray, grade: np.ndarray, util: np.ndarray,
                rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Position-based clicks ``[M]`` and purchases after clicks ``[M]`` (both bool).

    ``P(click) = (1 / (pos + 1)) ** eta * clip((eps + (1 - eps) * (2**grade - 1) / 7) * (1 + utility_gain *
    utility), 0, 1)``; ``P(buy | click) = clip((base + g2 [grade==2] + g3 [grade==3]) * (1 + purchase_utility *
    utility), 0, 1)``.
    """
    M = len(pos)
    exam = (1.0 / (pos + 1.0)) ** cfg.eta
    attract = cfg.click_eps + (1.0 - cfg.click_eps) * (2.0 ** grade.astype(np.float64) - 1.0) / 7.0
    attract = np.clip(attract * (1.0 + cfg.utility_gain * util), 0.0, 1.0)
    clicks = rng.random(M) < exam * attract
    p_buy = (cfg.purchase_base + cfg.purchase_grade2 * (grade == 2) + cfg.purchase_grade3 * (grade == 3))
    p_buy = np.clip(p_buy * (1.0 + cfg.purchase_utility * util), 0.0, 1.0)
    buys = clicks & (rng.random(M) < p_buy)
    return clicks, buys
