"""Running the project's own commands as real processes in tests: one environment for all of them."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent


def process_env(flwr_home: Path, **extra: str) -> dict[str, str]:
    """This environment plus the venv on PATH, a private FLWR_HOME, offline and no runtime installs."""
    env = dict(os.environ)
    env.update({
        "PATH": f"{BIN}{os.pathsep}{env.get('PATH', '')}",
        "FLWR_HOME": str(flwr_home),
        "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
        "FLWR_DISABLE_UPDATE_CHECK": "1",
        "HF_HUB_OFFLINE": "1",
        "OMP_WAIT_POLICY": "PASSIVE",
        "FEDRANK_CACHE": str(ROOT / "data" / ".feature-cache"),
        **extra,
    })
    return env


def simulate(tmp_path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """``fedrank simulate ARGS --no-reference``; fails the test with the output's tail if it fails."""
    cmd = [str(BIN / "fedrank"), "simulate", *args, "--no-reference"]
    proc = subprocess.run(cmd, cwd=ROOT, env=process_env(tmp_path / "flwr-home"), capture_output=True, text=True,
                          timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc
