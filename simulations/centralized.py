"""Centralized training (the non-federated upper bound) and the held-out evaluation of every ranker."""

from __future__ import annotations

import json
import logging
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from shared_model.checkpoint import load_checkpoint, save_checkpoint
from shared_model.config import ModelConfig, TrainConfig
from shared_model.data import Slates
from shared_model.head import FusedRankingHead, build_head, count_parameters
from shared_model.schema import atomic_write
from shared_model.training import ranking_metrics, score_slates, train_epochs
from simulations.baselines import BM25Ranker, CosineRanker
from simulations.prepare import Prepared

log = logging.getLogger(__name__)
DEFAULT_EPOCHS = 6


def train_central(
    prep: Prepared,
    model_cfg: ModelConfig,
    train_cfg: TrainConfig,
    epochs: int = DEFAULT_EPOCHS,
    seed: int = 0,
    progress: bool = True,
    train: Slates | None = None,
) -> tuple[FusedRankingHead, dict[str, Any]]:
    """Train one head on the pooled training sessions of every user."""
    torch.manual_seed(seed)
    model = build_head(model_cfg, seed=seed)
    train = train if train is not None else prep.slates("train")
    table = prep.table()
    props = prep.propensity_tensor()
    t0 = time.perf_counter()
    history = []
    for epoch in range(epochs):
        stats = train_epochs(model, train, table, train_cfg, props, epochs=1, seed=seed * 100 + epoch)
        history.append({"epoch": epoch + 1, **stats})
        if progress:
            log.info("epoch %d/%d loss %.4f", epoch + 1, epochs, stats["train_loss"])
    info = {"epochs": epochs, "seconds": time.perf_counter() - t0, "history": history,
            "params": count_parameters(model)}
    return model, info


def head_variants(base: ModelConfig, base_train: TrainConfig) -> dict[str, tuple[ModelConfig, TrainConfig]]:
    """The trained rankers of the comparison table."""
    return {
        "text-only head": (replace(base, use_image=False, use_video=False), base_train),
        "fused head (naive clicks)": (base, replace(base_train, ips=False)),
        "fused head": (base, base_train),
    }


def evaluate_all(
    prep: Prepared,
    heads: dict[str, FusedRankingHead],
    test: Slates | None = None,
) -> dict[str, dict[str, float]]:
    """Held-out sessions scored by every ranker against the true graded relevance."""
    test = test if test is not None else prep.slates("test")
    items = test.items.numpy()
    queries = [prep.log.queries[prep.log.query[s]] for s in test.session_ids]
    results: dict[str, dict[str, float]] = {}
    results["production order"] = ranking_metrics(-test.slate_dense[..., 0].numpy(), test)
    bm25 = BM25Ranker([it.text() for it in prep.catalog.items])
    results["bm25"] = ranking_metrics(bm25.score(queries, items), test)
    cos = CosineRanker(prep.store.text)
    results["cosine"] = ranking_metrics(cos.score(test.query.numpy(), items), test)
    table = prep.table()
    for name, model in heads.items():
        results[name] = ranking_metrics(score_slates(model, test, table), test)
    return results


def run_baselines(
    prep: Prepared,
    out_dir: Path,
    model_cfg: ModelConfig,
    train_cfg: TrainConfig,
    epochs: int = DEFAULT_EPOCHS,
    seed: int = 0,
) -> dict[str, Any]:
    """Train every head variant centrally, evaluate all rankers, write checkpoints and ``results.json``."""
    out_dir.mkdir(parents=True, exist_ok=True)
    train, test = prep.slates("train"), prep.slates("test")
    heads: dict[str, FusedRankingHead] = {}
    training: dict[str, Any] = {}
    for name, (mcfg, tcfg) in head_variants(model_cfg, train_cfg).items():
        log.info("training %s", name)
        model, info = train_central(prep, mcfg, tcfg, epochs=epochs, seed=seed, train=train)
        heads[name] = model
        training[name] = info
        fname = name.replace(" ", "_").replace("(", "").replace(")", "") + ".pt"
        save_checkpoint(out_dir / fname, model, run_config={"data.dir": str(prep.data_dir), "train": vars(tcfg)},
                        metrics_history=info["history"], seeds={"seed": seed})
    results = evaluate_all(prep, heads, test)
    payload = {
        "data_dir": str(prep.data_dir),
        "num_test_sessions": int(len(test)),
        "propensity_eta": prep.eta,
        "rankers": results,
        "training": training,
    }
    atomic_write(out_dir / "results.json", lambda f: f.write(json.dumps(payload, indent=2).encode()))
    return payload


def load_heads(paths: list[str]) -> dict[str, FusedRankingHead]:
    """Checkpoints keyed by file stem (the ranker name in results)."""
    return {Path(p).stem: load_checkpoint(p)[0] for p in paths}


