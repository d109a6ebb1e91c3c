"""Train the head from a shop's relevance judgments (``fedrank train --catalog C --judgments J``), centrally or
split over devices.

Data: every judged query becomes one slate of its judged items in BM25 order, the slates ``fedrank evaluate
--judgments`` scores (:func:`simulations.evaluate.judged_sessions`); the shopper has no history. Grades are read
as :mod:`shared_model.judgments_io` reads them (decimal grades, label maps, ``max_grade``).

Split: queries, never sessions or items, are split into train / validation / test (:func:`split_queries`, seeded).
Queries that differ only in case or blanks form one group, so no query (nor a spelling of it) is in two splits.

Labels: the grades' gains (:class:`simulations.evaluate.GradeScale`: ``2**g - 1`` or ``g``) replace the clicks,
with no IPS weighting (judgments have no position bias). The loss is ``train.loss``: softmax and ListNet take the
gains as their target distribution, RankNet their order; LambdaLoss and ApproxNDCG apply ``2**y - 1`` themselves,
so they get ``y = log2(1 + gain)`` and optimise the chosen gain exactly (see :func:`training_labels`).

Central training (:func:`train_judged`) runs :func:`shared_model.training.train_epochs` one epoch at a time and
keeps the epoch with the best validation judged NDCG@10 (stopping after ``patience`` epochs without a gain).

Federated (:func:`federated_judged`): **an in-process FedAvg simulation, without Flower**. The training queries
are dealt to ``num_devices`` devices (:func:`partition_queries`, seeded; each device holds only its own share);
every round each device starts from the global weights, runs ``local_epochs`` of the same
:func:`shared_model.training.train_epochs` on its own slates, and the server averages the weights by number of
queries (FedAvg). The validation queries stay with the server (the shop's own held-out judgments, like Flower's
central evaluation), which keeps the best round. Flower's ServerApp/ClientApp read click-log shards of a data
folder (per-shopper sessions, IPS-weighted clicks), so judged training does not go through them yet.

Results (:func:`train_from_judgments`): the held-out (test) queries scored by BM25, cosine and every trained head
(judged NDCG@10, MRR, Recall@10, as ``fedrank evaluate --judgments``), written to ``results.json``; checkpoints
are ordinary fedrank checkpoints (``fedrank evaluate --checkpoint`` and ``fedrank export`` read them).
"""

from __future__ import annotations

import copy
import logging
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from shared_model.catalog_io import DEFAULT_LABEL_MAP, LabelMap, load_catalog
from shared_model.checkpoint import save_checkpoint
from shared_model.config import ModelConfig, TrainConfig
from shared_model.data import ItemTable, Slates, build_slates
from shared_model.embedding_cache import feature_cache_dir
from shared_model.features import build_feature_store, encode_queries
from shared_model.head import FusedRankingHead, build_head, count_parameters
from shared_model.losses import get_loss
from shared_model.metrics import GAINS, NDCG10, count_defined, summarize
from shared_model.schema import SessionLog, atomic_write
from shared_model.training import score_slates, train_epochs
from simulations.baselines import BM25Ranker, CosineRanker
from simulations.evaluate import GradeScale, _load_judgments, judged_metrics, judged_sessions, results_bytes

log = logging.getLogger(__name__)

VAL_FRAC = 0.15  # share of query groups for validation (early stopping)
TEST_FRAC = 0.2  # share of query groups held out for the reported figures
DEFAULT_EPOCHS = 30  # at most; early stopping on validation judged NDCG@10 decides
DEFAULT_ROUNDS = 30  # federated rounds at most; the best validation round is kept
DEFAULT_LOCAL_EPOCHS = 2
PATIENCE = 5
SELF_APPLYING_GAIN = ("lambdaloss", "approx_ndcg")  # losses that turn labels into 2**y - 1 themselves
HEAD = "trained head"
SPLITS = ("train", "validation", "test")


@dataclass
class JudgedData:
    """Every judged query as one slate (``slates[i]`` is query ``sessions.queries[i]``) and what scores it."""

    sessions: SessionLog
    slates: Slates  # [Q, S]; grades = the judgments' grades
    table: ItemTable
    query_emb: np.ndarray  # [Q, Dt]
    text: np.ndarray  # [num_items, Dt] item text embeddings (cosine baseline)
    bm25: BM25Ranker
    scale: GradeScale
    num_judgments: int
    items_with_image: int
    labels_seen: dict[str, int]

    @property
    def queries(self) -> list[str]:
        return self.sessions.queries


def load_judged(
    catalog_path: str | Path,
    judgments_path: str | Path,
    skip_bad: bool = False,
    gain: str = "exp2",
    label_map: LabelMap | None = None,
    max_grade: float | None = None,
    progress: bool = True,
) -> JudgedData:
    """Read the catalog and its judgments, embed them (feature cache of :func:`feature_cache_dir`), build slates.

    Raises :class:`shared_model.catalog_io.CatalogError` / :class:`simulations.evaluate.JudgmentsError` naming the
    file, line and field of bad input.
    """
    if gain not in GAINS:
        raise ValueError(f"gain must be one of {GAINS}, got {gain!r}")
    catalog = load_catalog(catalog_path, skip_bad=skip_bad)
    judgments, labels_seen = _load_judgments(catalog, judgments_path, skip_bad, label_map or DEFAULT_LABEL_MAP,
                                             max_grade)
    bm25 = BM25Ranker([it.text() for it in catalog.items])
    sessions = judged_sessions(catalog, judgments, str(judgments_path), bm25)
    top = float(max_grade) if max_grade is not None else float(sessions.grades.max())
    scale = GradeScale(gain, top, max_grade is not None)
    cache = feature_cache_dir(catalog_path)
    store = build_feature_store(catalog, cache, progress=progress)
    query_emb = encode_queries(sessions.queries, cache, progress=progress)
    prices = np.array([it.price for it in catalog.items], np.float64)
    slates = build_slates(sessions, query_emb, prices)
    return JudgedData(sessions, slates, ItemTable.from_store(store), query_emb, store.text, bm25, scale,
                      len(judgments), int(store.mask[:, 1].sum()), labels_seen)


# ------------------------------------------------------------------------------------------------ splits
def query_groups(queries: list[str]) -> np.ndarray:
    """Group id ``[Q]`` of each query: queries equal up to case and blanks share one group."""
    keys = [" ".join(q.lower().split()) for q in queries]
    _, groups = np.unique(np.array(keys, dtype=object), return_inverse=True)
    return np.asarray(groups, np.int64)


def split_queries(
    queries: list[str], seed: int = 0, val_frac: float = VAL_FRAC, test_frac: float = TEST_FRAC,
) -> dict[str, np.ndarray]:
    """Seeded train / validation / test split of query indices, grouped by :func:`query_groups`.

    Each split gets at least one group when there are three or more; returns sorted index arrays keyed by
    ``SPLITS``.
    """
    groups = query_groups(queries)
    n = int(groups.max()) + 1 if len(groups) else 0
    order = np.random.default_rng([seed, 11]).permutation(n)
    n_test = int(round(n * test_frac))
    n_val = int(round(n * val_frac))
    if n >= 3:
        n_test, n_val = max(1, n_test), max(1, n_val)
    where = np.zeros(n, np.int64)  # 0 train, 1 validation, 2 test
    where[order[:n_test]] = 2
    where[order[n_test:n_test + n_val]] = 1
    return {name: np.flatnonzero(where[groups] == k) for k, name in enumerate(SPLITS)}


def partition_queries(train_idx: np.ndarray, num_devices: int, seed: int = 0) -> list[np.ndarray]:
    """Deal the training queries to ``num_devices`` devices (seeded, as even as possible, each non-empty)."""
    if num_devices < 1:
        raise ValueError(f"num_devices must be >= 1, got {num_devices}")
    if num_devices > len(train_idx):
        raise ValueError(f"{num_devices} devices but only {len(train_idx)} training queries: each device needs one")
    shuffled = np.random.default_rng([seed, 12]).permutation(np.asarray(train_idx))
    return [np.sort(part) for part in np.array_split(shuffled, num_devices)]


# ------------------------------------------------------------------------------------------------ training
def training_labels(slates: Slates, loss: str, scale: GradeScale) -> Slates:
    """``slates`` with ``clicks`` [N, S] replaced by the training labels of the grades (see the module docstring)."""
    grades = slates.grades.double()
    gains = torch.expm1(grades * np.log(2.0)) if scale.gain == "exp2" else grades
    key = loss.strip().lower().replace("-", "_")
    labels = torch.log2(1.0 + gains) if key in SELF_APPLYING_GAIN else gains
    out = copy.copy(slates)
    out.clicks = torch.where(slates.valid, labels, 0.0).float()
    return out


def _judged_cfg(train_cfg: TrainConfig) -> TrainConfig:
    get_loss(train_cfg.loss)  # an unknown loss fails here, before anything is embedded or trained
    return replace(train_cfg, ips=False)


def validation_ndcg(model: FusedRankingHead, val: Slates, table: ItemTable, scale: GradeScale) -> float:
    """Mean judged NDCG@10 of ``model`` over the validation slates (queries with a positive grade)."""
    v = judged_metrics(score_slates(model, val, table), val, scale)[NDCG10]
    return float(np.nanmean(v)) if np.isfinite(v).any() else 0.0


def train_judged(
    data: JudgedData,
    split: dict[str, np.ndarray],
    model_cfg: ModelConfig,
    train_cfg: TrainConfig,
    epochs: int = DEFAULT_EPOCHS,
    seed: int = 0,
    patience: int = PATIENCE,
) -> tuple[FusedRankingHead, dict[str, Any]]:
    """Train one head on the training queries' grades; keep the epoch of best validation judged NDCG@10."""
    tcfg = _judged_cfg(train_cfg)
    torch.manual_seed(seed)
    model = build_head(model_cfg, seed=seed)
    fit = training_labels(data.slates.select(split["train"]), tcfg.loss, data.scale)
    val = data.slates.select(split["validation"])
    t0 = time.perf_counter()
    history: list[dict[str, float]] = []
    best, best_state, since = -float("inf"), None, 0
    for epoch in range(epochs):
        stats = train_epochs(model, fit, data.table, tcfg, None, epochs=1, seed=seed * 100 + epoch)
        vndcg = validation_ndcg(model, val, data.table, data.scale)
        history.append({"epoch": epoch + 1, **stats, "val_ndcg@10": vndcg})
        log.info("epoch %d/%d loss %.4f validation judged NDCG@10 %.4f", epoch + 1, epochs, stats["train_loss"], vndcg)
        if vndcg > best + 1e-5:
            best, since, best_state = vndcg, 0, copy.deepcopy(model.state_dict())
        else:
            since += 1
            if since >= patience:
                break
    if best_state is not None:
        model.load_state_dict(best_state)
    model.eval()
    best_epoch = max(history, key=lambda h: h["val_ndcg@10"])["epoch"] if history else 0
    return model, {"epochs_run": len(history), "best_epoch": best_epoch, "best_val_ndcg@10": best,
                   "seconds": time.perf_counter() - t0, "history": history, "params": count_parameters(model)}


def fedavg(states: list[dict[str, torch.Tensor]], weights: list[float]) -> dict[str, torch.Tensor]:
    """Weighted mean of floating-point entries; other entries (counters) from the first state."""
    w = torch.tensor(weights, dtype=torch.float64)
    w = w / w.sum()
    out: dict[str, torch.Tensor] = {}
    for k, v in states[0].items():
        if torch.is_floating_point(v):
            out[k] = sum((wi * s[k].double() for wi, s in zip(w, states, strict=True)),
                         torch.zeros_like(v, dtype=torch.float64)).to(v.dtype)
        else:
            out[k] = v.clone()
    return out


def federated_judged(
    data: JudgedData,
    split: dict[str, np.ndarray],
    model_cfg: ModelConfig,
    train_cfg: TrainConfig,
    num_devices: int,
    rounds: int = DEFAULT_ROUNDS,
    local_epochs: int = DEFAULT_LOCAL_EPOCHS,
    seed: int = 0,
    patience: int = PATIENCE,
) -> tuple[FusedRankingHead, dict[str, Any]]:
    """FedAvg over ``num_devices`` devices, each holding its own share of the training queries (in-process, no
    Flower: see the module docstring). Returns the head of the best validation round and a summary."""
    tcfg = _judged_cfg(train_cfg)
    torch.manual_seed(seed)
    model = build_head(model_cfg, seed=seed)
    shares = partition_queries(split["train"], num_devices, seed)
    devices = [training_labels(data.slates.select(idx), tcfg.loss, data.scale) for idx in shares]
    sizes = [float(len(idx)) for idx in shares]
    val = data.slates.select(split["validation"])
    t0 = time.perf_counter()
    history: list[dict[str, float]] = []
    best, best_state, since = -float("inf"), None, 0
    for rnd in range(1, rounds + 1):
        states, losses = [], []
        for cid, slates in enumerate(devices):
            local = copy.deepcopy(model)
            stats = train_epochs(local, slates, data.table, tcfg, None, epochs=local_epochs,
                                 seed=seed * 100_000 + rnd * 100 + cid)
            states.append(local.state_dict())
            losses.append(stats["train_loss"])
        model.load_state_dict(fedavg(states, sizes))
        vndcg = validation_ndcg(model, val, data.table, data.scale)
        history.append({"round": rnd, "train_loss": float(np.average(losses, weights=sizes)), "val_ndcg@10": vndcg})
        log.info("round %d/%d validation judged NDCG@10 %.4f", rnd, rounds, vndcg)
        if vndcg > best + 1e-5:
            best, since, best_state = vndcg, 0, copy.deepcopy(model.state_dict())
        else:
            since += 1
            if since >= patience:
                break
    if best_state is not None:
        model.load_state_dict(best_state)
    model.eval()
    best_round = max(history, key=lambda h: h["val_ndcg@10"])["round"] if history else 0
    return model, {"kind": "in-process FedAvg simulation (no Flower)", "devices": num_devices,
                   "queries_per_device": [len(s) for s in shares], "local_epochs": local_epochs,
                   "rounds_run": len(history), "best_round": best_round, "best_val_ndcg@10": best,
                   "seconds": time.perf_counter() - t0, "history": history, "params": count_parameters(model)}


# ------------------------------------------------------------------------------------------------ evaluation
def evaluate_queries(data: JudgedData, idx: np.ndarray, heads: dict[str, FusedRankingHead]) -> dict[str, Any]:
    """BM25, cosine and every head on the queries ``idx``: per ranker the means of judged NDCG@10, MRR, Recall@10,
    and how many queries each metric counts."""
    slates = data.slates.select(idx)
    items = slates.items.numpy()
    per_query = {
        "bm25": judged_metrics(data.bm25.score([data.queries[i] for i in idx], items), slates, data.scale),
        "cosine": judged_metrics(CosineRanker(data.text).score(data.query_emb[idx], items), slates, data.scale),
    }
    for name, model in heads.items():
        per_query[name] = judged_metrics(score_slates(model, slates, data.table), slates, data.scale)
    return {"rankers": {k: summarize(v) for k, v in per_query.items()},
            "queries_counted": count_defined(per_query["bm25"])}


def train_from_judgments(
    catalog_path: str | Path,
    judgments_path: str | Path,
    out_dir: str | Path,
    model_cfg: ModelConfig,
    train_cfg: TrainConfig,
    epochs: int = DEFAULT_EPOCHS,
    seed: int = 0,
    devices: int = 0,
    rounds: int = DEFAULT_ROUNDS,
    local_epochs: int = DEFAULT_LOCAL_EPOCHS,
    skip_bad: bool = False,
    gain: str = "exp2",
    label_map: LabelMap | None = None,
    max_grade: float | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Train on the judged queries, evaluate on held-out ones, write ``out_dir/head.pt`` (with ``devices > 0`` also
    ``out_dir/federated.pt``) and ``out_dir/results.json``; return what ``results.json`` holds."""
    _judged_cfg(train_cfg)
    out = Path(out_dir)
    data = load_judged(catalog_path, judgments_path, skip_bad, gain, label_map, max_grade, progress)
    split = split_queries(data.queries, seed)
    if min(len(split["train"]), len(split["validation"]), len(split["test"])) == 0:
        raise ValueError(f"{judgments_path}: {len(data.queries)} distinct queries; training from judgments needs at "
                         "least 3 (train, validation and test)")
    source = {"catalog": str(catalog_path), "judgments": str(judgments_path)}
    heads: dict[str, FusedRankingHead] = {}
    training: dict[str, Any] = {}
    model, info = train_judged(data, split, model_cfg, train_cfg, epochs, seed)
    heads[HEAD], training[HEAD] = model, info
    checkpoints = {HEAD: str(out / "head.pt")}
    fed_name = f"federated head (FedAvg, {devices} devices)"
    if devices > 0:
        fed, fed_info = federated_judged(data, split, model_cfg, train_cfg, devices, rounds, local_epochs, seed)
        heads[fed_name], training[fed_name] = fed, fed_info
        checkpoints[fed_name] = str(out / "federated.pt")
    evaluated = evaluate_queries(data, split["test"], heads)
    labels = {"source": (label_map or DEFAULT_LABEL_MAP).to_json(), "labels_seen": data.labels_seen}
    run_config = {**source, "judged": True, "train": vars(_judged_cfg(train_cfg)), "gain": gain,
                  "max_grade": max_grade, "split_seed": seed}
    for name, path in checkpoints.items():
        rnd = training[name].get("best_round", 0)
        save_checkpoint(path, heads[name], run_config=run_config, round=int(rnd),
                        metrics_history=[*training[name]["history"], {"test": evaluated["rankers"][name]}],
                        seeds={"seed": seed})
    payload = {
        **source,
        "num_queries": len(data.queries), "num_judgments": data.num_judgments,
        "items_with_image": data.items_with_image,
        **data.scale.describe(data.sessions.grades),
        "label_map": labels,
        "split": {"kind": "by query (queries equal up to case and blanks grouped)", "seed": seed,
                  "fractions": {"validation": VAL_FRAC, "test": TEST_FRAC},
                  "queries": {k: int(len(v)) for k, v in split.items()}},
        "training": {"loss": train_cfg.loss, "labels": f"gains of the grades ({data.scale.gain}), no IPS",
                     "selection": "best validation judged NDCG@10", **training},
        "evaluated_on": "test queries",
        "queries_counted": evaluated["queries_counted"],
        "checkpoints": checkpoints,
        "rankers": evaluated["rankers"],
    }
    data_bytes = results_bytes(payload)
    atomic_write(out / "results.json", lambda f: f.write(data_bytes))
    return payload
