"""Procedural product images and short product videos for the marketplace simulator.

Every product is drawn as a category silhouette (t-shirt, dress, sneakers, ...) filled with its colour and
pattern, with small rotation/scale/translation jitter, on a random light background, with pixel noise.
Videos are a few frames of the same product swaying slightly; a product with the video-only feature
``light-up`` gets a glowing halo and bright LED dots in the later frames (never in frame 0 nor in the still).

Everything is a pure function of the :class:`ItemLook` and an integer seed, so re-rendering is
deterministic (the tests re-render an item to get its pixel mask).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

__all__ = [
    "COLOR_RGB",
    "PATTERNS",
    "SILHOUETTES",
    "ItemLook",
    "nearest_color",
    "render_frames",
    "render_item_files",
    "render_still",
]

#: Named colours of the simulator and the fill colour each is rendered with.
COLOR_RGB: dict[str, tuple[int, int, int]] = {
    "red": (205, 30, 35),
    "blue": (35, 75, 205),
    "green": (35, 150, 60),
    "yellow": (240, 205, 40),
    "black": (25, 25, 28),
    "white": (242, 242, 242),
    "pink": (245, 140, 185),
    "purple": (120, 50, 165),
    "orange": (245, 130, 20),
    "grey": (128, 128, 128),
}
PATTERNS = ("plain", "striped", "dotted", "checked")
_ACCENT_DARK = (45, 45, 50)
_ACCENT_LIGHT = (236, 236, 230)
_ACCENT_GOLD = (200, 165, 60)
_GLOW = (255, 246, 170)

Box = tuple[float, float, float, float]
Pts = list[tuple[float, float]]


@dataclass(frozen=True)
class ItemLook:
    """What the renderer needs to know about one product.

    Parameters
    ----------
    category : str
        Silhouette name (see :data:`SILHOUETTES`); unknown names get a generic box.
    color : tuple of int
        Fill colour (RGB).
    pattern : str
        One of :data:`PATTERNS`.
    light_up : bool
        Video-only feature: glowing halo and LED dots in the later video frames.
    """

    category: str
    color: tuple[int, int, int]
    pattern: str = "plain"
    light_up: bool = False


class _Canvas:
    """Two drawing layers in 0..100 design units: the body (fill colour) and accents (fixed colours)."""

    def __init__(self, size: int) -> None:
        self.size = size
        self.k = size / 100.0
        self.body = Image.new("L", (size, size), 0)
        self.accent = Image.new("RGB", (size, size), (0, 0, 0))
        self.accent_mask = Image.new("L", (size, size), 0)
        self._b = ImageDraw.Draw(self.body)
        self._a = ImageDraw.Draw(self.accent)
        self._am = ImageDraw.Draw(self.accent_mask)

    def _box(self, box: Box) -> list[float]:
        return [v * self.k for v in box]

    def _pts(self, pts: Pts) -> list[tuple[float, float]]:
        return [(x * self.k, y * self.k) for x, y in pts]

    # body shapes
    def poly(self, pts: Pts) -> None:
        self._b.polygon(self._pts(pts), fill=255)

    def rect(self, box: Box, radius: float = 0.0) -> None:
        self._b.rounded_rectangle(self._box(box), radius=radius * self.k, fill=255)

    def ellipse(self, box: Box) -> None:
        self._b.ellipse(self._box(box), fill=255)

    def chord(self, box: Box, start: float, end: float) -> None:
        self._b.chord(self._box(box), start, end, fill=255)

    def arc(self, box: Box, start: float, end: float, width: float) -> None:
        self._b.arc(self._box(box), start, end, fill=255, width=max(1, int(width * self.k)))

    def ring(self, box: Box, width: float) -> None:
        self._b.ellipse(self._box(box), outline=255, width=max(1, int(width * self.k)))

    # accents (drawn over the body, excluded from the body mask)
    def a_rect(self, box: Box, color: tuple[int, int, int], radius: float = 0.0) -> None:
        b = self._box(box)
        self._a.rounded_rectangle(b, radius=radius * self.k, fill=color)
        self._am.rounded_rectangle(b, radius=radius * self.k, fill=255)

    def a_ellipse(self, box: Box, color: tuple[int, int, int]) -> None:
        b = self._box(box)
        self._a.ellipse(b, fill=color)
        self._am.ellipse(b, fill=255)

    def a_line(self, pts: Pts, color: tuple[int, int, int], width: float) -> None:
        p = self._pts(pts)
        w = max(1, int(width * self.k))
        self._a.line(p, fill=color, width=w)
        self._am.line(p, fill=255, width=w)


def _tshirt(c: _Canvas) -> None:
    c.poly([(35, 20), (44, 17), (50, 23), (56, 17), (65, 20), (86, 33), (78, 46), (68, 40), (68, 86),
            (32, 86), (32, 40), (22, 46), (14, 33)])


def _dress(c: _Canvas) -> None:
    c.poly([(40, 12), (44, 12), (46, 24), (54, 24), (56, 12), (60, 12), (61, 32), (57, 45), (76, 89),
            (24, 89), (43, 45), (39, 32)])
    c.a_rect((42, 43, 58, 47), _ACCENT_DARK)


def _sneakers(c: _Canvas) -> None:
    c.poly([(14, 56), (18, 43), (34, 41), (47, 30), (59, 30), (63, 43), (80, 50), (89, 58), (89, 67),
            (14, 67)])
    c.a_rect((12, 66, 91, 75), _ACCENT_LIGHT, radius=3)
    for x in (46, 51, 56):
        c.a_line([(x, 36), (x + 4, 45)], _ACCENT_LIGHT, 1.2)


def _handbag(c: _Canvas) -> None:
    c.arc((34, 16, 66, 58), 180, 360, 5)
    c.poly([(22, 40), (78, 40), (86, 83), (14, 83)])
    c.a_rect((46, 46, 54, 52), _ACCENT_GOLD, radius=1)


def _backpack(c: _Canvas) -> None:
    c.arc((41, 10, 59, 30), 180, 360, 4)
    c.rect((27, 20, 73, 86), radius=12)
    c.a_line([(35, 56), (65, 56)], _ACCENT_DARK, 1.5)
    c.a_line([(35, 56), (35, 80), (65, 80), (65, 56)], _ACCENT_DARK, 1.0)


def _mug(c: _Canvas) -> None:
    c.ring((56, 40, 82, 68), 7)
    c.rect((22, 28, 64, 82), radius=4)
    c.a_rect((22, 26, 64, 30), _ACCENT_LIGHT, radius=1)


def _lamp(c: _Canvas) -> None:
    c.poly([(36, 16), (64, 16), (79, 50), (21, 50)])
    c.a_rect((48, 50, 52, 81), _ACCENT_DARK)
    c.a_ellipse((33, 78, 67, 89), _ACCENT_DARK)


def _chair(c: _Canvas) -> None:
    c.rect((30, 13, 70, 50), radius=4)
    c.rect((24, 49, 76, 60), radius=2)
    for box in ((26, 59, 32, 89), (68, 59, 74, 89), (38, 59, 42, 83), (58, 59, 62, 83)):
        c.rect(box)


def _watch(c: _Canvas) -> None:
    c.rect((40, 8, 60, 92), radius=3)
    c.ellipse((28, 28, 72, 72))
    c.a_ellipse((35, 35, 65, 65), _ACCENT_LIGHT)
    c.a_line([(50, 50), (50, 39)], _ACCENT_DARK, 1.5)
    c.a_line([(50, 50), (58, 54)], _ACCENT_DARK, 1.5)


def _hat(c: _Canvas) -> None:
    c.chord((29, 24, 71, 86), 180, 360)
    c.ellipse((11, 50, 89, 70))
    c.a_rect((29.5, 48, 70.5, 54), _ACCENT_DARK)


def _generic(c: _Canvas) -> None:
    c.rect((22, 22, 78, 78), radius=8)


#: Silhouette drawers by category name.
SILHOUETTES: dict[str, Callable[[_Canvas], None]] = {
    "t-shirt": _tshirt,
    "dress": _dress,
    "sneakers": _sneakers,
    "handbag": _handbag,
    "backpack": _backpack,
    "mug": _mug,
    "lamp": _lamp,
    "chair": _chair,
    "watch": _watch,
    "hat": _hat,
}


@functools.lru_cache(maxsize=4)
def _grid(size: int) -> tuple[np.ndarray, np.ndarray]:
    yy, xx = np.mgrid[0:size, 0:size]
    yy.setflags(write=False)
    xx.setflags(write=False)
    return yy, xx


def _pattern_layer(size: int, color: tuple[int, int, int], pattern: str, phase: int) -> np.ndarray:
    """Fill colour with the pattern drawn in a shade of it (so the mean stays near the fill colour)."""
    fill = np.array(color, dtype=np.float32)
    lum = 0.299 * fill[0] + 0.587 * fill[1] + 0.114 * fill[2]
    if lum > 200:
        shade = fill * 0.8
    elif lum > 90:
        shade = fill * 0.68
    else:
        shade = fill + (255.0 - fill) * 0.35
    out = np.empty((size, size, 3), dtype=np.uint8)
    out[:] = np.array(color, dtype=np.uint8)
    if pattern in ("striped", "dotted", "checked"):
        yy, xx = _grid(size)
        if pattern == "striped":
            on = ((yy + phase) % 16) < 6
        elif pattern == "dotted":
            cy = (yy + phase) % 16 - 8
            cx = (xx + phase) % 16 - 8
            on = (cx * cx + cy * cy) < 12
        else:
            on = (((yy + phase) // 14) + ((xx + phase) // 14)) % 2 == 1
        out[on] = np.clip(shade + 0.5, 0, 255).astype(np.uint8)
    return out


@dataclass
class _Layers:
    rgba: Image.Image  # item colours (pattern + accents) with the whole item as alpha
    body: Image.Image  # L, fill-colour region only


def _item_layers(look: ItemLook, size: int, phase: int) -> _Layers:
    canvas = _Canvas(size)
    SILHOUETTES.get(look.category, _generic)(canvas)
    rgb = _pattern_layer(size, look.color, look.pattern, phase)
    acc = np.asarray(canvas.accent_mask) > 0
    rgb[acc] = np.asarray(canvas.accent)[acc]
    body = np.asarray(canvas.body)
    alpha = np.maximum(body, np.asarray(canvas.accent_mask))
    body_only = np.where(acc, 0, body).astype(np.uint8)
    rgba = np.concatenate([rgb, alpha[..., None]], axis=2)
    return _Layers(rgba=Image.fromarray(rgba), body=Image.fromarray(body_only))


def _affine(size: int, angle_deg: float, scale: float, tx: float, ty: float) -> tuple[float, ...]:
    """Inverse affine coefficients (output -> input) of rotate+scale about the centre, then translate."""
    c = size / 2.0
    a = math.radians(angle_deg)
    cos, sin = math.cos(a) / scale, math.sin(a) / scale
    # p_in = R(-a)/s (p_out - c - t) + c
    ox, oy = -c - tx, -c - ty
    return (cos, sin, cos * ox + sin * oy + c, -sin, cos, -sin * ox + cos * oy + c)


def _warp(img: Image.Image, coeffs: tuple[float, ...]) -> Image.Image:
    return img.transform(img.size, Image.Transform.AFFINE, coeffs, resample=Image.Resampling.BILINEAR)


@dataclass(frozen=True)
class _Pose:
    angle: float
    scale: float
    tx: float
    ty: float
    bg: tuple[int, int, int]
    phase: int


def _base_pose(rng: np.random.Generator, size: int) -> _Pose:
    return _Pose(
        angle=float(rng.uniform(-12, 12)),
        scale=float(rng.uniform(0.85, 1.08)),
        tx=float(rng.uniform(-0.05, 0.05) * size),
        ty=float(rng.uniform(-0.05, 0.05) * size),
        bg=tuple(int(v) for v in rng.integers(200, 251, size=3)),  # type: ignore[arg-type]
        phase=int(rng.integers(0, 16)),
    )


def _compose(
    layers: _Layers, pose: _Pose, size: int, rng: np.random.Generator, glow: float = 0.0, noise: int = 7,
) -> tuple[Image.Image, np.ndarray]:
    coeffs = _affine(size, pose.angle, pose.scale, pose.tx, pose.ty)
    item = _warp(layers.rgba, coeffs)
    body = np.asarray(_warp(layers.body, coeffs)) > 128
    canvas = Image.new("RGB", (size, size), pose.bg)
    if glow > 0:
        halo = item.getchannel("A").filter(ImageFilter.GaussianBlur(size / 14))
        halo = halo.point(lambda v: int(min(255.0, 2.2 * v) * glow + 0.5))
        canvas = Image.composite(Image.new("RGB", (size, size), _GLOW), canvas, halo)
    canvas.paste(item, (0, 0), item)
    out = np.asarray(canvas, dtype=np.int16).copy()
    if glow > 0:
        yy, xx = _grid(size)
        leds = body & (((xx + yy) % 18) < 4)
        out[leds] = (out[leds] * (1 - glow) + np.array(_GLOW, dtype=np.float32) * glow).astype(np.int16)
    out += rng.integers(-noise, noise + 1, size=out.shape, dtype=np.int16)
    np.clip(out, 0, 255, out=out)
    return Image.fromarray(out.astype(np.uint8)), body


def render_still(look: ItemLook, seed: int, size: int = 224) -> tuple[Image.Image, np.ndarray]:
    """Render the product photo.

    Parameters
    ----------
    look : ItemLook
        Category, colour and pattern.
    seed : int
        Per-item seed (jitter, background, pattern phase, noise).
    size : int
        Square image side in pixels.

    Returns
    -------
    image : PIL.Image.Image
        RGB image.
    body_mask : numpy.ndarray
        Boolean ``[size, size]`` mask of the fill-colour region (accents such as soles excluded).
    """
    rng = np.random.default_rng([seed, 0])
    pose = _base_pose(rng, size)
    layers = _item_layers(look, size, pose.phase)
    return _compose(layers, pose, size, rng)


def render_frames(look: ItemLook, seed: int, num_frames: int = 4, size: int = 224) -> list[Image.Image]:
    """Render a short product video.

    Frame 0 shows the product as in the still (same pose, fresh noise); later frames sway and shift it.
    With ``look.light_up`` a glowing halo and bright LED dots fade in from frame 1 and are strongest in the
    last frame, so the feature is visible in the video only.

    Parameters
    ----------
    look : ItemLook
        Category, colour, pattern and the video-only feature flag.
    seed : int
        The same per-item seed as :func:`render_still`.
    num_frames : int
        Number of frames.
    size : int
        Square frame side in pixels.

    Returns
    -------
    list of PIL.Image.Image
        RGB frames.
    """
    rng = np.random.default_rng([seed, 0])
    pose = _base_pose(rng, size)
    layers = _item_layers(look, size, pose.phase)
    frng = np.random.default_rng([seed, 1])
    sway = float(frng.uniform(6, 14)) * (1 if frng.random() < 0.5 else -1)
    drift = frng.uniform(-0.04, 0.04, size=2) * size
    frames = []
    for f in range(num_frames):
        t = f / max(1, num_frames - 1)
        p = _Pose(
            angle=pose.angle + sway * math.sin(math.pi * t), scale=pose.scale * (1 + 0.05 * t),
            tx=pose.tx + float(drift[0]) * t, ty=pose.ty + float(drift[1]) * t, bg=pose.bg, phase=pose.phase,
        )
        glow = min(1.0, max(0.0, 1.4 * t - 0.1)) if look.light_up and f > 0 else 0.0
        img, _ = _compose(layers, p, size, np.random.default_rng([seed, 2, f]), glow=glow)
        frames.append(img)
    return frames


def render_item_files(
    look: ItemLook, seed: int, image_path: str | Path, frame_paths: Sequence[str | Path] = (),
    size: int = 224, quality: int = 90,
) -> None:
    """Render one product's still (and video frames when ``frame_paths`` is given) to JPEG files."""
    img, _ = render_still(look, seed, size)
    Path(image_path).parent.mkdir(parents=True, exist_ok=True)
    img.save(image_path, format="JPEG", quality=quality)
    if frame_paths:
        Path(frame_paths[0]).parent.mkdir(parents=True, exist_ok=True)
        for fr, path in zip(render_frames(look, seed, len(frame_paths), size), frame_paths, strict=True):
            fr.save(path, format="JPEG", quality=quality)


def nearest_color(rgb: Sequence[float], palette: dict[str, tuple[int, int, int]] | None = None) -> str:
    """Name of the palette colour nearest (Euclidean RGB) to ``rgb``."""
    palette = palette or COLOR_RGB
    v = np.asarray(rgb, dtype=np.float64)
    return min(palette, key=lambda k: float(np.sum((np.asarray(palette[k]) - v) ** 2)))
