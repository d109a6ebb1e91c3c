"""The server side of update compression (``compression.*``; codecs in ``shared_model.compression``).

Flower has no server-side mods, so the round loop calls these two steps itself: :func:`encode_downlink` on the
messages a strategy configured (the global head as fp16 when ``compression.downlink = "fp16"``), and
:func:`decode_replies` on the replies before screening, so that screening, the DP wrappers and every strategy
see a plain fp32 update: the server's own exact global head plus the device's decoded delta (so the fp16 rounding
of the downlink never accumulates in the global head: a device's delta is what it learnt, wherever it started). A reply that cannot be decoded is
refused with the reason (it is never aggregated).
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
from flwr.app import Array, ArrayRecord, Message

from shared_model.compression import COMPRESSION, SCHEME_KEY, CompressionError, decode, round_fp16
from shared_model.config import CompressionConfig
from shared_model.records import ARRAYS


def encode_downlink(cfg: CompressionConfig, msgs: list[Message]) -> None:
    """Put the global head of each message in fp16 (in place) when the downlink is fp16."""
    if cfg.downlink != "fp16":
        return
    for m in msgs:
        if m.has_content() and ARRAYS in m.content.array_records:
            half = round_fp16({k: v.numpy() for k, v in m.content.array_records[ARRAYS].items()})
            m.content[ARRAYS] = ArrayRecord({k: Array(np.ascontiguousarray(v)) for k, v in half.items()})


def decode_replies(cfg: CompressionConfig, replies: list[Message], received: Mapping[str, np.ndarray]
                   ) -> tuple[list[Message], list[str]]:
    """Replies with their arrays decoded in place (``received + delta``), and the reasons of those refused.

    ``received``: the global head the round's messages were made from, in fp32; a reply's arrays are decoded
    against the same keys it sent (the shared layers only, under ``model.personal-layers``).
    """
    if cfg.uplink == "none":
        return replies, []
    kept: list[Message] = []
    refused: list[str] = []
    for msg in replies:
        if msg.has_error() or not msg.has_content() or ARRAYS not in msg.content.array_records:
            kept.append(msg)  # errors and empty replies are screened (and counted) as before
            continue
        node = msg.metadata.src_node_id
        content = msg.content
        scheme = content.config_records[COMPRESSION].get(SCHEME_KEY) if COMPRESSION in content.config_records \
            else None
        if scheme != cfg.uplink:
            refused.append(f"node {node}: update compressed as {scheme!r}, the run asks for {cfg.uplink!r}")
            continue
        payload = {k: v.numpy() for k, v in content.array_records[ARRAYS].items()}
        names = sorted({k.split("#", 1)[0] for k in payload})
        unknown = [n for n in names if n not in received]
        if unknown:
            refused.append(f"node {node}: compressed update names unknown arrays {unknown[:3]}")
            continue
        try:
            full = decode(cfg.uplink, payload, {n: received[n] for n in received if n in names})
        except CompressionError as e:
            refused.append(f"node {node}: {e}")
            continue
        content[ARRAYS] = ArrayRecord({k: Array(v) for k, v in full.items()})
        del content[COMPRESSION]
        kept.append(msg)
    return kept, refused
