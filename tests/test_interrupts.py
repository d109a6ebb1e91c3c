"""Nothing lost: every command that writes a folder builds it beside the target and swaps it in whole, under a lock.

* a failing command leaves the previous folder byte-identical (``generate --catalog`` used to delete its
  ``meta.json`` and ``sessions.npz`` before finding the catalog unusable);
* a second writer of the same folder exits 2 at once, naming the holder (two ``generate`` used to both exit 0
  and leave a mix of two seeds);
* SIGINT or SIGTERM: one line on stderr, exit 130, the previous output intact, no staging folder, no lock file
  and no process left (``export`` used to print a 145-line traceback and exit 1);
* SIGKILL: the previous output intact; the next writer removes the killed one's staging folder;
* ``simulate`` writes its run folder in place (the checkpoints): interrupted, it resumes.

The unit tests of :mod:`shared_model.outdir` and the in-process CLI tests are fast; the ones that start real
``fedrank`` processes and wait for them to get going are marked slow, except one SIGINT of ``generate``.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from fedrank.cli import main
from shared_model.checkpoint import load_checkpoint
from shared_model.outdir import OutputBusyError, lock_path, locked_dir, staged_dir, staging_leftovers
from tests.bad_inputs import ROOT, ROWS, _csv
from tests.procs import fedrank, fedrank_lines, snapshot, start


@pytest.fixture(scope="module")
def previous(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A finished data folder (shoppers simulated over a 3-item catalog: fast): the previous output that every
    failure or interruption must leave intact."""
    from simulations.marketplace import simulate_catalog_dir

    tmp = tmp_path_factory.mktemp("prev")
    return simulate_catalog_dir(_csv(tmp, ROWS), tmp / "data", preset="tiny", progress=False)


def _copy(previous: Path, tmp_path: Path) -> tuple[Path, dict[str, str]]:
    out = tmp_path / "data"
    shutil.copytree(previous, out)
    return out, snapshot(out)


def _dead_pid() -> int:
    proc = subprocess.Popen(["true"])
    proc.wait()
    return proc.pid


def _nothing_left(target: Path) -> bool:
    return not staging_leftovers(target) and not lock_path(target).exists()


@contextlib.contextmanager
def _holder(target: Path, command: str = "fedrank generate --out somewhere") -> Iterator[subprocess.Popen[str]]:
    """Another process holding the lock on ``target`` (what a running ``fedrank`` command does)."""
    code = ("import sys, time\nfrom shared_model.outdir import locked_dir\n"
            "with locked_dir(sys.argv[1], sys.argv[2]):\n    print('held', flush=True)\n    time.sleep(120)\n")
    proc = subprocess.Popen([sys.executable, "-c", code, str(target), command], cwd=ROOT, stdout=subprocess.PIPE,
                            text=True)
    try:
        assert proc.stdout is not None and proc.stdout.readline().strip() == "held"
        yield proc
    finally:
        proc.kill()
        proc.wait()


def _wait_for(cond: Callable[[], bool], proc: subprocess.Popen[bytes], err: Path, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert proc.poll() is None, f"exited {proc.returncode} early:\n" + err.read_text()[-3000:]
        assert time.monotonic() < deadline, "timed out:\n" + err.read_text()[-3000:]
        time.sleep(0.05)


def _group_gone(pgid: int, timeout: float = 30) -> bool:
    """No process of the session ``pgid`` is alive any more (Ray's, a rendering pool's)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            os.killpg(pgid, 0)
        except ProcessLookupError:
            return True
        time.sleep(0.2)
    return False


def _interrupted(proc: subprocess.Popen[bytes], err: Path, command: str, sig: int, timeout: float = 120) -> None:
    """Send ``sig`` to the command's own process (a terminal's Ctrl-C, a ``kill``); it exits 130 with one line."""
    os.kill(proc.pid, sig)
    try:
        rc = proc.wait(timeout=timeout)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)  # never leave a stuck run behind
    text = err.read_text(errors="replace")
    assert rc == 130, text[-3000:]
    assert fedrank_lines(text) == [f"fedrank {command}: interrupted"], text[-3000:]
    assert "Traceback" not in text, text[-3000:]
    assert _group_gone(proc.pid), "processes of the interrupted command are still alive"


# ------------------------------------------------------------------------------------------ outdir itself


def test_staged_dir_swaps_the_new_folder_in_whole(tmp_path: Path) -> None:
    # Prepare
    target = tmp_path / "out"
    (target / "old").mkdir(parents=True)
    # Execute
    with staged_dir(target) as stage:
        (stage / "new.txt").write_text("new")
        assert not (target / "new.txt").exists() and lock_path(target).exists()
    # Assert
    assert sorted(p.name for p in target.iterdir()) == ["new.txt"]
    assert _nothing_left(target)


@pytest.mark.parametrize("exc", [RuntimeError, KeyboardInterrupt], ids=["error", "interrupt"])
def test_staged_dir_failure_leaves_the_previous_folder(tmp_path: Path, exc: type[BaseException]) -> None:
    target = tmp_path / "out"
    target.mkdir()
    (target / "keep.txt").write_text("previous")
    with pytest.raises(exc), staged_dir(target) as stage:
        (stage / "keep.txt").write_text("half-written")
        raise exc()
    assert (target / "keep.txt").read_text() == "previous" and _nothing_left(target)


def test_locked_dir_creates_no_folder_and_removes_the_parents_it_made(tmp_path: Path) -> None:
    target = tmp_path / "a" / "b" / "run"
    with pytest.raises(ValueError), locked_dir(target):
        assert lock_path(target).exists()
        raise ValueError("bad input")
    assert not (tmp_path / "a").exists()


def test_second_writer_in_another_process_fails_naming_the_holder(tmp_path: Path) -> None:
    target = tmp_path / "out"
    with _holder(target, "fedrank export --out out") as holder, pytest.raises(OutputBusyError) as err, \
            locked_dir(target):
        pass
    message = str(err.value)
    assert f"pid {holder.pid}" in message and socket.gethostname() in message
    assert "fedrank export --out out" in message and str(target) in message


def test_same_process_cannot_take_the_lock_twice(tmp_path: Path) -> None:
    with locked_dir(tmp_path / "out"), pytest.raises(OutputBusyError, match="this process"), \
            locked_dir(tmp_path / "out"):
        pass
    with locked_dir(tmp_path / "out") as t, locked_dir(tmp_path / "out", reentrant=True) as again:
        assert t == again
    assert _nothing_left(tmp_path / "out")


def test_next_writer_removes_staging_of_dead_writers_only(tmp_path: Path) -> None:
    # Prepare: a killed writer's staging folder and trash, and one of a live process (pid 1)
    target = tmp_path / "out"
    target.mkdir()
    dead = _dead_pid()
    stale = [tmp_path / f".out.staging-{dead}-0badc0de", tmp_path / f".out.old-{dead}-0badc0de"]
    live = tmp_path / ".out.staging-1-0badc0de"
    for d in (*stale, live):
        (d / "images").mkdir(parents=True)
        (d / "images" / "x.jpg").write_bytes(b"half")
    # Execute
    with staged_dir(target) as stage:
        (stage / "new.txt").write_text("new")
    # Assert
    assert not any(d.exists() for d in stale) and live.exists()
    assert (target / "new.txt").is_file()


def test_swap_killed_halfway_is_rolled_back_by_the_next_writer(tmp_path: Path) -> None:
    # Prepare: killed between "target -> trash" and "staging -> target": no target, the previous one in the trash
    target = tmp_path / "out"
    trash = tmp_path / f".out.old-{_dead_pid()}-0badc0de"
    trash.mkdir()
    (trash / "meta.json").write_text("previous")
    # Execute: the next writer fails
    with pytest.raises(RuntimeError), staged_dir(target):
        raise RuntimeError("bad input")
    # Assert: the previous folder is back
    assert (target / "meta.json").read_text() == "previous" and _nothing_left(target)


# ------------------------------------------------------------------------------------------ fedrank, in-process


def _disk_full(*args: object, **kwargs: object) -> None:
    raise OSError(28, "No space left on device")


@pytest.mark.parametrize("source", ["catalog", "preset"])
def test_failing_generate_leaves_the_previous_folder_byte_identical(
        source: str, previous: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    # Prepare: a finished data folder; the new one fails after its input was read (the disk fills up while the
    # images or the session files are written)
    import simulations.marketplace as market

    out, before = _copy(previous, tmp_path)
    monkeypatch.setattr(market, "render_all" if source == "preset" else "write_session_files", _disk_full)
    argv = ["--catalog", str(_csv(tmp_path, ROWS))] if source == "catalog" else []
    # Execute
    rc = main(["generate", *argv, "--out", str(out), "--preset", "tiny", "--seed", "1"])
    # Assert: one line, and the previous folder as it was (meta.json and sessions.npz included)
    err = capsys.readouterr().err
    assert rc == 2 and "No space left on device" in err, err
    assert snapshot(out) == before and _nothing_left(out)


@pytest.mark.parametrize("command", ["generate", "generate-catalog", "train", "evaluate", "export", "simulate"])
def test_second_writer_exits_2_at_once_naming_the_holder(
        command: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # Prepare: another process writes the output folder
    out = tmp_path / "out"
    argv = {
        "generate": ["generate", "--preset", "tiny", "--out", str(out)],
        "generate-catalog": ["generate", "--catalog", str(_csv(tmp_path, ROWS)), "--out", str(out)],
        "train": ["train", "--data", str(tmp_path / "no-data"), "--out", str(out)],
        "evaluate": ["evaluate", "--data", str(tmp_path / "no-data"), "--out", str(out)],
        "export": ["export", "--checkpoint", str(tmp_path / "head.pt"), "--out", str(out)],
        "simulate": ["simulate", "--scenario", "smoke", "--out", str(out), "--no-reference"],
    }[command]
    with _holder(out, "fedrank generate --preset small --out out") as holder:
        # Execute
        t0 = time.monotonic()
        rc = main(argv)
        seconds = time.monotonic() - t0
    # Assert: one line naming pid, host and command; nothing written
    lines = fedrank_lines(capsys.readouterr().err)
    assert rc == 2 and len(lines) == 1, lines
    assert f"pid {holder.pid} on {socket.gethostname()}" in lines[0], lines[0]
    assert "fedrank generate --preset small --out out" in lines[0], lines[0]
    assert not out.exists() and seconds < 30


def test_generate_refuses_to_replace_a_folder_it_did_not_write(tmp_path: Path,
                                                               capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "shop"
    photos = out / "photos"
    photos.mkdir(parents=True)
    (photos / "a1.jpg").write_bytes(b"a photo")
    rc = main(["generate", "--catalog", str(_csv(tmp_path, ROWS)), "--out", str(out), "--preset", "tiny"])
    assert rc == 2 and "photos" in capsys.readouterr().err
    assert (photos / "a1.jpg").read_bytes() == b"a photo" and _nothing_left(out)


def test_generate_over_a_new_seed_replaces_derived_files(previous: Path, tmp_path: Path) -> None:
    # shards and propensities of the previous marketplace go with it (they are rebuilt from the new one); the
    # feature cache beside the folder stays
    out, _ = _copy(previous, tmp_path)
    (out / "clients" / "natural-2-a0.5-s0").mkdir(parents=True)
    (out / "clients" / "natural-2-a0.5-s0" / "DONE.json").write_text("{}")
    cache = tmp_path / ".feature-cache"
    cache.mkdir()
    assert main(["generate", "--catalog", str(_csv(tmp_path, ROWS)), "--out", str(out), "--preset", "tiny",
                 "--seed", "1"]) == 0
    assert not (out / "clients").exists() and cache.is_dir() and _nothing_left(out)
    assert json.loads((out / "meta.json").read_text())["counts"]["items"] == 3


# ------------------------------------------------------------------------------------------ generate, processes


def _rendering(out: Path) -> Callable[[], bool]:
    return lambda: any((s / "images").is_dir() for s in staging_leftovers(out))


@pytest.mark.parametrize("sig", [signal.SIGINT, pytest.param(signal.SIGTERM, marks=pytest.mark.slow)],
                         ids=["sigint", "sigterm"])
def test_interrupted_generate_exits_130_and_keeps_the_previous_folder(
        sig: int, previous: Path, tmp_path: Path) -> None:
    # Prepare
    out, before = _copy(previous, tmp_path)
    proc, err = start(tmp_path, "generate", "--preset", "small", "--seed", "1", "--out", str(out))
    _wait_for(_rendering(out), proc, err)  # mid-render: the pool's workers are busy
    # Execute + Assert
    _interrupted(proc, err, "generate", sig)
    assert snapshot(out) == before and _nothing_left(out)


@pytest.mark.slow
def test_killed_generate_keeps_the_previous_folder_and_the_next_run_clears_its_staging(
        previous: Path, tmp_path: Path) -> None:
    # Prepare
    out, before = _copy(previous, tmp_path)
    proc, err = start(tmp_path, "generate", "--preset", "small", "--seed", "1", "--out", str(out))
    _wait_for(_rendering(out), proc, err)
    # Execute: SIGKILL, then the next run
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=60)
    assert _group_gone(proc.pid), "the rendering workers outlived the killed command"
    assert snapshot(out) == before and staging_leftovers(out)
    res = fedrank(tmp_path, "generate", "--preset", "tiny", "--seed", "2", "--out", str(out))
    # Assert
    assert res.returncode == 0, res.stderr[-3000:]
    assert _nothing_left(out) and json.loads((out / "meta.json").read_text())["seed"] == 2


@pytest.mark.slow
def test_two_generate_processes_one_writes_the_other_exits_2(tmp_path: Path) -> None:
    # Prepare: the first writer is rendering
    out = tmp_path / "data"
    first, err = start(tmp_path, "generate", "--preset", "small", "--seed", "1", "--out", str(out))
    try:
        _wait_for(_rendering(out), first, err)
        # Execute
        second = fedrank(tmp_path, "generate", "--preset", "tiny", "--seed", "2", "--out", str(out))
        rc = first.wait(timeout=600)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(first.pid, signal.SIGKILL)
    # Assert: the second named the first; the folder is entirely the first's
    assert second.returncode == 2 and f"pid {first.pid}" in second.stderr, second.stderr[-2000:]
    assert rc == 0, err.read_text()[-3000:]
    meta = json.loads((out / "meta.json").read_text())
    assert meta["seed"] == 1 and meta["preset"] == "small"
    assert len(list((out / "images").iterdir())) == meta["counts"]["items"] and _nothing_left(out)


# ------------------------------------------------------------------------------------------ export, processes


@pytest.mark.slow
def test_export_killed_then_interrupted_leaves_the_previous_bundle_and_no_staging(tmp_path: Path) -> None:
    from shared_model.checkpoint import save_checkpoint
    from shared_model.config import ModelConfig
    from shared_model.head import build_head

    # Prepare: a checkpoint over the tiny data, and a previous bundle to overwrite
    ckpt = save_checkpoint(tmp_path / "head.pt", build_head(ModelConfig(), seed=0),
                           run_config={"data.dir": str(ROOT / "data" / "tiny")})
    out = tmp_path / "bundle"
    out.mkdir()
    (out / "manifest.json").write_text('{"from": "the previous export"}')
    before = snapshot(out)
    args = ("export", "--checkpoint", str(ckpt), "--out", str(out), "--overwrite", "--targets", "onnx",
            "--no-image-encoder", "--max-slates", "50")
    killed, err = start(tmp_path, *args, log_name="killed")
    _wait_for(lambda: bool(staging_leftovers(out)), killed, err)
    # Execute: SIGKILL; the next export clears the staging left behind; SIGINT it too
    os.killpg(killed.pid, signal.SIGKILL)
    killed.wait(timeout=60)
    stale = staging_leftovers(out)
    assert stale and snapshot(out) == before
    proc, err = start(tmp_path, *args, log_name="interrupted")
    _wait_for(lambda: any(f"-{proc.pid}-" in p.name for p in staging_leftovers(out)), proc, err)
    assert not any(p.exists() for p in stale), "the killed export's staging outlived the next start"
    _interrupted(proc, err, "export", signal.SIGINT)
    # Assert
    assert snapshot(out) == before and _nothing_left(out)


# ------------------------------------------------------------------------------------------ simulate, processes


def _tagged(tag: str) -> list[int]:
    from tests.test_sigkill_resume import _tagged as tagged

    return tagged(tag)


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["sigint", "sigterm"])
def test_interrupted_simulate_exits_130_stops_ray_and_resumes(sig: int, tmp_path: Path) -> None:
    # Prepare: a run that has written its first checkpoint
    out = tmp_path / "run"
    tag = uuid.uuid4().hex
    args = ("simulate", "--scenario", "smoke", "--rounds", "40", "--out", str(out), "--no-reference")
    proc, err = start(tmp_path, *args, FEDRANK_TEST_TAG=tag)
    try:
        _wait_for(lambda: (out / "checkpoints" / "round-001.pt").is_file(), proc, err, timeout=600)
        # a second run into the same folder fails at once, naming the first
        second = fedrank(tmp_path, *args)
        assert second.returncode == 2 and f"pid {proc.pid}" in second.stderr, second.stderr[-2000:]
        _wait_for(lambda: (out / "checkpoints" / "round-002.pt").is_file(), proc, err, timeout=600)
        # Execute
        _interrupted(proc, err, "simulate", sig, timeout=300)
    finally:
        for pid in _tagged(tag):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
    # Assert: Ray's processes are gone, the checkpoints are whole, the lock is released, and the run resumes
    assert not _tagged(tag), "processes of the interrupted run are still alive"
    assert not (out / "results.json").exists() and not lock_path(out).exists()
    assert not list(out.rglob("*.tmp")), "a half-written checkpoint was left"
    _, last = load_checkpoint(out / "last.pt")
    done = int(last["round"])
    assert 2 <= done < 40
    if sig == signal.SIGINT:  # one resume (one more round) is enough to show the run folder was left resumable
        res = fedrank(tmp_path, "simulate", "--resume", str(out), "--rounds", str(done + 1), "--no-reference",
                      timeout=900)
        assert res.returncode == 0, res.stderr[-3000:]
        results = json.loads((out / "results.json").read_text())
        assert [r["round"] for r in results["rounds"]] == list(range(1, done + 2))
