"""What a device does, as plain functions: load its shard, train the head on its clicks, evaluate locally."""

from __future__ import annotations

import copy
import dataclasses

import numpy as np
import torch

from shared_model.config import RunSettings, TrainConfig
from shared_model.head import PERSONAL_PREFIX, FusedRankingHead
from shared_model.head_features import MAX_POSITIONS
from shared_model.propensity import power_law_propensities
from shared_model.shards import ClientData, load_shard, shard_path
from shared_model.training import evaluate_model, ips_click_dcg, score_slates, train_epochs


def load_device_data(settings: RunSettings, node_config: dict[str, object]) -> ClientData:
    return load_shard(shard_path(settings, node_config))


def propensities_from_eta(eta: float) -> torch.Tensor:
    return torch.from_numpy(power_law_propensities(eta, MAX_POSITIONS).astype(np.float32))


def local_train(
    model: FusedRankingHead,
    data: ClientData,
    cfg: TrainConfig,
    eta: float,
    proximal_mu: float = 0.0,
    seed: int = 0,
    epochs: int | None = None,
) -> dict[str, float]:
    """Train the head in place on this device's training sessions (FedProx term when ``proximal_mu > 0``)."""
    global_params = [p.detach().clone() for p in model.parameters()] if proximal_mu > 0 else None
    stats = train_epochs(model, data.train, data.table, cfg, propensities_from_eta(eta), epochs=epochs,
                         seed=seed, proximal_mu=proximal_mu, global_params=global_params)
    return stats


def personalize(
    model: FusedRankingHead, data: ClientData, cfg: TrainConfig, eta: float, personal: dict[str, torch.Tensor] | None,
    seed: int = 0, mix: tuple[float, ...] = (0.0, 0.25, 0.5, 0.75, 1.0),
) -> FusedRankingHead:
    """The device's own version of the global head.

    Its personal layers replace the global ones; then, with ``finetune_steps > 0``, a copy is fine-tuned on the
    device's older training sessions (a few small steps: ``finetune-lr``, ``finetune-batch-size``, and IPS weights
    clipped at ``finetune-ips-clip``, because one device's propensity weights are far noisier than the pooled
    ones) and mixed with the global weights, ``(1 - a) * global + a * tuned``, with the
    mix ``a`` (0 allowed: keep the global head) chosen by the counterfactual IPS-DCG@10 of the device's most
    recent 20% training sessions: only the device's own clicks decide.
    """
    base = copy.deepcopy(model)
    if personal:
        base.load_state_dict(personal, strict=False)
    n = len(data.train)
    if cfg.finetune_steps <= 0 or n < 5:
        return base
    props = propensities_from_eta(eta)
    cut = max(1, int(round(n * 0.8)))
    fit, val = data.train.select(np.arange(cut)), data.train.select(np.arange(cut, n))
    tuned = copy.deepcopy(base)
    ft_cfg = dataclasses.replace(cfg, lr=cfg.finetune_lr, batch_size=cfg.finetune_batch_size,
                                 ips_clip=cfg.finetune_ips_clip)
    train_epochs(tuned, fit, data.table, ft_cfg, props, epochs=10_000, seed=seed, max_steps=cfg.finetune_steps)
    g = {k: v.clone() for k, v in base.state_dict().items()}
    t = {k: v.clone() for k, v in tuned.state_dict().items()}

    def mixed(a: float) -> dict[str, torch.Tensor]:
        return {k: (1 - a) * g[k] + a * t[k] if g[k].is_floating_point() else g[k] for k in g}

    best_a, best_score = 0.0, -np.inf
    for a in mix:
        tuned.load_state_dict(mixed(a))  # `tuned` is scratch from here on; g and t are detached copies
        score = ips_click_dcg(score_slates(tuned, val, data.table), val, props)
        if score > best_score + 1e-9:
            best_a, best_score = a, score
    tuned.load_state_dict(mixed(best_a))
    return tuned


def personal_state(model: FusedRankingHead) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items() if k.startswith(PERSONAL_PREFIX)}


def local_evaluate(model: FusedRankingHead, data: ClientData) -> dict[str, float]:
    """Metrics on the device's held-out sessions, plus ``num_lists``: slates with at least one relevant item."""
    if len(data.test) == 0:
        return {"num_lists": 0.0}
    metrics = evaluate_model(model, data.test, data.table)
    metrics["num_lists"] = float((data.test.grades > 0).any(dim=1).sum())
    return metrics
