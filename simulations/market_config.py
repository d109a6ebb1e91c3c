"""The simulator's configuration: :class:`MarketConfig`, the named presets and the seeded random streams."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from typing import Any

import numpy as np

__all__ = ["PRESETS", "MarketConfig", "make_config", "random_streams"]


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
        Share of sessions shown in a uniformly random order (for position-propensity estimation); 0 gives a log
        that never randomized (propensities are then harvested from the production order's own variation).
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
    ranker_update_days, ranker_drift : float
        Periodic production-ranker updates (the variation real logs get from retraining): every
        ``ranker_update_days`` days since the first session a new ranker version scores with ``text_weight`` and
        ``popularity_weight`` each multiplied by ``exp(ranker_drift * N(0, 1))`` (drawn per version from the
        ``ranker`` stream). 0 days (the default) = one fixed ranker, as before: the default sessions are unchanged.
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
    ranker_update_days: float = 0.0
    ranker_drift: float = 0.3
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
        if self.ranker_update_days < 0 or self.ranker_drift < 0:
            problems.append("ranker_update_days and ranker_drift must be >= 0")
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
    # the default catalog with 10,000 shoppers and shorter histories (about 15 sessions each, 150k in all): the
    # 10,000-device scale scenario (simulations/scenarios/fleet10k.toml, benchmarks/fleet_scale.py)
    "fleet10k": MarketConfig(num_items=3000, num_users=10000, sessions_per_user=15),
    # shoppers with strong individual tastes (far from their segment) and long histories: the personalization
    # scenario, where a device's own clicks carry signal the population does not
    "personal": MarketConfig(num_items=1500, num_users=100, sessions_per_user=120, segment_concentration=3.0,
                             utility_gain=1.5, purchase_utility=1.5),
    # the default marketplace with a log that never randomized and a production ranker retrained weekly: position
    # propensities come from intervention harvesting (shared_model.propensity), checked by benchmarks/bias_recovery.py
    "harvest": MarketConfig(num_items=3000, num_users=600, sessions_per_user=40, randomized_share=0.0,
                            ranker_update_days=7.0),
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


def random_streams(seed: int) -> dict[str, np.random.SeedSequence]:
    """Independent random streams (fresh objects each call, so the derivation is repeatable).

    ``ranker`` (production-ranker versions) was added last: spawning one more child leaves the others unchanged.
    """
    kids = np.random.SeedSequence(int(seed)).spawn(7)
    return dict(zip(("catalog", "users", "sessions", "render", "judgments", "spare", "ranker"), kids, strict=True))
