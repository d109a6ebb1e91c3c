"""Prepare a data folder for training: feature store, query embeddings, propensities, train/test split.

A data folder holds ``catalog.jsonl`` (+ images, video frames) and ``sessions.npz``; the simulator writes both,
and a real catalog can be simulated over (``fedrank generate --catalog``). :func:`prepare` adds
``features/`` (item embeddings, cached by content hash: :func:`shared_model.features.feature_cache_dir`), ``queries.npy`` and
``propensity.json``, and returns everything in memory as :class:`Prepared`.

Position propensities (:func:`estimate_from_log`, on the training sessions) come from the randomized sessions when
the log has any, else (``propensity="auto"``, the default) by intervention harvesting: the same item for the same
query shown at different positions (``shared_model.propensity.harvest_counts``, AllPairs).
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from shared_model.catalog_io import load_catalog
from shared_model.data import ItemTable, Slates, build_slates, split_by_time
from shared_model.embedding_cache import feature_cache_dir
from shared_model.features import FeatureStore, build_feature_store, encode_queries
from shared_model.head_features import MAX_POSITIONS
from shared_model.logs_io import load_log_extra
from shared_model.propensity import (
    aggregate_position_counts,
    fit_power_law,
    harvest_counts,
    harvest_propensities,
)
from shared_model.schema import Catalog, SessionLog, atomic_write

log = logging.getLogger(__name__)
TEST_FRAC = 0.2
PROPENSITY_ESTIMATORS = ("auto", "randomized", "harvest")


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
    propensity_info: dict[str, Any] = field(default_factory=dict)  # what propensity.json says (estimator, ...)

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

    def propensity_summary(self, positions: int = 10) -> dict[str, Any]:
        """For results files: the estimator, ``eta`` and the first ``positions`` propensities (and, when harvested,
        the raw AllPairs curve)."""
        out: dict[str, Any] = {"estimator": self.propensity_info.get("estimator", "given"), "eta": float(self.eta),
                               "propensities": [round(float(v), 5) for v in self.propensities[:positions]]}
        if "allpairs_curve" in self.propensity_info:
            out["allpairs_curve"] = self.propensity_info["allpairs_curve"][:positions]
        return out


def _session_positions(log_: SessionLog, sessions: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Impression rows ``[M']`` of ``sessions`` and their 0-based display positions ``[M']``."""
    lens = log_.offsets[sessions + 1] - log_.offsets[sessions]
    rows = np.concatenate([np.arange(log_.offsets[s], log_.offsets[s + 1]) for s in sessions]) \
        if len(sessions) else np.zeros(0, dtype=np.int64)
    pos = rows - np.repeat(log_.offsets[sessions], lens)
    return rows, pos


def estimate_from_log(
    log_: SessionLog, sessions: np.ndarray, estimator: str = "auto"
) -> tuple[float, np.ndarray, dict[str, Any]]:
    """Position propensities ``[MAX_POSITIONS]`` from the sessions ``sessions`` of a log.

    Parameters
    ----------
    estimator : {"auto", "randomized", "harvest"}
        ``randomized``: power law fitted to the CTR by position of the randomized sessions (display order was
        random); an error without any. ``harvest``: intervention harvesting over every session (the same item
        for the same query at different positions; AllPairs, then a power law fitted to its curve).
        ``auto``: randomized when there are randomized sessions, else harvest.

    Returns
    -------
    eta, propensities, info
        ``info`` is what ``propensity.json`` records besides ``eta`` and ``propensities``: the estimator used,
        what it was estimated from and, for harvesting, the raw AllPairs curve (``null`` where not identified).
    """
    if estimator not in PROPENSITY_ESTIMATORS:
        raise ValueError(f"propensity estimator must be one of {PROPENSITY_ESTIMATORS}, got {estimator!r}")
    sessions = np.asarray(sessions, dtype=np.int64)
    rnd = sessions[log_.randomized[sessions]]
    if estimator == "randomized" or (estimator == "auto" and len(rnd) > 0):
        if len(rnd) == 0:
            raise ValueError("no randomized sessions in the log: cannot estimate position propensities from them "
                             "(use the harvest estimator)")
        rows, pos = _session_positions(log_, rnd)
        impressions, clicks = aggregate_position_counts(pos, log_.clicks[rows], max_positions=MAX_POSITIONS)
        eta, props = fit_power_law(impressions, clicks)
        info: dict[str, Any] = {"estimator": "randomized", "estimated_from": "randomized training sessions",
                                "sessions": int(len(rnd))}
        return float(eta), np.asarray(props, dtype=np.float32), info
    if estimator == "auto":
        log.info("no randomized sessions in the log: harvesting position propensities from the production order")
    rows, pos = _session_positions(log_, sessions)
    sid = np.repeat(sessions, log_.offsets[sessions + 1] - log_.offsets[sessions])
    num_items = int(log_.items.max()) + 1 if len(log_.items) else 1
    groups = log_.query[sid].astype(np.int64) * num_items + log_.items[rows]  # the same item for the same query
    c, n = harvest_counts(groups, pos, log_.clicks[rows], max_positions=MAX_POSITIONS)
    eta, props, curve = harvest_propensities(c, n, smoothing="powerlaw")
    info = {"estimator": "harvest",
            "estimated_from": "training sessions: the same item for the same query at different positions "
                              "(intervention harvesting, AllPairs)",
            "sessions": int(len(sessions)), "smoothing": "powerlaw",
            "harvested_weight": float(n.sum() / 2.0),
            "allpairs_curve": [round(float(v), 6) if np.isfinite(v) else None for v in curve]}
    return float(eta), np.asarray(props, dtype=np.float32), info


def prepare(data_dir: str | Path, progress: bool = True, propensity: str = "auto") -> Prepared:
    """Load and prepare a data folder (see the module docstring); ``propensity``: the estimator of
    :func:`estimate_from_log` (``auto``: randomized sessions when the log has any, else harvesting)."""
    if propensity not in PROPENSITY_ESTIMATORS:
        raise ValueError(f"propensity estimator must be one of {PROPENSITY_ESTIMATORS}, got {propensity!r}")
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
    extra = load_log_extra(data_dir)  # an imported shop log: lists the shopper re-sorted say nothing of position
    bias_idx = train_idx if extra is None else train_idx[~extra.resorted[train_idx]]
    eta, props, how = estimate_from_log(log_, bias_idx, propensity)
    info = {"eta": eta, "propensities": props.tolist(), **how}
    atomic_write(data_dir / "propensity.json", lambda f: f.write(json.dumps(info, indent=1).encode()))
    log.info("prepared %s: %d items, %d sessions (%d train / %d test), eta=%.3f (%s)",
             data_dir, len(catalog), len(log_), len(train_idx), len(test_idx), eta, how["estimator"])
    return Prepared(data_dir, catalog, log_, store, query_emb, props, eta, train_idx, test_idx, info)
