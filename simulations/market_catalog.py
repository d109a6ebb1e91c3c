"""Catalog generation: products with attribute-driven, noisy titles, and the rendering of their photos/videos.

Titles are built from the attributes with synonyms, marketing words and omissions (colour left out of ~45% of
titles, pattern of ~50%), so some attributes are visible only in the image. ~35% of items have a 4-frame video;
some of those have the video-only attribute ``feature = "light-up"``, shown only by the later frames.
"""

from __future__ import annotations

import math
import multiprocessing
import os
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import NamedTuple

import numpy as np
from tqdm.auto import tqdm

from shared_model.schema import Catalog, CatalogItem
from simulations.market_config import MarketConfig, random_streams
from simulations.market_vocab import (
    BRANDS,
    CATEGORIES,
    DESC_SENTENCES,
    FEATURE,
    MARKETING_PREFIX,
    MARKETING_SUFFIX,
    PATTERN_SHARES,
    SYNONYMS,
    CategorySpec,
)
from simulations.render import COLOR_RGB, ItemLook, render_item_files

__all__ = ["generate_catalog", "render_all", "render_seed"]


class _Shown(NamedTuple):
    """Which attributes an item's text mentions (the others are visible only in its image)."""

    color: bool
    pattern: bool
    brand: bool
    material: bool


def _pick(rng: np.random.Generator, words: Sequence[str], canonical_p: float = 0.55) -> str:
    if len(words) == 1 or rng.random() < canonical_p:
        return words[0]
    return words[1 + int(rng.integers(0, len(words) - 1))]


def _title_case(words: Iterable[str]) -> str:
    return " ".join(w if w.startswith(("-", "|")) else w[:1].upper() + w[1:] for w in words)


def _title(rng: np.random.Generator, spec: CategorySpec, brand: str, color: str, pattern: str, material: str,
           shown: _Shown) -> str:
    """A marketing title: optional prefix, brand, colour, pattern, material, category word, optional suffix."""
    words: list[str] = []
    if rng.random() < 0.4:
        words.append(MARKETING_PREFIX[int(rng.integers(len(MARKETING_PREFIX)))])
    if shown.brand:
        words.append(brand)
    if shown.color:
        words.append(_pick(rng, SYNONYMS["color"][color]))
    if shown.pattern and (pattern != "plain" or rng.random() < 0.3):
        words.append(_pick(rng, SYNONYMS["pattern"][pattern]))
    if shown.material:
        words.append(material)
    words.append(_pick(rng, spec.synonyms, 0.6))
    if rng.random() < 0.25:
        words.append(MARKETING_SUFFIX[int(rng.integers(len(MARKETING_SUFFIX)))])
    return _title_case(words)


def _description(rng: np.random.Generator, spec: CategorySpec, brand: str, color: str, pattern: str,
                 material: str, shown: _Shown) -> str:
    """A short description that mentions only what the title may mention, plus a stock sentence."""
    desc = [f"{material.capitalize()} {spec.synonyms[0]}" + (f" by {brand}." if shown.brand else ".")]
    if shown.color and rng.random() < 0.5:
        desc.append(f"Comes in {_pick(rng, SYNONYMS['color'][color])}.")
    if shown.pattern and pattern != "plain" and rng.random() < 0.5:
        desc.append(f"{_pick(rng, SYNONYMS['pattern'][pattern]).capitalize()} design.")
    desc.append(DESC_SENTENCES[int(rng.integers(len(DESC_SENTENCES)))])
    return " ".join(desc)


def generate_catalog(cfg: MarketConfig, out_dir: str | os.PathLike[str]) -> tuple[Catalog, list[ItemLook]]:
    """Draw the products (no files written).

    Parameters
    ----------
    cfg : MarketConfig
        Sizes and title-noise settings.
    out_dir : str or PathLike
        Marketplace folder; items get absolute ``image_path``/``video_frames`` under it.

    Returns
    -------
    catalog : Catalog
        ``num_items`` products; extra attributes ``pattern``, ``material``, ``feature`` (video-only,
        ``"light-up"`` or ``""``) and ``price_range``.
    looks : list of ItemLook
        What to render for each item (same order).
    """
    out = Path(out_dir).resolve()
    rng = np.random.default_rng(random_streams(cfg.seed)["catalog"])
    cats = list(CATEGORIES)
    colors = list(COLOR_RGB)
    patterns = list(PATTERN_SHARES)
    n = cfg.num_items
    brand_sets = {c: [BRANDS[i] for i in sorted(rng.choice(len(BRANDS), size=6, replace=False))] for c in cats}
    brand_price = {b: float(rng.lognormal(0.0, 0.25)) for b in BRANDS}
    brand_quality = {b: float(rng.normal(0.0, 0.2)) for b in BRANDS}
    color_w = {c: rng.dirichlet(np.full(len(colors), 4.0)) for c in cats}

    cat_idx = rng.integers(0, len(cats), size=n)
    u = rng.random((n, 12))
    price_z = rng.normal(0.0, 1.0, size=n)
    rating_raw = rng.normal(4.0, 0.45, size=n)
    items: list[CatalogItem] = []
    looks: list[ItemLook] = []
    pat_cdf = np.cumsum(list(PATTERN_SHARES.values()))
    for i in range(n):
        cat = cats[int(cat_idx[i])]
        spec = CATEGORIES[cat]
        color = colors[int(np.searchsorted(np.cumsum(color_w[cat]), u[i, 0] * 0.999999))]
        pattern = patterns[int(np.searchsorted(pat_cdf, u[i, 1] * 0.999999))]
        brand = brand_sets[cat][int(u[i, 2] * len(brand_sets[cat]))]
        material = spec.materials[int(u[i, 3] * len(spec.materials))]
        z = float(price_z[i])
        price = round(spec.median_price * brand_price[brand] * math.exp(0.4 * z), 2)
        price_range = "budget" if z < -0.43 else ("premium" if z > 0.43 else "mid-range")
        rating = round(float(np.clip(rating_raw[i] + brand_quality[brand], 1.0, 5.0)), 1)
        has_video = bool(u[i, 4] < cfg.video_share)
        light_up = bool(has_video and spec.light_up and u[i, 5] < cfg.feature_share)
        shown = _Shown(color=bool(u[i, 6] >= cfg.color_omit), pattern=bool(u[i, 7] >= cfg.pattern_omit),
                       brand=bool(u[i, 8] >= cfg.brand_omit), material=bool(u[i, 9] < cfg.material_mention))
        title = _title(rng, spec, brand, color, pattern, material, shown)
        description = _description(rng, spec, brand, color, pattern, material, shown)

        item_id = f"p{i:06d}"
        items.append(CatalogItem(
            item_id=item_id, title=title, description=description, category=cat, brand=brand, color=color,
            price=price, rating=rating, image_path=str(out / "images" / f"{item_id}.jpg"),
            video_frames=[str(out / "videos" / item_id / f"f{f}.jpg") for f in range(cfg.num_frames)]
            if has_video else [],
            attributes={"pattern": pattern, "material": material, "feature": FEATURE if light_up else "",
                        "price_range": price_range},
        ))
        looks.append(ItemLook(category=cat, color=COLOR_RGB[color], pattern=pattern, light_up=light_up))
    return Catalog(items=items, source=str(out / "catalog.jsonl")), looks


def render_seed(seed: int, i: int) -> int:
    """The per-item render seed of item row ``i`` (re-render with :func:`simulations.render.render_still`)."""
    return int(np.random.SeedSequence([int(seed), 7, i]).generate_state(1)[0])


def _render_job(job: tuple[ItemLook, int, str, list[str], int, int]) -> None:
    look, seed, image, frames, size, quality = job
    render_item_files(look, seed, image, frames, size=size, quality=quality)


def render_all(catalog: Catalog, looks: list[ItemLook], cfg: MarketConfig, progress: bool,
               workers: int | None) -> None:
    """Render every item's photo and video frames to the paths in ``catalog`` (worker count does not matter)."""
    jobs = [
        (look, render_seed(cfg.seed, i), str(it.image_path), list(it.video_frames), cfg.image_size,
         cfg.jpeg_quality)
        for i, (it, look) in enumerate(zip(catalog.items, looks, strict=True))
    ]
    if workers is None:
        workers = min(os.cpu_count() or 1, 8)
    workers = max(1, min(workers, len(jobs) // 64 or 1))
    bar = tqdm(total=len(jobs), desc="rendering", unit="item", disable=not progress, dynamic_ncols=True)
    try:
        if workers == 1:
            for job in jobs:
                _render_job(job)
                bar.update(1)
        else:
            methods = multiprocessing.get_all_start_methods()
            ctx = multiprocessing.get_context("fork" if "fork" in methods else None)
            with ctx.Pool(workers) as pool:
                for _ in pool.imap_unordered(_render_job, jobs, chunksize=16):
                    bar.update(1)
    finally:
        bar.close()
