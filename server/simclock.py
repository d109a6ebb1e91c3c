"""Simulated device time: how long a device's training job takes, for rounds and asynchronous updates alike.

A simulation runs every device on the same two cores, so wall time says nothing about a fleet where some phones
are five times slower than others. The clock here is a pure function of ``(server.seed, partition id, job)``:
a job takes ``faults.job-seconds`` times a small seeded jitter (log-normal, sigma 0.1), times
``faults.slow-factor`` on a fixed, seeded ``faults.slow-fraction`` of the devices. Synchronous rounds take as
long as their slowest device, or ``faults.sim-timeout`` when that is shorter (the devices past it miss the round);
the asynchronous loop (``server/buffered.py``) orders its events by this clock.
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np

from shared_model.config import FaultConfig

_SLOW_SALT, _JITTER_SALT = 0x5104, 0x717E
JITTER_SIGMA = 0.1


@lru_cache(maxsize=64)
def slow_ids(seed: int, num_partitions: int, fraction: float) -> frozenset[int]:
    """The fixed set of slow partition ids: ``round(fraction * num_partitions)`` of them, seeded."""
    k = int(round(fraction * num_partitions))
    rng = np.random.default_rng([seed % (1 << 63), _SLOW_SALT])
    return frozenset(int(i) for i in rng.choice(num_partitions, size=k, replace=False)) if k else frozenset()


def job_seconds(cfg: FaultConfig, seed: int, num_partitions: int, partition_id: int, job: int) -> float:
    """Simulated seconds of device ``partition_id``'s training job number ``job`` (a round, or a dispatch)."""
    rng = np.random.default_rng([seed % (1 << 63), _JITTER_SALT, partition_id, job])
    slow = partition_id in slow_ids(seed, num_partitions, cfg.slow_fraction)
    return float(cfg.job_seconds * (cfg.slow_factor if slow else 1.0) * np.exp(JITTER_SIGMA * rng.standard_normal()))
