"""Everything the ServerApp does, as plain functions: data and client shards, strategy, rounds, reports."""

from __future__ import annotations

import logging
import resource
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from flwr.app import ConfigRecord
from flwr.serverapp import Grid

from server.buffered import run_buffered
from server.loop import LoopState, init_state, run_rounds
from server.nodes import PartitionOrderedGrid
from server.privacy import privacy_report, wrap_strategy
from server.report import plot_run
from server.strategies import FedBuff, build_strategy
from shared_model.checkpoint import average_checkpoints, save_checkpoint, tail_window
from shared_model.config import RunSettings
from shared_model.head import FusedRankingHead
from shared_model.prepared import Prepared, prepare
from shared_model.records import (
    LOCAL_EPOCHS,
    NDCG_GLOBAL,
    NDCG_PERSONAL,
    PNDCG_GLOBAL,
    PNDCG_PERSONAL,
    PROPENSITY_ETA,
)
from shared_model.schema import atomic_write, results_bytes
from shared_model.shards import ensure_shards
from shared_model.training import evaluate_model

log = logging.getLogger(__name__)
AVERAGED = "averaged.pt"  # tail average of the last rounds' global heads (server.average-rounds)


def peak_rss_mb() -> float:
    """Peak resident memory of this process and its finished children, MiB."""
    own = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    kids = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    return max(own, kids) / 1024.0


def run_server(grid: Grid, settings: RunSettings, progress: bool = True) -> dict[str, Any]:
    """Prepare, run every round, write ``results.json``, checkpoints and plots into ``server.out-dir``."""
    t_start = time.perf_counter()
    out = Path(settings.server.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    prep = prepare(settings.data.dir, progress=progress)  # generate it first: fedrank generate / simulate
    ensure_shards(prep, settings)
    test, table = prep.slates("test"), prep.table()
    strategy = wrap_strategy(build_strategy(settings.strategy), settings)  # privacy.mode: Flower's DP wrappers
    state = init_state(settings, out, strategy, settings.server.resume)
    train_config = ConfigRecord({PROPENSITY_ETA: float(prep.eta), LOCAL_EPOCHS: settings.train.local_epochs})
    bar = _progress_bar(settings, state, progress)

    def on_round(rec: dict[str, Any]) -> None:
        if bar is not None:
            bar.set_postfix({"ndcg@10": f"{rec.get('central', {}).get('ndcg@10', float('nan')):.4f}",
                             "ok": f"{rec['accepted']}/{rec['sampled']}"})
            bar.update(1)

    # seeded sampling picks the same devices in every launch and after resume
    ordered = PartitionOrderedGrid(grid)
    ordered.learn_partitions(timeout=settings.server.round_timeout)
    loop = run_buffered if isinstance(strategy, FedBuff) else run_rounds  # strategy.name = "fedbuff": asynchronous
    state = loop(ordered, strategy, settings, state, out, train_config,  # type: ignore[arg-type]
                 central_eval=lambda m: evaluate_model(m, test, table),
                 on_round=on_round,
                 max_update_norm=settings.faults.max_update_norm or None)  # 0 = no norm bound
    if bar is not None:
        bar.close()
    results = build_results(settings, state, prep, time.perf_counter() - t_start)
    results["averaged"] = write_tail_average(settings, state, out, lambda m: evaluate_model(m, test, table))
    write_results(out, results)
    return results


def write_tail_average(settings: RunSettings, state: LoopState, out: Path,
                       central_eval: Callable[[FusedRankingHead], dict[str, float]]) -> dict[str, Any]:
    """Tail averaging (``server.average-rounds``): the mean of the last rounds' global heads, read back from their
    checkpoints (so a resumed run averages the same rounds), written to ``averaged.pt`` and evaluated like the
    last round's head. The last round's noise from the few devices it sampled averages out; the centralized head
    averages its best epochs in the same way. ``{}`` (and no file) when the window is empty."""
    last = int(state.rounds[-1]["round"]) if state.rounds else 0
    window = tail_window(last, settings.server.average_rounds)
    if not window:
        (out / AVERAGED).unlink(missing_ok=True)  # never leave an older run's average beside this run's last.pt
        return {}
    model = average_checkpoints([out / "checkpoints" / f"round-{r:03d}.pt" for r in window])
    save_checkpoint(out / AVERAGED, model, run_config=settings.to_flat(), round=last,
                    extra={"averaged_rounds": [window[0], window[-1]]})
    log.info("averaged the global heads of rounds %d-%d into %s", window[0], window[-1], out / AVERAGED)
    return {"rounds": [window[0], window[-1]], "central": central_eval(model)}


def _progress_bar(settings: RunSettings, state: LoopState, enabled: bool) -> Any:
    if not enabled:
        return None
    from tqdm import tqdm

    return tqdm(total=settings.server.num_rounds, initial=state.start_round - 1, desc="rounds", unit="round")


def build_results(settings: RunSettings, state: LoopState, prep: Prepared, seconds: float) -> dict[str, Any]:
    rounds = state.rounds
    last = rounds[-1] if rounds else {}
    fed = last.get("federated", {}).get("per_client", {})
    per_round = [r["seconds"] for r in rounds if "seconds" in r]
    return {
        "run_config": settings.to_flat(),
        "data": {"dir": str(prep.data_dir), "items": len(prep.catalog), "sessions": len(prep.log),
                 "test_sessions": int(len(prep.test_idx)), "propensity_eta": prep.eta,
                 "propensity": prep.propensity_summary()},
        "rounds": rounds,
        "final": last.get("central", {}),
        "clients": {k: fed.get(k, []) for k in (NDCG_GLOBAL, NDCG_PERSONAL, PNDCG_GLOBAL, PNDCG_PERSONAL)},
        "seconds_per_round": {"min": min(per_round, default=0.0), "median": float(np.median(per_round)) if per_round else 0.0,
                              "max": max(per_round, default=0.0)},
        "seconds_total": seconds,
        "resumed_from_round": state.resumed_from,
        "peak_rss_mb": peak_rss_mb(),
        "references": {},
        "privacy": privacy_report(settings, rounds),
    }


def write_results(out: Path, results: dict[str, Any]) -> None:
    data = results_bytes(results)  # strict JSON: a metric no query defines is null, never NaN
    atomic_write(out / "results.json", lambda f: f.write(data))
    try:
        plot_run(results, out)
    except Exception as e:  # noqa: BLE001 -- a plot must never lose a finished run's results
        log.warning("plots not written: %s", e)
