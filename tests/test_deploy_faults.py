"""Faults in deployment mode, on real Flower processes: the SuperLink killed (SIGKILL) mid-run and a SuperNode
killed mid-run; ``fedrank deploy run`` restarts what died and resubmits the run, which resumes after the last
checkpointed round: every round completes once, none is lost. Slow (real processes, a few minutes)."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from deploy.processes import descendants, pid_alive, stop_processes
from deploy.state import STATE_FILE
from tests.procs import process_env

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
ROUNDS = 3
pytestmark = pytest.mark.slow


def _fedrank(args: list[str], env: dict[str, str], timeout: float = 600) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(BIN / "fedrank"), *args], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=timeout)


def _records(state: Path) -> list[dict[str, Any]]:
    return list(json.loads((state / STATE_FILE).read_text())["processes"])


def _all_pids(state: Path) -> list[int]:
    pids = [int(p["pid"]) for p in _records(state)]
    return pids + [d for p in pids for d in descendants(p)]


def _done(out: Path) -> int:
    return max((int(p.stem[6:]) for p in (out / "checkpoints").glob("round-*.pt")), default=0)


@pytest.fixture
def deployment(tmp_path: Path) -> Iterator[dict[str, Any]]:
    """``fedrank deploy up``: smoke data, 2 SuperNodes, 3 rounds, free ports; stopped afterwards by PID."""
    env = process_env(tmp_path / "flwr-home")
    state, out = tmp_path / "state", tmp_path / "run"
    proc = _fedrank(["deploy", "up", "--state", str(state), "--name", "faults-test", "--scenario", "smoke",
                     "--nodes", "2", "--rounds", str(ROUNDS), "--port", "0", "--out", str(out),
                     "--set", "server.round-timeout=120.0", "--set", "strategy.fraction-evaluate=0.0"], env)
    try:
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
        yield {"env": env, "state": state, "out": out}
    finally:
        if (state / STATE_FILE).is_file():
            leftover = _all_pids(state)
            _fedrank(["deploy", "down", "--state", str(state), "--grace", "5"], env, timeout=180)
            stop_processes([(p, None) for p in leftover if pid_alive(p)], grace=2.0)


def _supervise_with_fault(d: dict[str, Any], role: str, after_round: int) -> tuple[dict[str, Any], int]:
    """``fedrank deploy run`` with ``role`` killed (SIGKILL) a few seconds after round ``after_round``."""
    sup = subprocess.Popen([str(BIN / "fedrank"), "deploy", "run", "--state", str(d["state"]), "--json",
                            "--status-every", "3", "--limit", "1200"], cwd=ROOT, env=d["env"],
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 900
        while _done(d["out"]) < after_round and sup.poll() is None and time.monotonic() < deadline:
            time.sleep(0.5)
        assert sup.poll() is None, "the run ended before the fault"
        time.sleep(3)  # mid-round
        victim = next(int(p["pid"]) for p in _records(d["state"]) if p["role"] == role)
        os.kill(victim, signal.SIGKILL)
        out, err = sup.communicate(timeout=1200)
    finally:
        if sup.poll() is None:
            sup.kill()
            sup.wait()
    assert sup.returncode == 0, out[-3000:] + err[-3000:]
    return json.loads(out[out.find("{"):]), victim


def test_superlink_killed_mid_run_is_restarted_and_the_run_resumes_with_no_round_lost(
        deployment: dict[str, Any]) -> None:
    # Prepare / Execute: the SuperLink dies (SIGKILL) during round 2
    d = deployment
    rep, victim = _supervise_with_fault(d, "superlink", after_round=1)

    # Assert: restarted on the same port and database, the run resubmitted and resumed after round 1
    assert not pid_alive(victim)
    assert rep["superlink_restarts"] == 1 and rep["resubmissions"] >= 1
    resumed = [e for e in rep["events"] if e["event"] == "submitted"][1]
    assert resumed["reason"] == "superlink restarted" and resumed["after_round"] >= 1
    assert rep["rounds_lost"] == [] and rep["rounds_repeated"] == [] and rep["rounds_completed"] == ROUNDS
    res = json.loads((d["out"] / "results.json").read_text())
    assert [r["round"] for r in res["rounds"]] == list(range(1, ROUNDS + 1))
    assert res["resumed_from_round"] == resumed["after_round"]
    assert sorted(p.name for p in (d["out"] / "checkpoints").iterdir()) == [
        f"round-{r:03d}.pt" for r in range(1, ROUNDS + 1)]
    assert math.isfinite(res["final"]["ndcg@10"])
    superlink = next(p for p in _records(d["state"]) if p["role"] == "superlink")
    assert superlink["restarts"] == 1 and pid_alive(int(superlink["pid"]), superlink["ticks"])

    # `deploy down` stops the restarted SuperLink and everything under it
    pids = _all_pids(d["state"])
    assert _fedrank(["deploy", "down", "--state", str(d["state"])], d["env"], timeout=180).returncode == 0
    assert not [p for p in pids if pid_alive(p)]


def test_supernode_killed_mid_run_rejoins_and_no_round_is_lost(deployment: dict[str, Any]) -> None:
    d = deployment
    rep, _ = _supervise_with_fault(d, "supernode-1", after_round=1)
    assert rep["supernode_restarts"] >= 1 and rep["superlink_restarts"] == 0
    assert rep["rounds_lost"] == [] and rep["rounds_completed"] == ROUNDS
    res = json.loads((d["out"] / "results.json").read_text())
    assert [r["round"] for r in res["rounds"]] == list(range(1, ROUNDS + 1))
    # a round went on without the dead node: its message got an error reply once the node's heartbeat expired
    assert any(r["accepted"] < r["sampled"] and r["failures"] + r["timeouts"] >= 1 for r in res["rounds"])
    assert rep["resubmissions"] == 0  # the run itself never died
