"""The bad-input matrix, Flower messages: a client reply the server must refuse (counted and logged with the
reason, never aggregated) and a train message the client cannot use (an error naming the record or key).
The file, config and CLI rows are in ``test_bad_input.py``."""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from flwr.app import (
    Array,
    ArrayRecord,
    ConfigRecord,
    Context,
    Error,
    Message,
    MessageType,
    MetricRecord,
    RecordDict,
)
from flwr.supercore.task_identity import TaskIdentity

from server.validation import screen_replies
from shared_model.config import ModelConfig, load_defaults, merge_overrides, parse_run_config
from shared_model.head import build_head
from shared_model.records import ARRAYS, CONFIG, METRICS, NUM_EXAMPLES, TRAIN_LOSS

ROOT = Path(__file__).resolve().parent.parent
HEADER = "item_id,title,description,category,brand,color,price,rating,image_path,video_frames"
ROWS = ["a1,red cotton t-shirt,,tshirt,acme,red,10,4.0,,", "a2,blue cotton t-shirt,,tshirt,acme,blue,12,4.5,,",
        "a3,ceramic coffee mug,,mug,acme,white,8,,,"]
JUDGMENTS = ["query,item_id,grade", "red t-shirt,a1,3", "red t-shirt,a2,1", "coffee mug,a3,3"]


@pytest.fixture(autouse=True)
def _task_identity() -> None:
    TaskIdentity.run_id, TaskIdentity.task_id, TaskIdentity.node_id = 1, 1, 0  # Messages built outside a run


# ------------------------------------------------------------------------------------------ messages: the server


REF = {"w": np.zeros((3, 2), np.float32), "b": np.zeros(2, np.float32)}
NODE = 4242


def _reply(arrays: dict[str, np.ndarray] | None = None, metrics: dict[str, Any] | None = None,
           kind: str = MessageType.TRAIN) -> Message:
    req = Message(content=RecordDict(), message_type=kind, dst_node_id=NODE)
    content: dict[str, Any] = {}
    if arrays is not None:
        content[ARRAYS] = ArrayRecord({k: Array(v) for k, v in arrays.items()})
    if metrics is not None:
        content[METRICS] = MetricRecord(metrics)
    return Message(content=RecordDict(content), reply_to=req)


GOOD = {"w": np.ones((3, 2), np.float32), "b": np.ones(2, np.float32)}


@dataclass(frozen=True)
class ReplyCase:
    id: str
    reply: Callable[[], Message]
    reason: str
    is_train: bool = True
    failed: bool = False  # a client error (counted as a failure), not a refused update


REPLY_CASES = [
    ReplyCase("nan-array", lambda: _reply({**GOOD, "w": np.full((3, 2), np.nan, np.float32)}, {NUM_EXAMPLES: 5}),
              "non-finite values in w"),
    ReplyCase("inf-array", lambda: _reply({**GOOD, "b": np.array([np.inf, 0], np.float32)}, {NUM_EXAMPLES: 5}),
              "non-finite values in b"),
    ReplyCase("wrong-shape", lambda: _reply({**GOOD, "w": np.ones((2, 3), np.float32)}, {NUM_EXAMPLES: 5}),
              "wrong shape for w: (2, 3) != (3, 2)"),
    ReplyCase("missing-key", lambda: _reply({"w": GOOD["w"]}, {NUM_EXAMPLES: 5}), "wrong keys (missing ['b']"),
    ReplyCase("unexpected-key", lambda: _reply({**GOOD, "clicks": np.ones(3, np.float32)}, {NUM_EXAMPLES: 5}),
              "unexpected ['clicks']"),
    ReplyCase("int-dtype", lambda: _reply({**GOOD, "b": np.ones(2, np.int64)}, {NUM_EXAMPLES: 5}),
              "wrong dtype for b: int64"),
    ReplyCase("no-arrays", lambda: _reply(None, {NUM_EXAMPLES: 5}), "no arrays"),
    ReplyCase("negative-num-examples", lambda: _reply(GOOD, {NUM_EXAMPLES: -3}), "bad num-examples=-3"),
    ReplyCase("zero-num-examples", lambda: _reply(GOOD, {NUM_EXAMPLES: 0}), "bad num-examples=0"),
    ReplyCase("nan-num-examples", lambda: _reply(GOOD, {NUM_EXAMPLES: float("nan")}), "bad num-examples=nan"),
    ReplyCase("no-num-examples", lambda: _reply(GOOD, {TRAIN_LOSS: 0.3}), "no 'num-examples' metric"),
    ReplyCase("no-metrics", lambda: _reply(GOOD, None), "no 'num-examples' metric"),
    ReplyCase("nan-train-loss", lambda: _reply(GOOD, {NUM_EXAMPLES: 5, TRAIN_LOSS: float("nan")}),
              "non-finite metric values ['train-loss']"),
    ReplyCase("eval-nan-metric", lambda: _reply(None, {NUM_EXAMPLES: 5, "ndcg@10-global": float("inf")},
                                                MessageType.EVALUATE),
              "non-finite metric values ['ndcg@10-global']", is_train=False),
    ReplyCase("eval-negative-num-examples", lambda: _reply(None, {NUM_EXAMPLES: -1}, MessageType.EVALUATE),
              "bad num-examples=-1", is_train=False),
    ReplyCase("client-error", lambda: Message(Error(code=0, reason="KeyError: 'arrays'"),
                                              reply_to=Message(RecordDict(), message_type=MessageType.TRAIN,
                                                               dst_node_id=NODE)),
              "KeyError: 'arrays'", failed=True),
]


@pytest.mark.parametrize("case", REPLY_CASES, ids=[c.id for c in REPLY_CASES])
def test_bad_reply_is_refused_and_logged_with_the_reason(case: ReplyCase, caplog: pytest.LogCaptureFixture) -> None:
    # Prepare: one good reply beside the bad one
    good = _reply(GOOD, {NUM_EXAMPLES: 5}) if case.is_train else _reply(None, {NUM_EXAMPLES: 5}, MessageType.EVALUATE)
    bad = case.reply()
    # Execute
    with caplog.at_level(logging.WARNING, logger="server.validation"):
        out = screen_replies([good, bad], REF if case.is_train else {}, is_train=case.is_train)
    # Assert: the good reply alone is aggregated; the bad one is listed and logged with its node and reason
    assert out.accepted == [good]
    listed = out.failed if case.failed else out.rejected
    assert len(listed) == 1 and len(out.failed) + len(out.rejected) == 1
    assert f"node {bad.metadata.src_node_id}" in listed[0] and case.reason in listed[0], listed
    logged = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any(case.reason in m and str(bad.metadata.src_node_id) in m for m in logged), logged


# ------------------------------------------------------------------------------------------ messages: the client


@pytest.fixture
def client_app(tmp_path: Path) -> Any:
    from client.client_app import make_client_app
    from shared_model.shards import partition_users, shard_dir, write_shards
    from tests.synthetic import synthetic_prepared

    prep = synthetic_prepared(tmp_path / "data")
    overrides = {"data.dir": str(tmp_path / "data"), "partition.num-clients": 2, "partition.scheme": "iid",
                 "train.batch-size": 8}
    settings = parse_run_config(merge_overrides(load_defaults(), overrides))
    users = np.unique(prep.log.user)
    write_shards(prep, shard_dir(settings), partition_users(users, np.zeros(len(users), np.int64), "iid", 2))
    return make_client_app(overrides)


def _head_arrays(**change: Any) -> ArrayRecord:
    state = {k: v.numpy() for k, v in build_head(ModelConfig(), seed=0).state_dict().items()}
    for k, v in change.items():
        key = k.replace("__", ".")
        if v is None:
            del state[key]
        else:
            state[key] = v
    return ArrayRecord({k: Array(np.ascontiguousarray(v)) for k, v in state.items()})


TRAIN_MESSAGE_CASES = [
    ("no-arrays", lambda: None, ValueError, ("without an 'arrays' record",)),
    ("missing-key", lambda: _head_arrays(out__bias=None), ValueError, ("does not match the head", "out.bias")),
    ("unexpected-key", lambda: _head_arrays(user__history=np.zeros(3, np.float32)), ValueError,
     ("does not match the head", "user.history")),
    ("wrong-shape", lambda: _head_arrays(out__bias=np.zeros(2, np.float32)), ValueError,
     ("size mismatch for out.bias",)),
]


@pytest.mark.parametrize(("arrays", "exc", "names"), [c[1:] for c in TRAIN_MESSAGE_CASES],
                         ids=[c[0] for c in TRAIN_MESSAGE_CASES])
def test_unusable_train_message_fails_the_client_naming_the_record_or_key(
    client_app: Any, arrays: Callable[[], ArrayRecord | None], exc: type[BaseException], names: tuple[str, ...],
) -> None:
    """The ClientApp raises (Flower turns that into an error reply, which the server counts as a failure with this
    text as the reason: see the ``client-error`` reply case above)."""
    content: dict[str, Any] = {CONFIG: ConfigRecord({"server-round": 1, "propensity-eta": 1.0})}
    if (a := arrays()) is not None:
        content[ARRAYS] = a
    msg = Message(content=RecordDict(content), message_type=MessageType.TRAIN, dst_node_id=7)
    ctx = Context(run_id=1, node_id=7, node_config={"partition-id": 0, "num-partitions": 2}, state=RecordDict(),
                  run_config={})
    with pytest.raises(exc) as info:
        client_app(msg, ctx)
    assert all(n in str(info.value) for n in names), str(info.value)
