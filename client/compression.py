"""The device side of update compression (``compression.*``; codecs in ``shared_model.compression``).

A Flower mod around the handler, outside the privacy mod: it widens an fp16 global head to fp32 before anything
else on the device sees it, and encodes the train reply's arrays as a delta from that head. Sitting outside
differential privacy means the update is compressed *after* clipping and noise: compression is post-processing
of what DP already released, so it costs no privacy. Where the server adds the noise for a device-clipped update
(``client-fixed``, ``client-adaptive``), the encoded update is scaled back within the clipping norm, so the
sensitivity the noise is sized for still holds for what is sent. Under top-k with error feedback, the entries not sent stay
in the device's ``Context.state`` (:data:`RESIDUAL`) and are added to its next update; they never leave it.
"""

from __future__ import annotations

import zlib
from collections.abc import Mapping
from typing import Any, cast

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MessageType
from flwr.clientapp.typing import ClientAppCallable, Mod
from flwr.supercore.differential_privacy import KEY_CLIPPING_NORM

from client.settings import settings_from
from shared_model.compression import COMPRESSION, RESIDUAL, SCHEME_KEY
from shared_model.records import ARRAYS, CONFIG, SERVER_ROUND


def _arrays(record: ArrayRecord) -> dict[str, np.ndarray]:
    return {k: v.numpy() for k, v in record.items()}


def _record(arrays: Mapping[str, np.ndarray]) -> ArrayRecord:
    return ArrayRecord({k: Array(np.ascontiguousarray(v)) for k, v in arrays.items()})


def _dp_bound(mode: str, msg: Message) -> float | None:
    """The norm a device's upload must stay within when the server adds the DP noise for it (``client-fixed``,
    ``client-adaptive``: the clipping norm the server sent). Encoding can push a clipped update past it (stochastic
    rounding; top-k with error feedback adds the residual of earlier rounds), and the noise is sized for it."""
    if mode not in ("client-fixed", "client-adaptive"):
        return None  # no DP, local DP (noise added on the device, encoding is post-processing), or the server clips
    cfg = msg.content.config_records.get(CONFIG, ConfigRecord())
    if KEY_CLIPPING_NORM not in cfg:
        raise ValueError(f"privacy.mode={mode!r}: the train config has no {KEY_CLIPPING_NORM!r} to bound the upload")
    return float(cast(float, cfg[KEY_CLIPPING_NORM]))


def make_compression_mod(overrides: Mapping[str, Any] | None = None) -> Mod:
    """A Flower mod applying ``compression.downlink`` (decode) and ``compression.uplink`` (encode) of the run
    config; messages pass through untouched when both are off, and query messages always."""
    overrides = dict(overrides or {})

    def compression_mod(msg: Message, ctxt: Context, call_next: ClientAppCallable) -> Message:
        kind = msg.metadata.message_type.split(".")[0]
        if kind not in (MessageType.TRAIN, MessageType.EVALUATE) or not msg.has_content():
            return call_next(msg, ctxt)
        s = settings_from(ctxt, overrides)
        c = s.compression
        if not c.enabled or ARRAYS not in msg.content.array_records:
            return call_next(msg, ctxt)
        # what the device received, in fp32 (an fp16 downlink is widened exactly)
        received = {k: (v.astype(np.float32) if v.dtype == np.float16 else v)
                    for k, v in _arrays(msg.content.array_records[ARRAYS]).items()}
        sent = msg.content.array_records[ARRAYS]
        msg.content[ARRAYS] = _record(received)
        try:
            reply = call_next(msg, ctxt)
        finally:
            msg.content[ARRAYS] = sent  # the message as it arrived, for the mods outside this one
        if kind != MessageType.TRAIN or c.uplink == "none" or reply.has_error() or not reply.has_content():
            return reply
        if ARRAYS not in reply.content.array_records:
            return reply
        local = _arrays(reply.content.array_records[ARRAYS])
        delta = {k: local[k].astype(np.float32) - received[k].astype(np.float32) for k in local}
        codec = c.codec()
        residual = ctxt.state.array_records.get(RESIDUAL) if codec.uses_residual else None
        if residual is not None:
            old = _arrays(residual)
            delta = {k: d + old[k] if k in old and old[k].shape == d.shape else d for k, d in delta.items()}
        rnd = int(cast(int, msg.content.config_records[CONFIG].get(SERVER_ROUND, 0))) \
            if CONFIG in msg.content.config_records else 0
        pid = int(cast(int, ctxt.node_config.get("partition-id", ctxt.node_id)))
        # stochastic rounding: seeded per run, round and device, so a run repeats (zlib.crc32: a stable hash)
        rng = np.random.default_rng([s.server.seed, rnd, pid, zlib.crc32(b"compression")])
        payload, decoded = codec.encode(delta, rng)
        bound = _dp_bound(s.privacy.mode, msg)
        if bound is not None:
            payload, decoded = codec.within_norm(payload, decoded, bound)
        if codec.uses_residual:
            ctxt.state[RESIDUAL] = _record({k: delta[k] - decoded[k] for k in delta})
        reply.content[ARRAYS] = _record(payload)
        reply.content[COMPRESSION] = ConfigRecord({SCHEME_KEY: codec.scheme})
        return reply

    return compression_mod
