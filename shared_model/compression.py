"""Update compression: what a device uploads instead of its full fp32 head, and how the server reads it back.

A device's upload is the *delta* ``local - received`` of every array it shares, encoded by one scheme:

``fp16``     the delta in half precision (2 bytes per weight);
``int8``     the delta quantized to int8 with one fp32 scale per tensor (``granularity = "tensor"``) or per
             output channel (first axis, ``"channel"``), by stochastic rounding (unbiased: E[q * s] = x), so a
             quantization error does not drift in one direction over rounds;
``topk``     the ``fraction`` largest-magnitude entries of each tensor (int32 index + fp32 value, 8 bytes each);
             with error feedback the entries not sent stay on the device and are added to its next delta
             (Stich et al. 2018; Karimireddy et al. 2019), so nothing is lost, only delayed.

The server adds the decoded delta to its own exact global head (with an fp16 downlink the device started from the
fp16-rounded copy; its delta is what it learnt from there), so screening, DP wrappers and every strategy see a
plain full-precision update, and the downlink's rounding never accumulates in the global head.

Encoded arrays live in one ArrayRecord: ``NAME`` holds the fp16 / int8 payload, ``NAME#scale`` the int8 scales,
``NAME#idx`` / ``NAME#val`` the top-k indices and values. The scheme travels in a ConfigRecord next to it
(:data:`COMPRESSION`), and a reply whose scheme is not the one the run asked for is refused.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

UPLINK_SCHEMES = ("none", "fp16", "int8", "topk")
DOWNLINK_SCHEMES = ("fp32", "fp16")
GRANULARITIES = ("tensor", "channel")
COMPRESSION = "compression"  # ConfigRecord key of a compressed reply: {"scheme": ...}
SCHEME_KEY = "scheme"
RESIDUAL = "compression-residual"  # device state: the error-feedback residual (never leaves the device)
SCALE, IDX, VAL = "#scale", "#idx", "#val"
INT8_MAX = 127


class CompressionError(ValueError):
    """An encoded update that cannot be decoded (wrong keys, shapes, dtypes or scheme); names the array."""


@dataclass(frozen=True)
class Codec:
    """One uplink scheme with its parameters (``compression.*`` of the run config)."""

    scheme: str = "none"
    granularity: str = "tensor"
    stochastic: bool = True
    fraction: float = 0.1
    error_feedback: bool = True

    def __post_init__(self) -> None:
        if self.scheme not in UPLINK_SCHEMES:
            raise ValueError(f"compression.uplink: {self.scheme!r} is not one of {UPLINK_SCHEMES}")
        if self.granularity not in GRANULARITIES:
            raise ValueError(f"compression.int8-granularity: {self.granularity!r} is not one of {GRANULARITIES}")
        if not 0.0 < self.fraction <= 1.0:
            raise ValueError(f"compression.topk-fraction: {self.fraction} not in (0, 1]")

    @property
    def uses_residual(self) -> bool:
        return self.scheme == "topk" and self.error_feedback

    def encode(self, delta: Mapping[str, np.ndarray], rng: np.random.Generator) -> tuple[dict[str, np.ndarray],
                                                                                            dict[str, np.ndarray]]:
        """``(payload, sent)``: the arrays to upload and the delta they decode to (the device keeps
        ``delta - sent`` as its residual under error feedback)."""
        payload: dict[str, np.ndarray] = {}
        sent: dict[str, np.ndarray] = {}
        for name, d in delta.items():
            d = np.asarray(d, np.float32)
            if self.scheme == "fp16":
                payload[name] = d.astype(np.float16)
            elif self.scheme == "int8":
                q, scale = quantize_int8(d, self.granularity == "channel", rng if self.stochastic else None)
                payload[name], payload[name + SCALE] = q, scale
            elif self.scheme == "topk":
                idx, val = top_k(d, self.fraction)
                payload[name + IDX], payload[name + VAL] = idx, val
            else:
                payload[name] = d
            sent[name] = decode_one(self.scheme, name, payload, d.shape)
        return payload, sent


    def within_norm(self, payload: dict[str, np.ndarray], sent: dict[str, np.ndarray], bound: float
                    ) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
        """``(payload, sent)`` scaled so that the decoded update's L2 norm is at most ``bound`` (unchanged when it
        already is). Scales int8 scales and top-k values exactly; fp16 payloads lose at most 2^-11 relative to
        rounding, covered by the 2^-10 margin."""
        norm = float(np.sqrt(sum(float(np.sum(v.astype(np.float64) ** 2)) for v in sent.values())))
        if norm <= bound:
            return payload, sent
        f = bound / norm * (1 - 2.0**-10)
        scaled: dict[str, np.ndarray] = {}
        for key, a in payload.items():
            if key.endswith(IDX) or a.dtype == np.int8:
                scaled[key] = a
            else:
                scaled[key] = (a.astype(np.float32) * f).astype(a.dtype)
        return scaled, {k: decode_one(self.scheme, k, scaled, v.shape) for k, v in sent.items()}


def quantize_int8(x: np.ndarray, per_channel: bool, rng: np.random.Generator | None) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric int8 in [-127, 127]: ``x ~ q * scale``. Per channel: one scale per index of the first axis
    (tensors with at least 2 axes); else one scale, shape ``(1,)`` (Flower's serde turns 0-d arrays into 1-d).
    Stochastic rounding when ``rng`` is given, else round to nearest."""
    safe: np.ndarray
    if per_channel and x.ndim >= 2:
        amax = np.abs(x).reshape(x.shape[0], -1).max(axis=1)
        scale = (amax / INT8_MAX).astype(np.float32)
        bshape = (x.shape[0],) + (1,) * (x.ndim - 1)
        safe = np.where(scale > 0, scale, 1.0).reshape(bshape)
    else:
        scale = np.full(1, np.abs(x).max(initial=0.0) / INT8_MAX, np.float32)
        safe = scale if scale[0] > 0 else np.ones(1, np.float32)
    y = x / safe
    if rng is not None:
        low = np.floor(y)
        y = low + (rng.random(y.shape, dtype=np.float32) < (y - low))
    else:
        y = np.rint(y)
    return np.clip(y, -INT8_MAX, INT8_MAX).astype(np.int8), scale


def top_k(x: np.ndarray, fraction: float) -> tuple[np.ndarray, np.ndarray]:
    """Flat int32 indices (sorted) and fp32 values of the ``ceil(fraction * size)`` largest-magnitude entries."""
    flat = x.reshape(-1)
    k = min(flat.size, max(1, int(np.ceil(fraction * flat.size)))) if flat.size else 0
    if k == flat.size:
        idx = np.arange(flat.size)
    else:
        idx = np.sort(np.argpartition(np.abs(flat), flat.size - k)[flat.size - k:])
    return idx.astype(np.int32), flat[idx].astype(np.float32)


def decode_one(scheme: str, name: str, payload: Mapping[str, np.ndarray], shape: tuple[int, ...]) -> np.ndarray:
    """The fp32 delta of array ``name`` from an encoded ``payload``; :class:`CompressionError` names what is wrong."""
    def get(key: str, kinds: str) -> np.ndarray:
        if key not in payload:
            raise CompressionError(f"{scheme} update has no array {key!r}")
        a = np.asarray(payload[key])
        if a.dtype.kind not in kinds:
            raise CompressionError(f"{scheme} update: {key!r} has dtype {a.dtype}")
        return a

    size = int(np.prod(shape, dtype=np.int64))
    if scheme in ("none", "fp16"):
        a = get(name, "f")
        if a.shape != tuple(shape):
            raise CompressionError(f"{scheme} update: {name!r} has shape {a.shape}, expected {tuple(shape)}")
        out = a.astype(np.float32)
    elif scheme == "int8":
        q, scale = get(name, "i"), get(name + SCALE, "f").astype(np.float32)
        if q.dtype != np.int8 or q.shape != tuple(shape):
            raise CompressionError(f"int8 update: {name!r} is {q.dtype}{q.shape}, expected int8{tuple(shape)}")
        if scale.size == 1:
            out = q.astype(np.float32) * scale.reshape(())
        elif scale.shape == (shape[0],) and len(shape) >= 2:
            out = q.astype(np.float32) * scale.reshape((shape[0],) + (1,) * (len(shape) - 1))
        else:
            raise CompressionError(f"int8 update: {name + SCALE!r} has shape {scale.shape} for a {tuple(shape)} array")
    elif scheme == "topk":
        idx, val = get(name + IDX, "iu").astype(np.int64), get(name + VAL, "f").astype(np.float32)
        if idx.ndim != 1 or idx.shape != val.shape:
            raise CompressionError(f"topk update: {name!r} has {idx.shape} indices for {val.shape} values")
        if idx.size and (idx.min() < 0 or idx.max() >= size or np.any(np.diff(idx) <= 0)):
            raise CompressionError(f"topk update: {name + IDX!r} is not a sorted set of indices below {size}")
        out = np.zeros(size, np.float32)
        out[idx] = val
        out = out.reshape(shape)
    else:
        raise CompressionError(f"unknown compression scheme {scheme!r}")
    if not np.all(np.isfinite(out)):
        raise CompressionError(f"{scheme} update: non-finite values in {name!r}")
    return out


def expected_keys(scheme: str, names: list[str]) -> set[str]:
    suffixes = {"int8": ("", SCALE), "topk": (IDX, VAL)}.get(scheme, ("",))
    return {n + s for n in names for s in suffixes}


def decode(scheme: str, payload: Mapping[str, np.ndarray], reference: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """``reference + delta`` for every array of ``reference`` (what the device received), from its encoded upload."""
    keys, want = set(payload), expected_keys(scheme, list(reference))
    if keys != want:
        missing, extra = sorted(want - keys), sorted(keys - want)
        raise CompressionError(f"{scheme} update has the wrong arrays (missing {missing[:3]}, unexpected {extra[:3]})")
    return {k: (np.asarray(ref, np.float32) + decode_one(scheme, k, payload, tuple(np.shape(ref)))).astype(np.float32)
            for k, ref in reference.items()}


def round_fp16(arrays: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """What a device holds after an fp16 downlink: float arrays rounded to half precision (others unchanged)."""
    return {k: (np.asarray(v).astype(np.float16) if np.asarray(v).dtype.kind == "f" else np.asarray(v))
            for k, v in arrays.items()}
