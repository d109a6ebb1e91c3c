"""The ranking head's inputs, defined once: dimensions, layouts, and the numpy functions that compute them.

Train/serve parity rests on this module alone: the torch training pipeline (``shared_model/data.py``:
:func:`~shared_model.data.build_slates` and :func:`~shared_model.data.head_inputs`) and the on-device runtime
(``client/runtime.py``) both call the functions below, so a feature is computed by one function whether the head
is trained, evaluated, exported or served (``tests/test_feature_parity.py`` checks the two callers agree).

Torch-free on purpose: it imports numpy and the standard library only, because the runtime imports it on a device
where ``import torch`` fails.

What the head gets (``shared_model/head.py``; B slates of S candidates, a history of H clicked items):

    query        [B, TEXT_DIM]          the query's text embedding
    item_text    [B, S, TEXT_DIM]       catalog embeddings of the candidates ...
    item_image   [B, S, IMAGE_DIM]
    item_video   [B, S, VIDEO_DIM]
    item_mask    [B, S, NUM_MODALITIES] ... which of them are present (all 0 at padding)
    dense        [B, S, DENSE_DIM]      ITEM_DENSE_NAMES (feature store) + SLATE_DENSE_NAMES (:func:`slate_features`)
    user_text    [B, TEXT_DIM]          the user context (:func:`user_context`): mean text embedding of the last
    user_image   [B, IMAGE_DIM]         HISTORY_LEN clicked items, their mean image embedding (imageless items
    user_mask    [B, 1]                 count as zero), and 1 if there is any history

The query-title cosine is computed inside the head from ``query`` and ``item_text``, so it is part of the exported
graph and needs no copy here.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np

# ------------------------------------------------------------------------------------------ dimensions

TEXT_DIM = 384  # all-MiniLM-L6-v2 sentence embedding
BACKBONE_DIM = 1280  # EfficientNet-Lite0 pooled features
COLOUR_DIM = 53  # the photo's colour descriptor beside them (encoders.ColourDescriptor)
IMAGE_DIM = BACKBONE_DIM + COLOUR_DIM  # what the image encoder returns: [pooled features, colour descriptor]
# The descriptor is stored at unit scale (square-rooted shares, at most 1) so that an int8 row with one scale keeps
# the pooled features' precision (at x15 the descriptor set the row's scale: 3.5x the features' rounding error);
# whatever projects or compares image embeddings weighs it by COLOUR_GAIN (image_gain), which puts its norm near the
# pooled features' (~16 on real photos).
COLOUR_GAIN = 15.0
VIDEO_DIM = IMAGE_DIM  # frames through the image encoder + temporal mean pooling
MODALITIES = ("text", "image", "video")  # the order of item_mask's last axis
NUM_MODALITIES = len(MODALITIES)

# image preprocessing, as the image encoder saw its inputs in training: RGB, IMAGE_SIZE x IMAGE_SIZE, channels
# first, (x - PIXEL_MEAN) / PIXEL_SCALE on 0..255
IMAGE_SIZE = 224
PIXEL_MEAN = 127.0
PIXEL_SCALE = 128.0

# --------------------------------------------------------------------------------------- slates, users

MAX_POSITIONS = 50  # display positions an examination propensity is fitted for
HISTORY_LEN = 10  # recent clicked items that make up the on-device user context
RANK_SCALE = 50.0  # the first-stage rank feature is rank / RANK_SCALE (fixed: trained heads depend on it)
Z_EPS = 1e-6  # added to the slate's standard deviation when z-scoring retrieval scores

# ------------------------------------------------------------------------------------------- dense layout

ITEM_DENSE_NAMES = ("log_price_z", "rating_frac", "has_price", "has_rating")  # per item, in the feature store
SLATE_DENSE_NAMES = (f"first_stage_rank/{RANK_SCALE:g}", "retrieval_score_z_in_slate",
                     "log1p_price_minus_slate_median")  # per candidate within its slate (:func:`slate_features`)
ITEM_DENSE_DIM = len(ITEM_DENSE_NAMES)
SLATE_DENSE_DIM = len(SLATE_DENSE_NAMES)
DENSE_DIM = ITEM_DENSE_DIM + SLATE_DENSE_DIM

# the head's inputs, in forward() order (also the exported files' input names)
HEAD_INPUTS = (
    "query", "item_text", "item_image", "item_video", "item_mask", "dense", "user_text", "user_image", "user_mask",
)


# ------------------------------------------------------------------------------------------- functions


def image_gain(dim: int) -> np.ndarray:
    """``[dim]`` float32 weights of an image embedding's entries where embeddings are projected or compared: 1 for
    the pooled CNN features, ``COLOUR_GAIN`` for the colour descriptor (all 1 when ``dim`` is not ``IMAGE_DIM``,
    e.g. a small test configuration)."""
    gain = np.ones(dim, np.float32)
    if dim == IMAGE_DIM:
        gain[BACKBONE_DIM:] = COLOUR_GAIN
    return gain


def weigh_image(x: np.ndarray) -> np.ndarray:
    """Image (or video) embeddings ``[..., Di]`` times :func:`image_gain` (float32 in, float32 out; float64 stays
    float64): what the head's image projection, LightGBM's image features and search by photo's cosine see."""
    x = np.asarray(x)
    return x * image_gain(x.shape[-1]).astype(np.result_type(x.dtype, np.float32))


def log_prices(price: np.ndarray) -> np.ndarray:
    """``[N]`` float64 ``log1p(price)`` of raw prices ``[N]``; a missing price (NaN) counts as 0."""
    return np.log1p(np.nan_to_num(np.asarray(price, dtype=np.float64), nan=0.0))


def slate_features(log_price: np.ndarray, ranks: np.ndarray | None = None,
                   retrieval_scores: np.ndarray | None = None) -> np.ndarray:
    """``[S, SLATE_DENSE_DIM]`` float32 features of one slate's candidates, in ``SLATE_DENSE_NAMES`` order.

    Parameters
    ----------
    log_price : [S] the candidates' :func:`log_prices`
    ranks : [S] first-stage ranks (0 = first); ``None``: the candidates' order (0, 1, 2, ...)
    retrieval_scores : [S] first-stage scores, z-scored within the slate; ``None`` (not known): 0 for every
        candidate

    A slate of one has z-score 0 and price feature 0; ties in price share the median's offset.
    """
    lp = np.asarray(log_price, dtype=np.float64).reshape(-1)
    s = lp.shape[0]
    out = np.zeros((s, SLATE_DENSE_DIM), np.float32)
    if s == 0:
        return out
    r = np.arange(s) if ranks is None else ranks
    out[:, 0] = np.asarray(r, dtype=np.float64).reshape(-1) / RANK_SCALE
    if retrieval_scores is not None:
        rs = np.asarray(retrieval_scores, dtype=np.float32).reshape(-1)
        out[:, 1] = (rs - rs.mean()) / (rs.std() + Z_EPS)
    out[:, 2] = lp - np.median(lp)
    return out


def recent_history(rows: Iterable[int | None], history_len: int = HISTORY_LEN) -> list[int]:
    """The user context's items: the last ``history_len`` known rows (``None`` = unknown item), most recent last."""
    known = [int(r) for r in rows if r is not None]
    return known[max(len(known) - history_len, 0):]


def user_context(text: np.ndarray, image: np.ndarray, has_image: np.ndarray, valid: np.ndarray
                 ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(user_text [..., Dt], user_image [..., Di], user_mask [..., 1])`` float32 from a history of H items.

    Parameters
    ----------
    text : [..., H, Dt] the history items' text embeddings
    image : [..., H, Di] their image embeddings
    has_image : [..., H] 1 where an item has an image (an imageless item adds zero to the image mean)
    valid : [..., H] 1 for a real history item, 0 at padding

    Means are over the valid items (an imageless item still counts in the image mean's denominator); no history
    gives zero vectors and ``user_mask`` 0.
    """
    uv = np.asarray(valid, dtype=np.float32)  # [..., H]
    n = uv.sum(-1, keepdims=True)  # [..., 1]
    denom = np.maximum(n, np.float32(1.0))  # [..., 1]
    w_img = uv * np.asarray(has_image, dtype=np.float32)  # [..., H]
    user_text = (np.asarray(text, dtype=np.float32) * uv[..., None]).sum(-2) / denom  # [..., Dt]
    user_image = (np.asarray(image, dtype=np.float32) * w_img[..., None]).sum(-2) / denom  # [..., Di]
    return user_text, user_image, (n > 0).astype(np.float32)


def head_dense(item_dense: np.ndarray, slate_dense: np.ndarray) -> np.ndarray:
    """``[..., S, DENSE_DIM]`` float32: the items' ``[..., S, ITEM_DENSE_DIM]`` catalog features, then the
    ``[..., S, SLATE_DENSE_DIM]`` :func:`slate_features`."""
    return np.concatenate([np.asarray(item_dense, np.float32), np.asarray(slate_dense, np.float32)], axis=-1)


def head_feeds(query: np.ndarray, item_text: np.ndarray, item_image: np.ndarray, item_video: np.ndarray,
               item_mask: np.ndarray, item_dense: np.ndarray, slate_dense: np.ndarray,
               user: tuple[np.ndarray, np.ndarray, np.ndarray], valid: np.ndarray | None = None
               ) -> dict[str, np.ndarray]:
    """The head's keyword inputs (``HEAD_INPUTS``, float32) for B slates of S candidates.

    Parameters
    ----------
    query : [B, Dt]
    item_text, item_image, item_video : [B, S, D] the candidates' embeddings
    item_mask : [B, S, NUM_MODALITIES] modality presence
    item_dense : [B, S, ITEM_DENSE_DIM] catalog dense features
    slate_dense : [B, S, SLATE_DENSE_DIM] :func:`slate_features` of each slate
    user : :func:`user_context` of each slate's shopper: [B, Dt], [B, Di], [B, 1]
    valid : [B, S] bool, False at padding (its modality mask becomes 0); ``None``: every candidate is real
    """
    mask = np.asarray(item_mask, dtype=np.float32)  # [B, S, 3]
    if valid is not None:
        mask = mask * np.asarray(valid, dtype=np.float32)[..., None]
    values = (query, item_text, item_image, item_video, mask, head_dense(item_dense, slate_dense), *user)
    return {name: np.asarray(v, dtype=np.float32) for name, v in zip(HEAD_INPUTS, values, strict=True)}


__all__ = [
    "DENSE_DIM", "HEAD_INPUTS", "HISTORY_LEN", "IMAGE_DIM", "IMAGE_SIZE", "ITEM_DENSE_DIM", "ITEM_DENSE_NAMES",
    "MAX_POSITIONS", "MODALITIES", "NUM_MODALITIES", "PIXEL_MEAN", "PIXEL_SCALE", "RANK_SCALE", "SLATE_DENSE_DIM",
    "SLATE_DENSE_NAMES", "TEXT_DIM", "VIDEO_DIM", "Z_EPS", "head_dense", "head_feeds", "log_prices",
    "recent_history", "slate_features", "user_context",
]
