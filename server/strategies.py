"""Flower strategies chosen by config. Flower's own classes, constructed and configured; never copied."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from flwr.serverapp import strategy as fs

from shared_model.config import STRATEGY_CLASSES, ConfigError, StrategyConfig
from shared_model.records import ARRAYS, CONFIG, NUM_EXAMPLES


class FedBuff(fs.FedAvg):
    """Asynchronous buffered aggregation (Nguyen et al., "Federated Learning with Buffered Asynchronous
    Aggregation", AISTATS 2022): ``concurrency`` devices train at once, each on the global head of the moment it
    was dispatched; every ``buffer_size`` arrived updates the server steps
    ``global += buffer_lr * sum_i n_i w_i delta_i / sum_i n_i`` with ``w_i = (1 + staleness_i) ** -exponent``
    (staleness: server steps since the device got its head). Flower's FedAvg supplies the message construction,
    the sampling of evaluation rounds and the checks; the event loop is ``server/buffered.py``."""

    def __init__(self, *, concurrency: int, buffer_size: int, staleness_exponent: float, buffer_lr: float,
                 **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.concurrency, self.buffer_size = concurrency, buffer_size
        self.staleness_exponent, self.buffer_lr = staleness_exponent, buffer_lr
        self.async_state: dict[str, Any] = {}  # the event loop's state, checkpointed with the strategy

    def staleness_weight(self, staleness: int) -> float:
        return float((1.0 + staleness) ** -self.staleness_exponent)

    def aggregate_buffer(self, current: dict[str, np.ndarray],
                         updates: list[tuple[dict[str, np.ndarray], float, int]]) -> dict[str, np.ndarray]:
        """The next global head from ``(delta, num_examples, staleness)`` updates: ``delta`` is what the device
        learnt (its head minus the head it was dispatched with), already decoded and screened."""
        total = sum(n for _, n, _ in updates)
        if not updates or total <= 0:
            return current
        out = dict(current)
        for k, g in current.items():
            parts = [n * self.staleness_weight(s) * d[k].astype(np.float64) for d, n, s in updates if k in d]
            if parts and g.dtype.kind == "f":
                out[k] = (g + self.buffer_lr * np.sum(parts, axis=0) / total).astype(g.dtype)
        return out


STRATEGIES: dict[str, type[fs.Strategy]] = {name: getattr(fs, cls) for name, cls in STRATEGY_CLASSES.items()}
STRATEGIES["fedbuff"] = FedBuff
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
    elif name == "fedbuff":
        extra = {"concurrency": cfg.concurrency, "buffer_size": cfg.buffer_size,
                 "staleness_exponent": cfg.staleness_exponent, "buffer_lr": cfg.buffer_lr}
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
    if isinstance(inner, FedBuff) and inner.async_state:
        state["async"] = inner.async_state  # clock, jobs in flight and their heads (server/buffered.py)
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
    if "async" in state and isinstance(inner, FedBuff):
        inner.async_state = state["async"]
    if "clipping_norm" in state and hasattr(strategy, "clipping_norm"):
        strategy.clipping_norm = float(state["clipping_norm"])
    for attr in _STATE_ATTRS:
        if attr in state:
            setattr(inner, attr, {k: np.asarray(v.numpy() if hasattr(v, "numpy") else v)
                                  for k, v in state[attr].items()})
