"""Ports: choosing the SuperLink's and the SuperNodes' ports on loopback, checking they are free (or, for a
SuperLink bound to another address, that the address is this machine's), and waiting until the SuperLink
listens."""

from __future__ import annotations

import errno
import ipaddress
import socket
import subprocess
import time
from collections.abc import Mapping
from pathlib import Path

from deploy.errors import DeployError, DeployInputError
from deploy.processes import tail

HOST = "127.0.0.1"
DEFAULT_PORT = 9093


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
        raise DeployInputError(f"port{'s' if len(busy) > 1 else ''} already in use on {host}: {', '.join(busy)}; "
                          "stop what uses it, pick others with --port / --node-port, or --port 0 for free ones")


def check_port_numbers(port: int, node_port: int | None) -> None:
    """``--port`` / ``--node-port`` within 0-65535 (0: a free one)."""
    for opt, value in (("--port", port), ("--node-port", node_port)):
        if value is not None and not 0 <= value <= 65535:
            raise DeployInputError(f"{opt} {value}: not a port number (0-65535; 0 picks a free one)")


def pick_ports(port: int, node_port: int | None, n: int) -> tuple[int, list[int]]:
    """The SuperLink's port and one runtime port per SuperNode, all checked free. ``port`` 0: a free one;
    ``node_port`` None: ``port + 1`` onwards (free ones when ``port`` is 0), 0: free ones."""
    check_port_numbers(port, node_port)
    sl_port = port or free_ports(1)[0]
    if node_port == 0 or (node_port is None and port == 0):
        node_ports = [p for p in free_ports(n + 1) if p != sl_port][:n]
    else:
        first = node_port if node_port is not None else sl_port + 1
        node_ports = list(range(first, first + n))
        if node_ports[-1] > 65535:
            raise DeployInputError(f"--node-port {first}: {n} SuperNode ports from there pass 65535")
    if sl_port in node_ports:
        raise DeployInputError(f"SuperLink port {sl_port} overlaps the SuperNode ports {node_ports}")
    check_ports({"SuperLink": sl_port, **{f"SuperNode {i}": p for i, p in enumerate(node_ports)}})
    return sl_port, node_ports


def wait_for_port(port: int, proc: subprocess.Popen[bytes], log_file: Path, timeout: float,
                  host: str = HOST) -> None:
    """Until the SuperLink (``proc``) accepts connections on ``host:port``; an error if it exits or times out."""
    deadline = time.monotonic() + timeout
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise DeployError(f"flower-superlink exited with code {proc.returncode}:\n{tail(log_file)}")
        with socket.socket(family, socket.SOCK_STREAM) as s:
            s.settimeout(0.5)
            if s.connect_ex((host, port)) == 0:
                return
        time.sleep(0.2)
    raise DeployError(f"flower-superlink did not listen on {host}:{port} within {timeout:.0f} s:\n{tail(log_file)}")


def split_address(address: str, what: str = "address") -> tuple[str, int]:
    """``HOST:PORT`` (``[IPv6]:PORT`` for IPv6) as (host, port); a :class:`DeployInputError` naming ``what``."""
    host, sep, port_s = address.rpartition(":")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    if not sep or not host or not port_s.isdigit() or not 1 <= int(port_s) <= 65535:
        raise DeployInputError(f"{what} {address!r}: expected HOST:PORT with a port 1-65535 "
                               "(e.g. 10.0.0.5:9093, [fd00::5]:9093 or superlink.example.com:9093)")
    return host, int(port_s)


def join_address(host: str, port: int) -> str:
    """The ``HOST:PORT`` form Flower takes (brackets around an IPv6 address)."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def check_bind_address(host: str, port: int, what: str = "--host") -> str:
    """The IP address ``host`` (an address or a name) resolves to, checked to be one of this machine's (the
    network namespace's) and to have ``port`` free there. Wildcards (0.0.0.0, ::) are refused: the SuperLink's
    certificate must name the address devices connect to, and its own processes connect to that address too."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as e:
        raise DeployInputError(f"{what} {host}: cannot resolve it ({e.strerror})") from e
    ip = str(infos[0][4][0])
    if ipaddress.ip_address(ip).is_unspecified:
        raise DeployInputError(f"{what} {host}: a wildcard address; give the address devices connect to (the "
                               "SuperLink binds it and its TLS certificate names it)")
    family = socket.AF_INET6 if ":" in ip else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        try:
            s.bind((ip, port))
        except OSError as e:
            if e.errno == errno.EADDRNOTAVAIL:
                raise DeployInputError(f"{what} {host}: {ip} is not an address of this host (run the command on "
                                       "the machine, or in the network namespace, that has it)") from e
            if e.errno == errno.EADDRINUSE:
                raise DeployInputError(f"--port {port}: already in use on {ip}; stop what uses it or pick "
                                       "another port") from e
            raise DeployInputError(f"{what} {host}: cannot bind {ip}:{port} ({e.strerror})") from e
    return ip
