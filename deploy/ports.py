"""Loopback ports: choosing the SuperLink's and the SuperNodes' ports, checking they are free, and waiting
until the SuperLink listens."""

from __future__ import annotations

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


def wait_for_port(port: int, proc: subprocess.Popen[bytes], log_file: Path, timeout: float) -> None:
    """Until the SuperLink (``proc``) accepts connections on ``port``; an error if it exits or times out."""
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
