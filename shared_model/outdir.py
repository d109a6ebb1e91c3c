"""Output folders written safely: one writer at a time, built beside the target, swapped in whole.

Every command that writes a folder goes through one of two context managers:

* :func:`staged_dir` (a data folder, a bundle; or :func:`locked_dir` + :func:`stage_into`, to look at the
  existing folder under the lock first): the new content is built in a staging folder next to the target
  (``<parent>/.<name>.staging-<pid>-<hex>``) and swapped in only when the body finished without an exception:
  one ``renameat2(RENAME_EXCHANGE)`` on Linux (old and new trade places atomically), else two renames through a
  trash name (``.<name>.old-<pid>-<hex>``). On any exception, ``KeyboardInterrupt`` included, the staging folder
  is deleted and the existing target is left as it was.
* :func:`locked_dir` (a run folder that holds checkpoints to resume from, a results folder): the folder is written
  in place; only the lock is taken.

Both hold a lock on the target while they work: ``<parent>/.<name>.lock``, a POSIX record lock (released by the
kernel when the process dies, not inherited by forked workers) on a file that names the holder (pid, host,
command line, start time). A second writer fails at once with :class:`OutputBusyError` naming the holder. The lock
file is removed on release.

Leftovers of a killed writer (SIGKILL, power loss) are cleared by the next writer of the same target, under the
lock: staging folders whose pid is dead are deleted; a trash folder whose pid is dead is put back in place when
the target is missing (a swap killed halfway), else deleted. Forked workers (a rendering pool) started inside
:func:`forked_workers_die_with_me` die with the writer, so none keeps writing into a staging folder once removed.

:data:`INTERRUPTED` is set by the front door's SIGINT/SIGTERM handler (``fedrank/cli.py``), for code running in
other threads that must know the process is shutting down.
"""

from __future__ import annotations

import contextlib
import ctypes
import datetime as _dt
import errno
import fcntl
import json
import logging
import os
import re
import shlex
import shutil
import signal
import socket
import sys
import threading
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

__all__ = ["INTERRUPTED", "OutputBusyError", "forked_workers_die_with_me", "lock_path", "locked_dir", "scratch_dir",
           "stage_into", "staged_dir", "staging_leftovers"]

_HELD: set[Path] = set()  # targets this process holds (POSIX locks do not exclude the process that holds them)
_HELD_GUARD = threading.Lock()
_RENAME_EXCHANGE = 2
_SIGNALS = {signal.SIGINT, signal.SIGTERM}


INTERRUPTED = threading.Event()  # set by the front door's SIGINT/SIGTERM handler: the process is shutting down


class OutputBusyError(OSError):
    """Another writer holds the lock on an output folder; the message names it (pid, host, command)."""


def lock_path(target: str | os.PathLike[str]) -> Path:
    """The lock file of an output folder: ``<parent>/.<name>.lock``."""
    t = _target(target)
    return t.parent / f".{t.name}.lock"


def staging_leftovers(target: str | os.PathLike[str]) -> list[Path]:
    """Staging and trash folders of ``target`` (a writer's, or a killed writer's leftovers)."""
    t = _target(target)
    if not t.parent.is_dir():
        return []
    return sorted(p for p in t.parent.iterdir() if _LEFTOVER.fullmatch(p.name) and _owner(p, t.name) is not None)


@contextlib.contextmanager
def locked_dir(target: str | os.PathLike[str], command: str | None = None, reentrant: bool = False
               ) -> Iterator[Path]:
    """Hold the lock on ``target`` while the body writes it in place; yields the (absolute) target path.

    The folder itself is not created (a failing command leaves nothing); missing parent folders are, and the ones
    created here are removed again when they are still empty on release. With ``reentrant``, a lock this process
    already holds (an outer ``locked_dir``) is used as it is.

    Raises
    ------
    OutputBusyError
        Another process (or, unless ``reentrant``, this one) holds the lock: the message names the holder.
    """
    t = _target(target)
    if reentrant and t in _HELD:
        yield t
        return
    created = _make_parents(t.parent)
    try:
        with _lock(t, command):
            yield t
    finally:
        for d in created:  # deepest first
            with contextlib.suppress(OSError):
                d.rmdir()


@contextlib.contextmanager
def staged_dir(target: str | os.PathLike[str], command: str | None = None) -> Iterator[Path]:
    """Build ``target`` in a staging folder beside it, under its lock; swap it into place when the body succeeds.

    ``with staged_dir(t) as s`` is ``with locked_dir(t) as t, stage_into(t) as s`` (see :func:`stage_into`).

    Raises
    ------
    OutputBusyError
        Another writer holds the lock on ``target``.
    """
    with locked_dir(target, command) as t, stage_into(t) as staging:
        yield staging


@contextlib.contextmanager
def stage_into(target: Path) -> Iterator[Path]:
    """Yield a new staging folder for ``target`` (locked by this process: :func:`locked_dir`); swap on success.

    Leftovers of killed writers of the same target are cleared first. The existing ``target`` is untouched until
    the swap, which happens with SIGINT and SIGTERM held back (a signal arriving then is handled right after). On
    any exception, ``KeyboardInterrupt`` included, the staging folder is deleted and the exception propagates.
    """
    t = _target(target)
    if t not in _HELD:
        raise RuntimeError(f"{t}: stage_into needs the folder's lock (locked_dir) held by this process")
    _clear_leftovers(t)
    staging = _new_staging(t)
    try:
        yield staging
        with _signals_held():
            _swap(staging, t)
    finally:
        with _signals_held():
            shutil.rmtree(staging, ignore_errors=True)


@contextlib.contextmanager
def scratch_dir(target: Path) -> Iterator[Path]:
    """A private work folder beside ``target`` (locked by this process), deleted on exit; named like a staging
    folder, so that one left by a killed writer is removed by the next writer."""
    t = _target(target)
    if t not in _HELD:
        raise RuntimeError(f"{t}: scratch_dir needs the folder's lock (locked_dir) held by this process")
    scratch = _new_staging(t)
    try:
        yield scratch
    finally:
        with _signals_held():
            shutil.rmtree(scratch, ignore_errors=True)


def _new_staging(t: Path) -> Path:
    p = t.parent / f".{t.name}.staging-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    p.mkdir()
    return p


@contextlib.contextmanager
def forked_workers_die_with_me() -> Iterator[None]:
    """Processes forked (``multiprocessing``'s fork start method) inside the block get SIGKILL when this process
    dies (Linux ``PR_SET_PDEATHSIG``): a killed writer leaves no orphan that keeps writing into its staging folder
    after the next writer removed it. Elsewhere a no-op."""
    global _FORK_GUARD
    if not sys.platform.startswith("linux"):
        yield
        return
    if not _FORK_HOOK:
        os.register_at_fork(before=_arm_fork, after_in_child=_die_with_parent)
        _FORK_HOOK.append(True)
    previous, _FORK_GUARD = _FORK_GUARD, os.getpid()
    try:
        yield
    finally:
        _FORK_GUARD = previous


_FORK_GUARD: int | None = None  # pid whose forked children die with it (inside forked_workers_die_with_me)
_FORK_HOOK: list[bool] = []
_PR_SET_PDEATHSIG = 1


def _arm_fork() -> None:
    """In the parent, before a fork: arm the child only inside the block, and only for a fork from the main
    thread (the death signal follows the forking thread, not the process)."""
    _ARMED[0] = os.getpid() == _FORK_GUARD and threading.current_thread() is threading.main_thread()


_ARMED = [False]


def _die_with_parent() -> None:
    if not _ARMED[0]:
        return
    _ARMED[0] = False
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    if os.getppid() != _FORK_GUARD:  # the parent died before the setting took effect
        os._exit(1)


# ------------------------------------------------------------------------------------------------ the lock


def _target(target: str | os.PathLike[str]) -> Path:
    """Absolute, with the parent resolved; a symlinked target is written where the link points."""
    p = Path(os.path.abspath(target))
    p = p.parent.resolve() / p.name
    return p.resolve() if p.is_symlink() else p


def _make_parents(parent: Path) -> list[Path]:
    missing = []
    p = parent
    while not p.exists():
        missing.append(p)
        p = p.parent
    parent.mkdir(parents=True, exist_ok=True)
    return missing  # deepest first


def _command_line() -> str:
    argv = list(sys.argv) or ["python"]
    argv[0] = Path(argv[0]).name
    text = shlex.join(argv)
    return text if len(text) <= 300 else text[:297] + "..."


@contextlib.contextmanager
def _lock(target: Path, command: str | None) -> Iterator[None]:
    path = lock_path(target)
    with _HELD_GUARD:
        if target in _HELD:
            raise OutputBusyError(f"{target}: already being written by this process (pid {os.getpid()})")
        _HELD.add(target)
    try:
        fd = _acquire(path, target)
        try:
            info = {"pid": os.getpid(), "host": socket.gethostname(), "command": command or _command_line(),
                    "since": _dt.datetime.now().astimezone().isoformat(timespec="seconds")}
            os.ftruncate(fd, 0)
            os.pwrite(fd, (json.dumps(info) + "\n").encode(), 0)
            yield
        finally:
            with contextlib.suppress(OSError):
                path.unlink()  # while still holding it: a waiting writer then sees a new file (see _acquire)
            os.close(fd)
    finally:
        with _HELD_GUARD:
            _HELD.discard(target)


def _acquire(path: Path, target: Path) -> int:
    """An open, locked file descriptor on ``path`` (the file at ``path`` now, not an unlinked earlier one)."""
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            os.close(fd)
            if e.errno not in (errno.EACCES, errno.EAGAIN):
                raise
            raise OutputBusyError(f"{target}: {_holder(path)}; wait for it to finish or stop it") from None
        try:
            same = os.stat(path).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            same = False
        if same:
            return fd
        os.close(fd)  # the holder released and removed the file between our open and our lock: take the new one


def _holder(path: Path) -> str:
    try:
        info: dict[str, Any] = json.loads(path.read_text(encoding="utf-8"))
        return (f"in use by pid {info.get('pid')} on {info.get('host')} ({info.get('command')}, since "
                f"{info.get('since')})")
    except (OSError, ValueError):
        return f"in use by another process (lock {path})"


# ------------------------------------------------------------------------------------------------ swap


@contextlib.contextmanager
def _signals_held() -> Iterator[None]:
    """SIGINT and SIGTERM wait until the block is done (main thread only; elsewhere Python handles no signals)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    old = signal.pthread_sigmask(signal.SIG_BLOCK, _SIGNALS)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)


def _exchange(a: Path, b: Path) -> bool:
    """Atomically trade the names of ``a`` and ``b`` (Linux ``renameat2``); False where unsupported."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        fn = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):
        return False
    at_fdcwd = -100
    if fn(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP):
        return False
    raise OSError(err, f"cannot swap {a} into place: {os.strerror(err)}", str(b))


def _swap(staging: Path, target: Path) -> None:
    """Put ``staging`` at ``target``; the previous target ends up at ``staging`` or a trash name, then goes."""
    if not os.path.lexists(target):
        os.rename(staging, target)
        return
    if not target.is_dir():
        raise NotADirectoryError(f"{target}: exists and is not a folder; not replacing it")
    if _exchange(staging, target):
        shutil.rmtree(staging, ignore_errors=True)  # the previous content
        return
    trash = target.parent / f".{target.name}.old-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    os.rename(target, trash)
    try:
        os.rename(staging, target)
    except BaseException:
        os.rename(trash, target)
        raise
    shutil.rmtree(trash, ignore_errors=True)


# ------------------------------------------------------------------------------------------------ leftovers

_LEFTOVER = re.compile(r"\.(?P<name>.+)\.(?P<kind>staging|old)-(?P<pid>\d+)-[0-9a-f]+")


def _owner(p: Path, name: str) -> int | None:
    m = _LEFTOVER.fullmatch(p.name)
    return int(m["pid"]) if m and m["name"] == name else None


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _clear_leftovers(target: Path) -> None:
    """Under the lock: delete killed writers' staging folders; restore or delete their trash folders."""
    for p in staging_leftovers(target):
        pid = _owner(p, target.name)
        if pid is None or _alive(pid):
            continue
        if ".old-" in p.name and not os.path.lexists(target):
            log.warning("%s: a writer (pid %d) was killed while swapping; restoring the previous folder", target, pid)
            os.rename(p, target)
            continue
        log.info("removing %s, left by a killed writer (pid %d)", p, pid)
        shutil.rmtree(p, ignore_errors=True)
