"""Flower strategies chosen by config. Flower's own classes, constructed and configured; never copied."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from flwr.serverapp import strategy as fs

from shared_model.config import STRATEGY_CLASSES, ConfigError, StrategyConfig
from shared_model.records import ARRAYS, CONFIG, NUM_EXAMPLES

STRATEGIES: dict[str, type[fs.Strategy]] = {name: getattr(fs, cls) for name, cls in STRATEGY_CLASSES.items()}
# server-side optimizer state that must survive a restart (FedOpt family: first and second moments)
_STATE_ATTRS = ("m_t", "v_t")


def build_strategy(cfg: StrategyConfig) -> fs.Strategy:
    """The Flower strategy named by ``strategy.name`` with the sampling and strategy-specific settings."""
    name = cfg.name.lower()
    if name not in STRATEGIES:
        raise ConfigError(f"strategy.name: {cfg.name!r} is not one of {sorted(STRATEGIES)}")
    common: dict[str, Any] = {
        "fraction_train": cfg.fraction_train,
        "fraction_evaluate": cfg.fraction_evaluate,
        "min_train_nodes": cfg.min_train_clients,
        "min_evaluate_nodes": cfg.min_train_clients if cfg.fraction_evaluate > 0 else 0,
        "min_available_nodes": cfg.min_available_clients,
        "weighted_by_key": NUM_EXAMPLES,
        "arrayrecord_key": ARRAYS,
        "configrecord_key": CONFIG,
    }
    extra: dict[str, Any] = {}
    if name == "fedprox":
        extra = {"proximal_mu": cfg.proximal_mu}
    elif name in ("fedadam", "fedyogi"):
        extra = {"eta": cfg.server_lr}
    elif name == "fedtrimmedavg":
        extra = {"beta": cfg.trim_beta}
    elif name == "krum":
        extra = {"num_malicious_nodes": cfg.num_malicious}
    return STRATEGIES[name](**common, **extra)


def base_strategy(strategy: fs.Strategy) -> fs.Strategy:
    """The strategy inside any wrappers (Flower's DP wrappers keep the wrapped one in ``.strategy``)."""
    while isinstance(getattr(strategy, "strategy", None), fs.Strategy):
        strategy = strategy.strategy  # type: ignore[attr-defined]
    return strategy


def base_fedavg(strategy: fs.Strategy) -> fs.FedAvg:
    """The FedAvg inside any wrappers (every strategy in STRATEGIES is a FedAvg)."""
    inner = base_strategy(strategy)
    if not isinstance(inner, fs.FedAvg):
        raise TypeError(f"{type(inner).__name__} is not a FedAvg")
    return inner


def min_train_nodes(strategy: fs.Strategy) -> int:
    """``min_train_nodes`` of the strategy inside any wrappers."""
    return base_fedavg(strategy).min_train_nodes


def strategy_state(strategy: fs.Strategy) -> dict[str, Any]:
    """Server-optimizer state (e.g. FedAdam's moments) as plain numpy, for checkpoints; reaches through DP
    wrappers, and keeps an adaptive-clipping wrapper's current clipping norm."""
    inner = base_strategy(strategy)
    state: dict[str, Any] = {"class": type(inner).__name__}
    if inner is not strategy:
        state["wrapper"] = type(strategy).__name__
        if "Adaptive" in type(strategy).__name__:
            state["clipping_norm"] = float(strategy.clipping_norm)  # type: ignore[attr-defined]
    for attr in _STATE_ATTRS:
        value = getattr(inner, attr, None)
        if value is not None:
            # torch tensors, so the checkpoint loads with torch.load(weights_only=True)
            state[attr] = {k: torch.from_numpy(np.array(v)) for k, v in value.items()}
    return state


def restore_strategy_state(strategy: fs.Strategy, state: dict[str, Any]) -> None:
    inner = base_strategy(strategy)
    if state.get("class") not in (None, type(inner).__name__):
        raise ValueError(f"checkpoint holds {state.get('class')} state, but the run uses {type(inner).__name__}")
    if "clipping_norm" in state and hasattr(strategy, "clipping_norm"):
        strategy.clipping_norm = float(state["clipping_norm"])
    for attr in _STATE_ATTRS:
        if attr in state:
            setattr(inner, attr, {k: np.asarray(v.numpy() if hasattr(v, "numpy") else v)
                                  for k, v in state[attr].items()})
