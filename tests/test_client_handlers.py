"""ClientApp handlers with constructed Messages and Contexts; server-side screening of updates."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MessageType, MetricRecord, RecordDict
from flwr.supercore.task_identity import TaskIdentity

from client.client_app import make_client_app
from server.validation import screen_replies
from shared_model.config import ModelConfig, load_defaults, merge_overrides, parse_run_config
from shared_model.head import build_head
from shared_model.records import ARRAYS, CONFIG, METRICS, NDCG_GLOBAL, NDCG_PERSONAL, NUM_EXAMPLES
from shared_model.shards import load_shard, partition_users, shard_dir, write_shards
from tests.synthetic import synthetic_prepared


@pytest.fixture(autouse=True)
def _task_identity() -> None:
    TaskIdentity.run_id, TaskIdentity.task_id, TaskIdentity.node_id = 1, 1, 0


@pytest.fixture
def setup(tmp_path: Path) -> tuple[dict, list[Path]]:
    prep = synthetic_prepared(tmp_path / "data")
    overrides = {"data.dir": str(tmp_path / "data"), "partition.num-clients": 4, "partition.scheme": "iid",
                 "train.batch-size": 8}
    settings = parse_run_config(merge_overrides(load_defaults(), overrides))
    users = np.unique(prep.log.user)
    clients = partition_users(users, np.zeros(len(users), np.int64), "iid", 4, seed=0)
    shards = write_shards(prep, shard_dir(settings), clients)
    return overrides, shards


def _message(kind: str, arrays: ArrayRecord, rnd: int = 1) -> Message:
    cfg = ConfigRecord({"server-round": rnd, "propensity-eta": 1.0})
    return Message(content=RecordDict({ARRAYS: arrays, CONFIG: cfg}), message_type=kind, dst_node_id=7)


def _context(pid: int) -> Context:
    return Context(run_id=1, node_id=7, node_config={"partition-id": pid, "num-partitions": 4},
                   state=RecordDict(), run_config={})


def test_train_returns_updated_head_and_scalar_metrics(setup) -> None:
    # Prepare
    overrides, shards = setup
    app = make_client_app(overrides)
    head = build_head(ModelConfig(), seed=0)
    arrays = ArrayRecord(head.state_dict())
    # Execute
    reply = app(_message(MessageType.TRAIN, arrays), _context(0))
    # Assert
    content = reply.content
    assert set(content.array_records) == {ARRAYS} and set(content.metric_records) == {METRICS}
    assert not content.config_records
    new = content.array_records[ARRAYS]
    assert set(new.keys()) == set(arrays.keys())
    changed = any(not np.allclose(new[k].numpy(), arrays[k].numpy()) for k in arrays.keys())
    assert changed
    metrics = content[METRICS]
    assert metrics[NUM_EXAMPLES] == len(load_shard(shards[0]).train)
    assert all(isinstance(v, int | float) for v in metrics.values())


def test_train_is_deterministic_per_round_and_client(setup) -> None:
    overrides, _ = setup
    app = make_client_app(overrides)
    arrays = ArrayRecord(build_head(ModelConfig(), seed=0).state_dict())
    a = app(_message(MessageType.TRAIN, arrays), _context(1)).content.array_records[ARRAYS]
    b = app(_message(MessageType.TRAIN, arrays), _context(1)).content.array_records[ARRAYS]
    for k in a.keys():
        np.testing.assert_array_equal(a[k].numpy(), b[k].numpy())


def test_evaluate_reports_global_and_personal_ndcg(setup) -> None:
    overrides, _ = setup
    app = make_client_app({**overrides, "train.finetune-steps": 3})
    arrays = ArrayRecord(build_head(ModelConfig(), seed=0).state_dict())
    reply = app(_message(MessageType.EVALUATE, arrays), _context(2))
    metrics = reply.content.metric_records[METRICS]
    assert not reply.content.array_records
    assert {NUM_EXAMPLES, NDCG_GLOBAL, NDCG_PERSONAL} <= set(metrics.keys())
    ndcg_global, ndcg_personal = metrics[NDCG_GLOBAL], metrics[NDCG_PERSONAL]
    assert isinstance(ndcg_global, int | float) and isinstance(ndcg_personal, int | float)
    assert 0.0 <= ndcg_global <= 1.0 and 0.0 <= ndcg_personal <= 1.0


def test_personal_layers_stay_in_client_state(setup) -> None:
    overrides, _ = setup
    app = make_client_app({**overrides, "model.personal-layers": True})
    arrays = ArrayRecord(build_head(ModelConfig(personal_layers=True), seed=0).state_dict())
    ctx = _context(0)
    app(_message(MessageType.TRAIN, arrays), ctx)
    assert "personal-layers" in ctx.state.array_records
    assert all(k.startswith("out.") for k in ctx.state.array_records["personal-layers"].keys())


def _reply(arrays: dict[str, np.ndarray], n: int = 5) -> Message:
    req = Message(content=RecordDict(), message_type=MessageType.TRAIN, dst_node_id=3)
    content = RecordDict({ARRAYS: ArrayRecord({k: Array(v) for k, v in arrays.items()}),
                          METRICS: MetricRecord({NUM_EXAMPLES: n})})
    return Message(content=content, reply_to=req)


def test_screening_rejects_nan_and_wrong_shapes() -> None:
    # Prepare
    ref = {"w": np.zeros((3, 2), np.float32), "b": np.zeros(2, np.float32)}
    good = _reply({"w": np.ones((3, 2), np.float32), "b": np.ones(2, np.float32)})
    nan = _reply({"w": np.full((3, 2), np.nan, np.float32), "b": np.ones(2, np.float32)})
    inf = _reply({"w": np.ones((3, 2), np.float32), "b": np.array([np.inf, 0], np.float32)})
    shape = _reply({"w": np.ones((2, 3), np.float32), "b": np.ones(2, np.float32)})
    keys = _reply({"w": np.ones((3, 2), np.float32)})
    zero = _reply({"w": np.ones((3, 2), np.float32), "b": np.ones(2, np.float32)}, n=0)
    # Execute
    out = screen_replies([good, nan, inf, shape, keys, zero], ref)
    # Assert
    assert out.accepted == [good]
    assert len(out.rejected) == 5
    assert any("non-finite" in r for r in out.rejected) and any("wrong shape" in r for r in out.rejected)


def test_screening_norm_bound() -> None:
    ref = {"w": np.zeros(4, np.float32)}
    out = screen_replies([_reply({"w": np.full(4, 10.0, np.float32)})], ref, max_norm=5.0)
    assert not out.accepted and "norm" in out.rejected[0]
