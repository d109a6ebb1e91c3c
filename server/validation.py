"""Screen client replies before aggregation: a bad update is rejected and logged, never averaged in."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import cast

import numpy as np
from flwr.app import ArrayRecord, Message, MetricRecord

from shared_model.records import ARRAYS, METRICS, NUM_EXAMPLES

log = logging.getLogger(__name__)


@dataclass
class Screened:
    accepted: list[Message] = field(default_factory=list)
    failed: list[str] = field(default_factory=list)  # replies carrying an error (client crash, exception)
    rejected: list[str] = field(default_factory=list)  # replies whose update was refused


def check_update(content_arrays: ArrayRecord, reference: dict[str, np.ndarray], max_norm: float | None = None) -> str | None:
    """Why an update must be refused (or None): wrong keys, wrong shapes, NaN/Inf, update norm too large."""
    keys = set(content_arrays.keys())
    if keys != set(reference):
        missing, extra = sorted(set(reference) - keys), sorted(keys - set(reference))
        return f"wrong keys (missing {missing[:3]}, unexpected {extra[:3]})"
    sq = 0.0
    for k, ref in reference.items():
        arr = content_arrays[k].numpy()
        if arr.shape != ref.shape:
            return f"wrong shape for {k}: {arr.shape} != {ref.shape}"
        if arr.dtype.kind != "f":
            return f"wrong dtype for {k}: {arr.dtype} is not a float dtype"
        if not np.all(np.isfinite(arr)):
            return f"non-finite values in {k}"
        sq += float(np.sum((arr.astype(np.float64) - ref) ** 2))
    if max_norm is not None and np.sqrt(sq) > max_norm:
        return f"update norm {np.sqrt(sq):.3g} exceeds bound {max_norm:.3g}"
    return None


def screen_replies(
    replies: list[Message], reference: dict[str, np.ndarray], max_norm: float | None = None, is_train: bool = True
) -> Screened:
    out = Screened()
    for msg in replies:
        node = msg.metadata.src_node_id
        if msg.has_error():
            out.failed.append(f"node {node}: {msg.error.reason}")
            continue
        content = msg.content
        if METRICS not in content.metric_records or NUM_EXAMPLES not in content.metric_records[METRICS]:
            out.rejected.append(f"node {node}: no '{NUM_EXAMPLES}' metric")
            continue
        n = content.metric_records[METRICS][NUM_EXAMPLES]
        if not isinstance(n, int | float) or not np.isfinite(n) or n < 0 or (is_train and n == 0):
            out.rejected.append(f"node {node}: bad {NUM_EXAMPLES}={n!r}")
            continue
        bad = _non_finite_metrics(content.metric_records[METRICS])
        if bad:
            out.rejected.append(f"node {node}: non-finite metric values {bad[:3]}")
            continue
        if is_train:
            if ARRAYS not in content.array_records:
                out.rejected.append(f"node {node}: no arrays")
                continue
            reason = check_update(content.array_records[ARRAYS], reference, max_norm)
            if reason:
                out.rejected.append(f"node {node}: {reason}")
                continue
        out.accepted.append(msg)
    for r in out.rejected:
        log.warning("rejected update from %s", r)
    for r in out.failed:
        log.warning("client failure: %s", r)
    # stable order, independent of random node ids, so aggregation sums in the same order every run
    out.accepted.sort(key=lambda m: _reply_key(m, is_train))
    return out


def _non_finite_metrics(metrics: MetricRecord) -> list[str]:
    bad = []
    for k, v in metrics.items():
        values = v if isinstance(v, list) else [v]
        if not all(isinstance(x, int | float) and np.isfinite(x) for x in values):
            bad.append(k)
    return bad


def _reply_key(msg: Message, is_train: bool) -> tuple[float, bytes]:
    metrics = msg.content.metric_records[METRICS]
    first = b""
    if is_train:
        arrays = msg.content.array_records[ARRAYS]
        first = arrays[next(iter(arrays.keys()))].numpy().tobytes()[:64]
    return (float(cast(float, metrics[NUM_EXAMPLES])), first)  # screen_replies checked it is an int/float
