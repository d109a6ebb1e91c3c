"""A small synthetic prepared data set (random embeddings, a planted relevance signal) for fast unit tests of
training, client handlers and the server loop, without running the simulator or the encoders."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from shared_model.data import split_by_time
from shared_model.features import FeatureStore
from shared_model.prepared import Prepared
from shared_model.schema import IMAGE_DIM, Catalog, CatalogItem, SessionLog


def synthetic_prepared(tmp: Path, num_items: int = 60, num_users: int = 8, sessions_per_user: int = 6,
                       slate: int = 12, seed: int = 0) -> Prepared:
    rng = np.random.default_rng(seed)
    text = rng.normal(size=(num_items, 384)).astype(np.float32)
    text /= np.linalg.norm(text, axis=1, keepdims=True)
    store = FeatureStore(
        item_ids=[f"i{k}" for k in range(num_items)], text=text,
        image=rng.normal(size=(num_items, IMAGE_DIM)).astype(np.float32),
        video=rng.normal(size=(num_items, IMAGE_DIM)).astype(np.float32),
        mask=np.c_[np.ones(num_items, bool), rng.random(num_items) < 0.8, rng.random(num_items) < 0.3],
        dense=rng.normal(size=(num_items, 4)).astype(np.float32),
    )
    catalog = Catalog([CatalogItem(item_id=f"i{k}", title=f"item {k}", price=float(10 + k)) for k in range(num_items)])
    n = num_users * sessions_per_user
    queries = [f"query {q}" for q in range(10)]
    qemb = text[rng.choice(num_items, size=len(queries), replace=False)] + 0.1 * rng.normal(size=(10, 384))
    qemb = (qemb / np.linalg.norm(qemb, axis=1, keepdims=True)).astype(np.float32)
    items = np.stack([rng.choice(num_items, size=slate, replace=False) for _ in range(n)]).astype(np.int32)
    query = rng.integers(0, len(queries), size=n).astype(np.int32)
    sim = np.einsum("nd,nsd->ns", qemb[query], text[items])
    grades = np.clip(np.digitize(sim, [0.0, 0.1, 0.2]), 0, 3).astype(np.uint8)
    exam = 1.0 / (np.arange(slate) + 1.0)
    clicks = (rng.random((n, slate)) < exam * (0.05 + 0.9 * grades / 3)).astype(np.uint8)
    log = SessionLog(
        user=np.repeat(np.arange(num_users), sessions_per_user).astype(np.int32), query=query,
        randomized=rng.random(n) < 0.3, timestamp=np.tile(np.arange(sessions_per_user), num_users).astype(np.int64),
        offsets=np.arange(0, n * slate + 1, slate).astype(np.int64), items=items.ravel(),
        clicks=clicks.ravel(), purchases=np.zeros(n * slate, np.uint8),
        prod_rank=np.tile(np.arange(slate), n).astype(np.int16),
        retrieval_score=rng.normal(size=n * slate).astype(np.float32),
        grades=grades.ravel(), utility=np.zeros(n * slate, np.float32), queries=queries,
    )
    train_idx, test_idx = split_by_time(log, 0.2)
    props = (1.0 / (np.arange(50) + 1.0)).astype(np.float32)
    tmp.mkdir(parents=True, exist_ok=True)
    (tmp / "propensity.json").write_text('{"eta": 1.0}')
    return Prepared(tmp, catalog, log, store, qemb, props, 1.0, train_idx, test_idx)
