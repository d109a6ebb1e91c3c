"""Evaluation from clicks alone: what a shop's logs without graded relevance can say about a ranker.

Held-out lists are each shopper's last sessions (the per-user time split of ``prepare``). For a ranker's scores
``[N, S]`` over those lists (display order; ``positions`` 0-based) this module computes, per list:

* ``click mrr`` -- reciprocal rank, in the ranker's order, of the best-placed clicked (or purchased) item; lists
  without a click or purchase are left out. Ties are averaged over random tie-breaking (:func:`shared_model.metrics.mrr`).
* ``click ndcg@10`` -- NDCG@10 with the label purchase = 2, click = 1, else 0 as the gain (linear: the label is the
  gain, as ``sklearn.metrics.ndcg_score`` takes ``y_true``); lists without a click or purchase are left out.
* ``ips clicks@10`` -- the counterfactual number of clicks in the top 10 had the ranker's list been shown, under
  the position-based click model with the logged examination propensities ``p``: each logged click on an item
  the ranker puts at rank ``r`` (shown at position ``o``) counts ``p[r] * min(1 / p[o], clip)`` when ``r < 10``
  (ties: expectation over random tie-breaking). Unbiased when ``clip`` does not bind; for the logging ranker itself
  (the production order) it is exactly the logged clicks in the top 10.
* ``snips clicks@10`` -- the self-normalised variant (the normalised inverse-propensity weights of Wang et al.,
  2016): the click weights ``min(1 / p[o], clip)`` are rescaled to average 1 over the logged clicks
  (``sum(ips) / sum(w) * clicks``, over all lists). With a deterministic logging ranker the normaliser depends on
  the logged clicks only, so SNIPS orders rankers as IPS does, on a smaller scale (it divides by the mean click
  weight); what differs is its interval, where a few heavily weighted deep clicks count less.

Every metric gets a 95% percentile bootstrap interval over held-out lists (paired: the same resamples for every
ranker); ratio estimators (SNIPS, the averages over defined lists) are recomputed on each resample.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from shared_model.metrics import mrr, ndcg_at_k

__all__ = [
    "CLICK_COLUMNS",
    "CLICK_MRR",
    "CLICK_NDCG10",
    "IPS_CLICKS10",
    "SNIPS_CLICKS10",
    "Bootstrap",
    "click_labels",
    "click_metrics",
    "click_statistics",
    "metric_definitions",
]

CLICK_MRR = "click mrr"
CLICK_NDCG10 = "click ndcg@10"
IPS_CLICKS10 = "ips clicks@10"
SNIPS_CLICKS10 = "snips clicks@10"
CLICK_COLUMNS = (CLICK_MRR, CLICK_NDCG10, IPS_CLICKS10, SNIPS_CLICKS10)
PURCHASE_LABEL, CLICK_LABEL = 2.0, 1.0


def metric_definitions(k: int = 10, clip: float = 20.0) -> dict[str, str]:
    """What each click metric means (for ``results.json``)."""
    return {
        CLICK_MRR: "reciprocal rank of the best-ranked clicked or purchased item; lists with a click or purchase",
        CLICK_NDCG10: f"NDCG@{k}, linear gain: purchase = 2, click = 1; lists with a click or purchase",
        IPS_CLICKS10: f"expected clicks in the top {k} under the position-based model: sum over logged clicks of "
                      f"p[new rank] * min(1 / p[logged position], {clip:g}), new rank < {k}; mean per list",
        SNIPS_CLICKS10: f"the IPS sum with the click weights min(1 / p[logged position], {clip:g}) normalised to "
                        "average 1 over the logged clicks (the same normaliser for every ranker)",
    }


def click_labels(clicks: np.ndarray, purchases: np.ndarray) -> np.ndarray:
    """``[N, S]`` labels: 2 for a purchase, 1 for a click, else 0."""
    return np.where(np.asarray(purchases) > 0, PURCHASE_LABEL,
                    np.where(np.asarray(clicks) > 0, CLICK_LABEL, 0.0))


def _top_k_examination(scores: np.ndarray, mask: np.ndarray, curve: np.ndarray) -> np.ndarray:
    """``[N, S]``: the expected ``curve[rank]`` of each item under the ranker (``curve`` 0 from rank k on), ties
    resolved by uniformly random tie-breaking (a tied group's items share the mean over its positions)."""
    s = np.where(mask, scores, -np.inf)
    n, width = s.shape
    cum = np.concatenate([[0.0], np.cumsum(np.pad(curve, (0, max(0, width - len(curve))))[:width])])
    out = np.zeros((n, width))
    for lo in range(0, n, 512):
        blk, m = s[lo:lo + 512], mask[lo:lo + 512]
        real = m[:, None, :]
        before = ((blk[:, None, :] > blk[:, :, None]) & real).sum(axis=2)  # [b, S] real items scored higher
        tied = ((blk[:, None, :] == blk[:, :, None]) & real).sum(axis=2)
        tied = np.maximum(tied, 1)
        out[lo:lo + 512] = (cum[np.minimum(before + tied, width)] - cum[np.minimum(before, width)]) / tied
    return np.where(mask, out, 0.0)


@dataclass
class ClickStatistics:
    """Per held-out list ``[N]``: what the click metrics average (NaN: not defined for that list)."""

    click_mrr: np.ndarray
    click_ndcg: np.ndarray
    ips: np.ndarray  # sum over clicks of p[new rank] * w   (w = min(1 / p[logged position], clip))
    weight: np.ndarray  # sum over clicks of w
    clicks: np.ndarray  # number of clicks


def click_statistics(
    scores: np.ndarray, clicks: np.ndarray, purchases: np.ndarray, positions: np.ndarray, mask: np.ndarray,
    propensities: np.ndarray, k: int = 10, clip: float = 20.0,
) -> ClickStatistics:
    """The per-list statistics of the click metrics (module docstring) for scores ``[N, S]``.

    Parameters
    ----------
    scores, clicks, purchases : arrays [N, S]
        The ranker's scores (higher first) and the logged clicks/purchases, in display order.
    positions : int array [N, S]
        0-based display positions; positions beyond ``propensities`` use its last value.
    mask : bool array [N, S]
        True for real items.
    propensities : array [P]
        Examination probability by display position (``p[0]`` normally 1).
    """
    if clip <= 0:
        raise ValueError(f"clip must be > 0, got {clip}")
    mask = np.asarray(mask, bool)
    clk = np.where(mask, np.asarray(clicks, np.float64) > 0, False)
    labels = np.where(mask, click_labels(clicks, purchases), 0.0)
    s = np.where(mask, np.asarray(scores, np.float64), -1e9)
    p = np.asarray(propensities, np.float64)
    pos = np.clip(np.asarray(positions, np.int64), 0, len(p) - 1)
    w = np.minimum(1.0 / np.maximum(p[pos], 1e-12), clip)
    curve = p.copy() if len(p) >= s.shape[1] else np.r_[p, np.full(s.shape[1] - len(p), p[-1])]
    curve[k:] = 0.0
    exam = _top_k_examination(s, mask, curve)
    return ClickStatistics(
        click_mrr=mrr(s, labels, mask, threshold=CLICK_LABEL),
        click_ndcg=ndcg_at_k(s, labels, mask, k=k, gain="linear"),
        ips=(clk * w * exam).sum(axis=1),
        weight=(clk * w).sum(axis=1),
        clicks=clk.sum(axis=1).astype(np.float64),
    )


def _estimates(st: ClickStatistics, idx: np.ndarray | None = None) -> dict[str, np.ndarray | float]:
    """The four click metrics from per-list statistics, on resamples ``idx`` [B, N] (or the lists as they are)."""

    def take(v: np.ndarray) -> np.ndarray:
        return v[None, :] if idx is None else v[idx]

    def nanmean(v: np.ndarray) -> np.ndarray:
        x = take(v)
        ok = ~np.isnan(x)
        cnt = ok.sum(axis=1)
        tot = np.where(ok, x, 0.0).sum(axis=1)
        return np.where(cnt > 0, tot / np.maximum(cnt, 1), np.nan)

    ips = take(st.ips)
    weight, clicks = take(st.weight).sum(axis=1), take(st.clicks).sum(axis=1)
    n = ips.shape[1]
    ips_sum = ips.sum(axis=1)
    return {
        CLICK_MRR: nanmean(st.click_mrr),
        CLICK_NDCG10: nanmean(st.click_ndcg),
        IPS_CLICKS10: ips_sum / max(n, 1),
        SNIPS_CLICKS10: np.where(weight > 0, ips_sum / np.maximum(weight, 1e-300) * clicks / max(n, 1), np.nan),
    }


@dataclass(frozen=True)
class Bootstrap:
    """Paired percentile bootstrap over held-out lists: ``resamples`` draws of ``n`` list indices."""

    resamples: int = 1000
    level: float = 0.95
    seed: int = 0

    def indices(self, n: int) -> np.ndarray:
        return np.random.default_rng(self.seed).integers(0, n, size=(self.resamples, n)) if n else np.zeros((0, 0), int)

    def interval(self, values: np.ndarray) -> list[float]:
        v = np.asarray(values, np.float64)
        v = v[np.isfinite(v)]
        if not len(v):
            return [float("nan"), float("nan")]
        a = (1.0 - self.level) / 2.0
        return [float(np.quantile(v, a)), float(np.quantile(v, 1.0 - a))]

    def per_list_interval(self, per_list: np.ndarray, idx: np.ndarray) -> list[float]:
        """Interval of the NaN-mean of a per-list metric (e.g. graded NDCG@10) over the resamples ``idx``."""
        x = np.asarray(per_list, np.float64)[idx]
        ok = ~np.isnan(x)
        cnt = ok.sum(axis=1)
        means = np.where(cnt > 0, np.where(ok, x, 0.0).sum(axis=1) / np.maximum(cnt, 1), np.nan)
        return self.interval(means)


def click_metrics(
    st: ClickStatistics, boot: Bootstrap | None = None, idx: np.ndarray | None = None,
) -> tuple[dict[str, float], dict[str, list[float]]]:
    """The click metrics of one ranker and their bootstrap intervals (``idx``: shared resamples, or drawn)."""
    point = {k: float(np.asarray(v).ravel()[0]) for k, v in _estimates(st).items()}
    if boot is None:
        return point, {}
    idx = boot.indices(len(st.ips)) if idx is None else idx
    return point, {k: boot.interval(np.asarray(v)) for k, v in _estimates(st, idx).items()}


def counts(st: ClickStatistics) -> dict[str, Any]:
    """How many held-out lists each click metric averages over."""
    n = len(st.ips)
    return {CLICK_MRR: int((~np.isnan(st.click_mrr)).sum()), CLICK_NDCG10: int((~np.isnan(st.click_ndcg)).sum()),
            IPS_CLICKS10: n, SNIPS_CLICKS10: n}
