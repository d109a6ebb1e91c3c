"""Separate hosts on one machine, for tests: Linux network namespaces joined by a bridge.

:class:`Fleet` makes one namespace per host and one more, the switch, that holds a bridge. Each host gets a veth
pair, ``eth0`` (with an address such as ``10.213.0.2/24``) in the host's namespace and its peer in the switch's
namespace on the bridge. Nothing is added to the root namespace: no interface, no address, no route, so the hosts
reach one another and nothing else, and the root namespace cannot reach them. Every name carries a random tag
(``fr<tag>-<host>``), so that test runs never share a namespace.

Run a command on a host with :meth:`Host.command` (``ip netns exec NS ...``: the process and everything it starts
live in that namespace); cut a host off the network and bring it back with :meth:`Host.link`. :meth:`Fleet.close`
stops, by PID, every process still in one of the fleet's namespaces (``ip netns pids``: only what this fleet
started can be there) and deletes the namespaces; it is safe to call twice.

Needs root (``CAP_SYS_ADMIN``) and iproute2; :func:`unavailable` says why namespaces cannot be made, for a skip.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

IP = shutil.which("ip") or "/usr/sbin/ip"
BRIDGE = "br0"
IFACE = "eth0"


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run([IP, *args], capture_output=True, text=True, timeout=30, check=False)
    if check and proc.returncode != 0:
        raise RuntimeError(f"`ip {' '.join(args)}` failed (exit {proc.returncode}): {proc.stderr.strip()}")
    return proc


def unavailable() -> str | None:
    """Why network namespaces cannot be made here (None: they can)."""
    if not os.path.exists(IP):
        return "iproute2's `ip` is not installed"
    if os.geteuid() != 0:
        return "network namespaces need root (`ip netns add` needs CAP_SYS_ADMIN)"
    probe = f"frprobe{uuid.uuid4().hex[:6]}"
    proc = _ip("netns", "add", probe, check=False)
    if proc.returncode != 0:
        return f"`ip netns add` failed: {proc.stderr.strip()}"
    try:
        veth = _ip("-n", probe, "link", "add", "a0", "type", "veth", "peer", "name", "b0", check=False)
        if veth.returncode != 0:
            return f"cannot create a veth pair in a network namespace: {veth.stderr.strip()}"
    finally:
        _ip("netns", "del", probe, check=False)
    return None


@dataclass
class Host:
    """One simulated host: a network namespace with ``eth0`` at ``addr`` on the fleet's bridge."""

    name: str
    ns: str
    addr: str

    def command(self, cmd: Sequence[str]) -> list[str]:
        """``cmd`` run inside this host's namespace."""
        return [IP, "netns", "exec", self.ns, *cmd]

    def link(self, up: bool) -> None:
        """Bring the host's network interface up or down (down: the host is cut off; processes keep running)."""
        _ip("-n", self.ns, "link", "set", "dev", IFACE, "up" if up else "down")

    def link_is_up(self) -> bool:
        out = _ip("-n", self.ns, "link", "show", "dev", IFACE).stdout
        return "UP" in out[out.find("<") + 1:out.find(">")].split(",")

    def pids(self) -> list[int]:
        """The processes living in this host's namespace."""
        proc = _ip("netns", "pids", self.ns, check=False)
        return [int(p) for p in proc.stdout.split() if p.isdigit()]


@dataclass
class Fleet:
    """Hosts on one private /24 (``subnet`` is its first three octets), joined by a bridge in its own namespace."""

    subnet: str = "10.213.0"
    tag: str = field(default_factory=lambda: uuid.uuid4().hex[:6])
    hosts: dict[str, Host] = field(default_factory=dict)
    namespaces: list[str] = field(default_factory=list)

    @property
    def switch(self) -> str:
        return f"fr{self.tag}-sw"

    def _add_ns(self, ns: str) -> None:
        _ip("netns", "add", ns)
        self.namespaces.append(ns)  # recorded at once: close() deletes it even if the rest fails
        _ip("-n", ns, "link", "set", "dev", "lo", "up")

    def start(self) -> Fleet:
        self._add_ns(self.switch)
        _ip("-n", self.switch, "link", "add", BRIDGE, "type", "bridge")
        _ip("-n", self.switch, "link", "set", "dev", BRIDGE, "up")
        return self

    def add_host(self, name: str) -> Host:
        """A new namespace ``fr<tag>-<name>`` with ``eth0`` at the next address of the subnet (from .1)."""
        if len(self.hosts) >= 250:
            raise ValueError("a /24 holds at most 250 hosts here")
        host = Host(name=name, ns=f"fr{self.tag}-{name}", addr=f"{self.subnet}.{len(self.hosts) + 1}")
        self._add_ns(host.ns)
        port = f"p{len(self.hosts)}"  # the host's port on the bridge, in the switch's namespace
        _ip("link", "add", "name", IFACE, "netns", host.ns, "type", "veth", "peer", "name", port, "netns", self.switch)
        _ip("-n", self.switch, "link", "set", "dev", port, "master", BRIDGE)
        _ip("-n", self.switch, "link", "set", "dev", port, "up")
        _ip("-n", host.ns, "addr", "add", f"{host.addr}/24", "dev", IFACE)
        _ip("-n", host.ns, "link", "set", "dev", IFACE, "up")
        self.hosts[name] = host
        return host

    def wait_reachable(self, src: Host, dst: Host, timeout: float = 10.0) -> None:
        """Until a TCP connection from ``src`` to ``dst`` gets an answer (the bridge's ports take a moment)."""
        deadline = time.monotonic() + timeout
        while probe(dst.addr, 9, src) == "unreachable":
            if time.monotonic() > deadline:
                raise RuntimeError(f"{dst.name} ({dst.addr}) not reachable from {src.name}")
            time.sleep(0.3)

    def root_paths(self) -> list[str]:
        """The root namespace's addresses and routes inside the fleet's subnet (none: it has no way in). Read
        from the tables, without sending a packet: from the root namespace a fleet address would go out through
        the default route, to whatever answers there."""
        prefix = f"{self.subnet}."
        lines = _ip("-4", "-o", "addr", "show").stdout.splitlines() + _ip("-4", "route", "show").stdout.splitlines()
        return [ln.strip() for ln in lines if prefix in ln]

    def leftover_pids(self) -> list[int]:
        return [p for h in self.hosts.values() for p in h.pids()]

    def close(self, grace: float = 5.0) -> list[int]:
        """Stop every process still in the fleet's namespaces (SIGTERM, SIGKILL after ``grace`` s) and delete the
        namespaces. Returns the PIDs that had to be stopped (empty when the test cleaned up after itself)."""
        stopped: list[int] = []
        for ns in self.namespaces:
            stopped += [int(p) for p in _ip("netns", "pids", ns, check=False).stdout.split() if p.isdigit()]
        for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 5.0)):
            left = [p for p in stopped if _alive(p)]
            for pid in left:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, sig)
            deadline = time.monotonic() + wait
            while any(_alive(p) for p in left) and time.monotonic() < deadline:
                for pid in left:
                    with contextlib.suppress(ChildProcessError, OSError):
                        os.waitpid(pid, os.WNOHANG)
                time.sleep(0.1)
        for ns in reversed(self.namespaces):
            _ip("netns", "del", ns, check=False)
        self.namespaces.clear()
        return stopped


_PROBE = """
import socket, sys
s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
s.settimeout(float(sys.argv[3]))
try:
    s.connect((sys.argv[1], int(sys.argv[2])))
    print("open")
except ConnectionRefusedError:
    print("refused")
except OSError:
    print("unreachable")
"""


def probe(addr: str, port: int, src: Host, timeout: float = 2.0) -> str:
    """A TCP connection to ``addr:port`` from inside ``src``: ``open`` (something listens), ``refused`` (the host
    answered, nothing listens there) or ``unreachable`` (no answer, no route).

    Only from a fleet host: the root namespace has a default route to the outside world, and a fleet address
    that is not there would be sent out through it (see :meth:`Fleet.root_paths` for the root namespace)."""
    cmd = [sys.executable, "-c", _PROBE, addr, str(port), str(timeout)]
    proc = subprocess.run(src.command(cmd), capture_output=True, text=True, timeout=timeout + 20, check=False)
    return proc.stdout.strip() or f"error: {proc.stderr.strip()[-300:]}"


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] not in ("Z", "X")
    except OSError:
        return False


@contextlib.contextmanager
def fleet(*names: str, subnet: str = "10.213.0") -> Iterator[Fleet]:
    """A :class:`Fleet` with hosts ``names`` (addresses ``subnet.1``, ``.2``, ...), closed on exit."""
    f = Fleet(subnet=subnet)
    try:
        f.start()
        for n in names:
            f.add_host(n)
        yield f
    finally:
        f.close()


def namespaces() -> list[str]:
    """Every named network namespace (``ip netns list``)."""
    return [line.split()[0] for line in _ip("netns", "list", check=False).stdout.splitlines() if line.strip()]
