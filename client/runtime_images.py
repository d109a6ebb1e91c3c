"""A photo (search by photo) as the image encoder's input, preprocessed exactly as in training.

Pillow is imported lazily, and only to decode a photo; an ``IMAGE_SIZE x IMAGE_SIZE x 3`` uint8 array needs
nothing but numpy. Torch-free, like the rest of the runtime.
"""

from __future__ import annotations

import io
import os
from pathlib import Path
from typing import Any

import numpy as np

from client.runtime_bundle import RerankInputError
from shared_model.head_features import IMAGE_SIZE, PIXEL_MEAN, PIXEL_SCALE


def to_pixels(image: Any) -> np.ndarray:
    """A path, bytes, PIL image or ``HxWx3`` uint8 array -> float32 ``[1, 3, IMAGE_SIZE, IMAGE_SIZE]``, as the
    encoder saw them in training (alpha composited over white, RGB, bilinear resize, ``(x - 127) / 128``)."""
    if isinstance(image, np.ndarray):
        if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
            raise RerankInputError("query_image", f"an array must be HxWx3 uint8, got {image.shape} {image.dtype}")
        arr = image if image.shape[:2] == (IMAGE_SIZE, IMAGE_SIZE) else _resize(_pil_image().fromarray(image))
    else:
        arr = _resize(_decode(image))
    x = arr.astype(np.float32).transpose(2, 0, 1)[None]
    return np.ascontiguousarray((x - PIXEL_MEAN) / PIXEL_SCALE)


def _pil_image() -> Any:
    """``PIL.Image``, imported lazily: only search-by-photo needs Pillow."""
    try:
        from PIL import Image
    except ImportError as e:
        raise RerankInputError("query_image", f"decoding a photo needs Pillow; pass a {IMAGE_SIZE}x{IMAGE_SIZE}x3 "
                                              "uint8 array") from e
    return Image


def _decode(image: Any) -> Any:
    """An RGB PIL image from a PIL image, bytes or a path (as ``shared_model.encoders.decode_image``)."""
    pil = _pil_image()
    if isinstance(image, pil.Image):
        img = image
    else:
        name = "<bytes>" if isinstance(image, bytes | bytearray) else str(image)
        try:
            data = image if isinstance(image, bytes | bytearray) else Path(os.fspath(image)).read_bytes()
        except (OSError, TypeError) as e:
            raise RerankInputError("query_image", f"cannot read {name}: {e}") from e
        try:
            with pil.open(io.BytesIO(data)) as probe:
                probe.verify()  # broken chunks / CRCs
            img = pil.open(io.BytesIO(data))
            img.load()  # truncated data
        except Exception as e:  # PIL raises OSError, SyntaxError, ValueError, DecompressionBombError...
            raise RerankInputError("query_image", f"unreadable image {name}: {e.__class__.__name__}: {e}") from e
    if img.width < 1 or img.height < 1:
        raise RerankInputError("query_image", "empty image")
    if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
        rgba = img.convert("RGBA")
        img = pil.alpha_composite(pil.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba)
    return img.convert("RGB")


def _resize(img: Any) -> np.ndarray:
    pil = _pil_image()
    if img.mode != "RGB":
        img = img.convert("RGB")
    if img.size != (IMAGE_SIZE, IMAGE_SIZE):
        img = img.resize((IMAGE_SIZE, IMAGE_SIZE), pil.BILINEAR)
    return np.asarray(img, dtype=np.uint8)
