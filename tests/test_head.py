"""The fused head: shapes, parameter budget, modality masks, padding, checkpoint round trip."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from shared_model.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from shared_model.config import ModelConfig
from shared_model.head import FusedRankingHead, build_head, count_parameters
from shared_model.head_features import IMAGE_DIM

FUSIONS = ("concat", "gated", "attention")


def _inputs(B: int = 3, S: int = 7, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        "query": torch.randn(B, 384, generator=g),
        "item_text": torch.randn(B, S, 384, generator=g),
        "item_image": torch.randn(B, S, IMAGE_DIM, generator=g),
        "item_video": torch.randn(B, S, IMAGE_DIM, generator=g),
        "item_mask": torch.ones(B, S, 3),
        "dense": torch.randn(B, S, 7, generator=g),
        "user_text": torch.randn(B, 384, generator=g),
        "user_image": torch.randn(B, IMAGE_DIM, generator=g),
        "user_mask": torch.ones(B, 1),
    }


@pytest.mark.parametrize("fusion", FUSIONS)
def test_output_shape_and_budget(fusion: str) -> None:
    # Prepare
    model = build_head(ModelConfig(fusion=fusion), seed=0).eval()
    # Execute
    out = model(**_inputs())
    # Assert
    assert out.shape == (3, 7)
    assert torch.isfinite(out).all()
    assert count_parameters(model) <= 300_000


@pytest.mark.parametrize("fusion", FUSIONS)
@pytest.mark.parametrize("modality", [1, 2])
def test_masked_modality_values_change_nothing(fusion: str, modality: int) -> None:
    # Prepare: item 2 of slate 0 has no image (or no video)
    model = build_head(ModelConfig(fusion=fusion), seed=0).eval()
    x = _inputs()
    x["item_mask"][0, 2, modality] = 0.0
    key = "item_image" if modality == 1 else "item_video"
    y = {k: v.clone() for k, v in x.items()}
    y[key][0, 2] = torch.randn(IMAGE_DIM) * 100.0  # garbage where the modality is absent
    # Execute
    a, b = model(**x), model(**y)
    # Assert: identical scores everywhere, the masked item included
    torch.testing.assert_close(a, b, rtol=0, atol=1e-5)


@pytest.mark.parametrize("fusion", FUSIONS)
def test_missing_modality_only_changes_that_item(fusion: str) -> None:
    model = build_head(ModelConfig(fusion=fusion), seed=0).eval()
    x = _inputs()
    y = {k: v.clone() for k, v in x.items()}
    y["item_mask"][1, 4, 1] = 0.0
    a, b = model(**x), model(**y)
    changed = (a - b).abs() > 1e-6
    assert changed[1, 4]
    changed[1, 4] = False
    assert not changed.any()


@pytest.mark.parametrize("fusion", FUSIONS)
def test_padding_candidates_do_not_affect_real_ones(fusion: str) -> None:
    model = build_head(ModelConfig(fusion=fusion), seed=0).eval()
    x = _inputs(S=5)
    longer = _inputs(S=9, seed=1)
    for k in ("item_text", "item_image", "item_video", "item_mask", "dense"):
        longer[k][:, :5] = x[k]
    for k in ("query", "user_text", "user_image", "user_mask"):
        longer[k] = x[k]
    torch.testing.assert_close(model(**x), model(**longer)[:, :5], rtol=0, atol=1e-5)


def test_user_context_ignored_without_history() -> None:
    model = build_head(ModelConfig(), seed=0).eval()
    x = _inputs()
    x["user_mask"][:] = 0.0
    y = {k: v.clone() for k, v in x.items()}
    y["user_text"] += 5.0
    torch.testing.assert_close(model(**x), model(**y), rtol=0, atol=1e-5)


def test_text_only_config_ignores_image_and_video() -> None:
    model = build_head(ModelConfig(use_image=False, use_video=False), seed=0).eval()
    x = _inputs()
    y = {k: v.clone() for k, v in x.items()}
    y["item_image"] = torch.randn_like(y["item_image"])
    y["item_video"] = torch.randn_like(y["item_video"])
    torch.testing.assert_close(model(**x), model(**y), rtol=0, atol=1e-5)


def test_checkpoint_round_trip(tmp_path) -> None:
    cfg = replace(ModelConfig(), fusion="attention", proj_dim=32)
    model = build_head(cfg, seed=3).eval()
    path = save_checkpoint(tmp_path / "head.pt", model, run_config={"a": 1}, round=4)
    loaded, payload = load_checkpoint(path)
    assert isinstance(loaded, FusedRankingHead) and loaded.cfg == cfg
    assert payload["round"] == 4 and payload["run_config"] == {"a": 1}
    x = _inputs()
    torch.testing.assert_close(model(**x), loaded(**x))


def test_checkpoint_errors_name_the_file(tmp_path) -> None:
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="bad.pt"):
        load_checkpoint(bad)
    with pytest.raises(CheckpointError, match="no such"):
        load_checkpoint(tmp_path / "missing.pt")
