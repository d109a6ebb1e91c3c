"""Prepare a data folder for training: feature store, query embeddings, propensities, train/test split.

A data folder holds ``catalog.jsonl`` (+ images, video frames) and ``sessions.npz``; the simulator writes both,
and a real catalog can be simulated over (``fedrank generate --catalog``). :func:`prepare` adds
``features/`` (item embeddings, cached by content hash: :func:`shared_model.features.feature_cache_dir`), ``queries.npy`` and
``propensity.json``, and returns everything in memory as :class:`Prepared`.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from shared_model.catalog_io import load_catalog
from shared_model.data import ItemTable, Slates, build_slates, split_by_time
from shared_model.embedding_cache import feature_cache_dir
from shared_model.features import FeatureStore, build_feature_store, encode_queries
from shared_model.head_features import MAX_POSITIONS
from shared_model.propensity import aggregate_position_counts, fit_power_law
from shared_model.schema import Catalog, SessionLog, atomic_write

log = logging.getLogger(__name__)
TEST_FRAC = 0.2


@dataclass
class Prepared:
    data_dir: Path
    catalog: Catalog
    log: SessionLog
    store: FeatureStore
    query_emb: np.ndarray  # [Q, 384]
    propensities: np.ndarray  # [MAX_POSITIONS]
    eta: float
    train_idx: np.ndarray
    test_idx: np.ndarray

    @property
    def prices(self) -> np.ndarray:
        return np.array([it.price for it in self.catalog.items], dtype=np.float64)

    def table(self) -> ItemTable:
        return ItemTable.from_store(self.store)

    def slates(self, which: str) -> Slates:
        idx = {"train": self.train_idx, "test": self.test_idx}[which]
        return build_slates(self.log, self.query_emb, self.prices, sessions=idx)

    def fit_validation_slates(self, val_frac: float) -> tuple[Slates, Slates]:
        """The training sessions split for early stopping: the last ``val_frac`` of each shopper's training
        sessions are validation slates, the rest are fitted on (every centralized ranker uses this split)."""
        fit_idx, val_idx = split_by_time(self.log.subset(self.train_idx), val_frac)
        fit = build_slates(self.log, self.query_emb, self.prices, sessions=self.train_idx[fit_idx])
        val = build_slates(self.log, self.query_emb, self.prices, sessions=self.train_idx[val_idx])
        return fit, val

    def propensity_tensor(self) -> torch.Tensor:
        return torch.from_numpy(self.propensities.astype(np.float32))


def estimate_from_log(log_: SessionLog, sessions: np.ndarray) -> tuple[float, np.ndarray]:
    """Fit position propensities on the randomized sessions among ``sessions`` (display order was random)."""
    rnd = sessions[log_.randomized[sessions]]
    if len(rnd) == 0:
        raise ValueError("no randomized sessions in the log: cannot estimate position propensities")
    pos = np.concatenate([np.arange(log_.offsets[s + 1] - log_.offsets[s]) for s in rnd])
    clk = np.concatenate([log_.clicks[log_.slate(int(s))] for s in rnd])
    impressions, clicks = aggregate_position_counts(pos, clk, max_positions=MAX_POSITIONS)
    eta, props = fit_power_law(impressions, clicks)
    return float(eta), np.asarray(props, dtype=np.float32)


def prepare(data_dir: str | Path, progress: bool = True) -> Prepared:
    data_dir = Path(data_dir)
    catalog_path = data_dir / "catalog.jsonl"
    sessions_path = data_dir / "sessions.npz"
    for p in (catalog_path, sessions_path):
        if not p.is_file():
            raise FileNotFoundError(f"{p}: missing; generate data first (fedrank generate --out {data_dir})")
    catalog = load_catalog(catalog_path)
    log_ = SessionLog.load(sessions_path)
    log_.check_catalog(len(catalog), str(sessions_path))  # a log from another catalog: fail here, naming the file
    cache = feature_cache_dir(data_dir)
    store = build_feature_store(catalog, cache, progress=progress)
    query_emb = encode_queries(log_.queries, cache, progress=progress)
    train_idx, test_idx = split_by_time(log_, TEST_FRAC)
    eta, props = estimate_from_log(log_, train_idx)
    info = {"eta": eta, "propensities": props.tolist(), "estimated_from": "randomized training sessions"}
    atomic_write(data_dir / "propensity.json", lambda f: f.write(json.dumps(info, indent=1).encode()))
    log.info("prepared %s: %d items, %d sessions (%d train / %d test), eta=%.3f",
             data_dir, len(catalog), len(log_), len(train_idx), len(test_idx), eta)
    return Prepared(data_dir, catalog, log_, store, query_emb, props, eta, train_idx, test_idx)
