"""``fedrank deploy``: TLS material (checked with ``cryptography`` and with OpenSSL through Python's ``ssl``),
the state folder and process handling, and -- slow -- real Flower processes on loopback: a SuperLink with TLS,
SuperNode authentication and a database, two SuperNodes each bound to one shard, ``flwr run`` over TLS, and an
unregistered SuperNode that the SuperLink refuses."""

from __future__ import annotations

import json
import math
import os
import socket
import ssl
import subprocess
import sys
import threading
import time
import tomllib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import load_ssh_private_key
from cryptography.x509.oid import ExtendedKeyUsageOID

from deploy.certs import (
    CertError,
    CertPaths,
    check_certs,
    generate_certs,
    generate_node_key,
    load_cert,
    san_names,
)
from deploy.cluster import UpOptions, down, up
from deploy.errors import DeployError
from deploy.ports import check_ports, free_ports
from deploy.processes import descendants, pid_alive, start_ticks, stop_processes
from deploy.runconfig import resolve_run_config, run_config_overrides, write_run_config
from deploy.state import STATE_FILE, Deployment, Layout, write_deployment
from tests.procs import process_env

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent


# ------------------------------------------------------------------------------------------------ certificates

@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> CertPaths:
    return generate_certs(tmp_path_factory.mktemp("certs"))


def test_server_cert_is_signed_by_the_ca_and_names_loopback(certs: CertPaths) -> None:
    ca, server = load_cert(certs.ca_cert), load_cert(certs.server_cert)
    # cryptography's issuer check, and the ECDSA signature checked by hand with the CA's public key
    server.verify_directly_issued_by(ca)
    ca_pub = ca.public_key()
    hash_alg = server.signature_hash_algorithm
    assert isinstance(ca_pub, ec.EllipticCurvePublicKey) and hash_alg is not None
    ca_pub.verify(server.signature, server.tbs_certificate_bytes, ec.ECDSA(hash_alg))
    san = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert "127.0.0.1" in [str(ip) for ip in san.get_values_for_type(x509.IPAddress)]
    assert "localhost" in san.get_values_for_type(x509.DNSName)
    assert san_names(server) == ["127.0.0.1", "::1", "localhost"]
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca is True
    assert server.extensions.get_extension_for_class(x509.BasicConstraints).value.ca is False
    assert ExtendedKeyUsageOID.SERVER_AUTH in server.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    for key in (certs.ca_key, certs.server_key):
        assert key.stat().st_mode & 0o777 == 0o600
    check_certs(certs, "127.0.0.1")


def _tls_handshake(certs: CertPaths, cafile: Path | None, host: str = "127.0.0.1") -> dict[str, Any]:
    """A TLS server (server.pem) on a free loopback port and one client handshake, both through OpenSSL."""
    server_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_ctx.load_cert_chain(certs.server_cert, certs.server_key)
    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]

    def serve() -> None:
        conn, _ = listener.accept()
        try:
            with server_ctx.wrap_socket(conn, server_side=True) as tls:
                tls.recv(1)
        except (ssl.SSLError, OSError):
            pass

    t = threading.Thread(target=serve, daemon=True)
    t.start()
    try:
        client_ctx = ssl.create_default_context(cafile=str(cafile) if cafile else None)
        with socket.create_connection(("127.0.0.1", port), timeout=10) as raw, \
                client_ctx.wrap_socket(raw, server_hostname=host) as tls:
            peer = tls.getpeercert()
            assert peer is not None
            tls.sendall(b"x")
            return dict(peer)
    finally:
        t.join(timeout=10)
        listener.close()


def test_openssl_client_trusting_the_ca_accepts_the_server(certs: CertPaths, tmp_path: Path) -> None:
    peer = _tls_handshake(certs, certs.ca_cert, "127.0.0.1")
    assert ("IP Address", "127.0.0.1") in peer["subjectAltName"]
    _tls_handshake(certs, certs.ca_cert, "localhost")
    other = generate_certs(tmp_path / "other")
    with pytest.raises(ssl.SSLCertVerificationError):
        _tls_handshake(certs, other.ca_cert)  # another CA
    with pytest.raises(ssl.SSLCertVerificationError):
        _tls_handshake(certs, certs.ca_cert, "example.com")  # a name the certificate does not hold


def test_check_certs_names_what_is_wrong(certs: CertPaths, tmp_path: Path) -> None:
    other = generate_certs(tmp_path / "other")
    mixed = tmp_path / "mixed"
    mixed.mkdir()
    for src, name in ((other.ca_cert, "ca.crt"), (certs.server_cert, "server.pem"), (certs.server_key, "server.key")):
        (mixed / name).write_bytes(src.read_bytes())
    with pytest.raises(CertError, match="server.pem"):
        check_certs(CertPaths(mixed))
    (mixed / "server.key").write_bytes(other.server_key.read_bytes())
    (mixed / "ca.crt").write_bytes(certs.ca_cert.read_bytes())
    with pytest.raises(CertError, match="server.key: does not match"):
        check_certs(CertPaths(mixed))
    with pytest.raises(CertError, match="do not include 10.0.0.1"):
        check_certs(certs, "10.0.0.1")
    (mixed / "server.key").unlink()
    with pytest.raises(CertError, match="missing TLS files: .*server.key"):
        check_certs(CertPaths(mixed))
    with pytest.raises(CertError, match="incomplete TLS material, missing server.key"):
        generate_certs(mixed)


def test_existing_certs_are_kept_unless_overwrite(tmp_path: Path) -> None:
    first = generate_certs(tmp_path)
    ca = first.ca_cert.read_bytes()
    assert generate_certs(tmp_path).ca_cert.read_bytes() == ca
    assert generate_certs(tmp_path, overwrite=True).ca_cert.read_bytes() != ca


def test_node_key_is_read_the_way_flower_reads_it(tmp_path: Path) -> None:
    from flwr.cli.supernode.register import try_load_public_key
    from flwr.supercore.primitives.asymmetric import public_key_to_bytes, uses_nist_ec_curve

    key = generate_node_key(tmp_path / "keys" / "supernode-0")
    private = load_ssh_private_key(key.private.read_bytes(), None)  # as flower-supernode loads it
    assert isinstance(private, ec.EllipticCurvePrivateKey) and uses_nist_ec_curve(private.public_key())
    assert try_load_public_key(key.public) == public_key_to_bytes(private.public_key())  # flwr supernode register
    assert key.private.stat().st_mode & 0o777 == 0o600
    assert generate_node_key(key.private).public.read_bytes() == key.public.read_bytes()  # kept


# ------------------------------------------------------------------------------------ state folder, processes

def test_port_in_use_is_a_clear_error() -> None:
    with socket.create_server(("127.0.0.1", 0)) as busy:
        port = busy.getsockname()[1]
        with pytest.raises(DeployError, match=rf"already in use on 127.0.0.1: {port} \(SuperLink\)"):
            check_ports({"SuperLink": port, "SuperNode 0": free_ports(1)[0]})


def test_foreign_state_folder_is_refused(tmp_path: Path) -> None:
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(DeployError, match="not a fedrank deployment folder"):
        up(UpOptions(state=tmp_path, port=0))
    assert [p.name for p in tmp_path.iterdir()] == ["notes.txt"]  # nothing written there
    assert down(tmp_path)["note"] == f"no {STATE_FILE}"
    assert [p.name for p in tmp_path.iterdir()] == ["notes.txt"]


def test_missing_certs_are_a_clear_error(tmp_path: Path) -> None:
    (tmp_path / "certs").mkdir()
    opts = UpOptions(state=tmp_path / "state", port=0, certs=tmp_path / "certs", flwr_home=tmp_path / "home")
    for _ in range(2):  # the folder of a failed `up` is still ours: the same error again, not "foreign folder"
        with pytest.raises(DeployError, match=r"missing TLS files: .*ca\.crt.*server\.pem.*server\.key"):
            up(opts)
    assert (tmp_path / "state" / STATE_FILE).is_file()


def _sleeper(ignore_term: bool = False) -> subprocess.Popen[bytes]:
    """A process with a child, optionally deaf to SIGTERM (as a stuck server would be)."""
    code = ("import signal, subprocess, sys, time\n"
            + ("signal.signal(signal.SIGTERM, signal.SIG_IGN)\n" if ignore_term else "")
            + "subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(300)'])\n"
            + "print('ready', flush=True)\ntime.sleep(300)\n")
    p = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, start_new_session=True)
    assert p.stdout is not None and p.stdout.readline() == b"ready\n"
    return p


def _record(state: Path, procs: list[subprocess.Popen[bytes]], name: str = "fedrank") -> Layout:
    layout = Layout(state)
    state.mkdir(parents=True, exist_ok=True)
    dep = Deployment(id="t", name=name, address="127.0.0.1:1", port=1, flwr_home="", certs_dir="",
                     run_config_file="", out_dir="",
                     processes=[{"role": "superlink" if i == 0 else f"supernode-{i - 1}", "pid": p.pid,
                                 "ticks": start_ticks(p.pid), "log": "", "cmd": []} for i, p in enumerate(procs)])
    write_deployment(layout, dep)
    return layout


def test_down_stops_recorded_processes_and_their_children_and_is_idempotent(tmp_path: Path) -> None:
    procs = [_sleeper(), _sleeper(ignore_term=True)]
    kids = [d for p in procs for d in descendants(p.pid)]
    assert len(kids) == 2
    try:
        _record(tmp_path, procs)
        with pytest.raises(DeployError, match="is running"):
            up(UpOptions(state=tmp_path, port=0))
        res = down(tmp_path, grace=1.0)
        assert procs[1].pid in res["killed"] and procs[0].pid in res["terminated"]
        assert not any(pid_alive(pid) for pid in [p.pid for p in procs] + kids)
        again = down(tmp_path, grace=1.0)
        assert again["terminated"] == again["killed"] == []
        assert down(tmp_path / "nowhere")["note"] == "no such deployment folder"
        # the stopped deployment belongs to another name
        with pytest.raises(DeployError, match="holds the state of deployment 'fedrank'"):
            up(UpOptions(state=tmp_path, name="other", port=0))
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
            p.wait()


def test_a_recycled_pid_is_not_signalled(tmp_path: Path) -> None:
    p = _sleeper()
    try:
        layout = _record(tmp_path, [p])
        data = json.loads(layout.state_file.read_text())
        data["processes"][0]["ticks"] += 1  # the same PID, another start time: not ours
        layout.state_file.write_text(json.dumps(data))
        assert down(tmp_path)["terminated"] == []
        assert pid_alive(p.pid)
    finally:
        for d in descendants(p.pid):
            os.kill(d, 9)
        p.kill()
        p.wait()


def test_run_config_file_is_what_flwr_run_reads(tmp_path: Path) -> None:
    from flwr.common.config import parse_config_args

    from shared_model.config import load_defaults, merge_overrides, parse_run_config

    flat = resolve_run_config("smoke", nodes=2, rounds=2, out="runs/x", base=tmp_path)
    assert flat["data.dir"] == str(tmp_path / "data" / "tiny") and flat["server.out-dir"] == str(tmp_path / "runs/x")
    over = run_config_overrides(flat)
    assert over["partition.num-clients"] == 2 and over["strategy.fraction-evaluate"] == 1.0
    path = tmp_path / "run-config.toml"
    write_run_config(path, over)
    read = parse_config_args([str(path)])  # what `flwr run --run-config FILE` sends
    assert read == over
    assert parse_run_config(merge_overrides(load_defaults(), read)).to_flat() == parse_run_config(flat).to_flat()
    with pytest.raises(DeployError, match="at least one SuperNode"):
        resolve_run_config("smoke", nodes=0)


def test_cli_is_hooked_into_fedrank(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from fedrank.cli import main

    assert main(["deploy", "down", "--state", str(tmp_path / "none")]) == 0
    assert "nothing to stop" in capsys.readouterr().out
    assert main(["deploy", "certs", "--dir", str(tmp_path / "c")]) == 0
    assert "127.0.0.1, ::1, localhost" in capsys.readouterr().out
    assert main(["deploy", "status", "--state", str(tmp_path / "none")]) == 2
    assert "no deployment here" in capsys.readouterr().err


def _bad_deploy_input(tmp_path: Path) -> dict[str, tuple[list[str], str]]:
    """``fedrank deploy`` arguments that name input the command cannot use, and what the error line names."""
    state = ["--state", str(tmp_path / "state"), "--flwr-home", str(tmp_path / "home")]
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    return {
        "missing certs folder": (["up", *state, "--port", "0", "--certs", str(tmp_path / "nocerts")],
                                 "missing TLS files: "),
        "unknown --set key": (["up", *state, "--port", "0", "--set", "server.no-such-key=1"], "server.no-such-key"),
        "--set without =": (["up", *state, "--port", "0", "--set", "strategy.name"], "--set 'strategy.name'"),
        "bad --set value": (["up", *state, "--port", "0", "--set", "server.num-rounds=\"many\""],
                            "server.num-rounds"),
        "port out of range": (["up", "--state", str(tmp_path / "state" / "deploy-bad-port"), "--port", "70000"],
                              "--port 70000: not a port number"),
        "negative node port": (["up", *state, "--port", "0", "--node-port", "-3"], "--node-port -3"),
        "zero nodes": (["up", *state, "--port", "0", "--nodes", "0"], "--nodes 0"),
        "foreign state folder": (["up", "--state", str(foreign), "--port", "0"], "not a fedrank deployment folder"),
        "unknown state folder (status)": (["status", "--state", str(tmp_path / "nowhere")], "no deployment here"),
        "unknown state folder (run)": (["run", "--state", str(tmp_path / "nowhere")], "no deployment here"),
        "certs valid for no days": (["certs", "--dir", str(tmp_path / "c0"), "--days", "0"], "--days 0"),
    }


def test_deploy_bad_input_exits_2_with_one_line_naming_it(tmp_path: Path,
                                                          capsys: pytest.CaptureFixture[str]) -> None:
    from fedrank.cli import main

    for label, (args, names) in _bad_deploy_input(tmp_path).items():
        code = main(["deploy", *args])
        err = capsys.readouterr().err
        assert code == 2, (label, err)
        lines = err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith(f"fedrank deploy {args[0]}: error: "), (label, err)
        assert names in lines[0], (label, err)
        assert "Traceback" not in err
    assert not (tmp_path / "c0").exists()
    assert not (tmp_path / "state" / "deploy-bad-port").exists()
    assert [p.name for p in (tmp_path / "foreign").iterdir()] == ["notes.txt"]


def test_deploy_run_needs_resume(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from fedrank.cli import main

    cfg = tmp_path / "run-config.toml"
    write_run_config(cfg, {"server.resume": False, "server.out-dir": str(tmp_path / "run")})
    layout = Layout(tmp_path / "state")
    layout.root.mkdir()
    write_deployment(layout, Deployment(id="t", name="fedrank", address="127.0.0.1:1", port=1, flwr_home="",
                                        certs_dir="", run_config_file=str(cfg), out_dir=str(tmp_path / "run")))
    assert main(["deploy", "run", "--state", str(layout.root)]) == 2
    assert "server.resume = false" in capsys.readouterr().err


def test_process_trees_and_rss_see_a_process_and_its_child() -> None:
    from deploy.processes import process_trees, rss_mb

    p = _sleeper()
    try:
        tree = process_trees([p.pid])[p.pid]
        assert [pid for pid, _ in tree] == descendants(p.pid) and len(tree) == 1
        assert tree[0][1] == start_ticks(tree[0][0])
        one, both = rss_mb([p.pid]), rss_mb([p.pid, tree[0][0]])
        assert 1.0 < one < both  # MiB: two Python interpreters
        assert rss_mb([2**22 + 7]) == 0.0  # no such process
    finally:
        stop_processes([(p.pid, None)], grace=2.0)
        p.wait()


# ---------------------------------------------------------------------------- real processes (slow, CI)

def _env(home: Path) -> dict[str, str]:
    return process_env(home)


def _fedrank(args: list[str], env: dict[str, str], timeout: float = 600) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(BIN / "fedrank"), *args], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=timeout)


def _all_pids(state: Path) -> list[int]:
    """Every process the deployment started, with the descendants Flower started (SuperExec, apps)."""
    data = json.loads((state / STATE_FILE).read_text())
    pids = [int(p["pid"]) for p in data["processes"]]
    return pids + [d for p in pids for d in descendants(p)]


@pytest.fixture
def deployment(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[dict[str, Any]]:
    """``fedrank deploy up`` (smoke data, ``nodes`` SuperNodes, free ports); ``deploy down`` afterwards even
    when the test fails, then any recorded process still alive is stopped by PID."""
    nodes = getattr(request, "param", 2)
    env = _env(tmp_path / "flwr-home")
    state, name = tmp_path / "state", "fedrank-test"
    up_args = ["deploy", "up", "--state", str(state), "--name", name, "--scenario", "smoke", "--nodes", str(nodes),
               "--port", "0", "--out", str(tmp_path / "run")]
    t0 = time.perf_counter()
    proc = _fedrank(up_args, env)
    up_s = time.perf_counter() - t0
    try:
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
        yield {"env": env, "state": state, "name": name, "out": tmp_path / "run", "up_s": up_s, "up_args": up_args,
               "dep": json.loads((state / STATE_FILE).read_text())}
    finally:
        if (state / STATE_FILE).is_file():
            leftover = _all_pids(state)
            _fedrank(["deploy", "down", "--state", str(state), "--grace", "5"], env, timeout=120)
            stop_processes([(p, None) for p in leftover if pid_alive(p)], grace=2.0)


def _nodes(d: dict[str, Any]) -> list[dict[str, Any]]:
    proc = subprocess.run([str(BIN / "flwr"), "supernode", "ls", d["name"], "--format", "json"], cwd=ROOT,
                          env=d["env"], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return json.loads(proc.stdout[proc.stdout.find("{"):])["nodes"]


@pytest.mark.slow
def test_two_rounds_over_tls_with_authenticated_supernodes(deployment: dict[str, Any]) -> None:
    d, dep = deployment, deployment["dep"]
    # Prepare: the CLI's connection uses TLS with our CA; the SuperLink speaks TLS that only our CA vouches for
    conf = tomllib.loads((Path(d["env"]["FLWR_HOME"]) / "config.toml").read_text())["superlink"][d["name"]]
    assert conf["address"] == dep["address"] and "insecure" not in conf
    assert Path(conf["root-certificates"]) == Path(dep["certs_dir"]) / "ca.crt"
    host, port = dep["address"].split(":")
    with socket.create_connection((host, int(port)), timeout=10) as raw, \
            ssl.create_default_context(cafile=conf["root-certificates"]).wrap_socket(raw, server_hostname=host) as t:
        assert t.version() in ("TLSv1.2", "TLSv1.3")
    with pytest.raises(ssl.SSLCertVerificationError), socket.create_connection((host, int(port)), timeout=10) as raw:
        ssl.create_default_context().wrap_socket(raw, server_hostname=host)  # system CAs only
    registered = {str(n["node_id"]) for n in dep["nodes"]}
    assert len(registered) == 2 and {n["node-id"] for n in _nodes(d) if n["status"] == "online"} == registered
    assert [Path(n["shard"]).name for n in dep["nodes"]] == ["0.npz", "1.npz"]

    # Execute: the federation through the Flower CLI, over TLS
    t0 = time.perf_counter()
    proc = subprocess.run([str(BIN / "flwr"), "run", ".", d["name"], "--stream", "--run-config",
                           dep["run_config_file"]], cwd=ROOT, env=d["env"], capture_output=True, text=True,
                          timeout=900)
    run_s = time.perf_counter() - t0
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    res_file = d["out"] / "results.json"
    for _ in range(60):  # --stream returns when the run ends; results are written just before
        if res_file.is_file():
            break
        time.sleep(1)

    # Assert: 2 rounds, both SuperNodes answered, finite metrics
    res = json.loads(res_file.read_text())
    assert [r["round"] for r in res["rounds"]] == [1, 2]
    for r in res["rounds"]:
        assert r["accepted"] == r["sampled"] == 2
        assert math.isfinite(r["central"]["ndcg@10"]) and 0.0 < r["central"]["ndcg@10"] <= 1.0
    assert math.isfinite(res["final"]["ndcg@10"])
    assert res["run_config"]["partition.num-clients"] == 2
    print(f"\ndeploy up {d['up_s']:.1f} s; flwr run (2 rounds, TLS) {run_s:.1f} s; "
          f"final ndcg@10 {res['final']['ndcg@10']:.4f}")

    # every process the deployment started (and Flower's SuperExec/app processes) is gone after `down`
    pids = _all_pids(d["state"])
    assert len(pids) >= 3
    proc = _fedrank(["deploy", "down", "--state", str(d["state"])], d["env"], timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert not [p for p in pids if pid_alive(p)]
    again = _fedrank(["deploy", "down", "--state", str(d["state"])], d["env"], timeout=60)
    assert again.returncode == 0 and "nothing running" in again.stdout


@pytest.mark.slow
@pytest.mark.parametrize("deployment", [1], indirect=True)
def test_unregistered_supernode_is_refused(deployment: dict[str, Any], tmp_path: Path) -> None:
    d, dep = deployment, deployment["dep"]
    before = {n["node-id"] for n in _nodes(d)}
    ca = str(Path(dep["certs_dir"]) / "ca.crt")
    stranger = generate_node_key(tmp_path / "stranger")  # a valid key the SuperLink was never told about
    ports = free_ports(2)
    cases = {"unregistered key": ["--auth-supernode-private-key", str(stranger.private)], "no key": []}
    procs: dict[str, subprocess.Popen[bytes]] = {}
    logs = {k: tmp_path / f"{i}.log" for i, k in enumerate(cases)}
    try:
        for (label, extra), port in zip(cases.items(), ports, strict=True):
            with open(logs[label], "wb") as f:
                procs[label] = subprocess.Popen(
                    [str(BIN / "flower-supernode"), "--superlink", dep["address"], "--root-certificates", ca,
                     *extra, "--node-config", f'data-shard="{dep["nodes"][0]["shard"]}"', "--port", str(port),
                     "--max-retries", "2"],
                    env=_env(tmp_path / f"home-{port}"), stdout=f, stderr=subprocess.STDOUT, start_new_session=True)
        for label, p in procs.items():
            rc = p.wait(timeout=120)
            text = logs[label].read_text(errors="replace")
            assert rc != 0, text
            assert "Failed to initialize the connection to the SuperLink" in text, text
        assert "Failed to activate SuperNode" in logs["unregistered key"].read_text()
        assert "All SuperNodes must be registered" in logs["no key"].read_text()
        nodes = _nodes(d)
        assert {n["node-id"] for n in nodes} == before  # nothing was added
        assert [n["status"] for n in nodes] == ["online"]  # the registered one still is
    finally:
        for p in procs.values():
            if p.poll() is None:
                p.kill()
                p.wait()

    # the SuperLink's database keeps the registration across a restart: the same node comes back online
    assert _fedrank(["deploy", "down", "--state", str(d["state"])], d["env"], timeout=120).returncode == 0
    proc = _fedrank(d["up_args"], d["env"])
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    again = json.loads((d["state"] / STATE_FILE).read_text())
    assert [n["node_id"] for n in again["nodes"]] == [n["node_id"] for n in dep["nodes"]]
    assert [(n["node-id"], n["status"]) for n in _nodes(d)] == [(str(dep["nodes"][0]["node_id"]), "online")]
