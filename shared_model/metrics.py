"""Ranking metrics per list (NumPy): NDCG@k, MRR, recall@k, Kendall's tau-b; and their summary.

Conventions shared by every function here:

* Inputs are ``[B, S]`` arrays (a single ``[S]`` list is accepted and treated as ``[1, S]``); torch tensors
  are accepted too (detached and copied to the CPU). ``mask`` is True for real items, False for padding;
  ``None`` means every item is real. Padded entries are ignored whatever they hold.
* Every function returns one value per list, ``np.ndarray[B]`` of float64. A list for which the metric is
  undefined (no relevant item; fewer than two items or a constant ranking for Kendall's tau) gets ``NaN``:
  average with ``np.nanmean`` -- :func:`summarize` and :func:`mean_ndcg` do.
* Ties in ``scores`` are resolved as the *expectation over uniformly random tie-breaking* (for NDCG this is
  exactly ``sklearn.metrics.ndcg_score(..., ignore_ties=False)``: the gains of a tied group are averaged over
  the group's positions). :func:`mrr` can also be asked for the pessimistic or optimistic tie-breaking.
  So a constant scorer gets the metric of a random ranking, not the one of the input order.
* NaN scores on real items are an error (ValueError).
* Grades may be any numbers >= 0 (integer or decimal, any top grade). The relevance that MRR and recall need is a
  threshold on grades; :func:`relevance_thresholds` defines it for any scale relative to the scale's top grade
  (MRR: the top grade; recall: at least half of it), which on the simulator's 0..3 scale is grade 3 and grade >= 2.
"""

from __future__ import annotations

from typing import Any

import numpy as np

__all__ = [
    "GAINS",
    "MRR",
    "NDCG10",
    "RECALL10",
    "RECALL_FRACTION",
    "compute_metrics",
    "count_defined",
    "kendall_tau",
    "mean_ndcg",
    "mrr",
    "ndcg_at_k",
    "recall_at_k",
    "relevance_thresholds",
    "summarize",
]

NDCG10 = "ndcg@10"
MRR = "mrr"
RECALL10 = "recall@10"
GAINS = ("exp2", "linear")  # gain(g) = 2**g - 1, or g
RECALL_FRACTION = 0.5  # recall counts items graded at least this share of the scale's top grade

_KENDALL_CHUNK = 1 << 22  # elements of one [chunk, S, S] block in kendall_tau


# ----------------------------------------------------------------------------------------------- helpers
def _to_numpy(x: Any) -> np.ndarray:
    if hasattr(x, "detach"):  # torch.Tensor, without importing torch
        x = x.detach().cpu().numpy()
    return np.asarray(x)


def _inputs(scores: Any, grades: Any, mask: Any) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Validated float64 ``scores``/``grades`` and bool ``mask``, all ``[B, S]``, zeros at padding."""
    s = np.atleast_2d(_to_numpy(scores).astype(np.float64))
    g = np.atleast_2d(_to_numpy(grades).astype(np.float64))
    m = np.ones(s.shape, dtype=bool) if mask is None else np.atleast_2d(_to_numpy(mask).astype(bool))
    if s.ndim != 2 or s.shape != g.shape or s.shape != m.shape:
        raise ValueError(
            f"scores {s.shape}, grades {g.shape} and mask {m.shape} must be [B, S] arrays of the same shape"
        )
    if np.isnan(s[m]).any():
        raise ValueError("scores contain NaN on real (unmasked) items")
    return np.where(m, s, 0.0), np.where(m, g, 0.0), m


def _check_k(k: int | None) -> None:
    if k is not None and k < 1:
        raise ValueError(f"k must be >= 1 or None, got {k}")


def _tie_groups(s: np.ndarray, m: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """For each real item: how many real items score strictly higher, and the size of its tie group.

    Under uniformly random tie-breaking item ``i`` lands uniformly on one of the 0-based positions
    ``before[i] .. before[i] + tied[i] - 1``. Sort-based, ``O(B S log S)``.

    Returns
    -------
    before, tied : np.ndarray [B, S] of int64
        Values at padded positions are meaningless.
    """
    b, n = s.shape
    order = np.lexsort((-s, ~m), axis=-1)  # real items first, then by score, descending
    ss = np.take_along_axis(s, order, axis=1)
    ms = np.take_along_axis(m, order, axis=1)
    new = np.ones((b, n), dtype=bool)
    new[:, 1:] = (ss[:, 1:] != ss[:, :-1]) | (ms[:, 1:] != ms[:, :-1])
    group = np.cumsum(new, axis=1) - 1 + (np.arange(b) * n)[:, None]  # globally unique group ids
    counts = np.bincount(group.ravel(), minlength=b * n)
    starts = np.zeros(b * n, dtype=np.int64)
    pos = np.broadcast_to(np.arange(n), (b, n))
    starts[group[new]] = pos[new]
    before = np.empty((b, n), dtype=np.int64)
    tied = np.empty((b, n), dtype=np.int64)
    np.put_along_axis(before, order, starts[group], axis=1)
    np.put_along_axis(tied, order, counts[group], axis=1)
    return before, tied


def relevance_thresholds(top_grade: float) -> tuple[float, float]:
    """The grade thresholds of MRR and recall on a ``0..top_grade`` scale: ``(top_grade, top_grade / 2)``.

    MRR is the reciprocal rank of the first item judged at the top grade (the exact match); recall counts the
    items graded at least half the top grade (:data:`RECALL_FRACTION`). On fedrank's 0..3 scale that is grade 3
    and grades 2-3, as :func:`shared_model.training.per_list_metrics` uses; on 0..4, grade 4 and 2-4; on 0..6,
    grade 6 and 3-6; ESCI's E=3/S=2/C=1/I=0: Exact, and Exact or Substitute. A grade of 0 is never relevant:
    with ``top_grade <= 0`` both thresholds are infinite (no list has a relevant item; the metrics are NaN).
    """
    if not np.isfinite(top_grade) or top_grade <= 0:
        return float("inf"), float("inf")
    return float(top_grade), float(top_grade) * RECALL_FRACTION


def _gains(g: np.ndarray, gain: str) -> np.ndarray:
    if gain == "exp2":
        return np.exp2(g) - 1.0
    if gain == "linear":
        return g
    raise ValueError(f"gain must be one of {GAINS}, got {gain!r}")


# ----------------------------------------------------------------------------------------------- metrics
def ndcg_at_k(
    scores: Any, grades: Any, mask: Any = None, k: int | None = 10, gain: str = "exp2"
) -> np.ndarray:
    """NDCG@k per list, ties averaged exactly like ``sklearn.metrics.ndcg_score(ignore_ties=False)``.

    ``DCG@k = sum_{r < k} gain(item at 0-based rank r) / log2(r + 2)``, divided by the DCG@k of the ideal
    ordering of the list's grades. Items with tied scores share the average of their positions' discounts.

    Parameters
    ----------
    scores : array [B, S]
    grades : array [B, S]
        Graded relevance, >= 0.
    mask : bool array [B, S] or None
        True for real items.
    k : int or None
        Cutoff; ``None`` = whole list.
    gain : {"exp2", "linear"}
        ``2**g - 1`` (default) or ``g``. To compare with sklearn, pass it the gains
        (``y_true = 2**g - 1``): sklearn uses ``y_true`` as the gain.

    Returns
    -------
    np.ndarray [B]
        In ``[0, 1]``; NaN for a list without any positive grade (sklearn would say 0 there).
    """
    _check_k(k)
    s, g, m = _inputs(scores, grades, mask)
    n = s.shape[1]
    gains = np.where(m, _gains(g, gain), 0.0)
    discount = 1.0 / np.log2(np.arange(n) + 2.0)
    if k is not None:
        discount[k:] = 0.0
    cum = np.concatenate([[0.0], np.cumsum(discount)])
    before, tied = _tie_groups(s, m)
    tied = np.maximum(tied, 1)
    expected_discount = (cum[np.minimum(before + tied, n)] - cum[np.minimum(before, n)]) / tied
    dcg = np.where(m, gains * expected_discount, 0.0).sum(axis=1)
    idcg = (-np.sort(-gains, axis=1) * discount).sum(axis=1)
    out = np.full(s.shape[0], np.nan)
    ok = idcg > 0
    out[ok] = dcg[ok] / idcg[ok]
    return out


def mean_ndcg(scores: Any, grades: Any, mask: Any = None, k: int | None = 10, gain: str = "exp2") -> float:
    """Mean NDCG@k over the lists that have at least one positive grade (``nanmean`` of :func:`ndcg_at_k`).

    Lists without a relevant item are *skipped*, not counted as 0. Returns NaN if no list has one.
    """
    return _nanmean(ndcg_at_k(scores, grades, mask, k=k, gain=gain))


def mrr(
    scores: Any, grades: Any, mask: Any = None, threshold: float = 1, ties: str = "average"
) -> np.ndarray:
    """Reciprocal rank of the first item with ``grade >= threshold``, per list.

    Parameters
    ----------
    scores, grades, mask : arrays [B, S]
    threshold : float
        Minimum grade of a relevant item.
    ties : {"average", "pessimistic", "optimistic"}
        How items tied with the best-scored relevant item are ordered:
        ``"average"`` (default) -- the exact expectation of ``1/rank`` under uniformly random tie-breaking
        (consistent with :func:`ndcg_at_k`); ``"pessimistic"`` -- tied non-relevant items come first;
        ``"optimistic"`` -- the relevant item comes first.

    Returns
    -------
    np.ndarray [B]
        In ``(0, 1]``; NaN for a list without a relevant item.
    """
    if ties not in ("average", "pessimistic", "optimistic"):
        raise ValueError(f"ties must be 'average', 'pessimistic' or 'optimistic', got {ties!r}")
    s, g, m = _inputs(scores, grades, mask)
    b, n = s.shape
    rel = m & (g >= threshold)
    has = rel.any(axis=1)
    out = np.full(b, np.nan)
    if not has.any():
        return out
    s, m, rel = s[has], m[has], rel[has]
    best = np.where(rel, s, -np.inf).max(axis=1, keepdims=True)  # score of the best-scored relevant item
    above = (m & (s > best)).sum(axis=1).astype(np.float64)  # real items strictly ahead of it
    tie = m & (s == best)
    c = tie.sum(axis=1).astype(np.float64)  # size of its tie group
    r = (tie & rel).sum(axis=1).astype(np.float64)  # relevant items in that group (>= 1)
    if ties == "optimistic":
        rr = 1.0 / (above + 1.0)
    elif ties == "pessimistic":
        rr = 1.0 / (above + c - r + 1.0)
    else:
        # T = number of tied non-relevant items placed before the first tied relevant one:
        # P(T = t) = prod_{u<t} (c-r-u)/(c-u) * r/(c-t),  t = 0 .. c-r.
        t = np.arange(n, dtype=np.float64)[None, :]
        c_, r_ = c[:, None], r[:, None]
        feasible = t <= c_ - r_
        denom = np.where(feasible, c_ - t, 1.0)
        step = np.where(t < c_ - r_, (c_ - r_ - t) / denom, 0.0)
        survive = np.concatenate([np.ones((len(c), 1)), np.cumprod(step, axis=1)[:, :-1]], axis=1)
        prob = np.where(feasible, survive * r_ / denom, 0.0)
        rr = (prob / (above[:, None] + 1.0 + t)).sum(axis=1)
    out[has] = rr
    return out


def recall_at_k(scores: Any, grades: Any, mask: Any = None, k: int = 10, threshold: float = 2) -> np.ndarray:
    """Fraction of the items with ``grade >= threshold`` that are ranked in the top ``k``, per list.

    Ties straddling the cutoff count fractionally (expectation under uniformly random tie-breaking): a tied
    group occupying positions ``a .. a+c-1`` contributes ``(k - a) / c`` of each of its relevant items when
    ``a < k < a + c``.

    Returns
    -------
    np.ndarray [B]
        In ``[0, 1]``; NaN for a list without a relevant item.
    """
    _check_k(k)
    s, g, m = _inputs(scores, grades, mask)
    rel = m & (g >= threshold)
    n_rel = rel.sum(axis=1)
    before, tied = _tie_groups(s, m)
    tied = np.maximum(tied, 1)
    in_top = np.clip(k - before, 0, tied) / tied
    hits = np.where(rel, in_top, 0.0).sum(axis=1)
    out = np.full(s.shape[0], np.nan)
    ok = n_rel > 0
    out[ok] = hits[ok] / n_rel[ok]
    return out


def _pair_signs(v: np.ndarray) -> np.ndarray:
    """``sign(v_i - v_j)`` as int8 ``[B, S, S]`` (comparisons, so infinities are fine)."""
    return (v[:, :, None] > v[:, None, :]).astype(np.int8) - (v[:, :, None] < v[:, None, :]).astype(np.int8)


def kendall_tau(a: Any, b: Any, mask: Any = None) -> np.ndarray:
    """Kendall's tau-b between two scorings of the same lists (``scipy.stats.kendalltau``'s default).

    ``tau_b = (concordant - discordant) / sqrt((n0 - ties_a) * (n0 - ties_b))`` over the pairs of real items.

    Parameters
    ----------
    a, b : arrays [B, S]
        E.g. reference and exported-model scores.
    mask : bool array [B, S] or None
        True for real items.

    Returns
    -------
    np.ndarray [B]
        In ``[-1, 1]``; NaN for a list with fewer than two real items or where ``a`` or ``b`` is constant.
    """
    x, y, m = _inputs(a, b, mask)
    if np.isnan(y[m]).any():
        raise ValueError("b contains NaN on real (unmasked) items")
    bsz, n = x.shape
    out = np.full(bsz, np.nan)
    chunk = max(1, _KENDALL_CHUNK // max(1, n * n))
    for lo in range(0, bsz, chunk):
        xs, ys, ms = x[lo : lo + chunk], y[lo : lo + chunk], m[lo : lo + chunk]
        pm = ms[:, :, None] & ms[:, None, :]
        sx = np.where(pm, _pair_signs(xs), 0).astype(np.int64)
        sy = _pair_signs(ys).astype(np.int64)
        num = (sx * sy).sum(axis=(1, 2)).astype(np.float64)
        nx = np.abs(sx).sum(axis=(1, 2)).astype(np.float64)
        ny = np.where(pm, np.abs(sy), 0).sum(axis=(1, 2)).astype(np.float64)
        den = np.sqrt(nx * ny)
        ok = den > 0
        tau = np.full(len(xs), np.nan)
        tau[ok] = np.clip(num[ok] / den[ok], -1.0, 1.0)
        out[lo : lo + chunk] = tau
    return out


# ----------------------------------------------------------------------------------------------- summary
def _nanmean(v: np.ndarray) -> float:
    v = np.asarray(v, dtype=np.float64)
    finite = ~np.isnan(v)
    return float(v[finite].mean()) if finite.any() else float("nan")


def compute_metrics(
    scores: Any,
    grades: Any,
    mask: Any = None,
    k: int = 10,
    mrr_threshold: float = 1,
    recall_threshold: float = 2,
    gain: str = "exp2",
) -> dict[str, np.ndarray]:
    """The standard per-list metrics: ``{"ndcg@k": ..., "mrr": ..., "recall@k": ...}`` (each ``[B]``).

    With the default ``k=10`` the keys are :data:`NDCG10`, :data:`MRR` and :data:`RECALL10`. Feed the result
    (or several concatenated) to :func:`summarize`. ``gain`` is NDCG's (see :func:`ndcg_at_k`); the thresholds
    of a scale come from :func:`relevance_thresholds`.
    """
    return {
        f"ndcg@{k}": ndcg_at_k(scores, grades, mask, k=k, gain=gain),
        MRR: mrr(scores, grades, mask, threshold=mrr_threshold),
        f"recall@{k}": recall_at_k(scores, grades, mask, k=k, threshold=recall_threshold),
    }


def count_defined(per_list: dict[str, np.ndarray]) -> dict[str, int]:
    """How many lists each per-list metric is defined for (not NaN): the lists :func:`summarize` averages."""
    return {name: int((~np.isnan(_to_numpy(v).astype(np.float64).ravel())).sum()) for name, v in per_list.items()}


def summarize(per_list: dict[str, np.ndarray]) -> dict[str, float]:
    """NaN-mean of each per-list metric (lists where a metric is undefined are skipped).

    Parameters
    ----------
    per_list : dict[str, array [B]]
        E.g. the output of :func:`compute_metrics`.

    Returns
    -------
    dict[str, float]
        Same keys; NaN (without a RuntimeWarning) where every list is NaN or there is none.
    """
    return {name: _nanmean(_to_numpy(values).ravel()) for name, values in per_list.items()}
