"""Real-photo benchmark: every ranker on real product photos whose titles lost their colour words.

    python benchmarks/real_photos.py --photos ../shared/data/fashion-photos --out runs/real-photos \
        [--items 6000] [--seeds 0 1 2] [--regimes half none] [--epochs 12]

Runs on any catalog in the Kaggle ``styles.csv`` + ``images/<id>.jpg`` layout; deterministic by seed. Per seed:

1. **Items**: a uniform random subset of ``--items`` rows (seeded), split item-disjointly by (articleType,
   baseColour) stratum: in each stratum a seeded 70% of items are *train* items, 30% *judged* items.
2. **Titles** (per regime): ``half`` = a seeded 50% of items lose every word of the dataset's colour vocabulary
   (the words of all ``baseColour`` values, whole words, any case); ``none`` = every item does (colour only in the
   photo). The true colour stays in the ``color`` column, which only the simulated shoppers' intents read.
3. **Clicks**: shoppers simulated over the train items only (``simulate_catalog_dir``; preset by train size:
   ``small`` up to 2,500 train items, ``default`` above; intents from ``INTENT_ATTRIBUTES``). Every head and the
   LightGBM ranker train on those clicks (``prepare`` + ``train_central``); grades never train anything.
4. **Judged queries** over the judged items only: ``colour articleType`` for each (type, colour) with at least 5
   judged items, and ``gender colour articleType`` for each (gender, type, colour) with at least 5 (gender Men,
   Women, Boys or Girls; Unisex is never named). Slates of 30: up to 10 items of the query's type and colour
   (gendered query: up to 5 of the named gender, up to 5 of others, then more of the named gender), up to 10 of
   the type in other colours, the rest other types (half of them in the query's colour when there are enough).
   Grades: 3 = type and colour (and gender, if named), 2 = type and colour, other gender, 1 = type, 0 = other.
   First-stage order the heads see: BM25's within the slate (``evaluate.judged_sessions``, as ``evaluate
   --judgments`` does); the shopper has no history.
5. **First stage, two diagnostics** on the same slates: hidden (a random order and no retrieval score: what each
   head reads from query, text and photo alone), and the logs' production ranker
   (``market_slates.production_first_stage``: the simulator's title-overlap + popularity + noise score, as a shop
   serves new slates with the ranker that ordered its logs). BM25 is a better first stage than the logs' ranker,
   so a head that follows the first stage more than the logs justify gains on the headline slates only.

Writes ``OUT/results.json`` (config, per-seed figures, aggregate mean/std/min/max, timings) and ``OUT/ndcg.png``.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import sys
import time
from collections import defaultdict
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from shared_model.catalog_io import load_catalog, save_catalog_jsonl  # noqa: E402
from shared_model.config import ModelConfig, TrainConfig  # noqa: E402
from shared_model.data import ItemTable, build_slates  # noqa: E402
from shared_model.embedding_cache import CACHE_ENV, feature_cache_dir  # noqa: E402
from shared_model.features import FeatureStore, build_feature_store, encode_queries  # noqa: E402
from shared_model.head import FusedRankingHead  # noqa: E402
from shared_model.metrics import MRR, NDCG10, RECALL10, summarize  # noqa: E402
from shared_model.prepared import Prepared, prepare  # noqa: E402
from shared_model.schema import Catalog, CatalogItem, SessionLog, atomic_write  # noqa: E402
from shared_model.training import score_slates  # noqa: E402
from simulations.baselines import BM25Ranker, CosineRanker  # noqa: E402
from simulations.centralized import DEFAULT_CRITERION, VAL_FRAC, evaluate_all, head_variants, train_central  # noqa: E402
from simulations.evaluate import GradeScale, judged_metrics, judged_sessions, results_bytes  # noqa: E402
from simulations.market_config import MarketConfig, make_config  # noqa: E402
from simulations.market_slates import production_first_stage  # noqa: E402
from simulations.marketplace import simulate_catalog_dir  # noqa: E402

try:  # LightGBM LambdaRank (simulations/ltr.py); the benchmark runs without it
    from simulations import ltr as _ltr
except ImportError:  # pragma: no cover -- HOOK: include "lightgbm lambdarank" once simulations/ltr.py imports
    _ltr = None  # type: ignore[assignment]

log = logging.getLogger("real_photos")

REGIMES = ("half", "none")
TRAIN_SHARE = 0.7
SLATE = 30
MIN_JUDGED = 5
N_TARGET, N_SAME_TYPE = 10, 10
NAMED_GENDERS = ("men", "women", "boys", "girls")
INTENT_ATTRIBUTES = ("color", "gender", "brand", "usage", "season")
METRICS = (NDCG10, MRR, RECALL10)
LTR_NAME = "lightgbm lambdarank (IPS)"
IPS_NAME = "fused head (IPS weights)"
PRODUCTION_NAME = "production order"
RESULT_FORMAT = "fedrank-real-photos/3"
REGIME_LABELS = {"half": "half: 50% of titles lose colour words", "none": "none: no title names its colour"}


# ------------------------------------------------------------------------------------------ items and titles


def colour_pattern(items: list[CatalogItem]) -> re.Pattern[str]:
    """Whole-word, case-insensitive pattern of every word of every colour value in ``items``."""
    words = sorted({w for it in items for w in it.color.lower().split()}, key=lambda w: (-len(w), w))
    if not words:
        raise ValueError("no item has a colour (baseColour): nothing to degrade")
    return re.compile(r"\b(?:" + "|".join(re.escape(w) for w in words) + r")\b", re.IGNORECASE)


def strip_colour(title: str, pattern: re.Pattern[str], fallback: str) -> str:
    """``title`` without colour words (blanks collapsed); ``fallback`` (the type) when nothing is left."""
    out = " ".join(pattern.sub(" ", title).split())
    return out or fallback


def degrade(items: list[CatalogItem], regime: str, seed: int, pattern: re.Pattern[str]) -> list[CatalogItem]:
    """Items with colour words removed from the titles of all (``none``) or a seeded half (``half``)."""
    if regime not in REGIMES:
        raise ValueError(f"regime must be one of {REGIMES}, got {regime!r}")
    rng = np.random.default_rng([seed, 1])
    lose = np.ones(len(items), bool) if regime == "none" else rng.permutation(len(items)) < len(items) // 2
    return [replace(it, title=strip_colour(it.title, pattern, it.category)) if lose[i] else it
            for i, it in enumerate(items)]


def choose_and_split(items: list[CatalogItem], n: int, seed: int) -> tuple[list[CatalogItem], list[CatalogItem]]:
    """Uniform random subset of ``n`` items, split 70/30 into train/judged within each (type, colour) stratum."""
    rng = np.random.default_rng([seed, 0])
    pick = np.sort(rng.permutation(len(items))[: min(n, len(items))])
    strata: dict[tuple[str, str], list[int]] = defaultdict(list)
    for i in pick:
        strata[(items[i].category, items[i].color)].append(int(i))
    judged: set[int] = set()
    for key in sorted(strata):
        rows = rng.permutation(strata[key])
        judged.update(int(r) for r in rows[: int(round(len(rows) * (1 - TRAIN_SHARE)))])
    return [items[i] for i in pick if i not in judged], [items[i] for i in pick if i in judged]


# ------------------------------------------------------------------------------------------ judged queries


@dataclass(frozen=True)
class Query:
    text: str
    type: str
    colour: str
    gender: str | None  # None: gender not named


def gender(it: CatalogItem) -> str:
    return it.attributes.get("gender", "").lower()


def judged_queries(judged: list[CatalogItem]) -> list[Query]:
    """``colour type`` per (type, colour) and ``gender colour type`` per named (gender, type, colour) with >= 5."""
    combos: dict[tuple[str, str], int] = defaultdict(int)
    triples: dict[tuple[str, str, str], int] = defaultdict(int)
    for it in judged:
        combos[(it.category, it.color)] += 1
        triples[(gender(it), it.category, it.color)] += 1
    out = [Query(f"{c} {t}".lower(), t, c, None) for (t, c), k in combos.items() if k >= MIN_JUDGED and t and c]
    out += [Query(f"{g} {c} {t}".lower(), t, c, g) for (g, t, c), k in triples.items()
            if k >= MIN_JUDGED and g in NAMED_GENDERS and t and c]
    return sorted(out, key=lambda q: q.text)


def grade(q: Query, it: CatalogItem) -> float:
    if it.category != q.type:
        return 0.0
    if it.color != q.colour:
        return 1.0
    return 3.0 if q.gender is None or gender(it) == q.gender else 2.0


def _take(rng: np.random.Generator, pool: list[int], k: int) -> list[int]:
    return [pool[i] for i in rng.permutation(len(pool))[: max(k, 0)]]


def slate_rows(q: Query, judged: list[CatalogItem], rng: np.random.Generator) -> list[int]:
    """Rows of ``judged`` in one slate of (at most) 30: the mix described in the module docstring."""
    same = [i for i, it in enumerate(judged) if it.category == q.type]
    combo = [i for i in same if judged[i].color == q.colour]
    if q.gender is None:
        target = _take(rng, combo, N_TARGET)
    else:  # up to 5 of other genders, the rest (at least 5) of the named one
        others = _take(rng, [i for i in combo if gender(judged[i]) != q.gender], N_TARGET // 2)
        target = _take(rng, [i for i in combo if gender(judged[i]) == q.gender], N_TARGET - len(others)) + others
    other_colour = _take(rng, [i for i in same if judged[i].color != q.colour], N_SAME_TYPE)
    need = SLATE - len(target) - len(other_colour)
    rest = [i for i, it in enumerate(judged) if it.category != q.type]
    same_col = _take(rng, [i for i in rest if judged[i].color == q.colour], need // 2)
    taken = set(same_col)
    fill = _take(rng, [i for i in rest if i not in taken], need - len(same_col))
    return target + other_colour + same_col + fill


def make_judgments(judged: list[CatalogItem], seed: int) -> tuple[list[tuple[str, str, float]], list[Query]]:
    """``(query, item_id, grade)`` rows of every judged slate, and the queries."""
    queries = judged_queries(judged)
    rows: list[tuple[str, str, float]] = []
    for k, q in enumerate(queries):
        rng = np.random.default_rng([seed, 2, k])
        rows += [(q.text, judged[i].item_id, grade(q, judged[i])) for i in slate_rows(q, judged, rng)]
    return rows, queries


# ------------------------------------------------------------------------------------------ training


def pick_preset(num_train_items: int) -> str:
    return "small" if num_train_items <= 2500 else "default"


def simulate(train: list[CatalogItem], work: Path, seed: int) -> tuple[Prepared, dict[str, Any]]:
    """Shoppers over the train items (catalog written to ``work``), prepared for training."""
    work.mkdir(parents=True, exist_ok=True)
    cat_path = work / "train_catalog.jsonl"
    save_catalog_jsonl(Catalog(items=train, source="train items"), cat_path)
    preset = pick_preset(len(train))
    t0 = time.perf_counter()
    data = simulate_catalog_dir(cat_path, work / "data", preset=preset, seed=seed, progress=False,
                                intent_attributes=INTENT_ATTRIBUTES)
    t1 = time.perf_counter()
    prep = prepare(data, progress=False)
    meta = json.loads((data / "meta.json").read_text())
    info = {"preset": preset, "simulate_s": t1 - t0, "prepare_s": time.perf_counter() - t1,
            "counts": meta["counts"], "propensity_eta": prep.eta, "train_sessions": len(prep.train_idx)}
    log.info("simulated %d sessions over %d train items (preset %s) in %.1f s", meta["counts"]["sessions"],
             len(train), preset, t1 - t0)
    return prep, info


def train_all(prep: Prepared, seed: int, epochs: int) -> tuple[dict[str, FusedRankingHead], Any, dict[str, Any]]:
    """The heads of ``centralized.head_variants`` (plus the fused head trained with IPS weights, when that is not
    the default debiasing) and, when available, LightGBM; with fit info."""
    heads: dict[str, FusedRankingHead] = {}
    info: dict[str, Any] = {}
    variants = head_variants(ModelConfig(), TrainConfig())
    if TrainConfig().debias != "ips":  # the earlier default beside the current one
        variants[IPS_NAME] = (ModelConfig(), replace(TrainConfig(), debias="ips"))
    for name, (mcfg, tcfg) in variants.items():
        model, fit = train_central(prep, mcfg, tcfg, epochs=epochs, seed=seed, progress=False)
        heads[name] = model
        info[name] = {k: fit[k] for k in ("epochs_run", "selected_epochs", "seconds", "params")}
        log.info("trained %s: %d epochs (weights of epochs %s averaged), %.1f s", name, fit["epochs_run"],
                 fit["selected_epochs"], fit["seconds"])
    ranker = None
    if _ltr is not None:
        ranker, fit = _ltr.fit_prepared(prep, _ltr.LtrConfig(num_threads=1, seed=seed), VAL_FRAC)
        info[LTR_NAME] = {k: fit[k] for k in ("seconds", "best_iteration", "rounds_run")}
    return heads, ranker, info


# ------------------------------------------------------------------------------------------ evaluation


def judged_store(judged: list[CatalogItem], cache: Path, stats: dict[str, float]) -> FeatureStore:
    return build_feature_store(Catalog(items=judged, source="judged items"), cache, progress=False,
                               dense_stats=stats)


def evaluate(prep: Prepared, heads: dict[str, FusedRankingHead], ranker: Any, judged: list[CatalogItem],
             judgments: list[tuple[str, str, float]], cache: Path, seed: int) -> dict[str, Any]:
    """Metrics of every ranker on the judged slates (item-disjoint from training)."""
    catalog = Catalog(items=judged, source="judged items")
    bm25 = BM25Ranker([it.text() for it in judged])
    sessions = judged_sessions(catalog, judgments, "generated judgments", bm25)
    store = judged_store(judged, cache, prep.store.meta["dense_stats"])
    query_emb = encode_queries(sessions.queries, cache)
    slates = build_slates(sessions, query_emb, np.array([it.price for it in judged], np.float64))
    items = slates.items.numpy()
    scale = GradeScale("exp2", 3.0, True)
    scores: dict[str, np.ndarray] = {
        "random": np.random.default_rng([seed, 3]).random(items.shape),
        "bm25": bm25.score(sessions.queries, items),
        "cosine": CosineRanker(store.text).score(query_emb, items),
    }
    if ranker is not None and _ltr is not None:
        scores[LTR_NAME] = _ltr.score_judged_slates(ranker, sessions, slates, store, bm25)
    table = ItemTable.from_store(store)
    for name, model in heads.items():
        scores[name] = score_slates(model, slates, table)
    per = {name: judged_metrics(s, slates, scale) for name, s in scores.items()}
    gendered = np.array([q.split()[0] in NAMED_GENDERS for q in sessions.queries], bool)
    out: dict[str, Any] = {name: summarize(v) for name, v in per.items()}
    by_form = {form: {name: summarize({m: v[m][sel] for m in METRICS}) for name, v in per.items()}
               for form, sel in (("gendered", gendered), ("ungendered", ~gendered))}
    # the same slates with the first stage hidden (random order, no retrieval score): how much of each learnt
    # ranker's figure comes from following BM25's order rather than from its own reading of query, text and photo
    hidden_sessions = hide_first_stage(sessions, seed)
    hidden = build_slates(hidden_sessions, query_emb, np.array([it.price for it in judged], np.float64))
    hidden_scores = {name: score_slates(model, hidden, table) for name, model in heads.items()}
    if ranker is not None and _ltr is not None:
        hidden_scores[LTR_NAME] = _ltr.score_judged_slates(ranker, hidden_sessions, hidden, store, bm25)
    first_stage_hidden = {name: summarize(judged_metrics(s, hidden, scale)) for name, s in hidden_scores.items()}
    # the same slates with the logs' own first stage: the simulator's production ranker (title overlap, popularity,
    # noise), as a shop serves its new slates with the ranker that ordered its logs
    prod_sessions = production_first_stage(sessions, catalog, market_config(len(prep.catalog.items), seed),
                                           np.random.default_rng([seed, 7]))
    prod = build_slates(prod_sessions, query_emb, np.array([it.price for it in judged], np.float64))
    prod_scores = {PRODUCTION_NAME: -prod.slate_dense[..., 0].numpy(),  # its rank feature, as evaluate_all's row
                   **{name: score_slates(model, prod, table) for name, model in heads.items()}}
    if ranker is not None and _ltr is not None:
        prod_scores[LTR_NAME] = _ltr.score_judged_slates(ranker, prod_sessions, prod, store, bm25)
    first_stage_production = {name: summarize(judged_metrics(s, prod, scale)) for name, s in prod_scores.items()}
    return {"rankers": out, "by_query_form": by_form, "first_stage_hidden": first_stage_hidden,
            "first_stage_production": first_stage_production,
            "num_queries": len(sessions),
            "num_gendered": int(gendered.sum()), "num_judgments": len(judgments),
            "judged_with_image": int(store.mask[:, 1].sum())}


def market_config(num_train_items: int, seed: int) -> MarketConfig:
    """The simulator configuration :func:`simulate` ran with."""
    return make_config(pick_preset(num_train_items), seed, intent_attributes=INTENT_ATTRIBUTES)


def run_key(args: argparse.Namespace, seed: int, regime: str) -> dict[str, Any]:
    """What determines one (seed, regime) result: a stored result with the same key is reused."""
    return {"format": RESULT_FORMAT, "photos": str(args.photos.resolve()), "items": args.items,
            "epochs": args.epochs, "seed": seed, "regime": regime, "lightgbm": _ltr is not None,
            "model": ModelConfig().to_dict(), "train": asdict(TrainConfig()), "selection": DEFAULT_CRITERION}


def run_one(items: list[CatalogItem], pattern: re.Pattern[str], args: argparse.Namespace, seed: int,
            regime: str, cache: Path) -> dict[str, Any]:
    """One (seed, regime), stored in its work folder: a rerun with the same key reads it back."""
    path = args.out / "work" / f"seed{seed}-{regime}" / "result.json"
    res = stored_result(path, run_key(args, seed, regime),
                        lambda: compute_one(items, pattern, args, seed, regime, cache))
    return {**res, "colour_evidence": colour_evidence(path.parent / "data")}


def colour_evidence(data_dir: Path) -> dict[str, Any]:
    """How often a click, and a purchase, under a query that names a colour lands on an item of that colour, over
    the simulated log in ``data_dir`` (the evidence the query-image alignment learns colour from)."""
    catalog = load_catalog(data_dir / "catalog.jsonl")
    log_ = SessionLog.load(data_dir / "sessions.npz")
    colours = sorted({it.color.lower() for it in catalog.items if it.color}, key=len, reverse=True)
    named = [next((c for c in colours if f" {c} " in f" {q} "), "") for q in log_.queries]  # longest colour first
    session = np.repeat(np.arange(len(log_)), np.diff(log_.offsets))
    wanted = np.array([named[int(q)] for q in log_.query], dtype=object)[session]
    item_colour = np.array([it.color.lower() for it in catalog.items], dtype=object)[log_.items]
    out: dict[str, Any] = {}
    for kind, events in (("clicks", log_.clicks), ("purchases", log_.purchases)):
        sel = (events > 0) & (wanted != "")
        out[kind] = {"under_colour_queries": int(sel.sum()),
                     "share_in_query_colour": float((item_colour[sel] == wanted[sel]).mean()) if sel.any() else None}
    return out


def stored_result(path: Path, key: dict[str, Any], compute: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    """The result stored at ``path`` when its ``key`` matches (``reused: True``), else ``compute()`` stored there."""
    if path.is_file():
        old = json.loads(path.read_text())
        if old.get("key") == key:
            log.info("reusing %s (same key)", path)
            return {**old, "reused": True}
    data = results_bytes({"key": key, **compute()})
    atomic_write(path, lambda f: f.write(data))
    return {**json.loads(data), "reused": False}


def hide_first_stage(sessions: SessionLog, seed: int) -> SessionLog:
    """``sessions`` with every slate's first-stage ranks replaced by a seeded random order and the retrieval
    scores by zeros (candidates, grades and everything else unchanged)."""
    rng = np.random.default_rng([seed, 5])
    ranks = np.concatenate([rng.permutation(int(b - a)) for a, b in zip(sessions.offsets[:-1], sessions.offsets[1:],
                                                                        strict=True)]) \
        if len(sessions) else np.zeros(0, np.int64)
    return replace(sessions, prod_rank=ranks.astype(sessions.prod_rank.dtype),
                   retrieval_score=np.zeros_like(sessions.retrieval_score))


def compute_one(items: list[CatalogItem], pattern: re.Pattern[str], args: argparse.Namespace, seed: int,
                regime: str, cache: Path) -> dict[str, Any]:
    """One (seed, regime): degrade, split, simulate, train, evaluate."""
    t0 = time.perf_counter()
    train, judged = choose_and_split(items, args.items, seed)
    titled = degrade(train + judged, regime, seed, pattern)  # one seeded half over the whole subset
    train, judged = titled[: len(train)], titled[len(train):]
    judgments, queries = make_judgments(judged, seed)
    if not queries:
        raise SystemExit(f"no (type, colour) has {MIN_JUDGED} judged items; use a larger --items")
    prep, sim = simulate(train, args.out / "work" / f"seed{seed}-{regime}", seed)
    t1 = time.perf_counter()
    heads, ranker, fit = train_all(prep, seed, args.epochs)
    t2 = time.perf_counter()
    judged_res = evaluate(prep, heads, ranker, judged, judgments, cache, seed)
    simulated = evaluate_all(prep, heads)
    t3 = time.perf_counter()
    titles_without_colour = sum(not pattern.search(it.title) for it in train + judged)
    return {
        "seed": seed, "regime": regime, "train_items": len(train), "judged_items": len(judged),
        "titles_without_colour_words": titles_without_colour, "simulation": sim, "training": fit,
        "judged": judged_res, "simulated_heldout": simulated,
        "timings": {"simulate_prepare_s": t1 - t0, "train_s": t2 - t1, "evaluate_s": t3 - t2, "total_s": t3 - t0},
    }


# ------------------------------------------------------------------------------------------ reporting


def aggregate(runs: list[dict[str, Any]], block: str = "rankers") -> dict[str, Any]:
    """Per regime, ranker and metric: mean, std, min, max over seeds (of ``judged[block]``)."""
    out: dict[str, Any] = {}
    for regime in dict.fromkeys(r["regime"] for r in runs):
        rows = [r["judged"][block] for r in runs if r["regime"] == regime]
        out[regime] = {}
        for name in rows[0]:
            out[regime][name] = {}
            for m in METRICS:
                v = np.array([row[name][m] for row in rows], np.float64)
                out[regime][name][m] = {"mean": float(np.nanmean(v)), "std": float(np.nanstd(v)),
                                        "min": float(np.nanmin(v)), "max": float(np.nanmax(v)), "n": len(v)}
    return out


def table(agg: dict[str, Any]) -> str:
    lines = []
    for regime, rankers in agg.items():
        lines.append(f"\nregime {regime!r} (mean over seeds, [min, max])")
        lines.append(f"{'ranker':32s} " + " ".join(f"{m:>24s}" for m in METRICS))
        for name, ms in rankers.items():
            cells = [f"{ms[m]['mean']:.4f} [{ms[m]['min']:.4f},{ms[m]['max']:.4f}]" for m in METRICS]
            lines.append(f"{name:32s} " + " ".join(f"{c:>24s}" for c in cells))
    return "\n".join(lines)


def plot(agg: dict[str, Any], path: Path) -> None:
    """Bars of NDCG@10 per ranker, one group per regime, whiskers at the min and max over seeds."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    regimes = list(agg)
    names = list(agg[regimes[0]])
    width = 0.8 / len(names)
    fig, ax = plt.subplots(figsize=(2.5 + 2.2 * len(regimes) + 0.3 * len(names), 4.5))
    for k, name in enumerate(names):
        st = [agg[r][name][NDCG10] for r in regimes]
        mean = np.array([s["mean"] for s in st])
        err = np.array([[s["mean"] - s["min"] for s in st], [s["max"] - s["mean"] for s in st]])
        ax.bar(np.arange(len(regimes)) + (k - (len(names) - 1) / 2) * width, mean, width, yerr=err, capsize=2,
               label=name)
    ax.set_xticks(np.arange(len(regimes)), [REGIME_LABELS[r] for r in regimes])
    ax.set_ylabel("NDCG@10 (judged, item-disjoint)")
    ax.set_ylim(0, 1)
    seeds = agg[regimes[0]][names[0]][NDCG10]["n"]
    ax.set_title(f"Real photos, item-disjoint judged slates; bars: mean of {seeds} seed(s), whiskers: min-max",
                 fontsize=10)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    fig.tight_layout()
    tmp = path.with_name("." + path.name + ".tmp.png")
    fig.savefig(tmp, dpi=120)
    plt.close(fig)
    os.replace(tmp, path)


def embed_photos(items: list[CatalogItem], args: argparse.Namespace, cache: Path) -> dict[str, Any]:
    """Embed (or find in the cache) the photos of every seed's subset, timed apart from the texts."""
    ids: set[str] = set()
    for seed in args.seeds:
        train, judged = choose_and_split(items, args.items, seed)
        ids.update(it.item_id for it in train + judged)
    subset = [replace(it, title="") for it in items if it.item_id in ids]  # blank text: only images are encoded
    t0 = time.perf_counter()
    store = build_feature_store(Catalog(items=subset, source="photos"), cache, progress=True)
    secs = time.perf_counter() - t0
    log.info("photos: %d items, %d decodable, %.1f s (cached photos are read, not encoded)", len(subset),
             int(store.mask[:, 1].sum()), secs)
    return {"items": len(subset), "with_image": int(store.mask[:, 1].sum()), "seconds": secs}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    p.add_argument("--photos", type=Path, required=True, help="folder with styles.csv and images/")
    p.add_argument("--out", type=Path, default=Path("runs/real-photos"))
    p.add_argument("--items", type=int, default=6000, help="random subset size (default 6000)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--regimes", nargs="+", choices=REGIMES, default=list(REGIMES))
    p.add_argument("--epochs", type=int, default=12, help="head epochs at most (early stopping decides)")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s", datefmt="%H:%M:%S")
    torch.set_num_threads(1)
    args = parse_args(argv)
    styles = args.photos / "styles.csv"
    os.environ.setdefault(CACHE_ENV, str((args.out / ".feature-cache").resolve()))  # one cache for every step
    cache = feature_cache_dir(args.photos)
    t0 = time.perf_counter()
    items = load_catalog(styles).items
    pattern = colour_pattern(items)
    photos = embed_photos(items, args, cache)
    runs = []
    for seed in args.seeds:
        for regime in args.regimes:
            log.info("=== seed %d, regime %s ===", seed, regime)
            runs.append(run_one(items, pattern, args, seed, regime, cache))
            log.info("seed %d %s: %s", seed, regime, {k: round(v[NDCG10], 4)
                                                      for k, v in runs[-1]["judged"]["rankers"].items()})
    agg = aggregate(runs)
    hidden = aggregate(runs, "first_stage_hidden")
    for r in runs:
        ev = r["colour_evidence"]
        log.info("seed %d %s: %.1f%% of %d clicks and %.1f%% of %d purchases under colour queries are of that colour",
                 r["seed"], r["regime"], 100 * (ev["clicks"]["share_in_query_colour"] or 0),
                 ev["clicks"]["under_colour_queries"], 100 * (ev["purchases"]["share_in_query_colour"] or 0),
                 ev["purchases"]["under_colour_queries"])
    production = aggregate(runs, "first_stage_production")
    payload = {
        "config": {"photos": str(args.photos), "items": args.items, "seeds": args.seeds, "regimes": args.regimes,
                   "epochs": args.epochs, "train_share": TRAIN_SHARE, "slate": SLATE, "min_judged": MIN_JUDGED,
                   "intent_attributes": list(INTENT_ATTRIBUTES), "cache": str(cache),
                   "colour_words": pattern.pattern, "lightgbm": _ltr is not None,
                   "first_stage_order": "bm25 within the slate",
                   "first_stage_production": "the simulation's production ranker (market_slates.production_first_stage)",
                   "subset": "uniform random",
                   "split": "item-disjoint, 70/30 within each (articleType, baseColour) stratum"},
        "photo_embedding": photos, "per_seed": runs, "aggregate": agg,
        "aggregate_first_stage_hidden": hidden, "aggregate_first_stage_production": production,
        "timings": {"total_s": time.perf_counter() - t0},
    }
    args.out.mkdir(parents=True, exist_ok=True)
    data = results_bytes(payload)
    atomic_write(args.out / "results.json", lambda f: f.write(data))
    plot(agg, args.out / "ndcg.png")
    print(table(agg))
    print("\nthe same slates, first stage hidden (random order, no retrieval score):" + table(hidden))
    print("\nthe same slates, first stage = the logs' production ranker:" + table(production))
    print(f"\nwrote {args.out / 'results.json'} and {args.out / 'ndcg.png'} in {time.perf_counter() - t0:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
