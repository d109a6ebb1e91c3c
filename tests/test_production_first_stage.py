"""``market_slates.production_first_stage``: judged slates ordered by the simulator's production ranker."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest

from shared_model.schema import Catalog, CatalogItem, SessionLog
from simulations.market_config import make_config
from simulations.market_slates import production_first_stage

TITLES = ["blue cotton tshirt", "red cotton tshirt", "blue denim jeans", "black leather jacket",
          "blue tshirt slim", "green wool sweater"]


def _catalog() -> Catalog:
    return Catalog([CatalogItem(item_id=f"i{k}", title=t, category=t.split()[-1], color=t.split()[0],
                                price=10.0 + k) for k, t in enumerate(TITLES)], source="tiny")


def _sessions() -> SessionLog:
    items = np.array([0, 1, 2, 4, 3, 5, 0, 1], np.int32)  # slate 0: items 0,1,2,4; slate 1: 3,5,0,1
    m = len(items)
    return SessionLog(
        user=np.arange(2, dtype=np.int32), query=np.array([0, 1], np.int32), randomized=np.zeros(2, bool),
        timestamp=np.zeros(2, np.int64), offsets=np.array([0, 4, 8], np.int64), items=items,
        clicks=np.zeros(m, np.uint8), purchases=np.zeros(m, np.uint8),
        prod_rank=np.arange(m, dtype=np.int16) % 4, retrieval_score=np.zeros(m, np.float32),
        grades=np.array([3, 1, 0, 3, 0, 0, 1, 1], np.float32), utility=np.zeros(m, np.float32),
        queries=["blue tshirt", "leather jacket"])


def _idf_overlap(query: str, title: str) -> float:
    """IDF-weighted share of the query's words found in the title (numpy, from the tiny catalog's titles)."""
    n = len(TITLES)
    docs = [set(t.split()) for t in TITLES]
    idf = {w: np.log(1.0 + n / (sum(w in d for d in docs) + 1.0)) for d in docs for w in d}
    words = list(dict.fromkeys(query.split()))
    weights = np.array([idf.get(w, np.log(1.0 + n)) for w in words])
    found = np.array([w in set(title.split()) for w in words])
    return float((weights * found).sum() / weights.sum())


def test_noise_free_ranker_is_the_title_overlap() -> None:
    cfg = make_config("small", 0, popularity_weight=0.0, retrieval_noise=0.0)
    sessions = _sessions()
    out = production_first_stage(sessions, _catalog(), cfg, np.random.default_rng(0))
    for s, (a, b) in enumerate(zip(sessions.offsets[:-1], sessions.offsets[1:], strict=True)):
        query = sessions.queries[int(sessions.query[s])]
        ref = np.array([_idf_overlap(query, TITLES[i]) for i in sessions.items[a:b]])
        np.testing.assert_allclose(out.retrieval_score[a:b], ref, rtol=1e-6)
        # ranks follow the scores (ties broken by candidate order, as the simulator's stable lexsort does)
        np.testing.assert_array_equal(out.prod_rank[a:b], np.argsort(np.argsort(-ref, kind="stable"), kind="stable"))
    assert out.prod_rank[:4].tolist() == [0, 2, 3, 1]  # "blue tshirt": blue cotton tshirt, blue tshirt slim first
    for name in ("items", "grades", "clicks", "offsets", "query", "user"):
        np.testing.assert_array_equal(getattr(out, name), getattr(sessions, name))
    assert out.queries == sessions.queries


def test_popularity_and_noise_are_seeded() -> None:
    cfg = make_config("small", 3)
    a = production_first_stage(_sessions(), _catalog(), cfg, np.random.default_rng(5))
    b = production_first_stage(_sessions(), _catalog(), cfg, np.random.default_rng(5))
    c = production_first_stage(_sessions(), _catalog(), cfg, np.random.default_rng(6))
    np.testing.assert_array_equal(a.retrieval_score, b.retrieval_score)
    assert not np.array_equal(a.retrieval_score, c.retrieval_score)
    noise_free = production_first_stage(_sessions(), _catalog(), replace(cfg, retrieval_noise=0.0),
                                        np.random.default_rng(5))
    assert not np.allclose(a.retrieval_score, noise_free.retrieval_score)


def test_rows_outside_the_catalog_are_named() -> None:
    sessions = _sessions()
    bad = replace(sessions, items=np.where(sessions.items == 5, 9, sessions.items).astype(np.int32))
    with pytest.raises(ValueError, match="row 9.*tiny.*6 items"):
        production_first_stage(bad, _catalog(), make_config("small", 0), np.random.default_rng(0))
