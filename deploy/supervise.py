"""``fedrank deploy run``: submit the federation to a running deployment and see it through process faults.

What Flower 1.41 does on its own (measured, see the README): a SuperLink killed mid-run takes its SuperExec with it
(SuperExec watches its parent's PID) and the run's ServerApp follows a few seconds later; the SuperNodes keep
retrying and reconnect to a restarted SuperLink under their old node ids. The restarted SuperLink finds the run in
its database as ``running``, never relaunches it, and marks it ``finished:failed`` ("No heartbeat received from the
task") about a minute later. A SuperNode that dies mid-round leaves its message unanswered until its heartbeat
expires (2 x 30 s); the SuperLink then answers it with a NODE_UNAVAILABLE error, which the round loop counts as a
failed client and aggregates the others; the SuperNode cannot sign in again before that expiry.

So the supervisor, polling once a second:

- restarts a dead SuperLink with its recorded command (same port, TLS files and ``--database``), after stopping
  what is left of its old process tree (SuperExec, ServerApp), then stops the orphaned run and submits it again:
  with ``server.resume`` the new ServerApp starts after the last round whose checkpoint was written
  (``server/loop.py`` writes one atomically after every round), so no completed round is lost or counted twice;
- restarts a dead SuperNode with its recorded command once the SuperLink reports it offline (plus a few seconds,
  so that the ServerApp, which polls every 3 s, has collected the error reply of the round in progress);
- resubmits a run that finished as failed or stopped for any other reason (at most ``max_resubmits`` times);
- stops once the run is ``finished:completed`` and writes ``deploy-run.json`` beside ``results.json``.

On a ``fedrank deploy server`` deployment the SuperNodes run on other hosts: the supervisor cannot restart them
(each device's own ``fedrank deploy node`` keeps retrying through network outages and rejoins under its node id).
It submits the run once every registered SuperNode is online, or after ``node_wait`` seconds with those that are,
because the ServerApp asks the nodes online at its start for their partition ids.
"""

from __future__ import annotations

import json
import logging
import subprocess
import time
import tomllib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from deploy.errors import DeployError, DeployInputError
from deploy.flwr_cli import online_nodes, run_status, stop_run, submit_run
from deploy.launch import respawn, restart_superlink
from deploy.processes import pid_alive, process_trees, stop_processes
from deploy.state import STATE_FILE, Deployment, Layout, locked, read_deployment

log = logging.getLogger(__name__)

RUN_REPORT = "deploy-run.json"
NODE_CHECK_EVERY = 5.0  # s between `flwr supernode ls` calls while a SuperNode is down


@dataclass
class RunOptions:
    state: Path = Path("runs/deploy")
    max_resubmits: int = 5        # runs submitted again after the first (SuperLink restarts included)
    poll: float = 1.0             # s between process checks
    status_every: float = 10.0    # s between `flwr ls` checks of the run's status
    node_grace: float = 5.0       # s after the SuperLink reports a dead SuperNode offline before restarting it
    timeout: float = 180.0        # s for a restarted SuperLink to listen
    limit: float | None = None    # s for the whole run (None: no limit)
    app_dir: Path | None = None   # the Flower app to run (default: the repository root)
    node_wait: float = 300.0      # s to wait for remote SuperNodes (`deploy server`) before submitting


def _repo_root() -> Path:
    from shared_model.config import REPO_ROOT

    return REPO_ROOT


def run_settings(dep: Deployment) -> dict[str, Any]:
    """The deployment's resolved run config (pyproject defaults under ``run-config.toml``)."""
    from shared_model.config import load_defaults

    path = Path(dep.run_config_file)
    try:
        overrides = tomllib.loads(path.read_text())
    except (OSError, tomllib.TOMLDecodeError) as e:
        raise DeployInputError(f"{path}: unreadable run config ({e}); run `fedrank deploy up` again") from e
    return {**load_defaults(), **overrides}


class Supervisor:
    """One run on the deployment in ``opts.state``, seen through SuperLink and SuperNode faults."""

    def __init__(self, opts: RunOptions, on_event: Callable[[dict[str, Any]], None] | None = None) -> None:
        self.opts = opts
        self.layout = Layout(opts.state.resolve())
        dep = read_deployment(self.layout)
        if dep is None:
            raise DeployInputError(f"{self.layout.root}: no deployment here (no {STATE_FILE}); start one with "
                                   "`fedrank deploy up`")
        self.dep = dep
        self.config = run_settings(dep)
        if not self.config.get("server.resume", True):
            raise DeployInputError(f"{dep.run_config_file}: server.resume = false; `deploy run` resubmits a run "
                                   "that died and needs it to resume from its last checkpoint")
        self.out = Path(str(self.config["server.out-dir"]))
        self.num_rounds = int(self.config["server.num-rounds"])
        self.flwr_home = Path(dep.flwr_home)
        self.on_event = on_event
        self.events: list[dict[str, Any]] = []
        self.run_ids: list[int] = []
        self.trees: dict[str, list[tuple[int, int | None]]] = {}
        self.popen: dict[str, subprocess.Popen[bytes]] = {}
        self.down_since: dict[str, float] = {}
        self.offline_at: dict[str, float] = {}
        self.next_check: dict[str, float] = {}
        self.t0 = time.monotonic()

    # ------------------------------------------------------------------------------------------ bookkeeping
    def _event(self, kind: str, **detail: Any) -> None:
        rec = {"t": round(time.monotonic() - self.t0, 1), "event": kind, **detail}
        self.events.append(rec)
        log.debug("%s %s", kind, detail)
        if self.on_event is not None:
            self.on_event(rec)

    def _record(self, role: str) -> dict[str, Any] | None:
        return next((p for p in self.dep.processes if p["role"] == role), None)

    def _alive(self, role: str) -> bool:
        if role in self.popen:
            self.popen[role].poll()  # reap a child that exited (a zombie counts as gone anyway)
        rec = self._record(role)
        return rec is not None and pid_alive(int(rec["pid"]), rec.get("ticks"))

    def _refresh_trees(self) -> None:
        """Remember every live process's descendants: after it dies, its orphans can still be found."""
        live = {int(r["pid"]): str(r["role"]) for r in self.dep.processes if self._alive(r["role"])}
        for pid, tree in process_trees(live).items():
            self.trees[live[pid]] = tree

    def _stop_leftovers(self, role: str) -> None:
        left = [(p, t) for p, t in self.trees.pop(role, []) if pid_alive(p, t)]
        if left:
            stop_processes(left, grace=3.0)
            self._event("leftovers-stopped", role=role, pids=[p for p, _ in left])

    def _check_not_stopped(self) -> None:
        """`fedrank deploy down` marks every record stopped: then there is nothing left to supervise."""
        now = read_deployment(self.layout)
        if now is not None and now.processes and all("stopped" in p for p in now.processes):
            raise DeployError(f"{self.layout.root}: the deployment was stopped (`fedrank deploy down`) during the run")

    def completed_rounds(self) -> int:
        """The last round whose checkpoint was written (0: none)."""
        rounds = [int(p.stem.split("-")[1]) for p in (self.out / "checkpoints").glob("round-*.pt")
                  if p.stem.split("-")[1].isdigit()]
        return max(rounds, default=0)

    # -------------------------------------------------------------------------------------------- actions
    def _submit(self, reason: str) -> int:
        run_id = submit_run(self.flwr_home, self.dep.name, self.opts.app_dir or _repo_root(),
                            Path(self.dep.run_config_file))
        self.run_ids.append(run_id)
        self._event("submitted", run_id=run_id, reason=reason, after_round=self.completed_rounds())
        return run_id

    def _resubmit(self, run_id: int, reason: str) -> int:
        if len(self.run_ids) > self.opts.max_resubmits:
            raise DeployError(f"run {run_id} ended ({reason}) after {len(self.run_ids) - 1} resubmissions "
                              f"(--max-resubmits {self.opts.max_resubmits}); logs in {self.layout.logs}")
        if stop_run(self.flwr_home, self.dep.name, run_id):
            self._event("run-stopped", run_id=run_id)
        return self._submit(reason)

    def _restart_superlink(self) -> None:
        self._event("superlink-died", pid=(self._record("superlink") or {}).get("pid"))
        self._stop_leftovers("superlink")  # its SuperExec and the run's ServerApp, if still there
        t = time.monotonic()
        with locked(self.layout):  # fails while `deploy down` (or `up`) works on the folder: then we stop too
            self._check_not_stopped()
            self.popen["superlink"] = restart_superlink(self.dep, self.layout, self.opts.timeout)
        self._event("superlink-restarted", pid=self.popen["superlink"].pid, seconds=round(time.monotonic() - t, 1))

    def _wait_for_remote_nodes(self) -> None:
        """Until every registered remote SuperNode is online (after ``node_wait`` s: with those that are)."""
        remote = {str(n["node_id"]): str(n.get("name", n["node_id"])) for n in self.dep.nodes if n.get("remote")}
        if not remote:
            return
        deadline = time.monotonic() + self.opts.node_wait
        announced = False
        while True:
            try:
                online = online_nodes(self.flwr_home, self.dep.name) & set(remote)
            except DeployError:
                online = set()  # the SuperLink does not answer (yet)
            if online == set(remote):
                self._event("nodes-online", nodes=len(online))
                return
            missing = sorted(remote[k] for k in set(remote) - online)
            if time.monotonic() >= deadline:
                if not online:
                    raise DeployError(f"none of the {len(remote)} registered SuperNodes came online within "
                                      f"{self.opts.node_wait:.0f} s ({', '.join(missing)}): start each one on its "
                                      "device with `fedrank deploy node`; the SuperLink's log is "
                                      f"{self.layout.logs / 'superlink.log'}")
                self._event("nodes-missing", online=len(online), missing=missing)
                return
            if not announced:
                self._event("waiting-for-nodes", online=len(online), missing=missing)
                announced = True
            time.sleep(2.0)

    def _tend_supernodes(self) -> None:
        for node in self.dep.nodes:
            if node.get("remote"):
                continue  # runs on its own device: not ours to restart
            role = f"supernode-{node['index']}"
            now = time.monotonic()
            if self._alive(role):
                self.down_since.pop(role, None)
                continue
            if role not in self.down_since:
                self.down_since[role] = now
                self.offline_at.pop(role, None)
                self.next_check[role] = now
                self._event("supernode-died", node=node["index"])
                self._stop_leftovers(role)
            if role not in self.offline_at:
                if now < self.next_check[role]:
                    continue
                self.next_check[role] = now + NODE_CHECK_EVERY
                try:
                    if str(node["node_id"]) in online_nodes(self.flwr_home, self.dep.name):
                        continue  # until its heartbeat expires (the SuperLink would refuse to activate it)
                except DeployError:
                    continue  # the SuperLink does not answer: it is being restarted
                self.offline_at[role] = now
            if now - self.offline_at[role] < self.opts.node_grace:
                continue
            with locked(self.layout):
                self._check_not_stopped()
                self.popen[role] = respawn(self.dep, self.layout, role)
            self._event("supernode-restarted", node=node["index"], pid=self.popen[role].pid,
                        down_s=round(now - self.down_since.pop(role), 1))

    # ----------------------------------------------------------------------------------------------- loop
    def run(self) -> dict[str, Any]:
        """Submit the run and supervise it until it completes; returns (and writes) the run report."""
        self.t0 = time.monotonic()
        started = time.time()
        self._refresh_trees()
        if not self._alive("superlink"):
            self._restart_superlink()
        self._wait_for_remote_nodes()
        run_id = self._submit("start")
        next_status = time.monotonic() + self.opts.status_every
        while True:
            if self.opts.limit is not None and time.monotonic() - self.t0 > self.opts.limit:
                raise DeployError(f"run {run_id} did not finish within {self.opts.limit:.0f} s "
                                  f"(round {self.completed_rounds()} of {self.num_rounds} done)")
            self._check_not_stopped()
            self._refresh_trees()
            if not self._alive("superlink"):
                self._restart_superlink()
                # the run's ServerApp died with the SuperLink's SuperExec, and a restarted SuperLink never
                # relaunches it: stop the orphaned run and submit it again (it resumes from its checkpoint)
                run_id = self._resubmit(run_id, "superlink restarted")
                next_status = time.monotonic() + self.opts.status_every
                continue
            self._tend_supernodes()
            if time.monotonic() >= next_status:
                status = run_status(self.flwr_home, self.dep.name, run_id)
                next_status = time.monotonic() + self.opts.status_every
                if status == "finished:completed":
                    self._event("completed", run_id=run_id)
                    break
                if status.startswith("finished"):
                    self._event("run-ended", run_id=run_id, status=status)
                    run_id = self._resubmit(run_id, status)
            time.sleep(self.opts.poll)
        for p in self.popen.values():
            p.poll()
        return self._report(started)

    def _report(self, started: float) -> dict[str, Any]:
        res_file = self.out / "results.json"
        for _ in range(60):  # written by the ServerApp just before its run ends
            if res_file.is_file() and res_file.stat().st_mtime >= started:
                break
            time.sleep(1.0)
        else:
            raise DeployError(f"{res_file}: not written by run {self.run_ids[-1]}")
        res = json.loads(res_file.read_text())
        rounds = [int(r["round"]) for r in res["rounds"]]
        report = {
            "state": str(self.layout.root), "out_dir": str(self.out), "run_ids": self.run_ids,
            "num_rounds": self.num_rounds, "rounds_completed": len(set(rounds)),
            "rounds_lost": sorted(set(range(1, self.num_rounds + 1)) - set(rounds)),
            "rounds_repeated": sorted({r for r in rounds if rounds.count(r) > 1}),
            "resubmissions": len(self.run_ids) - 1,
            "superlink_restarts": sum(e["event"] == "superlink-restarted" for e in self.events),
            "supernode_restarts": sum(e["event"] == "supernode-restarted" for e in self.events),
            "final": res.get("final", {}), "wall_s": round(time.monotonic() - self.t0, 1),
            "events": self.events,
        }
        tmp = self.out / f".{RUN_REPORT}.tmp"
        tmp.write_text(json.dumps(report, indent=2, default=float))
        tmp.replace(self.out / RUN_REPORT)
        return report


def supervise(opts: RunOptions, on_event: Callable[[dict[str, Any]], None] | None = None) -> dict[str, Any]:
    """Submit the deployment's run and see it through (see the module docstring); the run report."""
    return Supervisor(opts, on_event).run()
