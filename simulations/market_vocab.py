"""The generated marketplace's words: categories, brands, attribute values and their synonyms.

Titles (:mod:`simulations.market_catalog`) and queries (:mod:`simulations.market_queries`) draw from the same
synonym lists, so a query and a matching title often use different words for the same value.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = [
    "ADJ_ORDER",
    "BRANDS",
    "CATEGORIES",
    "DESC_SENTENCES",
    "FEATURE",
    "MARKETING_PREFIX",
    "MARKETING_SUFFIX",
    "PATTERN_SHARES",
    "PRICE_RANGES",
    "SYNONYMS",
    "TITLE_COLORS",
    "CategorySpec",
]

FEATURE = "light-up"  # the video-only attribute value


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
MARKETING_PREFIX = ("Classic", "Essential", "Everyday", "Modern", "Vintage", "Signature", "Iconic", "Urban",
                    "Original", "Bestselling")
MARKETING_SUFFIX = ("- New Season", "- Limited Edition", "| Free Shipping", "- Bestseller", "- Gift Idea")
DESC_SENTENCES = ("Comfortable and durable.", "Perfect for everyday use.", "A great gift.", "Easy care.",
                  "Designed to last.", "Timeless style.", "Made with attention to detail.")
#: Order of adjectives in a query (attributes not listed follow, in column order).
ADJ_ORDER = ("feature", "price_range", "color", "pattern", "material")

#: Colour words looked for in titles when a catalog has no colour column (:mod:`simulations.title_intents`):
#: phrase (lower case, as title tokens) -> colour value. Two-word phrases are matched before single words;
#: spelling variants map to one value, distinct shades keep their own name.
TITLE_COLORS: dict[str, str] = {
    **{w: w for w in (
        "black", "white", "blue", "red", "green", "yellow", "pink", "purple", "orange", "grey", "brown", "beige",
        "navy", "maroon", "cream", "olive", "khaki", "teal", "magenta", "mustard", "lavender", "peach", "turquoise",
        "burgundy", "mauve", "taupe", "tan", "rust", "copper", "bronze", "gold", "silver", "charcoal", "nude",
        "coral", "ivory", "indigo", "violet", "lilac", "aqua", "cyan", "fuchsia", "wine", "camel", "mint", "lemon",
        "crimson", "scarlet", "cobalt", "emerald", "plum", "amber", "tangerine", "onyx", "multicolour", "metallic",
    )},
    "gray": "grey", "golden": "gold", "multicolor": "multicolour", "multicoloured": "multicolour",
    "multicolored": "multicolour",
    "navy blue": "navy", "off white": "off white", "sea green": "sea green", "lime green": "lime green",
    "olive green": "olive", "sky blue": "sky blue", "royal blue": "royal blue", "dark blue": "dark blue",
    "light blue": "light blue", "dark green": "dark green", "light green": "light green", "dark grey": "charcoal",
    "light grey": "light grey", "grey melange": "grey melange", "turquoise blue": "turquoise",
    "coffee brown": "coffee brown", "rose gold": "rose gold", "jet black": "black", "snow white": "white",
    "forest green": "green", "hot pink": "hot pink", "baby pink": "baby pink", "wine red": "wine",
}
