"""ONNX export (TorchScript exporter, opset 17, named dynamic axes from the spec) and ONNX quantisation.

Precisions (:data:`ONNX_PRECISIONS`):

* ``fp32``   -- the exported graph as is;
* ``fp16``   -- weight-only fp16: large float initialisers are stored in fp16 and cast back to fp32 by a
  ``Cast`` node that ONNX Runtime constant-folds at session start, so the file is half the size and the compute
  (and its accuracy) stays fp32 -- CPUs without fp16 kernels run it at fp32 speed;
* ``int8``   -- ONNX Runtime dynamic quantisation (int8 weights per output channel, activations quantised at
  run time with ONE scale per tensor), except the MatMuls named in the spec's ``onnx_weight_only`` (``"*"``: all),
  which get ``MatMulNBits``: int8 weights with one scale per block of ``onnx_block_size`` inputs, activations
  in fp32 or quantised per block (``onnx_accuracy_level=4``). Per-tensor activation scales lose small values
  where a tensor mixes ranges: measured, MiniLM's min cosine to fp32 0.973 (dynamic) vs 0.997 (MatMulNBits,
  block 64), and the head's first body layer (tokens, products, dense and mask features side by side) Kendall
  tau 0.976 vs 0.994;
* ``int8-static`` -- QDQ static quantisation, per-channel weights, activations calibrated (min/max) on the
  given calibration inputs (for CNNs, where dynamic quantisation of convolutions is slow and inaccurate).
"""

from __future__ import annotations

import contextlib
import logging
import shutil
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import torch

from export.errors import ExportError
from export.spec import ExportSpec

ONNX_PRECISIONS = ("fp32", "fp16", "int8", "int8-static")
OPSET = 17


def export_onnx(module: torch.nn.Module, spec: ExportSpec, sample: dict[str, np.ndarray], path: Path) -> None:
    """Trace ``module`` (put in eval mode) with ``sample`` (the spec's inputs at ``spec.trace`` sizes)."""
    module.eval()
    args = tuple(torch.from_numpy(np.ascontiguousarray(sample[n])) for n in spec.input_names)
    try:
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")  # legacy-exporter deprecation + tracer notes
            torch.onnx.export(
                module, args, str(path), dynamo=False, opset_version=OPSET,
                input_names=spec.input_names, output_names=[spec.output.name],
                dynamic_axes=spec.dynamic_axes(), do_constant_folding=True,
            )
    except Exception as e:  # the exporter raises many types
        raise ExportError(f"{spec.component}: torch.onnx.export failed ({e.__class__.__name__}: {e})") from e
    module.eval()  # export restores the previous mode; keep eval whatever it was


def quantize_onnx(src: Path, dst: Path, precision: str,
                  calibration: Sequence[dict[str, np.ndarray]] | None = None,
                  weight_only: Sequence[str] = (), block_size: int = 32, accuracy_level: int | None = None,
                  float_scopes: Sequence[str] = ()) -> str:
    """Write ``src`` at ``precision`` to ``dst``; returns a description of the method for the manifest.
    ``float_scopes``: under ``int8-static``, nodes whose name contains one of these keep float activations."""
    if precision == "fp32":
        shutil.copyfile(src, dst)
        return "fp32"
    if precision == "fp16":
        _fp16_weights(src, dst)
        return "fp16 weights (cast to fp32 at load; fp32 compute)"
    from onnxruntime.quantization import QuantFormat, QuantType, quantize_static

    with _quiet():
        if precision == "int8":
            return _int8(src, dst, weight_only, block_size, accuracy_level)
        if precision == "int8-static":
            if not calibration:
                raise ExportError("int8-static quantisation needs calibration inputs")
            import onnx

            keep = [n.name for n in onnx.load(str(src)).graph.node if any(sc in n.name for sc in float_scopes)]
            quantize_static(src, dst, _Reader(calibration), quant_format=QuantFormat.QDQ, per_channel=True,
                            weight_type=QuantType.QInt8, activation_type=QuantType.QUInt8,
                            nodes_to_exclude=keep or None)
            kept = f"; {len(keep)} nodes under {', '.join(float_scopes)} kept float" if keep else ""
            return f"int8 static QDQ (per-channel weights, min/max calibration on {len(calibration)} inputs{kept})"
    raise ExportError(f"unknown ONNX precision {precision!r}; expected one of {ONNX_PRECISIONS}")


def _int8(src: Path, dst: Path, weight_only: Sequence[str], block_size: int, accuracy_level: int | None) -> str:
    """Dynamic int8 everywhere but ``weight_only`` MatMuls (``"*"``: all), which get ``MatMulNBits`` 8-bit."""
    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    graph = onnx.load(str(src)).graph
    inits = {i.name for i in graph.initializer}
    matmuls = [n.name for n in graph.node if n.op_type == "MatMul" and n.input[1] in inits]
    wo = matmuls if "*" in weight_only else [n for n in weight_only if n in matmuls]
    if "*" in weight_only:  # nothing left for dynamic quantisation but embedding tables
        quantize_dynamic(src, dst, per_channel=True, weight_type=QuantType.QInt8, op_types_to_quantize=["Gather"])
        desc = "int8 embedding table (onnxruntime dynamic, per-channel)"
    else:
        quantize_dynamic(src, dst, per_channel=True, weight_type=QuantType.QInt8, nodes_to_exclude=wo or None)
        desc = "int8 dynamic (onnxruntime, per-channel weights, activations quantised at run time)"
    if wo:
        q = MatMulNBitsQuantizer(onnx.load(str(dst)), bits=8, block_size=block_size, is_symmetric=True,
                                 accuracy_level=accuracy_level, nodes_to_include=wo)
        q.process()
        q.model.save_model_to_file(str(dst))
        compute = "int8 activations per block" if accuracy_level == 4 else "fp32 activations"
        which = "every MatMul" if "*" in weight_only else str(wo)
        desc += f"; int8 weights with block-{block_size} scales (MatMulNBits, {compute}) for {which}"
    return desc


def _fp16_weights(src: Path, dst: Path, min_elements: int = 1024) -> None:
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    model = onnx.load(str(src))
    graph = model.graph
    casts = []
    for init in list(graph.initializer):
        if init.data_type != TensorProto.FLOAT or int(np.prod(init.dims)) < min_elements:
            continue
        arr = numpy_helper.to_array(init)
        if np.abs(arr).max(initial=0.0) > 60000:  # would overflow fp16: keep fp32
            continue
        half = numpy_helper.from_array(arr.astype(np.float16), init.name + "__fp16")
        graph.initializer.remove(init)
        graph.initializer.append(half)
        casts.append(helper.make_node("Cast", [half.name], [init.name], to=TensorProto.FLOAT,
                                      name=init.name + "__cast"))
    for i, node in enumerate(casts):  # before any consumer: graph nodes must stay topologically sorted
        graph.node.insert(i, node)
    onnx.save(model, str(dst))


class _Reader:
    """onnxruntime ``CalibrationDataReader`` over a list of feeds."""

    def __init__(self, feeds: Sequence[dict[str, np.ndarray]]) -> None:
        self._it: Iterator[dict[str, np.ndarray]] = iter(list(feeds))

    def get_next(self) -> dict[str, np.ndarray] | None:
        return next(self._it, None)


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """onnxruntime.quantization logs advice on the root logger; keep export output readable."""
    loggers = [logging.getLogger(), logging.getLogger("onnxruntime.quantization.matmul_nbits_quantizer")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        yield
    finally:
        for lg, level in zip(loggers, levels, strict=True):
            lg.setLevel(level)


def share_weights(path: Path) -> int:
    """Store each weight once: rewrite ``Gemm(x, W, b, transB=1)`` as ``MatMul(x, W^T) + b`` when ``W^T``
    already is an initialiser, and bypass ``Identity`` nodes that alias an initialiser.

    The TorchScript exporter lowers one ``nn.Linear`` to ``MatMul`` with a pre-transposed weight for 3-D inputs
    and to ``Gemm`` with the original weight for 2-D inputs, and aliases a weight reused by a second ``MatMul``
    through an ``Identity``: the head's text and image projections (shared by candidates, video, user and query)
    were stored twice, and onnxruntime's quantiser left the aliased copy in fp32. Returns the number of rewrites.
    """
    import onnx
    from onnx import helper, numpy_helper

    model = onnx.load(str(path))
    g = model.graph
    inits = {i.name: i for i in g.initializer}
    alias = {n.output[0]: n.input[0] for n in g.node if n.op_type == "Identity" and n.input[0] in inits}
    graph_outputs = {o.name for o in g.output}
    alias = {k: v for k, v in alias.items() if k not in graph_outputs}
    if alias:
        kept = [n for n in g.node if not (n.op_type == "Identity" and n.output[0] in alias)]
        for n in kept:
            for j, x in enumerate(n.input):
                if x in alias:
                    n.input[j] = alias[x]
        del g.node[:]
        g.node.extend(kept)
    by_bytes: dict[tuple[tuple[int, ...], bytes], str] = {}
    for i in g.initializer:
        if len(i.dims) == 2 and i.data_type == onnx.TensorProto.FLOAT:
            arr = numpy_helper.to_array(i)
            by_bytes[(arr.shape, np.ascontiguousarray(arr).tobytes())] = i.name
    merged = len(alias)
    nodes = []
    for n in g.node:
        attrs = {a.name: helper.get_attribute_value(a) for a in n.attribute}
        plain = attrs.get("transA", 0) == 0 and attrs.get("alpha", 1.0) == 1.0 and attrs.get("beta", 1.0) == 1.0
        if n.op_type == "Gemm" and attrs.get("transB", 0) == 1 and plain and n.input[1] in inits:
            wt = np.ascontiguousarray(numpy_helper.to_array(inits[n.input[1]]).T)
            shared = by_bytes.get((wt.shape, wt.tobytes()))
            if shared is not None:
                mm_out = n.output[0] + "__mm"
                nodes.append(helper.make_node("MatMul", [n.input[0], shared], [mm_out], name=n.name + "__mm"))
                if len(n.input) > 2 and n.input[2]:
                    nodes.append(helper.make_node("Add", [mm_out, n.input[2]], [n.output[0]], name=n.name + "__add"))
                else:
                    nodes.append(helper.make_node("Identity", [mm_out], [n.output[0]], name=n.name + "__id"))
                merged += 1
                continue
        nodes.append(n)
    if merged:
        del g.node[:]
        g.node.extend(nodes)
        used = {x for n in g.node for x in n.input}
        keep = [i for i in g.initializer if i.name in used]
        del g.initializer[:]
        g.initializer.extend(keep)
        onnx.save(model, str(path))
    return merged
