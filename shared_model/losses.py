"""Learning-to-rank losses for slates of products, with inverse-propensity (IPS) weighting for clicks.

Every loss has the same signature (allRank style)::

    loss(scores, labels, mask, weights=None, **hyperparameters) -> scalar Tensor

* ``scores``  -- float ``[B, S]``: model scores, higher = ranked higher.
* ``labels``  -- float ``[B, S]``: graded relevance (0, 1, 2, ...) or clicks (0/1). Must be >= 0 on real items.
* ``mask``    -- bool ``[B, S]``: True = real item, False = padding.
* ``weights`` -- float ``[B, S]`` or None: per-item inverse-propensity weights (see :func:`ips_weights`).
  Each *positive* (clicked / preferred) item's contribution is multiplied by its own weight; pairwise losses
  weight a pair ``(i, j)`` with ``labels_i > labels_j`` by ``weights_i`` (unbiased RankNet / IPS-LambdaMART
  practice). ``None`` means all ones.

Reduction: each loss computes one value per list and returns the mean over the lists that carry a signal
(at least one positive label for the listwise losses, at least one valid pair for the pairwise ones).
When no list carries a signal the result is ``0`` and still connected to ``scores`` (gradients are zeros),
so ``loss.backward()`` never fails.

Padding never reaches the arithmetic: padded scores, labels and weights are replaced by zeros before anything
is computed, so junk values there (even ``inf``/``nan``) change neither the value nor the gradients, and the
gradient w.r.t. a padded score is exactly zero. Half-precision scores are computed in float32.

IPS weights are *not* self-normalised by the losses: a list whose clicks carry weight 5 contributes 5 times
more, which is what makes the estimator unbiased. Loss magnitudes (and hence a good learning rate) therefore
grow with the typical weight; clip the weights (:func:`ips_weights` does) or rescale them per batch if needed.
"""

from __future__ import annotations

import functools
import inspect
import math
from collections.abc import Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "LOSSES",
    "approx_ndcg",
    "get_loss",
    "ips_weights",
    "lambdaloss",
    "listnet",
    "ranknet",
    "softmax_ce",
]

_LN2 = math.log(2.0)


# ----------------------------------------------------------------------------------------------- helpers
def _prepare(
    scores: Tensor, labels: Tensor, mask: Tensor, weights: Tensor | None
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Validate shapes and zero out padding.

    Returns
    -------
    s, y, w : Tensor [B, S]
        Scores, labels and weights with zeros at padded positions (``w`` is ones when ``weights`` is None).
    mask : BoolTensor [B, S]
    """
    if scores.dim() != 2:
        raise ValueError(f"scores must be [B, S], got shape {tuple(scores.shape)}")
    if labels.shape != scores.shape or mask.shape != scores.shape:
        raise ValueError(
            f"scores {tuple(scores.shape)}, labels {tuple(labels.shape)} and mask {tuple(mask.shape)} "
            "must have the same shape"
        )
    if weights is not None and weights.shape != scores.shape:
        raise ValueError(
            f"weights {tuple(weights.shape)} must have the shape of scores {tuple(scores.shape)}"
        )
    dtype = scores.dtype if scores.dtype in (torch.float32, torch.float64) else torch.float32
    mask = mask.to(device=scores.device, dtype=torch.bool)
    s = torch.where(mask, scores.to(dtype), 0.0)
    y = torch.where(mask, labels.to(device=scores.device, dtype=dtype), 0.0)
    if weights is None:
        w = mask.to(dtype)
    else:
        w = torch.where(mask, weights.to(device=scores.device, dtype=dtype), 0.0)
    return s, y, w, mask


def _reduce(row_loss: Tensor, include: Tensor) -> Tensor:
    """Mean of ``row_loss[B]`` over the rows where ``include[B]``; 0 (with grad) when there are none.

    ``row_loss`` must be finite everywhere (also on excluded rows) so that the zero gradients routed to the
    excluded rows stay zeros instead of ``0 * inf = nan``.
    """
    total = torch.where(include, row_loss, torch.zeros_like(row_loss)).sum()
    return total / include.sum().clamp(min=1).to(row_loss.dtype)


def _masked_log_softmax(x: Tensor, mask: Tensor) -> Tensor:
    """Log-softmax of ``x[B, S]`` over the real items of each row; 0 at padding (never -inf, never nan).

    Rows without any real item are treated as all-real (their values are finite and ignored by callers).
    """
    keep = mask | ~mask.any(dim=1, keepdim=True)
    logp = torch.log_softmax(x.masked_fill(~keep, float("-inf")), dim=1)
    return torch.where(mask, logp, 0.0)


def _gains(y: Tensor, gain: str) -> Tensor:
    """Gain of each label: ``2**y - 1`` ("exp2") or ``y`` ("linear"); clicks (0/1) give the same either way."""
    if gain == "exp2":
        return torch.expm1(y * _LN2)
    if gain == "linear":
        return y
    raise ValueError(f"gain must be 'exp2' or 'linear', got {gain!r}")


def _ideal_dcg(gains: Tensor) -> Tensor:
    """Ideal DCG ``[B]`` of non-negative ``gains[B, S]`` (padding must hold 0), discount ``1/log2(1 + rank)``."""
    sorted_gains = gains.sort(dim=1, descending=True).values
    ranks = torch.arange(gains.shape[1], device=gains.device, dtype=gains.dtype)
    return (sorted_gains / torch.log2(ranks + 2.0)).sum(dim=1)


def _pair_mask(y: Tensor, mask: Tensor) -> Tensor:
    """BoolTensor ``[B, S, S]``: ``(i, j)`` is a pair when both items are real and ``y_i > y_j``."""
    return mask[:, :, None] & mask[:, None, :] & (y[:, :, None] > y[:, None, :])


# ----------------------------------------------------------------------------------------------- losses
def softmax_ce(scores: Tensor, labels: Tensor, mask: Tensor, weights: Tensor | None = None) -> Tensor:
    """Listwise softmax cross-entropy (a.k.a. "softmax" loss, ListMLE's top-1 cousin).

    Per list::

        loss = -sum_i w_i * y_i * log softmax(s)_i  /  sum_i y_i

    with the softmax over the real items only. The normaliser is the *unweighted* label mass, so without
    weights the target is the label distribution ``y / sum(y)``; with IPS weights a list with a single click of
    weight ``w`` contributes ``w * -log p_clicked`` (the weight is not cancelled by self-normalisation).

    Parameters
    ----------
    scores : Tensor [B, S]
    labels : Tensor [B, S]
        Graded relevance or clicks, >= 0.
    mask : BoolTensor [B, S]
        True for real items.
    weights : Tensor [B, S] or None
        Per-item IPS weights; only items with a positive label use theirs.

    Returns
    -------
    Tensor []
        Mean over lists with at least one positive label (0 if there are none).
    """
    s, y, w, mask = _prepare(scores, labels, mask, weights)
    logp = _masked_log_softmax(s, mask)
    include = (y > 0).any(dim=1)
    norm = torch.where(include, y.sum(dim=1), 1.0)
    row = -(w * y * logp).sum(dim=1) / norm
    return _reduce(row, include)


def listnet(scores: Tensor, labels: Tensor, mask: Tensor, weights: Tensor | None = None) -> Tensor:
    """Top-1 ListNet: cross-entropy between ``softmax(labels)`` and ``softmax(scores)``.

    Per list::

        loss = -sum_i v_i * softmax(y)_i * log softmax(s)_i,   v_i = w_i if y_i > 0 else 1

    with both softmaxes over the real items only (labels are used as scores of the target distribution, as in
    Cao et al. 2007 and allRank's ``listNet``). IPS weights multiply the contributions of positive items only.

    Parameters
    ----------
    scores : Tensor [B, S]
    labels : Tensor [B, S]
        Graded relevance or clicks, >= 0.
    mask : BoolTensor [B, S]
        True for real items.
    weights : Tensor [B, S] or None
        Per-item IPS weights.

    Returns
    -------
    Tensor []
        Mean over lists with at least one positive label (0 if there are none).
    """
    s, y, w, mask = _prepare(scores, labels, mask, weights)
    logp = _masked_log_softmax(s, mask)
    target = torch.where(mask, _masked_log_softmax(y, mask).exp(), 0.0)
    v = torch.where(y > 0, w, 1.0)
    row = -(v * target * logp).sum(dim=1)
    return _reduce(row, (y > 0).any(dim=1))


def approx_ndcg(
    scores: Tensor,
    labels: Tensor,
    mask: Tensor,
    weights: Tensor | None = None,
    alpha: float = 1.0,
    gain: str = "exp2",
) -> Tensor:
    """ApproxNDCG (Qin, Liu & Li 2010; allRank ``approxNDCGLoss``): ``1 - NDCG`` with smoothed ranks.

    The rank of item ``i`` is replaced by ``pi_i = 1 + sum_{j != i} sigmoid(-alpha * (s_i - s_j))`` over real
    items ``j``; per list::

        loss = 1 - sum_i w_i * G_i / log2(1 + pi_i)  /  IDCG,   G_i = 2**y_i - 1 (gain="exp2") or y_i

    ``IDCG`` is the ideal DCG of the *unweighted* labels, so without weights the loss lies in ``[0, 1)`` and
    ``1 - loss`` tends to the exact NDCG (no cutoff) as ``alpha`` grows; with IPS weights it is an unbiased
    estimate of the same quantity and may be negative.

    Parameters
    ----------
    scores : Tensor [B, S]
    labels : Tensor [B, S]
        Graded relevance or clicks, >= 0.
    mask : BoolTensor [B, S]
        True for real items.
    weights : Tensor [B, S] or None
        Per-item IPS weights (only positive-gain items contribute, each times its weight).
    alpha : float
        Sharpness of the rank approximation (an inverse temperature, as in allRank): larger = closer to the
        true rank, but less smooth.
    gain : {"exp2", "linear"}

    Returns
    -------
    Tensor []
        Mean over lists with at least one positive label (0 if there are none).
    """
    s, y, w, mask = _prepare(scores, labels, mask, weights)
    gains = _gains(y, gain)
    pair_valid = mask[:, :, None] & mask[:, None, :]
    pair_valid = pair_valid & ~torch.eye(s.shape[1], dtype=torch.bool, device=s.device)
    above = torch.sigmoid(-alpha * (s[:, :, None] - s[:, None, :]))  # [B, i, j]: P(j ranked above i)
    approx_rank = 1.0 + torch.where(pair_valid, above, 0.0).sum(dim=2)
    dcg = (w * gains / torch.log2(1.0 + approx_rank)).sum(dim=1)
    idcg = _ideal_dcg(gains)
    include = idcg > 0
    row = 1.0 - dcg / torch.where(include, idcg, 1.0)
    return _reduce(row, include)


def lambdaloss(
    scores: Tensor,
    labels: Tensor,
    mask: Tensor,
    weights: Tensor | None = None,
    sigma: float = 1.0,
    mu: float = 10.0,
    gain: str = "exp2",
) -> Tensor:
    """LambdaLoss, NDCG-Loss2++ weighting scheme (Wang et al. 2018, CIKM; allRank ``lambdaLoss`` with
    ``weighing_scheme="ndcgLoss2PP_scheme"``, no cutoff, binary log).

    With ``r_i`` the (1-based) rank of item ``i`` under the current scores (ties broken by position, stable),
    ``D_r = log2(1 + r)`` and ``G_i = (2**y_i - 1) / IDCG``, each pair ``y_i > y_j`` of real items costs::

        -w_i * (rho_ij + mu * delta_ij) * |G_i - G_j| * log2 sigmoid(sigma * (s_i - s_j))
        rho_ij   = |1/D_{r_i} - 1/D_{r_j}|                      (the LambdaRank |delta NDCG| factor)
        delta_ij = |1/D_{|r_i - r_j|} - 1/D_{|r_i - r_j| + 1}|  (the NDCG-Loss2 factor)

    The pair weights are constants (computed without gradient). The per-list loss is the *sum* over pairs
    (already scaled by ``1/IDCG``). ``mu=0`` gives the LambdaRank-weighted pairwise loss.

    Parameters
    ----------
    scores : Tensor [B, S]
    labels : Tensor [B, S]
        Graded relevance or clicks, >= 0.
    mask : BoolTensor [B, S]
        True for real items.
    weights : Tensor [B, S] or None
        Per-item IPS weights; a pair is weighted by the weight of its preferred item ``i``.
    sigma : float
        Slope of the pairwise logistic.
    mu : float
        Weight of the NDCG-Loss2 term (paper and allRank default: 10).
    gain : {"exp2", "linear"}

    Returns
    -------
    Tensor []
        Mean over lists with at least one valid pair (0 if there are none).
    """
    s, y, w, mask = _prepare(scores, labels, mask, weights)
    pairs = _pair_mask(y, mask)
    with torch.no_grad():
        n = s.shape[1]
        ranked = s.detach().masked_fill(~mask, float("-inf"))
        order = torch.sort(ranked, dim=1, descending=True, stable=True).indices
        ranks = torch.empty_like(order)
        ranks.scatter_(1, order, torch.arange(n, device=s.device).expand_as(order))
        r = ranks.to(s.dtype) + 1.0  # 1-based rank
        inv_d = 1.0 / torch.log2(1.0 + r)
        gains = _gains(y, gain)
        idcg = _ideal_dcg(gains)
        g = gains / torch.where(idcg > 0, idcg, 1.0)[:, None]
        gdiff = (g[:, :, None] - g[:, None, :]).abs()
        rho = (inv_d[:, :, None] - inv_d[:, None, :]).abs()
        dr = (r[:, :, None] - r[:, None, :]).abs().clamp(min=1.0)  # diagonal is never a pair
        delta = (1.0 / torch.log2(1.0 + dr) - 1.0 / torch.log2(2.0 + dr)).abs()
        pair_w = (rho + mu * delta) * gdiff
    pair_w = pair_w * w[:, :, None]
    nll = -F.logsigmoid(sigma * (s[:, :, None] - s[:, None, :])) / _LN2
    row = torch.where(pairs, pair_w * nll, 0.0).sum(dim=(1, 2))
    return _reduce(row, pairs.any(dim=2).any(dim=1))


def ranknet(
    scores: Tensor,
    labels: Tensor,
    mask: Tensor,
    weights: Tensor | None = None,
    sigma: float = 1.0,
) -> Tensor:
    """RankNet: pairwise logistic loss over the pairs of real items with ``y_i > y_j``.

    Per list::

        loss = sum_{(i, j): y_i > y_j} w_i * log(1 + exp(-sigma * (s_i - s_j)))  /  #pairs

    (mean over the list's pairs, so every list counts equally; the pair count is unweighted).

    Parameters
    ----------
    scores : Tensor [B, S]
    labels : Tensor [B, S]
        Graded relevance or clicks, >= 0.
    mask : BoolTensor [B, S]
        True for real items.
    weights : Tensor [B, S] or None
        Per-item IPS weights; a pair is weighted by the weight of its preferred item ``i``.
    sigma : float
        Slope of the logistic.

    Returns
    -------
    Tensor []
        Mean over lists with at least one valid pair (0 if there are none).
    """
    s, y, w, mask = _prepare(scores, labels, mask, weights)
    pairs = _pair_mask(y, mask)
    nll = F.softplus(-sigma * (s[:, :, None] - s[:, None, :])) * w[:, :, None]
    n_pairs = pairs.sum(dim=(1, 2))
    row = torch.where(pairs, nll, 0.0).sum(dim=(1, 2)) / n_pairs.clamp(min=1).to(s.dtype)
    return _reduce(row, n_pairs > 0)


# ----------------------------------------------------------------------------------------------- registry
LossFn = Callable[..., Tensor]

LOSSES: dict[str, LossFn] = {
    "softmax_ce": softmax_ce,
    "softmax": softmax_ce,  # alias: the run-config default ("train.loss" = "softmax")
    "listnet": listnet,
    "approx_ndcg": approx_ndcg,
    "lambdaloss": lambdaloss,
    "ranknet": ranknet,
}


def get_loss(name: str, **params: float | str) -> LossFn:
    """The loss registered under ``name``, optionally with hyperparameters bound.

    Names are case-insensitive and ``-`` equals ``_`` (``"approx-ndcg"`` works).

    Parameters
    ----------
    name : str
        One of ``LOSSES``.
    **params
        Keyword hyperparameters of that loss (e.g. ``alpha=10`` for approx_ndcg); bound with
        :func:`functools.partial`.

    Raises
    ------
    ValueError
        Unknown name (the message lists the valid ones) or a hyperparameter the loss does not take.
    """
    key = name.strip().lower().replace("-", "_")
    if key not in LOSSES:
        raise ValueError(f"unknown loss {name!r}; valid names: {', '.join(sorted(LOSSES))}")
    fn = LOSSES[key]
    if not params:
        return fn
    accepted = set(inspect.signature(fn).parameters) - {"scores", "labels", "mask", "weights"}
    unknown = sorted(set(params) - accepted)
    if unknown:
        raise ValueError(f"loss {key!r} takes no parameter(s) {unknown}; it accepts {sorted(accepted)}")
    return functools.partial(fn, **params)


# ----------------------------------------------------------------------------------------------- IPS
def ips_weights(positions: Tensor, propensities: Tensor | np.ndarray, clip: float = 20.0) -> Tensor:
    """Inverse-propensity weights ``min(1 / propensities[position], clip)``.

    Parameters
    ----------
    positions : LongTensor [B, S]
        0-based display positions. Positions ``>= P`` use the last propensity; negative ones (padding) are
        mapped to position 0 (their weight is ignored by the losses anyway).
    propensities : Tensor or ndarray [P]
        Examination probabilities, ``propensities[0]`` normally 1 (see ``shared_model.propensity``).
    clip : float
        Upper bound on the weights (``math.inf`` disables clipping). Zero propensities give ``clip``.

    Returns
    -------
    Tensor [B, S]
        Float32 weights (float64 if ``propensities`` is a float64 tensor), on ``positions``' device.
    """
    if clip <= 0:
        raise ValueError(f"clip must be > 0, got {clip}")
    if isinstance(propensities, Tensor) and propensities.dtype == torch.float64:
        dtype = torch.float64
    else:
        dtype = torch.float32
    prop = torch.as_tensor(propensities, dtype=dtype, device=positions.device)
    if prop.dim() != 1 or prop.numel() == 0:
        raise ValueError(f"propensities must be a non-empty 1-D array, got shape {tuple(prop.shape)}")
    idx = positions.long().clamp(min=0, max=prop.numel() - 1)
    return (1.0 / prop[idx]).clamp(max=clip)
