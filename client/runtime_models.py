"""One wrapper for every exported model file the runtime runs, whatever the backend (ONNX Runtime or LiteRT).

:class:`ExportedModel` hides the backend: ``run(feeds)`` returns the file's output for named numpy inputs.
ONNX files have dynamic axes and run the inputs as given; a TFLite file has one signature per fixed size, so its
inputs are zero-padded up to the smallest signature that holds them (the caller slices the output back, and
truncates or chunks inputs longer than ``max_size``). On top of it, :func:`encode_tokens` (text encoder) and
:func:`score_slate` (head) are the only places that know how each component is fed.

Every model is created from the verified bytes of its file (``runtime_bundle.read_bundle_file``), never from its
path: ONNX Runtime parses them, LiteRT runs on them in memory (given a path, LiteRT maps the file, and a file
that shrinks underneath a mapped interpreter kills the process with SIGBUS). A compact bundle's static query
encoder (:class:`StaticTextModel`) is numpy only and serves both backends.

Torch-free, like the rest of the runtime: imports numpy, and ``onnxruntime`` or ``ai_edge_litert`` lazily.
"""

from __future__ import annotations

import io
from abc import ABC, abstractmethod
from collections.abc import Sequence
from typing import Any

import numpy as np

from client.runtime_bundle import (
    HEAD_OUTPUT,
    IMAGE_OUTPUT,
    STATIC_ENCODER_ARRAYS,
    STATIC_KIND,
    TEXT_OUTPUT,
    BundleError,
)

# per component: the axis whose size names a TFLite signature (export/spec.py: ExportSpec.signature_axis) and the
# output a TFLite signature is read from
COMPONENT_IO = {"text_encoder": ("tokens", TEXT_OUTPUT), "image_encoder": ("batch", IMAGE_OUTPUT),
                "head": ("slate", HEAD_OUTPUT)}


def load_interpreter_class() -> Any:
    """LiteRT's ``Interpreter`` (``ai_edge_litert``), else ``tflite_runtime``'s (older, slower; a fallback)."""
    try:
        from ai_edge_litert.interpreter import Interpreter
    except ImportError:
        try:
            from tflite_runtime.interpreter import Interpreter
        except ImportError as e:
            raise ImportError("the tflite backend needs ai-edge-litert (or tflite-runtime)") from e
    return Interpreter


class ExportedModel(ABC):
    """One exported file behind one call. ``max_size``: the largest fixed size along the signature axis (TFLite),
    ``None`` when that axis is dynamic (ONNX)."""

    max_size: int | None = None

    @abstractmethod
    def run(self, feeds: dict[str, np.ndarray]) -> np.ndarray:
        """The file's (only) output for ``feeds`` (input name -> array)."""


class OnnxModel(ExportedModel):
    """One ONNX Runtime session (from the file's bytes), single-threaded by default, no spinning."""

    def __init__(self, model: bytes, name: str, num_threads: int) -> None:
        import onnxruntime as ort

        so = ort.SessionOptions()
        so.intra_op_num_threads = num_threads
        so.inter_op_num_threads = 1
        so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        so.add_session_config_entry("session.intra_op.allow_spinning", "0")
        so.log_severity_level = 3
        try:
            self.session = ort.InferenceSession(model, so, providers=["CPUExecutionProvider"])
        except Exception as e:  # ORT raises its own Fail/InvalidProtobuf/... types
            raise BundleError(name, f"ONNX Runtime cannot load it ({e.__class__.__name__}: {str(e)[:300]})") from e
        self.output = self.session.get_outputs()[0].name

    def run(self, feeds: dict[str, np.ndarray]) -> np.ndarray:
        return np.asarray(self.session.run([self.output], feeds)[0])


class TfliteModel(ExportedModel):
    """One LiteRT interpreter (on the file's bytes, which it keeps) with its fixed-size signatures (``(size, key)``,
    sorted by size)."""

    def __init__(self, model: bytes, name: str, num_threads: int, signatures: Sequence[tuple[int, str]],
                 output: str) -> None:
        interpreter_cls = load_interpreter_class()
        try:
            self.interpreter = interpreter_cls(model_content=model, num_threads=num_threads)
            self.runners = {k: self.interpreter.get_signature_runner(k) for _, k in signatures}
        except Exception as e:  # ValueError/RuntimeError on a corrupt flatbuffer
            raise BundleError(name, f"LiteRT cannot load it ({e.__class__.__name__}: {str(e)[:300]})") from e
        self.signatures = [k for _, k in sorted(signatures)]
        self.inputs = {k: {n: (tuple(int(x) for x in d["shape"]), d["dtype"])
                           for n, d in r.get_input_details().items()} for k, r in self.runners.items()}
        self.max_size = max(s for s, _ in signatures)
        self.output = output

    def run(self, feeds: dict[str, np.ndarray]) -> np.ndarray:
        key = next((k for k in self.signatures if _fits(feeds, self.inputs[k])), None)
        if key is None:
            shapes = {n: v.shape for n, v in feeds.items()}
            raise ValueError(f"inputs {shapes} exceed every signature {self.signatures}")
        padded = {n: _zero_pad(v, *self.inputs[key][n]) for n, v in feeds.items()}
        return np.asarray(self.runners[key](**padded)[self.output])


class StaticTextModel(ExportedModel):
    """The static query encoder (``text_encoder.static.npz``, layout in ``client/runtime_bundle.py``): numpy only,
    the same on every backend. ``run`` takes the text encoder's inputs (``input_ids``, ``attention_mask``
    ``[B, T]``) and returns ``[B, D]``; :meth:`encode_ids` is the one-text fast path::

        keep = ids not in skip_ids;  v = mean(table_q[keep] * table_scale[keep]) (zeros [K] if none)
        e = v @ projection + bias;   return e / max(|e|, 1e-12)
    """

    def __init__(self, arrays: dict[str, np.ndarray], name: str) -> None:
        q, scale, proj, bias, skip = (arrays[k] for k in STATIC_ENCODER_ARRAYS)
        want = {"table_q": (np.int8, 2), "table_scale": (np.float32, 1), "projection": (np.float32, 2),
                "bias": (np.float32, 1), "skip_ids": (np.int64, 1)}
        for k, (dtype, ndim) in want.items():
            a = arrays[k]
            if a.dtype != dtype or a.ndim != ndim:
                raise BundleError(name, f"array {k} is {a.dtype} with {a.ndim} axes, expected {np.dtype(dtype)} "
                                        f"with {ndim}")
        v, k_dim = q.shape
        for k, shape in {"table_scale": (v,), "projection": (k_dim, bias.shape[0])}.items():
            if arrays[k].shape != shape:
                raise BundleError(name, f"array {k} has shape {arrays[k].shape}, expected {shape}")
        if skip.size and (skip.min() < 0 or skip.max() >= v):
            raise BundleError(name, f"array skip_ids holds ids outside the table's {v} rows")
        if not all(np.isfinite(a).all() for a in (scale, proj, bias)):
            raise BundleError(name, "NaN or infinite values in table_scale, projection or bias")
        self.table_q, self.table_scale = q, scale
        self.projection, self.bias = proj, bias
        self.keep = np.ones(v, dtype=bool)
        self.keep[skip] = False
        self.vocab_size, self.dim = v, int(bias.shape[0])

    @classmethod
    def from_bytes(cls, data: bytes, name: str) -> StaticTextModel:
        try:
            with np.load(io.BytesIO(data), allow_pickle=False) as z:
                arrays = {k: z[k] for k in z.files}
        except Exception as e:  # zip/npy errors of all kinds: a corrupt file
            raise BundleError(name, f"cannot read the static encoder ({e.__class__.__name__}: {e})") from e
        missing = [k for k in STATIC_ENCODER_ARRAYS if k not in arrays]
        if missing:
            raise BundleError(name, f"missing arrays {missing}")
        return cls(arrays, name)

    def encode_ids(self, ids: Sequence[int] | np.ndarray) -> np.ndarray:
        """``[D]`` float32 embedding of one tokenised text."""
        x = np.asarray(ids, dtype=np.int64)
        x = x[self.keep[x]]  # [n] kept token ids
        if x.size:
            v = (self.table_scale[x] @ self.table_q[x].astype(np.float32)) / np.float32(x.size)  # [K]
        else:
            v = np.zeros(self.table_q.shape[1], np.float32)
        e = v @ self.projection + self.bias  # [D]
        return (e / max(float(np.linalg.norm(e)), 1e-12)).astype(np.float32)

    def run(self, feeds: dict[str, np.ndarray]) -> np.ndarray:
        ids, mask = np.asarray(feeds["input_ids"]), np.asarray(feeds["attention_mask"])
        return np.stack([self.encode_ids(ids[b][mask[b] > 0]) for b in range(ids.shape[0])])


def _fits(feeds: dict[str, np.ndarray], inputs: dict[str, tuple[tuple[int, ...], Any]]) -> bool:
    return all(len(v.shape) == len(inputs[n][0]) and all(a <= b for a, b in zip(v.shape, inputs[n][0], strict=True))
               for n, v in feeds.items())


def _zero_pad(x: np.ndarray, shape: tuple[int, ...], dtype: Any) -> np.ndarray:
    """``x`` in ``dtype``, zero-padded at the end of every axis up to ``shape``."""
    if x.shape == shape:
        return np.ascontiguousarray(x, dtype=dtype)
    out = np.zeros(shape, dtype=dtype)
    out[tuple(slice(0, d) for d in x.shape)] = x
    return out


def open_model(backend: str, model: bytes, name: str, entry: dict[str, Any], component: str,
               num_threads: int) -> ExportedModel:
    """The exported file ``name`` of ``component`` for ``backend``, from its (verified) bytes ``model``; ``entry``
    is its manifest record (``"kind": "static"``: the static query encoder, whatever the backend)."""
    if entry.get("kind") == STATIC_KIND:
        if component != "text_encoder":
            raise BundleError(name, f"a static encoder cannot serve as the {component}")
        return StaticTextModel.from_bytes(model, name)
    if backend == "onnx":
        return OnnxModel(model, name, num_threads)
    axis, output = COMPONENT_IO[component]
    sigs = sorted((int(s["sizes"][axis]), str(s["key"])) for s in entry.get("signatures", []))
    if not sigs:
        raise BundleError(name, "the manifest lists no signatures for this TFLite file")
    return TfliteModel(model, name, num_threads, sigs, output)


# ------------------------------------------------------------------------------------------ components


def encode_tokens(model: ExportedModel, ids: list[int]) -> np.ndarray:
    """``[Dt]`` float32 text embedding of one tokenised text (``ids`` incl. [CLS]/[SEP]; cut at ``max_size``)."""
    if isinstance(model, StaticTextModel):
        return model.encode_ids(ids)
    if model.max_size is not None:
        ids = ids[: model.max_size]
    x = np.asarray(ids, dtype=np.int64)[None, :]  # [1, T]
    return model.run({"input_ids": x, "attention_mask": np.ones_like(x)})[0]


def score_slate(model: ExportedModel, feeds: dict[str, np.ndarray]) -> np.ndarray:
    """Scores ``[S]`` for one slate: ``feeds`` are the head's inputs with batch 1 and S candidates. A slate longer
    than ``max_size`` is scored in chunks (exact: candidates do not interact)."""
    s_total = feeds["item_text"].shape[1]
    step = model.max_size or max(s_total, 1)
    out = np.empty(s_total, np.float32)
    for lo in range(0, s_total, step):
        hi = min(lo + step, s_total)
        chunk = {k: v[:, lo:hi] if v.ndim == 3 else v for k, v in feeds.items()}  # per-candidate inputs [1, S, D]
        out[lo:hi] = model.run(chunk)[0, : hi - lo]
    return out
