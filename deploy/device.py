"""A device's side of a deployment across hosts: ``fedrank deploy node-key`` and ``fedrank deploy node``.

``node-key`` makes the device's SuperNode authentication key pair (EC P-384, OpenSSH format); the private half
stays on the device (mode 0600), the public half goes to the operator, who registers it with
``fedrank deploy server --node-key``.

``node`` starts one ``flower-supernode`` that connects to a remote SuperLink over TLS, trusting only the CA
certificate it is given, signs in with the device's key, and trains on the device's own shard (``data-shard``,
``partition-id`` and ``num-partitions`` in its node config). Its local Runtime API (SuperNode <-> its SuperExec
and ClientApp processes) listens on 127.0.0.1 only, over TLS with a certificate of its own (a CA made on the
device, in ``STATE/certs``). It retries the SuperLink without limit by default: a device that loses its network
keeps running, and rejoins under the same node id when the network is back.

By default the SuperNode runs in the background, recorded in ``STATE/deployment.json`` (``kind = "node"``), and
``node`` returns once the SuperLink has accepted it (its log says ``SuperNode ID: ...``); ``fedrank deploy status``
and ``down`` work on that folder. ``--foreground`` replaces the command with the SuperNode itself (its log on the
terminal), for a service manager such as systemd.
"""

from __future__ import annotations

import os
import re
import subprocess
import time
import uuid
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import NoReturn

from deploy.certs import CertError, CertPaths, NodeKey, generate_certs
from deploy.errors import DeployError, DeployInputError
from deploy.flwr_cli import BIN, base_env
from deploy.keys import check_ca_cert, check_node_private_key
from deploy.launch import log_file, spawn
from deploy.ports import check_ports, join_address, split_address
from deploy.processes import recorded, running, start_ticks, stop_processes, tail
from deploy.state import Deployment, Layout, locked, previous_deployment, write_deployment

DEFAULT_NODE_STATE = "runs/deploy-node"
DEFAULT_LOCAL_PORT = 9094
ROLE = "supernode"
LOCAL_HOST = "127.0.0.1"
ACCEPTED = re.compile(r"SuperNode ID: (\d+)")
REFUSED = ("Failed to activate SuperNode", "All SuperNodes must be registered")


# --------------------------------------------------------------------------------------------------- node-key

def node_key(out: Path, overwrite: bool = False) -> tuple[NodeKey, bool]:
    """A new key pair at ``out`` and ``out.pub``; an existing complete pair is kept (``overwrite``: replaced).
    Returns the pair and whether it was made now."""
    from deploy.certs import generate_node_key

    pub = out.with_name(out.name + ".pub")
    if out.exists() and not out.is_file():
        raise DeployInputError(f"--out {out}: exists and is not a file")
    if out.is_file() != pub.is_file() and not overwrite:
        have, lack = (out, pub) if out.is_file() else (pub, out)
        raise DeployInputError(f"--out {out}: {have} exists without {lack}; remove it or give --overwrite")
    existed = out.is_file() and pub.is_file()
    if existed and not overwrite:
        try:
            check_node_private_key(out, "--out")
        except CertError as e:
            raise DeployInputError(str(e)) from e
    return generate_node_key(out, overwrite=overwrite), overwrite or not existed


# ------------------------------------------------------------------------------------------------------- node

@dataclass
class NodeOptions:
    superlink: str                     # the SuperLink's HOST:PORT as devices reach it
    ca: Path                           # the SuperLink's CA certificate (its ca.crt)
    key: Path                          # this device's private key (fedrank deploy node-key)
    data: Path                         # this device's shard (.npz)
    partition_id: int
    num_partitions: int | None = None
    state: Path = Path(DEFAULT_NODE_STATE)
    local_port: int = DEFAULT_LOCAL_PORT
    max_retries: int | None = None     # None: retry the SuperLink forever (rides out network outages)
    timeout: float = 120.0             # s to wait for the SuperLink to accept the node (0: do not wait)


def check_node_options(opts: NodeOptions) -> str:
    """Every input checked before anything is written; returns the OpenSSH line of the node's public key."""
    split_address(opts.superlink, "--superlink")
    try:
        check_ca_cert(opts.ca, "--ca")
        public = check_node_private_key(opts.key, "--key")
    except CertError as e:
        raise DeployInputError(str(e)) from e
    if opts.partition_id < 0:
        raise DeployInputError(f"--partition-id {opts.partition_id}: must be >= 0")
    if opts.num_partitions is not None and not 0 <= opts.partition_id < opts.num_partitions:
        raise DeployInputError(f"--partition-id {opts.partition_id}: must be below --num-partitions "
                               f"{opts.num_partitions}")
    if not 1 <= opts.local_port <= 65535:
        raise DeployInputError(f"--local-port {opts.local_port}: not a port number (1-65535)")
    if opts.max_retries is not None and opts.max_retries < 0:
        raise DeployInputError(f"--max-retries {opts.max_retries}: must be >= 0")
    if opts.timeout < 0:
        raise DeployInputError(f"--timeout {opts.timeout}: must be >= 0")
    _check_shard(opts.data)
    return public


def _check_shard(path: Path) -> None:
    """A device shard as the ClientApp loads it (``shared_model.shards.load_shard``)."""
    from shared_model.shards import load_shard

    if not path.is_file():
        raise DeployInputError(f"--data {path}: file not found (this device's shard, e.g. clients/.../<k>.npz)")
    try:
        load_shard(path)
    except (OSError, ValueError, KeyError, zipfile.BadZipFile) as e:
        raise DeployInputError(f"--data {path}: not a device shard ({str(e)[:200]})") from e


def _check_folder(layout: Layout) -> Deployment | None:
    prev = previous_deployment(layout, "node")
    if prev is None:
        return None
    alive = running(prev.processes)
    if alive:
        raise DeployInputError(f"{layout.root}: a SuperNode runs from this folder (pid {alive[0]['pid']}); stop it "
                               f"first with `fedrank deploy down --state {layout.root}`")
    return prev


def _command(opts: NodeOptions, local: CertPaths) -> list[str]:
    node_config = f'data-shard="{opts.data.resolve()}" partition-id={opts.partition_id}'
    if opts.num_partitions is not None:
        node_config += f" num-partitions={opts.num_partitions}"
    host, port = split_address(opts.superlink, "--superlink")
    return [
        str(BIN / "flower-supernode"),
        "--superlink", join_address(host, port),
        "--root-certificates", str(opts.ca.resolve()),
        "--auth-supernode-private-key", str(opts.key.resolve()),
        "--node-config", node_config,
        "--host", LOCAL_HOST, "--port", str(opts.local_port),
        "--ssl-ca-certfile", str(local.ca_cert), "--ssl-certfile", str(local.server_cert),
        "--ssl-keyfile", str(local.server_key),
        *(["--max-retries", str(opts.max_retries)] if opts.max_retries is not None else []),
    ]


def _prepare(opts: NodeOptions, layout: Layout, prev: Deployment | None) -> tuple[Deployment, list[str], Path]:
    """The deployment record, the SuperNode's command and its FLWR_HOME (TLS files for the local API made)."""
    dep = Deployment(id=prev.id if prev else uuid.uuid4().hex, name=f"{ROLE}-{opts.partition_id}",
                     address=opts.superlink, port=opts.local_port, flwr_home=str(layout.root / "home"),
                     certs_dir=str(layout.certs.dir), run_config_file="", out_dir="", kind="node",
                     created=prev.created if prev else time.time(),
                     nodes=[{"index": opts.partition_id, "partition_id": opts.partition_id,
                             "key": str(opts.key.resolve()), "ca": str(opts.ca.resolve()),
                             "shard": str(opts.data.resolve()), "node_id": None}])
    write_deployment(layout, dep)  # claims the folder
    generate_certs(layout.certs.dir, hosts=(LOCAL_HOST,))  # kept if already there
    home = Path(dep.flwr_home)
    home.mkdir(parents=True, exist_ok=True)
    return dep, _command(opts, layout.certs), home


def start_node(opts: NodeOptions) -> Deployment:
    """Start the SuperNode in the background; returns once the SuperLink accepted it (its node id recorded), or
    at once with ``timeout`` 0. Errors (exit 1): refused by the SuperLink, exited, or not accepted in time (then
    it is stopped)."""
    check_node_options(opts)
    layout = Layout(opts.state.resolve())
    _check_folder(layout)
    with locked(layout):
        prev = _check_folder(layout)
        check_ports({"SuperNode runtime API (--local-port)": opts.local_port}, LOCAL_HOST)
        dep, cmd, home = _prepare(opts, layout, prev)
        log = log_file(layout, ROLE)
        offset = log.stat().st_size if log.is_file() else 0
        proc = spawn(ROLE, cmd, base_env(home), dep, layout)
        if opts.timeout == 0:
            return dep
        try:
            dep.nodes[0]["node_id"] = _wait_accepted(proc, log, offset, opts)
        except BaseException:
            stop_processes(recorded(dep.processes), grace=5.0)
            raise
        write_deployment(layout, dep)
        return dep


def _wait_accepted(proc: subprocess.Popen[bytes], log: Path, offset: int, opts: NodeOptions) -> int:
    """The node id the SuperLink gave, read from the SuperNode's log."""
    deadline = time.monotonic() + opts.timeout
    while True:
        with open(log, "rb") as f:
            f.seek(offset)
            text = f.read().decode(errors="replace")
        if m := ACCEPTED.search(text):
            return int(m[1])
        if proc.poll() is not None:
            if any(r in text for r in REFUSED):
                raise DeployError(f"the SuperLink at {opts.superlink} refused this node: is the public key of "
                                  f"{opts.key} registered there (`fedrank deploy server --node-key ...`)?\n"
                                  f"{tail(log)}")
            raise DeployError(f"flower-supernode exited with code {proc.returncode}:\n{tail(log)}")
        if time.monotonic() > deadline:
            raise DeployError(f"the SuperLink at {opts.superlink} did not accept this node within "
                              f"{opts.timeout:.0f} s (is it running and reachable from here?); the node was "
                              f"stopped. Its log, {log}:\n{tail(log)}")
        time.sleep(0.5)


def exec_node(opts: NodeOptions) -> NoReturn:
    """``--foreground``: become the SuperNode (same PID, recorded in ``deployment.json``; log on the terminal)."""
    check_node_options(opts)
    layout = Layout(opts.state.resolve())
    _check_folder(layout)
    with locked(layout):
        prev = _check_folder(layout)
        check_ports({"SuperNode runtime API (--local-port)": opts.local_port}, LOCAL_HOST)
        dep, cmd, home = _prepare(opts, layout, prev)
        pid = os.getpid()
        dep.processes = [{"role": ROLE, "pid": pid, "ticks": start_ticks(pid), "log": "(terminal)", "cmd": cmd}]
        write_deployment(layout, dep)
    os.chdir(layout.root)
    os.execve(cmd[0], cmd, base_env(home))
