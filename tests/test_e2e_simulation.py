"""The smoke scenario end to end, through ``fedrank simulate`` and through ``flwr run .`` (real Flower
simulation engine, real SuperLink). Slow: run in CI, skip locally with ``-m 'not slow'``."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from shared_model.checkpoint import load_checkpoint
from tests.procs import process_env, simulate

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
pytestmark = pytest.mark.slow


def _env(tmp_path: Path) -> dict[str, str]:
    return process_env(tmp_path / "flwr-home")


def _check_results(out: Path, rounds: int) -> dict:
    res = json.loads((out / "results.json").read_text())
    assert [r["round"] for r in res["rounds"]] == list(range(1, rounds + 1))
    for r in res["rounds"]:
        assert r["accepted"] == r["sampled"] > 0 and r["bytes_sent"] > 0 and r["bytes_received"] > 0
        assert 0.0 < r["central"]["ndcg@10"] <= 1.0
    assert (out / "last.pt").is_file() and len(list((out / "checkpoints").glob("round-*.pt"))) == rounds
    assert (out / "ndcg_per_round.png").is_file()
    return res


_simulate = simulate


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict, str]:
    tmp = tmp_path_factory.mktemp("smoke")
    proc = _simulate(tmp, "--scenario", "smoke", "--out", str(tmp / "run"))
    return _check_results(tmp / "run", rounds=2), proc.stdout


def test_smoke_through_fedrank_simulate(uninterrupted: tuple[dict, str]) -> None:
    res, stdout = uninterrupted
    assert res["final"]["ndcg@10"] > res["rounds"][0]["central"]["ndcg@10"] - 0.05
    assert "federated (fedavg)" in stdout


def test_resume_matches_uninterrupted_run(uninterrupted: tuple[dict, str], tmp_path: Path) -> None:
    # Prepare: the same scenario stopped after round 1
    out = tmp_path / "run"
    _simulate(tmp_path, "--scenario", "smoke", "--out", str(out), "--rounds", "1")
    # Execute: continue it to 2 rounds from its last checkpoint
    _simulate(tmp_path, "--resume", str(out), "--rounds", "2")
    # Assert
    res = _check_results(out, rounds=2)
    assert res["resumed_from_round"] == 1
    full = uninterrupted[0]
    for key in ("ndcg@10", "mrr", "recall@10"):
        assert res["final"][key] == pytest.approx(full["final"][key], abs=1e-6)


def test_resume_with_client_sampling_matches_uninterrupted_run(tmp_path: Path) -> None:
    """Half the devices per round: node ids are new at every launch, yet the resumed run samples the same devices."""
    sampled = ("--set", "strategy.fraction-train=0.5", "--set", "strategy.fraction-evaluate=0.0")
    full_dir, out = tmp_path / "full", tmp_path / "run"
    _simulate(tmp_path, "--scenario", "smoke", *sampled, "--out", str(full_dir), "--rounds", "3")
    _simulate(tmp_path, "--scenario", "smoke", *sampled, "--out", str(out), "--rounds", "2")
    _simulate(tmp_path, "--resume", str(out), "--rounds", "3")
    full, res = _check_results(full_dir, rounds=3), _check_results(out, rounds=3)
    assert res["resumed_from_round"] == 2 and [r["sampled"] for r in res["rounds"]] == [5, 5, 5]
    for a, b in zip(full["rounds"], res["rounds"], strict=True):
        assert a["central"]["ndcg@10"] == pytest.approx(b["central"]["ndcg@10"], abs=1e-6)


def test_tail_average_of_the_last_rounds(tmp_path: Path) -> None:
    """``server.average-rounds``: averaged.pt holds the mean of the last rounds' global heads, and results.json
    evaluates it beside the last round's head."""
    out = tmp_path / "run"
    proc = _simulate(tmp_path, "--scenario", "smoke", "--set", "server.average-rounds=2", "--out", str(out),
                     "--rounds", "6")
    res = _check_results(out, rounds=6)
    assert res["averaged"]["rounds"] == [5, 6] and 0.0 < res["averaged"]["central"]["ndcg@10"] <= 1.0
    assert "mean of rounds 5-6 (averaged.pt)" in proc.stdout
    averaged = load_checkpoint(out / "averaged.pt")[0].state_dict()
    last = [load_checkpoint(out / "checkpoints" / f"round-{r:03d}.pt")[0].state_dict() for r in (5, 6)]
    for name, value in averaged.items():
        np.testing.assert_allclose(value.numpy(), (last[0][name].numpy() + last[1][name].numpy()) / 2, rtol=1e-5,
                                   atol=1e-7)


def test_smoke_through_flwr_run(tmp_path: Path) -> None:
    # Prepare: a project-local FLWR_HOME with the local simulation SuperLink
    env = _env(tmp_path)
    home = Path(env["FLWR_HOME"])
    home.mkdir(parents=True)
    (home / "config.toml").write_text('[superlink]\ndefault = "local"\n\n[superlink.local]\naddress = ":local:"\n')
    out, data = tmp_path / "run", ROOT / "data" / "tiny"
    if not (data / "sessions.npz").is_file():  # the ServerApp trains on a data folder; it does not generate one
        subprocess.run([str(BIN / "fedrank"), "generate", "--preset", "tiny", "--out", str(data)],
                       cwd=ROOT, env=env, check=True, capture_output=True, timeout=600)
    run_config = (f'data.dir="{data}" data.preset="tiny" partition.num-clients=10 '
                  f'server.num-rounds=2 server.out-dir="{out}"')
    cmd = [str(BIN / "flwr"), "run", ".", "local", "--stream", "--run-config", run_config,
           "--federation-config", "num-supernodes=10"]
    try:
        # Execute
        proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
        # Assert
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
        for _ in range(60):  # --stream returns when the run ends; results are written just before
            if (out / "results.json").is_file():
                break
            time.sleep(1)
        _check_results(out, rounds=2)
    finally:
        _stop_processes_using(home)


def _stop_processes_using(home: Path) -> None:
    """The local SuperLink outlives `flwr run`: stop every process whose command line names our FLWR_HOME."""
    mine = str(home)
    for pid_dir in Path("/proc").iterdir():
        if not pid_dir.name.isdigit():
            continue
        try:
            cmdline = (pid_dir / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if mine in cmdline:
            with contextlib.suppress(ProcessLookupError):
                os.kill(int(pid_dir.name), signal.SIGTERM)
