"""Model selection of the centralized heads (``simulations.centralized.train_central``): the weights of the best
window of epochs, averaged, so that one lucky epoch of noisy validation clicks cannot pick the model."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

import simulations.centralized as central
from shared_model.checkpoint import average_states
from shared_model.config import ModelConfig, TrainConfig
from shared_model.training import click_targets, score_slates, validation_loss
from simulations.centralized import CRITERIA
from tests.synthetic import synthetic_prepared


def test_average_states_is_the_elementwise_mean() -> None:
    # Prepare
    rng = np.random.default_rng(0)
    a, b, c = (rng.normal(size=(3, 4)).astype(np.float32) for _ in range(3))
    states = [{"w": torch.from_numpy(x), "n": torch.tensor(k)} for k, x in enumerate((a, b, c))]
    # Execute
    avg = average_states(states)
    # Assert
    np.testing.assert_allclose(avg["w"].numpy(), (a + b + c) / 3, rtol=1e-6)
    assert int(avg["n"]) == 2  # integer entries: the last state's


def _planted_run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, figures: list[float], criterion: str = "ips-dcg",
                 **kw: Any) -> tuple[dict[str, Any], list[dict[str, torch.Tensor]], dict[str, torch.Tensor]]:
    """train_central with planted validation figures (higher = better; for ``criterion="loss"`` the planted
    validation losses are their negatives); returns its info, every epoch's weights and the result."""
    prep = synthetic_prepared(tmp_path)
    snaps: list[dict[str, torch.Tensor]] = []
    calls = iter(figures)
    real_train = central.train_epochs

    def train_and_record(model: torch.nn.Module, *a: Any, **k: Any) -> dict[str, float]:
        out = real_train(model, *a, **k)
        snaps.append({n: v.detach().clone() for n, v in model.state_dict().items()})
        return out

    monkeypatch.setattr(central, "train_epochs", train_and_record)
    if criterion == "loss":
        monkeypatch.setattr(central, "validation_loss", lambda *a, **k: -next(calls))
    else:
        monkeypatch.setattr(central, "ips_click_dcg", lambda *a, **k: next(calls))
    model, info = central.train_central(prep, ModelConfig(hidden=16, proj_dim=8), TrainConfig(), progress=False,
                                        criterion=criterion, **kw)
    assert info["criterion"] == criterion
    return info, snaps, model.state_dict()


@pytest.mark.parametrize("criterion", CRITERIA)
def test_a_single_lucky_epoch_does_not_win_over_a_sustained_plateau(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                                    criterion: str) -> None:
    # Prepare: epoch 2 is a spike (what one noisy epoch of validation clicks looks like); epochs 5-7 are better
    # on average than any window containing the spike
    figures = [1.0, 2.5, 1.0, 1.0, 1.8, 1.9, 2.0, 1.0, 1.0, 1.0, 1.0, 1.0]
    # Execute
    info, snaps, state = _planted_run(tmp_path, monkeypatch, figures, criterion, epochs=12,
                                     min_epochs=5, window=3, patience=3)
    # Assert: window 5-7 selected, stopped 3 epochs later, weights = mean of epochs 5, 6 and 7
    assert info["selected_epochs"] == [5, 7]
    assert info["epochs_run"] == 10
    for name, value in state.items():
        want = torch.stack([s[name] for s in snaps[4:7]]).mean(0)
        torch.testing.assert_close(value, want)
    assert not torch.equal(state["out.weight"], snaps[1]["out.weight"])


@pytest.mark.parametrize("criterion", CRITERIA)
def test_min_epochs_are_run_even_when_validation_only_falls(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                            criterion: str) -> None:
    # Prepare
    figures = [5.0, 4.0, 3.0, 2.0, 1.0, 0.5, 0.4, 0.3]
    # Execute
    info, snaps, _ = _planted_run(tmp_path, monkeypatch, figures, criterion, epochs=8, min_epochs=6,
                                     window=2, patience=1)
    # Assert
    assert info["epochs_run"] == 6 and len(snaps) == 6
    assert info["selected_epochs"] == [1, 2]


@pytest.mark.parametrize("criterion", CRITERIA)
def test_fewer_epochs_than_the_window_average_all_of_them(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                          criterion: str) -> None:
    # Execute
    info, snaps, state = _planted_run(tmp_path, monkeypatch, [1.0, 2.0], criterion, epochs=2, window=3)
    # Assert
    assert info["selected_epochs"] == [1, 2]
    torch.testing.assert_close(state["out.bias"], (snaps[0]["out.bias"] + snaps[1]["out.bias"]) / 2)


@pytest.mark.parametrize("mode", ["naive", "offset", "ips"])
def test_validation_loss_is_the_debiased_objective_on_held_out_slates(tmp_path: Path, mode: str) -> None:
    # Prepare: a trained-for-one-epoch head and the validation slates train_central holds out
    prep = synthetic_prepared(tmp_path)
    cfg = TrainConfig(ips=mode != "naive", debias="ips" if mode == "ips" else "offset")
    model = central.build_head(ModelConfig(hidden=16, proj_dim=8), seed=0)
    fit, val = prep.fit_validation_slates(central.VAL_FRAC)
    props = prep.propensity_tensor()
    central.train_epochs(model, fit, prep.table(), cfg, props, epochs=1)
    # Execute
    got = validation_loss(model, val, prep.table(), cfg, props, batch_size=7)  # batches of 7: the mean is per slate
    # Assert: numpy reference, -sum_i w_i y_i log softmax(s + offset)_i / sum_i y_i averaged over slates with a click
    _, weights, offsets = click_targets(val, cfg, props)
    s = score_slates(model, val, prep.table()).astype(np.float64)
    s = s + (offsets.numpy() if offsets is not None else 0.0)
    w = weights.numpy() if weights is not None else np.ones_like(s)
    y, valid = val.clicks.numpy(), val.valid.numpy()
    rows = [-(w[r] * y[r] * (s[r] - np.logaddexp.reduce(s[r][valid[r]])))[valid[r]].sum() / y[r].sum()
            for r in range(len(val)) if (y[r] * valid[r]).sum() > 0]
    assert len(rows) > 3
    assert got == pytest.approx(float(np.mean(rows)), rel=1e-5)
    assert (mode == "naive") == (offsets is None and weights is None)


def test_unknown_selection_criterion_is_named(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="criterion: 'ndcg'"):
        central.train_central(synthetic_prepared(tmp_path), ModelConfig(hidden=16, proj_dim=8), TrainConfig(),
                              progress=False, criterion="ndcg")


def test_cli_selection_choices_are_the_criteria() -> None:
    import argparse

    from simulations.cli import add_commands

    parser = argparse.ArgumentParser()
    add_commands(parser.add_subparsers(dest="command"))
    for command in ("train", "baselines"):
        args = parser.parse_args([command, "--out", "x"])
        assert args.selection == central.DEFAULT_CRITERION
        for criterion in CRITERIA:
            assert parser.parse_args([command, "--out", "x", "--selection", criterion]).selection == criterion
