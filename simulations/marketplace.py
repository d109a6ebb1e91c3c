"""The marketplace simulator: catalog, users, queries, slates and position-biased clicks.

Everything is deterministic by ``MarketConfig.seed``: the same configuration gives byte-identical
``catalog.jsonl`` and ``sessions.npz``.

Pipeline
--------
1. **Catalog** (:func:`generate_catalog`): 10 categories, each with a drawn silhouette, attribute
   vocabularies (colour, pattern, brand, material, price range) and a lognormal price. Titles are built
   from the attributes with synonyms, marketing words and omissions (colour left out of ~45% of titles,
   pattern of ~50%), so some attributes are visible only in the image. ~35% of items have a 4-frame video;
   some of those have the video-only attribute ``feature = "light-up"``, shown only by the later frames.
2. **Users** (:func:`build_users`): segments with preferences over categories, colours, brands and price;
   each user draws latent preferences around the segment's, so federated clients are non-IID.
3. **Sessions** (:func:`simulate_sessions`): an intent (category + some attributes of a target product the
   user would like; ~20% vague = category only; ~10% request the video-only feature where it exists) is
   rendered as a query with synonyms. First-stage retrieval builds a slate of ``slate_min..slate_max``
   candidates and orders it by a noisy text-only score (IDF-weighted token overlap of query and title,
   popularity, noise): informative but blind to image- and video-only attributes. A position-based click
   model generates clicks and purchases. ~5% of sessions show the slate in a random order.

Ground truth kept for evaluation only: graded relevance 0..3 (from the intent) and personal utility in
[-1, 1] (from the user's preferences). The same users/queries/slates/clicks simulation runs over any
imported catalog (:func:`simulate_over_catalog`); it builds intents from whatever attribute columns exist.

Modules
-------
This module holds the entry points that write a data folder and re-exports the public names of the parts:
``market_vocab`` (words), ``market_config`` (:class:`MarketConfig`, presets, random streams),
``market_catalog`` (products, rendering), ``market_index`` (integer view of a catalog), ``market_users``,
``market_queries`` (intents, queries), ``market_slates`` (first-stage slates, production order),
``market_clicks`` (relevance, display order, clicks, purchases), ``market_sessions`` (the session loop) and
``market_writers`` (files).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import time
from pathlib import Path
from typing import Any

from shared_model.catalog_io import load_catalog, load_catalog_with_report, save_catalog_jsonl
from shared_model.outdir import forked_workers_die_with_me, locked_dir, stage_into
from shared_model.schema import Catalog, SessionLog
from simulations.market_catalog import generate_catalog, render_all, render_seed
from simulations.market_config import PRESETS, MarketConfig, make_config
from simulations.market_index import CatalogIndex
from simulations.market_sessions import simulate_over_catalog, simulate_sessions
from simulations.market_users import Users, build_users
from simulations.market_vocab import (
    BRANDS,
    CATEGORIES,
    FEATURE,
    PATTERN_SHARES,
    PRICE_RANGES,
    SYNONYMS,
    CategorySpec,
)
from simulations.market_writers import (
    ground_truth,
    read_meta,
    save_session_log,
    write_json,
    write_session_files,
)
from simulations.title_intents import fill_missing_intents

__all__ = [
    "BRANDS",
    "CATEGORIES",
    "FEATURE",
    "PATTERN_SHARES",
    "PRESETS",
    "PRICE_RANGES",
    "SYNONYMS",
    "CategorySpec",
    "MarketConfig",
    "Users",
    "build_users",
    "generate_catalog",
    "generate_marketplace",
    "load_marketplace",
    "make_config",
    "render_seed",
    "save_session_log",
    "simulate_catalog_dir",
    "simulate_over_catalog",
    "simulate_sessions",
]

log = logging.getLogger(__name__)

GENERATOR = "fedrank.simulations.marketplace"
FORMAT_VERSION = 1


def _simulate(catalog: Catalog, cfg: MarketConfig, progress: bool) -> tuple[CatalogIndex, Users, SessionLog]:
    """Index the catalog, draw the users and simulate their sessions."""
    index = CatalogIndex(catalog, cfg)
    users = build_users(catalog, cfg, index=index)
    sessions = simulate_sessions(catalog, cfg, users=users, progress=progress)
    return index, users, sessions


def generate_marketplace(
    out_dir: str | os.PathLike[str], preset: str = "default", seed: int = 0, progress: bool = True,
    workers: int | None = None, **overrides: Any,
) -> Path:
    """Generate a complete simulated marketplace on disk (idempotent, atomic).

    Parameters
    ----------
    out_dir : str or PathLike
        Output folder: built in a staging folder beside it and swapped in whole when complete
        (:func:`shared_model.outdir.staged_dir`); an existing folder is replaced only when it is empty or a
        fedrank data folder (``meta.json`` from this generator), and stays untouched until then.
    preset : str
        ``tiny``, ``small``, ``default`` or ``large`` (see :data:`PRESETS`).
    seed : int
        Master seed.
    progress : bool
        Show progress bars.
    workers : int, optional
        Rendering processes (default: CPU count, at most 8); does not change the output.
    **overrides
        Any :class:`MarketConfig` field.

    Returns
    -------
    pathlib.Path
        ``out_dir``, holding ``catalog.jsonl``, ``images/<item_id>.jpg``, ``videos/<item_id>/f0..f3.jpg``,
        ``users.json``, ``judgments.csv``, ``sessions.npz`` and ``meta.json``. When ``meta.json`` already holds the
        same config, nothing is redone.

    Raises
    ------
    shared_model.outdir.OutputBusyError
        Another process is writing ``out_dir``.
    ValueError
        ``out_dir`` holds files that no fedrank generator wrote.
    """
    cfg = make_config(preset, seed, **overrides)
    out = Path(out_dir)
    if _holds_marketplace(out, cfg):  # no lock needed to find nothing to do: the folder only changes by swaps
        log.info("%s already holds this marketplace (meta.json matches); nothing to do", out)
        return out
    with locked_dir(out) as target:
        if _holds_marketplace(out, cfg):  # another writer finished it meanwhile
            return out
        _check_replaceable(target)
        with stage_into(target) as stage:
            counts, timings = _write_marketplace(stage, cfg, preset, progress, workers)
    log.info(
        "marketplace %s: %d items (%d with video, %d light-up), %d users, %d sessions, %d impressions, "
        "CTR %.3f, %d purchases, %d queries | render %.1fs, sessions %.1fs, total %.1fs",
        out, counts["items"], counts["items_with_video"], counts["items_with_feature"], counts["users"],
        counts["sessions"], counts["impressions"], counts["ctr"], counts["purchases"], counts["queries"],
        timings["render_s"], timings["sessions_s"], timings["total_s"],
    )
    return out


def _holds_marketplace(out: Path, cfg: MarketConfig) -> bool:
    meta_path = out / "meta.json"
    if not meta_path.is_file():
        return False
    old = read_meta(meta_path)
    return bool(old.get("config") == cfg.to_json() and (out / "sessions.npz").exists()
                and (out / "catalog.jsonl").exists())


def _check_replaceable(out: Path) -> None:
    """An existing ``out`` is replaced whole: only when it is empty or a fedrank data folder."""
    if not out.exists():
        return
    if not out.is_dir():
        raise ValueError(f"--out {out}: exists and is not a folder")
    entries = sorted(p.name for p in out.iterdir())
    if not entries or read_meta(out / "meta.json").get("generator") == GENERATOR:
        return
    shown = ", ".join(entries[:3]) + (", ..." if len(entries) > 3 else "")
    raise ValueError(f"--out {out}: holds files fedrank generate did not write ({shown}); the folder is replaced "
                     "as a whole, so give a new or empty folder (or remove this one)")


def _write_marketplace(stage: Path, cfg: MarketConfig, preset: str, progress: bool,
                       workers: int | None) -> tuple[dict[str, Any], dict[str, float]]:
    """Every file of a generated marketplace into the (empty) folder ``stage``; ``meta.json`` last."""
    t0 = time.perf_counter()
    timings: dict[str, float] = {}
    catalog, looks = generate_catalog(cfg, stage)
    with forked_workers_die_with_me():  # no orphan renders into a killed run's staging folder
        render_all(catalog, looks, cfg, progress, workers)
    timings["render_s"] = time.perf_counter() - t0
    save_catalog_jsonl(catalog, stage / "catalog.jsonl")

    t1 = time.perf_counter()
    index, users, sessions = _simulate(catalog, cfg, progress)
    timings["sessions_s"] = time.perf_counter() - t1
    counts = write_session_files(stage, catalog, users, sessions, cfg)
    timings["total_s"] = time.perf_counter() - t0
    meta = {
        **_meta_head(preset, cfg),
        "counts": counts,
        "intent_attributes": index.attr_names,
        "ground_truth": ground_truth(cfg),
        "files": {"catalog": "catalog.jsonl", "sessions": "sessions.npz", "users": "users.json",
                  "judgments": "judgments.csv", "images": "images/<item_id>.jpg",
                  "videos": "videos/<item_id>/f<k>.jpg"},
        "timings": {k: round(v, 2) for k, v in timings.items()},
    }
    write_json(stage / "meta.json", meta)
    return counts, timings


def simulate_catalog_dir(
    catalog_path: str | os.PathLike[str], out_dir: str | os.PathLike[str], preset: str = "default", seed: int = 0,
    skip_bad: bool = False, progress: bool = True, **overrides: Any,
) -> Path:
    """Simulate shoppers over an imported catalog and write a data folder like :func:`generate_marketplace`.

    Parameters
    ----------
    catalog_path : str or PathLike
        Catalog in the generic format (CSV/TSV/JSONL); images are referenced, not copied.
    out_dir : str or PathLike
        Output folder: ``catalog.jsonl`` (normalized copy, paths relative to ``out_dir`` pointing at the
        original files), ``users.json``, ``judgments.csv`` (simulated grades), ``sessions.npz``, ``meta.json``.
        Written like :func:`generate_marketplace`'s (staged, swapped in whole, under a lock); it may not hold the
        catalog or the files it names.
    preset, seed, **overrides
        As for :func:`generate_marketplace`; only the user/session/click settings matter here.
    skip_bad : bool
        Skip (and count, in ``meta.json``) malformed catalog rows instead of failing.
    progress : bool
        Show progress bars.

    Returns
    -------
    pathlib.Path
        ``out_dir``. Idempotent: nothing is redone when ``meta.json`` matches the config and the catalog bytes.
        On any failure (a bad catalog, a catalog the simulator cannot use, an interruption) the previous folder
        is left byte-identical.
    """
    cfg = make_config(preset, seed, **overrides)
    src = Path(catalog_path)
    digest = hashlib.sha256(src.read_bytes()).hexdigest() if src.is_file() else ""
    out = Path(out_dir)
    if _holds_simulation(out, cfg, digest, skip_bad):
        log.info("%s already holds this simulation (meta.json matches); nothing to do", out)
        return out
    catalog, report = load_catalog_with_report(src, skip_bad=skip_bad)
    with locked_dir(out) as target:
        if _holds_simulation(out, cfg, digest, skip_bad):
            return out
        _check_replaceable(target)
        _check_outside(target, src, catalog)
        with stage_into(target) as stage:
            derived = fill_missing_intents(catalog, seed=cfg.seed, data_dir=stage, progress=progress)  # titles-only
            t0 = time.perf_counter()
            index, users, sessions = _simulate(catalog, cfg, progress)
            save_catalog_jsonl(catalog, stage / "catalog.jsonl")
            counts = write_session_files(stage, catalog, users, sessions, cfg)
            meta = {
                **_meta_head(preset, cfg),
                "source_catalog": str(src.resolve()),
                "source_sha256": digest,
                "skip_bad": skip_bad,
                "load_report": {"rows": report.rows, "loaded": report.loaded, "skipped": report.num_skipped,
                                "skipped_rows": [dataclasses.asdict(r) for r in report.skipped[:100]]},
                "counts": counts,
                "intent_attributes": index.attr_names,
                "derived_intents": derived,
                "ground_truth": ground_truth(cfg),
                "timings": {"total_s": round(time.perf_counter() - t0, 2)},
            }
            write_json(stage / "meta.json", meta)
    log.info("simulated %d sessions (%d impressions, CTR %.3f) over %s (%d items, %d rows skipped) -> %s",
             counts["sessions"], counts["impressions"], counts["ctr"], src, counts["items"], report.num_skipped, out)
    return out


def _meta_head(preset: str, cfg: MarketConfig) -> dict[str, Any]:
    """The first keys of every marketplace ``meta.json``: what wrote it, and the configuration it simulated."""
    return {"generator": GENERATOR, "format_version": FORMAT_VERSION, "preset": preset, "seed": cfg.seed,
            "config": cfg.to_json()}


def _holds_simulation(out: Path, cfg: MarketConfig, digest: str, skip_bad: bool) -> bool:
    old = read_meta(out / "meta.json") if (out / "meta.json").is_file() else {}
    return bool(old and old.get("config") == cfg.to_json() and old.get("source_sha256") == digest and digest
                and old.get("skip_bad") == skip_bad and (out / "sessions.npz").exists())


def _check_outside(out: Path, src: Path, catalog: Catalog) -> None:
    """The folder is replaced whole: the catalog and the files it names must live elsewhere."""
    inside = str(out) + os.sep
    paths = [str(src.resolve())]
    for it in catalog:
        paths += [os.path.abspath(p) for p in [it.image_path or "", *it.video_frames]
                  if p and not p.startswith(("http://", "https://"))]
    for p in paths:
        if p.startswith(inside):
            raise ValueError(f"--out {out}: holds {p}, which the catalog uses; the output folder is replaced as a "
                             "whole, so write it elsewhere (e.g. a sibling folder)")


def load_marketplace(out_dir: str | os.PathLike[str]) -> tuple[Catalog, SessionLog, dict[str, Any]]:
    """Read a generated marketplace back: ``(catalog, sessions, meta)``.

    Raises
    ------
    FileNotFoundError
        When ``meta.json`` is missing (generation never finished).
    """
    out = Path(out_dir)
    meta_path = out / "meta.json"
    if not meta_path.exists():
        raise FileNotFoundError(f"{meta_path}: missing -- not a finished marketplace (run generate_marketplace)")
    meta = json.loads(meta_path.read_text(encoding="utf-8"))
    return load_catalog(out / "catalog.jsonl"), SessionLog.load(out / "sessions.npz"), meta

