"""Reference points for a federated run: the centralized upper bound and the local-only lower bound."""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from client.local import local_evaluate, local_train
from shared_model.config import RunSettings
from shared_model.head import build_head
from shared_model.prepared import Prepared
from shared_model.schema import atomic_write
from shared_model.shards import load_shard
from shared_model.training import evaluate_model
from simulations.centralized import DEFAULT_EPOCHS, train_central

log = logging.getLogger(__name__)


def _key(*parts: Any) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


def centralized_reference(prep: Prepared, settings: RunSettings, epochs: int = DEFAULT_EPOCHS) -> dict[str, float]:
    """The same head trained on the pooled logs (cached per data folder and model/train config)."""
    cache = prep.data_dir / "references" / f"central-{_key(asdict(settings.model), asdict(settings.train), epochs)}.json"
    if cache.is_file():
        return dict(json.loads(cache.read_text()))
    model, _ = train_central(prep, settings.model, settings.train, epochs=epochs, seed=settings.server.seed)
    metrics = evaluate_model(model, prep.slates("test"), prep.table())
    atomic_write(cache, lambda f: f.write(json.dumps(metrics).encode()))
    return metrics


def local_only_reference(settings: RunSettings, shards: list[Path], epochs: int, progress: bool = True) -> dict[str, Any]:
    """Each client trains its own head from scratch on its logs alone; NDCG@10 over all held-out slates."""
    eta = json.loads((Path(settings.data.dir) / "propensity.json").read_text())["eta"]
    sums: dict[str, float] = {}
    weight = 0.0
    for cid, path in enumerate(tqdm(shards, desc="local-only", disable=not progress)):
        data = load_shard(path)
        torch.manual_seed(settings.server.seed * 7919 + cid)
        model = build_head(settings.model)
        if len(data.train):
            local_train(model, data, settings.train, eta=eta, seed=cid, epochs=epochs)
        m = local_evaluate(model, data)
        w = m.pop("num_lists", 0.0)
        if w <= 0:
            continue
        for k, v in m.items():
            if np.isfinite(v):
                sums[k] = sums.get(k, 0.0) + w * v
        weight += w
    return {k: v / weight for k, v in sums.items()} | {"epochs": epochs, "clients": len(shards)}
