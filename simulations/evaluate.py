"""Evaluate rankers on a catalog + relevance-judgments file (the shape of ESCI / product-search sets), or on a data
folder's held-out sessions (:func:`evaluate_data`: graded metrics when the log has grades, click metrics and
IPS/SNIPS counterfactual estimates always, with bootstrap intervals; see :mod:`simulations.log_eval`).

Each judged query becomes one slate made of its judged items. The first-stage order the head sees as a dense
feature is BM25's order over that slate (there is no production system here); items BM25 ties (a query with no
searchable word, a catalog of emoji titles) share one first-stage rank, so the head is never handed an order
nobody produced. The shopper has no history.

Grades may be decimal and on any scale (see :mod:`shared_model.judgments_io`). NDCG@10 uses the gain chosen
(``exp2``: ``2**g - 1``, or ``linear``: ``g``); MRR and Recall@10 use :func:`shared_model.metrics.relevance_thresholds`
of the scale's top grade (the largest grade in the judgments unless ``max_grade`` declares the scale). A metric
that no judged query defines is ``null`` in ``results.json``, and every metric states how many queries it leaves
out. ``results.json`` is strict JSON (no NaN).

The learning-to-rank baseline (:mod:`simulations.ltr`, LightGBM LambdaRank over the features the head gets), when
asked: trained on a data folder's clicks with IPS gains (``ltr_data``), it scores every judged query beside BM25,
cosine and the heads; trained on the judgments themselves (``ltr_judgments``), it can only be scored on queries it
never saw, so the queries are split (grouped, seeded) and a separate ``held_out`` section scores every ranker on
the test queries. The fitted models are saved beside ``results.json``.
"""

from __future__ import annotations

import json
import logging
import math
from collections import defaultdict
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from shared_model.catalog_io import (
    DEFAULT_LABEL_MAP,
    CatalogError,
    Judgment,
    LabelMap,
    load_catalog,
    load_judgments_with_report,
)
from shared_model.catalog_rows import ITEM_ID_ALIASES
from shared_model.data import ItemTable, Slates, build_slates
from shared_model.embedding_cache import feature_cache_dir
from shared_model.features import FeatureStore, build_feature_store, encode_queries
from shared_model.head import FusedRankingHead
from shared_model.metrics import (
    GAINS,
    MRR,
    NDCG10,
    RECALL10,
    RECALL_FRACTION,
    compute_metrics,
    count_defined,
    relevance_thresholds,
    summarize,
)
from shared_model.prepared import TEST_FRAC, Prepared
from shared_model.schema import Catalog, SessionLog, atomic_write, json_ready, results_bytes  # noqa: F401 -- re-exported
from shared_model.training import per_list_metrics, ranking_metrics, score_slates
from simulations.baselines import BM25Ranker, CosineRanker
from simulations.log_eval import CLICK_COLUMNS, Bootstrap, click_metrics, click_statistics, metric_definitions
from simulations.log_eval import counts as click_counts

try:  # LightGBM LambdaRank (simulations/ltr.py): its rows need lightgbm; everything else runs without it
    from simulations import ltr as _ltr
except ImportError:  # pragma: no cover
    _ltr = None  # type: ignore[assignment]

if TYPE_CHECKING:
    from simulations.ltr import LtrConfig

log = logging.getLogger(__name__)

BASELINE_RANKERS = ("bm25", "cosine")
LTR_CLICKS = "lightgbm lambdarank (IPS clicks)"  # trained on a data folder's clicks (`fedrank baselines`' row name)
LTR_JUDGED = "lightgbm lambdarank (judgments)"  # trained on the judged training queries; held-out queries only
LTR_RANKERS = (LTR_CLICKS, LTR_JUDGED)
LTR_VAL_FRAC = 0.1  # each shopper's last sessions for early stopping, as ``centralized.VAL_FRAC``
QUERY_SPLITS = ("train", "validation", "test")
QuerySplit = Callable[[list[str], int], Mapping[str, np.ndarray]]  # (queries, seed) -> indices by QUERY_SPLITS
GAIN_FORMULAS = {"exp2": "2**grade - 1", "linear": "grade"}


class JudgmentsError(ValueError):
    """The judgments do not fit the catalog."""


@dataclass(frozen=True)
class GradeScale:
    """How grades become metrics: NDCG's gain and the relevance thresholds of MRR and Recall@10.

    ``top`` is the scale's top grade: ``max_grade`` when declared, else the largest grade judged.
    """

    gain: str
    top: float
    declared: bool

    @property
    def thresholds(self) -> tuple[float, float]:
        return relevance_thresholds(self.top)

    def describe(self, grades: np.ndarray) -> dict[str, Any]:
        """The ``results.json`` record of the scale, the gain and the thresholds."""
        mrr_t, rec_t = self.thresholds
        return {
            "gain": {"name": self.gain, "formula": GAIN_FORMULAS[self.gain]},
            "grades": {"min": float(grades.min()), "max": float(grades.max()), "top": self.top,
                       "top_from": "max_grade" if self.declared else "largest grade judged",
                       "decimal": bool((grades != np.round(grades)).any())},
            "relevance": {
                NDCG10: "queries with at least one grade > 0",
                MRR: f"reciprocal rank of the first item with grade >= {mrr_t:g} (the top grade)",
                RECALL10: f"share of items with grade >= {rec_t:g} ({RECALL_FRACTION:g} x the top grade) "
                          f"ranked in the top 10",
            },
        }


def judged_sessions(catalog: Catalog, judgments: list[Judgment], source: str, bm25: BM25Ranker) -> SessionLog:
    """One session per judged query; candidates in BM25 order (ties share a rank); grades from the judgments."""
    by_query: dict[str, dict[int, float]] = defaultdict(dict)
    for n, (query, item_id, grade) in enumerate(judgments, start=1):
        try:
            row = catalog.row(item_id)
        except KeyError:
            raise JudgmentsError(f"{source}: judgment {n} (query {query!r}) names item_id {item_id!r}, "
                                 f"which is not in the catalog {catalog.source}") from None
        by_query[query][row] = max(grade, by_query[query].get(row, 0.0))
    queries = sorted(by_query)
    offsets = [0]
    items, grades, ranks, scores = [], [], [], []
    for q in queries:
        rows = np.array(sorted(by_query[q]), np.int32)
        s = bm25.corpus_scores(q)[rows]
        order = np.argsort(-s, kind="stable")
        rows, s = rows[order], s[order]
        items.append(rows)
        grades.append(np.array([by_query[q][r] for r in rows], np.float32))
        # competition ranking: an item's rank is the number of items BM25 scores strictly higher
        ranks.append(np.searchsorted(-s, -s, side="left").astype(np.int16))
        scores.append(s.astype(np.float32))
        offsets.append(offsets[-1] + len(rows))
    n, m = len(queries), offsets[-1]

    def cat(xs: list[np.ndarray], dt: type) -> np.ndarray:
        return np.concatenate(xs).astype(dt) if xs else np.zeros(0, dt)

    return SessionLog(
        user=np.arange(n, dtype=np.int32), query=np.arange(n, dtype=np.int32),
        randomized=np.zeros(n, bool), timestamp=np.zeros(n, np.int64),
        offsets=np.array(offsets, np.int64), items=cat(items, np.int32),
        clicks=np.zeros(m, np.uint8), purchases=np.zeros(m, np.uint8),
        prod_rank=cat(ranks, np.int16), retrieval_score=cat(scores, np.float32),
        grades=cat(grades, np.float32), utility=np.zeros(m, np.float32), queries=queries,
    )


def judged_metrics(scores: np.ndarray, slates: Slates, scale: GradeScale) -> dict[str, np.ndarray]:
    """Per-query NDCG@10, MRR and Recall@10 of ``scores`` [N, S] on the slates' grades (NaN: undefined)."""
    grades = slates.grades.numpy().astype(np.float64)
    mask = slates.valid.numpy()
    scores = np.where(mask, scores, -1e9)
    mrr_t, rec_t = scale.thresholds
    return compute_metrics(scores, grades, mask, k=10, mrr_threshold=mrr_t, recall_threshold=rec_t, gain=scale.gain)


def _load_judgments(
    catalog: Catalog, judgments_path: str | Path, skip_bad: bool, label_map: LabelMap, max_grade: float | None,
) -> tuple[list[Judgment], dict[str, int]]:
    try:  # with the catalog, an unknown item_id is a bad row: named by line (or skipped with skip_bad)
        judgments, report = load_judgments_with_report(judgments_path, skip_bad=skip_bad, catalog=catalog,
                                                       label_map=label_map, max_grade=max_grade)
    except CatalogError as e:
        if e.field in ITEM_ID_ALIASES and e.reason.startswith("unknown item_id"):
            raise JudgmentsError(str(e)) from None
        raise
    if not judgments:
        raise JudgmentsError(f"{judgments_path}: no judgments")
    return judgments, report.labels


def _require_lightgbm() -> Any:
    if _ltr is None:
        raise JudgmentsError("the LightGBM rows need the lightgbm package (pip install lightgbm)")
    return _ltr


def evaluate_judgments(
    catalog_path: str | Path,
    judgments_path: str | Path,
    heads: dict[str, FusedRankingHead],
    out_dir: str | Path,
    skip_bad: bool = False,
    progress: bool = True,
    gain: str = "exp2",
    label_map: LabelMap | None = None,
    max_grade: float | None = None,
    checkpoints: Mapping[str, str] | None = None,
    ltr_data: Prepared | None = None,
    ltr_judgments: QuerySplit | None = None,
    ltr_config: LtrConfig | None = None,
    seed: int = 0,
) -> dict[str, Any]:
    """Score BM25, cosine, LightGBM (when asked) and every head; write ``out_dir/results.json`` and return it.

    Parameters
    ----------
    catalog_path, judgments_path : str or Path
        The catalog (any layout :func:`shared_model.catalog_io.load_catalog` reads) and its judgments.
    heads : dict[str, FusedRankingHead]
        Trained heads by ranker name (unique, not a baseline's name).
    out_dir : str or Path
        Where ``results.json`` (written atomically) and the LightGBM models (``lightgbm_*.json``) go.
    skip_bad : bool
        Skip and count malformed catalog/judgment rows.
    gain : {"exp2", "linear"}
        NDCG's gain: ``2**grade - 1`` or ``grade``.
    label_map : LabelMap, optional
        Text label -> grade (default: ESCI's E=3, S=2, C=1, I=0).
    max_grade : float, optional
        The scale's top grade (grades above it are errors); default: the largest grade judged.
    checkpoints : mapping of str to str, optional
        Ranker name -> checkpoint path, reported in ``results.json``.
    ltr_data : Prepared, optional
        A data folder whose training sessions' clicks train LightGBM LambdaRank with IPS gains
        (:func:`simulations.ltr.fit_prepared`); the row ``LTR_CLICKS`` then scores every judged query, beside the
        other rankers.
    ltr_judgments : callable ``(queries, seed) -> {"train", "validation", "test": query indices}``, optional
        Also train LightGBM on the judgments themselves (:meth:`simulations.ltr.LambdaRankRanker.fit_judged`) with
        this split of the judged queries (the CLI passes :func:`simulations.judged_training.split_queries`, the
        split ``fedrank train --judgments --seed`` makes). It is scored on the test queries only, so
        ``results.json`` gets a ``held_out`` section where **every** ranker is scored again on those test queries;
        the main ``rankers`` table (every query) never holds it.
    ltr_config : LtrConfig, optional
        LightGBM's settings (default ``LtrConfig(seed=seed)``).
    seed : int
        LightGBM's seed and the seed of the query split.
    """
    if gain not in GAINS:
        raise ValueError(f"gain must be one of {GAINS}, got {gain!r}")
    clash = sorted(set(heads) & {*BASELINE_RANKERS, *LTR_RANKERS})
    if clash:
        raise ValueError(f"head name {clash[0]!r} is a baseline's name; rename its checkpoint")
    ltr = _require_lightgbm() if ltr_data is not None or ltr_judgments is not None else None
    out_dir = Path(out_dir)
    labels = label_map or DEFAULT_LABEL_MAP
    catalog = load_catalog(catalog_path, skip_bad=skip_bad)
    judgments, labels_seen = _load_judgments(catalog, judgments_path, skip_bad, labels, max_grade)
    bm25 = BM25Ranker([it.text() for it in catalog.items])
    sessions = judged_sessions(catalog, judgments, str(judgments_path), bm25)
    scale = GradeScale(gain, float(max_grade) if max_grade is not None else float(sessions.grades.max()),
                       max_grade is not None)
    cache = feature_cache_dir(catalog_path)
    store = build_feature_store(catalog, cache, progress=progress)
    query_emb = encode_queries(sessions.queries, cache, progress=progress)
    prices = np.array([it.price for it in catalog.items], np.float64)
    slates = build_slates(sessions, query_emb, prices)
    items = slates.items.numpy()
    scores = {"bm25": bm25.score(sessions.queries, items), "cosine": CosineRanker(store.text).score(query_emb, items)}
    models: dict[str, Any] = {}  # LightGBM ranker name -> the fitted ranker
    training: dict[str, Any] = {}
    if ltr is not None and ltr_data is not None:
        models[LTR_CLICKS], info = ltr.fit_prepared(ltr_data, ltr_config or ltr.LtrConfig(seed=seed), LTR_VAL_FRAC)
        training[LTR_CLICKS] = {"trained_on": f"the clicks of {ltr_data.data_dir} (training sessions, IPS gains)",
                                **info}
        scores[LTR_CLICKS] = ltr.score_judged_slates(models[LTR_CLICKS], sessions, slates, store, bm25)
    table = ItemTable.from_store(store)
    for name, model in heads.items():
        scores[name] = score_slates(model, slates, table)
    per_query = {name: judged_metrics(s, slates, scale) for name, s in scores.items()}
    counted = count_defined(per_query["bm25"])  # depends on the grades only: the same for every ranker
    held_out = None
    if ltr is not None and ltr_judgments is not None:
        split = ltr_judgments(sessions.queries, seed)
        held_out = _held_out_judged(ltr, ltr_config or ltr.LtrConfig(seed=seed), sessions, slates, store, bm25,
                                    scale, per_query, models, training, split, seed, str(judgments_path))
        held_out["split"]["by"] = f"{getattr(ltr_judgments, '__module__', '?')}." \
                                  f"{getattr(ltr_judgments, '__qualname__', type(ltr_judgments).__name__)}"
    for name, ranker in models.items():
        ranker.save(out_dir / ltr_file_name(name))
    payload = {
        "catalog": str(catalog_path), "judgments": str(judgments_path),
        "num_queries": len(sessions), "num_judgments": len(judgments),
        "items_with_image": int(store.mask[:, 1].sum()),
        **scale.describe(sessions.grades),
        "label_map": {**labels.to_json(), "labels_seen": labels_seen},
        "queries_counted": counted,
        "queries_excluded": {k: len(sessions) - v for k, v in counted.items()},
        "checkpoints": dict(checkpoints) if checkpoints is not None else dict.fromkeys(heads),
        "rankers": {name: summarize(v) for name, v in per_query.items()},
        **({"held_out": held_out} if held_out is not None else {}),
        **({"lightgbm": {name: {**info, "model": ltr_file_name(name)} for name, info in training.items()}}
           if training else {}),
    }
    ready: dict[str, Any] = json_ready(payload)
    data = json.dumps(ready, indent=2, allow_nan=False).encode()  # already free of NaN: see results_bytes
    atomic_write(out_dir / "results.json", lambda f: f.write(data))
    return ready


def ltr_file_name(name: str) -> str:
    """The file a LightGBM ranker of the table is saved to (``LambdaRankRanker.load`` reads it)."""
    return name.replace(" ", "_").replace("(", "").replace(")", "") + ".json"


def _held_out_judged(
    ltr: Any, cfg: LtrConfig, sessions: SessionLog, slates: Slates, store: FeatureStore, bm25: BM25Ranker,
    scale: GradeScale, per_query: dict[str, dict[str, np.ndarray]], models: dict[str, Any],
    training: dict[str, Any], split: Mapping[str, np.ndarray], seed: int, source: str,
) -> dict[str, Any]:
    """LightGBM trained on the judged training queries (early stopping on the validation ones), and every ranker of
    ``per_query`` with it on the test queries: the ``held_out`` section of ``results.json``. Adds the fitted ranker
    to ``models`` and its fit summary to ``training``."""
    if min(len(split[k]) for k in QUERY_SPLITS) == 0:
        raise JudgmentsError(f"{source}: {len(sessions)} distinct queries; LightGBM on judgments needs at least 3 "
                             "(train, validation and test)")
    fit, val, test = (slates.select(np.asarray(split[k])) for k in QUERY_SPLITS)
    ranker = ltr.LambdaRankRanker(ltr.judged_config(cfg, int(fit.valid.sum())))
    info = ranker.fit_judged(fit, ltr.slate_queries(sessions, fit), val, ltr.slate_queries(sessions, val), store,
                             bm25, scale.gain)
    models[LTR_JUDGED] = ranker
    training[LTR_JUDGED] = {"trained_on": f"the judged training queries of {source} (grades' gains)", **info}
    idx = np.asarray(split["test"])
    rows = {name: {m: v[idx] for m, v in metrics.items()} for name, metrics in per_query.items()}
    rows[LTR_JUDGED] = judged_metrics(ltr.score_judged_slates(ranker, sessions, test, store, bm25), test, scale)
    counted = count_defined(rows["bm25"])
    return {
        "why": f"{LTR_JUDGED} learns from these judgments, so it and every other ranker are scored on the held-out "
               "test queries only",
        "split": {"seed": seed, "queries": {k: len(split[k]) for k in QUERY_SPLITS}},
        "num_queries": len(idx),
        "queries_counted": counted,
        "queries_excluded": {k: len(idx) - v for k, v in counted.items()},
        "rankers": {name: summarize(v) for name, v in rows.items()},
    }


# ------------------------------------------------------------------------------ held-out sessions of a data folder
IPS_CLIP = 20.0  # the clip of the click metrics' IPS weights: training's (``train.ips-clip``) default
DATA_BASELINES = ("production order", "bm25", "cosine")


def data_scores(prep: Prepared, heads: Mapping[str, FusedRankingHead], test: Slates) -> dict[str, np.ndarray]:
    """Scores ``[N, S]`` of every ranker on the held-out slates: the production order (first-stage rank), BM25
    over the catalog, query-title cosine, then each head (the rows of ``simulations.centralized.evaluate_all``)."""
    clash = sorted(set(heads) & set(DATA_BASELINES))
    if clash:
        raise ValueError(f"head name {clash[0]!r} is a baseline's name; rename its checkpoint")
    items = test.items.numpy()
    out = {"production order": -test.slate_dense[..., 0].numpy()}
    bm25 = BM25Ranker([it.text() for it in prep.catalog.items])
    out["bm25"] = bm25.score([prep.log.queries[int(prep.log.query[s])] for s in test.session_ids], items)
    out["cosine"] = CosineRanker(prep.store.text).score(test.query.numpy(), items)
    table = prep.table()
    for name, model in heads.items():
        out[name] = score_slates(model, test, table)
    return out


def evaluate_data(
    prep: Prepared,
    heads: Mapping[str, FusedRankingHead],
    checkpoints: Mapping[str, str] | None = None,
    boot: Bootstrap | None = None,
) -> dict[str, Any]:
    """Every ranker on a data folder's held-out sessions (each shopper's last sessions): graded metrics when the log
    has grades, click metrics and IPS/SNIPS counterfactual clicks@10 always (:mod:`simulations.log_eval`), each
    with a paired bootstrap interval. Returns the ``results.json`` payload (``rankers``: metric -> value;
    ``ci95``: metric -> [low, high])."""
    boot = boot or Bootstrap()
    test = prep.slates("test")
    graded = bool((test.grades.numpy() > 0).any())
    idx = boot.indices(len(test))
    rows: dict[str, dict[str, float]] = {}
    intervals: dict[str, dict[str, list[float]]] = {}
    counted: dict[str, Any] = {}
    for name, scores in data_scores(prep, heads, test).items():
        row: dict[str, float] = {}
        ci: dict[str, list[float]] = {}
        if graded:
            row.update(ranking_metrics(scores, test))
            ci.update({k: boot.per_list_interval(v, idx) for k, v in per_list_metrics(scores, test).items()})
        st = click_statistics(scores, test.clicks.numpy(), test.purchases.numpy(), test.positions.numpy(),
                              test.valid.numpy(), prep.propensities, k=10, clip=IPS_CLIP)
        point, ci_clicks = click_metrics(st, boot, idx)
        row.update(point)
        ci.update(ci_clicks)
        rows[name], intervals[name] = row, ci
        counted = click_counts(st)
    return {
        "data_dir": str(prep.data_dir),
        "checkpoints": dict(checkpoints) if checkpoints is not None else dict.fromkeys(heads),
        "split": {"kind": "per user, by time: each shopper's last sessions held out",
                  "test_fraction": TEST_FRAC, "train_sessions": len(prep.train_idx)},
        "num_test_sessions": len(test),
        "graded": graded,
        "propensity": {"eta": prep.eta, "propensities": prep.propensities[:10].tolist(),
                       **{k: v for k, v in getattr(prep, "propensity_info", {}).items()
                          if k in ("estimator", "estimated_from")}},
        "click_metrics": metric_definitions(10, IPS_CLIP),
        "lists_counted": counted,
        "bootstrap": {"resamples": boot.resamples, "level": boot.level, "seed": boot.seed, "unit": "held-out list",
                      "paired": True},
        "rankers": rows,
        "ci95": intervals,
    }


def print_data_table(title: str, res: dict[str, Any]) -> None:
    """The table of :func:`evaluate_data`: one row per ranker, each cell the value over ``±`` half the width of its
    bootstrap interval (exact bounds in ``results.json``)."""
    from rich.console import Console
    from rich.table import Table

    columns = [*((NDCG10, MRR, RECALL10) if res["graded"] else ()), *CLICK_COLUMNS]
    table = Table(title=title, caption=f"± half the {res['bootstrap']['level']:.0%} bootstrap interval "
                                       f"({res['bootstrap']['resamples']} resamples of the "
                                       f"{res['num_test_sessions']} held-out lists)")
    table.add_column("ranker")
    for c in columns:
        table.add_column(c, justify="right")
    for name, row in res["rankers"].items():
        cells = []
        for c in columns:
            v, (lo, hi) = row.get(c), res["ci95"][name].get(c, [None, None])
            if v is None or not math.isfinite(v):
                cells.append("-")
            elif lo is None or hi is None or not (math.isfinite(lo) and math.isfinite(hi)):
                cells.append(f"{v:.4f}")
            else:
                cells.append(f"{v:.4f}\n±{(hi - lo) / 2:.4f}")
        table.add_row(name, *cells)
    Console().print(table)
