"""The image encoder's colour descriptor: which bin a product's colour lands in (against colorsys), background
handling, scale invariance, that the exported image encoder computes it as torch does, and its weight
(``image_gain``) where embeddings are projected or compared while int8 rows keep the CNN features' precision."""

from __future__ import annotations

import colorsys
import math

import numpy as np
import pytest
import torch
from PIL import Image

from shared_model.encoders import ColourDescriptor, ImageEncoder, _ImageAPI
from shared_model.head_features import BACKBONE_DIM, COLOUR_DIM, COLOUR_GAIN, IMAGE_DIM, image_gain

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
    return ColourDescriptor()(_ImageAPI.preprocess(list(images))).numpy()


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


# ------------------------------------------------------------------------------------------ the descriptor's weight


def _rows(n: int, seed: int) -> np.ndarray:
    """Image embeddings shaped like real ones: pooled ReLU6 features (max ~3.6) and a unit-scale descriptor."""
    rng = np.random.default_rng(seed)
    eff = np.clip(rng.gamma(0.6, 0.5, size=(n, BACKBONE_DIM)), 0, 6).astype(np.float32)
    shares = rng.dirichlet(np.full(COLOUR_DIM - 1, 0.1), size=n)
    return np.c_[eff, np.sqrt(shares), rng.random((n, 1))].astype(np.float32)


def test_image_gain_weighs_only_the_descriptor() -> None:
    g = image_gain(IMAGE_DIM)
    assert (g[:BACKBONE_DIM] == 1).all() and (g[BACKBONE_DIM:] == COLOUR_GAIN).all()
    assert (image_gain(16) == 1).all()  # other widths (small test heads) are left alone


def test_head_projects_the_weighed_embedding() -> None:
    from shared_model.config import ModelConfig
    from shared_model.head import build_head

    head = build_head(ModelConfig(), seed=3)
    x = _rows(6, 1).reshape(2, 3, IMAGE_DIM)
    w, b = head.image_proj.weight.detach().numpy(), head.image_proj.bias.detach().numpy()
    want = (x.astype(np.float64) * image_gain(IMAGE_DIM)) @ w.T.astype(np.float64) + b  # numpy reference
    with torch.no_grad():
        got = head._image(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)


def test_raw_photo_cosine_weighs_the_descriptor() -> None:
    from sklearn.metrics.pairwise import cosine_similarity

    from shared_model.photo_search import cosine

    x = _rows(5, 2)
    g = image_gain(IMAGE_DIM)
    xg = x.astype(np.float64) * g
    np.testing.assert_allclose(cosine(x[0], x[1:]), cosine_similarity(xg[:1], xg[1:])[0], atol=1e-9)


def test_photo_projection_takes_unweighed_embeddings() -> None:
    from shared_model.photo_search import PhotoSearchConfig, fit_projection

    x = _rows(120, 3)
    labels = [k % 6 for k in range(len(x))]
    proj = fit_projection(x, labels, PhotoSearchConfig(steps=25, eval_every=25, seed=0))
    xg = x.astype(np.float64) * image_gain(IMAGE_DIM)
    std = xg.std(0)
    z = (xg - xg.mean(0)) / np.maximum(std, 1e-2 * std.mean() + 1e-8)  # standardised as fitted, weighed first
    h = z @ proj.weight.astype(np.float64)
    want = h / np.linalg.norm(h, axis=1, keepdims=True)
    np.testing.assert_allclose(proj.project(x), want, atol=2e-3)


def test_int8_rows_keep_the_cnn_features_precision() -> None:
    from client.runtime_bundle import pack_rows, unpack_rows

    x = _rows(200, 4)
    eff = x[:, :BACKBONE_DIM]

    def err(rows: np.ndarray) -> float:
        q, s = pack_rows(rows)
        y = unpack_rows(q, s)[:, :BACKBONE_DIM]
        return float(np.median(np.linalg.norm(y - eff, axis=1) / np.linalg.norm(eff, axis=1)))

    alone = err(eff)
    assert err(x) <= 1.05 * alone  # the unit-scale descriptor does not coarsen the row's scale
    weighed = x * image_gain(IMAGE_DIM)  # stored at x15 it would: the reason the weight lives in the consumers
    assert err(weighed) > 2.0 * alone
