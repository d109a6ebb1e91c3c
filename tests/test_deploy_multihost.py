"""``fedrank deploy server`` / ``node-key`` / ``node``: a federation across hosts.

Fast: the commands' bad input (exit 2, one line naming the flag or file) and the node key pair.

Slow, on real Flower processes in Linux network namespaces (tests/netns.py; skipped where namespaces cannot be
made, e.g. without root): a server host and three device hosts on a private bridge (10.213.0.0/24, nothing in the
root namespace). The SuperLink runs on the server host, bound to 10.213.0.1; each device makes its own key pair
(its public half collected by the operator), gets the CA certificate and its shard, and runs ``deploy node``. The
tests check that the SuperLink is reachable from the devices only (not from the root namespace, not on
0.0.0.0), that an unregistered device is refused, and run a 4-round federation during which one device loses
its network (its interface down for longer than Flower's heartbeat expiry) and rejoins under the same node id
and process, with every round completed.
"""

from __future__ import annotations

import json
import math
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from deploy.certs import generate_certs, generate_node_key
from deploy.ports import free_ports
from deploy.processes import pid_alive
from deploy.state import STATE_FILE, Deployment, Layout, write_deployment
from tests import netns
from tests.procs import process_env

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
DEVICES = 3
ROUNDS = 6
PORT = 9093
OUTAGE_AFTER_OFFLINE = 5.0  # s the device stays cut off after the SuperLink reported it offline

NO_NETNS = netns.unavailable()
needs_netns = pytest.mark.skipif(NO_NETNS is not None, reason=f"network namespaces unavailable: {NO_NETNS}")


def _fedrank(args: list[str], env: dict[str, str], host: netns.Host | None = None,
             timeout: float = 600) -> subprocess.CompletedProcess[str]:
    cmd = [str(BIN / "fedrank"), *args]
    return subprocess.run(host.command(cmd) if host else cmd, cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=timeout)


# ------------------------------------------------------------------------------------------------ fast: input

def test_node_key_makes_a_pair_flower_reads_and_keeps_it(tmp_path: Path,
                                                         capsys: pytest.CaptureFixture[str]) -> None:
    from flwr.cli.supernode.register import try_load_public_key

    from fedrank.cli import main

    out = tmp_path / "device" / "node.key"
    assert main(["deploy", "node-key", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "new key pair" in printed and str(out.with_name("node.key.pub")) in printed
    assert out.stat().st_mode & 0o777 == 0o600
    pub = out.with_name("node.key.pub").read_bytes()
    assert try_load_public_key(out.with_name("node.key.pub"))  # what `flwr supernode register` reads
    assert main(["deploy", "node-key", "--out", str(out)]) == 0  # kept: it may be registered already
    assert "existing key pair" in capsys.readouterr().out and out.with_name("node.key.pub").read_bytes() == pub
    assert main(["deploy", "node-key", "--out", str(out), "--overwrite"]) == 0
    assert out.with_name("node.key.pub").read_bytes() != pub


def _bad_remote_input(tmp_path: Path, busy_port: int) -> dict[str, tuple[list[str], str]]:
    """``fedrank deploy server/node/node-key`` arguments the command cannot use, and what its error names."""
    certs = generate_certs(tmp_path / "certs", hosts=["127.0.0.1"])
    key = generate_node_key(tmp_path / "keys" / "device-0")
    twin = tmp_path / "twin"
    twin.mkdir()
    shutil.copy(key.public, twin / "device-9.pub")
    empty = tmp_path / "empty"
    empty.mkdir()
    not_shard = tmp_path / "notes.npz"
    not_shard.write_text("not a shard")
    lonely = tmp_path / "lonely.key"
    lonely.write_text("x")
    other = Layout(tmp_path / "node-state")
    other.root.mkdir()
    write_deployment(other, Deployment(id="t", name="fedrank", address="10.213.0.1:9093", port=9093, flwr_home="",
                                       certs_dir="", run_config_file="", out_dir="", kind="node"))
    second = generate_node_key(tmp_path / "keys" / "device-1")
    server = ["server", "--state", str(tmp_path / "s"), "--flwr-home", str(tmp_path / "home"), "--port",
              str(free_ports(1)[0])]
    keyed = [*server, "--node-key", str(key.public)]
    node = ["node", "--state", str(tmp_path / "n"), "--superlink", "127.0.0.1:9093", "--partition-id", "0"]
    good = {"--ca": str(certs.ca_cert), "--key": str(key.private), "--data": str(not_shard)}

    def with_(**over: str) -> list[str]:
        opts = {**good, **{f"--{k.replace('_', '-')}": v for k, v in over.items()}}
        return [*node, *[x for kv in opts.items() for x in kv]]

    return {
        # 203.0.113.7 (TEST-NET-3) is no address of this machine: bind() fails at once, no packet is sent
        "host not on this machine": ([*keyed, "--host", "203.0.113.7"], "203.0.113.7 is not an address of this host"),
        "wildcard host": ([*keyed, "--host", "0.0.0.0"], "--host 0.0.0.0: a wildcard address"),
        "port 0": ([*keyed, "--host", "127.0.0.1", "--port", "0"], "--port 0: not a port number"),
        "port in use": ([*keyed, "--host", "127.0.0.1", "--port", str(busy_port)], f"--port {busy_port}: already"),
        "no keys": ([*server, "--host", "127.0.0.1"], "no device keys"),
        "missing key file": ([*server, "--host", "127.0.0.1", "--node-key", str(tmp_path / "nope.pub")],
                             "nope.pub: file not found"),
        "private half as --node-key": ([*server, "--host", "127.0.0.1", "--node-key", str(key.private)],
                                       "that is the private half"),
        "same key twice": ([*keyed, "--host", "127.0.0.1", "--node-keys", str(twin)], "the same key as"),
        "folder without keys": ([*server, "--host", "127.0.0.1", "--node-keys", str(empty)], "holds no *.pub"),
        "more keys than partitions": ([*keyed, "--host", "127.0.0.1", "--node-key", str(second.public),
                                       "--nodes", "1", "--scenario", "smoke"], "2 device keys but --nodes 1"),
        "bad --superlink": (["node", "--superlink", "superlink-without-port", "--ca", str(certs.ca_cert), "--key",
                             str(key.private), "--data", str(not_shard), "--partition-id", "0"], "--superlink"),
        "missing --ca": (with_(ca=str(tmp_path / "ca.crt")), "--ca " + str(tmp_path / "ca.crt")),
        "server cert as --ca": (with_(ca=str(certs.server_cert)), "not a CA certificate"),
        "public half as --key": (with_(key=str(key.public)), "that is the public half"),
        "missing --data": (with_(data=str(tmp_path / "none.npz")), "--data " + str(tmp_path / "none.npz")),
        "not a shard": (with_(), "not a device shard"),
        "partition out of range": ([*with_(), "--num-partitions", "1", "--partition-id", "1"],
                                   "--partition-id 1: must be below --num-partitions 1"),
        "a device's folder for the server": ([*keyed, "--host", "127.0.0.1", "--state", str(other.root)],
                                             "holds a `fedrank deploy node` deployment"),
        "half a key pair": (["node-key", "--out", str(lonely)], "exists without"),
        "register with no deployment": (["register", "--state", str(tmp_path / "nowhere"), "--node-key",
                                         str(key.public)], "no deployment here"),
        "register on a device's folder": (["register", "--state", str(other.root), "--node-key", str(key.public)],
                                          "holds a `fedrank deploy node` deployment"),
    }


def test_remote_bad_input_exits_2_with_one_line_naming_it(tmp_path: Path,
                                                          capsys: pytest.CaptureFixture[str]) -> None:
    from fedrank.cli import main

    with socket.create_server(("127.0.0.1", 0)) as busy:
        cases = _bad_remote_input(tmp_path, busy.getsockname()[1])
        for label, (args, names) in cases.items():
            code = main(["deploy", *args])
            err = capsys.readouterr().err
            assert code == 2, (label, err)
            lines = err.strip().splitlines()
            assert len(lines) == 1 and lines[0].startswith(f"fedrank deploy {args[0]}: error: "), (label, err)
            assert names in lines[0], (label, err)
    assert not (tmp_path / "s" / STATE_FILE).exists()  # nothing was started or claimed
    assert not (tmp_path / "n").exists()


# -------------------------------------------------------------------------------- slow: hosts in namespaces

def _listening(host: netns.Host | None, port: int) -> list[str]:
    """The local addresses listening on TCP ``port`` in ``host``'s namespace (None: the root namespace), read
    from /proc/net/tcp{,6} of that namespace."""
    cmd = ["cat", "/proc/net/tcp", "/proc/net/tcp6"]
    text = subprocess.run(host.command(cmd) if host else cmd, capture_output=True, text=True, check=False).stdout
    out = []
    for line in text.splitlines()[1:]:
        f = line.split()
        if len(f) > 3 and f[3] == "0A" and ":" in f[1]:  # 0A: LISTEN
            addr, port_hex = f[1].rsplit(":", 1)
            if int(port_hex, 16) == port:
                out.append(_hex_ip(addr))
    return out


def _hex_ip(h: str) -> str:
    if len(h) == 8:  # IPv4, little-endian
        return ".".join(str(int(h[i:i + 2], 16)) for i in (6, 4, 2, 0))
    return "ipv6:" + h


def _supernodes(fleet: dict[str, Any]) -> list[dict[str, Any]]:
    proc = subprocess.run(fleet["server"].command([str(BIN / "flwr"), "supernode", "ls", "fedrank", "--format",
                                                   "json"]), cwd=ROOT, env=fleet["env"], capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return list(json.loads(proc.stdout[proc.stdout.find("{"):])["nodes"])


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    """A server host and DEVICES device hosts; ``deploy server`` on the server, ``node-key`` then ``deploy node``
    on every device. Stopped afterwards: ``deploy down`` on every host's state, then every process left in the
    namespaces, then the namespaces themselves."""
    if NO_NETNS is not None:
        pytest.skip(f"network namespaces unavailable: {NO_NETNS}")
    tmp = tmp_path_factory.mktemp("multihost")
    env = process_env(tmp / "flwr-home")
    f = netns.Fleet(subnet="10.213.0").start()
    states: list[Path] = []
    info: dict[str, Any] = {"env": env, "fleet": f, "tmp": tmp, "devices": []}
    try:
        server = f.add_host("server")
        devices = [f.add_host(f"dev{k}") for k in range(DEVICES)]
        for d in devices:
            f.wait_reachable(d, server)
        info["server"] = server

        # each device makes its key pair; the operator collects the public halves
        inbox = tmp / "server" / "inbox"
        inbox.mkdir(parents=True)
        for k, d in enumerate(devices):
            key = tmp / d.name / f"device-{k}"
            proc = _fedrank(["deploy", "node-key", "--out", str(key)], env, d)
            assert proc.returncode == 0, proc.stderr
            shutil.copy(key.with_name(key.name + ".pub"), inbox)

        # the server host: SuperLink bound to its address, the devices' keys registered
        state = tmp / "server" / "state"
        t0 = time.perf_counter()
        proc = _fedrank(["deploy", "server", "--state", str(state), "--host", server.addr, "--port", str(PORT),
                         "--node-keys", str(inbox), "--scenario", "smoke", "--rounds", str(ROUNDS),
                         "--out", str(tmp / "server" / "run"), "--set", "server.round-timeout=240.0",
                         "--set", "strategy.fraction-evaluate=0.0"], env, server)
        states.append(state)
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
        info["server_s"] = time.perf_counter() - t0
        info["state"], info["out"] = state, tmp / "server" / "run"
        info["dep"] = json.loads((state / STATE_FILE).read_text())
        info["server_stdout"] = proc.stdout

        # every device gets the CA certificate and its shard, and starts its SuperNode
        t0 = time.perf_counter()
        for k, d in enumerate(devices):
            home = tmp / d.name
            node = info["dep"]["nodes"][k]
            shutil.copy(Path(info["dep"]["certs_dir"]) / "ca.crt", home / "ca.crt")
            shutil.copy(node["shard"], home / "shard.npz")
            nstate = home / "state"
            states.append(nstate)
            proc = _fedrank(["deploy", "node", "--state", str(nstate), "--superlink", f"{server.addr}:{PORT}",
                             "--ca", str(home / "ca.crt"), "--key", str(home / f"device-{k}"),
                             "--data", str(home / "shard.npz"), "--partition-id", str(node["partition_id"]),
                             "--num-partitions", str(DEVICES)], env, d)
            assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
            ndep = json.loads((nstate / STATE_FILE).read_text())
            info["devices"].append({"host": d, "state": nstate, "node_id": ndep["nodes"][0]["node_id"],
                                    "pid": ndep["processes"][0]["pid"], "ticks": ndep["processes"][0]["ticks"]})
        info["nodes_s"] = time.perf_counter() - t0
        yield info
    finally:
        for st in reversed(states):  # devices first, then the SuperLink
            if (st / STATE_FILE).is_file():
                _fedrank(["deploy", "down", "--state", str(st), "--grace", "5"], env, timeout=120)
        leftover = f.close()
        print(f"\nprocesses still in the namespaces after `deploy down` (stopped by PID): {leftover or 'none'}")
        assert not [ns for ns in netns.namespaces() if ns.startswith(f"fr{f.tag}-")]


@pytest.mark.slow
@needs_netns
def test_superlink_serves_its_hosts_network_only(fleet: dict[str, Any]) -> None:
    server, dep = fleet["server"], fleet["dep"]
    # the SuperLink listens on the server host's address only, not on a wildcard and not in the root namespace
    assert dep["address"] == f"{server.addr}:{PORT}" and dep["kind"] == "server"
    superlink = next(p for p in dep["processes"] if p["role"] == "superlink")
    assert int(superlink["pid"]) in server.pids()  # it runs in the server host's namespace
    assert _listening(server, PORT) == [server.addr]
    assert server.addr not in _listening(None, PORT) and "0.0.0.0" not in _listening(None, PORT)
    # the root namespace has no address and no route in the fleet's subnet: no way in (read from the tables;
    # a packet to 10.213.0.1 from there would leave through the machine's default route instead)
    assert fleet["fleet"].root_paths() == []
    # the devices reach it; a device whose interface is down does not
    dev = fleet["devices"][0]["host"]
    assert netns.probe(server.addr, PORT, dev) == "open"
    dev.link(False)
    try:
        assert netns.probe(server.addr, PORT, dev, timeout=1.0) == "unreachable"
    finally:
        dev.link(True)
    fleet["fleet"].wait_reachable(dev, server)
    # every registered device is online under the node id its key was registered with, named after its key file
    nodes = {n["node-id"]: n for n in _supernodes(fleet)}
    assert {str(d["node_id"]) for d in fleet["devices"]} == set(nodes)
    assert {str(n["node_id"]) for n in dep["nodes"]} == set(nodes)
    assert all(n["status"] == "online" for n in nodes.values())
    assert "fedrank deploy node --superlink 10.213.0.1:9093" in fleet["server_stdout"]
    print(f"\ndeploy server {fleet['server_s']:.1f} s; {DEVICES} x deploy node {fleet['nodes_s']:.1f} s")


@pytest.mark.slow
@needs_netns
def test_unregistered_device_is_refused(fleet: dict[str, Any]) -> None:
    server, tmp = fleet["server"], fleet["tmp"]
    dev = fleet["devices"][1]["host"]  # a host that can reach the SuperLink, with a key nobody registered
    stranger = generate_node_key(tmp / "stranger" / "node.key")
    shard = fleet["devices"][1]["state"].parent / "shard.npz"
    before = {n["node-id"] for n in _supernodes(fleet)}
    proc = _fedrank(["deploy", "node", "--state", str(tmp / "stranger" / "state"), "--superlink",
                     f"{server.addr}:{PORT}", "--ca", str(Path(fleet["dep"]["certs_dir"]) / "ca.crt"), "--key",
                     str(stranger.private), "--data", str(shard), "--partition-id", "1", "--local-port", "9195",
                     "--max-retries", "2", "--timeout", "60"], fleet["env"], dev, timeout=180)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "refused this node" in proc.stderr and str(stranger.private) in proc.stderr
    state = json.loads((tmp / "stranger" / "state" / STATE_FILE).read_text())
    assert not pid_alive(int(state["processes"][0]["pid"]))

    # --foreground: the command becomes the SuperNode (same PID, recorded) and exits with Flower's exit code
    fg_state, fg_log = tmp / "stranger" / "fg-state", tmp / "stranger" / "fg.log"
    fg = subprocess.Popen(dev.command([str(BIN / "fedrank"), "deploy", "node", "--foreground", "--state",
                                       str(fg_state), "--superlink", f"{server.addr}:{PORT}", "--ca",
                                       str(Path(fleet["dep"]["certs_dir"]) / "ca.crt"), "--key",
                                       str(stranger.private), "--data", str(shard), "--partition-id", "1",
                                       "--local-port", "9196", "--max-retries", "2"]),
                          cwd=ROOT, env=fleet["env"], stdout=fg_log.open("wb"), stderr=subprocess.STDOUT)
    # wait() reaps it at once: its SuperExec exits when its parent is gone, and a zombie does not count as gone
    fg.wait(timeout=180)
    text = fg_log.read_text(errors="replace")
    assert fg.returncode != 0, text  # flower-supernode's own exit (it logs "Exit Code: 305" and exits with 1)
    assert "Failed to initialize the connection to the SuperLink" in text and "Exit Code: 305" in text
    recorded = json.loads((fg_state / STATE_FILE).read_text())["processes"]
    assert [p["pid"] for p in recorded] == [fg.pid] and "flower-supernode" in recorded[0]["cmd"][0]
    assert {n["node-id"] for n in _supernodes(fleet)} == before


def _wait(cond: Any, timeout: float, what: str, every: float = 0.5) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(every)


@pytest.mark.slow
@needs_netns
def test_run_across_hosts_completes_when_a_device_loses_its_network(fleet: dict[str, Any]) -> None:
    server, out = fleet["server"], fleet["out"]
    victim = fleet["devices"][-1]
    vid = str(victim["node_id"])
    ckpt = out / "checkpoints"

    def done() -> int:
        return max((int(p.stem[6:]) for p in ckpt.glob("round-*.pt")), default=0)

    def status() -> str:
        return next((n["status"] for n in _supernodes(fleet) if n["node-id"] == vid), "missing")

    # Execute: the run, supervised on the server host; the last device's interface goes down as round 2 starts
    t0 = time.monotonic()
    run = subprocess.Popen(server.command([str(BIN / "fedrank"), "deploy", "run", "--state", str(fleet["state"]),
                                           "--json", "--status-every", "3", "--limit", "1500"]),
                           cwd=ROOT, env=fleet["env"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        _wait(lambda: done() >= 1 or run.poll() is not None, 900, "round 1")
        assert run.poll() is None, "the run ended before the outage"
        victim["host"].link(False)
        t_down, wall_down = time.monotonic(), time.time()
        assert netns.probe(server.addr, PORT, victim["host"], timeout=1.0) == "unreachable"
        _wait(lambda: status() == "offline", 180, "the SuperLink to report the device offline", every=3.0)
        t_offline = time.monotonic()
        time.sleep(OUTAGE_AFTER_OFFLINE)
        victim["host"].link(True)
        t_up = time.monotonic()
        _wait(lambda: status() == "online", 120, "the device to rejoin", every=2.0)
        t_back = time.monotonic()
        back_after_round = done()
        stdout, stderr = run.communicate(timeout=1500)
    finally:
        victim["host"].link(True)
        if run.poll() is None:
            run.kill()
            run.wait()
    run_s = time.monotonic() - t0
    assert run.returncode == 0, stdout[-3000:] + stderr[-3000:]
    rep = json.loads(stdout[stdout.find("{"):])

    res = json.loads((out / "results.json").read_text())
    rounds = res["rounds"]
    print(f"\n{ROUNDS} rounds across {DEVICES + 1} hosts in {run_s:.0f} s; device {victim['host'].name} cut off "
          f"{t_offline - t_down:.0f} s before the SuperLink reported it offline, link up after "
          f"{t_up - t_down:.0f} s, online again {t_back - t_up:.0f} s later (after round {back_after_round})")
    ended = {int(p.stem[6:]): p.stat().st_mtime - wall_down for p in ckpt.glob("round-*.pt")}
    for r in rounds:
        print(f"  round {r['round']}: sampled {r['sampled']} replied {r['replied']} accepted {r['accepted']} "
              f"failures {r['failures']} timeouts {r['timeouts']}; {r['seconds']:.0f} s, ended "
              f"{ended.get(r['round'], float('nan')):+.0f} s from the cut; "
              f"ndcg@10 {r.get('central', {}).get('ndcg@10', float('nan')):.4f}")

    # Assert: every round completed once; round 1 had every device
    assert [r["round"] for r in rounds] == list(range(1, ROUNDS + 1))
    assert rep["rounds_completed"] == ROUNDS and rep["rounds_lost"] == [] and rep["resubmissions"] == 0
    assert rep["supernode_restarts"] == 0 and rep["superlink_restarts"] == 0
    assert rounds[0]["sampled"] == rounds[0]["accepted"] == DEVICES
    assert math.isfinite(res["final"]["ndcg@10"])
    # the cut-off device missed the round in progress (an error reply once the SuperLink saw it offline, or no
    # reply) ...
    missed = [r["round"] for r in rounds if r["accepted"] < DEVICES]
    assert 2 in missed
    assert rounds[1]["failures"] + rounds[1]["timeouts"] + (DEVICES - rounds[1]["sampled"]) >= 1
    # ... and took part again in every round that started after it was back online
    after = [r for r in rounds if r["round"] > back_after_round + 1]
    assert after, f"no round started after the device rejoined (back after round {back_after_round})"
    assert all(r["sampled"] == r["accepted"] == DEVICES for r in after)
    # the same SuperNode process, under the same node id: it rode the outage out and was never restarted
    assert pid_alive(int(victim["pid"]), victim["ticks"])
    assert {n["node-id"]: n["status"] for n in _supernodes(fleet)}[vid] == "online"



@pytest.mark.slow
@needs_netns
def test_a_device_registered_later_joins(fleet: dict[str, Any]) -> None:
    """``deploy register`` on the server host: a new device's key, and the device is accepted (after the run:
    ``deploy run`` waits for every registered device)."""
    server, tmp = fleet["server"], fleet["tmp"]
    dev = fleet["devices"][0]["host"]
    late = tmp / "late"
    proc = _fedrank(["deploy", "node-key", "--out", str(late / "device-9")], fleet["env"], dev)
    assert proc.returncode == 0, proc.stderr
    proc = _fedrank(["deploy", "register", "--state", str(fleet["state"]), "--node-key",
                     str(late / "device-9.pub")], fleet["env"], server)
    assert proc.returncode == 0 and "device-9" in proc.stdout, proc.stdout + proc.stderr
    again = _fedrank(["deploy", "register", "--state", str(fleet["state"]), "--node-key",
                      str(late / "device-9.pub")], fleet["env"], server)
    assert again.returncode == 0 and "registered already" in again.stdout
    node_id = int(json.loads((fleet["state"] / STATE_FILE).read_text())["nodes"][-1]["node_id"])
    try:
        proc = _fedrank(["deploy", "node", "--state", str(late / "state"), "--superlink", f"{server.addr}:{PORT}",
                         "--ca", str(Path(fleet["dep"]["certs_dir"]) / "ca.crt"), "--key", str(late / "device-9"),
                         "--data", str(fleet["devices"][0]["state"].parent / "shard.npz"), "--partition-id", "0",
                         "--local-port", "9197"], fleet["env"], dev, timeout=300)
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
        assert f"accepted by the SuperLink as node {node_id}" in proc.stdout
        assert {n["node-id"]: n["status"] for n in _supernodes(fleet)}[str(node_id)] == "online"
    finally:
        _fedrank(["deploy", "down", "--state", str(late / "state")], fleet["env"], timeout=120)
