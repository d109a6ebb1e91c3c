"""Pretrained encoders: offline loading, shapes, semantic sanity, tokenizer parity, robustness to bad images."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

from shared_model.encoders import (  # noqa: E402
    IMAGE_SIZE,
    ImageEncoder,
    TextEncoder,
    load_image_encoder,
    load_text_encoder,
    tokenizer_path,
)
from shared_model.schema import IMAGE_DIM, TEXT_DIM  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def _one_thread():
    prev = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(prev)


@pytest.fixture(scope="module")
def text_enc() -> TextEncoder:
    enc = load_text_encoder()
    assert isinstance(enc, TextEncoder)  # the default backend is torch
    return enc


@pytest.fixture(scope="module")
def image_enc() -> ImageEncoder:
    enc = load_image_encoder()
    assert isinstance(enc, ImageEncoder)  # the default backend is torch
    return enc


def _cos(a: np.ndarray, b: np.ndarray) -> float:
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


def _square(color: tuple[int, int, int], size: tuple[int, int] = (160, 120)) -> Image.Image:
    return Image.new("RGB", size, color)


def test_offline_loading_in_fresh_process(tmp_path: Path) -> None:
    """Both encoders load with the hub disabled, an empty HF cache and an unusable proxy: weights come from pip."""
    code = textwrap.dedent(
        """
        import numpy as np, torch
        from PIL import Image
        torch.set_num_threads(1)
        from shared_model.encoders import TextEncoder, ImageEncoder
        t = TextEncoder().encode(["offline check"])
        i = ImageEncoder().encode_images([Image.new("RGB", (64, 64), (200, 30, 30))])
        print("SHAPES", t.shape, i.shape)
        """
    )
    env = dict(os.environ)
    env.update(
        HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", HF_HOME=str(tmp_path / "hf"),
        HTTP_PROXY="http://127.0.0.1:9", HTTPS_PROXY="http://127.0.0.1:9", NO_PROXY="",
        PYTHONPATH=str(REPO),
    )
    res = subprocess.run([sys.executable, "-c", code], env=env, cwd=tmp_path, capture_output=True,
                         text=True, timeout=120)
    assert res.returncode == 0, res.stderr[-3000:]
    assert f"SHAPES (1, {TEXT_DIM}) (1, {IMAGE_DIM})" in res.stdout


# ------------------------------------------------------------------------------------------- text


def test_text_shapes_and_norm(text_enc: TextEncoder) -> None:
    e = text_enc.encode(["red dress", "stainless steel mug", "a" * 500])
    assert e.shape == (3, TEXT_DIM) and e.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(e, axis=1), 1.0, atol=1e-5)
    assert text_enc.encode([]).shape == (0, TEXT_DIM)


def test_text_semantics(text_enc: TextEncoder) -> None:
    e = text_enc.encode(["red dress", "crimson gown", "stainless steel mug", "insulated coffee cup"])
    assert e[0] @ e[1] > e[0] @ e[2]
    assert e[2] @ e[3] > e[2] @ e[1]


def test_tokenizer_ids_match_transformers(text_enc: TextEncoder) -> None:
    from transformers import AutoTokenizer

    hf = AutoTokenizer.from_pretrained(str(tokenizer_path().parent))
    samples = [
        "Red Dress", "Crème brûlée café — Ünïcödé!", "iPhone-15 Pro Max (256GB), 5G", "",
        "women's running shoes size 8.5 " * 20, "北京 烤鸭 ok", "  spaces\tand\nnewlines  ",
    ]
    for max_length in (16, 64):
        for s in samples:
            want = hf(s, truncation=True, max_length=max_length)["input_ids"]
            got = text_enc.tokenizer(max_length).encode(s).ids
            assert got == want, (s, max_length)
    ids, mask = text_enc.tokenize(samples[:3], max_length=64)
    assert ids.dtype == np.int64 and ids.shape == mask.shape and (ids[mask == 0] == 0).all()


def test_text_forward_padding_and_batching_invariant(text_enc: TextEncoder) -> None:
    texts = ["red dress", "a considerably longer product title about a crimson evening gown", "mug"]
    one = np.concatenate([text_enc.encode([t]) for t in texts])
    batched = text_enc.encode(texts, batch_size=64)
    np.testing.assert_allclose(one, batched, atol=1e-5)
    ids, mask = text_enc.tokenize(texts)
    pad = torch.zeros((len(texts), 7), dtype=torch.long)
    with torch.inference_mode():
        padded = text_enc(torch.cat([torch.from_numpy(ids), pad], 1), torch.cat([torch.from_numpy(mask), pad], 1))
    np.testing.assert_allclose(padded.numpy(), batched, atol=1e-5)


# ------------------------------------------------------------------------------------------ image


def test_image_preprocess() -> None:
    imgs = [
        _square((255, 0, 0), (300, 100)),
        Image.new("L", (50, 80), 128),
        Image.new("RGBA", (40, 40), (0, 0, 0, 0)),  # fully transparent -> white once decoded
        _square((0, 0, 0), (IMAGE_SIZE, IMAGE_SIZE)).convert("P"),
    ]
    x = ImageEncoder.preprocess(imgs)
    assert x.shape == (4, 3, IMAGE_SIZE, IMAGE_SIZE) and x.dtype == torch.float32
    assert torch.allclose(x[0, 0], torch.full((IMAGE_SIZE, IMAGE_SIZE), 1.0)), "(255-127)/128 == 1"
    assert torch.allclose(x[0, 1], torch.full((IMAGE_SIZE, IMAGE_SIZE), -127 / 128))
    assert torch.allclose(x[1], torch.full_like(x[1], 1 / 128))
    assert torch.allclose(x[3], torch.full_like(x[3], -127 / 128))


def test_image_shapes_and_color_semantics(image_enc: ImageEncoder) -> None:
    f = image_enc.encode_images([_square((220, 20, 20)), _square((180, 10, 40), (90, 200)), _square((20, 30, 220))])
    assert f.shape == (3, IMAGE_DIM) and f.dtype == np.float32 and np.isfinite(f).all()
    assert _cos(f[0], f[1]) > _cos(f[0], f[2])
    with torch.inference_mode():
        out = image_enc(ImageEncoder.preprocess([_square((1, 2, 3))]))
    assert out.shape == (1, IMAGE_DIM)


def test_encode_paths_tolerates_bad_files(image_enc: ImageEncoder, tmp_path: Path) -> None:
    good = tmp_path / "good.png"
    _square((200, 0, 0)).save(good)
    jpg = tmp_path / "full.jpg"
    _square((0, 0, 200)).save(jpg, quality=90)
    truncated = tmp_path / "truncated.jpg"
    truncated.write_bytes(jpg.read_bytes()[:200])
    garbage = tmp_path / "garbage.png"
    garbage.write_bytes(b"\x89PNG\r\n\x1a\nthis is not a png at all")
    empty = tmp_path / "empty.jpg"
    empty.write_bytes(b"")
    paths = [str(good), str(truncated), str(garbage), str(tmp_path / "missing.png"), str(empty), str(jpg),
             None, str(tmp_path)]
    f, ok = image_enc.encode_paths(paths, batch_size=2)
    assert f.shape == (len(paths), IMAGE_DIM)
    assert ok.tolist() == [True, False, False, False, False, True, False, False]
    assert (f[~ok] == 0).all() and (np.abs(f[ok]).sum(axis=1) > 0).all()
    direct = image_enc.encode_images([Image.open(good)])
    np.testing.assert_allclose(f[0], direct[0], atol=1e-5)


def test_encode_video_mean_of_good_frames(image_enc: ImageEncoder, tmp_path: Path) -> None:
    frames = []
    for k, c in enumerate([(200, 0, 0), (0, 200, 0), (0, 0, 200)]):
        p = tmp_path / f"f{k}.png"
        _square(c).save(p)
        frames.append(str(p))
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"nope")
    vec, ok = image_enc.encode_video([frames[0], str(bad), frames[1], frames[2]])
    per, _ = image_enc.encode_paths(frames)
    assert ok and vec.shape == (IMAGE_DIM,)
    np.testing.assert_allclose(vec, per.mean(axis=0), atol=1e-5)
    vec, ok = image_enc.encode_video([str(bad), str(tmp_path / "missing.png")])
    assert not ok and vec.shape == (IMAGE_DIM,) and not vec.any()
    vec, ok = image_enc.encode_video([])
    assert not ok and not vec.any()


# ------------------------------------------------------------------------------------ frozen / onnx


def test_encoders_are_frozen(text_enc: TextEncoder, image_enc: ImageEncoder) -> None:
    for enc in (text_enc, image_enc):
        enc.train()  # e.g. a parent module's .train(), or torch.onnx.export restoring the previous mode
        assert not any(m.training for m in enc.modules())
        assert not any(p.requires_grad for p in enc.parameters())
    x = ImageEncoder.preprocess([_square((10, 200, 10))] * 2)
    with torch.inference_mode():
        np.testing.assert_array_equal(image_enc(x[:1]).numpy(), image_enc(x[:1]).numpy())
        torch.testing.assert_close(image_enc(x)[:1], image_enc(x[:1]), atol=1e-5, rtol=1e-5)  # no batch stats
    with pytest.raises(ValueError, match="backend"):
        load_text_encoder("tensorflow")


def test_onnx_backends_match_torch(text_enc: TextEncoder, image_enc: ImageEncoder, tmp_path: Path) -> None:
    pytest.importorskip("onnxruntime")
    from shared_model.encoders import OnnxImageEncoder, OnnxTextEncoder

    texts = ["red dress", "crimson gown with a long train and lace sleeves", "mug", "Ünïcödé café " * 30]
    ot = OnnxTextEncoder(text_enc, num_threads=1)
    np.testing.assert_allclose(ot.encode(texts, batch_size=3), text_enc.encode(texts), atol=1e-5)
    assert ot.version(64) == text_enc.version(64)

    oi = OnnxImageEncoder(image_enc, num_threads=1)
    p = tmp_path / "a.png"
    _square((30, 140, 200)).save(p)
    paths = [str(p), str(tmp_path / "missing.png"), str(p)]
    f_onnx, ok_onnx = oi.encode_paths(paths)
    f_torch, ok_torch = image_enc.encode_paths(paths)
    assert ok_onnx.tolist() == ok_torch.tolist() == [True, False, True]
    np.testing.assert_allclose(f_onnx, f_torch, atol=1e-4)
    assert oi.version() == image_enc.version()
    assert not image_enc.training and not text_enc.training
