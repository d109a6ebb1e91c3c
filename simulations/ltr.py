"""The learning-to-rank baseline a practitioner would set up: LightGBM LambdaRank over hand-made features.

Per candidate, :func:`candidate_features` computes (:func:`feature_names`, in order): the query-title cosine (MiniLM),
BM25 of the query against the item's text (:class:`~simulations.baselines.BM25Ranker`), the head's 7 dense features
(``head_features.ITEM_DENSE_NAMES`` + ``SLATE_DENSE_NAMES``), has-image / has-video flags, the cosine between the
shopper's on-device context (``head_features.user_context``) and the item (text and image) with a has-history flag,
and a PCA of the image and video embeddings (numpy SVD, fitted on the items of the training sessions; 0 where the
modality is missing).

Training uses the clicks the heads see (the prepared data's training sessions; the last ``val_frac`` of each
shopper's are held out exactly as ``centralized.train_central`` does) and never the graded relevance. Labels are 0
(no click), 1 (click), 2 (purchase, when the log has any). How inverse propensity enters LightGBM (``ips``):

``"gain"`` (default, lambdarank)
    Each click's gain is ``(2**label - 1) * min(1 / propensity[position], clip)``; the distinct gains become
    LightGBM's ``label_gain`` (labels are their ranks), so every pair's lambda carries the IPS weight of its click.
    LightGBM divides a query's lambdas by its ideal DCG; every row of the query is weighted by that ideal DCG to
    undo it, so the boosted objective is the sum over sessions of IPS-estimated DCG: what ``ips_click_dcg``
    measures on the validation sessions for early stopping.
``"rows"``
    Row weights ``min(1 / propensity, clip)`` on clicked rows, 1 elsewhere (the heads' softmax loss weights only
    clicked items). LightGBM 4.x's ``RankingObjective::GetGradients`` (``src/objective/rank_objective.hpp``)
    multiplies each row's summed lambda and hessian by that row's own weight after the per-query pairwise pass,
    so a pair (click i, skip j) pushes i up with weight w_i but pushes j down with weight 1: a heuristic, not an
    unbiased estimator. (Only the ``ndcg`` *metric* weights per query, by the mean of the rows' weights;
    ``tests/test_ltr.py`` checks that the objective does not.)
``"position"``
    Not IPS: LightGBM's own position-bias correction (Unbiased LambdaMART; the ``position`` field of the
    Dataset), which learns a per-position bias factor beside the trees and ranks without it; for comparison.
``"none"``
    Naive clicks.

Trained on relevance judgments instead (:meth:`LambdaRankRanker.fit_judged`, ``fedrank evaluate --judgments
--ltr-judgments``): the labels are the grades' gains (``2**g - 1`` or ``g``, decimal grades too) encoded as
``label_gain`` the same way, with no weights (judgments have no position bias), and early stopping keeps the round
with the best judged NDCG@10 of the validation queries; :func:`judged_config` loosens ``min_data_in_leaf`` for a
judgments file's few rows.

``objective="binary"`` is the pointwise variant: click / no click with the ``"rows"`` weights. Every fit is
deterministic (``deterministic``, ``force_row_wise``, a fixed ``seed`` and ``num_threads``).
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import lightgbm as lgb
import numpy as np
import torch

from shared_model.data import Slates
from shared_model.features import FeatureStore
from shared_model.head_features import (
    ITEM_DENSE_NAMES,
    SLATE_DENSE_NAMES,
    head_dense,
    user_context,
    weigh_image,
)
from shared_model.losses import ips_weights
from shared_model.metrics import ndcg_at_k
from shared_model.prepared import Prepared
from shared_model.schema import SessionLog, atomic_write
from shared_model.training import ips_click_dcg
from simulations.baselines import BM25Ranker

log = logging.getLogger(__name__)

FORMAT = "fedrank-lightgbm-ranker/1"
IPS_MODES = ("gain", "rows", "position", "none")
OBJECTIVES = ("lambdarank", "binary")
VAL_METRIC = "val_ips_dcg@10"
JUDGED_VAL_METRIC = "val_ndcg@10"  # judged NDCG@10 of the validation queries (:meth:`LambdaRankRanker.fit_judged`)
BASE_FEATURES = (
    "query_title_cosine", "bm25", *ITEM_DENSE_NAMES, *SLATE_DENSE_NAMES, "has_image", "has_video",
    "user_text_cosine", "user_image_cosine", "has_history",
)


@dataclass(frozen=True)
class LtrConfig:
    """A LightGBM ranker: features, how clicks become labels and weights, and boosting settings."""

    objective: str = "lambdarank"
    ips: str = "gain"  # one of IPS_MODES (see the module docstring)
    ips_clip: float = 20.0  # as train.ips-clip
    purchase_label: bool = True  # purchase = label 2 when the log has purchases
    image_components: int = 16
    video_components: int = 8
    # boosting; the regularisation was chosen on the validation IPS-DCG@10 of the default marketplace
    num_leaves: int = 15
    learning_rate: float = 0.05
    min_data_in_leaf: int = 200
    lambda_l2: float = 10.0
    feature_fraction: float = 0.8
    bagging_fraction: float = 0.8  # with bagging_freq 1 (seeded: still deterministic)
    max_rounds: int = 500
    early_stopping: int = 50  # rounds without a better validation IPS-DCG@10
    num_threads: int = 2
    seed: int = 0

    def __post_init__(self) -> None:
        if self.objective not in OBJECTIVES:
            raise ValueError(f"objective must be one of {OBJECTIVES}, got {self.objective!r}")
        if self.ips not in IPS_MODES:
            raise ValueError(f"ips must be one of {IPS_MODES}, got {self.ips!r}")
        if self.objective == "binary" and self.ips in ("gain", "position"):
            raise ValueError(f"ips={self.ips!r} needs the lambdarank objective; use ips='rows' with 'binary'")


def feature_names(cfg: LtrConfig) -> list[str]:
    """The F feature columns, in :func:`candidate_features` order (38 with the default 16 + 8 components)."""
    return [*BASE_FEATURES, *(f"image_pc{k}" for k in range(cfg.image_components)),
            *(f"video_pc{k}" for k in range(cfg.video_components))]


# ------------------------------------------------------------------------------------------- features


def _pca(x: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """(mean [D], basis [k, D]) of rows ``x`` [M, D] by SVD; rows past min(M, D) are zero; signs fixed so that
    each component's largest-magnitude loading is positive."""
    d = x.shape[1]
    basis = np.zeros((k, d), np.float64)
    if len(x) == 0:
        return np.zeros(d, np.float64), basis
    mean = x.mean(0, dtype=np.float64)
    _, _, vt = np.linalg.svd(x.astype(np.float64) - mean, full_matrices=False)  # vt [min(M, D), D]
    m = min(k, vt.shape[0])
    top = vt[:m]
    signs = np.sign(top[np.arange(m), np.abs(top).argmax(1)])
    basis[:m] = top * signs[:, None]
    return mean, basis


@dataclass
class ItemProjection:
    """PCA of the image and video embeddings, fitted once on training items."""

    image_mean: np.ndarray  # [Di]
    image_basis: np.ndarray  # [Ki, Di]
    video_mean: np.ndarray  # [Dv]
    video_basis: np.ndarray  # [Kv, Dv]

    @classmethod
    def fit(cls, store: FeatureStore, rows: np.ndarray, cfg: LtrConfig) -> ItemProjection:
        """``rows``: the catalog rows to fit on (the training sessions' items); only those with the modality."""
        rows = np.unique(rows)
        img = rows[store.mask[rows, 1]]
        vid = rows[store.mask[rows, 2]]
        im, ib = _pca(weigh_image(store.image[img]), cfg.image_components)
        vm, vb = _pca(weigh_image(store.video[vid]), cfg.video_components)
        return cls(im, ib, vm, vb)

    def transform(self, store: FeatureStore) -> tuple[np.ndarray, np.ndarray]:
        """Per catalog row: image [num_items, Ki] and video [num_items, Kv] components (0 without the modality)."""
        img = (weigh_image(store.image).astype(np.float64) - self.image_mean) @ self.image_basis.T
        vid = (weigh_image(store.video).astype(np.float64) - self.video_mean) @ self.video_basis.T
        return (np.where(store.mask[:, 1:2], img, 0.0).astype(np.float32),
                np.where(store.mask[:, 2:3], vid, 0.0).astype(np.float32))


CHUNK = 256  # slates per block when gathering embeddings (a [CHUNK, S, D] block, never [N, S, D])


def _cosine(a: np.ndarray, table: np.ndarray, items: np.ndarray) -> np.ndarray:
    """Cosine of ``a`` [N, D] with the rows ``table[items]`` ([M, D] gathered by [N, S]) -> [N, S] float32; 0 where
    either vector is zero."""
    na = np.linalg.norm(a, axis=-1)  # [N]
    nt = np.linalg.norm(table, axis=-1)  # [M]
    dot = np.zeros(items.shape, np.float32)
    for lo in range(0, len(items), CHUNK):
        blk = slice(lo, lo + CHUNK)
        dot[blk] = np.einsum("nd,nsd->ns", a[blk], table[items[blk]])
    denom = na[:, None] * nt[items]  # [N, S]
    return np.where(denom > 0, dot / np.maximum(denom, 1e-12), 0.0).astype(np.float32)


def candidate_features(slates: Slates, queries: Sequence[str], store: FeatureStore, bm25: BM25Ranker,
                       projection: ItemProjection) -> np.ndarray:
    """``[N, S, F]`` float32 features (``feature_names`` order) of N slates of S candidates; 0 at padding.

    Parameters
    ----------
    slates : the slates (``items`` [N, S] are rows of ``store``; ``valid`` [N, S])
    queries : [N] each slate's query text (for BM25)
    store : the catalog's feature store
    bm25 : BM25 over the same catalog's item texts
    projection : the image / video PCA fitted on training items
    """
    items = slates.items.numpy()  # [N, S]
    valid = slates.valid.numpy()  # [N, S]
    q = slates.query.numpy()  # [N, Dt]
    cos = _cosine(q, store.text, items)  # as CosineRanker, a block at a time
    bm = bm25.score(list(queries), items) if len(slates) else np.zeros(items.shape, np.float32)
    dense = head_dense(store.dense[items], slates.slate_dense.numpy())  # [N, S, 7]
    mask = store.mask[items].astype(np.float32)  # [N, S, 3]
    ui, uv = slates.user_items.numpy(), slates.user_valid.numpy()  # [N, H]
    u_text = np.zeros(q.shape, np.float32)  # [N, Dt]
    image = weigh_image(store.image)  # [M, Di]
    u_image = np.zeros((len(items), image.shape[1]), np.float32)  # [N, Di]
    u_mask = np.zeros((len(items), 1), np.float32)  # [N, 1]
    for lo in range(0, len(items), CHUNK):
        blk = slice(lo, lo + CHUNK)
        u_text[blk], u_image[blk], u_mask[blk] = user_context(store.text[ui[blk]], image[ui[blk]],
                                                              store.mask[ui[blk]][..., 1], uv[blk])
    u_text_cos = _cosine(u_text, store.text, items)  # [N, S]
    u_image_cos = _cosine(u_image, image, items) * mask[..., 1]  # [N, S]
    img_pc, vid_pc = projection.transform(store)
    cols = [cos[..., None], bm[..., None], dense, mask[..., 1:3], u_text_cos[..., None], u_image_cos[..., None],
            np.broadcast_to(u_mask[:, None, :], (*items.shape, 1)), img_pc[items], vid_pc[items]]
    x = np.concatenate([np.asarray(c, np.float32) for c in cols], axis=-1)  # [N, S, F]
    return np.where(valid[..., None], x, 0.0).astype(np.float32)


def slate_queries(log_: SessionLog, slates: Slates) -> list[str]:
    """[N] the query text of each slate's session."""
    return [log_.queries[int(log_.query[s])] for s in slates.session_ids]


# ------------------------------------------------------------------------------------------- labels


def click_labels(slates: Slates, purchase_label: bool) -> np.ndarray:
    """[N, S] int: 0 no click, 1 click, 2 purchase (when ``purchase_label`` and the slates have purchases)."""
    clicks = slates.clicks.numpy() > 0
    labels = clicks.astype(np.int64)
    purch = slates.purchases.numpy() > 0
    if purchase_label and purch.any():
        labels = np.where(purch, 2, labels)
    return labels


def ips_gain_encoding(labels: np.ndarray, weights: np.ndarray, valid: np.ndarray, truncation: int
                      ) -> tuple[np.ndarray, list[float], np.ndarray]:
    """IPS gains as LightGBM lambdarank labels (see the module docstring).

    Parameters
    ----------
    labels : [N, S] 0 / 1 / 2
    weights : [N, S] clipped inverse propensities of the display positions
    valid : [N, S] bool
    truncation : LightGBM's ``lambdarank_truncation_level`` (the depth of its ideal DCG)

    Returns
    -------
    (int labels [N, S] (ranks of the distinct gains), label_gain [G] ascending, starting at 0,
     per-slate weight [N] = ideal DCG@truncation of the slate's gains, which cancels LightGBM's 1 / ideal DCG)
    """
    gain = np.where(valid & (labels > 0), (np.exp2(labels) - 1.0) * weights, 0.0)  # [N, S]
    table = np.unique(np.concatenate([[0.0], gain.ravel()]))  # ascending, 0 first
    codes = np.searchsorted(table, gain).astype(np.int64)
    ideal = -np.sort(-gain, axis=1)[:, :truncation]  # [N, min(S, truncation)]
    idcg = (ideal / np.log2(np.arange(ideal.shape[1]) + 2.0)).sum(1)  # [N]
    return codes, table.tolist(), idcg


TRUNCATION = 30  # LightGBM's default lambdarank_truncation_level, set explicitly


def grade_gains(grades: np.ndarray, gain: str) -> np.ndarray:
    """NDCG's gain of each grade [N, S]: ``2**g - 1`` (``exp2``) or ``g`` (``linear``), as float64."""
    g = np.asarray(grades, np.float64)
    if gain == "exp2":
        return np.exp2(g) - 1.0
    if gain == "linear":
        return g
    raise ValueError(f"gain must be 'exp2' or 'linear', got {gain!r}")


def gain_labels(gains: np.ndarray, valid: np.ndarray) -> tuple[np.ndarray, list[float]]:
    """Graded gains [N, S] (>= 0) as LightGBM lambdarank labels: (int labels [N, S], the ranks of the distinct
    gains, 0 at padding; ``label_gain`` [G] ascending, starting at 0), so that ``label_gain[label] == gain``."""
    g = np.where(valid, np.asarray(gains, np.float64), 0.0)
    table = np.unique(np.concatenate([[0.0], g.ravel()]))  # ascending, 0 first
    return np.searchsorted(table, g).astype(np.int64), table.tolist()


def judged_config(base: LtrConfig, fit_rows: int) -> LtrConfig:
    """``base`` for a judgments file, usually far smaller than a click log: ``min_data_in_leaf`` becomes
    ``fit_rows // 20`` clipped to [5, base.min_data_in_leaf] so that trees can split at all."""
    return replace(base, min_data_in_leaf=int(np.clip(fit_rows // 20, 5, max(5, base.min_data_in_leaf))))


def training_targets(fit: Slates, cfg: LtrConfig, propensities: torch.Tensor
                     ) -> tuple[np.ndarray, list[float] | None, np.ndarray | None]:
    """LightGBM's labels [R], ``label_gain`` (lambdarank) and row weights [R] (or None) for the R real
    candidates of ``fit``, by ``cfg.ips`` (see the module docstring)."""
    valid = fit.valid.numpy()  # [N, S]
    labels = click_labels(fit, cfg.purchase_label)  # [N, S]
    w = ips_weights(fit.positions, propensities, clip=cfg.ips_clip).numpy().astype(np.float64)  # [N, S]
    label_gain: list[float] | None = None
    row_w: np.ndarray | None = None
    if cfg.ips == "gain":
        labels, label_gain, idcg = ips_gain_encoding(labels, w, valid, TRUNCATION)
        row_w = np.broadcast_to(idcg[:, None], valid.shape)[valid]
    elif cfg.ips == "rows":
        row_w = np.where(labels > 0, w, 1.0)[valid]
    if cfg.objective == "binary":
        labels = (labels > 0).astype(np.int64)
    elif label_gain is None:
        label_gain = [float(2**k - 1) for k in range(int(labels.max(initial=0)) + 1)]
    return labels[valid], label_gain, row_w


# ------------------------------------------------------------------------------------------- ranker


@dataclass
class LambdaRankRanker:
    """LightGBM over :func:`candidate_features`; ``fit`` on click logs, ``score`` any slates of a catalog."""

    config: LtrConfig = field(default_factory=LtrConfig)
    projection: ItemProjection | None = None
    booster: lgb.Booster | None = None
    best_iteration: int = 0

    def _params(self, label_gain: list[float] | None) -> dict[str, Any]:
        c = self.config
        params: dict[str, Any] = {
            "objective": c.objective, "metric": "None", "num_leaves": c.num_leaves, "learning_rate": c.learning_rate,
            "min_data_in_leaf": c.min_data_in_leaf, "lambda_l2": c.lambda_l2, "feature_fraction": c.feature_fraction,
            "bagging_fraction": c.bagging_fraction, "bagging_freq": int(c.bagging_fraction < 1.0),
            "num_threads": c.num_threads, "seed": c.seed,
            "deterministic": True, "force_row_wise": True, "verbosity": -1,
        }
        if c.objective == "lambdarank":
            params["lambdarank_truncation_level"] = TRUNCATION
        if label_gain is not None:
            params["label_gain"] = label_gain
        return params

    def _rows(self, slates: Slates, queries: Sequence[str], store: FeatureStore, bm25: BM25Ranker) -> np.ndarray:
        if self.projection is None:
            raise RuntimeError("LambdaRankRanker: fit it (or load it) before scoring")
        return candidate_features(slates, queries, store, bm25, self.projection)[slates.valid.numpy()]

    def fit(self, fit: Slates, fit_queries: Sequence[str], val: Slates, val_queries: Sequence[str],
            store: FeatureStore, bm25: BM25Ranker, propensities: np.ndarray) -> dict[str, Any]:
        """Boost on ``fit``'s clicks; keep the round with the best IPS-DCG@10 of ``val``'s clicks.

        Returns ``{"seconds", "best_iteration", "rounds_run", VAL_METRIC, "fit_rows", "fit_sessions"}``.
        """
        c = self.config
        t0 = time.perf_counter()
        props = torch.as_tensor(np.asarray(propensities, np.float32))
        self.projection = ItemProjection.fit(store, fit.items.numpy()[fit.valid.numpy()], c)
        if c.objective == "lambdarank":  # a slate without clicks has no pair to learn from (the heads skip it too)
            keep = np.flatnonzero(fit.clicks.numpy().sum(1) > 0)
            fit, fit_queries = fit.select(keep), [fit_queries[int(i)] for i in keep]
        valid = fit.valid.numpy()  # [N, S]
        labels, label_gain, row_w = training_targets(fit, c, props)
        ranking = c.objective == "lambdarank"
        train = lgb.Dataset(self._rows(fit, fit_queries, store, bm25), label=labels, weight=row_w,
                            group=valid.sum(1) if ranking else None, feature_name=feature_names(c),
                            position=fit.positions.numpy()[valid] if c.ips == "position" else None)
        xv = self._rows(val, val_queries, store, bm25)
        vvalid = val.valid.numpy()
        vset = lgb.Dataset(xv, label=click_labels(val, False)[vvalid], reference=train,
                           group=vvalid.sum(1) if ranking else None)

        def val_ips_dcg(preds: np.ndarray, _: lgb.Dataset) -> tuple[str, float, bool]:
            scores = np.full(vvalid.shape, -np.inf)
            scores[vvalid] = preds
            return VAL_METRIC, ips_click_dcg(scores, val, props), True

        info = self._boost(label_gain, train, vset, VAL_METRIC, val_ips_dcg, t0)
        info.update(fit_rows=int(valid.sum()), fit_sessions=len(fit))
        log.info("lightgbm %s (ips=%s): %d rounds, best %d, validation IPS-DCG@10 %.4f, %.1f s", c.objective, c.ips,
                 info["rounds_run"], info["best_iteration"], info[VAL_METRIC], info["seconds"])
        return info

    def _boost(self, label_gain: list[float] | None, train: lgb.Dataset, vset: lgb.Dataset, metric: str,
               feval: Callable[[np.ndarray, lgb.Dataset], tuple[str, float, bool]], t0: float) -> dict[str, Any]:
        """Boost until ``metric`` (``feval`` on ``vset``, higher is better) stops improving; keep its best round."""
        c = self.config
        history: dict[str, Any] = {}
        booster = lgb.train(self._params(label_gain), train, num_boost_round=c.max_rounds, valid_sets=[vset],
                            valid_names=["val"], feval=feval,
                            callbacks=[lgb.early_stopping(c.early_stopping, verbose=False),
                                       lgb.record_evaluation(history)])
        self.booster, self.best_iteration = booster, int(booster.best_iteration or booster.current_iteration())
        curve = history["val"][metric]
        return {"seconds": time.perf_counter() - t0, "best_iteration": self.best_iteration, "rounds_run": len(curve),
                metric: float(curve[self.best_iteration - 1]), "config": asdict(c),
                "val_curve": [round(float(v), 5) for v in curve]}

    def fit_judged(self, fit: Slates, fit_queries: Sequence[str], val: Slates, val_queries: Sequence[str],
                   store: FeatureStore, bm25: BM25Ranker, gain: str) -> dict[str, Any]:
        """Boost on ``fit``'s graded judgments (``grades`` [N, S]); keep the round with the best judged NDCG@10 of
        ``val``. Labels are the grades' gains (``gain``: ``exp2`` = ``2**g - 1`` or ``linear`` = ``g``) through
        :func:`gain_labels`, unweighted: LightGBM's per-query 1 / ideal DCG then makes the objective NDCG itself.
        Queries without a positive grade have no pair to learn from and are left out of ``fit``.

        Returns ``{"seconds", "best_iteration", "rounds_run", JUDGED_VAL_METRIC, "fit_rows", "fit_queries"}``.
        """
        c = self.config
        if c.objective != "lambdarank":
            raise ValueError(f"fit_judged needs the lambdarank objective, got {c.objective!r}")
        t0 = time.perf_counter()
        self.projection = ItemProjection.fit(store, fit.items.numpy()[fit.valid.numpy()], c)
        keep = np.flatnonzero(((fit.grades.numpy() > 0) & fit.valid.numpy()).any(1))
        if len(keep) == 0:
            raise ValueError("fit_judged: no training query has a positive grade")
        fit, fit_queries = fit.select(keep), [fit_queries[int(i)] for i in keep]
        valid = fit.valid.numpy()  # [N, S]
        labels, label_gain = gain_labels(grade_gains(fit.grades.numpy(), gain), valid)
        train = lgb.Dataset(self._rows(fit, fit_queries, store, bm25), label=labels[valid], group=valid.sum(1),
                            feature_name=feature_names(c))
        vvalid = val.valid.numpy()  # [Nv, S]
        vgrades = val.grades.numpy().astype(np.float64)  # [Nv, S]; the labels below are only placeholders
        vset = lgb.Dataset(self._rows(val, val_queries, store, bm25), label=(vgrades > 0)[vvalid].astype(np.int64),
                           reference=train, group=vvalid.sum(1))

        def val_ndcg(preds: np.ndarray, _: lgb.Dataset) -> tuple[str, float, bool]:
            scores = np.full(vvalid.shape, -1e9)
            scores[vvalid] = preds
            per = ndcg_at_k(scores, vgrades, vvalid, k=10, gain=gain)  # [Nv], NaN without a positive grade
            return JUDGED_VAL_METRIC, float(np.nanmean(per)) if np.isfinite(per).any() else 0.0, True

        info = self._boost(label_gain, train, vset, JUDGED_VAL_METRIC, val_ndcg, t0)
        info.update(fit_rows=int(valid.sum()), fit_queries=len(fit))
        log.info("lightgbm lambdarank on judgments: %d rounds, best %d, validation NDCG@10 %.4f, %.1f s",
                 info["rounds_run"], info["best_iteration"], info[JUDGED_VAL_METRIC], info["seconds"])
        return info

    def score(self, slates: Slates, queries: Sequence[str], store: FeatureStore, bm25: BM25Ranker) -> np.ndarray:
        """Scores [N, S] (padding -inf) of slates over ``store``'s catalog; ``queries`` [N] are their texts."""
        if self.booster is None:
            raise RuntimeError("LambdaRankRanker: fit it (or load it) before scoring")
        valid = slates.valid.numpy()
        out = np.full(valid.shape, -np.inf)
        if valid.any():
            out[valid] = self.booster.predict(self._rows(slates, queries, store, bm25),
                                              num_iteration=self.best_iteration, num_threads=self.config.num_threads)
        return out

    # ---------------------------------------------------------------------------------- persistence

    def save(self, path: str | Path) -> None:
        """One self-describing JSON file: format, config, feature names, PCA and the LightGBM model."""
        if self.booster is None or self.projection is None:
            raise RuntimeError("LambdaRankRanker: nothing to save before fit")
        p = self.projection
        payload = {"format": FORMAT, "config": asdict(self.config), "feature_names": feature_names(self.config),
                   "best_iteration": self.best_iteration,
                   "projection": {k: getattr(p, k).tolist() for k in p.__dataclass_fields__},
                   "model": self.booster.model_to_string(num_iteration=self.best_iteration)}
        atomic_write(Path(path), lambda f: f.write(json.dumps(payload).encode()))

    @classmethod
    def load(cls, path: str | Path) -> LambdaRankRanker:
        d = json.loads(Path(path).read_text())
        if d.get("format") != FORMAT:
            raise ValueError(f"{path}: not a {FORMAT} file (format {d.get('format')!r})")
        proj = ItemProjection(**{k: np.asarray(v, np.float64) for k, v in d["projection"].items()})
        return cls(LtrConfig(**d["config"]), proj, lgb.Booster(model_str=d["model"]), int(d["best_iteration"]))


# ------------------------------------------------------------------------------------------- entry points


def fit_prepared(prep: Prepared, config: LtrConfig, val_frac: float,
                 bm25: BM25Ranker | None = None) -> tuple[LambdaRankRanker, dict[str, Any]]:
    """Fit on the prepared data's training sessions, the last ``val_frac`` of each shopper's held out for early
    stopping (the split ``centralized.train_central`` makes). ``bm25``: the catalog's BM25, built if not given."""
    fit, val = prep.fit_validation_slates(val_frac)
    bm25 = bm25 or BM25Ranker([it.text() for it in prep.catalog.items])
    ranker = LambdaRankRanker(config)
    info = ranker.fit(fit, slate_queries(prep.log, fit), val, slate_queries(prep.log, val), prep.store, bm25,
                      prep.propensities)
    return ranker, info


def score_judged_slates(ranker: LambdaRankRanker, sessions: SessionLog, slates: Slates, store: FeatureStore,
                        bm25: BM25Ranker) -> np.ndarray:
    """Scores [N, S] of judged slates (``evaluate.judged_sessions`` + ``build_slates``) over their own catalog."""
    return ranker.score(slates, slate_queries(sessions, slates), store, bm25)
