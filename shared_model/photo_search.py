"""Search by photo, learnt: a small projection of image embeddings trained on the catalog's own photos.

Today's heuristic scores a candidate by the raw cosine of the query photo's EfficientNet-Lite0 features and the
candidate's (``visual = cos(x_photo, x_item)``). Those features were trained for ImageNet classes, not for "the
same kind of product in the same colour", so the catalog teaches a projection instead::

    z = (x - mean) * inv_std            [N, Di]   standardised with the training photos' statistics
    h = l2norm(z @ weight)              [N, K]    K = 64 by default (``weight`` ships as float16)
    visual(photo, item) = h_photo . h_item + raw_weight * cos(x_photo, x_item)

Training (:func:`fit_projection`, torch on the CPU, deterministic by seed): a supervised-contrastive
(multi-positive InfoNCE) loss over the catalog's photos where an anchor's positives are the *other* photos of the
same ``(category, color)`` (``CatalogItem.category``, ``CatalogItem.color``); every other photo is a negative.
Items without an image, a category or a colour are left out. A seeded share of the photos is held out to choose
the number of steps (mean average precision of same-(type, colour) retrieval on them, against the raw cosine),
then the projection is refitted on every photo for that many steps.

Scoring (:func:`visual_scores`, numpy only) is the one definition shared by the on-device runtime
(``client/runtime.py``, torch-free), the export's parity gate and the benchmark. The bundle file
(:meth:`PhotoProjection.to_bytes`) is an ``.npz`` without pickles: ``mean`` float32 ``[Di]``, ``inv_std``
float32 ``[Di]``, ``weight`` float16 ``[Di, K]``, ``raw_weight`` float32 ``[]``, ``version`` int64 ``[]``.

This module imports torch only inside :func:`fit_projection`.
"""

from __future__ import annotations

import io
import logging
import time
from collections.abc import Hashable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from shared_model.head_features import image_gain, weigh_image

log = logging.getLogger(__name__)

FILE_VERSION = 1
ARRAYS = ("mean", "inv_std", "weight", "raw_weight", "version")
LABELS = ("category", "color")  # the positives: other photos with the same values of these attributes


class PhotoSearchError(ValueError):
    """The catalog cannot train a projection (too few labelled photos), or a projection file is malformed."""


@dataclass(frozen=True)
class PhotoSearchConfig:
    """How the projection is trained. ``min_*`` are the refusal thresholds (:func:`check_labels`)."""

    dim: int = 64  # K: width of the projected embedding
    temperature: float = 0.2  # of the contrastive softmax over cosines
    steps: int = 300  # at most (full-batch AdamW steps); the held-out photos choose how many
    eval_every: int = 25
    lr: float = 1e-3
    weight_decay: float = 1e-2
    val_share: float = 0.2  # photos held out to choose the number of steps
    raw_weight: float = 0.0  # residual of the raw cosine added to the projected one
    min_photos: int = 50  # labelled photos
    min_groups: int = 5  # (category, colour) groups with at least two photos
    max_photos: int = 4000  # a seeded sample above this (the loss is full-batch: N x N)
    seed: int = 0

    def __post_init__(self) -> None:
        if self.dim < 1 or self.eval_every < 1 or self.steps < self.eval_every:
            raise ValueError("PhotoSearchConfig: dim and eval_every must be >= 1, steps >= eval_every")
        if not 0.0 < self.val_share < 0.5:
            raise ValueError(f"PhotoSearchConfig: val_share {self.val_share} must be in (0, 0.5)")
        if not self.temperature > 0:
            raise ValueError(f"PhotoSearchConfig: temperature {self.temperature} must be > 0")


@dataclass
class PhotoProjection:
    """The learnt photo-search projection (see the module docstring). ``info``: how it was trained."""

    mean: np.ndarray  # float32 [Di]
    inv_std: np.ndarray  # float32 [Di]
    weight: np.ndarray  # float32 [Di, K] (float16 values once read from a bundle file)
    raw_weight: float = 0.0
    info: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.mean = np.asarray(self.mean, np.float32).reshape(-1)
        self.inv_std = np.asarray(self.inv_std, np.float32).reshape(-1)
        self.weight = np.asarray(self.weight, np.float32)
        di = self.mean.shape[0]
        if self.inv_std.shape != (di,) or self.weight.ndim != 2 or self.weight.shape[0] != di:
            raise PhotoSearchError(f"shapes do not fit: mean {self.mean.shape}, inv_std {self.inv_std.shape}, "
                                   f"weight {self.weight.shape} (expected [Di], [Di], [Di, K])")
        for name in ("mean", "inv_std", "weight"):
            if not np.isfinite(getattr(self, name)).all():
                raise PhotoSearchError(f"array {name} holds NaN or infinite values")
        if not np.isfinite(self.raw_weight):
            raise PhotoSearchError("raw_weight is not finite")
        self.raw_weight = float(self.raw_weight)

    @property
    def input_dim(self) -> int:
        return int(self.mean.shape[0])

    @property
    def dim(self) -> int:
        return int(self.weight.shape[1])

    def project(self, x: np.ndarray) -> np.ndarray:
        """``x [N, Di]`` image embeddings -> ``[N, K]`` float64, L2-normalised (an all-zero input row gives the
        projection of the mean-free zero vector, normalised: only rows with an image are ever compared)."""
        x = np.asarray(x, np.float64)
        h = ((x - self.mean) * self.inv_std) @ self.weight.astype(np.float64)  # [N, K]
        return h / (np.linalg.norm(h, axis=-1, keepdims=True) + 1e-12)

    # ---------------------------------------------------------------------------------- bundle file
    def to_bytes(self) -> bytes:
        """The bundle file: an ``.npz`` (no pickles) with the arrays of the module docstring; ``weight`` float16."""
        buf = io.BytesIO()
        np.savez(buf, mean=self.mean.astype(np.float32), inv_std=self.inv_std.astype(np.float32),
                 weight=self.weight.astype(np.float16), raw_weight=np.float32(self.raw_weight),
                 version=np.int64(FILE_VERSION))
        return buf.getvalue()

    @classmethod
    def from_bytes(cls, data: bytes, image_dim: int | None = None) -> PhotoProjection:
        """Read :meth:`to_bytes`'s file; raises :class:`PhotoSearchError` naming the problem (array, shape)."""
        try:
            with np.load(io.BytesIO(data), allow_pickle=False) as z:
                arrays = {k: z[k] for k in z.files}
        except Exception as e:  # zip / npy errors of every kind: a corrupt file
            raise PhotoSearchError(f"cannot read the projection ({e.__class__.__name__}: {e})") from e
        missing = [k for k in ARRAYS if k not in arrays]
        if missing:
            raise PhotoSearchError(f"missing arrays {missing}")
        if int(arrays["version"]) != FILE_VERSION:
            raise PhotoSearchError(f"file version {int(arrays['version'])}; this runtime reads {FILE_VERSION}")
        for k in ("mean", "inv_std", "weight", "raw_weight"):
            if not np.issubdtype(arrays[k].dtype, np.floating):
                raise PhotoSearchError(f"array {k} has dtype {arrays[k].dtype}, expected floats")
        proj = cls(arrays["mean"], arrays["inv_std"], arrays["weight"].astype(np.float32),
                   float(arrays["raw_weight"]))
        if image_dim is not None and proj.input_dim != image_dim:
            raise PhotoSearchError(f"array mean has {proj.input_dim} values; the bundle's image embeddings have "
                                   f"{image_dim}")
        return proj


# ---------------------------------------------------------------------------------------------- scoring


def cosine(photo: np.ndarray, refs: np.ndarray) -> np.ndarray:
    """Raw cosine of ``photo [Di]`` and each row of ``refs [S, Di]``: ``[S]`` float64 (today's heuristic), with the
    colour descriptor weighed by ``head_features.image_gain``."""
    photo = weigh_image(np.asarray(photo, np.float64).reshape(-1))
    refs = weigh_image(np.asarray(refs, np.float64))
    denom = np.linalg.norm(refs, axis=1) * (np.linalg.norm(photo) + 1e-12) + 1e-12
    return refs @ photo / denom


def visual_scores(photo: np.ndarray, refs: np.ndarray, present: np.ndarray | None = None,
                  projection: PhotoProjection | None = None) -> np.ndarray:
    """``visual`` of the search-by-photo formula for each candidate: ``[S]`` float64.

    Parameters
    ----------
    photo : ``[Di]`` the query photo's image embedding
    refs : ``[S, Di]`` each candidate's image embedding (its video embedding when it has no image)
    present : ``[S]`` bool, False for a candidate with neither (it scores -1); default all present
    projection : the learnt projection; ``None`` = today's heuristic, the raw cosine
    """
    refs = np.asarray(refs, np.float64).reshape(len(refs), -1)
    if projection is None:
        out = cosine(photo, refs)
    else:
        hp = projection.project(np.asarray(photo, np.float64)[None])[0]  # [K]
        out = projection.project(refs) @ hp  # [S]
        if projection.raw_weight:
            out = out + projection.raw_weight * cosine(photo, refs)
    if present is None:
        return out
    return np.where(np.asarray(present, bool), out, -1.0)


# ---------------------------------------------------------------------------------------------- labels


def photo_labels(item_ids: Sequence[str], has_image: np.ndarray, catalog: Any) -> tuple[np.ndarray, list[str]]:
    """Rows of a feature store usable for training and their labels ``"category|color"``.

    ``item_ids [N]`` and ``has_image [N]`` are the store's; ``catalog`` a ``shared_model.schema.Catalog`` (items
    looked up by id). Items without an image, a category or a colour -- or missing from the catalog -- are left out.
    """
    by_id = {it.item_id: it for it in catalog.items}
    rows, labels = [], []
    for r, iid in enumerate(item_ids):
        it = by_id.get(iid)
        if it is None or not bool(has_image[r]):
            continue
        cat, col = str(it.category).strip(), str(it.color).strip()
        if cat and col:
            rows.append(r)
            labels.append(f"{cat}|{col}")
    return np.asarray(rows, np.int64), labels


def check_labels(labels: Sequence[Hashable], cfg: PhotoSearchConfig) -> dict[str, int]:
    """Counts of the training labels; raises :class:`PhotoSearchError` when there are too few to learn from."""
    _, counts = np.unique(np.asarray([str(x) for x in labels]), return_counts=True)
    stats = {"photos": len(labels), "groups": len(counts), "groups_with_positives": int((counts >= 2).sum()),
             "photos_with_positives": int(counts[counts >= 2].sum())}
    if stats["photos"] < cfg.min_photos or stats["groups_with_positives"] < cfg.min_groups:
        raise PhotoSearchError(
            f"too few labelled photos to learn search by photo: {stats['photos']} photos with an image, a category "
            f"and a colour (need {cfg.min_photos}), {stats['groups_with_positives']} (category, colour) groups with "
            f"two or more photos (need {cfg.min_groups})")
    return stats


# ---------------------------------------------------------------------------------------------- training


def mean_average_precision(h: np.ndarray, labels: np.ndarray, anchors: np.ndarray) -> float:
    """Mean over ``anchors`` (rows with at least one positive) of the average precision of ranking every other
    row by ``h @ h[anchor]``; positives share the anchor's label. ``h [N, K]`` L2-normalised; float."""
    aps = []
    for start in range(0, len(anchors), 256):  # [256, N] blocks
        a = np.asarray(anchors[start : start + 256])
        sims = h[a] @ h.T  # [A, N]
        sims[np.arange(len(a)), a] = -np.inf  # the anchor itself is not retrieved
        order = np.argsort(-sims, axis=1, kind="stable")
        rel = (labels[order] == labels[a][:, None]) & (order != a[:, None])  # [A, N]
        prec = np.cumsum(rel, axis=1) / np.arange(1, rel.shape[1] + 1)
        npos = rel.sum(1)
        aps.append(((prec * rel).sum(1) / np.maximum(npos, 1))[npos > 0])
    ap = np.concatenate(aps) if aps else np.zeros(0)
    return float(ap.mean()) if len(ap) else float("nan")


def _l2(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, np.float64)
    return x / (np.linalg.norm(x, axis=1, keepdims=True) + 1e-12)


def fit_projection(x: np.ndarray, labels: Sequence[Hashable], cfg: PhotoSearchConfig | None = None
                   ) -> PhotoProjection:
    """Train the projection on image embeddings ``x [N, Di]`` with ``labels [N]`` (same label = positive).

    Deterministic for a given ``cfg.seed`` (torch on the CPU; set one thread for bit-identical runs). Raises
    :class:`PhotoSearchError` when there are too few labelled photos (:func:`check_labels`).
    """
    import torch

    cfg = cfg or PhotoSearchConfig()
    t0 = time.perf_counter()
    x = np.asarray(x, np.float32)
    if x.ndim != 2 or len(x) != len(labels):
        raise PhotoSearchError(f"embeddings of shape {x.shape} for {len(labels)} labels: expected [N, Di], N labels")
    gain = image_gain(x.shape[1])  # the colour descriptor weighed as the head weighs it; folded into mean/inv_std
    x = x * gain
    if not np.isfinite(x).all():
        raise PhotoSearchError("image embeddings hold NaN or infinite values")
    counts = check_labels(labels, cfg)
    rng = np.random.default_rng([cfg.seed, 7])
    if len(x) > cfg.max_photos:
        keep = np.sort(rng.permutation(len(x))[: cfg.max_photos])
        x, labels = x[keep], [labels[i] for i in keep]
    _, y = np.unique(np.asarray([str(v) for v in labels]), return_inverse=True)  # [N] int labels
    y = y.astype(np.int64)

    mean = x.mean(0)
    std = x.std(0)
    inv_std = (1.0 / np.maximum(std, 1e-2 * float(std.mean()) + 1e-8)).astype(np.float32)
    z = ((x - mean) * inv_std).astype(np.float32)  # [N, Di]

    val = np.zeros(len(x), bool)
    val[rng.permutation(len(x))[: max(1, int(round(cfg.val_share * len(x))))]] = True
    fit_rows, val_rows = np.flatnonzero(~val), np.flatnonzero(val)
    raw_map = mean_average_precision(_l2(x), y, val_rows)

    def train(rows: np.ndarray, steps: int, watch: bool) -> tuple[np.ndarray, list[tuple[int, float]]]:
        """``weight [Di, K]`` after ``steps`` full-batch steps on ``rows``; with ``watch`` the held-out curve."""
        gen = torch.Generator().manual_seed(cfg.seed)
        w = (torch.randn(z.shape[1], cfg.dim, generator=gen) / np.sqrt(z.shape[1])).requires_grad_(True)
        opt = torch.optim.AdamW([w], lr=cfg.lr, weight_decay=cfg.weight_decay)
        zt = torch.from_numpy(z[rows])  # [n, Di]
        yt = torch.from_numpy(y[rows])  # [n]
        pos = (yt[:, None] == yt[None, :]).float()  # [n, n]
        pos.fill_diagonal_(0.0)
        has_pos = pos.sum(1) > 0  # anchors with at least one positive
        eye = torch.eye(len(rows), dtype=torch.bool)
        curve: list[tuple[int, float]] = []  # (step, held-out mAP)
        for step in range(1, steps + 1):
            h = torch.nn.functional.normalize(zt @ w, dim=1)  # [n, K]
            logits = (h @ h.T / cfg.temperature).masked_fill(eye, float("-inf"))  # [n, n]
            logp = torch.log_softmax(logits, dim=1).masked_fill(eye, 0.0)
            loss = -((logp * pos).sum(1)[has_pos] / pos.sum(1)[has_pos]).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
            if watch and step % cfg.eval_every == 0:
                with torch.no_grad():
                    m = mean_average_precision(_l2(z @ w.detach().numpy().astype(np.float64)), y, val_rows)
                curve.append((step, m))
        return w.detach().numpy(), curve

    # choose the number of steps on held-out photos (their positives include the fitted photos), then refit on all
    _, curve = train(fit_rows, cfg.steps, watch=True)
    best_step, best_map = max(curve, key=lambda c: (c[1], -c[0]))
    weight, _ = train(np.arange(len(x)), best_step, watch=False)
    info = {"method": "supervised contrastive (multi-positive InfoNCE) over photos; positives: other photos of "
                      "the same (category, color)", "labels": list(LABELS), "config": asdict(cfg), **counts,
            "photos_used": len(x), "selected_steps": best_step, "held_out_photos": len(val_rows),
            "held_out_map_raw_cosine": raw_map, "held_out_map_learnt": best_map,
            "held_out_curve": [[s, round(m, 5)] for s, m in curve], "seconds": round(time.perf_counter() - t0, 2)}
    log.info("photo search: %d photos, %d groups; held-out mAP %.4f learnt vs %.4f raw cosine (%d steps, %.1f s)",
             len(x), counts["groups"], best_map, raw_map, best_step, info["seconds"])
    # (x * gain - mean) * inv_std == (x - mean / gain) * (inv_std * gain): the file takes unweighed embeddings
    return PhotoProjection(mean / gain, inv_std * gain, weight, cfg.raw_weight, info)


def fit_from_catalog(item_ids: Sequence[str], image: np.ndarray, has_image: np.ndarray, catalog: Any,
                     cfg: PhotoSearchConfig | None = None) -> PhotoProjection:
    """Fit on a feature store's photos (``item_ids [N]``, ``image [N, Di]``, ``has_image [N]``) labelled by
    ``catalog``'s (category, color). Raises :class:`PhotoSearchError` with too few labelled photos."""
    rows, labels = photo_labels(item_ids, has_image, catalog)
    if len(rows) == 0:
        raise PhotoSearchError("too few labelled photos to learn search by photo: no item has an image, a "
                               "category and a colour")
    return fit_projection(np.asarray(image)[rows], labels, cfg)
