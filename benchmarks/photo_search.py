"""Search by photo on real photos: the learnt projection (``shared_model/photo_search.py``) against today's heuristic.

    FEDRANK_CACHE=data/.feature-cache-photos python benchmarks/photo_search.py \
        --photos ../shared/data/fashion-photos --out runs/photo-search [--items 3000] [--seeds 0 1 2] [--no-head]

Per seed, with ``benchmarks/real_photos.py``'s functions, so the items and the split are that benchmark's:

1. ``choose_and_split``: a seeded subset of ``--items`` rows, split item-disjointly 70/30 (train / judged) within
   each (articleType, baseColour) stratum. Titles are the catalog's own (no colour words removed: the photo is the
   query, and only the head term reads titles).
2. The projection is fitted on the **train** items' photos only (positives: other train photos of the same type
   and colour); its number of steps is chosen on a held-out share of those train photos.
3. Judged slates: ``make_judgments`` builds real_photos' slates of 30 judged items; every ungendered (type, colour)
   query is kept (gendered ones are real_photos' text-query variants). Grades (``grade``): 3 = same type and
   colour, 1 = same type, 0 = other. The candidates are shown to the rankers in a seeded random order (the
   slate's own order lists the targets first).
4. The query photo: a seeded pick among the judged items of the query's type and colour that are **not** in the
   slate; when there is none, among the catalog's items outside this seed's subset (never trained on either);
   queries with neither are skipped (counted). Train photos are never queries.
5. Rankers on the same queries and slates: ``visual``: the raw cosine (today's heuristic) and the learnt
   projected cosine, both through ``photo_search.visual_scores`` (the runtime's definition); and, unless
   ``--no-head``, the runtime's full formula ``z(visual) + 0.25 z(head)`` where ``head`` is one head
   (``train_central``, the default "fused head") trained on ``real_photos.simulate``'s clicks over the train items,
   scoring each slate with the empty query (no text), no shopper history, first-stage ranks = the shown order.

Metrics (``shared_model.metrics``): NDCG@10 (exp2 gains), MRR (first grade-3 item), Recall@10 (grade-3 items);
mean / std / min / max over seeds in ``OUT/results.json``; a table on stdout.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
from real_photos import Query, choose_and_split, grade, make_judgments, simulate  # noqa: E402

from client.runtime import PHOTO_HEAD_WEIGHT  # noqa: E402
from shared_model.catalog_io import load_catalog  # noqa: E402
from shared_model.config import ModelConfig, TrainConfig  # noqa: E402
from shared_model.embedding_cache import feature_cache_dir  # noqa: E402
from shared_model.features import FeatureStore, build_feature_store, encode_queries  # noqa: E402
from shared_model.head import FusedRankingHead  # noqa: E402
from shared_model.head_features import head_feeds, log_prices, slate_features  # noqa: E402
from shared_model.metrics import MRR, NDCG10, RECALL10, compute_metrics, relevance_thresholds, summarize  # noqa: E402
from shared_model.photo_search import PhotoProjection, PhotoSearchConfig, fit_from_catalog, visual_scores  # noqa: E402
from shared_model.schema import Catalog, CatalogItem, atomic_write, results_bytes  # noqa: E402
from simulations.centralized import train_central  # noqa: E402

log = logging.getLogger("photo_search")

METRICS = (NDCG10, MRR, RECALL10)
TOP_GRADE = 3.0
RESULT_FORMAT = "fedrank-photo-search/1"


# ------------------------------------------------------------------------------------------ queries and slates


def photo_queries(judged: list[CatalogItem], outside: list[CatalogItem], seed: int
                  ) -> tuple[list[tuple[Query, list[int], CatalogItem, str]], int]:
    """``[(query, slate rows of judged, query item, source)]`` for every ungendered judged query with a held-out
    photo, and the number skipped (no photo of that type and colour outside the slate and the train items)."""
    rows, queries = make_judgments(judged, seed)
    row_of = {it.item_id: i for i, it in enumerate(judged)}
    slates: dict[str, list[int]] = {}
    for q, iid, _ in rows:
        slates.setdefault(q, []).append(row_of[iid])
    out, skipped = [], 0
    for k, q in enumerate(queries):
        if q.gender is not None:
            continue
        slate = slates[q.text]
        rng = np.random.default_rng([seed, 5, k])
        taken = set(slate)
        pool = [it for i, it in enumerate(judged) if i not in taken and it.category == q.type
                and it.color == q.colour and it.image_path]
        source = "judged, not in the slate"
        if not pool:
            pool = [it for it in outside if it.category == q.type and it.color == q.colour and it.image_path]
            source = "outside the subset"
        if not pool:
            skipped += 1
            continue
        order = [slate[i] for i in rng.permutation(len(slate))]  # shown order: the slate lists targets first
        out.append((q, order, pool[int(rng.integers(len(pool)))], source))
    return out, skipped


# ------------------------------------------------------------------------------------------ rankers


def visual_matrix(queries: list[tuple[Query, list[int], CatalogItem, str]], store: FeatureStore,
                  judged: list[CatalogItem], photos: dict[str, np.ndarray], proj: PhotoProjection | None,
                  width: int) -> np.ndarray:
    """``[Q, width]`` visual scores (padding 0) through the runtime's ``visual_scores``."""
    out = np.zeros((len(queries), width), np.float64)
    for n, (_, slate, qitem, _) in enumerate(queries):
        rows = store.rows([judged[i].item_id for i in slate])
        ref = np.where(store.mask[rows, 1:2], store.image[rows], store.video[rows])
        present = store.mask[rows, 1] | store.mask[rows, 2]
        out[n, : len(slate)] = visual_scores(photos[qitem.item_id], ref, present, proj)
    return out


def head_matrix(model: FusedRankingHead, queries: list[tuple[Query, list[int], CatalogItem, str]],
                store: FeatureStore, judged: list[CatalogItem], empty_query: np.ndarray, width: int) -> np.ndarray:
    """``[Q, width]`` head scores with the empty query, no history, ranks = shown order (the runtime's inputs)."""
    out = np.zeros((len(queries), width), np.float64)
    model.eval()
    for n, (_, slate, _, _) in enumerate(queries):
        rows = store.rows([judged[i].item_id for i in slate])
        price = np.array([judged[i].price for i in slate], np.float64)
        s = len(rows)
        feeds = head_feeds(empty_query[None], store.text[rows][None], store.image[rows][None],
                           store.video[rows][None], store.mask[rows][None], store.dense[rows][None],
                           slate_features(log_prices(price))[None],
                           (np.zeros((1, store.text.shape[1]), np.float32),
                            np.zeros((1, store.image.shape[1]), np.float32), np.zeros((1, 1), np.float32)))
        with torch.inference_mode():
            out[n, :s] = model(**{k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in feeds.items()}
                               ).numpy()[0]
    return out


def _z(x: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Standardised within each slate (the runtime's ``_z``), padding 0."""
    out = np.zeros_like(x)
    for i in range(len(x)):
        v = x[i, mask[i]]
        out[i, mask[i]] = (v - v.mean()) / (v.std() + 1e-6)
    return out


def metrics(scores: np.ndarray, grades: np.ndarray, mask: np.ndarray) -> dict[str, np.ndarray]:
    mrr_t, rec_t = relevance_thresholds(TOP_GRADE)
    return compute_metrics(np.where(mask, scores, -1e9), grades, mask, k=10, mrr_threshold=mrr_t,
                           recall_threshold=rec_t)


# ------------------------------------------------------------------------------------------ one seed


def photo_store(items: list[CatalogItem], cache: Path) -> FeatureStore:
    """Image embeddings of ``items`` (blank titles: only photos are encoded; cached photos are read)."""
    return build_feature_store(Catalog(items=[replace(it, title="") for it in items], source="photos"), cache,
                               progress=False)


def run_seed(items: list[CatalogItem], args: argparse.Namespace, seed: int, cache: Path) -> dict[str, Any]:
    t0 = time.perf_counter()
    train, judged = choose_and_split(items, args.items, seed)
    subset = {it.item_id for it in train + judged}
    outside = [it for it in items if it.item_id not in subset]
    queries, skipped = photo_queries(judged, outside, seed)
    if not queries:
        raise SystemExit("no judged (type, colour) query has a held-out photo; use a larger --items")
    qitems = list({q[2].item_id: q[2] for q in queries}.values())
    extra = [it for it in qitems if it.item_id not in subset]  # query photos from outside the subset
    photos_store = photo_store(train + judged + extra, cache)
    photos = {it.item_id: photos_store.image[photos_store.row(it.item_id)] for it in qitems}
    no_photo = [q for q in queries if not photos_store.mask[photos_store.row(q[2].item_id), 1]]
    if no_photo:  # an unreadable photo file: that query cannot be asked
        queries = [q for q in queries if photos_store.mask[photos_store.row(q[2].item_id), 1]]
        skipped += len(no_photo)
    t1 = time.perf_counter()

    cfg = replace(PhotoSearchConfig(), seed=seed)
    ntr = len(train)
    proj = fit_from_catalog(photos_store.item_ids[:ntr], photos_store.image[:ntr], photos_store.mask[:ntr, 1],
                            Catalog(items=train), cfg)
    t2 = time.perf_counter()

    width = max(len(q[1]) for q in queries)
    mask = np.zeros((len(queries), width), bool)
    grades = np.zeros((len(queries), width), np.float64)
    for n, (q, slate, _, _) in enumerate(queries):
        mask[n, : len(slate)] = True
        grades[n, : len(slate)] = [grade(q, judged[i]) for i in slate]
    visual = {"heuristic (raw cosine)": visual_matrix(queries, photos_store, judged, photos, None, width),
              "learnt (projected cosine)": visual_matrix(queries, photos_store, judged, photos, proj, width)}
    scores = dict(visual)
    head_info: dict[str, Any] = {}
    if args.head:
        model, head_info = head_for(train, judged, args, seed, cache)
        empty = encode_queries([""], cache)[0]
        store = head_info.pop("store")
        head = head_matrix(model, queries, store, judged, empty, width)
        scores["head only (empty query)"] = head
        for name, v in visual.items():
            scores[f"{name.split(' ')[0]} + {PHOTO_HEAD_WEIGHT:g} head"] = _z(v, mask) + PHOTO_HEAD_WEIGHT * _z(head,
                                                                                                              mask)
    t3 = time.perf_counter()
    per = {name: metrics(s, grades, mask) for name, s in scores.items()}
    sources = [q[3] for q in queries]
    return {
        "seed": seed, "train_items": len(train), "judged_items": len(judged), "queries": len(queries),
        "skipped_queries": skipped, "query_photo_sources": {s: sources.count(s) for s in sorted(set(sources))},
        "rankers": {name: summarize(v) for name, v in per.items()},
        "projection": {k: v for k, v in proj.info.items() if k != "config"}, "head": head_info,
        "timings": {"photos_s": t1 - t0, "fit_s": t2 - t1, "score_s": t3 - t2, "total_s": t3 - t0},
    }


def head_for(train: list[CatalogItem], judged: list[CatalogItem], args: argparse.Namespace, seed: int,
             cache: Path) -> tuple[FusedRankingHead, dict[str, Any]]:
    """The default fused head trained on real_photos' simulated clicks over the train items; the judged items'
    feature store (text and photos, dense features standardised with the training statistics)."""
    prep, sim = simulate(train, args.out / "work" / f"seed{seed}", seed)
    model, fit = train_central(prep, ModelConfig(), TrainConfig(), epochs=args.epochs, seed=seed, progress=False)
    store = build_feature_store(Catalog(items=judged, source="judged items"), cache, progress=False,
                                dense_stats=prep.store.meta["dense_stats"])
    log.info("head: %d epochs, %.1f s", fit["epochs_run"], fit["seconds"])
    return model, {"store": store, "simulation": {k: sim[k] for k in ("preset", "counts", "train_sessions")},
                   "epochs_run": fit["epochs_run"], "selected_epochs": fit["selected_epochs"],
                   "seconds": fit["seconds"]}


# ------------------------------------------------------------------------------------------ reporting


def aggregate(runs: list[dict[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name in runs[0]["rankers"]:
        out[name] = {}
        for m in METRICS:
            v = np.array([r["rankers"][name][m] for r in runs], np.float64)
            out[name][m] = {"mean": float(np.nanmean(v)), "std": float(np.nanstd(v)), "min": float(np.nanmin(v)),
                            "max": float(np.nanmax(v)), "n": len(v)}
    return out


def table(agg: dict[str, Any]) -> str:
    lines = [f"{'ranker':30s} " + " ".join(f"{m:>24s}" for m in METRICS)]
    for name, ms in agg.items():
        cells = [f"{ms[m]['mean']:.4f} [{ms[m]['min']:.4f},{ms[m]['max']:.4f}]" for m in METRICS]
        lines.append(f"{name:30s} " + " ".join(f"{c:>24s}" for c in cells))
    return "\n".join(lines)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    p.add_argument("--photos", type=Path, required=True, help="folder with styles.csv and images/")
    p.add_argument("--out", type=Path, default=Path("runs/photo-search"))
    p.add_argument("--items", type=int, default=3000, help="random subset size (default 3000: the photo cache's)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--head", action=argparse.BooleanOptionalAction, default=True,
                   help="also compare the runtime's full formula with a head trained on simulated clicks")
    p.add_argument("--epochs", type=int, default=12, help="head epochs at most (early stopping decides)")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s", datefmt="%H:%M:%S")
    torch.set_num_threads(1)
    args = parse_args(argv)
    cache = feature_cache_dir(args.photos)
    t0 = time.perf_counter()
    items = load_catalog(args.photos / "styles.csv").items
    runs = []
    for seed in args.seeds:
        log.info("=== seed %d ===", seed)
        runs.append(run_seed(items, args, seed, cache))
        log.info("seed %d: %s", seed, {k: round(v[NDCG10], 4) for k, v in runs[-1]["rankers"].items()})
    agg = aggregate(runs)
    payload = {
        "format": RESULT_FORMAT,
        "config": {"photos": str(args.photos), "items": args.items, "seeds": args.seeds, "head": args.head,
                   "epochs": args.epochs, "cache": str(cache), "photo_search": asdict(PhotoSearchConfig()),
                   "photo_head_weight": PHOTO_HEAD_WEIGHT, "grades": "3 same type and colour, 1 same type, 0 other",
                   "split": "real_photos.choose_and_split: item-disjoint 70/30 within each (type, colour)",
                   "command": " ".join([os.path.basename(sys.executable), *sys.argv])},
        "per_seed": runs, "aggregate": agg, "timings": {"total_s": time.perf_counter() - t0},
    }
    args.out.mkdir(parents=True, exist_ok=True)
    data = results_bytes(payload)
    atomic_write(args.out / "results.json", lambda f: f.write(data))
    print(table(agg))
    print(f"\nwrote {args.out / 'results.json'} in {time.perf_counter() - t0:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
