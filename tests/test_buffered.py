"""Asynchronous buffered aggregation (FedBuff) and the simulated device clock, through the real ClientApp and
Flower's wire format: the server step against a numpy reference, event order, staleness, resume, timeouts."""

from __future__ import annotations

from pathlib import Path
from typing import cast

import numpy as np
import pytest
from flwr.serverapp import Grid
from flwr.supercore.task_identity import TaskIdentity

from client.client_app import make_client_app
from server.buffered import run_buffered
from server.loop import init_state, run_rounds
from server.simclock import job_seconds, slow_ids
from server.strategies import FedBuff, build_strategy
from shared_model.config import ConfigError, FaultConfig, load_defaults, merge_overrides, parse_run_config
from tests.local_grid import WireGrid
from tests.test_server_loop import N_CLIENTS, _setup

BUFFERED = {"strategy.name": "fedbuff", "strategy.concurrency": 3, "strategy.buffer-size": 2,
            "faults.slow-fraction": 0.25, "faults.slow-factor": 5.0}


@pytest.fixture(autouse=True)
def _task_identity() -> None:
    TaskIdentity.run_id, TaskIdentity.task_id, TaskIdentity.node_id = 1, 1, 0


def _go(tmp: Path, steps: int, extra: dict[str, object] | None = None):
    from flwr.app import ConfigRecord

    _, overrides, settings, central = _setup(tmp, "fedavg", steps, **{**BUFFERED, **(extra or {})})
    strategy = build_strategy(settings.strategy)
    state = init_state(settings, Path(settings.server.out_dir), strategy, resume=True)
    app = make_client_app(overrides)
    grid = cast(Grid, WireGrid(N_CLIENTS, lambda pid: app))
    state = run_buffered(grid, cast(FedBuff, strategy), settings, state, Path(settings.server.out_dir),
                         ConfigRecord({"propensity-eta": 1.0}), central_eval=central)
    return state, strategy, settings


def test_server_step_matches_a_numpy_reference() -> None:
    s = FedBuff(concurrency=4, buffer_size=3, staleness_exponent=0.5, buffer_lr=0.7)
    rng = np.random.default_rng(0)
    g: dict[str, np.ndarray] = {"w": rng.normal(size=(3, 2)).astype(np.float32), "step": np.array([4], np.int64)}
    ups = [({"w": rng.normal(size=(3, 2)).astype(np.float32)}, n, st) for n, st in ((10.0, 0), (5.0, 1), (20.0, 3))]
    got = s.aggregate_buffer(g, ups)
    want = g["w"] + 0.7 * (10 * ups[0][0]["w"] + 5 / np.sqrt(2) * ups[1][0]["w"] + 20 / 2 * ups[2][0]["w"]) / 35
    np.testing.assert_allclose(got["w"], want, rtol=1e-6)
    np.testing.assert_array_equal(got["step"], g["step"])  # integer buffers are not averaged


def test_clock_is_seeded_and_slow_devices_are_slower() -> None:
    cfg = FaultConfig(slow_fraction=0.3, slow_factor=5.0, job_seconds=2.0)
    slow = slow_ids(7, 100, 0.3)
    assert len(slow) == 30 and slow == slow_ids(7, 100, 0.3) and slow != slow_ids(8, 100, 0.3)
    fast_t = [job_seconds(cfg, 7, 100, p, 1) for p in range(100) if p not in slow]
    slow_t = [job_seconds(cfg, 7, 100, p, 1) for p in slow]
    assert np.median(slow_t) / np.median(fast_t) == pytest.approx(5.0, rel=0.1)
    assert np.median(fast_t) == pytest.approx(2.0, rel=0.1)
    assert job_seconds(cfg, 7, 100, 3, 1) == job_seconds(cfg, 7, 100, 3, 1)


def test_buffered_run_steps_in_clock_order_with_staleness(tmp_path: Path) -> None:
    state, strategy, settings = _go(tmp_path, steps=4)
    rounds = state.rounds
    assert [r["round"] for r in rounds] == [1, 2, 3, 4]
    assert all(r["accepted"] == 2 and r["rejected"] == 0 for r in rounds)
    times = [r["sim_time"] for r in rounds]
    assert all(b >= a for a, b in zip(times, times[1:], strict=False)) and times[0] > 0
    assert rounds[0]["staleness"] == [0, 0]  # nothing was aggregated before the first step
    assert max(s for r in rounds for s in r["staleness"]) >= 1  # a job dispatched before a step arrives after it
    assert all(np.isfinite(r["central"]["ndcg@10"]) for r in rounds)
    assert len(strategy.async_state["jobs"]) == 3  # concurrency devices always at work


def test_resumed_buffered_run_ends_like_an_uninterrupted_one(tmp_path: Path) -> None:
    full, _, _ = _go(tmp_path / "a", steps=4)
    _go(tmp_path / "b", steps=2)
    resumed, _, _ = _go(tmp_path / "b", steps=4)  # same out-dir: resumes after step 2 from last.pt
    assert len(resumed.rounds) == 4 and resumed.resumed_from == 2
    for a, b in zip(full.rounds, resumed.rounds, strict=True):
        assert a["sim_time"] == b["sim_time"] and a["staleness"] == b["staleness"]
    for k in full.arrays.keys():
        np.testing.assert_allclose(full.arrays[k].numpy(), resumed.arrays[k].numpy(), atol=1e-6)


def test_buffered_run_decodes_compressed_updates(tmp_path: Path) -> None:
    state, _, _ = _go(tmp_path, steps=2, extra={"compression.uplink": "int8"})
    assert all(r["accepted"] == 2 for r in state.rounds)
    assert 0 < state.rounds[-1]["upload_bytes_per_device"] < 0.3 * state.rounds[-1]["download_bytes_per_device"]


def test_synchronous_rounds_drop_devices_past_the_simulated_timeout(tmp_path: Path) -> None:
    from flwr.app import ConfigRecord

    extra = {"faults.slow-fraction": 0.5, "faults.slow-factor": 5.0, "faults.sim-timeout": 2.0}
    _, overrides, settings, central = _setup(tmp_path, "fedavg", 2, **extra)
    strategy = build_strategy(settings.strategy)
    state = init_state(settings, Path(settings.server.out_dir), strategy, resume=False)
    app = make_client_app(overrides)
    state = run_rounds(cast(Grid, WireGrid(N_CLIENTS, lambda pid: app)), strategy, settings, state,
                       Path(settings.server.out_dir), ConfigRecord({"propensity-eta": 1.0}), central_eval=central)
    slow = slow_ids(settings.server.seed, N_CLIENTS, 0.5)
    assert len(slow) == 2
    for r in state.rounds:  # all 4 sampled each round; the 2 slow ones (5 s) miss the 2 s timeout
        assert r["sampled"] == 4 and r["timeouts"] == 2 and r["accepted"] == 2
    assert state.rounds[-1]["sim_time"] == pytest.approx(4.0)


def test_config_refuses_buffered_with_dp_or_secagg_and_a_buffer_larger_than_concurrency() -> None:
    d = load_defaults()
    with pytest.raises(ConfigError, match="privacy.mode"):
        parse_run_config(merge_overrides(d, {"strategy.name": "fedbuff", "privacy.mode": "client-fixed"}))
    with pytest.raises(ConfigError, match="secagg.enabled"):
        parse_run_config(merge_overrides(d, {"strategy.name": "fedbuff", "secagg.enabled": True}))
    with pytest.raises(ConfigError, match="strategy.buffer-size"):
        parse_run_config(merge_overrides(d, {"strategy.buffer-size": 40, "strategy.concurrency": 30}))
