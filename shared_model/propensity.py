"""Position-bias (examination) propensities from result-randomised click logs (NumPy).

Under the position-based click model ``P(click | item, position k) = exam(k) * attract(item)``. On sessions
whose slate was shown in a uniformly *random* order, attractiveness is independent of the position, so the
click-through rate at display position ``k`` is ``ctr(k) = exam(k) * E[attract]``: CTR ratios give
``exam(k) / exam(0)``. Only such randomised sessions may be passed here (``SessionLog.randomized``).

Positions are 0-based display positions. Propensities are returned normalised so that ``p[0] = 1``,
monotone non-increasing and strictly positive; use them with ``shared_model.losses.ips_weights``.

Federated use: each client sends only :func:`aggregate_position_counts` (two length-``P`` count vectors);
the server sums them and calls :func:`propensities_from_counts`. The result equals the estimate on the pooled
log. Counts may be non-integer or noisy (e.g. differential-privacy noise): negatives are clipped to 0 and
clicks to at most the impressions.
"""

from __future__ import annotations

import warnings
from typing import Any

import numpy as np

__all__ = [
    "SMOOTHINGS",
    "aggregate_position_counts",
    "empirical_propensities",
    "estimate_propensities",
    "fit_power_law",
    "power_law_propensities",
    "propensities_from_counts",
]

SMOOTHINGS = ("powerlaw", "empirical")


def aggregate_position_counts(
    positions: Any, clicks: Any, max_positions: int = 50
) -> tuple[np.ndarray, np.ndarray]:
    """Per-position impression and click counts of a (randomised) click log.

    Parameters
    ----------
    positions : int array [M]
        0-based display position of each impression. Impressions at positions ``>= max_positions`` are
        dropped (the estimators extrapolate the last positions instead).
    clicks : array [M]
        Number of clicks of each impression (normally 0/1); non-negative integers.
    max_positions : int
        ``P``, the number of positions counted.

    Returns
    -------
    impressions, clicks : np.ndarray [P] of int64
    """
    if max_positions < 1:
        raise ValueError(f"max_positions must be >= 1, got {max_positions}")
    pos = np.asarray(positions).ravel()
    clk = np.asarray(clicks).ravel()
    if pos.shape != clk.shape:
        raise ValueError(f"positions {pos.shape} and clicks {clk.shape} must have the same length")
    if pos.size == 0:
        return np.zeros(max_positions, dtype=np.int64), np.zeros(max_positions, dtype=np.int64)
    if not np.issubdtype(pos.dtype, np.integer):
        if not np.all(np.isfinite(pos)) or np.any(pos != np.round(pos)):
            raise ValueError("positions must be integers")
        pos = pos.astype(np.int64)
    if pos.min() < 0:
        raise ValueError("positions must be >= 0 (0-based display positions)")
    clk = clk.astype(np.float64)
    if np.any(clk < 0) or np.any(clk != np.round(clk)):
        raise ValueError("clicks must be non-negative integers")
    keep = pos < max_positions
    impressions = np.bincount(pos[keep], minlength=max_positions).astype(np.int64)
    n_clicks = np.rint(np.bincount(pos[keep], weights=clk[keep], minlength=max_positions)).astype(np.int64)
    return impressions, n_clicks


def _clean_counts(impressions: Any, clicks: Any) -> tuple[np.ndarray, np.ndarray]:
    n = np.asarray(impressions, dtype=np.float64).ravel()
    c = np.asarray(clicks, dtype=np.float64).ravel()
    if n.shape != c.shape or n.size == 0:
        raise ValueError(
            f"impressions {n.shape} and clicks {c.shape} must be non-empty and of the same length"
        )
    if not (np.all(np.isfinite(n)) and np.all(np.isfinite(c))):
        raise ValueError("counts must be finite")
    n = np.maximum(n, 0.0)
    c = np.clip(c, 0.0, n)
    return n, c


def power_law_propensities(eta: float, max_positions: int) -> np.ndarray:
    """``p[k] = (k + 1) ** -eta`` for ``k = 0 .. max_positions - 1`` (so ``p[0] = 1``)."""
    return (np.arange(max_positions, dtype=np.float64) + 1.0) ** -float(eta)


def fit_power_law(impressions: Any, clicks: Any) -> tuple[float, np.ndarray]:
    """Fit ``log ctr(k) = a - eta * log(k + 1)`` by weighted least squares (weights = impressions).

    The CTR of each position is smoothed as ``(clicks + 0.5) / (impressions + 1)`` so that positions without
    clicks have a finite log; positions without impressions are left out of the fit. ``eta`` is clipped at 0
    (propensities never increase with the position).

    Parameters
    ----------
    impressions, clicks : arrays [P]
        Per-position counts (see :func:`aggregate_position_counts`), possibly summed over clients.

    Returns
    -------
    eta : float
        Fitted exponent (>= 0).
    propensities : np.ndarray [P]
        ``(k + 1) ** -eta``: ``p[0] = 1``, non-increasing, strictly positive, extrapolated to positions
        without data. With no click at all or fewer than two observed positions, a RuntimeWarning is issued
        and ``(0.0, ones)`` returned (no evidence of position bias).
    """
    n, c = _clean_counts(impressions, clicks)
    p = n.size
    observed = n > 0
    if observed.sum() < 2 or c.sum() <= 0:
        warnings.warn(
            "not enough randomised clicks to fit position propensities; using uniform propensities",
            RuntimeWarning,
            stacklevel=2,
        )
        return 0.0, np.ones(p)
    x = np.log(np.arange(p, dtype=np.float64) + 1.0)[observed]
    y = np.log((c[observed] + 0.5) / (n[observed] + 1.0))
    w = n[observed]
    xm = np.average(x, weights=w)
    ym = np.average(y, weights=w)
    slope = np.sum(w * (x - xm) * (y - ym)) / np.sum(w * (x - xm) ** 2)
    eta = max(0.0, float(-slope))
    return eta, power_law_propensities(eta, p)


def empirical_propensities(impressions: Any, clicks: Any, pseudo_impressions: float = 10.0) -> np.ndarray:
    """Raw CTR ratios with additive smoothing, made monotone by a running minimum.

    ``ctr(k) = (clicks_k + pseudo_impressions * ctr_all) / (impressions_k + pseudo_impressions)`` (shrunk
    towards the pooled CTR, so positions without data get the pooled CTR), ``p(k) = ctr(k) / ctr(0)``, then
    ``p = minimum.accumulate(p)`` (so ``p[0] = 1`` and a position never gets more attention than an earlier one).

    Parameters
    ----------
    impressions, clicks : arrays [P]
        Per-position counts.
    pseudo_impressions : float
        Strength of the shrinkage (> 0).

    Returns
    -------
    np.ndarray [P]
        Strictly positive, non-increasing, ``p[0] = 1``; all ones (with a RuntimeWarning) without any click.
    """
    if pseudo_impressions <= 0:
        raise ValueError(f"pseudo_impressions must be > 0, got {pseudo_impressions}")
    n, c = _clean_counts(impressions, clicks)
    if c.sum() <= 0:
        warnings.warn(
            "no randomised clicks to estimate position propensities; using uniform propensities",
            RuntimeWarning,
            stacklevel=2,
        )
        return np.ones(n.size)
    pooled = c.sum() / n.sum()
    ctr = (c + pseudo_impressions * pooled) / (n + pseudo_impressions)
    return np.minimum.accumulate(ctr / ctr[0])


def propensities_from_counts(
    impressions: Any, clicks: Any, smoothing: str = "powerlaw", pseudo_impressions: float = 10.0
) -> np.ndarray:
    """Propensities ``[P]`` from per-position counts: :func:`fit_power_law` or :func:`empirical_propensities`.

    Parameters
    ----------
    impressions, clicks : arrays [P]
        Per-position counts (summed over clients in federated use).
    smoothing : {"powerlaw", "empirical"}
    pseudo_impressions : float
        Only for ``"empirical"``.
    """
    if smoothing == "powerlaw":
        return fit_power_law(impressions, clicks)[1]
    if smoothing == "empirical":
        return empirical_propensities(impressions, clicks, pseudo_impressions=pseudo_impressions)
    raise ValueError(f"smoothing must be one of {SMOOTHINGS}, got {smoothing!r}")


def estimate_propensities(
    positions: Any, clicks: Any, max_positions: int = 50, smoothing: str = "powerlaw"
) -> np.ndarray:
    """Examination propensities ``[max_positions]`` from the impressions of randomised sessions.

    Parameters
    ----------
    positions : int array [M]
        0-based display positions of the impressions (randomised sessions only).
    clicks : array [M]
        Clicks (0/1) of the impressions.
    max_positions : int
        Length of the result; impressions at later positions are ignored.
    smoothing : {"powerlaw", "empirical"}
        See :func:`fit_power_law` (use it directly to also get ``eta``) and :func:`empirical_propensities`.

    Returns
    -------
    np.ndarray [max_positions]
        ``p[0] = 1``, monotone non-increasing, strictly positive.
    """
    if smoothing not in SMOOTHINGS:
        raise ValueError(f"smoothing must be one of {SMOOTHINGS}, got {smoothing!r}")
    impressions, n_clicks = aggregate_position_counts(positions, clicks, max_positions)
    return propensities_from_counts(impressions, n_clicks, smoothing=smoothing)
