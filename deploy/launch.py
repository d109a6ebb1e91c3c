"""Starting the Flower processes of a deployment, in order: the SuperLink, the registration of every SuperNode's
public key, then one SuperNode per shard, until the SuperLink reports them all online. Each process is recorded in
``deployment.json`` as soon as it starts, so that ``down`` can stop it even if ``up`` fails later."""

from __future__ import annotations

import logging
import subprocess
import time
from pathlib import Path
from typing import Any

from deploy.certs import CertPaths, NodeKey
from deploy.errors import DeployError
from deploy.flwr_cli import BIN, base_env, online_nodes, register_node
from deploy.ports import HOST, split_address, wait_for_port
from deploy.processes import start_ticks, tail
from deploy.state import Deployment, Layout, write_deployment

log = logging.getLogger(__name__)

STALE_WAIT = 90  # s; Flower marks a silent node offline 2 heartbeats (2 x 30 s) after its last one


def start(dep: Deployment, layout: Layout, certs: CertPaths, keys: list[NodeKey], shards: list[Path],
          node_ports: list[int], flwr_home: Path, timeout: float) -> None:
    """Start and register everything ``dep`` describes; returns once every SuperNode is online."""
    superlink = start_superlink(dep, layout, certs, timeout)
    _register_nodes(dep, layout, keys, shards, node_ports, flwr_home, superlink, timeout)
    _wait_for_stale_nodes(flwr_home, dep.name, {str(n["node_id"]) for n in dep.nodes})
    started_at, deadline = time.time(), time.monotonic() + timeout
    supernodes = [spawn(f"supernode-{node['index']}", _supernode_cmd(dep, certs, node),
                         base_env(_node_home(layout, node["index"])), dep, layout) for node in dep.nodes]
    _wait_until_online(dep, layout, flwr_home, superlink, supernodes, started_at, deadline, timeout)


def log_file(layout: Layout, role: str) -> Path:
    return layout.logs / f"{role}.log"


def spawn(role: str, cmd: list[str], env: dict[str, str], dep: Deployment,
          layout: Layout) -> subprocess.Popen[bytes]:
    path = log_file(layout, role)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "ab") as f:
        f.write(f"\n==== {time.strftime('%Y-%m-%d %H:%M:%S')} {' '.join(cmd)}\n".encode())
        f.flush()
        proc = subprocess.Popen(cmd, env=env, stdin=subprocess.DEVNULL, stdout=f, stderr=subprocess.STDOUT,
                                start_new_session=True, cwd=layout.root)
    dep.processes.append({"role": role, "pid": proc.pid, "ticks": start_ticks(proc.pid), "log": str(path),
                          "cmd": cmd})
    write_deployment(layout, dep)  # recorded at once: `down` can stop it even if `up` fails later
    return proc


def start_superlink(dep: Deployment, layout: Layout, certs: CertPaths,
                    timeout: float) -> subprocess.Popen[bytes]:
    """``flower-superlink`` on the deployment's address (loopback for ``up``, the host's for ``server``)."""
    host = split_address(dep.address)[0]
    layout.database.parent.mkdir(parents=True, exist_ok=True)
    layout.superlink_home.mkdir(parents=True, exist_ok=True)
    proc = spawn("superlink", [
        str(BIN / "flower-superlink"),
        "--ssl-ca-certfile", str(certs.ca_cert), "--ssl-certfile", str(certs.server_cert),
        "--ssl-keyfile", str(certs.server_key),
        "--database", str(layout.database),
        "--enable-supernode-auth",
        "--disable-runtime-dependency-installation",
        "--host", host, "--port", str(dep.port),
    ], base_env(layout.superlink_home), dep, layout)
    wait_for_port(dep.port, proc, log_file(layout, "superlink"), timeout, host)
    return proc


def _register_nodes(dep: Deployment, layout: Layout, keys: list[NodeKey], shards: list[Path],
                    node_ports: list[int], flwr_home: Path, superlink: subprocess.Popen[bytes],
                    timeout: float) -> None:
    """Register every SuperNode's public key and record its node id, shard, port and key in ``dep.nodes``."""
    known = {int(n["index"]): n for n in dep.nodes}  # from an earlier `up` of this folder (same keys)
    deadline = time.monotonic() + timeout
    for i, key in enumerate(keys):
        node_id = register_with_retry(flwr_home, dep.name, key.public, f"supernode-{i}", superlink, deadline)
        if node_id is None:
            if i not in known:
                raise DeployError(f"{key.public}: already registered with the SuperLink, but this state folder "
                                  f"does not know its node id (remove {layout.database} to start afresh)")
            node_id = int(known[i]["node_id"])
        entry = {"index": i, "node_id": node_id, "shard": str(shards[i]), "port": node_ports[i],
                 "key": str(key.private), "public_key": str(key.public)}
        dep.nodes = [x for x in dep.nodes if int(x["index"]) != i] + [entry]
        write_deployment(layout, dep)  # at once: a restart needs the id of every registered key
    dep.nodes = sorted((x for x in dep.nodes if int(x["index"]) < len(keys)), key=lambda x: int(x["index"]))
    write_deployment(layout, dep)


def register_with_retry(flwr_home: Path, name: str, public_key: Path, node_name: str,
                        superlink: subprocess.Popen[bytes], deadline: float) -> int | None:
    """:func:`register_node`, retried while the SuperLink finishes starting."""
    while True:
        try:
            return register_node(flwr_home, name, public_key, node_name)
        except DeployError:
            if time.monotonic() > deadline or superlink.poll() is not None:
                raise
            time.sleep(1.0)


def _wait_for_stale_nodes(flwr_home: Path, name: str, want: set[str]) -> None:
    """A node left online in the database by a SuperNode that died without deactivating (SIGKILL, crash) cannot
    be activated again until its heartbeat expires: wait for that rather than start a SuperNode that would exit."""
    stale = online_nodes(flwr_home, name) & want
    if stale:
        log.warning("SuperNodes %s are still marked online from before; waiting for their heartbeat to expire "
                    "(up to %d s)", sorted(stale), STALE_WAIT)
        limit = time.monotonic() + STALE_WAIT
        while stale and time.monotonic() < limit:
            time.sleep(2.0)
            stale &= online_nodes(flwr_home, name)


def _node_home(layout: Layout, i: int) -> Path:
    home = layout.node_home(i)
    home.mkdir(parents=True, exist_ok=True)
    return home


def _supernode_cmd(dep: Deployment, certs: CertPaths, node: dict[str, Any]) -> list[str]:
    """``flower-supernode`` bound to its shard (``data-shard`` in its node config)."""
    i = node["index"]
    node_config = f'data-shard="{node["shard"]}" partition-id={i} num-partitions={len(dep.nodes)}'
    return [
        str(BIN / "flower-supernode"),
        "--superlink", dep.address,
        "--root-certificates", str(certs.ca_cert),
        "--auth-supernode-private-key", str(node["key"]),
        "--node-config", node_config,
        # its own Runtime API (SuperNode <-> its SuperExec and ClientApp processes) over TLS too
        "--host", HOST, "--port", str(node["port"]),
        "--ssl-ca-certfile", str(certs.ca_cert), "--ssl-certfile", str(certs.server_cert),
        "--ssl-keyfile", str(certs.server_key),
        "--max-retries", "20",
    ]


def _wait_until_online(dep: Deployment, layout: Layout, flwr_home: Path, superlink: subprocess.Popen[bytes],
                       supernodes: list[subprocess.Popen[bytes]], started_at: float, deadline: float,
                       timeout: float) -> None:
    """Until the SuperLink reports every SuperNode online, activated by these processes (after ``started_at``)."""
    want = {str(n["node_id"]) for n in dep.nodes}
    while True:
        for p, node in zip(supernodes, dep.nodes, strict=True):
            if p.poll() is not None:
                lf = log_file(layout, f"supernode-{node['index']}")
                raise DeployError(f"flower-supernode {node['index']} exited with code {p.returncode}:\n{tail(lf)}")
        if superlink.poll() is not None:
            raise DeployError(f"flower-superlink exited with code {superlink.returncode}:\n"
                              f"{tail(log_file(layout, 'superlink'))}")
        online = online_nodes(flwr_home, dep.name, since=started_at)
        if want <= online:
            return
        if time.monotonic() > deadline:
            raise DeployError(f"SuperNodes {sorted(want - online)} not online after {timeout:.0f} s; logs in "
                              f"{layout.logs}")
        time.sleep(1.0)


def role_env(layout: Layout, role: str) -> dict[str, str]:
    """The environment a recorded process of ``role`` (``superlink``, ``supernode-<i>``) runs in."""
    if role == "superlink":
        return base_env(layout.superlink_home)
    return base_env(_node_home(layout, int(role.rpartition("-")[2])))


def respawn(dep: Deployment, layout: Layout, role: str) -> subprocess.Popen[bytes]:
    """Start the recorded process of ``role`` again with its recorded command (same ports, database, keys and
    node config); its record in ``deployment.json`` is replaced, with the number of restarts so far."""
    old = next((p for p in dep.processes if p["role"] == role), None)
    if old is None:
        raise DeployError(f"no {role} in {layout.state_file}")
    dep.processes = [p for p in dep.processes if p is not old]
    proc = spawn(role, list(old["cmd"]), role_env(layout, role), dep, layout)
    dep.processes[-1]["restarts"] = int(old.get("restarts", 0)) + 1
    write_deployment(layout, dep)
    return proc


def restart_superlink(dep: Deployment, layout: Layout, timeout: float) -> subprocess.Popen[bytes]:
    """:func:`respawn` the SuperLink on its port and database, and wait until it listens."""
    proc = respawn(dep, layout, "superlink")
    wait_for_port(dep.port, proc, log_file(layout, "superlink"), timeout, split_address(dep.address)[0])
    return proc
