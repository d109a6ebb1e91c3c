"""Running the project's own commands as real processes in tests: one environment for all of them."""

from __future__ import annotations

import hashlib
import os
import re
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


def start(tmp_path: Path, *args: str, log_name: str = "proc", **env: str) -> tuple[subprocess.Popen[bytes], Path]:
    """``fedrank ARGS`` started in its own session (``os.killpg(proc.pid, ...)`` reaches all its processes);
    stdout and stderr go to ``tmp_path/<log_name>.out`` / ``.err``. Returns the process and the stderr file."""
    out, err = tmp_path / f"{log_name}.out", tmp_path / f"{log_name}.err"
    with open(out, "wb") as fo, open(err, "wb") as fe:
        proc = subprocess.Popen([str(BIN / "fedrank"), *args], cwd=ROOT, env=process_env(tmp_path / "flwr-home", **env),
                                stdout=fo, stderr=fe, start_new_session=True)
    return proc, err


def fedrank(tmp_path: Path, *args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    """``fedrank ARGS`` to completion, whatever its exit code."""
    return subprocess.run([str(BIN / "fedrank"), *args], cwd=ROOT, env=process_env(tmp_path / "flwr-home"),
                          capture_output=True, text=True, timeout=timeout)


def snapshot(folder: Path) -> dict[str, str]:
    """Every file under ``folder`` (relative path -> sha256): equal snapshots mean byte-identical folders."""
    return {p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def fedrank_lines(stderr: str) -> list[str]:
    """The lines fedrank itself printed on stderr (progress bars and library logs left out; a line may follow a
    progress bar that an interruption left unfinished)."""
    found = (re.search(r"(?:^|\])(fedrank [a-z]+: .*)$", ln) for ln in stderr.replace("\r", "\n").splitlines())
    return [m[1] for m in found if m]
