"""Tail averaging of a federated run (``server.average-rounds``): ``averaged.pt`` holds the mean of the last
rounds' global heads, read back from their checkpoints."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from flwr.app import ArrayRecord

from server.loop import LoopState
from server.run import AVERAGED, write_tail_average
from shared_model.checkpoint import (
    CheckpointError,
    average_checkpoints,
    load_checkpoint,
    save_checkpoint,
    tail_window,
)
from shared_model.config import ConfigError, ModelConfig, parse_run_config
from shared_model.head import FusedRankingHead, build_head

SMALL = ModelConfig(text_dim=8, image_dim=8, video_dim=8, proj_dim=4, hidden=6)
SMALL_FLAT = {"model.text-dim": 8, "model.image-dim": 8, "model.video-dim": 8, "model.proj-dim": 4, "model.hidden": 6}


def _run_dir(tmp_path: Path, rounds: int) -> tuple[Path, LoopState]:
    """A run folder with one checkpoint per round, each a differently initialised head (as a run leaves them)."""
    out = tmp_path / "run"
    for r in range(1, rounds + 1):
        save_checkpoint(out / "checkpoints" / f"round-{r:03d}.pt", build_head(SMALL, seed=r), round=r)
    state = LoopState(ArrayRecord(build_head(SMALL, seed=rounds).state_dict()), [{"round": r} for r in
                                                                                   range(1, rounds + 1)])
    return out, state


@pytest.mark.parametrize(("last", "k", "expected"), [
    (30, 10, (21, 30)),  # the last 10 of 30
    (12, 10, (9, 12)),  # never more than the last third
    (5, 10, None),  # a third of 5 is one round: nothing to average
    (30, 1, None), (30, 0, None),  # off
    (6, 2, (5, 6)),
])
def test_tail_window(last: int, k: int, expected: tuple[int, int] | None) -> None:
    window = tail_window(last, k)
    assert (None if not window else (window[0], window[-1])) == expected
    if window:
        assert list(window) == list(range(expected[0], expected[1] + 1))  # type: ignore[index]


def test_averaged_checkpoint_is_the_mean_of_the_last_rounds(tmp_path: Path) -> None:
    # Prepare: nine rounds; a third of them (7-9) is below server.average-rounds = 10
    out, state = _run_dir(tmp_path, 9)
    settings = parse_run_config({**SMALL_FLAT, "server.average-rounds": 10})
    seen = []

    def central_eval(m: FusedRankingHead) -> dict[str, float]:
        seen.append(m)
        return {"ndcg@10": 0.5}

    # Execute
    info = write_tail_average(settings, state, out, central_eval)
    # Assert: the weights are numpy's mean of rounds 7-9, the evaluation is of that head, the file says which rounds
    assert info == {"rounds": [7, 9], "central": {"ndcg@10": 0.5}}
    model, payload = load_checkpoint(out / AVERAGED)
    assert payload["extra"]["averaged_rounds"] == [7, 9] and payload["round"] == 9
    states = [load_checkpoint(out / "checkpoints" / f"round-{r:03d}.pt")[0].state_dict() for r in (7, 8, 9)]
    for name, value in model.state_dict().items():
        expected = np.mean([s[name].numpy() for s in states], axis=0)
        np.testing.assert_allclose(value.numpy(), expected, rtol=1e-6, atol=1e-7)
    assert len(seen) == 1 and all(
        np.allclose(a.numpy(), b.numpy()) for a, b in zip(seen[0].state_dict().values(), model.state_dict().values(),
                                                         strict=True))


def test_no_window_leaves_no_average_behind(tmp_path: Path) -> None:
    # Prepare: an averaged.pt from an earlier, longer run in the same folder
    out, state = _run_dir(tmp_path, 4)
    (out / AVERAGED).write_bytes(b"stale")
    settings = parse_run_config({**SMALL_FLAT, "server.average-rounds": 10})
    # Execute: four rounds, a third is one round
    info = write_tail_average(settings, state, out, lambda m: {"ndcg@10": 0.5})
    # Assert
    assert info == {} and not (out / AVERAGED).exists()


def test_average_checkpoints_names_a_checkpoint_of_another_architecture(tmp_path: Path) -> None:
    a, b = tmp_path / "a.pt", tmp_path / "b.pt"
    save_checkpoint(a, build_head(SMALL))
    save_checkpoint(b, build_head(ModelConfig(text_dim=8, image_dim=8, video_dim=8, proj_dim=4, hidden=7)))
    with pytest.raises(CheckpointError, match="b.pt"):
        average_checkpoints([a, b])
    with pytest.raises(ValueError, match="no checkpoints"):
        average_checkpoints([])


def test_negative_average_rounds_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="server.average-rounds"):
        parse_run_config({"server.average-rounds": -1})
