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
"""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import logging
import math
import multiprocessing
import os
import re
import shutil
import time
import zipfile
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from shared_model.catalog_io import save_catalog_jsonl
from shared_model.schema import Catalog, CatalogItem, SessionLog, atomic_write
from simulations.render import COLOR_RGB, ItemLook, render_item_files

__all__ = [
    "BRANDS",
    "CATEGORIES",
    "FEATURE",
    "PRESETS",
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
FEATURE = "light-up"  # the video-only attribute value
_CHUNK_SESSIONS = 16384  # sessions simulated per vectorized chunk (part of the algorithm: fixed)
_T0 = 1_700_000_000  # first timestamp (2023-11-14, seconds)

# ----------------------------------------------------------------------------------------- vocabularies


@dataclass(frozen=True)
class CategorySpec:
    """One generated product category."""

    synonyms: tuple[str, ...]  # first = canonical word
    materials: tuple[str, ...]
    median_price: float
    light_up: bool  # items with a video may have the video-only feature


CATEGORIES: dict[str, CategorySpec] = {
    "t-shirt": CategorySpec(("t-shirt", "tee", "tshirt"), ("cotton", "linen", "polyester", "bamboo"), 22, False),
    "dress": CategorySpec(("dress", "frock", "sundress"), ("cotton", "silk", "linen", "viscose"), 65, False),
    "sneakers": CategorySpec(("sneakers", "trainers", "running shoes"), ("leather", "canvas", "mesh", "suede"), 85,
                             True),
    "handbag": CategorySpec(("handbag", "purse", "shoulder bag"), ("leather", "canvas", "suede", "raffia"), 120,
                            False),
    "backpack": CategorySpec(("backpack", "rucksack", "daypack"), ("nylon", "canvas", "leather", "polyester"), 60,
                             True),
    "mug": CategorySpec(("mug", "coffee mug", "cup"), ("ceramic", "porcelain", "stoneware", "enamel"), 14, False),
    "lamp": CategorySpec(("lamp", "desk lamp", "table lamp"), ("metal", "wood", "glass", "rattan"), 55, True),
    "chair": CategorySpec(("chair", "armchair", "seat"), ("wood", "metal", "plastic", "velvet"), 140, False),
    "watch": CategorySpec(("watch", "wristwatch", "timepiece"), ("steel", "leather", "titanium", "silicone"), 180,
                          True),
    "hat": CategorySpec(("hat", "cap", "bucket hat"), ("wool", "cotton", "straw", "felt"), 28, True),
}
BRANDS = (
    "Nordvik", "Lumio", "Aurelia", "Kestrel", "Bramble", "Solano", "Vantage", "Orbis", "Pinecrest", "Halcyon",
    "Marlowe", "Zephyra", "Tidewell", "Quillon", "Emberly", "Fjordan", "Calloway", "Brisa", "Oakhurst", "Velora",
)
PATTERN_SHARES = {"plain": 0.4, "striped": 0.2, "dotted": 0.2, "checked": 0.2}
PRICE_RANGES = ("budget", "mid-range", "premium")
#: Words used for an attribute value in titles and queries (first = canonical).
SYNONYMS: dict[str, dict[str, tuple[str, ...]]] = {
    "color": {
        "red": ("red", "crimson", "scarlet"), "blue": ("blue", "azure", "cobalt"),
        "green": ("green", "emerald", "forest green"), "yellow": ("yellow", "mustard", "lemon"),
        "black": ("black", "jet black", "onyx"), "white": ("white", "ivory", "snow white"),
        "pink": ("pink", "rose", "blush"), "purple": ("purple", "violet", "plum"),
        "orange": ("orange", "tangerine", "amber"), "grey": ("grey", "gray", "charcoal"),
    },
    "pattern": {
        "plain": ("plain", "solid"), "striped": ("striped", "stripe", "pinstripe"),
        "dotted": ("polka dot", "dotted", "spotted"), "checked": ("checked", "checkered", "plaid"),
    },
    "price_range": {
        "budget": ("budget", "cheap", "affordable"), "mid-range": ("mid-range", "mid-priced"),
        "premium": ("premium", "luxury", "high-end"),
    },
    "feature": {FEATURE: ("light-up", "led", "glowing", "light up")},
    "category": {k: v.synonyms for k, v in CATEGORIES.items()},
}
_MARKETING_PREFIX = ("Classic", "Essential", "Everyday", "Modern", "Vintage", "Signature", "Iconic", "Urban",
                     "Original", "Bestselling")
_MARKETING_SUFFIX = ("- New Season", "- Limited Edition", "| Free Shipping", "- Bestseller", "- Gift Idea")
_DESC_SENTENCES = ("Comfortable and durable.", "Perfect for everyday use.", "A great gift.", "Easy care.",
                   "Designed to last.", "Timeless style.", "Made with attention to detail.")
_ADJ_ORDER = ("feature", "price_range", "color", "pattern", "material")
_STOP = frozenset({"by", "the", "and", "a", "an", "for", "with", "of", "in", "from", "to"})
_TOKEN = re.compile(r"[a-z0-9]+")

# ----------------------------------------------------------------------------------------- configuration


@dataclass(frozen=True)
class MarketConfig:
    """Everything that determines a simulated marketplace (and nothing else: same config => same bytes).

    Attributes
    ----------
    seed : int
        Master seed.
    num_items, num_users, sessions_per_user : int
        Sizes. A user's session count is uniform in ``sessions_per_user * (1 -/+ sessions_jitter)``.
    slate_min, slate_max : int
        Slate length bounds (capped by the catalog size).
    video_share : float
        Share of generated items with a video.
    feature_share : float
        Share of video items in light-up-capable categories that have the video-only feature.
    randomized_share : float
        Share of sessions shown in a uniformly random order (for position-propensity estimation).
    eta : float
        Position-bias exponent: examination probability ``(1 / (rank + 1)) ** eta``.
    click_eps : float
        Attractiveness floor: ``attract = eps + (1 - eps) * (2**grade - 1) / 7``.
    utility_gain : float
        Attractiveness is multiplied by ``1 + utility_gain * utility`` (then clipped to [0, 1]).
    purchase_base, purchase_grade2, purchase_grade3, purchase_utility : float
        Purchase after click: ``(base + g2 [grade==2] + g3 [grade==3]) * (1 + purchase_utility * utility)``.
    num_segments : int
        User segments.
    segment_concentration : float
        How closely users follow their segment's preferences (Dirichlet concentration).
    vague_share : float
        Share of vague (category-only) intents.
    rare_share : float
        Share of intents that request a rare attribute (``rare_attributes``) in categories that have it.
    rare_attributes : tuple of str
        Attributes requested only through the rare path (the video-only ``feature``).
    attr_request_probs : tuple of (str, float)
        Probability that a specific intent requests each attribute (when the target item has a value).
    other_attr_prob : float
        Request probability for attribute columns not listed above (imported catalogs).
    intent_attributes : tuple of str or None
        Attributes intents may use; None = auto (color, brand, and extra columns with at most
        ``max_attr_values`` distinct non-numeric values).
    max_attr_values : int
        Auto-detection cap on distinct values.
    match_share, other_category_share : float
        Slate composition: share drawn from items sharing a requested attribute, and from other categories.
    text_weight, popularity_weight, retrieval_noise : float
        Production score = ``text_weight * idf_overlap + popularity_weight * popularity + noise * N(0, 1)``.
    color_omit, pattern_omit, brand_omit, material_mention : float
        Title generation: probability that colour/pattern/brand are left out of the text; that material is in.
    mean_gap_days : float
        Mean time between a user's sessions.
    image_size, num_frames, jpeg_quality : int
        Rendering.
    """

    seed: int = 0
    num_items: int = 3000
    num_users: int = 600
    sessions_per_user: int = 40
    sessions_jitter: float = 0.5
    slate_min: int = 20
    slate_max: int = 50
    video_share: float = 0.35
    feature_share: float = 0.5
    randomized_share: float = 0.05
    eta: float = 1.0
    click_eps: float = 0.05
    utility_gain: float = 0.5
    purchase_base: float = 0.02
    purchase_grade2: float = 0.06
    purchase_grade3: float = 0.35
    purchase_utility: float = 0.8
    num_segments: int = 8
    segment_concentration: float = 15.0
    target_utility_beta: float = 3.0
    vague_share: float = 0.2
    rare_share: float = 0.1
    rare_attributes: tuple[str, ...] = ("feature",)
    attr_request_probs: tuple[tuple[str, float], ...] = (
        ("color", 0.55), ("pattern", 0.4), ("brand", 0.3), ("material", 0.15), ("price_range", 0.1),
    )
    other_attr_prob: float = 0.15
    intent_attributes: tuple[str, ...] | None = None
    max_attr_values: int = 200
    match_share: float = 0.3
    other_category_share: float = 0.15
    text_weight: float = 1.0
    popularity_weight: float = 0.15
    retrieval_noise: float = 0.2
    color_omit: float = 0.45
    pattern_omit: float = 0.5
    brand_omit: float = 0.1
    material_mention: float = 0.35
    mean_gap_days: float = 2.0
    image_size: int = 224
    num_frames: int = 4
    jpeg_quality: int = 90

    def __post_init__(self) -> None:
        problems = []
        if self.num_items < 1 or self.num_users < 1 or self.sessions_per_user < 1:
            problems.append("num_items, num_users and sessions_per_user must be >= 1")
        if not 1 <= self.slate_min <= self.slate_max:
            problems.append(f"need 1 <= slate_min <= slate_max, got {self.slate_min}..{self.slate_max}")
        for name in ("video_share", "feature_share", "randomized_share", "click_eps", "vague_share", "rare_share",
                     "match_share", "other_category_share", "color_omit", "pattern_omit", "brand_omit",
                     "material_mention", "sessions_jitter"):
            v = getattr(self, name)
            if not 0.0 <= v <= 1.0:
                problems.append(f"{name} must be in [0, 1], got {v}")
        if self.match_share + self.other_category_share > 0.95:
            problems.append("match_share + other_category_share must be <= 0.95")
        if self.eta < 0:
            problems.append(f"eta must be >= 0, got {self.eta}")
        if self.num_frames < 1:
            problems.append("num_frames must be >= 1")
        if problems:
            raise ValueError("invalid MarketConfig: " + "; ".join(problems))

    def to_json(self) -> dict[str, Any]:
        """JSON-compatible dict (tuples become lists)."""
        return json.loads(json.dumps(dataclasses.asdict(self)))


PRESETS: dict[str, MarketConfig] = {
    "tiny": MarketConfig(num_items=300, num_users=60, sessions_per_user=20),
    "small": MarketConfig(num_items=1500, num_users=300, sessions_per_user=30),
    "default": MarketConfig(num_items=3000, num_users=600, sessions_per_user=40),
    "large": MarketConfig(num_items=20000, num_users=5000, sessions_per_user=100),
    # the default catalog with a fleet of 1,200 shoppers: the 1,000-client federated scenario
    "fleet": MarketConfig(num_items=3000, num_users=1200, sessions_per_user=25),
    # shoppers with strong individual tastes (far from their segment) and long histories: the personalization
    # scenario, where a device's own clicks carry signal the population does not
    "personal": MarketConfig(num_items=1500, num_users=100, sessions_per_user=120, segment_concentration=3.0,
                             utility_gain=1.5, purchase_utility=1.5),
}


def make_config(preset: str = "default", seed: int = 0, **overrides: Any) -> MarketConfig:
    """A preset with the seed and any field overridden.

    Raises
    ------
    ValueError
        Unknown preset.
    TypeError
        Unknown override name.
    """
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; choose one of {sorted(PRESETS)}")
    names = {f.name for f in dataclasses.fields(MarketConfig)}
    bad = sorted(set(overrides) - names)
    if bad:
        raise TypeError(f"unknown MarketConfig field(s) {bad}; valid: {sorted(names)}")
    for k, v in overrides.items():  # JSON/TOML give lists where the config holds tuples
        if isinstance(v, list):
            overrides[k] = tuple(tuple(x) if isinstance(x, list) else x for x in v)
    return dataclasses.replace(PRESETS[preset], seed=int(seed), **overrides)


def _streams(seed: int) -> dict[str, np.random.SeedSequence]:
    """Independent random streams (fresh objects each call, so the derivation is repeatable)."""
    kids = np.random.SeedSequence(int(seed)).spawn(6)
    return dict(zip(("catalog", "users", "sessions", "render", "judgments", "spare"), kids, strict=True))


# ----------------------------------------------------------------------------------------- catalog


def _pick(rng: np.random.Generator, words: Sequence[str], canonical_p: float = 0.55) -> str:
    if len(words) == 1 or rng.random() < canonical_p:
        return words[0]
    return words[1 + int(rng.integers(0, len(words) - 1))]


def _title_case(words: Iterable[str]) -> str:
    return " ".join(w if w.startswith(("-", "|")) else w[:1].upper() + w[1:] for w in words)


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
    rng = np.random.default_rng(_streams(cfg.seed)["catalog"])
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
        color_txt = bool(u[i, 6] >= cfg.color_omit)
        pattern_txt = bool(u[i, 7] >= cfg.pattern_omit)
        brand_txt = bool(u[i, 8] >= cfg.brand_omit)
        material_txt = bool(u[i, 9] < cfg.material_mention)

        words: list[str] = []
        if rng.random() < 0.4:
            words.append(_MARKETING_PREFIX[int(rng.integers(len(_MARKETING_PREFIX)))])
        if brand_txt:
            words.append(brand)
        if color_txt:
            words.append(_pick(rng, SYNONYMS["color"][color]))
        if pattern_txt and (pattern != "plain" or rng.random() < 0.3):
            words.append(_pick(rng, SYNONYMS["pattern"][pattern]))
        if material_txt:
            words.append(material)
        cat_word = _pick(rng, spec.synonyms, 0.6)
        words.append(cat_word)
        if rng.random() < 0.25:
            words.append(_MARKETING_SUFFIX[int(rng.integers(len(_MARKETING_SUFFIX)))])
        title = _title_case(words)

        desc = [f"{material.capitalize()} {spec.synonyms[0]}" + (f" by {brand}." if brand_txt else ".")]
        if color_txt and rng.random() < 0.5:
            desc.append(f"Comes in {_pick(rng, SYNONYMS['color'][color])}.")
        if pattern_txt and pattern != "plain" and rng.random() < 0.5:
            desc.append(f"{_pick(rng, SYNONYMS['pattern'][pattern]).capitalize()} design.")
        desc.append(_DESC_SENTENCES[int(rng.integers(len(_DESC_SENTENCES)))])

        item_id = f"p{i:06d}"
        items.append(CatalogItem(
            item_id=item_id, title=title, description=" ".join(desc), category=cat, brand=brand, color=color,
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


def _render_all(catalog: Catalog, looks: list[ItemLook], cfg: MarketConfig, progress: bool,
                workers: int | None) -> None:
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


# ----------------------------------------------------------------------------------------- catalog index


def _tokens(text: str) -> list[str]:
    return [t for t in _TOKEN.findall(text.lower()) if len(t) > 1 and t not in _STOP]


def _norm(v: str) -> str:
    return " ".join(v.strip().lower().split())


def _is_number(v: str) -> bool:
    try:
        float(v)
    except ValueError:
        return False
    return True


class _Index:
    """Integer view of a catalog for the vectorized simulation."""

    def __init__(self, catalog: Catalog, cfg: MarketConfig) -> None:
        self.cfg = cfg
        items = catalog.items
        n = len(items)
        if n == 0:
            raise ValueError("cannot simulate over an empty catalog")
        self.n = n
        cat_names = sorted({_norm(it.category) for it in items} - {""})
        if not cat_names:
            raise ValueError(
                f"{catalog.source or 'catalog'}: no item has a category; the simulator builds query intents "
                "from the category column"
            )
        self.categories = cat_names
        cpos = {c: k for k, c in enumerate(cat_names)}
        self.cat = np.array([cpos.get(_norm(it.category), -1) for it in items], dtype=np.int64)
        self.by_cat = np.argsort(self.cat, kind="stable").astype(np.int64)
        sorted_cat = self.cat[self.by_cat]
        self.cat_start = np.searchsorted(sorted_cat, np.arange(len(cat_names)), side="left").astype(np.int64)
        self.cat_size = (np.searchsorted(sorted_cat, np.arange(len(cat_names)), side="right")
                         - self.cat_start).astype(np.int64)

        # intent attributes
        if cfg.intent_attributes is not None:
            names = list(cfg.intent_attributes)
        else:
            names = ["color", "brand"]
            for it in items:
                for k in it.attributes:
                    if k not in names:
                        names.append(k)
        values: list[list[str]] = []
        codes: list[np.ndarray] = []
        kept: list[str] = []
        for name in names:
            raw = [_norm(it.attribute(name)) for it in items]
            vocab = sorted(set(raw) - {""})
            auto = cfg.intent_attributes is None
            if not vocab or (auto and (len(vocab) > cfg.max_attr_values or all(_is_number(v) for v in vocab))):
                continue
            pos = {v: k for k, v in enumerate(vocab)}
            kept.append(name)
            values.append(vocab)
            codes.append(np.array([pos.get(v, -1) for v in raw], dtype=np.int64))
        self.attr_names = kept
        self.attr_values = values
        A = len(kept)
        self.attr_codes = np.stack(codes) if codes else np.zeros((0, n), dtype=np.int64)
        probs = dict(cfg.attr_request_probs)
        self.rare = [a for a, nm in enumerate(kept) if nm in cfg.rare_attributes]
        self.attr_prob = np.array(
            [0.0 if a in self.rare else float(probs.get(nm, cfg.other_attr_prob)) for a, nm in enumerate(kept)]
        )
        self.vmax = max([len(v) for v in values] + [1]) + 1

        # (category, attribute, value) pools and (category, rare attribute) pools
        C = len(cat_names)
        keys, owners = [], []
        rare_keys, rare_owners = [], []
        ok_cat = self.cat >= 0
        for a in range(A):
            has = ok_cat & (self.attr_codes[a] >= 0)
            idx = np.nonzero(has)[0]
            keys.append((self.cat[idx] * A + a) * self.vmax + self.attr_codes[a, idx])
            owners.append(idx)
            if a in self.rare:
                rare_keys.append(self.cat[idx] * A + a)
                rare_owners.append(idx)
        self.pool_keys, self.pool_items = self._sorted_pool(keys, owners)
        rk, ri = self._sorted_pool(rare_keys, rare_owners)
        self.rare_items = ri
        grid = np.arange(C * max(A, 1))
        self.rare_lo = np.searchsorted(rk, grid, side="left").reshape(C, max(A, 1))
        self.rare_n = (np.searchsorted(rk, grid, side="right").reshape(C, max(A, 1)) - self.rare_lo)

        # dense fields
        self.rating = np.array([it.rating for it in items], dtype=np.float64)
        r = np.where(np.isfinite(self.rating), self.rating, np.nan)
        mu, sd = (np.nanmean(r), np.nanstd(r)) if np.isfinite(r).any() else (0.0, 1.0)
        self.rating_z = np.nan_to_num((r - mu) / (sd if sd > 0 else 1.0))
        logp = np.log(np.array([it.price if it.price > 0 else np.nan for it in items], dtype=np.float64))
        self.price_z = np.zeros(n)
        for c in range(C):
            m = (self.cat == c) & np.isfinite(logp)
            if m.sum() >= 2:
                s = logp[m].std()
                self.price_z[m] = (logp[m] - logp[m].mean()) / (s if s > 0 else 1.0)

        # title tokens: sorted (item * V + token) pairs and IDF
        vocab_tok: dict[str, int] = {}
        per_item = [[vocab_tok.setdefault(t, len(vocab_tok)) for t in dict.fromkeys(_tokens(it.title))]
                    for it in items]
        V = max(len(vocab_tok), 1)
        self.tok_vocab = vocab_tok
        self.V = V
        lens = np.array([len(t) for t in per_item], dtype=np.int64)
        flat = np.fromiter((k for t in per_item for k in t), dtype=np.int64, count=int(lens.sum()))
        self.pairs = np.sort(np.repeat(np.arange(n, dtype=np.int64), lens) * V + flat)
        df = np.bincount(flat, minlength=V).astype(np.float64)
        self.idf = np.log(1.0 + n / (df + 1.0))
        self.idf_unknown = float(np.log(1.0 + n))
        self.popularity = _popularity(self.n, self.rating_z, cfg.seed)

    @staticmethod
    def _sorted_pool(keys: list[np.ndarray], owners: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
        if not keys:
            return np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.int64)
        k = np.concatenate(keys)
        o = np.concatenate(owners)
        order = np.lexsort((o, k))
        return k[order], o[order]

    def query_tokens(self, query: str) -> tuple[np.ndarray, np.ndarray]:
        """Token ids (-1 = not in any title) and IDF weights of a query's distinct tokens."""
        toks = list(dict.fromkeys(_tokens(query)))
        ids = np.array([self.tok_vocab.get(t, -1) for t in toks], dtype=np.int64)
        w = np.array([self.idf[k] if k >= 0 else self.idf_unknown for k in ids], dtype=np.float64)
        return ids, w


# ----------------------------------------------------------------------------------------- users


@dataclass
class Users:
    """Latent user preferences (evaluation only) and the item-side codes utility needs.

    Attributes
    ----------
    segment : ndarray of int [U]
    category_pref : ndarray [U, C]
        Probability of searching each category (``categories``).
    color_pref, brand_pref : ndarray [U, Vc] and [U, Vb]
        Preference distributions over ``colors`` and ``brands``.
    color_aff, brand_aff : ndarray [U, Vc + 1] and [U, Vb + 1]
        Affinities in [-1, 1] derived from the preferences (last column 0: unknown value).
    price_sensitivity : ndarray [U]
        In [-0.6, 1]: positive dislikes expensive items (within category), negative likes them.
    """

    segment: np.ndarray
    category_pref: np.ndarray
    color_pref: np.ndarray
    brand_pref: np.ndarray
    color_aff: np.ndarray
    brand_aff: np.ndarray
    price_sensitivity: np.ndarray
    categories: list[str]
    colors: list[str]
    brands: list[str]
    item_color: np.ndarray  # [I] index into colors, or len(colors) for unknown
    item_brand: np.ndarray
    item_price_z: np.ndarray
    segment_prefs: list[dict[str, Any]] = field(default_factory=list)
    weights: tuple[float, float, float] = (0.5, 0.35, 0.35)
    _index: _Index | None = field(default=None, repr=False, compare=False)  # catalog index they were built on

    def __len__(self) -> int:
        return int(self.segment.shape[0])

    def utility(self, users: np.ndarray, items: np.ndarray) -> np.ndarray:
        """Personal utility in [-1, 1] of catalog rows ``items`` for ``users`` (broadcasting)."""
        wc, wb, wp = self.weights
        u = (wc * self.color_aff[users, self.item_color[items]]
             + wb * self.brand_aff[users, self.item_brand[items]]
             - wp * self.price_sensitivity[users] * np.tanh(self.item_price_z[items]))
        return np.clip(u, -1.0, 1.0)

    def to_json(self) -> dict[str, Any]:
        """``users.json`` content: segments and each user's segment and preferences."""
        def top(p: np.ndarray, names: list[str]) -> dict[str, float]:
            return {names[k]: round(float(p[k]), 4) for k in np.argsort(-p, kind="stable") if p[k] >= 1e-4}

        users = [
            {
                "user": u,
                "segment": int(self.segment[u]),
                "price_sensitivity": round(float(self.price_sensitivity[u]), 4),
                "category_pref": top(self.category_pref[u], self.categories),
                "color_pref": top(self.color_pref[u], self.colors),
                "brand_pref": top(self.brand_pref[u], self.brands),
            }
            for u in range(len(self))
        ]
        return {"segments": self.segment_prefs, "users": users}


def _affinity(p: np.ndarray) -> np.ndarray:
    """Preference probabilities -> affinities in [-1, 1] (0 at the uniform preference 1/V)."""
    v = p.shape[-1]
    return np.tanh(0.6 * (v * p - 1.0))


def _top_values(values: list[str], k: int) -> list[str]:
    counts: dict[str, int] = {}
    for v in values:
        if v:
            counts[v] = counts.get(v, 0) + 1
    return sorted(counts, key=lambda v: (-counts[v], v))[:k]


def build_users(catalog: Catalog, cfg: MarketConfig, index: _Index | None = None) -> Users:
    """Draw users: segments with preferences, and per-user preferences around them (non-IID clients).

    Parameters
    ----------
    catalog : Catalog
        Preferences range over its categories, colours (top 32) and brands (top 64).
    cfg : MarketConfig
        ``num_users``, ``num_segments``, ``segment_concentration``, ``seed``.
    index : optional
        A prebuilt catalog index (internal).

    Returns
    -------
    Users
    """
    index = index or _Index(catalog, cfg)
    rng = np.random.default_rng(_streams(cfg.seed)["users"])
    colors = _top_values([_norm(it.color) for it in catalog], 32)
    brands = _top_values([_norm(it.brand) for it in catalog], 64)
    C, Vc, Vb, G, U = len(index.categories), len(colors), len(brands), cfg.num_segments, cfg.num_users

    def dirichlet(alpha: np.ndarray, size: int | None = None) -> np.ndarray:
        if alpha.shape[-1] == 0:
            return np.zeros((*(() if size is None else (size,)), 0))
        return rng.dirichlet(alpha, size=size)

    seg_cat = np.stack([dirichlet(np.full(C, 0.8)) for _ in range(G)])
    seg_col = np.stack([dirichlet(np.full(Vc, 0.6)) for _ in range(G)]) if Vc else np.zeros((G, 0))
    seg_brand = np.stack([dirichlet(np.full(Vb, 0.6)) for _ in range(G)]) if Vb else np.zeros((G, 0))
    seg_price = rng.uniform(-0.4, 1.0, size=G)
    segment = rng.integers(0, G, size=U)
    k = cfg.segment_concentration
    cat_pref = np.stack([dirichlet(k * seg_cat[s] + 0.05) for s in segment])
    col_pref = np.stack([dirichlet(k * seg_col[s] + 0.1) for s in segment]) if Vc else np.zeros((U, 0))
    brand_pref = np.stack([dirichlet(k * seg_brand[s] + 0.1) for s in segment]) if Vb else np.zeros((U, 0))
    price_sens = np.clip(seg_price[segment] + rng.normal(0.0, 0.25, size=U), -0.6, 1.0)

    zeros = np.zeros((U, 1))
    color_aff = np.hstack([_affinity(col_pref) if Vc else np.zeros((U, 0)), zeros])
    brand_aff = np.hstack([_affinity(brand_pref) if Vb else np.zeros((U, 0)), zeros])
    cpos = {c: i for i, c in enumerate(colors)}
    bpos = {b: i for i, b in enumerate(brands)}
    item_color = np.array([cpos.get(_norm(it.color), Vc) for it in catalog], dtype=np.int64)
    item_brand = np.array([bpos.get(_norm(it.brand), Vb) for it in catalog], dtype=np.int64)

    def top(p: np.ndarray, names: list[str], n: int = 5) -> dict[str, float]:
        return {names[i]: round(float(p[i]), 4) for i in np.argsort(-p, kind="stable")[:n]}

    segs = [
        {"segment": g, "price_sensitivity": round(float(seg_price[g]), 4),
         "top_categories": top(seg_cat[g], index.categories), "top_colors": top(seg_col[g], colors),
         "top_brands": top(seg_brand[g], brands), "num_users": int((segment == g).sum())}
        for g in range(G)
    ]
    return Users(
        segment=segment.astype(np.int32), category_pref=cat_pref, color_pref=col_pref, brand_pref=brand_pref,
        color_aff=color_aff, brand_aff=brand_aff, price_sensitivity=price_sens, categories=index.categories,
        colors=colors, brands=brands, item_color=item_color, item_brand=item_brand,
        item_price_z=index.price_z, segment_prefs=segs, _index=index,
    )


# ----------------------------------------------------------------------------------------- sessions


def _words(attr: str, value: str) -> tuple[str, ...]:
    return SYNONYMS.get(attr, {}).get(value, (value,))


def _choose(words: tuple[str, ...], c: int) -> str:
    """Canonical word for half of the choice ints ``c`` in 0..59, a synonym otherwise."""
    if len(words) == 1 or c % 10 < 5:
        return words[0]
    return words[1 + (c // 10) % (len(words) - 1)]


class _QueryBook:
    """Query strings (deduplicated, in first-use order) and their token ids/IDF weights."""

    def __init__(self, index: _Index) -> None:
        self.index = index
        self.queries: list[str] = []
        self.ids: dict[str, int] = {}
        self.tok: list[np.ndarray] = []
        self.w: list[np.ndarray] = []
        self._cache: dict[tuple[int, ...], int] = {}

    def render(self, key: tuple[int, ...]) -> int:
        """Query id for ``key = (category, value codes per attribute ..., choice ints ...)``."""
        qid = self._cache.get(key)
        if qid is not None:
            return qid
        idx = self.index
        A = len(idx.attr_names)
        cat = key[0]
        vals = key[1:1 + A]
        ch = key[1 + A:]
        cat_name = idx.categories[cat]
        cat_word = _choose(_words("category", cat_name), ch[A])
        adjs: list[tuple[int, str]] = []
        brand = ""
        for a, v in enumerate(vals):
            if v < 0:
                continue
            name = idx.attr_names[a]
            word = _choose(_words(name, idx.attr_values[a][v]), ch[a])
            if name == "brand":
                brand = word
            else:
                order = _ADJ_ORDER.index(name) if name in _ADJ_ORDER else len(_ADJ_ORDER) + a
                adjs.append((order, word))
        phrase = " ".join([w for _, w in sorted(adjs)] + [cat_word])
        if brand:
            form = ch[A + 1] % 5
            phrase = f"{brand} {phrase}" if form < 3 else (f"{phrase} by {brand}" if form == 3 else f"{phrase} {brand}")
        query = phrase.lower()
        qid = self.ids.get(query)
        if qid is None:
            qid = len(self.queries)
            self.ids[query] = qid
            self.queries.append(query)
            t, w = idx.query_tokens(query)
            self.tok.append(t)
            self.w.append(w)
        self._cache[key] = qid
        return qid


def _draw_in_category(rng: np.random.Generator, index: _Index, cats: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """Uniform draws of items in each row's category (``cats`` broadcast against ``shape``)."""
    u = rng.random(shape)
    size = index.cat_size[cats]
    start = index.cat_start[cats]
    if u.ndim == 2:
        size, start = size[:, None], start[:, None]
    pos = start + np.minimum((u * size).astype(np.int64), np.maximum(size - 1, 0))
    return index.by_cat[pos]


def _simulate_chunk(
    index: _Index, users: Users, cfg: MarketConfig, book: _QueryBook, user_ids: np.ndarray,
    counts: np.ndarray, t_start: np.ndarray, rng: np.random.Generator,
) -> dict[str, np.ndarray]:
    S = int(counts.sum())
    A = len(index.attr_names)
    C = len(index.categories)
    I = index.n  # noqa: E741
    su = np.repeat(user_ids, counts)

    # timestamps, increasing per user
    gaps = rng.exponential(cfg.mean_gap_days * 86400.0, size=S) + 60.0
    cs = np.cumsum(gaps)
    first = np.cumsum(counts) - counts
    ts = t_start[np.repeat(np.arange(len(user_ids)), counts)] + (cs - np.repeat(cs[first] - gaps[first], counts))
    ts = ts.astype(np.int64)

    # intents
    cdf = np.cumsum(users.category_pref[su], axis=1)
    cat = np.minimum((rng.random(S)[:, None] * cdf[:, -1:] > cdf).sum(1), C - 1)
    vague = rng.random(S) < cfg.vague_share
    rare_attr = np.full(S, -1, dtype=np.int64)
    r_rare = rng.random(S)
    for a in index.rare:
        pick = (rare_attr < 0) & ~vague & (index.rare_n[cat, a] > 0) & (r_rare < cfg.rare_share)
        rare_attr[pick] = a
    is_rare = rare_attr >= 0
    KT = 16
    cand = _draw_in_category(rng, index, cat, (S, KT))
    u_r = rng.random((S, KT))
    if is_rare.any():
        ra = rare_attr[is_rare]
        lo = index.rare_lo[cat[is_rare], ra][:, None]
        n_r = index.rare_n[cat[is_rare], ra][:, None]
        cand[is_rare] = index.rare_items[lo + np.minimum((u_r[is_rare] * n_r).astype(np.int64), n_r - 1)]
    pref = cfg.target_utility_beta * users.utility(su[:, None], cand) + 0.3 * index.rating_z[cand]
    gumbel = -np.log(-np.log(np.clip(rng.random((S, KT)), 1e-12, 1 - 1e-12)))
    target = cand[np.arange(S), np.argmax(pref + gumbel, axis=1)]

    codes = index.attr_codes[:, target].T if A else np.zeros((S, 0), dtype=np.int64)
    has = codes >= 0
    req = (rng.random((S, A)) < index.attr_prob[None, :]) & has & ~vague[:, None]
    if is_rare.any():
        req[np.nonzero(is_rare)[0], rare_attr[is_rare]] = True
    score = rng.random((S, A)) * index.attr_prob[None, :] * has
    none = ~vague & ~req.any(1)
    best = np.argmax(score, axis=1) if A else np.zeros(S, dtype=np.int64)
    ok = score.max(1) > 0 if A else np.zeros(S, dtype=bool)
    fix = np.nonzero(none & ok)[0]
    req[fix, best[fix]] = True
    vague = vague | (none & ~ok)
    ival = np.where(req, codes, -1)
    n_req = req.sum(1)

    # query strings
    choice = (rng.random((S, A + 2)) * 60).astype(np.int64)
    keys = np.concatenate([cat[:, None], ival, choice], axis=1).tolist()
    qid = np.fromiter((book.render(tuple(k)) for k in keys), dtype=np.int64, count=S)

    # slates: target + attribute-matching draws + same-category draws + other-category draws
    L = np.minimum(rng.integers(cfg.slate_min, cfg.slate_max + 1, size=S), I)
    Mm = max(1, math.ceil(cfg.match_share * cfg.slate_max))
    Mu = cfg.slate_max
    Mo = cfg.slate_max
    match = _draw_in_category(rng, index, cat, (S, Mm))
    if A:
        spec = np.nonzero(~vague)[0]
        a_pick = np.argmax(rng.random((len(spec), Mm, A)) * req[spec][:, None, :], axis=2)
        v_pick = ival[spec[:, None], a_pick]
        key = (cat[spec][:, None] * A + a_pick) * index.vmax + v_pick
        lo = np.searchsorted(index.pool_keys, key, side="left")
        n_m = np.searchsorted(index.pool_keys, key, side="right") - lo
        u_m = rng.random(key.shape)
        good = n_m > 0
        pos = lo + np.minimum((u_m * n_m).astype(np.int64), np.maximum(n_m - 1, 0))
        drawn = index.pool_items[np.minimum(pos, max(len(index.pool_items) - 1, 0))] if len(index.pool_items) \
            else np.zeros_like(pos)
        match[spec] = np.where(good, drawn, match[spec])
    same = _draw_in_category(rng, index, cat, (S, Mu))
    n_out = I - index.cat_size[cat]
    j = (rng.random((S, Mo)) * n_out[:, None]).astype(np.int64)
    j = j + (j >= index.cat_start[cat][:, None]) * index.cat_size[cat][:, None]
    other = np.where(n_out[:, None] > 0, index.by_cat[np.minimum(j, I - 1)], -1)
    R = np.concatenate([target[:, None], match, same, other], axis=1)
    K = R.shape[1]
    valid = R >= 0
    order = np.argsort(R, axis=1, kind="stable")
    sr = np.take_along_axis(R, order, axis=1)
    dup = np.zeros_like(valid)
    np.put_along_axis(dup, order[:, 1:], sr[:, 1:] == sr[:, :-1], axis=1)
    valid &= ~dup
    n_other = rng.binomial(L, cfg.other_category_share)
    n_match = np.rint(cfg.match_share * L).astype(np.int64)
    n_same = np.maximum(L - 1 - n_match - n_other, 0)
    chosen = np.zeros((S, K), dtype=bool)
    bounds = [(0, 1, np.ones(S, dtype=np.int64)), (1, 1 + Mm, n_match), (1 + Mm, 1 + Mm + Mu, n_same),
              (1 + Mm + Mu, K, n_other)]
    for b0, b1, quota in bounds:
        v = valid[:, b0:b1]
        chosen[:, b0:b1] = v & (np.cumsum(v, axis=1) <= quota[:, None])
    fill = L - chosen.sum(1)
    rem = valid & ~chosen
    chosen |= rem & (np.cumsum(rem, axis=1) <= fill[:, None])
    lengths = chosen.sum(1)
    it = R[chosen]
    M = len(it)
    sid = np.repeat(np.arange(S), lengths)
    offsets = np.zeros(S + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])

    # ground truth: graded relevance and personal utility
    same_cat = index.cat[it] == cat[sid]
    nm = np.zeros(M, dtype=np.int64)
    for a in range(A):
        iv = ival[sid, a]
        nm += (iv >= 0) & (index.attr_codes[a, it] == iv)
    nr = n_req[sid]
    g_spec = np.where(nm == nr, 3, np.where(2 * nm >= nr, 2, 1))
    g_vague = np.where(index.rating[it] >= 4.2, 3, 2)
    grade = np.where(same_cat, np.where(vague[sid], g_vague, g_spec), 0).astype(np.uint8)
    util = users.utility(su[sid], it).astype(np.float32)

    # production (text-only) score: IDF-weighted token overlap of query and title, popularity, noise
    uq, qloc = np.unique(qid, return_inverse=True)
    q_len = np.array([len(book.tok[q]) for q in uq], dtype=np.int64)
    q_ptr = np.zeros(len(uq) + 1, dtype=np.int64)
    np.cumsum(q_len, out=q_ptr[1:])
    q_tok = np.concatenate([book.tok[q] for q in uq] + [np.zeros(0, dtype=np.int64)])
    q_w = np.concatenate([book.w[q] for q in uq] + [np.zeros(0)])
    q_norm = np.array([max(float(book.w[q].sum()), 1e-9) for q in uq])
    mq = qloc[sid]
    ntok = q_len[mq]
    rep = np.repeat(np.arange(M), ntok)
    within = np.arange(len(rep)) - np.repeat(np.cumsum(ntok) - ntok, ntok)
    tpos = q_ptr[mq][rep] + within
    tok = q_tok[tpos]
    pk = it[rep] * index.V + tok
    ppos = np.minimum(np.searchsorted(index.pairs, pk), max(len(index.pairs) - 1, 0))
    found = (tok >= 0) & (index.pairs[ppos] == pk) if len(index.pairs) else np.zeros(len(pk), dtype=bool)
    sim = np.bincount(rep, weights=q_w[tpos] * found, minlength=M) / q_norm[mq]
    pop = index.popularity[it]
    rscore = (cfg.text_weight * sim + cfg.popularity_weight * pop
              + cfg.retrieval_noise * rng.standard_normal(M)).astype(np.float32)
    porder = np.lexsort((-rscore.astype(np.float64), sid))
    prod_rank = np.empty(M, dtype=np.int64)
    prod_rank[porder] = np.arange(M) - offsets[sid[porder]]

    # display order: production order, or a uniformly random permutation in randomized sessions
    randomized = rng.random(S) < cfg.randomized_share
    dkey = np.where(randomized[sid], rng.random(M) * 1e6, prod_rank.astype(np.float64))
    dorder = np.lexsort((dkey, sid))
    it, grade, util, rscore, prod_rank = it[dorder], grade[dorder], util[dorder], rscore[dorder], prod_rank[dorder]
    pos = np.arange(M) - offsets[sid]

    # position-based click model, purchases after clicks
    exam = (1.0 / (pos + 1.0)) ** cfg.eta
    attract = cfg.click_eps + (1.0 - cfg.click_eps) * (2.0 ** grade.astype(np.float64) - 1.0) / 7.0
    attract = np.clip(attract * (1.0 + cfg.utility_gain * util), 0.0, 1.0)
    clicks = rng.random(M) < exam * attract
    p_buy = (cfg.purchase_base + cfg.purchase_grade2 * (grade == 2) + cfg.purchase_grade3 * (grade == 3))
    p_buy = np.clip(p_buy * (1.0 + cfg.purchase_utility * util), 0.0, 1.0)
    buys = clicks & (rng.random(M) < p_buy)

    return {
        "user": su.astype(np.int32), "query": qid.astype(np.int32), "randomized": randomized,
        "timestamp": ts, "lengths": lengths.astype(np.int64), "items": it.astype(np.int32),
        "clicks": clicks.astype(np.uint8), "purchases": buys.astype(np.uint8),
        "prod_rank": prod_rank.astype(np.int16), "retrieval_score": rscore, "grades": grade,
        "utility": util,
    }


def simulate_sessions(
    catalog: Catalog, cfg: MarketConfig, users: Users | None = None, progress: bool = True,
) -> SessionLog:
    """Simulate search sessions over a catalog: intents, queries, slates, clicks and purchases.

    Parameters
    ----------
    catalog : Catalog
        Generated or imported; needs a non-empty ``category`` on at least some items. Images are not used.
    cfg : MarketConfig
        Users, session counts, slate bounds, click model, seed.
    users : Users, optional
        From :func:`build_users` (built here when omitted).
    progress : bool
        Show a progress bar.

    Returns
    -------
    SessionLog
        Sessions grouped by user, in time order per user.
    """
    if users is not None and users.item_color.shape[0] != len(catalog):
        raise ValueError("users were built for a different catalog")
    index = users._index if users is not None and users._index is not None else None
    if index is None or index.cfg != cfg or index.n != len(catalog):
        index = _Index(catalog, cfg)
    if users is None:
        users = build_users(catalog, cfg, index=index)
    st = _streams(cfg.seed)["sessions"]
    plan_ss, chunk_root = st.spawn(2)
    plan = np.random.default_rng(plan_ss)
    U = len(users)
    lo = max(1, math.ceil(cfg.sessions_per_user * (1 - cfg.sessions_jitter)))
    hi = max(lo, math.floor(cfg.sessions_per_user * (1 + cfg.sessions_jitter)))
    counts = plan.integers(lo, hi + 1, size=U)
    t_start = _T0 + plan.integers(0, 14 * 86400, size=U).astype(np.float64)
    per_chunk = max(1, _CHUNK_SESSIONS // cfg.sessions_per_user)
    n_chunks = math.ceil(U / per_chunk)
    chunk_ss = chunk_root.spawn(n_chunks)
    book = _QueryBook(index)
    parts: list[dict[str, np.ndarray]] = []
    bar = tqdm(total=int(counts.sum()), desc="sessions", unit="session", disable=not progress, dynamic_ncols=True)
    try:
        for k in range(n_chunks):
            uids = np.arange(k * per_chunk, min(U, (k + 1) * per_chunk))
            part = _simulate_chunk(index, users, cfg, book, uids, counts[uids], t_start[uids],
                                   np.random.default_rng(chunk_ss[k]))
            parts.append(part)
            bar.update(int(counts[uids].sum()))
    finally:
        bar.close()

    def cat(name: str) -> np.ndarray:
        return np.concatenate([p[name] for p in parts])

    lengths = cat("lengths")
    offsets = np.zeros(len(lengths) + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    return SessionLog(
        user=cat("user"), query=cat("query"), randomized=cat("randomized"), timestamp=cat("timestamp"),
        offsets=offsets, items=cat("items"), clicks=cat("clicks"), purchases=cat("purchases"),
        prod_rank=cat("prod_rank"), retrieval_score=cat("retrieval_score"), grades=cat("grades"),
        utility=cat("utility"), queries=book.queries,
    )


def _popularity(n: int, rating_z: np.ndarray, seed: int) -> np.ndarray:
    """Latent item popularity (standardized): noise plus a rating effect."""
    rng = np.random.default_rng(_streams(seed)["spare"])
    pop = rng.standard_normal(n) + 0.5 * rating_z
    return (pop - pop.mean()) / (pop.std() or 1.0)


def simulate_over_catalog(catalog: Catalog, cfg: MarketConfig, progress: bool = True) -> SessionLog:
    """Run the users/queries/slates/clicks simulation over any catalog (e.g. an imported one).

    Intents use the catalog's own categories and attribute columns (``color``, ``brand`` and extra columns
    with a modest number of distinct values; empty values are skipped), so nothing assumes the generated
    vocabularies. Only ``cfg``'s user/session/click settings and seed matter.

    Parameters
    ----------
    catalog : Catalog
        From :func:`shared_model.catalog_io.load_catalog` (images optional).
    cfg : MarketConfig
        Simulation settings.
    progress : bool
        Show a progress bar.

    Returns
    -------
    SessionLog
    """
    return simulate_sessions(catalog, cfg, progress=progress)


# ----------------------------------------------------------------------------------------- output


def save_session_log(sessions: SessionLog, path: str | os.PathLike[str]) -> None:
    """Save like :meth:`SessionLog.save` (same arrays, loadable by :meth:`SessionLog.load`), atomically, but
    byte-reproducibly: zip entry timestamps are fixed, so the same log always gives the same bytes."""
    arrays = {k: np.asanyarray(getattr(sessions, k)) for k in SessionLog.ARRAYS}
    arrays["queries_json"] = np.array(json.dumps(sessions.queries))

    def write(f: io.BufferedWriter) -> None:
        with zipfile.ZipFile(f, mode="w", compression=zipfile.ZIP_DEFLATED) as zf:
            for name, arr in arrays.items():
                info = zipfile.ZipInfo(name + ".npy", date_time=(1980, 1, 1, 0, 0, 0))
                info.compress_type = zipfile.ZIP_DEFLATED
                info.external_attr = 0o644 << 16
                with zf.open(info, "w", force_zip64=True) as fid:
                    np.lib.format.write_array(fid, arr, allow_pickle=False)

    atomic_write(Path(path), write)


def _write_json(path: Path, obj: Any) -> None:
    payload = (json.dumps(obj, indent=1, ensure_ascii=False) + "\n").encode("utf-8")
    atomic_write(path, lambda f: f.write(payload))


def _write_judgments(path: Path, catalog: Catalog, sessions: SessionLog, cfg: MarketConfig,
                     num_queries: int = 200) -> int:
    rng = np.random.default_rng(_streams(cfg.seed)["judgments"])
    uq, first = np.unique(sessions.query, return_index=True)
    take = np.sort(rng.choice(len(uq), size=min(num_queries, len(uq)), replace=False))
    buf = io.StringIO(newline="")
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["query", "item_id", "grade"])
    rows = 0
    ids = catalog.ids()
    for k in take:
        s = int(first[k])
        q = sessions.queries[int(uq[k])]
        sl = sessions.slate(s)
        for i, g in zip(sessions.items[sl].tolist(), sessions.grades[sl].tolist(), strict=True):
            w.writerow([q, ids[i], g])
            rows += 1
    payload = buf.getvalue().encode("utf-8")
    atomic_write(path, lambda f: f.write(payload))
    return rows


def _counts(catalog: Catalog, sessions: SessionLog) -> dict[str, Any]:
    n_imp = int(sessions.offsets[-1])
    return {
        "items": len(catalog),
        "items_with_video": sum(1 for it in catalog if it.video_frames),
        "items_with_feature": sum(1 for it in catalog if it.attributes.get("feature")),
        "users": int(sessions.user.max()) + 1 if len(sessions) else 0,
        "sessions": len(sessions),
        "randomized_sessions": int(sessions.randomized.sum()),
        "queries": len(sessions.queries),
        "impressions": n_imp,
        "clicks": int(sessions.clicks.sum()),
        "purchases": int(sessions.purchases.sum()),
        "ctr": round(float(sessions.clicks.mean()), 5) if n_imp else 0.0,
    }


def _ground_truth(cfg: MarketConfig) -> dict[str, Any]:
    return {
        "eta": cfg.eta,
        "examination": "(1 / (display_position + 1)) ** eta, display_position 0 = top",
        "click_eps": cfg.click_eps,
        "attractiveness": "clip((eps + (1 - eps) * (2**grade - 1) / 7) * (1 + utility_gain * utility), 0, 1)",
        "utility_gain": cfg.utility_gain,
        "purchase": "clip((base + g2*[grade==2] + g3*[grade==3]) * (1 + purchase_utility * utility), 0, 1)",
        "purchase_params": {"base": cfg.purchase_base, "g2": cfg.purchase_grade2, "g3": cfg.purchase_grade3,
                            "purchase_utility": cfg.purchase_utility},
        "randomized_share": cfg.randomized_share,
    }


def generate_marketplace(
    out_dir: str | os.PathLike[str], preset: str = "default", seed: int = 0, progress: bool = True,
    workers: int | None = None, **overrides: Any,
) -> Path:
    """Generate a complete simulated marketplace on disk (idempotent).

    Parameters
    ----------
    out_dir : str or PathLike
        Output folder (created).
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
        ``users.json``, ``judgments.csv``, ``sessions.npz`` and ``meta.json``. ``meta.json`` is written last
        (``sessions.npz`` just before it): when it exists with the same config, nothing is redone.
    """
    cfg = make_config(preset, seed, **overrides)
    out = Path(out_dir)
    meta_path = out / "meta.json"
    sessions_path = out / "sessions.npz"
    if meta_path.exists():
        try:
            old = json.loads(meta_path.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError):
            old = {}
        if old.get("config") == cfg.to_json() and sessions_path.exists() and (out / "catalog.jsonl").exists():
            log.info("%s already holds this marketplace (meta.json matches); nothing to do", out)
            return out
        # a different marketplace: invalidate it before touching anything
        meta_path.unlink()
        if old.get("generator") == GENERATOR:
            for sub in ("images", "videos"):
                shutil.rmtree(out / sub, ignore_errors=True)
    sessions_path.unlink(missing_ok=True)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    timings: dict[str, float] = {}

    catalog, looks = generate_catalog(cfg, out)
    _render_all(catalog, looks, cfg, progress, workers)
    timings["render_s"] = time.perf_counter() - t0
    save_catalog_jsonl(catalog, out / "catalog.jsonl")

    t1 = time.perf_counter()
    index = _Index(catalog, cfg)
    users = build_users(catalog, cfg, index=index)
    sessions = simulate_sessions(catalog, cfg, users=users, progress=progress)
    timings["sessions_s"] = time.perf_counter() - t1
    _write_json(out / "users.json", users.to_json())
    n_judg = _write_judgments(out / "judgments.csv", catalog, sessions, cfg)
    save_session_log(sessions, sessions_path)

    counts = _counts(catalog, sessions)
    counts["judgments"] = n_judg
    timings["total_s"] = time.perf_counter() - t0
    meta = {
        "generator": GENERATOR,
        "format_version": FORMAT_VERSION,
        "preset": preset,
        "seed": cfg.seed,
        "config": cfg.to_json(),
        "counts": counts,
        "intent_attributes": index.attr_names,
        "ground_truth": _ground_truth(cfg),
        "files": {"catalog": "catalog.jsonl", "sessions": "sessions.npz", "users": "users.json",
                  "judgments": "judgments.csv", "images": "images/<item_id>.jpg",
                  "videos": "videos/<item_id>/f<k>.jpg"},
        "timings": {k: round(v, 2) for k, v in timings.items()},
    }
    _write_json(meta_path, meta)
    log.info(
        "marketplace %s: %d items (%d with video, %d light-up), %d users, %d sessions, %d impressions, "
        "CTR %.3f, %d purchases, %d queries | render %.1fs, sessions %.1fs, total %.1fs",
        out, counts["items"], counts["items_with_video"], counts["items_with_feature"], counts["users"],
        counts["sessions"], counts["impressions"], counts["ctr"], counts["purchases"], counts["queries"],
        timings["render_s"], timings["sessions_s"], timings["total_s"],
    )
    return out


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
    """
    import hashlib

    from shared_model.catalog_io import load_catalog_with_report

    cfg = make_config(preset, seed, **overrides)
    src = Path(catalog_path)
    digest = hashlib.sha256(src.read_bytes()).hexdigest() if src.is_file() else ""
    out = Path(out_dir)
    meta_path = out / "meta.json"
    sessions_path = out / "sessions.npz"
    if meta_path.exists():
        try:
            old = json.loads(meta_path.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError):
            old = {}
        if (old.get("config") == cfg.to_json() and old.get("source_sha256") == digest and digest
                and old.get("skip_bad") == skip_bad and sessions_path.exists()):
            log.info("%s already holds this simulation (meta.json matches); nothing to do", out)
            return out
    catalog, report = load_catalog_with_report(src, skip_bad=skip_bad)
    meta_path.unlink(missing_ok=True)
    sessions_path.unlink(missing_ok=True)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    index = _Index(catalog, cfg)
    users = build_users(catalog, cfg, index=index)
    sessions = simulate_sessions(catalog, cfg, users=users, progress=progress)
    save_catalog_jsonl(catalog, out / "catalog.jsonl")
    _write_json(out / "users.json", users.to_json())
    n_judg = _write_judgments(out / "judgments.csv", catalog, sessions, cfg)
    save_session_log(sessions, sessions_path)
    counts = _counts(catalog, sessions)
    counts["judgments"] = n_judg
    meta = {
        "generator": GENERATOR,
        "format_version": FORMAT_VERSION,
        "preset": preset,
        "seed": cfg.seed,
        "config": cfg.to_json(),
        "source_catalog": str(src.resolve()),
        "source_sha256": digest,
        "skip_bad": skip_bad,
        "load_report": {"rows": report.rows, "loaded": report.loaded, "skipped": report.num_skipped,
                        "skipped_rows": [dataclasses.asdict(r) for r in report.skipped[:100]]},
        "counts": counts,
        "intent_attributes": index.attr_names,
        "ground_truth": _ground_truth(cfg),
        "timings": {"total_s": round(time.perf_counter() - t0, 2)},
    }
    _write_json(meta_path, meta)
    log.info("simulated %d sessions (%d impressions, CTR %.3f) over %s (%d items, %d rows skipped) -> %s",
             counts["sessions"], counts["impressions"], counts["ctr"], src, counts["items"], report.num_skipped, out)
    return out


def load_marketplace(out_dir: str | os.PathLike[str]) -> tuple[Catalog, SessionLog, dict[str, Any]]:
    """Read a generated marketplace back: ``(catalog, sessions, meta)``.

    Raises
    ------
    FileNotFoundError
        When ``meta.json`` is missing (generation never finished).
    """
    from shared_model.catalog_io import load_catalog

    out = Path(out_dir)
    meta_path = out / "meta.json"
    if not meta_path.exists():
        raise FileNotFoundError(f"{meta_path}: missing -- not a finished marketplace (run generate_marketplace)")
    meta = json.loads(meta_path.read_text(encoding="utf-8"))
    return load_catalog(out / "catalog.jsonl"), SessionLog.load(out / "sessions.npz"), meta
