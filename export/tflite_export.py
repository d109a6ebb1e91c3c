"""TFLite export with litert-torch (one signature per fixed size of the spec) and ai-edge-quantizer.

Precisions (:data:`TFLITE_PRECISIONS`):

* ``fp32`` -- as converted;
* ``fp16`` -- fp16 weights (``FLOAT_CASTING`` weight-only recipe), dequantised to fp32 by the runtime;
* ``int8`` -- dynamic-range int8: per-channel int8 weights, activations quantised on the fly
  (``dynamic_wi8_afp32``), except embedding tables, quantised per tensor: per-channel they carry one scale and
  one int64 zero point per vocabulary row, repeated in every signature (MiniLM: +1.1 MB for 3 signatures, with
  the same measured cosine). PT2E static int8 is not used: a graph with a softmax (the head's gate) produces a
  file that fails to load, and static calibration of a ranker is fragile (see STACK.md).

After quantisation :func:`finalize_tflite` renames each signature's output to the spec's output name and
strips the converter's internal tensor names (tens of KB in a small head: every signature repeats them).
"""

from __future__ import annotations

import copy
import os
import warnings
from collections.abc import Sequence

import numpy as np
import torch

from export.errors import ExportError
from export.spec import ExportSpec

TFLITE_PRECISIONS = ("fp32", "fp16", "int8")

os.environ.setdefault("LITERT_TORCH_SHOW_PROGRESS", "n")


def convert_tflite(module: torch.nn.Module, spec: ExportSpec, samples: Sequence[dict[str, np.ndarray]]) -> bytes:
    """Convert with one signature per ``spec.signatures`` entry (``samples[i]`` has that entry's sizes)."""
    import litert_torch

    module.eval()
    conv = None
    for sizes, sample in zip(spec.signatures, samples, strict=True):
        kwargs = {n: torch.from_numpy(np.ascontiguousarray(sample[n])) for n in spec.input_names}
        key = spec.signature_key(sizes)
        conv = (litert_torch.signature(key, module, sample_kwargs=kwargs) if conv is None
                else conv.signature(key, module, sample_kwargs=kwargs))
    if conv is None:
        raise ExportError(f"{spec.component}: no TFLite signatures in the spec")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # pytree deprecation notes from torch.export
            return bytes(conv.convert().model_content())
    except Exception as e:  # converter failures come in many types
        raise ExportError(f"{spec.component}: litert-torch conversion failed ({e.__class__.__name__}: {e})") from e


def quantize_tflite(model: bytes, precision: str) -> tuple[bytes, str]:
    """``(quantised model, description)``."""
    if precision == "fp32":
        return model, "fp32"
    from ai_edge_quantizer import quantizer, recipe
    from ai_edge_quantizer.algorithm_manager import AlgorithmName
    from ai_edge_quantizer.qtyping import TFLOperationName

    if precision == "int8":
        rec = recipe.dynamic_wi8_afp32()
        emb = copy.deepcopy(rec[0])
        emb["operation"] = "EMBEDDING_LOOKUP"
        emb["op_config"]["weight_tensor_config"]["granularity"] = "TENSORWISE"
        q = quantizer.Quantizer(model, [*rec, emb])
        desc = ("int8 dynamic range (ai-edge-quantizer dynamic_wi8_afp32: per-channel int8 weights; "
                "embedding tables per tensor)")
    elif precision == "fp16":
        q = quantizer.Quantizer(model)
        q.add_weight_only_config(regex=".*", operation_name=TFLOperationName.ALL_SUPPORTED, num_bits=16,
                                 algorithm_key=AlgorithmName.FLOAT_CASTING)
        desc = "fp16 weights (ai-edge-quantizer float casting; fp32 compute)"
    else:
        raise ExportError(f"unknown TFLite precision {precision!r}; expected one of {TFLITE_PRECISIONS}")
    with _no_tqdm():
        res = q.quantize()
    return bytes(res.quantized_model), desc


def finalize_tflite(model: bytes, spec: ExportSpec) -> bytes:
    """Name every signature's output ``spec.output.name``; drop internal tensor names and the description."""
    from ai_edge_litert.tools import flatbuffer_utils as fbu

    obj = fbu.convert_bytearray_to_object(bytearray(model))
    for buf in obj.buffers:  # data stored after the flatbuffer (offset/size) -> inline, as we re-serialise
        if buf.offset and buf.offset > 1:
            buf.data = np.frombuffer(model, dtype=np.uint8, count=buf.size, offset=buf.offset).copy()
            buf.offset, buf.size = 0, 0
    for sd in obj.signatureDefs or []:
        if len(sd.outputs) != 1:
            raise ExportError(f"{spec.component}: signature {sd.signatureKey!r} has {len(sd.outputs)} outputs")
        sd.outputs[0].name = spec.output.name.encode()
        names = {t.name.decode() if isinstance(t.name, bytes) else t.name for t in sd.inputs}
        if names != set(spec.input_names):
            raise ExportError(f"{spec.component}: signature {sd.signatureKey!r} inputs {sorted(names)} "
                              f"!= {sorted(spec.input_names)}")
    obj.description = None
    for sg in obj.subgraphs:
        for t in sg.tensors:
            t.name = None
    return bytes(fbu.convert_object_to_bytearray(obj))


class _no_tqdm:
    """ai-edge-quantizer draws tqdm bars and prints a summary; silence both during :func:`quantize_tflite`."""

    def __enter__(self) -> None:
        import contextlib
        import io

        self._stack = contextlib.ExitStack()
        self._stack.enter_context(contextlib.redirect_stdout(io.StringIO()))
        self._stack.enter_context(contextlib.redirect_stderr(io.StringIO()))

    def __exit__(self, *exc: object) -> None:
        self._stack.close()
