"""Centralized training (the non-federated upper bound) and the held-out evaluation of every ranker."""

from __future__ import annotations

import json
import logging
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from shared_model.checkpoint import average_states, load_checkpoint, save_checkpoint
from shared_model.config import ModelConfig, TrainConfig
from shared_model.data import Slates
from shared_model.head import FusedRankingHead, build_head, count_parameters
from shared_model.prepared import Prepared
from shared_model.schema import atomic_write
from shared_model.training import ips_click_dcg, ranking_metrics, score_slates, train_epochs, validation_loss
from simulations.baselines import BM25Ranker, CosineRanker
from simulations.ltr import LtrConfig, fit_prepared, slate_queries

log = logging.getLogger(__name__)
DEFAULT_EPOCHS = 12  # at most; early stopping on validation clicks decides
MIN_EPOCHS = 5  # one epoch's validation clicks cannot tell epoch 2 from epoch 5 (see train_central)
SELECTION_WINDOW = 3  # epochs whose weights are averaged into the returned head
VAL_FRAC = 0.1
# what train_central selects epochs on: criterion -> (history key, sign that makes higher better, label)
_SELECTION = {"loss": ("val_loss", -1.0, "loss"), "ips-dcg": ("val_ips_dcg", 1.0, "IPS-DCG@10")}
CRITERIA = tuple(_SELECTION)
DEFAULT_CRITERION = "loss"


def train_central(
    prep: Prepared,
    model_cfg: ModelConfig,
    train_cfg: TrainConfig,
    epochs: int = DEFAULT_EPOCHS,
    seed: int = 0,
    progress: bool = True,
    patience: int = 3,
    min_epochs: int = MIN_EPOCHS,
    window: int = SELECTION_WINDOW,
    criterion: str = DEFAULT_CRITERION,
) -> tuple[FusedRankingHead, dict[str, Any]]:
    """Train one head on the pooled training sessions of every user.

    The last 10% of each shopper's training sessions are held out as validation clicks and scored after every
    epoch, by ``criterion``:

    * ``"loss"`` (default) -- the training objective on them, with the same debiasing (``validation_loss``):
      lower is better. It uses every validation slate without importance weights, so it moves smoothly from
      epoch to epoch and turns up as soon as the head starts to overfit the training clicks (on small logs, such
      as a few thousand clicks over real photos, that is after one or two epochs).
    * ``"ips-dcg"`` -- the IPS-estimated DCG@10 of those clicks (``ips_click_dcg``): higher is better; a few
      hundred clicks with weights up to the clip make it noisy.

    Both are recorded in ``history``. A single best epoch is a poor choice on noisy figures: the head returned
    is the *average of the weights* of the ``window`` consecutive epochs whose mean validation figure is best
    (stochastic weight averaging over the selected window). Training runs at least ``min_epochs`` epochs and stops
    when that best window has not moved for ``patience`` epochs (at most ``epochs``). Graded relevance is never
    looked at.
    """
    if criterion not in CRITERIA:
        raise ValueError(f"criterion: {criterion!r} is not one of {CRITERIA}")
    key, sign, figure = _SELECTION[criterion]  # selection maximises sign * figure
    torch.manual_seed(seed)
    model = build_head(model_cfg, seed=seed)
    fit, val = prep.fit_validation_slates(VAL_FRAC)
    table = prep.table()
    props = prep.propensity_tensor()
    window = max(1, min(window, epochs))
    t0 = time.perf_counter()
    history: list[dict[str, float]] = []
    recent: list[dict[str, torch.Tensor]] = []  # the last ``window`` epochs' weights
    best, best_state, best_end = -float("inf"), None, 0
    for epoch in range(epochs):
        stats = train_epochs(model, fit, table, train_cfg, props, epochs=1, seed=seed * 100 + epoch)
        vloss = validation_loss(model, val, table, train_cfg, props)
        vdcg = ips_click_dcg(score_slates(model, val, table), val, props)
        history.append({"epoch": epoch + 1, **stats, "val_loss": vloss, "val_ips_dcg": vdcg})
        recent = [*recent, {k: v.detach().clone() for k, v in model.state_dict().items()}][-window:]
        if progress:
            log.info("epoch %d/%d loss %.4f validation loss %.4f, IPS-DCG@10 %.4f", epoch + 1, epochs,
                     stats["train_loss"], vloss, vdcg)
        if len(recent) == window:
            smoothed = sum(h[key] for h in history[-window:]) / window
            history[-1]["val_window_mean"] = smoothed
            if sign * smoothed > best + 1e-5:
                best, best_end = sign * smoothed, epoch + 1
                best_state = average_states(recent)
        if epoch + 1 >= min_epochs and best_end and epoch + 1 - best_end >= patience:
            break
    if best_state is not None:
        model.load_state_dict(best_state)
    model.eval()
    info = {"epochs_run": len(history), "best_epoch": best_end, "selected_epochs": [best_end - window + 1, best_end],
            "selection": f"mean of the weights of the {window} consecutive epochs with the best mean validation {figure}",
            "criterion": criterion, "seconds": time.perf_counter() - t0, "history": history,
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
    bm25: BM25Ranker | None = None,
) -> dict[str, dict[str, float]]:
    """Held-out sessions scored by every ranker against the true graded relevance (``bm25``: the catalog's BM25,
    built if not given)."""
    test = test if test is not None else prep.slates("test")
    items = test.items.numpy()
    queries = slate_queries(prep.log, test)
    results: dict[str, dict[str, float]] = {}
    results["production order"] = ranking_metrics(-test.slate_dense[..., 0].numpy(), test)
    bm25 = bm25 or BM25Ranker([it.text() for it in prep.catalog.items])
    results["bm25"] = ranking_metrics(bm25.score(queries, items), test)
    cos = CosineRanker(prep.store.text)
    results["cosine"] = ranking_metrics(cos.score(test.query.numpy(), items), test)
    table = prep.table()
    for name, model in heads.items():
        results[name] = ranking_metrics(score_slates(model, test, table), test)
    return results


def ltr_variants(base: LtrConfig) -> dict[str, LtrConfig]:
    """The LightGBM rankers of the comparison table (``simulations/ltr.py``), trained on the heads' clicks."""
    return {
        "lightgbm lambdarank (naive clicks)": replace(base, ips="none"),
        "lightgbm lambdarank (IPS clicks)": replace(base, ips="gain"),
    }


def _file_name(name: str, suffix: str) -> str:
    return name.replace(" ", "_").replace("(", "").replace(")", "") + suffix


def run_baselines(
    prep: Prepared,
    out_dir: Path,
    model_cfg: ModelConfig,
    train_cfg: TrainConfig,
    epochs: int = DEFAULT_EPOCHS,
    seed: int = 0,
    criterion: str = DEFAULT_CRITERION,
) -> dict[str, Any]:
    """Train every head variant and LightGBM ranker centrally, evaluate all rankers, write checkpoints (heads:
    ``.pt``, LightGBM: ``.json``) and ``results.json`` (per ranker: metrics; per trained one: fit time and
    early stopping)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    test = prep.slates("test")
    heads: dict[str, FusedRankingHead] = {}
    training: dict[str, Any] = {}
    for name, (mcfg, tcfg) in head_variants(model_cfg, train_cfg).items():
        log.info("training %s", name)
        model, info = train_central(prep, mcfg, tcfg, epochs=epochs, seed=seed, criterion=criterion)
        heads[name] = model
        training[name] = info
        save_checkpoint(out_dir / _file_name(name, ".pt"), model,
                        run_config={"data.dir": str(prep.data_dir), "train": vars(tcfg)},
                        metrics_history=info["history"], seeds={"seed": seed})
    ltr_rows: dict[str, dict[str, float]] = {}
    bm25 = BM25Ranker([it.text() for it in prep.catalog.items])
    queries = slate_queries(prep.log, test)
    for name, lcfg in ltr_variants(LtrConfig(ips_clip=train_cfg.ips_clip, seed=seed)).items():
        log.info("training %s", name)
        ranker, info = fit_prepared(prep, lcfg, VAL_FRAC, bm25)
        training[name] = info
        ranker.save(out_dir / _file_name(name, ".json"))
        ltr_rows[name] = ranking_metrics(ranker.score(test, queries, prep.store, bm25), test)
    evaluated = evaluate_all(prep, heads, test, bm25)
    results = {k: v for k, v in evaluated.items() if k not in heads}  # first-stage and unlearned rankers,
    results.update(ltr_rows)  # then LightGBM, then the heads
    results.update({k: v for k, v in evaluated.items() if k in heads})
    payload = {
        "data_dir": str(prep.data_dir),
        "num_test_sessions": int(len(test)),
        "propensity_eta": prep.eta,
        "propensity": prep.propensity_summary(),
        "rankers": results,
        "training": training,
    }
    atomic_write(out_dir / "results.json", lambda f: f.write(json.dumps(payload, indent=2).encode()))
    return payload


RESERVED_RANKER_NAMES = ("production order", "bm25", "cosine")  # the baselines' rows in results


def checkpoint_names(paths: list[str], reserved: tuple[str, ...] = RESERVED_RANKER_NAMES) -> dict[str, str]:
    """A unique ranker name for each checkpoint path: ``{name: path}``, in the order given.

    The name is the shortest suffix of the path, without the file's extension, that is no suffix of another
    path and no baseline's name: ``runs/central/head.pt`` alone is ``head``; ``run1/last.pt`` and ``run2/last.pt``
    are ``run1/last`` and ``run2/last``; ``x/bm25.pt`` is ``x/bm25``. Two files differing only in extension keep
    it (``a/head.pt``, ``a/head.ckpt``). The same file given twice is a ``ValueError``.
    """
    resolved = [Path(p).expanduser().resolve() for p in paths]
    first: dict[Path, str] = {}
    for p, r in zip(paths, resolved, strict=True):
        if r in first:
            raise ValueError(f"{p}: the same checkpoint is given twice (also as {first[r]})")
        first[r] = p
    stems = [(*r.parent.parts, r.stem) for r in resolved]
    parts = [(*r.parent.parts, r.name) if stems.count(s) > 1 else s for s, r in zip(stems, resolved, strict=True)]
    names: dict[str, str] = {}
    for i, (p, own) in enumerate(zip(paths, parts, strict=True)):
        others = [o for j, o in enumerate(parts) if j != i]
        name = "/".join(own).lstrip("/")
        for depth in range(1, len(own) + 1):
            suffix = own[-depth:]
            candidate = "/".join(suffix).lstrip("/")
            if candidate not in reserved and all(o[-depth:] != suffix for o in others):
                name = candidate
                break
        names[name] = p
    return names


def load_heads(paths: list[str]) -> dict[str, FusedRankingHead]:
    """Checkpoints keyed by their ranker name in results (:func:`checkpoint_names`: unique, never a baseline's)."""
    return {name: load_checkpoint(p)[0] for name, p in checkpoint_names(paths).items()}


