"""Self-describing checkpoints: a file alone rebuilds its head (``model_config``) and tells how it was made."""

from __future__ import annotations

import io
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from shared_model.config import ModelConfig
from shared_model.head import FusedRankingHead
from shared_model.schema import atomic_write

FORMAT = "fedrank-checkpoint"
VERSION = 1


class CheckpointError(ValueError):
    """The file is not a fedrank checkpoint, or one of an incompatible version."""


def save_checkpoint(
    path: str | os.PathLike[str],
    model: FusedRankingHead,
    *,
    run_config: dict[str, Any] | None = None,
    round: int = 0,
    strategy_state: dict[str, Any] | None = None,
    metrics_history: list[dict[str, Any]] | None = None,
    seeds: dict[str, int] | None = None,
    extra: dict[str, Any] | None = None,
) -> Path:
    """Write atomically (temp file + rename): an interrupted save never leaves a truncated checkpoint."""
    payload = {
        "format": FORMAT,
        "version": VERSION,
        "model_config": model.cfg.to_dict(),
        "state_dict": {k: v.detach().cpu().clone() for k, v in model.state_dict().items()},
        "run_config": dict(run_config or {}),
        "round": int(round),
        "strategy_state": strategy_state or {},
        "metrics_history": list(metrics_history or []),
        "seeds": dict(seeds or {}),
        "extra": dict(extra or {}),
    }
    buf = io.BytesIO()
    torch.save(payload, buf)
    p = Path(path)
    atomic_write(p, lambda f: f.write(buf.getvalue()))
    return p


def load_checkpoint(path: str | os.PathLike[str]) -> tuple[FusedRankingHead, dict[str, Any]]:
    """Rebuild the head from the file; returns (model in eval mode, the full payload)."""
    p = Path(path)
    if not p.is_file():
        raise CheckpointError(f"{p}: no such checkpoint file")
    try:
        payload = torch.load(p, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 -- any unpickling failure means a corrupt file
        raise CheckpointError(f"{p}: cannot read checkpoint ({e.__class__.__name__}: {e})") from e
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise CheckpointError(f"{p}: not a fedrank checkpoint")
    if payload.get("version") != VERSION:
        raise CheckpointError(f"{p}: checkpoint version {payload.get('version')} unsupported (expected {VERSION})")
    cfg = ModelConfig(**payload["model_config"])
    model = FusedRankingHead(cfg)
    model.load_state_dict(payload["state_dict"])
    model.eval()
    return model, payload


def average_states(states: Sequence[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Element-wise mean of state dicts with the same keys (non-float entries: the last state's)."""
    return {k: (torch.stack([s[k] for s in states]).mean(0) if states[-1][k].is_floating_point() else states[-1][k])
            for k in states[-1]}


def tail_window(last_round: int, average_rounds: int) -> range:
    """The rounds whose global heads ``server.average-rounds`` averages: the last ``average_rounds`` of a run that
    ended after ``last_round``, but never more than its last third (the early heads of a short run are far from
    converged). Empty when that leaves fewer than two rounds: there is nothing to average."""
    k = min(average_rounds, last_round // 3)
    return range(last_round - k + 1, last_round + 1) if k >= 2 else range(0)


def average_heads(models: Sequence[FusedRankingHead], names: Sequence[object] | None = None) -> FusedRankingHead:
    """The head whose weights are the mean of ``models``' (tail averaging of a federated run's global heads). They
    must share one architecture; the first that differs is named (by ``names``, when given)."""
    if not models:
        raise ValueError("average: no heads given")
    labels = list(names) if names is not None else list(range(len(models)))
    for label, m in zip(labels, models, strict=True):
        if m.cfg != models[0].cfg:
            raise CheckpointError(f"{label}: model config {m.cfg} differs from {labels[0]}'s {models[0].cfg}")
    head = FusedRankingHead(models[0].cfg)
    head.load_state_dict(average_states([m.state_dict() for m in models]))
    head.eval()
    return head


def average_checkpoints(paths: Sequence[str | os.PathLike[str]]) -> FusedRankingHead:
    """:func:`average_heads` of the heads in these checkpoint files."""
    if not paths:
        raise ValueError("average_checkpoints: no checkpoints given")
    return average_heads([load_checkpoint(p)[0] for p in paths], names=paths)
