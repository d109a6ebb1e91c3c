"""Training and scoring loops for the head; used centrally (pooled logs) and on each device (its own logs)."""

from __future__ import annotations

import logging
from collections.abc import Callable

import numpy as np
import torch
from torch import Tensor, nn
from torch.func import functional_call

from shared_model.config import TrainConfig
from shared_model.data import ItemTable, Slates, head_inputs, iterate_batches
from shared_model.losses import get_loss, ips_weights
from shared_model.metrics import MRR, NDCG10, RECALL10, mrr, ndcg_at_k, recall_at_k

log = logging.getLogger(__name__)


def click_targets(
    batch: Slates, cfg: TrainConfig, propensities: Tensor | None
) -> tuple[Tensor, Tensor | None, Tensor | None]:
    """Labels (clicks), optional IPS weights and optional score offsets for one batch.

    With ``cfg.ips`` on, position bias is corrected in one of two ways (``cfg.debias``):

    * ``"ips"`` -- each click is weighted by ``1 / propensity(position)``, clipped at ``cfg.ips_clip``
      (Joachims et al., 2017): unbiased, but a few clicks deep in the list dominate a small log.
    * ``"offset"`` -- ``log propensity(position)`` is added to the score of each candidate during training only
      (the known-propensity form of PAL, Guo et al., 2019): under the position-based model a click's log-odds
      is ``log P(examined) + relevance``, so the head fits the relevance part and the offset explains the
      position part. No weights: no variance blow-up on small logs. At inference there is no offset.
    """
    labels = batch.clicks
    if not cfg.ips:
        return labels, None, None
    if propensities is None:
        raise ValueError("train.ips is on but no position propensities were given")
    if cfg.debias == "offset":
        return labels, None, position_offsets(batch.positions, propensities)
    return labels, ips_weights(batch.positions, propensities, clip=cfg.ips_clip), None


def position_offsets(positions: Tensor, propensities: Tensor | np.ndarray, floor: float = 1e-3) -> Tensor:
    """``log propensity(position)`` per candidate ``[B, S]`` (positions past the curve use its last value;
    propensities are floored at ``floor`` so a zero never gives ``-inf``)."""
    prop = torch.as_tensor(propensities, dtype=torch.float32, device=positions.device)
    if prop.dim() != 1 or prop.numel() == 0:
        raise ValueError(f"propensities must be a non-empty 1-D array, got shape {tuple(prop.shape)}")
    idx = positions.long().clamp(min=0, max=prop.numel() - 1)
    return torch.log(prop.clamp(min=floor))[idx]


def train_epochs(
    model: nn.Module,
    slates: Slates,
    table: ItemTable,
    cfg: TrainConfig,
    propensities: Tensor | None,
    epochs: int | None = None,
    seed: int = 0,
    proximal_mu: float = 0.0,
    global_params: list[Tensor] | None = None,
    max_steps: int | None = None,
    on_step: Callable[[int, float], None] | None = None,
) -> dict[str, float]:
    """Train ``model`` in place on click logs; returns ``{"train_loss", "num_steps"}``.

    ``proximal_mu > 0`` adds FedProx's proximal term ``mu/2 * ||w - w_global||^2``.
    """
    loss_fn = get_loss(cfg.loss)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    model.train()
    total, steps = 0.0, 0
    n_epochs = cfg.local_epochs if epochs is None else epochs
    align = aligns_images(model, cfg)
    detached = _with_detached_image_proj(model) if align else {}
    align_on_purchases = align and align_positives(slates, cfg) == "purchases"
    for epoch in range(n_epochs):
        for batch in iterate_batches(slates, cfg.batch_size, shuffle=True, seed=seed * 1000 + epoch):
            if batch.clicks.sum() == 0:
                continue
            labels, weights, offsets = click_targets(batch, cfg, propensities)
            inputs = head_inputs(batch, table)
            # with alignment on, the ranking loss does not reach the image projection (it learns from alignment only)
            scores = functional_call(model, detached, args=(), kwargs=inputs) if align else model(**inputs)  # [B, S]
            if offsets is not None:
                scores = scores + offsets
            loss = loss_fn(scores, labels, batch.valid, weights)
            if align:
                loss = loss + cfg.align_weight * model.align_loss(  # type: ignore[operator]
                    inputs["query"], inputs["item_image"], inputs["item_mask"],
                    batch.purchases if align_on_purchases else batch.clicks, batch.valid, cfg.align_temperature)
            if proximal_mu > 0 and global_params is not None:
                prox = sum(((p - g) ** 2).sum() for p, g in zip(params, global_params, strict=True))
                loss = loss + 0.5 * proximal_mu * prox
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 5.0)
            opt.step()
            total += float(loss.detach())
            steps += 1
            if on_step is not None:
                on_step(steps, float(loss.detach()))
            if max_steps is not None and steps >= max_steps:
                break
        if max_steps is not None and steps >= max_steps:
            break
    return {"train_loss": total / max(steps, 1), "num_steps": float(steps)}


def align_positives(slates: Slates, cfg: TrainConfig) -> str:
    """What the query-image alignment takes as a slate's positives when training on ``slates``: ``"purchases"``
    (``cfg.align_positives``, and the slates hold at least one purchase) or ``"clicks"``.

    A purchase is far cleaner evidence that the photo fits the query than a click: shoppers click candidates of
    the right type in the wrong colour, and buy them much less often. A log without purchases (a shop that does
    not record them, or a device that has seen none yet) falls back to clicks rather than aligning on nothing.
    """
    if cfg.align_positives == "purchases" and bool((slates.purchases > 0).any()):
        return "purchases"
    return "clicks"


def aligns_images(model: nn.Module, cfg: TrainConfig) -> bool:
    """Whether training ``model`` under ``cfg`` adds the query-image alignment term (a head that uses images and
    ``align_weight > 0``)."""
    head_cfg = getattr(model, "cfg", None)
    return cfg.align_weight > 0 and hasattr(model, "align_loss") and bool(getattr(head_cfg, "use_image", False))


def _with_detached_image_proj(model: nn.Module) -> dict[str, Tensor]:
    """The model's parameters and buffers for ``functional_call``, the image projection's detached (views: they
    follow the optimizer's in-place updates)."""
    state: dict[str, Tensor] = {**dict(model.named_parameters()), **dict(model.named_buffers())}
    for name in ("image_proj.weight", "image_proj.bias"):
        state[name] = state[name].detach()
    return state


@torch.inference_mode()
def score_slates(model: nn.Module, slates: Slates, table: ItemTable, batch_size: int = 256) -> np.ndarray:
    """Scores [N, S] for every slate (padding gets -inf)."""
    model.eval()
    out = []
    for batch in iterate_batches(slates, batch_size, shuffle=False):
        s = model(**head_inputs(batch, table))
        out.append(torch.where(batch.valid, s, torch.full_like(s, -np.inf)).numpy())
    return np.concatenate(out) if out else np.zeros((0, slates.items.shape[1]), np.float32)


@torch.inference_mode()
def validation_loss(
    model: nn.Module,
    slates: Slates,
    table: ItemTable,
    cfg: TrainConfig,
    propensities: Tensor | None,
    batch_size: int = 256,
) -> float:
    """The ranking objective training minimises, on held-out slates (eval mode): ``cfg.loss`` with the same
    debiasing (``click_targets``: offsets or IPS weights, or neither for naive clicks), without the alignment
    term. The mean over the slates with a click (``nan`` when there are none).

    Early stopping on it is the held-out likelihood of the click model the head was fitted under: every
    validation slate counts, with no importance weights to blow up its variance, which makes it far steadier
    from epoch to epoch than a click-based DCG.
    """
    loss_fn = get_loss(cfg.loss)
    model.eval()
    total, lists = 0.0, 0
    for batch in iterate_batches(slates, batch_size, shuffle=False):
        labels, weights, offsets = click_targets(batch, cfg, propensities)
        n = int(((labels * batch.valid) > 0).any(dim=1).sum())
        if n == 0:
            continue
        scores = model(**head_inputs(batch, table))
        if offsets is not None:
            scores = scores + offsets
        total += float(loss_fn(scores, labels, batch.valid, weights)) * n
        lists += n
    return total / lists if lists else float("nan")


def ranking_metrics(scores: np.ndarray, slates: Slates) -> dict[str, float]:
    """NDCG@10, MRR and Recall@10 against the true graded relevance (evaluation only)."""
    per = per_list_metrics(scores, slates)
    return {k: float(np.nanmean(v)) if np.isfinite(v).any() else float("nan") for k, v in per.items()}


PNDCG10 = "pndcg@10"  # NDCG@10 with the shopper's own gains: (2**grade - 1) * (1 + 0.5 * personal utility)
UTILITY_GAIN = 0.5  # the simulator's click model scales attractiveness by (1 + 0.5 * utility)


def per_list_metrics(scores: np.ndarray, slates: Slates) -> dict[str, np.ndarray]:
    grades = slates.grades.numpy()
    mask = slates.valid.numpy()
    scores = np.where(mask, scores, -1e9)
    personal = (np.exp2(grades) - 1.0) * np.clip(1.0 + UTILITY_GAIN * slates.utility.numpy(), 0.0, None)
    return {
        PNDCG10: ndcg_at_k(scores, personal, mask, k=10, gain="linear"),
        NDCG10: ndcg_at_k(scores, grades, mask, k=10),
        MRR: mrr(scores, grades, mask, threshold=3),  # first exact match (grade 3): grade>=1 is trivial here
        RECALL10: recall_at_k(scores, grades, mask, k=10),
    }


def ips_click_dcg(scores: np.ndarray, slates: Slates, propensities: Tensor, k: int = 10, clip: float = 20.0) -> float:
    """Counterfactual DCG@k estimated from logged clicks alone (no graded relevance).

    Each click counts ``1/propensity(display position)`` (clipped) discounted by the rank the scorer gives the
    clicked item: an unbiased estimate, under the position-based click model, of the DCG@k of relevance
    (Joachims et al., 2017). Used to select centralized models on validation sessions.
    """
    w = ips_weights(slates.positions, propensities, clip=clip).numpy()
    clicks = slates.clicks.numpy()
    valid = slates.valid.numpy()
    s = np.where(valid, scores, -np.inf)
    ranks = np.argsort(np.argsort(-s, axis=1, kind="stable"), axis=1)  # 0 = top
    disc = np.where(ranks < k, 1.0 / np.log2(ranks + 2.0), 0.0)
    return float((clicks * w * disc * valid).sum() / max(len(slates), 1))


def evaluate_model(model: nn.Module, slates: Slates, table: ItemTable) -> dict[str, float]:
    return ranking_metrics(score_slates(model, slates, table), slates)
