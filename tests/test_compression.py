"""Update compression: the codecs against numpy references, the device's mod and the server's decoding, and
whole rounds through the real ClientApp and Flower's wire format (bytes from Flower's own accounting)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.supercore.task_identity import TaskIdentity

from client.compression import make_compression_mod
from server.compression import decode_replies, encode_downlink
from shared_model.compression import (
    COMPRESSION,
    IDX,
    RESIDUAL,
    SCALE,
    VAL,
    Codec,
    CompressionError,
    decode,
    quantize_int8,
    top_k,
)
from shared_model.config import (
    CompressionConfig,
    ConfigError,
    load_defaults,
    merge_overrides,
    parse_run_config,
)
from shared_model.records import ARRAYS, CONFIG, METRICS, NUM_EXAMPLES, SERVER_ROUND
from tests.local_grid import WireGrid

RNG = np.random.default_rng(0)
DELTA = {"w": RNG.normal(size=(6, 5)).astype(np.float32), "b": RNG.normal(size=7).astype(np.float32)}


@pytest.fixture(autouse=True)
def _task_identity() -> None:
    TaskIdentity.run_id, TaskIdentity.task_id, TaskIdentity.node_id = 1, 1, 0


# --- codecs ---------------------------------------------------------------------------------------------------


def test_int8_nearest_is_within_half_a_step_and_scales_match_numpy() -> None:
    x = DELTA["w"]
    q, scale = quantize_int8(x, per_channel=False, rng=None)
    assert q.dtype == np.int8 and scale.shape == (1,)
    assert scale[0] == pytest.approx(np.abs(x).max() / 127)
    assert np.abs(q * scale - x).max() <= scale / 2 + 1e-7
    qc, sc = quantize_int8(x, per_channel=True, rng=None)
    np.testing.assert_allclose(sc, np.abs(x).max(axis=1) / 127, rtol=1e-6)
    assert np.all(np.abs(qc * sc[:, None] - x) <= sc[:, None] / 2 + 1e-7)
    assert np.abs(qc * sc[:, None] - x).mean() < np.abs(q * scale - x).mean()  # finer scales, smaller error


def test_int8_stochastic_rounding_is_unbiased_and_stays_on_the_grid() -> None:
    x = np.array([0.3, -0.71, 0.05, 1.0], np.float32)
    rng = np.random.default_rng(1)
    draws = []
    for _ in range(4000):
        q, s = quantize_int8(x, per_channel=False, rng=rng)
        draws.append(q.astype(np.float64) * s)
        assert np.all(np.abs(q * s - x) < s + 1e-7)  # one of the two neighbouring grid points
    np.testing.assert_allclose(np.mean(draws, axis=0), x, atol=3e-4)  # E[q * s] = x (std of mean ~ 6e-5)


def test_all_zero_tensor_quantizes_to_zero() -> None:
    q, s = quantize_int8(np.zeros((3, 2), np.float32), per_channel=True, rng=np.random.default_rng(0))
    assert not q.any() and not s.any()
    np.testing.assert_array_equal(decode("int8", {"z": q, "z" + SCALE: s}, {"z": np.zeros((3, 2))})["z"], 0)


def test_top_k_keeps_exactly_the_largest_magnitudes() -> None:
    x = DELTA["w"]
    idx, val = top_k(x, 0.2)
    k = int(np.ceil(0.2 * x.size))
    assert len(idx) == k and np.all(np.diff(idx) > 0)
    np.testing.assert_array_equal(np.sort(idx), np.sort(np.argsort(-np.abs(x.ravel()), kind="stable")[:k]))
    np.testing.assert_array_equal(val, x.ravel()[idx])


@pytest.mark.parametrize("scheme", ["fp16", "int8", "topk"])
def test_decode_inverts_encode(scheme: str) -> None:
    codec = Codec(scheme, granularity="channel", fraction=0.3)
    payload, sent = codec.encode(DELTA, np.random.default_rng(0))
    ref = {k: np.full_like(v, 0.5) for k, v in DELTA.items()}
    got = decode(scheme, payload, ref)
    for k in DELTA:
        np.testing.assert_allclose(got[k], ref[k] + sent[k], rtol=0, atol=1e-6)
    if scheme == "fp16":
        np.testing.assert_array_equal(sent["w"], DELTA["w"].astype(np.float16).astype(np.float32))
    nbytes = sum(a.nbytes for a in payload.values())
    full = sum(a.nbytes for a in DELTA.values())
    assert nbytes < full


def test_error_feedback_loses_nothing_over_rounds() -> None:
    """Telescoping: everything sent plus the final residual equals everything learnt (to float rounding)."""
    codec = Codec("topk", fraction=0.1)
    rng = np.random.default_rng(3)
    residual = {k: np.zeros_like(v) for k, v in DELTA.items()}
    total_learnt = {k: np.zeros_like(v) for k, v in DELTA.items()}
    total_sent = {k: np.zeros_like(v) for k, v in DELTA.items()}
    for _ in range(12):
        learnt = {k: rng.normal(size=v.shape).astype(np.float32) for k, v in DELTA.items()}
        delta = {k: learnt[k] + residual[k] for k in learnt}
        _, sent = codec.encode(delta, rng)
        residual = {k: delta[k] - sent[k] for k in delta}
        for k in learnt:
            total_learnt[k] += learnt[k]
            total_sent[k] += sent[k]
    for k in DELTA:
        np.testing.assert_allclose(total_sent[k] + residual[k], total_learnt[k], atol=1e-5)


@pytest.mark.parametrize(("scheme", "payload", "needle"), [
    ("int8", {"w": np.zeros((6, 5), np.int8)}, "w#scale"),
    ("int8", {"w": np.zeros((6, 5), np.float32), "w" + SCALE: np.float32(1)}, "dtype"),
    ("int8", {"w": np.zeros((5, 6), np.int8), "w" + SCALE: np.float32(1)}, "expected int8(6, 5)"),
    ("topk", {"w" + IDX: np.array([0, 99], np.int32), "w" + VAL: np.ones(2, np.float32)}, "indices below 30"),
    ("topk", {"w" + IDX: np.array([3, 1], np.int32), "w" + VAL: np.ones(2, np.float32)}, "sorted"),
    ("fp16", {"w": np.full((6, 5), np.inf, np.float16)}, "non-finite"),
])
def test_bad_payloads_are_refused_naming_the_array(scheme: str, payload: dict, needle: str) -> None:
    with pytest.raises(CompressionError, match=needle.replace("(", r"\(").replace(")", r"\)")):
        decode(scheme, payload, {"w": np.zeros((6, 5), np.float32)})


def test_config_refuses_what_does_not_compose() -> None:
    defaults = load_defaults()
    with pytest.raises(ConfigError, match="secagg.enabled.*compression.uplink"):
        parse_run_config(merge_overrides(defaults, {"secagg.enabled": True, "compression.uplink": "int8"}))
    with pytest.raises(ConfigError, match="compression.uplink"):
        CompressionConfig(uplink="int4")
    with pytest.raises(ConfigError, match="compression.topk-fraction"):
        CompressionConfig(uplink="topk", topk_fraction=0.0)
    with pytest.raises(ConfigError, match="compression.downlink"):
        CompressionConfig(downlink="bf16")


# --- the device's mod and the server's decoding -----------------------------------------------------------------


def _train_message(arrays: dict[str, np.ndarray], rnd: int = 1) -> Message:
    content = RecordDict({ARRAYS: ArrayRecord({k: Array(v) for k, v in arrays.items()}),
                          CONFIG: ConfigRecord({SERVER_ROUND: rnd})})
    return Message(content=content, dst_node_id=5, message_type="train")


def _handler(learnt: dict[str, np.ndarray]):
    def call_next(msg: Message, ctxt: Context) -> Message:
        got = {k: v.numpy() for k, v in msg.content.array_records[ARRAYS].items()}
        assert all(v.dtype == np.float32 for v in got.values())  # the handler never sees fp16
        out = {k: got[k] + learnt[k] for k in got}
        content = RecordDict({ARRAYS: ArrayRecord({k: Array(v) for k, v in out.items()}),
                              METRICS: MetricRecord({NUM_EXAMPLES: 3})})
        return Message(content=content, reply_to=msg)
    return call_next


def _context(overrides: dict) -> Context:
    return Context(run_id=1, node_id=5, node_config={"partition-id": 0}, state=RecordDict(),
                   run_config=merge_overrides(load_defaults(), overrides))


@pytest.mark.parametrize("downlink", ["fp32", "fp16"])
def test_device_encodes_the_delta_and_the_server_recovers_it(downlink: str) -> None:
    overrides = {"compression.uplink": "topk", "compression.topk-fraction": 0.25, "compression.downlink": downlink}
    cfg = parse_run_config(merge_overrides(load_defaults(), overrides)).compression
    mod, ctxt = make_compression_mod(), _context(overrides)
    global_head = {k: np.full_like(v, 0.1) for k, v in DELTA.items()}
    residual = {k: np.zeros_like(v) for k, v in DELTA.items()}
    for rnd in (1, 2):
        msg = _train_message(global_head, rnd)
        encode_downlink(cfg, [msg])
        sent_dtype = msg.content.array_records[ARRAYS]["w"].numpy().dtype
        assert sent_dtype == (np.float16 if downlink == "fp16" else np.float32)
        reply = mod(msg, ctxt, _handler(DELTA))
        assert set(reply.content.array_records[ARRAYS].keys()) == {f"{k}{s}" for k in DELTA for s in (IDX, VAL)}
        assert reply.content.config_records[COMPRESSION]["scheme"] == "topk"
        stored = {k: v.numpy() for k, v in ctxt.state.array_records[RESIDUAL].items()}
        (decoded,), refused = decode_replies(cfg, [reply], global_head)
        assert not refused and COMPRESSION not in decoded.content.config_records
        got = {k: v.numpy() for k, v in decoded.content.array_records[ARRAYS].items()}
        for k in DELTA:
            # what arrived + what stayed on the device = what was learnt (+ the residual carried in)
            np.testing.assert_allclose(got[k] - global_head[k] + stored[k], DELTA[k] + residual[k], atol=2e-3)
        residual = stored


def test_server_refuses_a_reply_in_another_scheme_or_with_bad_arrays() -> None:
    cfg = CompressionConfig(uplink="int8")
    reference = {k: np.zeros_like(v) for k, v in DELTA.items()}
    fp16 = Codec("fp16").encode(DELTA, np.random.default_rng(0))[0]
    wrong = Message(content=RecordDict({ARRAYS: ArrayRecord({k: Array(v) for k, v in fp16.items()}),
                                        METRICS: MetricRecord({NUM_EXAMPLES: 1}),
                                        COMPRESSION: ConfigRecord({"scheme": "fp16"})}), reply_to=_train_message(reference))
    int8 = Codec("int8").encode(DELTA, np.random.default_rng(0))[0]
    int8["b" + SCALE] = np.ones(3, np.float32)  # a per-channel scale for a 1-D tensor
    bad = Message(content=RecordDict({ARRAYS: ArrayRecord({k: Array(v) for k, v in int8.items()}),
                                      METRICS: MetricRecord({NUM_EXAMPLES: 1}),
                                      COMPRESSION: ConfigRecord({"scheme": "int8"})}), reply_to=_train_message(reference))
    kept, refused = decode_replies(cfg, [wrong, bad], reference)
    assert kept == [] and len(refused) == 2
    assert "compressed as 'fp16'" in refused[0] and "b#scale" in refused[1]


# --- whole rounds through the real ClientApp and Flower's serde -------------------------------------------------


def _rounds(tmp_path: Path, **compression: object) -> list[dict]:
    from tests.test_server_loop import N_CLIENTS, _run, _setup

    extra: dict[str, object] = {f"compression.{k}": v for k, v in compression.items()}
    _, overrides, settings, central = _setup(tmp_path, "fedavg", 2, **extra)
    from client.client_app import make_client_app

    app = make_client_app(overrides)
    state, _ = _run(settings, overrides, central, grid=WireGrid(N_CLIENTS, lambda pid: app))
    return state.rounds


def test_uplink_bytes_shrink_as_the_codec_says_and_training_still_works(tmp_path: Path) -> None:
    plain = _rounds(tmp_path / "plain")
    int8 = _rounds(tmp_path / "int8", uplink="int8", downlink="fp16")
    top = _rounds(tmp_path / "topk", uplink="topk", **{"topk-fraction": 0.01})
    up = {name: r[-1]["upload_bytes_per_device"] for name, r in (("plain", plain), ("int8", int8), ("topk", top))}
    down = {name: r[-1]["download_bytes_per_device"] for name, r in (("plain", plain), ("int8", int8))}
    # int8: a quarter of fp32 plus scales and Flower's per-array overhead; top-k 1%: 8 bytes per kept entry
    assert 0.24 < up["int8"] / up["plain"] < 0.30
    assert up["topk"] / up["plain"] < 0.05
    assert 0.49 < down["int8"] / down["plain"] < 0.55
    for rounds in (plain, int8, top):
        assert all(r["accepted"] == r["sampled"] and r["rejected"] == 0 for r in rounds)
    # int8 with stochastic rounding tracks the uncompressed run closely on this tiny problem
    assert int8[-1]["central"]["ndcg@10"] == pytest.approx(plain[-1]["central"]["ndcg@10"], abs=0.05)


@pytest.mark.parametrize("scheme", ["fp16", "int8", "topk"])
def test_within_norm_bounds_the_decoded_update(scheme: str) -> None:
    codec = Codec(scheme, fraction=0.5)
    payload, sent = codec.encode(DELTA, np.random.default_rng(0))
    norm = np.sqrt(sum(float(np.sum(v.astype(np.float64) ** 2)) for v in sent.values()))
    for bound in (norm * 2, norm / 3):
        p2, s2 = codec.within_norm(payload, sent, bound)
        got = decode(scheme, p2, {k: np.zeros_like(v) for k, v in DELTA.items()})
        got_norm = np.sqrt(sum(float(np.sum(v.astype(np.float64) ** 2)) for v in got.values()))
        assert got_norm <= bound
        ratio = min(1.0, bound / norm)
        for k in DELTA:  # the same update, scaled by bound / norm when it was too long
            np.testing.assert_allclose(got[k], s2[k], atol=1e-7)
            np.testing.assert_allclose(s2[k], sent[k] * ratio, rtol=0, atol=2e-3 * np.abs(sent[k]).max())


def test_client_dp_caps_the_encoded_update_at_the_clipping_norm() -> None:
    overrides = {"compression.uplink": "topk", "compression.topk-fraction": 0.5, "privacy.mode": "client-fixed"}
    mod, ctxt = make_compression_mod(), _context(overrides)
    head = {k: np.zeros_like(v) for k, v in DELTA.items()}
    for rnd in (1, 2, 3):  # the residual grows the uncapped update past the bound after round 1
        msg = _train_message(head, rnd)
        msg.content.config_records[CONFIG]["clipping_norm"] = 1.0
        reply = mod(msg, ctxt, _handler({k: v / np.sqrt(sum((d ** 2).sum() for d in DELTA.values()))
                                         for k, v in DELTA.items()}))  # a handler whose update has norm 1
        payload = {k: v.numpy() for k, v in reply.content.array_records[ARRAYS].items()}
        got = decode("topk", payload, head)
        assert np.sqrt(sum(float(np.sum(v.astype(np.float64) ** 2)) for v in got.values())) <= 1.0
    msg = _train_message(head)
    with pytest.raises(ValueError, match="clipping_norm"):
        mod(msg, _context(overrides), _handler(DELTA))
