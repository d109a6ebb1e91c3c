"""Position-bias (examination) propensities from click logs (NumPy): randomised sessions, or harvested.

Under the position-based click model ``P(click | item, position k) = exam(k) * attract(item)``. On sessions
whose slate was shown in a uniformly *random* order, attractiveness is independent of the position, so the
click-through rate at display position ``k`` is ``ctr(k) = exam(k) * E[attract]``: CTR ratios give
``exam(k) / exam(0)``. Only such randomised sessions may be passed to :func:`estimate_propensities` and
:func:`aggregate_position_counts` (``SessionLog.randomized``).

Logs that never randomized: intervention harvesting (:func:`harvest_counts`, :func:`allpairs_curve`,
:func:`harvest_propensities`) uses the same item shown for the same query at different positions, which real
logs get from ranker updates, personalization and A/B tests, as natural interventions (AllPairs, Agarwal et al.,
WSDM 2019, "Estimating position bias without intrusive interventions"). It assumes that where an item lands does
not depend on how attractive it is to that session's shopper beyond what the query says.

Positions are 0-based display positions. Propensities are returned normalised so that ``p[0] = 1``,
monotone non-increasing and strictly positive; use them with ``shared_model.losses.ips_weights``.

Federated use: each client sends only :func:`aggregate_position_counts` (two length-``P`` count vectors);
the server sums them and calls :func:`propensities_from_counts`. The result equals the estimate on the pooled
log. (Harvested ``[P, P]`` statistics also add up over shards, but only interventions within one shard are
found: a pooled log finds more.) Counts may be non-integer or noisy (e.g. differential-privacy noise): negatives are clipped to 0 and
clicks to at most the impressions.
"""

from __future__ import annotations

import warnings
from typing import Any

import numpy as np

__all__ = [
    "SMOOTHINGS",
    "aggregate_position_counts",
    "allpairs_curve",
    "empirical_propensities",
    "estimate_propensities",
    "fit_power_law",
    "harvest_counts",
    "harvest_propensities",
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


# ------------------------------------------------------------------------------------ intervention harvesting
# AllPairs pools, for every pair of positions (k, k'), the (query, item) groups seen at both: under the
# position-based model E[ctr_k(q, d)] = p_k * rel(q, d), so
#
#     c[k, k'] = sum_{(q, d) seen at k and k'} w * ctr_k(q, d)      n[k, k'] = sum w      (w symmetric in k, k')
#
# has E[c[k, k']] = p_k * r[k, k'] * n[k, k'] with r[k, k'] = r[k', k] (the weighted mean relevance of the
# intervention set). The extremum estimator maximizes sum_{k != k'} c log(p_k r) + (n - c) log(1 - p_k r) over
# p and the symmetric r; only the ratios p_k / p_0 are identified.


def harvest_counts(
    groups: Any, positions: Any, clicks: Any, max_positions: int = 50
) -> tuple[np.ndarray, np.ndarray]:
    """Intervention-harvesting statistics of a click log: ``c, n`` of shape ``[P, P]``.

    Parameters
    ----------
    groups : int array [M]
        A key per impression for "the same item for the same query", e.g. ``query_id * num_items + item``.
    positions : int array [M]
        0-based display positions; impressions at positions ``>= max_positions`` are dropped.
    clicks : array [M]
        Clicks (0/1) of the impressions.
    max_positions : int
        ``P``.

    Returns
    -------
    c, n : np.ndarray [P, P] of float64
        ``n[k, k']``: summed weight of the groups shown at both ``k`` and ``k'`` (``k != k'``), with the weight
        ``w = 2 n_k n_k' / (n_k + n_k')`` (harmonic mean of the group's impressions at each position; 1 when it was
        shown once at each); ``c[k, k']``: the same sum of ``w * ctr_k``. Diagonals are 0. Sums over disjoint
        sets of groups add up, so shards of a log (e.g. devices) can send ``c, n`` and a server sum them.
    """
    pos, clk = _check_impressions(positions, clicks, max_positions)
    grp = np.asarray(groups).ravel()
    if grp.shape != pos.shape:
        raise ValueError(f"groups {grp.shape} and positions {pos.shape} must have the same length")
    c = np.zeros((max_positions, max_positions))
    n = np.zeros((max_positions, max_positions))
    keep = pos < max_positions
    if not keep.any():
        return c, n
    grp, pos, clk = grp[keep], pos[keep], clk[keep]
    _, g = np.unique(grp, return_inverse=True)
    cell, cell_inv = np.unique(g.astype(np.int64) * max_positions + pos, return_inverse=True)
    imp = np.bincount(cell_inv).astype(np.float64)  # [R] impressions of each (group, position) cell
    ctr = np.bincount(cell_inv, weights=clk) / imp  # [R]
    cg, cp = cell // max_positions, cell % max_positions  # sorted by group
    starts = np.flatnonzero(np.r_[True, cg[1:] != cg[:-1]])
    sizes = np.diff(np.r_[starts, len(cell)])
    multi = sizes > 1  # groups seen at one position only carry no intervention
    rows = np.flatnonzero(np.repeat(multi, sizes))  # the cells of those groups, still grouped
    starts, sizes = starts[multi], sizes[multi]
    if len(starts) == 0:
        return c, n
    # every ordered pair of cells within each group: sum(sizes**2) pairs
    row_size = np.repeat(sizes, sizes)
    row_start = np.repeat(starts, sizes)
    i = np.repeat(rows, row_size)
    j = np.repeat(row_start, row_size) + (np.arange(len(i)) - np.repeat(np.cumsum(row_size) - row_size, row_size))
    off = i != j
    i, j = i[off], j[off]
    w = 2.0 * imp[i] * imp[j] / (imp[i] + imp[j])
    flat = cp[i] * max_positions + cp[j]
    size = max_positions * max_positions
    n_pairs = np.bincount(flat, weights=w, minlength=size).astype(np.float64)
    c_pairs = np.bincount(flat, weights=w * ctr[i], minlength=size).astype(np.float64)
    return c_pairs.reshape(max_positions, max_positions), n_pairs.reshape(max_positions, max_positions)


def _check_impressions(positions: Any, clicks: Any, max_positions: int) -> tuple[np.ndarray, np.ndarray]:
    """Validated ``positions`` (int64) and ``clicks`` (float64) arrays ``[M]``."""
    if max_positions < 2:
        raise ValueError(f"max_positions must be >= 2, got {max_positions}")
    pos = np.asarray(positions).ravel()
    clk = np.asarray(clicks).ravel().astype(np.float64)
    if pos.shape != clk.shape:
        raise ValueError(f"positions {pos.shape} and clicks {clk.shape} must have the same length")
    if (pos.size and not np.issubdtype(pos.dtype, np.integer)
            and (not np.all(np.isfinite(pos)) or np.any(pos != np.round(pos)))):
        raise ValueError("positions must be integers")
    pos = pos.astype(np.int64)
    if pos.size and pos.min() < 0:
        raise ValueError("positions must be >= 0 (0-based display positions)")
    if np.any(clk < 0) or np.any(clk != np.round(clk)):
        raise ValueError("clicks must be non-negative integers")
    return pos, np.minimum(clk, 1.0)


def _connected_to_top(n: np.ndarray) -> np.ndarray:
    """Positions ``[P]`` (bool) linked to position 0 through pairs with data (the identified ones)."""
    linked = n > 0
    seen = np.zeros(n.shape[0], dtype=bool)
    seen[0] = True
    frontier = seen.copy()
    while frontier.any():
        new = linked[frontier].any(axis=0) & ~seen
        seen |= new
        frontier = new
    return seen


def allpairs_curve(
    c: Any, n: Any, min_weight: float = 1.0, max_iter: int = 50000, tol: float = 1e-7
) -> tuple[np.ndarray, np.ndarray]:
    """The AllPairs extremum estimate of the examination curve from :func:`harvest_counts`.

    The weighted Bernoulli likelihood ``sum_{k != k'} c log(p_k r) + (n - c) log(1 - p_k r)`` (``r`` symmetric) is
    maximized by expectation-maximization over the latent "examined" and "relevant" events of each weighted
    impression (monotone in the likelihood, stays inside ``(0, 1)`` where a pair's clicks are 0 or all), until
    the normalized curve moves by less than ``tol``.

    Parameters
    ----------
    c, n : arrays [P, P]
        Harvested statistics (possibly summed over shards).
    min_weight : float
        Position pairs with ``n[k, k'] < min_weight`` are ignored.
    max_iter : int
        EM iterations at most (a RuntimeWarning when reached).
    tol : float
        Convergence threshold on the largest change of the normalized curve.

    Returns
    -------
    curve : np.ndarray [P]
        ``p[0] = 1``; positions not linked to position 0 through pairs with data are ``nan`` (not identified).
        Not forced to be monotone.
    info : np.ndarray [P]
        Harvested weight per position (``sum_k' n[k, k']`` over the pairs used): how much each estimate rests on.
    """
    c = np.asarray(c, dtype=np.float64)
    n = np.asarray(n, dtype=np.float64)
    if c.ndim != 2 or c.shape != n.shape or c.shape[0] != c.shape[1] or c.shape[0] < 2:
        raise ValueError(f"c {c.shape} and n {n.shape} must be square [P, P] with P >= 2")
    if not (np.all(np.isfinite(c)) and np.all(np.isfinite(n))):
        raise ValueError("harvested counts must be finite")
    P = c.shape[0]
    n = np.maximum(n, 0.0)
    n = 0.5 * (n + n.T)  # symmetric by construction; tolerate noise
    np.fill_diagonal(n, 0.0)
    n[n < min_weight] = 0.0
    c = np.clip(c, 0.0, n)
    ident = _connected_to_top(n)
    curve = np.full(P, np.nan)
    curve[0] = 1.0
    info = np.zeros(P)
    pos_ids = np.flatnonzero(ident)
    if len(pos_ids) < 2:
        return curve, info
    sub_n, sub_c = n[np.ix_(pos_ids, pos_ids)], c[np.ix_(pos_ids, pos_ids)]
    a, b = np.nonzero(np.triu(sub_n > 0, 1))  # unordered pairs with data, a < b
    K = len(pos_ids)
    k = np.r_[a, b]  # both orders of every pair: observation i has position k[i] and pair i % len(a)
    pair = np.r_[np.arange(len(a)), np.arange(len(a))]
    nn = np.r_[sub_n[a, b], sub_n[a, b]]
    cc = np.r_[sub_c[a, b], sub_c[b, a]]
    n_pos = np.bincount(k, weights=nn, minlength=K)
    n_pair = np.bincount(pair, weights=nn, minlength=len(a))
    ctr = (np.bincount(k, weights=cc, minlength=K) + 0.5) / (n_pos + 1.0)
    p = np.clip(ctr / ctr.max(), 1e-3, 1 - 1e-3)  # start: pooled CTR ratios; r: the pair's CTR over them
    r = np.clip(np.bincount(pair, weights=cc, minlength=len(a)) / n_pair / np.sqrt(p[a] * p[b]), 1e-3, 1 - 1e-3)
    prev = p / p[0]
    for _ in range(max_iter):
        pk, rp = p[k], r[pair]
        miss = (nn - cc) / np.maximum(1.0 - pk * rp, 1e-12)  # non-clicks over P(no click)
        e_exam = cc + miss * pk * (1.0 - rp)  # expected examined (clicked or examined-but-irrelevant)
        e_rel = cc + miss * (1.0 - pk) * rp  # expected relevant
        p = np.clip(np.bincount(k, weights=e_exam, minlength=K) / n_pos, 1e-12, 1.0)
        r = np.clip(np.bincount(pair, weights=e_rel, minlength=len(a)) / n_pair, 1e-12, 1.0)
        cur = p / p[0]
        if np.max(np.abs(cur - prev)) < tol:
            break
        prev = cur
    else:
        warnings.warn(f"AllPairs EM did not converge in {max_iter} iterations", RuntimeWarning, stacklevel=2)
    curve[pos_ids] = p / p[0]
    info[pos_ids] = n_pos
    return curve, info


def harvest_propensities(
    c: Any, n: Any, smoothing: str = "powerlaw", min_weight: float = 1.0
) -> tuple[float, np.ndarray, np.ndarray]:
    """Propensities ``[P]`` from harvested statistics: the AllPairs curve, smoothed.

    Parameters
    ----------
    c, n : arrays [P, P]
        From :func:`harvest_counts` (summed over shards in federated use).
    smoothing : {"powerlaw", "empirical"}
        ``"powerlaw"``: ``(k + 1) ** -eta`` with ``eta`` fitted to the AllPairs curve by least squares in log-log,
        weighted by each position's harvested weight times its curve value (its expected clicks: about the
        inverse variance of the log estimate). ``"empirical"``: the AllPairs curve itself where identified
        (power law elsewhere), then a running minimum (never more attention than an earlier position).
    min_weight : float
        See :func:`allpairs_curve`.

    Returns
    -------
    eta : float
        The fitted power-law exponent (>= 0), also for ``"empirical"``.
    propensities : np.ndarray [P]
        ``p[0] = 1``, non-increasing, strictly positive.
    curve : np.ndarray [P]
        The raw AllPairs curve (``nan`` where not identified), for reports.
    """
    if smoothing not in SMOOTHINGS:
        raise ValueError(f"smoothing must be one of {SMOOTHINGS}, got {smoothing!r}")
    curve, info = allpairs_curve(c, n, min_weight=min_weight)
    P = curve.size
    ok = np.isfinite(curve) & (curve > 0) & (info > 0)
    ok[0] = False  # log p_0 = 0 by construction: no information about eta
    if not ok.any():
        warnings.warn(
            "no harvested interventions (the same item for the same query at two positions) to estimate "
            "position propensities; using uniform propensities",
            RuntimeWarning,
            stacklevel=2,
        )
        return 0.0, np.ones(P), curve
    x = np.log(np.arange(P, dtype=np.float64) + 1.0)[ok]
    y = np.log(curve[ok])
    w = info[ok] * curve[ok]  # ~ inverse variance of log(curve): a position's expected clicks
    eta = max(0.0, float(-np.sum(w * x * y) / np.sum(w * x * x)))  # through the origin: p_0 = 1
    law = power_law_propensities(eta, P)
    if smoothing == "powerlaw":
        return eta, law, curve
    filled = np.where(np.isfinite(curve) & (curve > 0), curve, law)
    filled[0] = 1.0
    return eta, np.maximum(np.minimum.accumulate(np.minimum(filled, 1.0)), 1e-6), curve
