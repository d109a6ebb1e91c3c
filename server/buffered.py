"""Asynchronous, buffered aggregation (``strategy.name = "fedbuff"``; the strategy is ``server.strategies.FedBuff``).

``strategy.concurrency`` devices train at once. When one finishes, its update joins the buffer and a new device
(drawn, seeded, from the idle ones) is dispatched at once with the global head of that moment; every
``strategy.buffer-size`` accepted updates the server steps the global head, weighting each update by its staleness
(server steps since its device was dispatched). Nobody waits for a straggler: a slow device's update arrives late
and counts less, instead of holding up a round or being dropped at a timeout.

Time is the simulated device clock of ``server/simclock.py``: a job's finishing time is known when it is
dispatched, so events are processed in clock order, and the training itself runs for real (through the grid, as
Flower messages to the ClientApps) only when the events are taken, in batches, each job on the head it was
dispatched with. The loop keeps what the synchronous loop guarantees: every update is decoded (``compression.*``)
and screened before it is buffered, a checkpoint is written after every server step, and the checkpoint holds the
event state (clock, jobs in flight by partition id, the heads they train on), so a resumed run continues exactly.
"""

from __future__ import annotations

import heapq
import logging
import time
from collections.abc import Callable
from dataclasses import astuple, dataclass
from pathlib import Path
from typing import Any, cast

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, RecordDict
from flwr.serverapp import Grid

from server.compression import decode_replies, encode_downlink
from server.loop import (
    LoopState,
    arrays_to_head,
    federated_eval,
    message_bytes,
    this_round_replies,
    write_checkpoint,
)
from server.simclock import job_seconds
from server.strategies import FedBuff
from server.validation import screen_replies
from shared_model.config import RunSettings
from shared_model.head import FusedRankingHead, build_head
from shared_model.records import ARRAYS, CONFIG, METRICS, NUM_EXAMPLES, SERVER_ROUND, TRAIN_LOSS

log = logging.getLogger(__name__)
_PICK_SALT = 0xB0FF


@dataclass(order=True)
class Job:
    """One dispatched training job, ordered by finishing time (then partition id: ties break the same way)."""

    finish: float
    pid: int
    version: int  # the global head's version (server steps) it trains on
    number: int  # dispatch counter: seeds the device clock's jitter
    dispatched: float


class EventState:
    """Clock, jobs in flight and the heads they train on; to and from a checkpoint's strategy state."""

    def __init__(self) -> None:
        self.clock = 0.0
        self.dispatches = 0
        self.in_flight: list[Job] = []
        self.heads: dict[int, dict[str, np.ndarray]] = {}

    def to_state(self) -> dict[str, Any]:
        jobs = torch.tensor([astuple(j) for j in self.in_flight], dtype=torch.float64).reshape(-1, 5)
        heads = {str(v): {k: torch.from_numpy(np.array(a)) for k, a in h.items()} for v, h in self.heads.items()}
        return {"clock": self.clock, "dispatches": self.dispatches, "jobs": jobs, "heads": heads}

    @classmethod
    def from_state(cls, state: dict[str, Any]) -> EventState:
        ev = cls()
        ev.clock, ev.dispatches = float(state["clock"]), int(state["dispatches"])
        ev.in_flight = [Job(float(f), int(p), int(v), int(n), float(d)) for f, p, v, n, d in state["jobs"].tolist()]
        heapq.heapify(ev.in_flight)
        ev.heads = {int(v): {k: t.numpy() for k, t in h.items()} for v, h in state["heads"].items()}
        return ev


def run_buffered(
    grid: Grid,
    strategy: FedBuff,
    settings: RunSettings,
    state: LoopState,
    out_dir: Path,
    train_config: ConfigRecord,
    central_eval: Callable[[FusedRankingHead], dict[str, float]],
    on_round: Callable[[dict[str, Any]], None] | None = None,
    max_update_norm: float | None = None,
) -> LoopState:
    """Server steps ``state.start_round .. server.num-rounds`` (a "round" here is one buffered server step)."""
    cfg = settings.server
    shared = set(build_head(settings.model).shared_state_keys())
    node_of = _nodes_by_partition(grid)
    n_parts = len(node_of)
    concurrency = min(strategy.concurrency, n_parts)
    if n_parts < strategy.buffer_size:
        raise ValueError(f"strategy.buffer-size={strategy.buffer_size} but only {n_parts} devices are connected")
    ev = EventState.from_state(strategy.async_state) if strategy.async_state and state.start_round > 1 \
        else EventState()
    version = state.start_round - 1
    current = {k: v.numpy() for k, v in state.arrays.items()}

    def dispatch(now: float) -> None:
        busy = {j.pid for j in ev.in_flight}
        idle = [p for p in sorted(node_of) if p not in busy]
        rng = np.random.default_rng([cfg.seed, _PICK_SALT, ev.dispatches])
        pid = int(idle[int(rng.integers(len(idle)))])
        took = job_seconds(settings.faults, cfg.seed, n_parts, pid, ev.dispatches)
        heapq.heappush(ev.in_flight, Job(now + took, pid, version, ev.dispatches, now))
        ev.heads.setdefault(version, current)
        ev.dispatches += 1

    while len(ev.in_flight) < concurrency:
        dispatch(ev.clock)
    for step in range(state.start_round, cfg.num_rounds + 1):
        t0 = time.perf_counter()
        buffer: list[tuple[dict[str, np.ndarray], float, int]] = []
        record: dict[str, Any] = {"round": step, "sampled": 0, "replied": 0, "accepted": 0, "failures": 0,
                                  "timeouts": 0, "rejected": 0, "rejected_reasons": [], "stale": 0,
                                  "bytes_sent": 0, "bytes_received": 0, "staleness": []}
        losses: list[tuple[float, float]] = []
        up: list[float] = []
        down: list[float] = []
        while len(buffer) < strategy.buffer_size:
            batch = []
            for _ in range(strategy.buffer_size - len(buffer)):  # take finished jobs in clock order ...
                job = heapq.heappop(ev.in_flight)
                ev.clock = job.finish
                batch.append(job)
                dispatch(ev.clock)  # ... and put a new device to work at once, on today's head
            replies, sent = _train(grid, settings, train_config, ev, batch, node_of)
            down += sent
            record["bytes_sent"] += int(sum(sent))
            record["sampled"] += len(batch)
            for job, reply in zip(batch, replies, strict=True):
                if reply is None:
                    record["timeouts"] += 1
                    continue
                got = message_bytes([reply])
                record["bytes_received"] += got
                if not reply.has_error():
                    up.append(float(got))
                record["replied"] += 1
                start = ev.heads[job.version]
                decoded, refused = decode_replies(settings.compression, [reply], start)
                screened = screen_replies(decoded, {k: v for k, v in start.items() if k in shared},
                                          max_norm=max_update_norm)
                record["failures"] += len(screened.failed)
                record["rejected_reasons"] += refused + screened.rejected
                for msg in screened.accepted:
                    arrays = msg.content.array_records[ARRAYS]
                    metrics = msg.content.metric_records[METRICS]
                    n = float(cast(float, metrics[NUM_EXAMPLES]))
                    delta = {k: arrays[k].numpy().astype(np.float32) - start[k] for k in arrays}
                    buffer.append((delta, n, version - job.version))
                    record["staleness"].append(version - job.version)
                    if TRAIN_LOSS in metrics:
                        losses.append((n, float(cast(float, metrics[TRAIN_LOSS]))))
        current = strategy.aggregate_buffer(current, buffer)
        version = step
        state.arrays = ArrayRecord({k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in current.items()})
        live = {j.version for j in ev.in_flight}
        ev.heads = {v: h for v, h in ev.heads.items() if v in live}
        record.update({
            "accepted": len(buffer), "rejected": len(record["rejected_reasons"]), "sim_time": ev.clock,
            "staleness_mean": float(np.mean(record["staleness"])) if record["staleness"] else 0.0,
            "upload_bytes_per_device": float(np.mean(up)) if up else 0.0,
            "download_bytes_per_device": float(np.mean(down)) if down else 0.0,
            "train": ({TRAIN_LOSS: sum(n * x for n, x in losses) / sum(n for n, _ in losses)} if losses else {}),
        })
        if cfg.eval_every > 0 and (step % cfg.eval_every == 0 or step == cfg.num_rounds):
            record["federated"] = federated_eval(grid, strategy, settings, state.arrays, step, record, train_config)
            record["central"] = central_eval(arrays_to_head(settings, state.arrays))
        record["seconds"] = time.perf_counter() - t0
        state.rounds.append(record)
        strategy.async_state = ev.to_state()
        write_checkpoint(settings, state, strategy, step, out_dir)
        if on_round is not None:
            on_round(record)
    return state


def _train(grid: Grid, settings: RunSettings, train_config: ConfigRecord, ev: EventState, batch: list[Job],
           node_of: dict[int, int]) -> tuple[list[Message | None], list[float]]:
    """Run the batch's jobs for real, each on the head it was dispatched with: the replies (``None`` where none
    came) and the bytes of each message sent."""
    msgs = []
    for job in batch:
        cfg = ConfigRecord({**dict(train_config), SERVER_ROUND: job.version + 1})
        arrays = ArrayRecord({k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in ev.heads[job.version].items()})
        msgs.append(Message(RecordDict({ARRAYS: arrays, CONFIG: cfg}), dst_node_id=node_of[job.pid],
                            message_type=MessageType.TRAIN))
    encode_downlink(settings.compression, msgs)
    sent = [float(message_bytes([m])) for m in msgs]
    replies, _ = this_round_replies(msgs, grid.send_and_receive(msgs, timeout=settings.server.round_timeout))
    by_id = {r.metadata.reply_to_message_id: r for r in replies}
    if len(by_id) != len(replies) or "" in by_id:  # a grid that assigns no message ids: replies in order
        return [*replies, *([None] * (len(msgs) - len(replies)))], sent
    return [by_id.get(m.metadata.message_id) for m in msgs], sent


def _nodes_by_partition(grid: Grid) -> dict[int, int]:
    """Partition id -> node id (the grid learnt partitions: ``server.nodes.PartitionOrderedGrid``)."""
    ids = list(grid.get_node_ids())
    known: dict[int, int] = dict(getattr(grid, "partition_of", {}))
    if known:
        return {pid: node for node, pid in known.items() if node in set(ids)}
    return dict(enumerate(ids))  # node order as the grid lists it
