"""A run killed with SIGKILL mid-run (the whole process group: the CLI, Ray's GCS, raylet and workers) resumes
from its last checkpoint and ends exactly like an uninterrupted run. Slow: real ``fedrank simulate`` processes."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

from shared_model.checkpoint import load_checkpoint
from tests.procs import process_env, simulate

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
ROUNDS = 6  # a round of the smoke scenario takes about a second once Ray is up: the kill lands mid-run
KILL_AFTER = 2
pytestmark = pytest.mark.slow


def _env(tmp_path: Path, tag: str = "") -> dict[str, str]:
    # the tag is inherited by every process of the run (Ray's too): finds orphans
    return process_env(tmp_path / "flwr-home", FEDRANK_TEST_TAG=tag)


_simulate = simulate


def _tagged(tag: str) -> list[int]:
    """Live processes whose environment carries ``tag``."""
    needle = f"FEDRANK_TEST_TAG={tag}".encode()
    pids = []
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        with contextlib.suppress(OSError):
            if needle in (d / "environ").read_bytes() and "Z" not in (d / "stat").read_text().rsplit(")", 1)[1][:3]:
                pids.append(int(d.name))
    return pids


def _central(res: dict) -> list[dict]:
    return [r["central"] for r in res["rounds"]]


# compressed updates (int8, stochastic rounding seeded per round and device; fp16 global head) and asynchronous
# buffered aggregation: the event state (clock, jobs in flight, their heads) is in the checkpoint
BUFFERED = ["--set", 'compression.uplink="int8"', "--set", 'compression.downlink="fp16"',
            "--set", 'strategy.name="fedbuff"', "--set", "strategy.concurrency=6", "--set", "strategy.buffer-size=3",
            "--set", "faults.slow-fraction=0.3"]


@pytest.mark.parametrize("extra", [[], BUFFERED], ids=["fedavg", "fedbuff-int8"])
def test_sigkill_mid_run_then_resume_matches_uninterrupted(tmp_path: Path, extra: list[str]) -> None:
    # Prepare: the uninterrupted reference
    ref_dir, out = tmp_path / "reference", tmp_path / "run"
    _simulate(tmp_path, "--scenario", "smoke", "--rounds", str(ROUNDS), "--out", str(ref_dir), *extra)
    reference = json.loads((ref_dir / "results.json").read_text())

    # Execute: the same run in its own process group, SIGKILLed once its round-2 checkpoint exists
    tag = uuid.uuid4().hex
    log_path = tmp_path / "killed.log"
    cmd = [str(BIN / "fedrank"), "simulate", "--scenario", "smoke", "--rounds", str(ROUNDS), "--out", str(out),
           "--no-reference", *extra]
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=_env(tmp_path, tag), stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)
    reads = 0
    try:
        deadline = time.monotonic() + 600
        while not (out / "checkpoints" / f"round-{KILL_AFTER:03d}.pt").is_file():
            assert proc.poll() is None, log_path.read_text()[-3000:]
            assert time.monotonic() < deadline, "no round-2 checkpoint after 10 minutes"
            if (out / "last.pt").is_file():  # read while the run rewrites it: never a half-written file
                load_checkpoint(out / "last.pt")
                reads += 1
            time.sleep(0.02)
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=60)
        left = _tagged(tag)
        for _ in range(100):  # the kernel reaps killed children asynchronously
            if not left:
                break
            time.sleep(0.1)
            left = _tagged(tag)
        assert not left, f"processes of the killed run still alive: {left}"
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        for pid in _tagged(tag):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
    assert proc.returncode == -signal.SIGKILL
    assert reads > 0
    assert not (out / "results.json").exists(), "the run had finished before the kill"
    _, killed = load_checkpoint(out / "last.pt")  # intact after the kill
    done = int(killed["round"])
    assert KILL_AFTER <= done < ROUNDS
    before_kill = json.loads(json.dumps(killed["metrics_history"], default=float))
    for p in (out / "checkpoints").glob("round-*.pt"):  # every checkpoint on disk is complete
        load_checkpoint(p)

    # Execute: resume the killed run to completion
    _simulate(tmp_path, "--resume", str(out))

    # Assert
    res = json.loads((out / "results.json").read_text())
    assert [r["round"] for r in res["rounds"]] == list(range(1, ROUNDS + 1))  # each round exactly once
    assert res["resumed_from_round"] == done
    assert res["rounds"][:done] == before_kill  # rounds finished before the kill are kept unchanged
    for got, want in zip(_central(res), _central(reference), strict=True):
        for key in ("ndcg@10", "mrr", "recall@10"):
            assert got[key] == pytest.approx(want[key], abs=1e-6)
    for key in ("ndcg@10", "mrr", "recall@10"):
        assert res["final"][key] == pytest.approx(reference["final"][key], abs=1e-6)
    _, last = load_checkpoint(out / "last.pt")
    assert last["round"] == ROUNDS and len(last["metrics_history"]) == ROUNDS
