"""The image encoder's colour descriptor: which bin a product's colour lands in (against colorsys), background
handling, scale invariance, and that the exported image encoder computes it as torch does."""

from __future__ import annotations

import colorsys
import math

import numpy as np
import pytest
import torch
from PIL import Image

from shared_model.encoders import ColourDescriptor, ImageEncoder, _ImageAPI
from shared_model.head_features import BACKBONE_DIM, COLOUR_DIM, IMAGE_DIM

GREYS = 4  # the descriptor's layout: 4 grey levels, then 12 hues x 4 tones (dark/bright x pale/vivid), then share
TONES = 4


def _photo(rgb: tuple[int, int, int], frac: float = 0.5, size: int = 224, background: int = 255) -> Image.Image:
    """A centred square product of colour ``rgb`` covering ``frac`` of a ``background``-grey photo (exactly
    :func:`_area` of it: the square's edges fall on the descriptor's 4x4 pooling grid)."""
    arr = np.full((size, size, 3), background, np.uint8)
    side = _side(frac, size)
    lo = (size - side) // 2
    arr[lo:lo + side, lo:lo + side] = rgb
    return Image.fromarray(arr)


def _side(frac: float, size: int = 224) -> int:
    return int(round(size * np.sqrt(frac) / 8)) * 8


def _area(frac: float, size: int = 224) -> float:
    return _side(frac, size) ** 2 / size**2


def _describe(*images: Image.Image) -> np.ndarray:
    return ColourDescriptor()(_ImageAPI.preprocess(list(images))).numpy() / ColourDescriptor.SCALE


def _leak_share(frac: float) -> float:
    """The white level's share when a product covers ``frac`` of a pure-white photo: a white pixel is background
    only softly (foreground weight 1 - sigmoid(0.1 * 40) * sigmoid(0.08 * 40) ~ 0.056 of a product pixel's)."""
    leak = 1.0 - 1.0 / (1.0 + math.exp(-4.0)) / (1.0 + math.exp(-3.2))
    return leak * (1 - frac) / (frac + leak * (1 - frac))


def _hue_bin(hist: np.ndarray) -> int:
    colour = hist[GREYS:GREYS + ColourDescriptor.HUES * TONES].reshape(ColourDescriptor.HUES, TONES)
    return int(colour.sum(1).argmax())


def test_layout_matches_the_image_dim() -> None:
    assert COLOUR_DIM == GREYS + ColourDescriptor.HUES * TONES + 1
    assert IMAGE_DIM == BACKBONE_DIM + COLOUR_DIM


@pytest.mark.parametrize("hue_deg", range(0, 360, 30))
def test_vivid_hues_land_in_the_colorsys_hue_bin(hue_deg: int) -> None:
    r, g, b = (int(round(255 * c)) for c in colorsys.hsv_to_rgb(hue_deg / 360, 1.0, 0.9))
    rgb = (r, g, b)
    d = _describe(_photo(rgb))[0] ** 2  # squared: the shares themselves
    # independent reference: colorsys's hue of the same pixel, binned at 30 degrees
    h, _, _ = colorsys.rgb_to_hsv(*(c / 255 for c in rgb))
    assert _hue_bin(d) == int(round(h * 12)) % 12
    assert d[:GREYS - 1].sum() < 1e-6  # nothing in black or the greys
    assert d[GREYS - 1] == pytest.approx(_leak_share(_area(0.5)), abs=1e-3)  # white: only the background's leak
    tones = d[GREYS:GREYS + 48].reshape(12, TONES).sum(0)
    assert tones.argmax() == 3  # bright and vivid
    np.testing.assert_allclose(d[:-1].sum(), 1.0, atol=1e-3)  # shares of the (soft) foreground


def test_dark_and_pale_tones_are_told_apart() -> None:
    navy, pink = (20, 30, 90), (250, 190, 200)
    dn, dp = _describe(_photo(navy), _photo(pink)) ** 2
    assert dn[GREYS:GREYS + 48].reshape(12, TONES).sum(0).argmax() in (0, 1)  # dark
    assert dp[GREYS:GREYS + 48].reshape(12, TONES).sum(0).argmax() == 2  # bright and pale
    assert _hue_bin(dn) in (7, 8)  # blue: 210-240 degrees
    assert _hue_bin(dp) in (11, 0)  # pink: red's neighbourhood


@pytest.mark.parametrize("grey, level", [(0, 0), (85, 1), (170, 2)])
def test_greys_land_in_their_level(grey: int, level: int) -> None:
    d = _describe(_photo((grey, grey, grey)))[0] ** 2
    assert d[:GREYS].argmax() == level
    assert d[GREYS:-1].sum() < 1e-6


def test_white_background_weighs_little_and_share_measures_the_product() -> None:
    small, large = _describe(_photo((200, 30, 30), frac=0.1), _photo((200, 30, 30), frac=0.6)) ** 2
    for d, frac in ((small, 0.1), (large, 0.6)):
        area = _area(frac)
        assert d[GREYS - 1] == pytest.approx(_leak_share(area), abs=1e-3)  # the background's leak, all white
        assert d[-1] == pytest.approx(area + 0.056 * (1 - area), abs=2e-3)  # the soft foreground's share
    # the product's own colours keep their proportions however much background there is
    np.testing.assert_allclose(small[GREYS:-1] / small[GREYS:-1].sum(), large[GREYS:-1] / large[GREYS:-1].sum(),
                               atol=1e-3)
    blank = _describe(Image.new("RGB", (224, 224), (255, 255, 255)))[0] ** 2
    assert np.isfinite(blank).all() and blank[-1] == pytest.approx(0.056, abs=2e-3)
    assert blank[GREYS - 1] == pytest.approx(1.0, abs=1e-3)  # all of the little foreground is white


def test_image_encoder_puts_the_descriptor_after_the_pooled_features() -> None:
    enc = ImageEncoder()
    x = _ImageAPI.preprocess([_photo((30, 160, 40)), _photo((240, 240, 250), frac=0.3)])
    out = enc._embed(x)
    assert out.shape == (2, IMAGE_DIM)
    np.testing.assert_allclose(out[:, BACKBONE_DIM:], ColourDescriptor()(x).numpy(), atol=1e-6)
    with torch.inference_mode():
        trunk = enc.net.extract_features(x).mean(dim=(2, 3)).numpy()
    np.testing.assert_allclose(out[:, :BACKBONE_DIM], trunk, atol=1e-5)


def test_onnx_export_keeps_the_descriptor() -> None:
    pytest.importorskip("onnxruntime")
    from shared_model.encoders import OnnxImageEncoder

    enc = ImageEncoder(channels_last=False)
    onnx_enc = OnnxImageEncoder(enc)
    x = _ImageAPI.preprocess([_photo((250, 200, 20)), _photo((10, 10, 10), frac=0.2)])
    np.testing.assert_allclose(onnx_enc._embed(x)[:, BACKBONE_DIM:], enc._embed(x)[:, BACKBONE_DIM:], atol=1e-4)
