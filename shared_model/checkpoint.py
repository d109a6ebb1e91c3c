"""Self-describing checkpoints: a file alone rebuilds its head (``model_config``) and tells how it was made."""

from __future__ import annotations

import io
import os
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
