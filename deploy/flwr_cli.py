"""The Flower CLI and its configuration: the environment Flower's processes run in, the ``[superlink.NAME]``
connection in ``$FLWR_HOME/config.toml``, and ``flwr supernode register`` / ``flwr supernode ls``."""

from __future__ import annotations

import datetime as dt
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

from deploy.errors import DeployError

BIN = Path(sys.executable).parent


def base_env(flwr_home: Path) -> dict[str, str]:
    env = dict(os.environ)
    env.update({
        "PATH": f"{BIN}{os.pathsep}{env.get('PATH', '')}",  # the SuperLink starts `flower-superexec` by name
        "FLWR_HOME": str(flwr_home),
        "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
        "FLWR_DISABLE_UPDATE_CHECK": "1",
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "TOKENIZERS_PARALLELISM": "false",
    })
    env.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    return env


def flwr_cli(args: list[str], flwr_home: Path, timeout: float = 60.0) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(BIN / "flwr"), *args], env=base_env(flwr_home), capture_output=True, text=True,
                          timeout=timeout, check=False)


def _json_out(proc: subprocess.CompletedProcess[str]) -> dict[str, Any]:
    """The JSON object ``flwr ... --format json`` prints (after any other line)."""
    text = proc.stdout
    start = text.find("{")
    try:
        data = json.loads(text[start:]) if start >= 0 else {}
    except json.JSONDecodeError:
        data = {}
    return data if isinstance(data, dict) else {}


def write_connection(flwr_home: Path, name: str, address: str, root_certificates: Path) -> Path:
    """Add or replace ``[superlink.NAME]`` in ``$FLWR_HOME/config.toml`` with Flower's own config writer."""
    from flwr.cli.flower_config import write_superlink_connection
    from flwr.cli.typing import SuperLinkConnection

    flwr_home.mkdir(parents=True, exist_ok=True)
    old = os.environ.get("FLWR_HOME")
    os.environ["FLWR_HOME"] = str(flwr_home)
    try:
        write_superlink_connection(SuperLinkConnection(name=name, address=address,
                                                       root_certificates=str(root_certificates)))
    finally:
        if old is None:
            del os.environ["FLWR_HOME"]
        else:
            os.environ["FLWR_HOME"] = old
    return flwr_home / "config.toml"


def register_node(flwr_home: Path, name: str, public_key: Path, node_name: str) -> int | None:
    """``flwr supernode register``: the new node id, or None when this key is already registered
    (a restarted deployment keeps its registrations in the SuperLink's database)."""
    proc = flwr_cli(["supernode", "register", str(public_key), name, "--name", node_name, "--format", "json"],
                    flwr_home)
    data = _json_out(proc)
    if proc.returncode == 0 and data.get("success"):
        return int(data["node-id"])
    text = proc.stdout + proc.stderr
    if "already in use" in text.lower():
        return None
    raise DeployError(f"`flwr supernode register {public_key} {name}` failed (exit {proc.returncode}):\n"
                      f"{text.strip()[-2000:]}")


def list_nodes(flwr_home: Path, name: str) -> list[dict[str, Any]]:
    """``flwr supernode ls NAME --format json``: the SuperLink's node list."""
    proc = flwr_cli(["supernode", "ls", name, "--format", "json"], flwr_home)
    data = _json_out(proc)
    if proc.returncode != 0 or not data.get("success"):
        raise DeployError(f"`flwr supernode ls {name}` failed (exit {proc.returncode}):\n"
                          f"{(proc.stdout + proc.stderr).strip()[-2000:]}")
    return list(data.get("nodes", []))


def online_nodes(flwr_home: Path, name: str, since: float | None = None) -> set[str]:
    """The ids of the nodes the SuperLink reports online (given ``since``: that came online at or after it)."""
    return {n["node-id"] for n in list_nodes(flwr_home, name)
            if n.get("status") == "online" and (since is None or _since(n.get("online-at"), since))}


def _since(stamp: str | None, t: float) -> bool:
    """``flwr supernode ls`` time stamps (``2026-11-27 07:12:57Z``, whole seconds) at or after ``t``."""
    if not stamp or stamp == "N/A":
        return False
    try:
        when = dt.datetime.strptime(stamp, "%Y-%m-%d %H:%M:%SZ").replace(tzinfo=dt.UTC).timestamp()
    except ValueError:
        return False
    return when >= int(t) - 1


def submit_run(flwr_home: Path, name: str, app_dir: Path, run_config_file: Path, timeout: float = 300.0) -> int:
    """``flwr run APP_DIR NAME --run-config FILE --format json`` (without ``--stream``): the new run's id."""
    proc = subprocess.run([str(BIN / "flwr"), "run", str(app_dir), name, "--run-config", str(run_config_file),
                           "--format", "json"], env=base_env(flwr_home), capture_output=True, text=True,
                          timeout=timeout, check=False, cwd=app_dir)
    data = _json_out(proc)
    if proc.returncode != 0 or not data.get("success") or "run-id" not in data:
        raise DeployError(f"`flwr run {app_dir} {name}` failed (exit {proc.returncode}):\n"
                          f"{(proc.stdout + proc.stderr).strip()[-2000:]}")
    return int(data["run-id"])


def run_status(flwr_home: Path, name: str, run_id: int) -> str:
    """The run's status as ``flwr ls --run-id`` reports it (``pending``, ``starting``, ``running``,
    ``finished:completed``, ``finished:failed``, ``finished:stopped``); ``unknown`` when the SuperLink does not
    answer."""
    proc = flwr_cli(["ls", name, "--run-id", str(run_id), "--format", "json"], flwr_home)
    runs = _json_out(proc).get("runs") or []
    if proc.returncode != 0 or not runs:
        return "unknown"
    return str(runs[0].get("status", "unknown"))


def stop_run(flwr_home: Path, name: str, run_id: int) -> bool:
    """``flwr stop RUN_ID NAME``: whether the SuperLink accepted the request."""
    return flwr_cli(["stop", str(run_id), name], flwr_home).returncode == 0
