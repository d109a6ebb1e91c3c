"""Faults injected into a simulated fleet: crashes, stragglers and Byzantine devices (``faults.*`` run config).

Every decision is a pure function of ``(server.seed, round, partition-id)``, so a run with faults is exactly
reproducible and the same device fails in the same rounds when a run is resumed:

- **crash** (``faults.crash-prob``): the device raises :class:`InjectedCrash` instead of training; Flower turns the
  exception into an error reply, which the server counts as a failure.
- **straggler** (``faults.straggler-prob``, ``faults.straggler-delay``): the device trains, then waits
  ``straggler-delay`` seconds before replying; with ``server.round-timeout`` below that delay the reply misses its
  round (counted as a timeout by the server, never aggregated into a later round).
- **Byzantine** (``faults.byzantine-fraction``): a fixed set of devices, a seeded choice of
  ``round(fraction * num-partitions)`` partition ids, misbehave in every round they are sampled:
  ``sign-flip`` replies ``global - scale * (local - global)``; ``noise`` replies ``global + N(0, sigma^2)`` with
  ``sigma = scale * ||local - global|| / sqrt(#weights)`` (a noise vector about ``scale`` times as long as the
  honest update); ``poisoned-clicks`` trains honestly on corrupted data: every click (and purchase) of each
  training slate moves to the mirrored display position (position ``p`` of ``n`` shown items -> ``n - 1 - p``),
  so the shopper's top choices become bottom items (see :func:`poison_clicks`, called by the train handler).

The mod (:func:`make_fault_mod`) is the innermost entry of ``client.mods.client_mods()``: differential privacy
and secure aggregation then see the faulty update exactly as a real faulty device would send it.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Mapping
from dataclasses import dataclass
from functools import lru_cache
from typing import Any, cast

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, Context, Message, MessageType
from flwr.clientapp.typing import ClientAppCallable, Mod

from client.settings import settings_from
from shared_model.config import FaultConfig, RunSettings
from shared_model.data import Slates
from shared_model.records import ARRAYS, CONFIG, SERVER_ROUND
from shared_model.shards import ClientData

log = logging.getLogger(__name__)

# salts keep the random streams of the different decisions independent of each other
_EVENT_SALT, _BYZANTINE_SALT, _NOISE_SALT = 0xFA17, 0xB12A, 0x0015E


class InjectedCrash(RuntimeError):
    """A simulated device crash (``faults.crash-prob``)."""


@dataclass(frozen=True)
class FaultPlan:
    """What one device does in one round."""

    crash: bool = False
    straggle: bool = False
    byzantine: bool = False


def faults_active(cfg: FaultConfig) -> bool:
    return cfg.crash_prob > 0 or cfg.straggler_prob > 0 or cfg.byzantine_fraction > 0


def _seed(value: int) -> int:
    return int(value) % (1 << 63)  # numpy seed sequences take non-negative integers


@lru_cache(maxsize=64)
def byzantine_ids(seed: int, num_partitions: int, fraction: float) -> frozenset[int]:
    """The fixed set of Byzantine partition ids: ``round(fraction * num_partitions)`` of them, seeded."""
    if num_partitions <= 0:
        raise ValueError(f"num-partitions must be positive, got {num_partitions}")
    k = int(round(fraction * num_partitions))
    rng = np.random.default_rng([_seed(seed), _BYZANTINE_SALT])
    return frozenset(int(i) for i in rng.choice(num_partitions, size=k, replace=False))


def fault_plan(cfg: FaultConfig, seed: int, server_round: int, partition_id: int, num_partitions: int) -> FaultPlan:
    """The faults of device ``partition_id`` in ``server_round``: independent Bernoulli draws for crash and
    straggling (rates ``crash-prob`` and ``straggler-prob``), membership of the Byzantine set."""
    u = np.random.default_rng([_seed(seed), _seed(server_round), _seed(partition_id), _EVENT_SALT]).random(2)
    byz = cfg.byzantine_fraction > 0 and partition_id in byzantine_ids(seed, num_partitions, cfg.byzantine_fraction)
    return FaultPlan(crash=bool(u[0] < cfg.crash_prob), straggle=bool(u[1] < cfg.straggler_prob), byzantine=byz)


# ---------------------------------------------------------------------------------------------- attacks


def _is_float(a: np.ndarray) -> bool:
    return np.issubdtype(a.dtype, np.floating)


def sign_flip_update(glob: Mapping[str, np.ndarray], local: Mapping[str, np.ndarray], scale: float) -> dict[str, np.ndarray]:
    """``global - scale * (local - global)`` for every floating array (integer buffers stay as trained)."""
    out: dict[str, np.ndarray] = {}
    for k, loc in local.items():
        if _is_float(loc):
            g = np.asarray(glob[k], np.float64)
            out[k] = (g - scale * (np.asarray(loc, np.float64) - g)).astype(loc.dtype)
        else:
            out[k] = loc
    return out


def noise_update(
    glob: Mapping[str, np.ndarray], local: Mapping[str, np.ndarray], scale: float, rng: np.random.Generator
) -> dict[str, np.ndarray]:
    """``global + N(0, sigma^2)`` per weight, ``sigma = scale * ||local - global|| / sqrt(#weights)`` (floating
    arrays, in key order; integer buffers stay as trained): a random update about ``scale`` times as long as the
    honest one."""
    keys = [k for k, v in local.items() if _is_float(v)]
    sq = sum(float(np.sum((np.asarray(local[k], np.float64) - np.asarray(glob[k], np.float64)) ** 2)) for k in keys)
    count = sum(int(local[k].size) for k in keys)
    sigma = scale * np.sqrt(sq) / np.sqrt(max(count, 1))
    out: dict[str, np.ndarray] = {}
    for k, loc in local.items():
        if _is_float(loc):
            g = np.asarray(glob[k], np.float64)
            out[k] = (g + rng.normal(0.0, sigma, size=loc.shape)).astype(loc.dtype)
        else:
            out[k] = loc
    return out


def poison_clicks(slates: Slates) -> Slates:
    """Move every click and purchase of each slate to the mirrored display position among its shown items
    (``p -> n - 1 - p`` for ``n`` valid candidates; padding stays empty). Same number of clicks per slate."""
    valid = slates.valid
    n = valid.sum(dim=1, keepdim=True)  # [N, 1]
    j = torch.arange(valid.shape[1]).unsqueeze(0).expand_as(valid)
    src = (n - 1 - j).clamp(min=0)
    keep = j < n

    def mirror(t: torch.Tensor) -> torch.Tensor:
        return torch.where(keep, torch.gather(t, 1, src), torch.zeros_like(t))

    return dataclasses.replace(slates, clicks=mirror(slates.clicks), purchases=mirror(slates.purchases))


def _partition(settings: RunSettings, node_config: Mapping[str, Any]) -> tuple[int, int]:
    if "partition-id" not in node_config:
        raise ValueError("faults.* are simulation-only: this node's node_config has no 'partition-id' "
                         "(set every faults.*-prob and faults.byzantine-fraction to 0 on a deployment)")
    pid = int(node_config["partition-id"])
    n = int(node_config.get("num-partitions", settings.partition.num_clients))
    return pid, n


def maybe_poison(settings: RunSettings, node_config: Mapping[str, Any], data: ClientData) -> ClientData:
    """The train handler's hook: a Byzantine device with ``faults.byzantine-attack = "poisoned-clicks"`` trains
    on :func:`poison_clicks` of its training sessions; every other device gets ``data`` back unchanged."""
    f = settings.faults
    if f.byzantine_fraction <= 0 or f.byzantine_attack != "poisoned-clicks":
        return data
    pid, n = _partition(settings, node_config)
    if pid not in byzantine_ids(settings.server.seed, n, f.byzantine_fraction):
        return data
    return dataclasses.replace(data, train=poison_clicks(data.train))


# ---------------------------------------------------------------------------------------------- the mod


def make_fault_mod(overrides: Mapping[str, Any] | None = None) -> Mod:
    """A Flower mod injecting the ``faults.*`` of the run config (``context.run_config`` merged over pyproject's
    defaults, then ``overrides``, as the ClientApp's handlers read it) into train messages; evaluate and query
    messages, and every message when no fault is configured, pass through untouched."""
    overrides = dict(overrides or {})

    def fault_mod(msg: Message, ctxt: Context, call_next: ClientAppCallable) -> Message:
        if msg.metadata.message_type.split(".")[0] != MessageType.TRAIN:
            return call_next(msg, ctxt)
        s = settings_from(ctxt, overrides)
        f = s.faults
        if not faults_active(f):
            return call_next(msg, ctxt)
        pid, n = _partition(s, ctxt.node_config)
        configs = msg.content.config_records
        rnd = int(cast(int, configs[CONFIG].get(SERVER_ROUND, 0))) if CONFIG in configs else 0
        plan = fault_plan(f, s.server.seed, rnd, pid, n)
        if plan.crash:
            raise InjectedCrash(f"injected crash (faults.crash-prob={f.crash_prob:g}): partition {pid}, round {rnd}")
        reply = call_next(msg, ctxt)
        if plan.byzantine and f.byzantine_attack != "poisoned-clicks" and reply.has_content() \
                and ARRAYS in reply.content.array_records:
            glob = {k: v.numpy() for k, v in msg.content.array_records[ARRAYS].items()}
            local = {k: v.numpy() for k, v in reply.content.array_records[ARRAYS].items()}
            if f.byzantine_attack == "sign-flip":
                bad = sign_flip_update(glob, local, f.byzantine_scale)
            else:
                rng = np.random.default_rng([_seed(s.server.seed), _seed(rnd), _seed(pid), _NOISE_SALT])
                bad = noise_update(glob, local, f.byzantine_scale, rng)
            reply.content[ARRAYS] = ArrayRecord({k: Array(np.ascontiguousarray(v)) for k, v in bad.items()})
        if plan.straggle and f.straggler_delay > 0:
            time.sleep(f.straggler_delay)
        return reply

    return fault_mod
