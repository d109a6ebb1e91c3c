"""Query-image alignment (``FusedRankingHead.align_loss``, ``train.align-weight``)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from scipy.special import logsumexp

from shared_model.config import ConfigError, ModelConfig, TrainConfig
from shared_model.head import FusedRankingHead, build_head
from shared_model.head_features import IMAGE_DIM, image_gain
from shared_model.prepared import Prepared
from shared_model.training import _with_detached_image_proj, aligns_images

B, S = 3, 4


def _batch(seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    mask = torch.ones(B, S, 3)
    mask[0, 2, 1] = 0.0  # no image
    valid = torch.ones(B, S, dtype=torch.bool)
    valid[2, 3] = False  # padding
    clicks = torch.zeros(B, S)
    clicks[0, 1] = clicks[0, 2] = 1.0  # one clicked image, one clicked item without an image
    clicks[1, 0] = 1.0
    return {"query": torch.randn(B, 384, generator=g), "item_image": torch.randn(B, S, IMAGE_DIM, generator=g),
            "item_mask": mask, "clicks": clicks, "valid": valid}


def _reference(head: FusedRankingHead, b: dict[str, torch.Tensor], tau: float) -> float:
    """The same InfoNCE in numpy from the head's own projections."""
    with torch.no_grad():
        weighed = b["item_image"] * torch.from_numpy(image_gain(IMAGE_DIM))  # the colour descriptor x COLOUR_GAIN
        img = head.norm(head.image_proj(weighed) + head.modality_embed[1]).numpy().reshape(B * S, -1)
        q = head.norm(head.query_proj(b["query"])).numpy()
    img /= np.linalg.norm(img, axis=1, keepdims=True)
    q /= np.linalg.norm(q, axis=1, keepdims=True)
    has = ((b["item_mask"][..., 1] > 0) & b["valid"]).numpy().reshape(-1)
    clicked = (b["clicks"].numpy().reshape(-1) > 0) & has
    losses = []
    for r in range(B):
        logits = np.where(has, img @ q[r] / tau, -1e4)
        mine = np.zeros(B * S, bool)
        mine[r * S:(r + 1) * S] = True
        pos = mine & clicked
        if pos.any():
            losses.append(logsumexp(logits) - logits[pos].mean())
    return float(np.mean(losses))


def test_align_loss_matches_numpy() -> None:
    head = build_head(ModelConfig(), seed=0)
    b = _batch()
    for tau in (0.1, 0.5):
        got = head.align_loss(b["query"], b["item_image"], b["item_mask"], b["clicks"], b["valid"], tau)
        assert got.item() == pytest.approx(_reference(head, b, tau), rel=1e-5)


def test_align_loss_without_clicked_images_is_zero_and_connected() -> None:
    head = build_head(ModelConfig(), seed=0)
    b = _batch()
    loss = head.align_loss(b["query"], b["item_image"], b["item_mask"], torch.zeros(B, S), b["valid"])
    assert loss.item() == 0.0
    loss.backward()
    assert head.image_proj.weight.grad is not None and not head.image_proj.weight.grad.any()


def test_ranking_gradient_stops_at_the_image_projection() -> None:
    from torch.func import functional_call

    head = build_head(ModelConfig(), seed=0).eval()  # no dropout: the two calls must agree
    b = _batch()
    inputs = {"query": b["query"], "item_text": torch.randn(B, S, 384), "item_image": b["item_image"],
              "item_video": torch.randn(B, S, IMAGE_DIM), "item_mask": b["item_mask"], "dense": torch.randn(B, S, 7),
              "user_text": torch.zeros(B, 384), "user_image": torch.zeros(B, IMAGE_DIM), "user_mask": torch.zeros(B, 1)}
    scores = functional_call(head, _with_detached_image_proj(head), args=(), kwargs=inputs)
    np.testing.assert_allclose(scores.detach().numpy(), head(**inputs).detach().numpy(), rtol=1e-6)
    scores.sum().backward()
    assert head.image_proj.weight.grad is None  # nothing from the ranking side
    assert head.query_proj.weight.grad is not None and head.query_proj.weight.grad.abs().sum() > 0


def test_aligns_images_only_for_image_heads() -> None:
    assert aligns_images(build_head(ModelConfig()), TrainConfig())
    assert not aligns_images(build_head(ModelConfig(use_image=False, use_video=False)), TrainConfig())
    assert not aligns_images(build_head(ModelConfig()), TrainConfig(align_weight=0.0))
    assert not aligns_images(torch.nn.Linear(2, 1), TrainConfig())
    with pytest.raises(ConfigError, match="align"):
        TrainConfig(align_temperature=0.0)
    with pytest.raises(ConfigError, match="align"):
        TrainConfig(align_weight=-1.0)


def _prepared_with_purchases(tmp_path: Path, purchases: bool) -> Prepared:
    from dataclasses import replace

    from tests.synthetic import synthetic_prepared

    prep = synthetic_prepared(tmp_path)
    if purchases:  # every third click is a purchase
        log = prep.log
        clicked = np.flatnonzero(log.clicks)
        buy = np.zeros_like(log.purchases)
        buy[clicked[::3]] = 1
        prep = replace(prep, log=replace(log, purchases=buy))
    return prep


@pytest.mark.parametrize(("purchases", "setting", "expected"), [
    (True, "purchases", "purchases"), (False, "purchases", "clicks"), (True, "clicks", "clicks")])
def test_align_positives_are_purchases_when_the_log_has_them(tmp_path: Path, purchases: bool, setting: str,
                                                               expected: str) -> None:
    from shared_model.training import align_positives, train_epochs

    prep = _prepared_with_purchases(tmp_path, purchases)
    slates = prep.slates("train")
    cfg = TrainConfig(align_positives=setting)
    assert align_positives(slates, cfg) == expected
    head = build_head(ModelConfig(), seed=0)
    seen: list[tuple[torch.Tensor, torch.Tensor]] = []
    real = head.align_loss

    def spy(query: torch.Tensor, item_image: torch.Tensor, item_mask: torch.Tensor, positives: torch.Tensor,
            valid: torch.Tensor, temperature: float = 0.1) -> torch.Tensor:
        seen.append((positives.clone(), item_mask.clone()))
        return real(query, item_image, item_mask, positives, valid, temperature)

    head.align_loss = spy  # type: ignore[method-assign,assignment]
    train_epochs(head, slates, prep.table(), cfg, prep.propensity_tensor(), epochs=1, seed=0)
    assert seen
    got = torch.cat([p.reshape(-1) for p, _ in seen])
    # the batches the spy saw, in order: compare with the same shuffled batches' purchases / clicks
    from shared_model.data import iterate_batches

    batches = [b for b in iterate_batches(slates, cfg.batch_size, shuffle=True, seed=0) if b.clicks.sum() > 0]
    want = torch.cat([(b.purchases if expected == "purchases" else b.clicks).reshape(-1) for b in batches])
    torch.testing.assert_close(got.float(), want.float())
    assert (got > 0).sum() < torch.cat([b.clicks.reshape(-1) for b in batches]).gt(0).sum() or expected == "clicks"


def test_align_positives_setting_is_checked() -> None:
    with pytest.raises(ConfigError, match="align-positives"):
        TrainConfig(align_positives="views")
