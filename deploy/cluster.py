"""A real Flower deployment on loopback: one SuperLink and N SuperNodes as separate processes, TLS everywhere
between them and the Flower CLI, SuperNode authentication, persistent SuperLink state.

``up`` prepares the run config's data and one shard per client, TLS material and one authentication key per
SuperNode, starts ``flower-superlink`` (``--enable-supernode-auth --database``), registers every SuperNode's
public key with ``flwr supernode register``, starts one ``flower-supernode`` per shard (``data-shard`` in its
node config), waits until ``flwr supernode ls`` shows them all online and writes a ``[superlink.NAME]`` entry into
``$FLWR_HOME/config.toml``, so that ``flwr run . NAME --stream --run-config STATE/run-config.toml`` runs the
federation. ``down`` stops, by PID, every process ``up`` started and their descendants (SIGTERM, SIGKILL after a
grace period); it is safe to call twice.

Everything lives in one state folder (``deployment.json`` records the PIDs; see :class:`deploy.state.Layout`).
This module orchestrates; the pieces live in :mod:`deploy.state`, :mod:`deploy.processes`, :mod:`deploy.ports`,
:mod:`deploy.runconfig`, :mod:`deploy.flwr_cli` and :mod:`deploy.launch`.
"""

from __future__ import annotations

import os
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from deploy.certs import CertError, CertPaths, NodeKey, check_certs, generate_certs, generate_node_key
from deploy.errors import DeployError, DeployInputError
from deploy.flwr_cli import write_connection
from deploy.launch import start
from deploy.ports import DEFAULT_PORT, HOST, check_port_numbers, pick_ports
from deploy.processes import pid_alive, recorded, running, stop_processes
from deploy.runconfig import prepare_shards, resolve_run_config, run_config_overrides, write_run_config
from deploy.state import STATE_FILE, Deployment, Layout, check_kind, locked, read_deployment, write_deployment

DEFAULT_NAME = "fedrank"


@dataclass
class UpOptions:
    state: Path = Path("runs/deploy")
    name: str = DEFAULT_NAME
    scenario: str | None = None
    nodes: int | None = None
    rounds: int | None = None
    out: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)
    port: int = DEFAULT_PORT          # 0: a free port
    node_port: int | None = None      # first SuperNode runtime port (default port + 1; 0: free ports)
    flwr_home: Path | None = None     # default $FLWR_HOME, else STATE/flwr-home
    certs: Path | None = None         # existing TLS files (default: STATE/certs, generated when missing)
    timeout: float = 180.0
    progress: bool = True


def _flwr_home(opts: UpOptions, layout: Layout) -> Path:
    if opts.flwr_home is not None:
        return opts.flwr_home.resolve()
    if os.environ.get("FLWR_HOME"):
        return Path(os.environ["FLWR_HOME"]).resolve()
    return (layout.root / "flwr-home").resolve()


def _check_not_foreign(layout: Layout) -> None:
    """Refuse a folder that holds something other than a deployment (before writing anything there)."""
    if layout.root.exists() and not layout.root.is_dir():
        raise DeployInputError(f"{layout.root}: exists and is not a folder")
    if (layout.root.is_dir() and not layout.state_file.is_file()
            and any(p.name != layout.lock.name for p in layout.root.iterdir())):
        raise DeployInputError(f"{layout.root}: not empty and holds no {STATE_FILE}: not a fedrank deployment "
                          "folder; choose another --state")


def _check_state_folder(layout: Layout, name: str) -> Deployment | None:
    """The previous (stopped) deployment of this folder, if any; errors for a foreign or running one."""
    prev = read_deployment(layout)
    if prev is None:
        _check_not_foreign(layout)
        return None
    check_kind(prev, layout, "local")
    alive = running(prev.processes)
    if alive:
        pids = ", ".join(f"{p['role']} {p['pid']}" for p in alive)
        raise DeployInputError(f"{layout.root}: deployment {prev.name!r} ({prev.address}) is running ({pids}); "
                          f"stop it first with `fedrank deploy down --state {layout.root}`")
    if prev.name != name:
        raise DeployInputError(f"{layout.root}: holds the state of deployment {prev.name!r}, not {name!r}; use "
                          f"--name {prev.name} or another --state")
    return prev


def _tls_and_keys(opts: UpOptions, layout: Layout, certs: CertPaths, n: int) -> list[NodeKey]:
    """Check (generating them first unless ``--certs`` was given) the TLS files; one key pair per SuperNode."""
    try:
        if opts.certs is None:
            generate_certs(certs.dir)
        check_certs(certs, HOST)
    except CertError as e:
        raise DeployInputError(str(e)) from e
    return [generate_node_key(layout.node_key(i)) for i in range(n)]


def up(opts: UpOptions) -> Deployment:
    """Start the deployment described by ``opts``; returns what ``deployment.json`` records."""
    layout = Layout(opts.state.resolve())
    check_port_numbers(opts.port, opts.node_port)  # before anything is written
    _check_not_foreign(layout)
    with locked(layout):
        prev = _check_state_folder(layout, opts.name)
        flat = resolve_run_config(opts.scenario, opts.nodes, opts.rounds, opts.out, opts.extra)
        n = int(flat["partition.num-clients"])
        port, node_ports = pick_ports(opts.port, opts.node_port, n)

        # claim the folder before writing anything else into it (node ids of a previous run are kept)
        certs = CertPaths(opts.certs.resolve()) if opts.certs is not None else layout.certs
        flwr_home = _flwr_home(opts, layout)
        dep = Deployment(id=prev.id if prev else uuid.uuid4().hex, name=opts.name, address=f"{HOST}:{port}",
                         port=port, flwr_home=str(flwr_home), certs_dir=str(certs.dir),
                         run_config_file=str(layout.run_config), out_dir=str(flat["server.out-dir"]),
                         nodes=list(prev.nodes) if prev else [], created=prev.created if prev else time.time())
        write_deployment(layout, dep)

        keys = _tls_and_keys(opts, layout, certs, n)
        shards = prepare_shards(flat, opts.progress)  # data: one shard per SuperNode
        if len(shards) != n:
            raise DeployError(f"{len(shards)} shards for {n} SuperNodes")

        # the Flower CLI's connection and the run config for `flwr run`
        write_connection(flwr_home, opts.name, dep.address, certs.ca_cert)
        write_run_config(layout.run_config, run_config_overrides(flat))

        try:
            start(dep, layout, certs, keys, shards, node_ports, flwr_home, opts.timeout)
        except BaseException:
            stop_processes(recorded(dep.processes), grace=5.0)
            raise
        write_deployment(layout, dep)
        return dep


def down(state: Path, grace: float = 10.0) -> dict[str, Any]:
    """Stop every process the deployment in ``state`` started (and their descendants). Safe to call twice."""
    layout = Layout(state.resolve())
    if not layout.root.is_dir():
        return {"state": str(layout.root), "terminated": [], "killed": [], "note": "no such deployment folder"}
    if not layout.state_file.is_file():
        return {"state": str(layout.root), "terminated": [], "killed": [], "note": f"no {STATE_FILE}"}
    with locked(layout):
        dep = read_deployment(layout)
        if dep is None:
            return {"state": str(layout.root), "terminated": [], "killed": [], "note": f"no {STATE_FILE}"}
        # SuperNodes first, while the SuperLink still runs: on SIGTERM each one deactivates itself there, so a
        # restarted deployment can activate it again at once; then the SuperLink
        stopped: dict[str, list[int]] = {"terminated": [], "killed": []}
        for phase in (False, True):
            procs = recorded(p for p in dep.processes if (p["role"] == "superlink") == phase)
            for k, v in stop_processes(procs, grace=grace).items():
                stopped[k] += v
        for p in dep.processes:
            p["stopped"] = time.time() if "stopped" not in p else p["stopped"]
        write_deployment(layout, dep)
        return {"state": str(layout.root), "name": dep.name, **stopped}


def status(state: Path) -> dict[str, Any]:
    """The recorded processes and whether each one still runs."""
    layout = Layout(state.resolve())
    dep = read_deployment(layout)
    if dep is None:
        raise DeployInputError(f"{layout.root}: no deployment here (no {STATE_FILE})")
    return {"name": dep.name, "address": dep.address, "flwr_home": dep.flwr_home, "run_config": dep.run_config_file,
            "processes": [{"role": p["role"], "pid": p["pid"], "running": pid_alive(int(p["pid"]), p.get("ticks")),
                           "log": p["log"]} for p in dep.processes]}


def flwr_run_command(dep: Deployment) -> str:
    return f"flwr run . {dep.name} --stream --run-config {dep.run_config_file}"
