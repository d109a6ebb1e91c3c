"""The round loop: aggregation through Flower strategies, NaN rejection, checkpoints and resume."""

from __future__ import annotations

from pathlib import Path
from typing import Any, cast

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid
from flwr.supercore.task_identity import TaskIdentity

from client.client_app import make_client_app
from server.loop import LAST, init_state, run_rounds
from server.strategies import build_strategy
from shared_model.checkpoint import load_checkpoint
from shared_model.config import load_defaults, merge_overrides, parse_run_config
from shared_model.records import ARRAYS, METRICS, NUM_EXAMPLES
from shared_model.shards import partition_users, shard_dir, write_shards
from shared_model.training import ranking_metrics, score_slates
from tests.local_grid import LocalGrid
from tests.synthetic import synthetic_prepared

N_CLIENTS = 4


@pytest.fixture(autouse=True)
def _task_identity() -> None:
    TaskIdentity.run_id, TaskIdentity.task_id, TaskIdentity.node_id = 1, 1, 0


def _setup(tmp_path: Path, strategy: str = "fedavg", rounds: int = 3, **extra: object):
    prep = synthetic_prepared(tmp_path / "data")
    overrides = {"data.dir": str(tmp_path / "data"), "partition.num-clients": N_CLIENTS, "partition.scheme": "iid",
                 "train.batch-size": 8, "strategy.name": strategy, "strategy.min-train-clients": 2,
                 "server.num-rounds": rounds, "server.out-dir": str(tmp_path / "run"), **extra}
    settings = parse_run_config(merge_overrides(load_defaults(), overrides))
    users = np.unique(prep.log.user)
    write_shards(prep, shard_dir(settings), partition_users(users, np.zeros(len(users)), "iid", N_CLIENTS))
    test, table = prep.slates("test"), prep.table()
    return prep, overrides, settings, (lambda m: ranking_metrics(score_slates(m, test, table), test))


def _run(settings, overrides, central, grid=None, resume=True):
    strategy = build_strategy(settings.strategy)
    out = Path(settings.server.out_dir)
    state = init_state(settings, out, strategy, resume=resume)
    app = make_client_app(overrides)
    grid = grid or LocalGrid(N_CLIENTS, lambda pid: app)
    cfg = ConfigRecord({"propensity-eta": 1.0})
    return run_rounds(grid, strategy, settings, state, out, cfg, central_eval=central), strategy


@pytest.mark.parametrize("strategy", ["fedavg", "fedadam"])
def test_resume_ends_like_an_uninterrupted_run(tmp_path: Path, strategy: str) -> None:
    # Prepare: one run of 3 rounds, another stopped after 2 and resumed
    _, ov, full_settings, central = _setup(tmp_path / "a", strategy, rounds=3)
    _, ov2, part_settings, central2 = _setup(tmp_path / "b", strategy, rounds=2)
    # Execute
    full, _ = _run(full_settings, ov, central)
    _run(part_settings, ov2, central2)
    resumed_settings = parse_run_config({**part_settings.to_flat(), "server.num-rounds": 3})
    resumed, strat = _run(resumed_settings, {**ov2, "server.num-rounds": 3}, central2)
    # Assert
    assert resumed.resumed_from == 2 and len(resumed.rounds) == 3
    for k in full.arrays.keys():
        np.testing.assert_allclose(full.arrays[k].numpy(), resumed.arrays[k].numpy(), atol=1e-6)
    assert full.rounds[-1]["central"]["ndcg@10"] == pytest.approx(resumed.rounds[-1]["central"]["ndcg@10"], abs=1e-6)
    if strategy == "fedadam":
        assert getattr(strat, "m_t", None) is not None


def test_every_round_is_checkpointed_atomically(tmp_path: Path) -> None:
    _, ov, settings, central = _setup(tmp_path, rounds=2)
    _run(settings, ov, central)
    out = Path(settings.server.out_dir)
    assert sorted(p.name for p in (out / "checkpoints").glob("*.pt")) == ["round-001.pt", "round-002.pt"]
    _, payload = load_checkpoint(out / LAST)
    assert payload["round"] == 2 and len(payload["metrics_history"]) == 2
    assert payload["run_config"]["strategy.name"] == "fedavg"
    assert not list(out.rglob("*.tmp"))


def test_resume_refuses_a_different_config(tmp_path: Path) -> None:
    _, ov, settings, central = _setup(tmp_path, rounds=1)
    _run(settings, ov, central)
    other = parse_run_config({**settings.to_flat(), "train.lr": 0.5})
    with pytest.raises(ValueError, match="train.lr"):
        init_state(other, Path(settings.server.out_dir), build_strategy(other.strategy), resume=True)


def test_nan_update_is_rejected_and_round_proceeds(tmp_path: Path) -> None:
    # Prepare: client 3 replies with NaN arrays
    _, ov, settings, central = _setup(tmp_path, rounds=1)
    good = make_client_app(ov)
    bad = ClientApp()

    @bad.train()
    def poisoned(msg: Message, context) -> Message:
        arrays = msg.content.array_records[ARRAYS]
        nan = ArrayRecord({k: Array(np.full_like(arrays[k].numpy(), np.nan)) for k in arrays.keys()})
        return Message(RecordDict({ARRAYS: nan, METRICS: MetricRecord({NUM_EXAMPLES: 10})}), reply_to=msg)

    grid = LocalGrid(N_CLIENTS, lambda pid: bad if pid == 3 else good)
    # Execute
    state, _ = _run(settings, ov, central, grid=grid)
    # Assert
    rec = state.rounds[0]
    assert rec["rejected"] == 1 and rec["accepted"] == N_CLIENTS - 1
    assert "non-finite" in rec["rejected_reasons"][0]
    assert all(torch.isfinite(torch.from_numpy(state.arrays[k].numpy())).all() for k in state.arrays.keys())
    assert rec["bytes_sent"] > 0 and rec["bytes_received"] > 0


def test_client_failures_are_counted_and_round_proceeds(tmp_path: Path) -> None:
    # Prepare: client 0 fails (error reply), client 1 never answers (timeout)
    from flwr.app import Error

    _, ov, settings, central = _setup(tmp_path, rounds=1)
    good = make_client_app(ov)

    class Flaky(LocalGrid):
        def send_and_receive(self, messages, *, timeout=None):
            replies = []
            for m in messages:
                pid = self.pid[m.metadata.dst_node_id]
                if pid == 0:
                    replies.append(Message(Error(code=0, reason="client crashed"), reply_to=m))
                elif pid != 1:
                    replies.append(good(m, self.contexts[m.metadata.dst_node_id]))
            return replies

    # Execute
    state, _ = _run(settings, ov, central, grid=Flaky(N_CLIENTS, lambda pid: good))
    # Assert
    rec = state.rounds[0]
    assert (rec["failures"], rec["timeouts"], rec["accepted"]) == (1, 1, N_CLIENTS - 2)
    assert "central" in rec


def test_round_below_minimum_keeps_global_head(tmp_path: Path) -> None:
    from flwr.app import Error

    extra: dict[str, Any] = {"strategy.min-train-clients": 4}
    _, ov, settings, central = _setup(tmp_path, rounds=1, **extra)

    class Down(LocalGrid):
        def send_and_receive(self, messages, *, timeout=None):
            return [Message(Error(code=0, reason="offline"), reply_to=m) for m in messages]

    strategy = build_strategy(settings.strategy)
    state0 = init_state(settings, Path(settings.server.out_dir), strategy, resume=False)
    before = {k: v.numpy().copy() for k, v in state0.arrays.items()}
    state, _ = _run(settings, ov, central, grid=Down(N_CLIENTS, lambda pid: make_client_app(ov)), resume=False)
    assert state.rounds[0]["failures"] == N_CLIENTS and state.rounds[0]["train"] == {}
    for k, v in before.items():
        np.testing.assert_array_equal(state.arrays[k].numpy(), v)


def test_merge_arrays_replaces_only_the_arrays_a_fedper_update_carries() -> None:
    import numpy as np
    from flwr.app import Array, ArrayRecord

    from server.loop import merge_arrays

    current = ArrayRecord({"body.w": Array(np.zeros((2, 2), np.float32)), "out.w": Array(np.ones(3, np.float32))})
    update = ArrayRecord({"body.w": Array(np.full((2, 2), 5.0, np.float32))})
    merged = merge_arrays(current, update)
    assert list(merged.keys()) == ["body.w", "out.w"]
    np.testing.assert_array_equal(merged["body.w"].numpy(), np.full((2, 2), 5.0))
    np.testing.assert_array_equal(merged["out.w"].numpy(), np.ones(3))
    full = ArrayRecord({"body.w": Array(np.ones((2, 2), np.float32)), "out.w": Array(np.zeros(3, np.float32))})
    assert merge_arrays(current, full) is full


def test_seeded_sampling_picks_the_same_devices_whatever_the_node_ids() -> None:
    """Node ids are random at each launch; ordered by partition id, a seeded round samples the same devices."""
    import random

    from flwr.app import ArrayRecord, ConfigRecord
    from flwr.serverapp.strategy import FedAvg

    from client.client_app import make_client_app
    from server.nodes import PartitionOrderedGrid
    from tests.local_grid import LocalGrid

    class ByNodeId(LocalGrid):  # a real grid lists its nodes in no partition order, e.g. by node id
        def get_node_ids(self):
            return sorted(self.node_ids)

    app = make_client_app()
    picked = []
    for launch in range(3):
        ids = random.Random(launch).sample(range(1, 10**9), 12)  # fresh random node ids per launch
        grid = PartitionOrderedGrid(cast(Grid, ByNodeId(12, lambda pid: app, node_ids=ids)))  # a test grid
        assert grid.learn_partitions() == {nid: i for i, nid in enumerate(ids)}
        random.seed(1234)
        msgs = FedAvg(fraction_train=0.25, min_available_nodes=2).configure_train(
            1, ArrayRecord(), ConfigRecord(), grid)
        picked.append(sorted(grid.partition_of[m.metadata.dst_node_id] for m in msgs))
    assert len(picked[0]) == 3 and picked[0] == picked[1] == picked[2]
    # without the ordering, the same seed picks other devices when the ids change
    plain = []
    for launch in range(3):
        ids = random.Random(launch).sample(range(1, 10**9), 12)
        grid0 = ByNodeId(12, lambda pid: app, node_ids=ids)
        random.seed(1234)
        msgs = FedAvg(fraction_train=0.25, min_available_nodes=2).configure_train(
            1, ArrayRecord(), ConfigRecord(), cast(Grid, grid0))
        plain.append(sorted(ids.index(m.metadata.dst_node_id) for m in msgs))
    assert not plain[0] == plain[1] == plain[2]


def test_resume_accepts_a_checkpoint_that_predates_new_config_keys_but_not_a_changed_one(tmp_path) -> None:
    from flwr.serverapp.strategy import FedAvg

    from server.loop import LAST, init_state
    from shared_model.checkpoint import load_checkpoint, save_checkpoint
    from shared_model.config import load_defaults, merge_overrides, parse_run_config
    from shared_model.head import build_head

    s = parse_run_config(merge_overrides(load_defaults(), {"server.num-rounds": 3}))
    old_config = {k: v for k, v in s.to_flat().items() if not k.startswith("faults.")}  # written before faults.*
    save_checkpoint(tmp_path / LAST, build_head(s.model, seed=0), run_config=old_config, round=2,
                    strategy_state={}, metrics_history=[{"round": 1}, {"round": 2}], seeds={})
    state = init_state(s, tmp_path, FedAvg(), resume=True)
    assert state.start_round == 3 and state.resumed_from == 2
    changed = parse_run_config(merge_overrides(load_defaults(), {"faults.crash-prob": 0.3}))
    with pytest.raises(ValueError, match=r"cannot resume, run config differs in \['faults.crash-prob'\]"):
        init_state(changed, tmp_path, FedAvg(), resume=True)
    assert load_checkpoint(tmp_path / LAST)[1]["round"] == 2  # refused resume leaves the checkpoint as it was


def test_results_json_is_strict_json_when_a_metric_is_undefined(tmp_path: Path) -> None:
    # Prepare: a round whose MRR no held-out list defines (NaN), NumPy values as the loop produces them
    import json

    from server.run import write_results

    results = {"final": {"ndcg@10": np.float32(0.5), "mrr": float("nan")}, "curve": np.array([0.1, np.inf])}

    def refuse(name: str) -> None:
        raise AssertionError(f"non-standard JSON constant {name}")

    # Execute
    write_results(tmp_path, results)
    # Assert: parses with NaN/Infinity refused; undefined values are null
    got = json.loads((tmp_path / "results.json").read_text(), parse_constant=refuse)
    assert got["final"] == {"ndcg@10": 0.5, "mrr": None} and got["curve"] == [0.1, None]
