"""Processes known by PID and start time (read from ``/proc``): whether one still runs, its descendants, and
stopping them (SIGTERM, then SIGKILL after a grace period). A recycled PID is never signalled."""

from __future__ import annotations

import contextlib
import os
import signal
import time
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from deploy.errors import DeployError


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


def _children() -> dict[int, list[int]]:
    """Parent PID -> child PIDs of every process, from one pass over /proc."""
    children: dict[int, list[int]] = {}
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            st = _stat(int(d.name))
            if st:
                children.setdefault(int(st[1]), []).append(int(d.name))
    return children


def _below(pid: int, children: Mapping[int, list[int]]) -> list[int]:
    out: list[int] = []
    todo = [pid]
    while todo:
        for c in children.get(todo.pop(), []):
            out.append(c)
            todo.append(c)
    return out


def descendants(pid: int) -> list[int]:
    """Every live descendant of ``pid`` (children first), from /proc."""
    return _below(pid, _children())


def process_trees(pids: Iterable[int]) -> dict[int, list[tuple[int, int | None]]]:
    """For each PID, its live descendants as (pid, start ticks), from one pass over /proc: a snapshot taken
    while a process runs lets its orphans be found (and stopped) after it died."""
    children = _children()
    return {pid: [(d, start_ticks(d)) for d in _below(pid, children)] for pid in pids}


def rss_mb(pids: Iterable[int]) -> float:
    """The summed resident memory (VmRSS) of the live processes among ``pids``, MiB."""
    total_kb = 0
    for pid in set(pids):
        try:
            status = Path(f"/proc/{pid}/status").read_text()
        except OSError:
            continue
        for line in status.splitlines():
            if line.startswith("VmRSS:"):
                total_kb += int(line.split()[1])
                break
    return total_kb / 1024.0


def recorded(processes: Iterable[Mapping[str, Any]]) -> list[tuple[int, int | None]]:
    """The (pid, start ticks) of process records as ``deployment.json`` holds them."""
    return [(int(p["pid"]), p.get("ticks")) for p in processes]


def running(processes: Iterable[Mapping[str, Any]]) -> list[Mapping[str, Any]]:
    """The process records whose process still runs."""
    return [p for p in processes if pid_alive(int(p["pid"]), p.get("ticks"))]


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


def tail(path: Path, lines: int = 15) -> str:
    """The last ``lines`` lines of a process's log (for error messages)."""
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return f"(no log at {path})"
