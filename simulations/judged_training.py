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

Federated (:func:`federated_flower`): **through Flower's simulation engine**, with the project's own ServerApp
and ClientApp (``fedrank simulate``'s :func:`simulations.runner.simulate`, scenario ``simulations/scenarios/
judged.toml``). :func:`simulations.judged_data.write_judged_data` writes ``OUT/data``: the training queries dealt to
``num_devices`` devices (one user id each, ``natural`` partition; each device holds only its own share), their
labels in ``clicks``, and as each device's last sessions (its held-out split) test and validation queries; the run
writes ``OUT/federated`` (per-round checkpoints, its ``results.json``). Every round each device trains
``train.local-epochs`` of :func:`shared_model.training.train_epochs` on its slates and Flower's FedAvg averages
the heads by number of queries. Afterwards the server's validation queries choose the round (the best validation
judged NDCG@10 over the per-round checkpoints), as the central head's epochs are chosen; the Flower run itself
runs every round (no early stopping). The head is trained with ``model.use-user = false``: a device's earlier
sessions are other judged queries, not a shopper's history (the central head never sees a history either).

Results (:func:`train_from_judgments`): the held-out (test) queries scored by BM25, cosine and every trained head
(judged NDCG@10, MRR, Recall@10, as ``fedrank evaluate --judgments``), written to ``results.json``; checkpoints
are ordinary fedrank checkpoints (``fedrank evaluate --checkpoint`` and ``fedrank export`` read them).
"""

from __future__ import annotations

import copy
import logging
import os
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from shared_model.catalog_io import DEFAULT_LABEL_MAP, LabelMap, load_catalog
from shared_model.checkpoint import load_checkpoint, save_checkpoint
from shared_model.config import ModelConfig, TrainConfig
from shared_model.data import ItemTable, Slates, build_slates
from shared_model.embedding_cache import CACHE_ENV, feature_cache_dir
from shared_model.features import build_feature_store, encode_queries
from shared_model.head import FusedRankingHead, build_head, count_parameters
from shared_model.losses import get_loss
from shared_model.metrics import GAINS, NDCG10, count_defined, summarize
from shared_model.records import TRAIN_LOSS
from shared_model.schema import Catalog, SessionLog, atomic_write
from shared_model.training import score_slates, train_epochs
from simulations.baselines import BM25Ranker, CosineRanker
from simulations.evaluate import GradeScale, _load_judgments, judged_metrics, judged_sessions, results_bytes
from simulations.judged_data import partition_queries, write_judged_data

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
SCENARIO = "judged"  # simulations/scenarios/judged.toml
DATA_DIR, RUN_DIR = "data", "federated"  # under the output folder: the judged data folder, the Flower run

__all__ = ["HEAD", "JudgedData", "evaluate_queries", "federated_flower", "label_values", "load_judged",
           "partition_queries", "query_groups", "split_queries", "train_from_judgments", "train_judged",
           "training_labels", "validation_ndcg"]


@dataclass
class JudgedData:
    """Every judged query as one slate (``slates[i]`` is query ``sessions.queries[i]``) and what scores it."""

    catalog: Catalog
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
    cache: Path | None = None  # the feature cache the catalog was embedded into

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
    return JudgedData(catalog, sessions, slates, ItemTable.from_store(store), query_emb, store.text, bm25, scale,
                      len(judgments), int(store.mask[:, 1].sum()), labels_seen, cache)


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


# ------------------------------------------------------------------------------------------------ training
def label_values(grades: np.ndarray, loss: str, gain: str) -> np.ndarray:
    """float32 training labels of ``grades`` (any shape) for ``loss``: the gains (``2**g - 1`` or ``g``), or
    ``log2(1 + gain)`` for the losses that apply ``2**y - 1`` themselves (see the module docstring)."""
    g = np.asarray(grades, np.float64)
    gains = np.expm1(g * np.log(2.0)) if gain == "exp2" else g
    key = loss.strip().lower().replace("-", "_")
    return (np.log2(1.0 + gains) if key in SELF_APPLYING_GAIN else gains).astype(np.float32)


def training_labels(slates: Slates, loss: str, scale: GradeScale) -> Slates:
    """``slates`` with ``clicks`` [N, S] replaced by the training labels of the grades (:func:`label_values`)."""
    labels = torch.from_numpy(label_values(slates.grades.numpy(), loss, scale.gain))
    out = copy.copy(slates)
    out.clicks = torch.where(slates.valid, labels, 0.0).float()
    return out


def _judged_cfg(train_cfg: TrainConfig) -> TrainConfig:
    get_loss(train_cfg.loss)  # an unknown loss fails here, before anything is embedded or trained
    # grades are not position-biased clicks: no debiasing, and no click-based query-image alignment (the graded
    # ranking loss trains the image projection directly, as before)
    return replace(train_cfg, ips=False, align_weight=0.0)


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


def flower_overrides(model_cfg: ModelConfig, train_cfg: TrainConfig, num_devices: int, out_dir: str | Path,
                     rounds: int, local_epochs: int, seed: int) -> dict[str, Any]:
    """The command-line layer over the judged scenario: this run's data folder, devices, rounds, seed, and the
    head and training settings of the central head (``model.use-user`` off, ``train.ips`` off)."""
    from simulations.runner import scenario_config

    out = Path(out_dir)
    flat: dict[str, Any] = {f"model.{k.replace('_', '-')}": v
                            for k, v in asdict(replace(model_cfg, use_user=False)).items()}
    tcfg = replace(_judged_cfg(train_cfg), local_epochs=local_epochs)
    flat.update({f"train.{k.replace('_', '-')}": v for k, v in asdict(tcfg).items()})
    scenario = scenario_config(SCENARIO)
    flat.update({
        "data.dir": str(out / DATA_DIR), "server.out-dir": str(out / RUN_DIR), "server.num-rounds": rounds,
        "server.seed": seed, "server.resume": False, "partition.num-clients": num_devices,
        # fewer devices than the scenario's minimum: wait for all of them, not for devices that do not exist
        "strategy.min-train-clients": min(num_devices, int(scenario["strategy.min-train-clients"])),
        "strategy.min-available-clients": min(num_devices, int(scenario["strategy.min-available-clients"])),
    })
    return flat


def federated_flower(
    data: JudgedData,
    split: dict[str, np.ndarray],
    model_cfg: ModelConfig,
    train_cfg: TrainConfig,
    num_devices: int,
    out_dir: str | Path,
    rounds: int = DEFAULT_ROUNDS,
    local_epochs: int = DEFAULT_LOCAL_EPOCHS,
    seed: int = 0,
    progress: bool = True,
) -> tuple[FusedRankingHead, dict[str, Any]]:
    """Federated training through Flower's simulation engine (see the module docstring): writes
    ``out_dir/data`` and ``out_dir/federated``; returns the head of the best validation round and a summary."""
    from simulations.runner import scenario_config, simulate_config  # Flower and Ray only for a federated run

    tcfg = _judged_cfg(train_cfg)
    out = Path(out_dir)
    t0 = time.perf_counter()
    labels = label_values(data.sessions.grades, tcfg.loss, data.scale.gain)
    layout = write_judged_data(out / DATA_DIR, data.catalog, data.sessions, labels, split, num_devices, seed,
                               info={"labels": f"clicks = training labels for train.loss={tcfg.loss!r} "
                                               f"(gains {data.scale.gain})", "split_seed": seed})
    flat = scenario_config(SCENARIO, extra=flower_overrides(model_cfg, tcfg, num_devices, out, rounds,
                                                            local_epochs, seed))
    # the judged data folder holds the same catalog: its run reads the embeddings load_judged already made instead
    # of embedding every item again into a cache beside OUT/data (Ray workers inherit the environment)
    pinned = data.cache is not None and not os.environ.get(CACHE_ENV)
    if pinned:
        os.environ[CACHE_ENV] = str(data.cache)
    try:
        res = simulate_config(flat, SCENARIO, central=False, progress=progress)
    finally:
        if pinned:
            os.environ.pop(CACHE_ENV, None)
    val = data.slates.select(split["validation"])
    history: list[dict[str, Any]] = []
    best, best_model = -float("inf"), None
    for rec in res["rounds"]:  # the server's validation queries choose the round
        model, _ = load_checkpoint(out / RUN_DIR / "checkpoints" / f"round-{int(rec['round']):03d}.pt")
        vndcg = validation_ndcg(model, val, data.table, data.scale)
        history.append({"round": int(rec["round"]), "train_loss": rec.get("train", {}).get(TRAIN_LOSS),
                        "val_ndcg@10": vndcg, "data_held_out_ndcg@10": rec.get("central", {}).get(NDCG10)})
        if vndcg > best + 1e-5:
            best, best_model = vndcg, model
    if best_model is None:
        raise RuntimeError(f"{out / RUN_DIR}: the Flower run finished no round")
    best_model.eval()
    best_round = max(history, key=lambda h: h["val_ndcg@10"])["round"]
    cfg = res["run_config"]
    return best_model, {
        "kind": "Flower simulation engine with the project's ServerApp and ClientApp (fedrank simulate, scenario "
                f"{SCENARIO!r})",
        "strategy": cfg["strategy.name"], "fraction_train": cfg["strategy.fraction-train"], "devices": num_devices,
        "queries_per_device": layout["queries_per_device"], "held_out_per_device": layout["held_out_per_device"],
        "held_out": layout["held_out"], "local_epochs": local_epochs, "rounds_run": len(history),
        "best_round": best_round, "best_val_ndcg@10": best, "seconds": time.perf_counter() - t0,
        "seconds_per_round": res["seconds_per_round"], "history": history, "params": count_parameters(best_model),
        "data_dir": str(out / DATA_DIR), "run_dir": str(out / RUN_DIR),
    }

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
    """Train on the judged queries, evaluate on held-out ones, write ``out_dir/head.pt`` and
    ``out_dir/results.json``; with ``devices > 0`` also train through Flower (:func:`federated_flower`: the judged
    data folder ``out_dir/data``, the run ``out_dir/federated``) and write ``out_dir/federated.pt``. Returns what
    ``results.json`` holds."""
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
    if devices > 0:
        fed, fed_info = federated_flower(data, split, model_cfg, train_cfg, devices, out, rounds, local_epochs, seed,
                                         progress)
        fed_name = f"federated head (Flower {fed_info['strategy']}, {devices} devices)"
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
