"""The packed shard store (one store per partitioning instead of one file per device) and the train-time metric.

Fast: a synthetic prepared data set, no simulator, no encoders, no Ray.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from shared_model.config import load_defaults, merge_overrides, parse_run_config
from shared_model.prepared import Prepared
from shared_model.shards import (
    PACKED_DIR,
    PACKED_INDEX,
    ClientData,
    ensure_shards,
    load_partition,
    load_shard,
    partition_users,
    shard_dir,
    shard_path,
    write_packed,
    write_shards,
)
from tests.synthetic import synthetic_prepared


def _assert_same(a: ClientData, b: ClientData) -> None:
    assert a.num_users == b.num_users
    for name in ("text", "image", "video", "mask", "dense"):
        x, y = getattr(a.table, name), getattr(b.table, name)
        assert x.dtype == y.dtype and torch.equal(x, y), name
    for part in ("train", "test"):
        sa, sb = getattr(a, part), getattr(b, part)
        fields = [f.name for f in dataclasses.fields(sa)]
        assert fields == [f.name for f in dataclasses.fields(sb)]
        for f in fields:
            x, y = getattr(sa, f), getattr(sb, f)
            if isinstance(x, torch.Tensor):
                assert x.dtype == y.dtype and x.shape == y.shape and torch.equal(x, y), f"{part}.{f}"
            elif isinstance(x, np.ndarray):
                np.testing.assert_array_equal(x, y, err_msg=f"{part}.{f}")
            else:
                assert x == y, f"{part}.{f}"


def _clients(prep: Prepared, scheme: str, n: int) -> list[np.ndarray]:
    users = np.unique(prep.log.user)
    return partition_users(users, np.zeros(len(users), np.int64), scheme, n, seed=0)


@pytest.mark.parametrize(("scheme", "n"), [("natural", 8), ("iid", 3)])
def test_packed_store_equals_per_file_shards_exactly(tmp_path: Path, scheme: str, n: int) -> None:
    # Prepare
    prep = synthetic_prepared(tmp_path / "d")
    clients = _clients(prep, scheme, n)
    files = write_shards(prep, tmp_path / "files", clients)
    # Execute
    store = write_packed(prep, tmp_path / "packed-parts", clients)
    # Assert: every partition, through load_partition and through a `<cid>.npz` path beside the store
    for cid, path in enumerate(files):
        expected = load_shard(path)
        _assert_same(load_partition(store, cid), expected)
        _assert_same(load_shard(tmp_path / "packed-parts" / f"{cid}.npz"), expected)


def test_client_without_sessions_loads_empty(tmp_path: Path) -> None:
    prep = synthetic_prepared(tmp_path / "d")
    clients = [np.array([0]), np.array([999]), np.array([1, 2])]  # user 999 has no sessions
    store = write_packed(prep, tmp_path / "s", clients)
    data = load_partition(store, 1)
    assert len(data.train) == 0 and len(data.test) == 0 and data.table.text.shape[0] == 0
    _assert_same(load_partition(store, 2), load_shard(write_shards(prep, tmp_path / "f", clients)[2]))


def test_bad_partition_id_names_store_and_id(tmp_path: Path) -> None:
    prep = synthetic_prepared(tmp_path / "d")
    store = write_packed(prep, tmp_path / "s", _clients(prep, "iid", 3))
    with pytest.raises(FileNotFoundError, match=r"index\.json: no partition 3 .*0\.\.2"):
        load_partition(store, 3)
    with pytest.raises(FileNotFoundError, match=r"no partition -1"):
        load_partition(store, -1)
    with pytest.raises(FileNotFoundError, match=r"index\.json: no partition 7 "):
        load_shard(tmp_path / "s" / "7.npz")


def test_missing_shard_and_missing_store_are_clear_errors(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"5\.npz: client shard not found"):
        load_shard(tmp_path / "nowhere" / "5.npz")
    with pytest.raises(FileNotFoundError, match=r"index\.json: packed shard store not found"):
        load_partition(tmp_path / "nowhere", 0)
    prep = synthetic_prepared(tmp_path / "d")
    write_packed(prep, tmp_path / "s", _clients(prep, "iid", 2))
    with pytest.raises(FileNotFoundError, match=r"notanid\.npz: client shard not found"):
        load_shard(tmp_path / "s" / "notanid.npz")


def test_damaged_store_names_the_file(tmp_path: Path) -> None:
    prep = synthetic_prepared(tmp_path / "d")
    store = write_packed(prep, tmp_path / "s", _clients(prep, "iid", 2))
    np.save(store / "log_clicks.npy", np.zeros(3, np.uint8))  # wrong length: the index disagrees
    index = store / PACKED_INDEX
    index.write_text(index.read_text())  # a new mtime: the store is opened again
    with pytest.raises(ValueError, match=r"log_clicks\.npy: shape \[3\]"):
        load_partition(store, 0)
    index.write_text(json.dumps({**json.loads(index.read_text()), "format": 99}))
    with pytest.raises(ValueError, match=r"index\.json: packed shard format 99"):
        load_partition(store, 0)


def test_ensure_shards_writes_one_store_not_a_file_per_client(tmp_path: Path) -> None:
    # Prepare
    prep = synthetic_prepared(tmp_path / "data")
    flat = merge_overrides(load_defaults(), {"data.dir": str(tmp_path / "data"), "partition.num-clients": 8})
    settings = parse_run_config(flat)
    # Execute
    paths = ensure_shards(prep, settings, layout="packed")
    again = ensure_shards(prep, settings)  # complete (and `auto` takes it): nothing rewritten
    # Assert
    folder = shard_dir(settings)
    assert paths == again == [folder / f"{c}.npz" for c in range(8)]
    assert not list(folder.glob("*.npz")) and (folder / PACKED_DIR / PACKED_INDEX).is_file()
    assert not [p for p in folder.iterdir() if p.name.startswith(".")]  # no staging or lock left behind
    node = shard_path(settings, {"partition-id": 5, "num-partitions": 8})
    assert node == paths[5] and len(load_shard(node).train) > 0


def test_existing_per_file_shards_are_still_used(tmp_path: Path) -> None:
    prep = synthetic_prepared(tmp_path / "data")
    flat = merge_overrides(load_defaults(), {"data.dir": str(tmp_path / "data"), "partition.num-clients": 8})
    settings = parse_run_config(flat)
    write_shards(prep, shard_dir(settings), _clients(prep, "natural", 8))  # an earlier version's layout
    paths = ensure_shards(prep, settings, layout="packed")
    assert all(p.is_file() for p in paths) and not (shard_dir(settings) / PACKED_DIR).exists()


def test_files_layout_writes_per_file_shards_even_beside_a_store(tmp_path: Path) -> None:
    # Prepare: a simulation packed this partitioning first
    prep = synthetic_prepared(tmp_path / "data")
    flat = merge_overrides(load_defaults(), {"data.dir": str(tmp_path / "data"), "partition.num-clients": 8})
    settings = parse_run_config(flat)
    packed = ensure_shards(prep, settings, layout="packed")
    # Execute: what a deployment needs, one file per SuperNode
    files = ensure_shards(prep, settings, layout="files")
    # Assert
    assert files == packed and all(p.is_file() for p in files)
    for cid, path in enumerate(files):
        _assert_same(load_shard(path), load_partition(shard_dir(settings) / PACKED_DIR, cid))
    with pytest.raises(ValueError, match="shard layout 'zip'"):
        ensure_shards(prep, settings, layout="zip")


def test_auto_layout_without_shards_writes_files(tmp_path: Path) -> None:
    prep = synthetic_prepared(tmp_path / "data")
    flat = merge_overrides(load_defaults(), {"data.dir": str(tmp_path / "data"), "partition.num-clients": 4,
                                             "partition.scheme": "iid"})
    paths = ensure_shards(prep, parse_run_config(flat))
    assert all(p.is_file() for p in paths)


class _FakeMeta:
    def __init__(self, dst: int, expired: bool = False) -> None:
        self.dst_node_id, self.delivered_at, self.expired = dst, "", expired


class _FakeMsg:
    def __init__(self, dst: int, expired: bool = False) -> None:
        self.metadata = _FakeMeta(dst, expired)


class _FakeState:
    """What _deliver_pending uses of Flower's InMemoryLinkState: its lock, message store and expiry check."""

    def __init__(self, msgs: dict[str, _FakeMsg]) -> None:
        import threading

        self.lock = threading.RLock()
        self.message_ins_store = dict(msgs)
        self.checked: list[set[str]] = []

    def _check_stored_messages(self, ids: set[str]) -> None:
        self.checked.append(set(ids))
        for mid in ids:
            if self.message_ins_store[mid].metadata.expired:
                del self.message_ins_store[mid]


def test_one_pass_delivery_hands_each_pending_message_once() -> None:
    from simulations.runner import _deliver_pending

    # Prepare: two pending for known nodes, one already delivered, one expired, one for an unknown node
    msgs = {"a": _FakeMsg(1), "b": _FakeMsg(2), "c": _FakeMsg(1), "d": _FakeMsg(3, expired=True), "e": _FakeMsg(99)}
    msgs["c"].metadata.delivered_at = "earlier"
    state = _FakeState(msgs)
    nodes = {1: 0, 2: 1, 3: 2}
    # Execute
    first = _deliver_pending(state, nodes)
    second = _deliver_pending(state, nodes)
    # Assert
    assert [m.metadata.dst_node_id for m in first] == [1, 2] and second == []
    assert all(m.metadata.delivered_at not in ("", "earlier") for m in first)
    assert state.checked == [{"a", "b", "d"}] and "d" not in state.message_ins_store  # expired: dropped
    assert msgs["e"].metadata.delivered_at == ""  # not a node of this simulation


def test_client_app_travels_as_its_run_config() -> None:
    import cloudpickle
    from flwr.app import ConfigRecord, Context, Message, MessageType, RecordDict
    from flwr.supercore.task_identity import TaskIdentity

    from shared_model.records import CONFIG, METRICS, PARTITION_ID
    from simulations.runner import client_app_for, scenario_config

    # Prepare
    TaskIdentity.run_id, TaskIdentity.task_id, TaskIdentity.node_id = 1, 1, 0
    flat = scenario_config("smoke")
    app = client_app_for(flat)
    # Execute: what Flower's Ray backend sends with every message
    payload = cloudpickle.dumps(lambda: app)
    unpickled = cloudpickle.loads(payload)()
    msg = Message(RecordDict({CONFIG: ConfigRecord({})}), dst_node_id=7, message_type=MessageType.QUERY)
    ctx = Context(run_id=1, node_id=7, node_config={"partition-id": 3}, state=RecordDict(), run_config={})
    reply = unpickled(msg, ctx)
    # Assert: a few KB, one app per process and config, and it answers like the original
    assert len(payload) < 8_000
    assert cloudpickle.loads(payload)() is unpickled
    assert reply.content.metric_records[METRICS][PARTITION_ID] == 3
