"""The SuperLink's side of a deployment across hosts: ``fedrank deploy server``.

Run on the server host, it does what ``up`` does for the SuperLink alone, bound to an address devices can reach:

- resolves the run config and prepares the data (the ServerApp evaluates centrally on it), and writes one
  self-contained shard per partition into ``STATE/device-shards/<k>.npz`` (for a demonstration fleet: copy
  ``<k>.npz`` to the device of partition ``k``; real devices hold their own logs);
- makes a private CA and a server certificate that names ``--host`` (and any ``--san``), unless ``--certs``;
- starts ``flower-superlink`` bound to ``--host:--port`` (not a wildcard: its SuperExec connects there too, and
  the certificate names it) with TLS, ``--enable-supernode-auth`` and ``--database``;
- registers every device's public key (``--node-key FILE``, ``--node-keys DIR`` of ``*.pub``; the operator
  collects them from ``fedrank deploy node-key`` on each device) with ``flwr supernode register``, in file-name
  order, so that the ``i``-th key is told partition ``i``;
- writes ``[superlink.NAME]`` into ``$FLWR_HOME/config.toml`` and ``STATE/run-config.toml``.

``fedrank deploy register --state STATE --node-key FILE.pub`` registers more devices with the running SuperLink
(a device added or replaced later; the operator tells it its partition). Then ``fedrank deploy run --state STATE``
waits for the registered SuperNodes, submits the run and supervises it;
``status`` and ``down`` work as for ``up``. The state folder is a :class:`deploy.state.Layout`; its deployment has
``kind = "server"`` and its nodes are marked ``remote`` (nothing on this host to start or restart for them).
"""

from __future__ import annotations

import os
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from deploy.certs import CertError, CertPaths, check_certs, generate_certs
from deploy.errors import DeployError, DeployInputError
from deploy.flwr_cli import register_node, write_connection
from deploy.keys import read_node_public_key
from deploy.launch import register_with_retry, start_superlink
from deploy.ports import DEFAULT_PORT, check_bind_address, join_address
from deploy.processes import recorded, running, stop_processes
from deploy.runconfig import export_device_shards, resolve_run_config, run_config_overrides, write_run_config
from deploy.state import (
    STATE_FILE,
    Deployment,
    Layout,
    check_kind,
    locked,
    previous_deployment,
    read_deployment,
    write_deployment,
)

DEFAULT_SERVER_STATE = "runs/deploy-server"
DEFAULT_NAME = "fedrank"


@dataclass
class ServerOptions:
    host: str                                              # the address (or name) the SuperLink binds
    state: Path = Path(DEFAULT_SERVER_STATE)
    port: int = DEFAULT_PORT
    name: str = DEFAULT_NAME
    node_keys: list[Path] = field(default_factory=list)    # public key files (``*.pub``)
    key_dirs: list[Path] = field(default_factory=list)     # folders of ``*.pub`` files
    san: list[str] = field(default_factory=list)           # more names for the server certificate
    scenario: str | None = None
    nodes: int | None = None                               # partition.num-clients (default: the number of keys)
    rounds: int | None = None
    out: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)
    flwr_home: Path | None = None
    certs: Path | None = None
    timeout: float = 180.0
    progress: bool = True


@dataclass(frozen=True)
class NodePublicKey:
    name: str      # the file's name without .pub: the node's name in `flwr supernode ls`
    path: Path
    line: str      # the OpenSSH public key line


def collect_node_keys(files: list[Path], folders: list[Path]) -> list[NodePublicKey]:
    """The public keys of ``--node-key`` files and ``--node-keys`` folders, sorted by name; every file checked
    (an EC key on a NIST curve), and a key or a name given twice refused, naming both files."""
    paths = list(files)
    for d in folders:
        if not d.is_dir():
            raise DeployInputError(f"--node-keys {d}: not a folder")
        found = sorted(d.glob("*.pub"))
        if not found:
            raise DeployInputError(f"--node-keys {d}: holds no *.pub file")
        paths += found
    keys: list[NodePublicKey] = []
    for p in paths:
        try:
            line = read_node_public_key(p, "--node-key")
        except CertError as e:
            raise DeployInputError(str(e)) from e
        name = p.name.removesuffix(".pub")
        for k in keys:
            if k.line == line:
                raise DeployInputError(f"--node-key {p}: the same key as {k.path} (one key per device)")
            if k.name == name:
                raise DeployInputError(f"--node-key {p}: the same node name {name!r} as {k.path} (rename one)")
        keys.append(NodePublicKey(name, p.resolve(), line))
    return sorted(keys, key=lambda k: k.name)


def _check_folder(layout: Layout, name: str) -> Deployment | None:
    """The previous (stopped) server deployment of this folder, if any; errors for anything else."""
    prev = previous_deployment(layout, "server")
    if prev is None:
        return None
    alive = running(prev.processes)
    if alive:
        raise DeployInputError(f"{layout.root}: the SuperLink of {prev.name!r} ({prev.address}) is running "
                               f"(pid {alive[0]['pid']}); stop it first with `fedrank deploy down --state "
                               f"{layout.root}`")
    if prev.name != name:
        raise DeployInputError(f"{layout.root}: holds the state of deployment {prev.name!r}, not {name!r}; use "
                               f"--name {prev.name} or another --state")
    return prev


def _flwr_home(opts: ServerOptions, layout: Layout) -> Path:
    if opts.flwr_home is not None:
        return opts.flwr_home.resolve()
    if os.environ.get("FLWR_HOME"):
        return Path(os.environ["FLWR_HOME"]).resolve()
    return (layout.root / "flwr-home").resolve()


def _tls(opts: ServerOptions, certs: CertPaths, names: list[str]) -> None:
    """Generate (unless ``--certs``) and check the TLS files: the server certificate must name every host."""
    try:
        if opts.certs is None:
            generate_certs(certs.dir, hosts=names)
        for h in names:
            check_certs(certs, h)
    except CertError as e:
        hint = "" if opts.certs is not None else (
            f"; these files were made for another --host: remove {certs.dir} to make new ones (every device "
            "then needs the new ca.crt)")
        raise DeployInputError(f"{e}{hint}") from e


def server(opts: ServerOptions) -> Deployment:
    """Start the SuperLink on ``opts.host:opts.port`` and register the devices' keys; what ``deployment.json``
    records. Every input is checked before anything is written or started."""
    layout = Layout(opts.state.resolve())
    if not 1 <= opts.port <= 65535:
        raise DeployInputError(f"--port {opts.port}: not a port number (1-65535; devices need a fixed one)")
    ip = check_bind_address(opts.host, opts.port)
    keys = collect_node_keys(opts.node_keys, opts.key_dirs)
    if not keys and opts.nodes is None:
        raise DeployInputError("no device keys: give --node-key FILE.pub (repeatable) or --node-keys DIR "
                               "(made on each device by `fedrank deploy node-key`)")
    names = list(dict.fromkeys([opts.host, ip, *opts.san]))
    _check_folder(layout, opts.name)
    with locked(layout):
        prev = _check_folder(layout, opts.name)
        flat = resolve_run_config(opts.scenario, opts.nodes if opts.nodes is not None else len(keys), opts.rounds,
                                  opts.out, opts.extra)
        n = int(flat["partition.num-clients"])
        if len(keys) > n:
            raise DeployInputError(f"{len(keys)} device keys but --nodes {n} (partition.num-clients): one "
                                   "partition per device")
        certs = CertPaths(opts.certs.resolve()) if opts.certs is not None else layout.certs
        flwr_home = _flwr_home(opts, layout)
        dep = Deployment(id=prev.id if prev else uuid.uuid4().hex, name=opts.name,
                         address=join_address(opts.host, opts.port), port=opts.port, flwr_home=str(flwr_home),
                         certs_dir=str(certs.dir), run_config_file=str(layout.run_config),
                         out_dir=str(flat["server.out-dir"]), nodes=list(prev.nodes) if prev else [],
                         created=prev.created if prev else time.time(), kind="server")
        write_deployment(layout, dep)  # claims the folder
        _tls(opts, certs, names)
        shards = export_device_shards(flat, layout.root / "device-shards", opts.progress)
        write_connection(flwr_home, opts.name, dep.address, certs.ca_cert)
        write_run_config(layout.run_config, run_config_overrides(flat))
        try:
            proc = start_superlink(dep, layout, certs, opts.timeout)
            _register(dep, layout, keys, shards, flwr_home, proc, opts.timeout)
        except BaseException:
            stop_processes(recorded(dep.processes), grace=5.0)
            raise
        return dep


def _register(dep: Deployment, layout: Layout, keys: list[NodePublicKey], shards: list[Path], flwr_home: Path,
              superlink: Any, timeout: float) -> None:
    """Register every key; ``dep.nodes`` records name, node id, key and the partition (and demo shard) it gets."""
    known = {str(n.get("key_line")): n for n in dep.nodes}  # registrations survive in the SuperLink's database
    deadline = time.monotonic() + timeout
    nodes = []
    for i, key in enumerate(keys):
        node_id = register_with_retry(flwr_home, dep.name, key.path, key.name, superlink, deadline)
        if node_id is None:
            if key.line not in known:
                raise DeployError(f"{key.path}: already registered with the SuperLink, but this state folder does "
                                  f"not know its node id (remove {layout.database} to start afresh)")
            node_id = int(known[key.line]["node_id"])
        nodes.append({"index": i, "name": key.name, "node_id": node_id, "public_key": str(key.path),
                      "key_line": key.line, "partition_id": i, "shard": str(shards[i]), "remote": True})
        dep.nodes = nodes + [n for n in dep.nodes if n.get("key_line") not in {x["key_line"] for x in nodes}]
        write_deployment(layout, dep)  # at once: a restart needs the id of every registered key
    dep.nodes = nodes
    write_deployment(layout, dep)


def node_command(dep: Deployment, node: dict[str, Any], n: int) -> str:
    """The ``fedrank deploy node`` line a device runs for ``node`` (paths as they are on this host)."""
    return (f"fedrank deploy node --superlink {dep.address} --ca ca.crt --key {node['name']} "
            f"--data {Path(str(node['shard'])).name} --partition-id {node['partition_id']} --num-partitions {n}")


def register_keys(state: Path, files: list[Path], folders: list[Path]) -> list[dict[str, Any]]:
    """Register more devices' keys with the running SuperLink of a ``deploy server`` folder; their records (keys
    registered already are skipped). The partition of a device added this way is the operator's to tell it."""
    layout = Layout(state.resolve())
    keys = collect_node_keys(files, folders)
    if not keys:
        raise DeployInputError("no device keys: give --node-key FILE.pub (repeatable) or --node-keys DIR")
    with locked(layout):
        dep = read_deployment(layout)
        if dep is None:
            raise DeployInputError(f"--state {layout.root}: no deployment here (no {STATE_FILE}); start one with "
                                   "`fedrank deploy server`")
        check_kind(dep, layout, "server")
        if not [p for p in running(dep.processes) if p["role"] == "superlink"]:
            raise DeployInputError(f"--state {layout.root}: its SuperLink is not running; start it again with "
                                   "`fedrank deploy server`")
        known = {str(n.get("key_line")) for n in dep.nodes}
        names = {str(n.get("name")): n for n in dep.nodes}
        added = []
        for key in keys:
            if key.line in known:
                continue
            if key.name in names:
                raise DeployInputError(f"--node-key {key.path}: node name {key.name!r} is taken by "
                                       f"{names[key.name]['public_key']} (rename the file)")
            node_id = register_node(Path(dep.flwr_home), dep.name, key.path, key.name)
            if node_id is None:
                raise DeployError(f"{key.path}: already registered with the SuperLink, but this state folder does "
                                  f"not know its node id (remove {layout.database} to start afresh)")
            added.append({"index": len(dep.nodes), "name": key.name, "node_id": node_id,
                          "public_key": str(key.path), "key_line": key.line, "partition_id": None, "shard": None,
                          "remote": True})
            dep.nodes.append(added[-1])
            write_deployment(layout, dep)
        return added
