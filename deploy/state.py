"""The deployment's state folder (:class:`Layout`), what ``deployment.json`` records (:class:`Deployment`), and
the lock that lets one ``up``/``down`` at a time work on a folder."""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from deploy.certs import CertPaths
from deploy.errors import DeployError, DeployInputError

STATE_FILE = "deployment.json"
KINDS = {"local": "deploy up", "server": "deploy server", "node": "deploy node"}
MARKER = "fedrank-deploy"
FORMAT = 1


@dataclass(frozen=True)
class Layout:
    """The state folder: ``deployment.json`` (PIDs, ports, node ids), ``certs/``, ``keys/``, ``superlink/``
    (its ``state.db`` and FLWR_HOME), ``nodes/<i>/`` (each SuperNode's FLWR_HOME), ``logs/``,
    ``run-config.toml`` (for ``flwr run --run-config``) and, unless FLWR_HOME is set, ``flwr-home/``."""

    root: Path

    @property
    def state_file(self) -> Path:
        return self.root / STATE_FILE

    @property
    def certs(self) -> CertPaths:
        return CertPaths(self.root / "certs")

    @property
    def keys(self) -> Path:
        return self.root / "keys"

    @property
    def database(self) -> Path:
        return self.root / "superlink" / "state.db"

    @property
    def superlink_home(self) -> Path:
        return self.root / "superlink" / "home"

    def node_home(self, i: int) -> Path:
        return self.root / "nodes" / str(i)

    def node_key(self, i: int) -> Path:
        return self.keys / f"supernode-{i}"

    @property
    def logs(self) -> Path:
        return self.root / "logs"

    @property
    def run_config(self) -> Path:
        return self.root / "run-config.toml"

    @property
    def lock(self) -> Path:
        return self.root / ".lock"


@dataclass
class Deployment:
    """What ``deployment.json`` holds."""

    id: str
    name: str
    address: str
    port: int
    flwr_home: str
    certs_dir: str
    run_config_file: str
    out_dir: str
    processes: list[dict[str, Any]] = field(default_factory=list)
    nodes: list[dict[str, Any]] = field(default_factory=list)
    created: float = field(default_factory=time.time)
    kind: str = "local"  # "local": `deploy up`; "server": `deploy server`; "node": `deploy node`

    def to_json(self) -> dict[str, Any]:
        return {"marker": MARKER, "format": FORMAT, **self.__dict__}

    @classmethod
    def from_json(cls, data: Mapping[str, Any], path: Path) -> Deployment:
        if data.get("marker") != MARKER:
            raise DeployInputError(f"{path}: not a fedrank deployment state file")
        try:
            return cls(**{k: data[k] for k in cls.__dataclass_fields__ if k in data})
        except TypeError as e:
            raise DeployInputError(f"{path}: unreadable deployment state ({e})") from e


def read_deployment(layout: Layout) -> Deployment | None:
    path = layout.state_file
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise DeployInputError(f"{path}: unreadable deployment state ({e})") from e
    return Deployment.from_json(data, path)


def check_kind(dep: Deployment, layout: Layout, kind: str) -> None:
    """A folder made by one ``deploy`` command (``up``, ``server``, ``node``) is not another one's."""
    if dep.kind != kind:
        raise DeployInputError(f"{layout.root}: holds a `fedrank {KINDS.get(dep.kind, dep.kind)}` deployment, not "
                               f"a `fedrank {KINDS[kind]}` one; choose another --state")


def previous_deployment(layout: Layout, kind: str) -> Deployment | None:
    """The deployment recorded in ``--state`` (None for a new or empty folder), refusing a path that is not a
    folder, a non-empty folder that is no deployment, and another command's deployment."""
    if layout.root.exists() and not layout.root.is_dir():
        raise DeployInputError(f"--state {layout.root}: exists and is not a folder")
    prev = read_deployment(layout)
    if prev is None:
        if layout.root.is_dir() and any(p.name != layout.lock.name for p in layout.root.iterdir()):
            raise DeployInputError(f"--state {layout.root}: not empty and holds no {STATE_FILE}: not a fedrank "
                                   "deployment folder; choose another --state")
        return None
    check_kind(prev, layout, kind)
    return prev


def write_deployment(layout: Layout, dep: Deployment) -> None:
    tmp = layout.state_file.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(dep.to_json(), indent=2))
    os.replace(tmp, layout.state_file)


@contextlib.contextmanager
def locked(layout: Layout) -> Iterator[None]:
    """One ``up``/``down`` at a time per state folder."""
    layout.root.mkdir(parents=True, exist_ok=True)
    with open(layout.lock, "w") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError as e:
            raise DeployError(f"{layout.root}: another `fedrank deploy` command is working on this folder") from e
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)
