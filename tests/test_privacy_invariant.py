"""The privacy invariant: a device sends the server only head arrays and scalar metrics.

A test-only recording mod sits outermost on a ClientApp built by ``client.client_app.make_client_app`` (an outer
ClientApp whose handlers call the real one, so it sees each reply after every mod of ``client.mods``). A real
federated run (Flower's simulation engine, ``flwr.simulation.run_simulation``, the repo's own ServerApp, the tiny
smoke marketplace) sends train and evaluate messages; the mod serializes every inbound message and every reply
with Flower's own protobuf serde into a folder (the ClientApps run in Ray worker processes), and the test inspects
every reply: array records hold exactly the head's state-dict keys, with the head's shapes and a float dtype;
metric records hold int/float scalars under declared metric keys (``shared_model.records``); no config record,
no string that is an item id or a query of the marketplace. Under DP (a client-fixed run) a train reply holds
the clipped update and ``num-examples = 1`` only, and no evaluate message is sent.
"""

from __future__ import annotations

import logging
import sys
import uuid
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MessageType, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.common.serde import message_from_proto, message_to_proto
from flwr.proto.message_pb2 import Message as ProtoMessage
from ray import cloudpickle

import shared_model.records as records
from shared_model.compression import COMPRESSION, CompressionError, decode
from shared_model.config import RunSettings, parse_run_config
from shared_model.head import PERSONAL_PREFIX, build_head
from shared_model.records import ARRAYS, METRICS, NUM_EXAMPLES, PARTITION_ID

ROOT = Path(__file__).resolve().parent.parent
FLOAT_DTYPES = ("float16", "float32", "float64", "bfloat16")
# every metric key a client may send is a constant of shared_model/records.py (one place, reviewed)
DECLARED_KEYS = frozenset(v for k, v in vars(records).items() if k.isupper() and isinstance(v, str)) - {
    records.ARRAYS, records.CONFIG, records.METRICS, records.PERSONAL_STATE}
RECORD_NAMES = frozenset({ARRAYS, METRICS})


# ------------------------------------------------------------------------------------------- inspector


def _strings(content: RecordDict) -> Iterator[str]:
    """Every string a RecordDict carries: record names, array and metric keys, config keys and values."""
    for name, rec in content.items():
        yield name
        yield from rec.keys()
        if isinstance(rec, ConfigRecord):
            for v in rec.values():
                if isinstance(v, str):
                    yield v
                elif isinstance(v, bytes):
                    yield v.decode("utf-8", errors="replace")
                elif isinstance(v, list):
                    yield from (str(x) for x in v if isinstance(x, str | bytes))


def inspect_reply(msg: Message, head_shapes: Mapping[str, tuple[int, ...]],
                  forbidden: frozenset[str] = frozenset(), optional_keys: frozenset[str] = frozenset(),
                  compression: str = "none") -> list[str]:
    """What, in a reply a device sends, is not head arrays or scalar metrics (empty list: nothing).

    ``head_shapes``: the head's state-dict keys and shapes. ``optional_keys``: head keys a reply may leave out
    (personal layers). ``forbidden``: strings that must not travel (item ids, queries). ``compression``: the run's
    ``compression.uplink``; when set, a train reply's arrays must be exactly an encoded update of the head's arrays
    (int8 values and scales, or top-k indices and values, that decode to the head's shapes) and the one config
    record allowed is the scheme's name.
    """
    if msg.has_error():
        return [f"error reply: {msg.error.reason}"]
    if not msg.has_content():
        return ["reply without content"]
    content = msg.content
    problems: list[str] = []
    compressed = compression != "none" and COMPRESSION in content.config_records
    for name in content:
        if name not in RECORD_NAMES and not (compressed and name == COMPRESSION):
            problems.append(f"unexpected record {name!r} ({type(content[name]).__name__})")
    if compressed and dict(content.config_records[COMPRESSION]) != {"scheme": compression}:
        problems.append(f"compression record {dict(content.config_records[COMPRESSION])} is not the scheme alone")
    if set(content.config_records) - ({COMPRESSION} if compressed else set()):
        problems.append(f"config records {sorted(content.config_records)}: strings/bytes would travel")
    if compressed:
        return problems + _inspect_encoded(content, compression, head_shapes, optional_keys)
    for name, arrays in content.array_records.items():
        keys = set(arrays.keys())
        missing = set(head_shapes) - keys - optional_keys
        extra = keys - set(head_shapes)
        if missing or extra:
            problems.append(f"{name}: keys differ from the head's (missing {sorted(missing)[:3]}, "
                            f"unexpected {sorted(extra)[:3]})")
        for k in sorted(keys & set(head_shapes)):
            arr: Array = arrays[k]
            if str(arr.dtype) not in FLOAT_DTYPES:
                problems.append(f"{name}[{k}]: dtype {arr.dtype} is not a float dtype")
            if tuple(arr.shape) != head_shapes[k]:
                problems.append(f"{name}[{k}]: shape {tuple(arr.shape)} != head's {head_shapes[k]}")
    for name, metrics in content.metric_records.items():
        for k, v in metrics.items():
            if k not in DECLARED_KEYS:
                problems.append(f"{name}: metric key {k!r} is not declared in shared_model/records.py")
            if isinstance(v, bool) or not isinstance(v, int | float):
                problems.append(f"{name}[{k}]: {type(v).__name__} is not an int/float scalar")
    leaked = sorted({s for s in _strings(content) if s in forbidden})
    if leaked:
        problems.append(f"marketplace strings travel: {leaked[:3]}")
    return problems


def _inspect_encoded(content: RecordDict, scheme: str, head_shapes: Mapping[str, tuple[int, ...]],
                     optional_keys: frozenset[str]) -> list[str]:
    problems: list[str] = []
    if set(content.array_records) != {ARRAYS}:
        return [f"array records {sorted(content.array_records)}: only {ARRAYS!r} may travel"]
    payload = {k: v.numpy() for k, v in content.array_records[ARRAYS].items()}
    sent = {k.split("#", 1)[0] for k in payload}
    if set(head_shapes) - sent - optional_keys or sent - set(head_shapes):
        problems.append(f"encoded arrays name {sorted(sent)[:3]}..., not the head's keys")
        return problems
    try:  # decodes to exactly the head's arrays: nothing else is hidden in the payload
        decode(scheme, payload, {k: np.zeros(head_shapes[k], np.float32) for k in sent})
    except CompressionError as e:
        problems.append(f"{ARRAYS}: {e}")
    for name, metrics in content.metric_records.items():
        for k, v in metrics.items():
            if k not in DECLARED_KEYS or isinstance(v, bool) or not isinstance(v, int | float):
                problems.append(f"{name}[{k}]: not a declared int/float scalar")
    return problems


# ------------------------------------------------------------------------------------------- recording


class WireRecorder:
    """A ClientApp mod that writes every (inbound message, reply) pair it sees to ``folder`` as Flower protobufs.

    Files, not memory: in a simulation the ClientApps run in Ray worker processes."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder

    def __call__(self, msg: Message, context: Context, call_next: Any) -> Message:
        reply = call_next(msg, context)
        stem = self.folder / f"{context.node_config.get('partition-id', 'x')}-{uuid.uuid4().hex}"
        stem.with_suffix(".in").write_bytes(message_to_proto(msg).SerializeToString())
        stem.with_suffix(".out").write_bytes(message_to_proto(reply).SerializeToString())
        return reply


def recording_client_app(inner: ClientApp, folder: Path) -> ClientApp:
    """``inner`` behind an outermost recording mod: the outer app's handlers call the real ClientApp."""
    folder.mkdir(parents=True, exist_ok=True)
    outer = ClientApp(mods=[WireRecorder(folder)])

    @outer.train()
    def train(msg: Message, context: Context) -> Message:
        return inner(msg, context)

    @outer.evaluate()
    def evaluate(msg: Message, context: Context) -> Message:
        return inner(msg, context)

    @outer.query()
    def query(msg: Message, context: Context) -> Message:
        return inner(msg, context)

    return outer


def _load(path: Path) -> Message:
    return message_from_proto(ProtoMessage.FromString(path.read_bytes()))


def recorded(folder: Path) -> list[tuple[Message, Message]]:
    return [(_load(p), _load(p.with_suffix(".out"))) for p in sorted(folder.glob("*.in"))]


# ------------------------------------------------------------------------------------------- the runs


def _federated_run(tmp: Path, extra: dict[str, Any]) -> tuple[RunSettings, list[tuple[Message, Message]], Any]:
    """One round of the smoke scenario (10 devices, train + evaluate) through run_simulation, recorded."""
    from flwr.simulation import run_simulation

    from client.client_app import make_client_app
    from server.server_app import make_server_app
    from shared_model.shards import ensure_shards
    from simulations.runner import ensure_data, scenario_config

    cloudpickle.register_pickle_by_value(sys.modules[__name__])  # Ray workers cannot import this test module
    flat = scenario_config("smoke", rounds=1, out=str(tmp / "run"),
                           extra={"data.dir": str(ROOT / "data" / "tiny"), "strategy.fraction-evaluate": 1.0,
                                  **extra})
    settings = parse_run_config(flat)
    prep = ensure_data(settings, progress=False)
    ensure_shards(prep, settings)
    wire = tmp / "wire"
    logging.getLogger("flwr").setLevel(logging.WARNING)
    run_simulation(
        server_app=make_server_app(flat, progress=False),
        client_app=recording_client_app(make_client_app(flat), wire),
        num_supernodes=settings.partition.num_clients,
        backend_config={"client_resources": {"num_cpus": 1, "num_gpus": 0.0},
                        "init_args": {"num_cpus": 2, "include_dashboard": False}},
    )
    assert (tmp / "run" / "results.json").is_file(), "the federated run did not finish"
    return settings, recorded(wire), prep


def _head_shapes(settings: RunSettings) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in build_head(settings.model).state_dict().items()}


def _forbidden(prep: Any) -> frozenset[str]:
    return frozenset(prep.catalog.ids()) | frozenset(q for q in prep.log.queries if q)


@pytest.fixture(scope="module")
def default_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[RunSettings, list[tuple[Message, Message]], Any]:
    return _federated_run(tmp_path_factory.mktemp("privacy-default"), {})


@pytest.fixture(scope="module")
def personal_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[RunSettings, list[tuple[Message, Message]], Any]:
    return _federated_run(tmp_path_factory.mktemp("privacy-personal"), {"model.personal-layers": True})


def _check_every_reply(run: tuple[RunSettings, list[tuple[Message, Message]], Any], optional: frozenset[str]) -> None:
    settings, pairs, prep = run
    n = settings.partition.num_clients
    kinds = [reply.metadata.message_type for _, reply in pairs]
    # every device told its partition id once, trained and evaluated once (one round, fraction 1.0 for both)
    assert kinds.count(MessageType.TRAIN) == n and kinds.count(MessageType.EVALUATE) == n, kinds
    assert kinds.count(MessageType.QUERY) == n and len(kinds) == 3 * n, kinds
    shapes, forbidden = _head_shapes(settings), _forbidden(prep)
    assert len(forbidden) > 100  # the marketplace's item ids and queries really are checked
    problems = {f"{reply.metadata.message_type} reply of node {inbound.metadata.dst_node_id}":
                inspect_reply(reply, shapes, forbidden, optional) for inbound, reply in pairs}
    assert not {k: v for k, v in problems.items() if v}, problems
    for _, reply in pairs:
        if reply.metadata.message_type == MessageType.TRAIN:
            assert set(reply.content.array_records) == {ARRAYS} and NUM_EXAMPLES in reply.content[METRICS]
        elif reply.metadata.message_type == MessageType.QUERY:  # one integer: the shard index
            assert not reply.content.array_records and set(reply.content[METRICS].keys()) == {PARTITION_ID}
        else:  # evaluation replies carry no arrays at all
            assert not reply.content.array_records and NUM_EXAMPLES in reply.content[METRICS]


@pytest.fixture(scope="module")
def dp_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[RunSettings, list[tuple[Message, Message]], Any]:
    return _federated_run(tmp_path_factory.mktemp("privacy-dp"), {
        "privacy.mode": "client-fixed", "privacy.noise-multiplier": 0.5, "privacy.clipping-norm": 2.0})


@pytest.fixture(scope="module")
def compressed_buffered_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[RunSettings, list[tuple[Message, Message]], Any]:
    return _federated_run(tmp_path_factory.mktemp("privacy-compressed"), {
        "compression.uplink": "int8", "compression.downlink": "fp16", "strategy.name": "fedbuff",
        "strategy.concurrency": 6, "strategy.buffer-size": 4})


@pytest.fixture(scope="module")
def dp_compressed_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[RunSettings, list[tuple[Message, Message]], Any]:
    return _federated_run(tmp_path_factory.mktemp("privacy-dp-topk"), {
        "privacy.mode": "client-fixed", "privacy.noise-multiplier": 0.5, "privacy.clipping-norm": 2.0,
        "compression.uplink": "topk", "compression.topk-fraction": 0.1})


@pytest.mark.slow
def test_compressed_buffered_run_sends_only_an_encoded_update_and_scalar_metrics(compressed_buffered_run) -> None:
    """int8 updates against an fp16 global head, aggregated asynchronously: every train reply is an encoded
    update of exactly the head's arrays plus the scheme's name; evaluate and query replies are as without."""
    settings, pairs, prep = compressed_buffered_run
    shapes, forbidden = _head_shapes(settings), _forbidden(prep)
    trains = [(i, r) for i, r in pairs if r.metadata.message_type == MessageType.TRAIN]
    assert len(trains) >= 4  # one buffered step
    for _, reply in pairs:
        assert not inspect_reply(reply, shapes, forbidden, compression="int8"), inspect_reply(
            reply, shapes, forbidden, compression="int8")
    for inbound, reply in trains:
        assert all(str(a.dtype) == "float16" for a in inbound.content[ARRAYS].values())  # the fp16 downlink
        assert {str(a.dtype) for a in reply.content[ARRAYS].values()} == {"int8", "float32"}  # values, scales
        assert reply.content[COMPRESSION]["scheme"] == "int8"


@pytest.mark.slow
def test_dp_with_compression_sends_an_encoded_update_within_the_clipping_norm(dp_compressed_run) -> None:
    """client-fixed DP then top-k with error feedback: the decoded update a device sends stays within the
    clipping norm the server's noise is sized for, and carries ``num-examples = 1`` only."""
    settings, pairs, prep = dp_compressed_run
    shapes, forbidden = _head_shapes(settings), _forbidden(prep)
    kinds = [reply.metadata.message_type for _, reply in pairs]
    assert kinds.count(MessageType.TRAIN) == settings.partition.num_clients and MessageType.EVALUATE not in kinds
    for _, reply in pairs:
        assert not inspect_reply(reply, shapes, forbidden, compression="topk")
        if reply.metadata.message_type == MessageType.TRAIN:
            assert dict(reply.content[METRICS]) == {NUM_EXAMPLES: 1}
            payload = {k: v.numpy() for k, v in reply.content[ARRAYS].items()}
            delta = decode("topk", payload, {k: np.zeros(shapes[k], np.float32) for k in shapes})
            assert np.sqrt(sum(float(np.sum(d.astype(np.float64) ** 2)) for d in delta.values())) <= 2.0


@pytest.mark.slow
def test_dp_run_sends_only_clipped_arrays_and_the_constant_weight(dp_run) -> None:
    """Under DP (client-fixed here) a train reply carries the head arrays and ``num-examples = 1`` only, and no
    evaluate message is sent although the run asked for federated evaluation (strategy.fraction-evaluate 1.0)."""
    settings, pairs, prep = dp_run
    n = settings.partition.num_clients
    kinds = [reply.metadata.message_type for _, reply in pairs]
    assert kinds.count(MessageType.TRAIN) == n and kinds.count(MessageType.EVALUATE) == 0, kinds
    shapes, forbidden = _head_shapes(settings), _forbidden(prep)
    for inbound, reply in pairs:
        assert not inspect_reply(reply, shapes, forbidden), inspect_reply(reply, shapes, forbidden)
        if reply.metadata.message_type == MessageType.TRAIN:
            assert dict(reply.content[METRICS]) == {NUM_EXAMPLES: 1}
            sent, got = inbound.content[ARRAYS], reply.content[ARRAYS]
            update = np.sqrt(sum(float(np.sum((got[k].numpy().astype(np.float64) - sent[k].numpy()) ** 2))
                                 for k in got.keys()))
            assert update <= 2.0 * (1 + 1e-4)  # clipped on the device before it was sent


@pytest.mark.slow
def test_default_run_sends_only_head_arrays_and_scalar_metrics(default_run) -> None:
    _check_every_reply(default_run, optional=frozenset())


@pytest.mark.slow
def test_personal_layers_run_sends_only_head_arrays_and_scalar_metrics(personal_run) -> None:
    personal = frozenset(k for k in _head_shapes(personal_run[0]) if k.startswith(PERSONAL_PREFIX))
    assert personal  # the head has personal layers to keep
    _check_every_reply(personal_run, optional=personal)


@pytest.mark.slow
def test_personal_layers_stay_on_the_device(personal_run) -> None:
    """FedPer: a train reply leaves the personal layers out (the device keeps them in its state)."""
    _, pairs, _ = personal_run
    trains = [reply for _, reply in pairs if reply.metadata.message_type == MessageType.TRAIN]
    assert trains
    for reply in trains:
        sent_keys = set(reply.content[ARRAYS].keys())
        assert sent_keys and not {k for k in sent_keys if k.startswith(PERSONAL_PREFIX)}, sorted(sent_keys)
    travelled = []
    for inbound, reply in pairs:
        if reply.metadata.message_type != MessageType.TRAIN:
            continue
        sent, got = inbound.content[ARRAYS], reply.content[ARRAYS]
        for k in got.keys():
            if k.startswith(PERSONAL_PREFIX) and not np.array_equal(got[k].numpy(), sent[k].numpy()):
                travelled.append((inbound.metadata.dst_node_id, k))
    assert not travelled, f"{len(travelled)} device-trained personal arrays sent to the server, e.g. {travelled[:2]}"


# ------------------------------------------------------------------------------------------- the check can fail


SHAPES = {"body.0.weight": (4, 3), "out.weight": (1, 4)}




def _reply(content: RecordDict) -> Message:
    from flwr.supercore.task_identity import TaskIdentity

    if TaskIdentity._run_id is None:  # Flower's Message needs a task identity outside a run
        TaskIdentity.run_id, TaskIdentity.task_id, TaskIdentity.node_id = 1, 1, 0
    req = Message(content=RecordDict(), message_type=MessageType.TRAIN, dst_node_id=5)
    return Message(content=content, reply_to=req)


def _good() -> dict[str, Any]:
    return {ARRAYS: ArrayRecord({k: Array(np.zeros(s, np.float32)) for k, s in SHAPES.items()}),
            METRICS: MetricRecord({NUM_EXAMPLES: 12, "train-loss": 0.5})}


def test_inspector_accepts_a_clean_reply() -> None:
    assert inspect_reply(_reply(RecordDict(_good())), SHAPES, frozenset({"i17"})) == []


@pytest.mark.parametrize(("leak", "expected"), [
    ({"config": ConfigRecord({"clicked": "i17"})}, "config records"),
    ({"log": ConfigRecord({"q": b"red shoes"})}, "unexpected record 'log'"),
    ({METRICS: MetricRecord({NUM_EXAMPLES: 12, "i17": 1.0})}, "marketplace strings travel"),
    ({METRICS: MetricRecord({NUM_EXAMPLES: 12, "clicks": [1, 0, 1]})}, "is not an int/float scalar"),
    ({ARRAYS: ArrayRecord({**{k: Array(np.zeros(s, np.float32)) for k, s in SHAPES.items()},
                           "user-history": Array(np.zeros(5, np.float32))})}, "keys differ"),
    ({ARRAYS: ArrayRecord({k: Array(np.zeros(s, np.int64)) for k, s in SHAPES.items()})}, "not a float dtype"),
    ({ARRAYS: ArrayRecord({k: Array(np.zeros((2, *s), np.float32)) for k, s in SHAPES.items()})}, "shape"),
], ids=["item-id-config", "bytes-record", "item-id-metric-key", "list-metric", "extra-array", "int-array",
        "wrong-shape"])
def test_inspector_rejects_a_leak(leak: dict[str, Any], expected: str) -> None:
    content = RecordDict({**_good(), **leak})
    problems = inspect_reply(_reply(content), SHAPES, frozenset({"i17", "red shoes"}))
    assert any(expected in p for p in problems), problems


def _encoded(scheme: str, extra: dict[str, np.ndarray] | None = None) -> dict[str, Any]:
    from shared_model.compression import Codec

    payload, _ = Codec(scheme, fraction=0.5).encode({k: np.ones(s, np.float32) for k, s in SHAPES.items()},
                                                    np.random.default_rng(0))
    payload.update(extra or {})
    return {ARRAYS: ArrayRecord({k: Array(v) for k, v in payload.items()}),
            METRICS: MetricRecord({NUM_EXAMPLES: 12}), COMPRESSION: ConfigRecord({"scheme": scheme})}


@pytest.mark.parametrize("scheme", ["fp16", "int8", "topk"])
def test_inspector_accepts_an_encoded_update(scheme: str) -> None:
    assert inspect_reply(_reply(RecordDict(_encoded(scheme))), SHAPES, frozenset({"i17"}), compression=scheme) == []


@pytest.mark.parametrize(("content", "expected"), [
    (_encoded("int8", {"user-history#scale": np.ones(1, np.float32)}), "not the head's keys"),
    (_encoded("topk", {"out.weight#idx": np.array([0, 17], np.int32)}), "out.weight"),
    ({**_encoded("int8"), COMPRESSION: ConfigRecord({"scheme": "int8", "q": "red shoes"})}, "scheme alone"),
    ({**_encoded("int8"), "log": ConfigRecord({"q": "red shoes"})}, "unexpected record 'log'"),
], ids=["extra-array", "indices-past-the-tensor", "string-in-scheme-record", "extra-record"])
def test_inspector_rejects_a_leak_in_an_encoded_update(content: dict[str, Any], expected: str) -> None:
    problems = inspect_reply(_reply(RecordDict(content)), SHAPES, frozenset({"i17", "red shoes"}),
                             compression=content[COMPRESSION]["scheme"])
    assert any(expected in p for p in problems), problems
