"""Declarative export specs: what each bundle file takes and returns, the shapes it is traced and checked at,
its TFLite signatures and the bar its values must reach (after optimum-onnx's ``OnnxConfig``).

Shapes name their dynamic axes (``"batch"``, ``"tokens"``, ``"slate"``). ONNX files keep those axes dynamic;
TFLite has no dynamic shapes, so each TFLite file gets one signature per fixed size in ``signatures``. After
export every file is checked at ``checks`` -- sizes other than the traced ones -- by :mod:`export.validate`.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from client.runtime_bundle import (
    HEAD_OUTPUT,
    IMAGE_INPUT,
    IMAGE_OUTPUT,
    TEXT_INPUTS,
    TEXT_OUTPUT,
)
from shared_model.head_features import (
    BACKBONE_DIM,
    COLOUR_DIM,
    HEAD_INPUTS,
    IMAGE_DIM,
    IMAGE_SIZE,
    NUM_MODALITIES,
    PIXEL_MEAN,
    PIXEL_SCALE,
    TEXT_DIM,
)

DEFAULT_MAX_LENGTH = 64  # the training pipeline's truncation of queries and item texts
TEXT_SIGNATURE_TOKENS = (16, 32, 64)
HEAD_SIGNATURE_SLATES = (20, 50, 100)

# fidelity bars (see export/validate.py for how each is measured)
TEXT_COSINE_BAR = 0.99  # min over probe texts, exported vs torch fp32
IMAGE_COSINE_BAR = 0.99  # min over probe images; decides the image encoder's precision per file
HEAD_TAU_BAR = 0.95  # mean Kendall tau of exported vs torch fp32 head scores over probe slates
PIPELINE_NDCG_BAR = 0.002  # |NDCG@10(exported pipeline) - NDCG@10(torch fp32 pipeline)| on held-out slates
PIPELINE_TAU_BAR = 0.9  # mean Kendall tau of exported vs torch fp32 pipeline scores on held-out slates
STATIC_NDCG_COST_BAR = 0.01  # max NDCG@10 a static query encoder may lose to the full text encoder (torch, held out)
PHOTO_SEARCH_TAU_BAR = 0.95  # mean Kendall tau of the runtime's learnt visual scores vs the fp32 torch reference
PHOTO_SEARCH_NDCG_BAR = 0.01  # |NDCG@10 delta| of the same (same-type-and-colour grades), on catalog photos
PHOTO_SEARCH_PROBES = 20  # catalog photos asked as queries, slates of PHOTO_SEARCH_SLATE catalog items
PHOTO_SEARCH_SLATE = 30
FP32_ATOL = 1e-3  # max abs diff of an unquantised file (values are O(1))


@dataclass(frozen=True)
class TensorSpec:
    """One named input or output; ``shape`` holds ints (fixed) and axis names (dynamic)."""

    name: str
    dtype: str
    shape: tuple[int | str, ...]

    def concrete(self, sizes: Mapping[str, int]) -> tuple[int, ...]:
        return tuple(d if isinstance(d, int) else int(sizes[d]) for d in self.shape)

    def to_json(self, sizes: Mapping[str, int] | None = None) -> dict[str, Any]:
        shape = self.shape if sizes is None else self.concrete(sizes)
        return {"name": self.name, "dtype": self.dtype, "shape": list(shape)}


@dataclass(frozen=True)
class ExportSpec:
    """How one component is exported and checked."""

    component: str
    inputs: tuple[TensorSpec, ...]
    output: TensorSpec
    trace: Mapping[str, int]  # dynamic-axis sizes of the ONNX trace
    checks: tuple[Mapping[str, int], ...]  # other sizes checked after export
    signatures: tuple[Mapping[str, int], ...]  # TFLite: one fixed-size signature each
    signature_axis: str  # the axis that names a signature: key = signature_prefix + size
    signature_prefix: str
    metric: str  # "cosine" (encoders) or "kendall_tau" (head)
    bar: float
    atol_fp32: float = FP32_ATOL
    # ONNX int8: MatMul nodes given int8 weights with block scales (MatMulNBits) instead of onnxruntime's dynamic
    # quantisation (one activation scale per tensor); "*" = every MatMul. See export/onnx_export.py.
    onnx_weight_only: tuple[str, ...] = ()
    onnx_block_size: int = 32
    onnx_accuracy_level: int | None = None  # MatMulNBits compute: None = fp32, 4 = int8 activations per block
    # ONNX int8-static: nodes whose name contains one of these stay float (a submodule's scope, e.g. "/colour/")
    onnx_float_scopes: tuple[str, ...] = ()
    notes: dict[str, Any] = field(default_factory=dict)

    @property
    def input_names(self) -> list[str]:
        return [t.name for t in self.inputs]

    def dynamic_axes(self) -> dict[str, dict[int, str]]:
        out: dict[str, dict[int, str]] = {}
        for t in (*self.inputs, self.output):
            axes = {i: d for i, d in enumerate(t.shape) if isinstance(d, str)}
            if axes:
                out[t.name] = axes
        return out

    def signature_key(self, sizes: Mapping[str, int]) -> str:
        return f"{self.signature_prefix}{int(sizes[self.signature_axis])}"


def text_spec(max_length: int = DEFAULT_MAX_LENGTH) -> ExportSpec:
    tokens = tuple(t for t in TEXT_SIGNATURE_TOKENS if t < max_length) + (max_length,)
    return ExportSpec(
        component="text_encoder",
        inputs=tuple(TensorSpec(n, "int64", ("batch", "tokens")) for n in TEXT_INPUTS),
        output=TensorSpec(TEXT_OUTPUT, "float32", ("batch", TEXT_DIM)),
        trace={"batch": 2, "tokens": 16},
        checks=({"batch": 1, "tokens": 7}, {"batch": 3, "tokens": 33}, {"batch": 5, "tokens": max_length}),
        signatures=tuple({"batch": 1, "tokens": t} for t in tokens),
        signature_axis="tokens",
        signature_prefix="t",
        metric="cosine",
        bar=TEXT_COSINE_BAR,
        # measured on MiniLM (min cosine over probe texts / 1-thread ms, 16 tokens): dynamic int8 0.973 / 1.0;
        # MatMulNBits 8-bit, block 64, int8 compute 0.997 / 1.9; block 32 0.998 / 2.5 (+0.7 MB)
        onnx_weight_only=("*",),
        onnx_block_size=64,
        onnx_accuracy_level=4,
        notes={"pooling": "masked mean over tokens, then L2 normalisation", "max_length": max_length},
    )


def image_spec() -> ExportSpec:
    return ExportSpec(
        component="image_encoder",
        inputs=(TensorSpec(IMAGE_INPUT, "float32", ("batch", 3, IMAGE_SIZE, IMAGE_SIZE)),),
        output=TensorSpec(IMAGE_OUTPUT, "float32", ("batch", IMAGE_DIM)),
        trace={"batch": 2},
        checks=({"batch": 1}, {"batch": 3}),
        signatures=({"batch": 1},),
        signature_axis="batch",
        signature_prefix="b",
        metric="cosine",
        bar=IMAGE_COSINE_BAR,
        atol_fp32=5e-3,  # pooled ReLU6 features, values up to ~6
        # the colour descriptor's histogram (shares, square roots) keeps float activations: calibrated int8 would
        # round its small shares away; it is elementwise work on a 56x56 map, about 1% of the trunk
        onnx_float_scopes=("/colour/",),
        notes={"colour_descriptor": {"dims": [BACKBONE_DIM, IMAGE_DIM]},  # output[:, 1280:1333]
               "preprocess": {"size": IMAGE_SIZE, "resize": "bilinear", "color": "RGB, alpha over white",
                              "normalise": f"(x - {PIXEL_MEAN:g}) / {PIXEL_SCALE:g}", "layout": "NCHW"}},
    )


def head_spec(dense_dim: int, slates: tuple[int, ...] = HEAD_SIGNATURE_SLATES) -> ExportSpec:
    per_item = {"item_text": TEXT_DIM, "item_image": IMAGE_DIM, "item_video": IMAGE_DIM, "item_mask": NUM_MODALITIES,
                "dense": dense_dim}
    per_user = {"query": TEXT_DIM, "user_text": TEXT_DIM, "user_image": IMAGE_DIM, "user_mask": 1}
    inputs = tuple(
        TensorSpec(n, "float32", ("batch", "slate", per_item[n]) if n in per_item else ("batch", per_user[n]))
        for n in HEAD_INPUTS
    )
    return ExportSpec(
        component="head",
        inputs=inputs,
        output=TensorSpec(HEAD_OUTPUT, "float32", ("batch", "slate")),
        trace={"batch": 2, "slate": 20},
        checks=({"batch": 1, "slate": 7}, {"batch": 3, "slate": 50}, {"batch": 1, "slate": 100}),
        signatures=tuple({"batch": 1, "slate": s} for s in slates),
        signature_axis="slate",
        signature_prefix="s",
        metric="kendall_tau",
        bar=HEAD_TAU_BAR,
        # the first body layer sees [tokens, products with query/user, dense, mask] side by side: one per-tensor
        # activation scale (onnxruntime dynamic int8) drowns the small features; int8 weights only there
        onnx_weight_only=("/body/body.0/MatMul",),
    )


# ------------------------------------------------------------------------------------ dummy inputs


def random_head_inputs(spec: ExportSpec, sizes: Mapping[str, int], seed: int = 0) -> dict[str, np.ndarray]:
    """Plausible random head inputs: unit-norm text, non-negative image features (and a colour descriptor of
    square-rooted shares), random masks with the last candidates of each slate padded (mask 0), as the runtime pads
    a short slate."""
    rng = np.random.default_rng(seed)
    out: dict[str, np.ndarray] = {}
    for t in spec.inputs:
        shape = t.concrete(sizes)
        if t.name in ("query", "item_text", "user_text"):
            x = rng.normal(size=shape)
            x /= np.linalg.norm(x, axis=-1, keepdims=True)
        elif t.name in ("item_image", "item_video", "user_image"):
            x = np.clip(rng.gamma(0.6, 0.5, size=shape), 0.0, 6.0)
            if shape[-1] == IMAGE_DIM:  # the colour descriptor: square roots of shares (sum of squares 1), a share
                bins = rng.dirichlet(np.full(COLOUR_DIM - 1, 0.1), size=shape[:-1])
                x[..., BACKBONE_DIM:] = np.concatenate([np.sqrt(bins), rng.random((*shape[:-1], 1))], -1)
        elif t.name == "item_mask":
            x = np.stack([np.ones(shape[:-1]), rng.random(shape[:-1]) < 0.8, rng.random(shape[:-1]) < 0.3], -1)
        elif t.name == "user_mask":
            x = (rng.random(shape) < 0.7).astype(float)
        else:
            x = rng.normal(size=shape)
        out[t.name] = np.asarray(x, np.float32)
    b, s = spec.inputs[1].concrete(sizes)[:2]
    if s > 2:  # pad the tail of every slate like the runtime does
        n_pad = s // 4
        out["item_mask"][:, s - n_pad :] = 0.0
        for k in ("item_text", "item_image", "item_video", "dense"):
            out[k][:, s - n_pad :] = 0.0
    return out


def random_images(n: int, seed: int = 0) -> np.ndarray:
    """``[n, 3, IMAGE_SIZE, IMAGE_SIZE]`` normalised pixels of smooth random colour fields plus texture (not noise: noise
    is far from the encoder's training images and exaggerates quantisation error)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.meshgrid(np.linspace(0, 1, IMAGE_SIZE), np.linspace(0, 1, IMAGE_SIZE), indexing="ij")
    out = np.empty((n, 3, IMAGE_SIZE, IMAGE_SIZE), np.float32)
    for i in range(n):
        img = np.zeros((3, IMAGE_SIZE, IMAGE_SIZE))
        for c in range(3):
            a, b, ph = rng.uniform(0.5, 6, 2).tolist() + [rng.uniform(0, 6.3)]
            img[c] = 127 + 100 * np.sin(a * xx * 3.1 + b * yy * 2.3 + ph) * rng.uniform(0.3, 1.0)
        cy, cx, r = rng.uniform(0.2, 0.8, 2).tolist() + [rng.uniform(0.1, 0.35)]
        blob = ((yy - cy) ** 2 + (xx - cx) ** 2) < r**2
        img[:, blob] = rng.uniform(0, 255, size=(3, 1))
        img += rng.normal(0, 6, size=img.shape)
        out[i] = (np.clip(img, 0, 255) - PIXEL_MEAN) / PIXEL_SCALE
    return out
