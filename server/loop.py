"""The federated round loop: Flower strategy methods driven round by round, with screening, central
evaluation, an atomic checkpoint after every round, and resume from the last one.

Flower's ``Strategy.start`` runs the same configure -> send -> aggregate cycle; this loop adds what an operator
needs between those steps (update validation, failure counting, per-round checkpoints with the server optimizer
state, deterministic client sampling per round) while the strategy objects stay Flower's own.
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import torch
from flwr.app import ArrayRecord, ConfigRecord, Message
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy

from server import privacy
from server.compression import decode_replies, encode_downlink
from server.secagg import secagg_train_round
from server.simclock import job_seconds
from server.strategies import min_train_nodes, restore_strategy_state, strategy_state
from server.validation import screen_replies
from shared_model.checkpoint import load_checkpoint, save_checkpoint
from shared_model.config import RunSettings, parse_run_config
from shared_model.head import FusedRankingHead, build_head
from shared_model.records import (
    METRICS,
    NDCG_GLOBAL,
    NDCG_PERSONAL,
    NUM_EXAMPLES,
    PNDCG_GLOBAL,
    PNDCG_PERSONAL,
)

log = logging.getLogger(__name__)
LAST = "last.pt"


@dataclass
class LoopState:
    arrays: ArrayRecord
    rounds: list[dict[str, Any]] = field(default_factory=list)
    start_round: int = 1
    resumed_from: int | None = None


def arrays_to_head(settings: RunSettings, arrays: ArrayRecord) -> FusedRankingHead:
    model = build_head(settings.model)
    model.load_state_dict(arrays.to_torch_state_dict())
    model.eval()
    return model


def message_bytes(msgs: list[Message]) -> int:
    total = 0
    for m in msgs:
        if m.has_content():
            total += sum(r.count_bytes() for r in m.content.array_records.values())
            total += sum(r.count_bytes() for r in m.content.metric_records.values())
            total += sum(r.count_bytes() for r in m.content.config_records.values())
    return total


def simulated_round(grid: Grid, settings: RunSettings, rnd: int, msgs: list[Message]) -> tuple[list[Message], float]:
    """The messages whose devices finish within ``faults.sim-timeout`` on the simulated device clock
    (``server/simclock.py``; all of them when it is 0), and the round's simulated seconds: its slowest device's, or
    the timeout when a device misses it. A device past the timeout is not sent its message: it could not have
    replied in time, and its reply would be dropped (the round records it under ``timeouts``)."""
    if not msgs:
        return msgs, 0.0
    ids = list(grid.get_node_ids())
    pid_of: dict[int, int] = dict(getattr(grid, "partition_of", {})) or {n: i for i, n in enumerate(ids)}
    took = [job_seconds(settings.faults, settings.server.seed, len(ids), pid_of.get(m.metadata.dst_node_id, 0), rnd)
            for m in msgs]
    limit = settings.faults.sim_timeout
    if limit <= 0 or max(took) <= limit:
        return msgs, max(took)
    return [m for m, t in zip(msgs, took, strict=True) if t <= limit], limit


def round_traffic(sent: list[Message], replies: list[Message]) -> dict[str, float]:
    """Bytes of a training round by Flower's own accounting (``Record.count_bytes``): in total (``bytes_sent``,
    ``bytes_received``; evaluation adds to these) and per device for the train messages alone
    (``upload_bytes_per_device``: mean over the replies; ``download_bytes_per_device``: mean over the sent)."""
    down, up = message_bytes(sent), message_bytes([r for r in replies if not r.has_error()])
    n_up = sum(1 for r in replies if not r.has_error())
    return {"bytes_sent": down, "bytes_received": message_bytes(replies),
            "download_bytes_per_device": down / len(sent) if sent else 0.0,
            "upload_bytes_per_device": up / n_up if n_up else 0.0}


def this_round_replies(sent: list[Message], replies: Iterable[Message]) -> tuple[list[Message], int]:
    """The replies to ``sent`` (at most one per message), and how many others were dropped.

    Flower's grids pull replies by the ids of the messages just pushed (``send_and_receive`` of the in-memory
    and gRPC grids), so a straggler's reply to an earlier round, arriving after that round's timeout, stays
    unread in the SuperLink; this keeps that guarantee for any grid: a reply that answers no message of this
    round is never aggregated into it.
    """
    replies = list(replies)
    wanted = {m.metadata.message_id for m in sent}
    fresh: list[Message] = []
    seen: set[str] = set()
    for r in replies:
        rid = r.metadata.reply_to_message_id
        if rid in wanted and (rid not in seen or rid == ""):  # "": a test grid that assigns no message ids
            seen.add(rid)
            fresh.append(r)
    stale = len(replies) - len(fresh)
    if stale:
        log.warning("dropped %d replies that answer no message of this round (late or duplicate)", stale)
    return fresh, stale


def merge_arrays(current: ArrayRecord, update: ArrayRecord) -> ArrayRecord:
    """``current`` with the arrays in ``update`` replaced (all of them, or only the shared ones under FedPer)."""
    if set(update.keys()) == set(current.keys()):
        return update
    merged = dict(current.items())
    merged.update(update.items())
    return ArrayRecord({k: merged[k] for k in current})


def init_state(settings: RunSettings, out_dir: Path, strategy: Strategy, resume: bool) -> LoopState:
    """Fresh initial head, or the last checkpoint in ``out_dir`` when resuming (same run config required)."""
    last = out_dir / LAST
    if resume and last.is_file():
        model, payload = load_checkpoint(last)
        saved = payload["run_config"]
        now = settings.to_flat()
        # a key the checkpoint predates counts as its default (checkpoints of older versions stay resumable)
        default = parse_run_config({}).to_flat()
        diff = {k for k in set(saved) | set(now)
                if k != "server.num-rounds" and saved.get(k, default.get(k)) != now.get(k)}
        if diff:
            raise ValueError(f"{last}: cannot resume, run config differs in {sorted(diff)}")
        restore_strategy_state(strategy, payload["strategy_state"])
        rnd = int(payload["round"])
        log.info("resuming from %s after round %d", last, rnd)
        return LoopState(ArrayRecord(model.state_dict()), list(payload["metrics_history"]), rnd + 1, rnd)
    model = build_head(settings.model, seed=settings.server.seed)
    return LoopState(ArrayRecord(model.state_dict()))


def run_rounds(
    grid: Grid,
    strategy: Strategy,
    settings: RunSettings,
    state: LoopState,
    out_dir: Path,
    train_config: ConfigRecord,
    central_eval: Callable[[FusedRankingHead], dict[str, float]],
    on_round: Callable[[dict[str, Any]], None] | None = None,
    max_update_norm: float | None = None,
) -> LoopState:
    """Run rounds ``state.start_round .. server.num-rounds``; checkpoint after each one."""
    cfg = settings.server
    shared = set(build_head(settings.model).shared_state_keys())
    sim_clock = float(state.rounds[-1].get("sim_time", 0.0)) if state.rounds else 0.0
    for rnd in range(state.start_round, cfg.num_rounds + 1):
        t0 = time.perf_counter()
        random.seed(cfg.seed * 100_003 + rnd)  # Flower's samplers draw from `random`
        if settings.secagg.enabled:  # SecAgg+ (server/secagg.py): the server only sees the aggregate
            agg, record = secagg_train_round(grid, settings, state.arrays, rnd, train_config)
            state.arrays = agg if agg is not None else state.arrays
        else:
            # with model.personal-layers, devices keep those layers and send only the shared ones
            current = {k: v.numpy() for k, v in state.arrays.items()}
            reference = {k: v for k, v in current.items() if k in shared}
            out_msgs = list(strategy.configure_train(rnd, state.arrays, ConfigRecord(dict(train_config)), grid))
            sampled = len(out_msgs)
            out_msgs, sim_seconds = simulated_round(grid, settings, rnd, out_msgs)  # faults.sim-timeout
            encode_downlink(settings.compression, out_msgs)  # compression.downlink = "fp16"
            replies, stale = this_round_replies(out_msgs, grid.send_and_receive(out_msgs, timeout=cfg.round_timeout))
            traffic = round_traffic(out_msgs, replies)  # as they crossed the network: before decoding
            replies, undecodable = decode_replies(settings.compression, replies, current)
            screened = screen_replies(replies, reference, max_norm=max_update_norm)
            screened.rejected[:0] = undecodable
            # no reply within server.round-timeout, or past the simulated faults.sim-timeout
            timeouts = sampled - len(replies) - len(undecodable)
            sim_clock += sim_seconds
            record = {
                "round": rnd, "sampled": sampled, "replied": len(replies) + len(undecodable), "sim_time": sim_clock,
                "accepted": len(screened.accepted), "failures": len(screened.failed), "timeouts": timeouts,
                "rejected": len(screened.rejected), "rejected_reasons": screened.rejected, "stale": stale,
                **traffic,
            }
            if len(screened.accepted) >= max(1, min_train_nodes(strategy)):
                dp = privacy.before_aggregate(strategy, screened.accepted)  # None without a DP wrapper
                agg_arrays, agg_metrics = strategy.aggregate_train(rnd, screened.accepted)
                if agg_arrays is not None:
                    state.arrays = merge_arrays(state.arrays, agg_arrays)
                record["train"] = dict(agg_metrics or {})
                if dp is not None:
                    record["privacy"] = privacy.release_record(strategy, dp, len(out_msgs), len(screened.accepted),
                                                               agg_arrays is not None)
            else:
                log.warning("round %d: only %d usable replies (< min %d); global head unchanged",
                            rnd, len(screened.accepted), min_train_nodes(strategy))
                record["train"] = {}
        if cfg.eval_every > 0 and (rnd % cfg.eval_every == 0 or rnd == cfg.num_rounds):
            record["federated"] = federated_eval(grid, strategy, settings, state.arrays, rnd, record, train_config)
            record["central"] = central_eval(arrays_to_head(settings, state.arrays))
        record["seconds"] = time.perf_counter() - t0
        state.rounds.append(record)
        write_checkpoint(settings, state, strategy, rnd, out_dir)
        if on_round is not None:
            on_round(record)
    return state


def federated_eval(
    grid: Grid, strategy: Strategy, settings: RunSettings, arrays: ArrayRecord, rnd: int, record: dict[str, Any],
    eval_config: ConfigRecord,
) -> dict[str, Any]:
    """Clients evaluate the global head (and their personalized version) on their held-out sessions."""
    msgs = list(strategy.configure_evaluate(rnd, arrays, ConfigRecord(dict(eval_config)), grid))
    if not msgs:
        return {}
    encode_downlink(settings.compression, msgs)
    replies, _ = this_round_replies(msgs, grid.send_and_receive(msgs, timeout=settings.server.round_timeout))
    record["bytes_sent"] += message_bytes(msgs)
    record["bytes_received"] += message_bytes(replies)
    screened = screen_replies(replies, {}, is_train=False)
    # screen_replies accepted only replies whose NUM_EXAMPLES is an int/float
    weight = sum(float(cast(float, m.content.metric_records[METRICS][NUM_EXAMPLES]))
                 for m in screened.accepted)
    agg = strategy.aggregate_evaluate(rnd, screened.accepted) if weight > 0 else None
    per_client: dict[str, list[float]] = {NDCG_GLOBAL: [], NDCG_PERSONAL: [], PNDCG_GLOBAL: [], PNDCG_PERSONAL: []}
    for m in screened.accepted:
        mr = m.content.metric_records[METRICS]
        if float(cast(float, mr[NUM_EXAMPLES])) <= 0:
            continue
        for k in per_client:
            if k in mr:
                per_client[k].append(float(cast(float, mr[k])))
    return {"aggregated": dict(agg or {}), "per_client": per_client, "failures": len(screened.failed)}


def write_checkpoint(settings: RunSettings, state: LoopState, strategy: Strategy, rnd: int, out_dir: Path) -> None:
    """``last.pt`` and ``checkpoints/round-NNN.pt``: the head, run config, strategy state and metrics so far."""
    ckpt_dir = out_dir / "checkpoints"
    model = arrays_to_head(settings, state.arrays)
    run_config, strat = settings.to_flat(), strategy_state(strategy)
    seeds = {"server": settings.server.seed, "torch": torch.initial_seed()}
    # last.pt first: once round-NNN.pt exists, resume (which reads last.pt) starts after round NNN
    for path in (out_dir / LAST, ckpt_dir / f"round-{rnd:03d}.pt"):
        save_checkpoint(path, model, run_config=run_config, round=rnd, strategy_state=strat,
                        metrics_history=state.rounds, seeds=seeds)


