"""A real Flower deployment on loopback: one SuperLink and N SuperNodes as separate processes, TLS everywhere
between them and the Flower CLI, SuperNode authentication, persistent SuperLink state.

``up`` prepares the run config's data and one shard per client, TLS material and one authentication key per
SuperNode, starts ``flower-superlink`` (``--enable-supernode-auth --database``), registers every SuperNode's
public key with ``flwr supernode register``, starts one ``flower-supernode`` per shard (``data-shard`` in its
node config), waits until ``flwr supernode ls`` shows them all online and writes a ``[superlink.NAME]`` entry into
``$FLWR_HOME/config.toml``, so that ``flwr run . NAME --stream --run-config STATE/run-config.toml`` runs the
federation. ``down`` stops, by PID, every process ``up`` started and their descendants (SIGTERM, SIGKILL after a
grace period); it is safe to call twice.

Everything lives in one state folder (``deployment.json`` records the PIDs; see :class:`Layout`).
"""

from __future__ import annotations

import contextlib
import datetime as dt
import fcntl
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import time
import tomllib
import uuid
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from deploy.certs import CertError, CertPaths, check_certs, generate_certs, generate_node_key

log = logging.getLogger(__name__)

STATE_FILE = "deployment.json"
MARKER = "fedrank-deploy"
FORMAT = 1
HOST = "127.0.0.1"
DEFAULT_NAME = "fedrank"
DEFAULT_PORT = 9093
STALE_WAIT = 90  # s; Flower marks a silent node offline 2 heartbeats (2 x 30 s) after its last one
BIN = Path(sys.executable).parent


class DeployError(RuntimeError):
    """A deployment cannot start or stop; the message says why and names the file, port or process."""


# ------------------------------------------------------------------------------------------------ layout

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

    def to_json(self) -> dict[str, Any]:
        return {"marker": MARKER, "format": FORMAT, **self.__dict__}

    @classmethod
    def from_json(cls, data: Mapping[str, Any], path: Path) -> Deployment:
        if data.get("marker") != MARKER:
            raise DeployError(f"{path}: not a fedrank deployment state file")
        try:
            return cls(**{k: data[k] for k in cls.__dataclass_fields__ if k in data})
        except TypeError as e:
            raise DeployError(f"{path}: unreadable deployment state ({e})") from e


def read_deployment(layout: Layout) -> Deployment | None:
    path = layout.state_file
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise DeployError(f"{path}: unreadable deployment state ({e})") from e
    return Deployment.from_json(data, path)


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


# --------------------------------------------------------------------------------------------- processes

def _stat(pid: int) -> list[str] | None:
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # the command name (field 2) may hold spaces and parentheses: split after its closing parenthesis
    return raw[raw.rfind(")") + 2:].split()


def start_ticks(pid: int) -> int | None:
    """The process's start time in clock ticks since boot (with the PID, it identifies one process)."""
    st = _stat(pid)
    return int(st[19]) if st else None


def pid_alive(pid: int, ticks: int | None = None) -> bool:
    """True while ``pid`` runs (a zombie counts as gone) and, given ``ticks``, is the same process."""
    st = _stat(pid)
    if st is None or st[0] in ("Z", "X"):
        return False
    return ticks is None or int(st[19]) == ticks


def descendants(pid: int) -> list[int]:
    """Every live descendant of ``pid`` (children first), from /proc."""
    children: dict[int, list[int]] = {}
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            st = _stat(int(d.name))
            if st:
                children.setdefault(int(st[1]), []).append(int(d.name))
    out: list[int] = []
    todo = [pid]
    while todo:
        for c in children.get(todo.pop(), []):
            out.append(c)
            todo.append(c)
    return out


def _signal(pid: int, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.kill(pid, sig)


def _reap(pid: int) -> None:
    """Collect the exit status of a process this Python process started itself (no-op otherwise)."""
    with contextlib.suppress(ChildProcessError, OSError):
        os.waitpid(pid, os.WNOHANG)


def stop_processes(procs: list[tuple[int, int | None]], grace: float = 10.0) -> dict[str, list[int]]:
    """SIGTERM each (pid, start ticks) that still runs, plus its descendants; SIGKILL what is left after
    ``grace`` seconds. Returns the PIDs that were terminated and those that had to be killed."""
    targets: dict[int, int | None] = {}
    for pid, ticks in procs:
        if pid_alive(pid, ticks):
            for d in descendants(pid):
                targets.setdefault(d, start_ticks(d))
            targets[pid] = ticks
    for pid, ticks in targets.items():
        if pid_alive(pid, ticks):
            _signal(pid, signal.SIGTERM)
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline:
        for pid in targets:
            _reap(pid)
        if not any(pid_alive(p, t) for p, t in targets.items()):
            break
        time.sleep(0.1)
    killed = [p for p, t in targets.items() if pid_alive(p, t)]
    for pid in killed:
        _signal(pid, signal.SIGKILL)
    for _ in range(50):
        for pid in killed:
            _reap(pid)
        if not any(pid_alive(p, targets[p]) for p in killed):
            break
        time.sleep(0.1)
    still = [p for p in killed if pid_alive(p, targets[p])]
    if still:
        raise DeployError(f"processes {still} survived SIGKILL")
    return {"terminated": sorted(set(targets) - set(killed)), "killed": sorted(killed)}


def _running(dep: Deployment) -> list[dict[str, Any]]:
    return [p for p in dep.processes if pid_alive(int(p["pid"]), p.get("ticks"))]


# ------------------------------------------------------------------------------------------------- ports

def port_free(port: int, host: str = HOST) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        try:
            s.bind((host, port))
        except OSError:
            return False
    return True


def free_ports(n: int, host: str = HOST) -> list[int]:
    """``n`` distinct ports that were free a moment ago (the kernel's choice)."""
    socks, ports = [], []
    try:
        for _ in range(n):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.bind((host, 0))
            socks.append(s)
            ports.append(s.getsockname()[1])
    finally:
        for s in socks:
            s.close()
    return ports


def check_ports(ports: Mapping[str, int], host: str = HOST) -> None:
    busy = [f"{port} ({role})" for role, port in ports.items() if not port_free(port, host)]
    if busy:
        raise DeployError(f"port{'s' if len(busy) > 1 else ''} already in use on {host}: {', '.join(busy)}; "
                          "stop what uses it, pick others with --port / --node-port, or --port 0 for free ones")


def wait_for_port(port: int, proc: subprocess.Popen[bytes], log_file: Path, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise DeployError(f"flower-superlink exited with code {proc.returncode}:\n{tail(log_file)}")
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            s.settimeout(0.5)
            if s.connect_ex((HOST, port)) == 0:
                return
        time.sleep(0.2)
    raise DeployError(f"flower-superlink did not listen on {HOST}:{port} within {timeout:.0f} s:\n{tail(log_file)}")


def tail(path: Path, lines: int = 15) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return f"(no log at {path})"


# --------------------------------------------------------------------------------------------- run config

def resolve_run_config(scenario: str | None = None, nodes: int | None = None, rounds: int | None = None,
                       out: str | None = None, extra: Mapping[str, Any] | None = None,
                       base: Path | None = None) -> dict[str, Any]:
    """The flat run config of the deployment: pyproject defaults < scenario < ``extra`` < explicit options.
    ``data.dir`` and ``server.out-dir`` become absolute (the ServerApp runs from the installed app bundle)."""
    from shared_model.config import parse_run_config, scenario_layer
    from shared_model.config import resolve_run_config as resolve

    cli: dict[str, Any] = dict(extra or {})
    if nodes is not None:
        if nodes < 1:
            raise DeployError(f"--nodes {nodes}: need at least one SuperNode")
        cli["partition.num-clients"] = nodes
    if rounds is not None:
        cli["server.num-rounds"] = rounds
    if out is not None:
        cli["server.out-dir"] = out
    flat = resolve(*([scenario_layer(scenario)] if scenario else []), ("command line", cli))
    base = base or Path.cwd()
    for key in ("data.dir", "server.out-dir"):
        flat[key] = str((base / str(flat[key])).resolve())
    parse_run_config(flat)  # validates every value
    return flat


def run_config_overrides(flat: Mapping[str, Any]) -> dict[str, Any]:
    """The keys that differ from pyproject's defaults, plus the two paths: what ``flwr run`` must be given."""
    from shared_model.config import load_defaults

    defaults = load_defaults()
    keep = {"data.dir", "server.out-dir", "partition.num-clients"}
    return {k: v for k, v in flat.items() if k in keep or defaults.get(k) != v}


def _toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int | float):
        return repr(v)
    return json.dumps(str(v))  # a TOML basic string is a JSON string for these characters


def write_run_config(path: Path, overrides: Mapping[str, Any]) -> None:
    """A TOML file for ``flwr run --run-config FILE`` (dotted keys as quoted keys, so they stay flat)."""
    text = "# written by `fedrank deploy up`: flwr run . NAME --stream --run-config THIS_FILE\n"
    text += "".join(f"{json.dumps(k)} = {_toml_value(v)}\n" for k, v in sorted(overrides.items()))
    if tomllib.loads(text) != dict(overrides):
        raise DeployError(f"{path}: run config does not survive TOML round trip: {dict(overrides)}")
    path.write_text(text)


def prepare_shards(flat: Mapping[str, Any], progress: bool = True) -> list[Path]:
    """Generate/prepare the data folder if needed and write one shard per client; their absolute paths."""
    from shared_model.config import parse_run_config
    from shared_model.shards import ensure_shards
    from simulations.runner import ensure_data

    settings = parse_run_config(flat)
    prep = ensure_data(settings, progress)
    return [p.resolve() for p in ensure_shards(prep, settings)]


# ------------------------------------------------------------------------------------------ Flower CLI

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


# ---------------------------------------------------------------------------------------------- up / down

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
        raise DeployError(f"{layout.root}: exists and is not a folder")
    if (layout.root.is_dir() and not layout.state_file.is_file()
            and any(p.name != layout.lock.name for p in layout.root.iterdir())):
        raise DeployError(f"{layout.root}: not empty and holds no {STATE_FILE}: not a fedrank deployment "
                          "folder; choose another --state")


def _check_state_folder(layout: Layout, name: str) -> Deployment | None:
    """The previous (stopped) deployment of this folder, if any; errors for a foreign or running one."""
    prev = read_deployment(layout)
    if prev is None:
        _check_not_foreign(layout)
        return None
    running = _running(prev)
    if running:
        pids = ", ".join(f"{p['role']} {p['pid']}" for p in running)
        raise DeployError(f"{layout.root}: deployment {prev.name!r} ({prev.address}) is running ({pids}); "
                          f"stop it first with `fedrank deploy down --state {layout.root}`")
    if prev.name != name:
        raise DeployError(f"{layout.root}: holds the state of deployment {prev.name!r}, not {name!r}; use "
                          f"--name {prev.name} or another --state")
    return prev


def _spawn(role: str, cmd: list[str], env: dict[str, str], log_file: Path, dep: Deployment,
           layout: Layout) -> subprocess.Popen[bytes]:
    log_file.parent.mkdir(parents=True, exist_ok=True)
    with open(log_file, "ab") as f:
        f.write(f"\n==== {time.strftime('%Y-%m-%d %H:%M:%S')} {' '.join(cmd)}\n".encode())
        f.flush()
        proc = subprocess.Popen(cmd, env=env, stdin=subprocess.DEVNULL, stdout=f, stderr=subprocess.STDOUT,
                                start_new_session=True, cwd=layout.root)
    dep.processes.append({"role": role, "pid": proc.pid, "ticks": start_ticks(proc.pid), "log": str(log_file),
                          "cmd": cmd})
    write_deployment(layout, dep)  # recorded at once: `down` can stop it even if `up` fails later
    return proc


def up(opts: UpOptions) -> Deployment:
    """Start the deployment described by ``opts``; returns what ``deployment.json`` records."""
    layout = Layout(opts.state.resolve())
    _check_not_foreign(layout)
    with locked(layout):
        prev = _check_state_folder(layout, opts.name)
        flat = resolve_run_config(opts.scenario, opts.nodes, opts.rounds, opts.out, opts.extra)
        n = int(flat["partition.num-clients"])

        # ports
        port = opts.port or free_ports(1)[0]
        if opts.node_port == 0 or (opts.node_port is None and opts.port == 0):
            node_ports = [p for p in free_ports(n + 1) if p != port][:n]
        else:
            first = opts.node_port if opts.node_port is not None else port + 1
            node_ports = list(range(first, first + n))
        if port in node_ports:
            raise DeployError(f"SuperLink port {port} overlaps the SuperNode ports {node_ports}")
        check_ports({"SuperLink": port, **{f"SuperNode {i}": p for i, p in enumerate(node_ports)}})

        # claim the folder before writing anything else into it (node ids of a previous run are kept)
        certs = CertPaths(opts.certs.resolve()) if opts.certs is not None else layout.certs
        flwr_home = _flwr_home(opts, layout)
        dep = Deployment(id=prev.id if prev else uuid.uuid4().hex, name=opts.name, address=f"{HOST}:{port}",
                         port=port, flwr_home=str(flwr_home), certs_dir=str(certs.dir),
                         run_config_file=str(layout.run_config), out_dir=str(flat["server.out-dir"]),
                         nodes=list(prev.nodes) if prev else [], created=prev.created if prev else time.time())
        write_deployment(layout, dep)

        # TLS material and node keys
        try:
            if opts.certs is None:
                generate_certs(certs.dir)
            check_certs(certs, HOST)
        except CertError as e:
            raise DeployError(str(e)) from e
        keys = [generate_node_key(layout.node_key(i)) for i in range(n)]

        # data: one shard per SuperNode
        shards = prepare_shards(flat, opts.progress)
        if len(shards) != n:
            raise DeployError(f"{len(shards)} shards for {n} SuperNodes")

        # the Flower CLI's connection and the run config for `flwr run`
        write_connection(flwr_home, opts.name, dep.address, certs.ca_cert)
        write_run_config(layout.run_config, run_config_overrides(flat))

        try:
            _start(dep, layout, certs, keys, shards, node_ports, flwr_home, opts.timeout)
        except BaseException:
            stop_processes([(int(p["pid"]), p.get("ticks")) for p in dep.processes], grace=5.0)
            raise
        write_deployment(layout, dep)
        return dep


def _start(dep: Deployment, layout: Layout, certs: CertPaths, keys: list[Any], shards: list[Path],
           node_ports: list[int], flwr_home: Path, timeout: float) -> None:
    layout.database.parent.mkdir(parents=True, exist_ok=True)
    layout.superlink_home.mkdir(parents=True, exist_ok=True)
    sl_log = layout.logs / "superlink.log"
    sl = _spawn("superlink", [
        str(BIN / "flower-superlink"),
        "--ssl-ca-certfile", str(certs.ca_cert), "--ssl-certfile", str(certs.server_cert),
        "--ssl-keyfile", str(certs.server_key),
        "--database", str(layout.database),
        "--enable-supernode-auth",
        "--disable-runtime-dependency-installation",
        "--host", HOST, "--port", str(dep.port),
    ], base_env(layout.superlink_home), sl_log, dep, layout)
    wait_for_port(dep.port, sl, sl_log, timeout)

    # register every SuperNode's public key (retry while the SuperLink finishes starting)
    known = {int(n["index"]): n for n in dep.nodes}  # from an earlier `up` of this folder (same keys)
    deadline = time.monotonic() + timeout
    for i, key in enumerate(keys):
        while True:
            try:
                node_id = register_node(flwr_home, dep.name, key.public, f"supernode-{i}")
                break
            except DeployError:
                if time.monotonic() > deadline or sl.poll() is not None:
                    raise
                time.sleep(1.0)
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

    # a node left online in the database by a SuperNode that died without deactivating (SIGKILL, crash) cannot be
    # activated again until its heartbeat expires: wait for that rather than start a SuperNode that would exit
    want = {str(n["node_id"]) for n in dep.nodes}
    stale = {n["node-id"] for n in list_nodes(flwr_home, dep.name) if n.get("status") == "online"} & want
    if stale:
        log.warning("SuperNodes %s are still marked online from before; waiting for their heartbeat to expire "
                    "(up to %d s)", sorted(stale), STALE_WAIT)
        limit = time.monotonic() + STALE_WAIT
        while stale and time.monotonic() < limit:
            time.sleep(2.0)
            stale &= {n["node-id"] for n in list_nodes(flwr_home, dep.name) if n.get("status") == "online"}

    # the SuperNodes, each bound to its shard
    started_at, deadline = time.time(), time.monotonic() + timeout
    procs = []
    for node in dep.nodes:
        i = node["index"]
        home = layout.node_home(i)
        home.mkdir(parents=True, exist_ok=True)
        node_config = f'data-shard="{node["shard"]}" partition-id={i} num-partitions={len(dep.nodes)}'
        procs.append(_spawn(f"supernode-{i}", [
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
        ], base_env(home), layout.logs / f"supernode-{i}.log", dep, layout))

    # until the SuperLink reports all of them online, activated by these processes
    while True:
        for p, node in zip(procs, dep.nodes, strict=True):
            if p.poll() is not None:
                lf = layout.logs / f"supernode-{node['index']}.log"
                raise DeployError(f"flower-supernode {node['index']} exited with code {p.returncode}:\n{tail(lf)}")
        if sl.poll() is not None:
            raise DeployError(f"flower-superlink exited with code {sl.returncode}:\n{tail(sl_log)}")
        online = {n["node-id"] for n in list_nodes(flwr_home, dep.name)
                  if n.get("status") == "online" and _since(n.get("online-at"), started_at)}
        if want <= online:
            return
        if time.monotonic() > deadline:
            raise DeployError(f"SuperNodes {sorted(want - online)} not online after {timeout:.0f} s; logs in "
                              f"{layout.logs}")
        time.sleep(1.0)


def _since(stamp: str | None, t: float) -> bool:
    """``flwr supernode ls`` time stamps (``2026-11-27 07:12:57Z``, whole seconds) at or after ``t``."""
    if not stamp or stamp == "N/A":
        return False
    try:
        when = dt.datetime.strptime(stamp, "%Y-%m-%d %H:%M:%SZ").replace(tzinfo=dt.UTC).timestamp()
    except ValueError:
        return False
    return when >= int(t) - 1


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
            procs = [(int(p["pid"]), p.get("ticks")) for p in dep.processes if (p["role"] == "superlink") == phase]
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
        raise DeployError(f"{layout.root}: no deployment here (no {STATE_FILE})")
    return {"name": dep.name, "address": dep.address, "flwr_home": dep.flwr_home, "run_config": dep.run_config_file,
            "processes": [{"role": p["role"], "pid": p["pid"], "running": pid_alive(int(p["pid"]), p.get("ticks")),
                           "log": p["log"]} for p in dep.processes]}


def flwr_run_command(dep: Deployment) -> str:
    return f"flwr run . {dep.name} --stream --run-config {dep.run_config_file}"
