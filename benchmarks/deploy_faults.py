"""Faults in deployment mode: real Flower processes (``fedrank deploy up`` + ``fedrank deploy run``) with faults
injected from outside, by PID, while the run goes on.

Cases (each on its own fresh deployment: state folder, SuperLink database, free ports):

- ``uninterrupted``: the reference run;
- ``superlink``: SIGKILL of the SuperLink a few seconds into round ``--kill-after + 1``; the supervisor restarts it
  and resubmits the run, which resumes after the last checkpointed round;
- ``churn``: SIGKILL of two SuperNodes at random times (one after round 1, one after round 3); the round in
  progress goes on without them and the supervisor restarts them once the SuperLink reports them offline;
- ``soak``: ``--soak-rounds`` rounds with a SuperNode leaving every few rounds (SIGTERM and SIGKILL in turn) and
  joining again; the resident memory of the whole process tree (SuperLink, SuperExec, ServerApp, SuperNodes, their
  SuperExecs and ClientApps) is sampled every ``--sample-every`` seconds.

Prints a table and writes ``OUT/deploy_faults.json``::

    python benchmarks/deploy_faults.py --out runs/deploy-faults            # all four cases
    python benchmarks/deploy_faults.py --cases uninterrupted,superlink --rounds 4
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from deploy.flwr_cli import base_env  # noqa: E402
from deploy.processes import descendants, pid_alive, process_trees, rss_mb, stop_processes  # noqa: E402
from deploy.state import STATE_FILE  # noqa: E402

BIN = Path(sys.executable).parent
CASES = ("uninterrupted", "superlink", "churn", "soak")


def _fedrank(args: list[str], env: dict[str, str], timeout: float) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(BIN / "fedrank"), *args], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=timeout, check=False)


def _records(state: Path) -> list[dict[str, Any]]:
    try:
        return list(json.loads((state / STATE_FILE).read_text())["processes"])
    except (OSError, ValueError, KeyError):
        return []


def _pid(state: Path, role: str) -> int | None:
    rec = next((p for p in _records(state) if p["role"] == role), None)
    return int(rec["pid"]) if rec and pid_alive(int(rec["pid"]), rec.get("ticks")) else None


APPS = (str(BIN / "flwr-clientapp"), str(BIN / "flwr-serverapp"))


def _cmdline(pid: int) -> str:
    """The process's command line with the interpreter left out (``.../flwr-clientapp --runtime-api ...``)."""
    try:
        args = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return ""
    parts = [a.decode(errors="replace") for a in args if a]
    return " ".join(parts[1:] if parts and "python" in Path(parts[0]).name else parts)


def completed_rounds(run_out: Path) -> int:
    rounds = [int(p.stem[6:]) for p in (run_out / "checkpoints").glob("round-*.pt") if p.stem[6:].isdigit()]
    return max(rounds, default=0)


class MemorySampler(threading.Thread):
    """RSS of every process of the deployment (each recorded process with its descendants) and of the
    supervisor, every ``every`` seconds."""

    def __init__(self, state: Path, run_out: Path, supervisor: int, every: float) -> None:
        super().__init__(daemon=True)
        self.state, self.run_out, self.supervisor, self.every = state, run_out, supervisor, every
        self.samples: list[dict[str, float]] = []
        self.stop = threading.Event()
        self.t0 = time.monotonic()

    def sample(self) -> dict[str, float]:
        live = {int(p["pid"]): str(p["role"]) for p in _records(self.state)
                if pid_alive(int(p["pid"]), p.get("ticks"))}
        trees = process_trees([*live, self.supervisor])
        groups: dict[str, set[int]] = {"superlink": set(), "supernodes": set()}
        for pid, role in live.items():
            groups["superlink" if role == "superlink" else "supernodes"] |= {pid, *(d for d, _ in trees[pid])}
        sup = {self.supervisor, *(d for d, _ in trees[self.supervisor])} - groups["superlink"] - groups["supernodes"]
        every = groups["superlink"] | groups["supernodes"]
        # the long-lived processes (SuperLink, SuperExecs, SuperNodes), without the ServerApp and the ClientApps
        # that come and go with the run and its messages
        daemons = {p for p in every if not _cmdline(p).startswith(APPS)}
        return {"t": round(time.monotonic() - self.t0, 1), "round": completed_rounds(self.run_out),
                "superlink_mb": rss_mb(groups["superlink"]), "supernodes_mb": rss_mb(groups["supernodes"]),
                "deployment_mb": rss_mb(every), "daemons_mb": rss_mb(daemons), "supervisor_mb": rss_mb(sup),
                "processes": len(every)}

    def run(self) -> None:
        with open(self.state.parent / "memory.jsonl", "a") as f:  # also on disk, as it goes
            while not self.stop.is_set():
                self.samples.append(self.sample())
                f.write(json.dumps(self.samples[-1]) + "\n")
                f.flush()
                self.stop.wait(self.every)


def fault_plan(case: str, rounds: int, nodes: int, kill_after: int, rng: random.Random) -> list[dict[str, Any]]:
    """When (after which completed round, plus a delay) to signal which process."""
    if case == "superlink":
        return [{"after": kill_after, "delay": rng.uniform(3, 8), "role": "superlink", "sig": "SIGKILL"}]
    if case == "churn":
        picks = rng.sample(range(nodes), k=min(2, nodes))
        return [{"after": a, "delay": rng.uniform(2, 10), "role": f"supernode-{i}", "sig": "SIGKILL"}
                for a, i in zip((1, 3), picks, strict=False) if a < rounds]
    if case == "soak":
        plan, sig = [], "SIGTERM"
        for after in range(2, rounds - 3, 3):
            plan.append({"after": after, "delay": rng.uniform(1, 8), "role": f"supernode-{rng.randrange(nodes)}",
                         "sig": sig})
            sig = "SIGKILL" if sig == "SIGTERM" else "SIGTERM"
        return plan
    return []


def run_case(case: str, args: argparse.Namespace) -> dict[str, Any]:
    base = Path(args.out).resolve() / case
    shutil.rmtree(base, ignore_errors=True)
    state, run_out = base / "state", base / "run"
    env = base_env(base / "flwr-home")
    rounds = args.soak_rounds if case == "soak" else args.rounds
    sets = [f"server.round-timeout={args.round_timeout}", "strategy.fraction-evaluate=0.0",
            f"server.eval-every={args.soak_eval_every if case == 'soak' else 1}", *args.set]
    up = ["deploy", "up", "--state", str(state), "--name", f"faults-{case}", "--scenario", args.scenario,
          "--nodes", str(args.nodes), "--rounds", str(rounds), "--port", "0", "--out", str(run_out),
          *[x for s in sets for x in ("--set", s)]]
    t_up = time.perf_counter()
    proc = _fedrank(up, env, timeout=600)
    if proc.returncode != 0:
        raise SystemExit(f"{case}: deploy up failed:\n{proc.stdout[-2000:]}{proc.stderr[-2000:]}")
    up_s = time.perf_counter() - t_up
    rng = random.Random(f"{args.seed}-{case}")
    plan = fault_plan(case, rounds, args.nodes, args.kill_after, rng)
    injected: list[dict[str, Any]] = []
    log = open(base / "supervisor.log", "wb")  # noqa: SIM115 -- closed below
    sup = subprocess.Popen([str(BIN / "fedrank"), "deploy", "run", "--state", str(state), "--status-every", "5",
                            "--limit", str(args.limit)], cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    sampler = MemorySampler(state, run_out, sup.pid, args.sample_every)
    sampler.start()
    try:
        pending = list(plan)
        while sup.poll() is None:
            done = completed_rounds(run_out)
            for f in [f for f in pending if done >= f["after"]]:
                f.setdefault("due", time.monotonic() + f["delay"])
                if time.monotonic() >= f["due"]:
                    pending.remove(f)
                    pid = _pid(state, f["role"])
                    if pid is not None:
                        os.kill(pid, getattr(signal, f["sig"]))
                        injected.append({"t": round(time.monotonic() - sampler.t0, 1), "after_round": done,
                                         "role": f["role"], "signal": f["sig"], "pid": pid})
                        print(f"  [{case}] {f['sig']} {f['role']} (pid {pid}) after round {done}", flush=True)
            time.sleep(0.5)
    finally:
        if sup.poll() is None:  # stop the supervisor first, or it would restart what `deploy down` stops
            sup.terminate()
            sup.wait(timeout=30)
        sampler.stop.set()
        sampler.join(timeout=10)
        log.close()
        leftover = [int(p["pid"]) for p in _records(state)]
        leftover += [d for p in leftover for d in descendants(p)]
        _fedrank(["deploy", "down", "--state", str(state), "--grace", "5"], env, timeout=180)
        stop_processes([(p, None) for p in leftover if pid_alive(p)], grace=2.0)
    report_file = run_out / "deploy-run.json"
    if sup.returncode != 0 or not report_file.is_file():
        raise SystemExit(f"{case}: fedrank deploy run failed (exit {sup.returncode}); see {base / 'supervisor.log'}")
    rep = json.loads(report_file.read_text())
    samples = sampler.samples
    return {
        "case": case, "rounds": rounds, "rounds_completed": rep["rounds_completed"], "rounds_lost": rep["rounds_lost"],
        "rounds_repeated": rep["rounds_repeated"], "final_ndcg@10": rep["final"].get("ndcg@10"),
        "wall_s": rep["wall_s"], "up_s": round(up_s, 1), "resubmissions": rep["resubmissions"],
        "superlink_restarts": rep["superlink_restarts"], "supernode_restarts": rep["supernode_restarts"],
        "faults": injected, "events": rep["events"],
        "memory": memory_summary(samples, rounds), "samples": samples,
    }


def memory_summary(samples: list[dict[str, Any]], rounds: int) -> dict[str, Any]:
    """Median RSS over the samples of the first rounds (after round 1: warm) and of the last rounds."""
    import statistics

    k = max(1, rounds // 5)
    first = [s for s in samples if 1 <= s["round"] <= k] or samples[:5]
    last = [s for s in samples if s["round"] >= rounds - k] or samples[-5:]
    keys = ("superlink_mb", "supernodes_mb", "deployment_mb", "daemons_mb", "supervisor_mb", "processes")
    return {
        "start": {key: statistics.median(s[key] for s in first) for key in keys} if first else {},
        "end": {key: statistics.median(s[key] for s in last) for key in keys} if last else {},
        "start_rounds": [1, k], "end_rounds": [rounds - k, rounds],
        "max_deployment_mb": max((s["deployment_mb"] for s in samples), default=0.0),
    }


def print_table(results: list[dict[str, Any]]) -> None:
    print(f"\n{'case':<14}{'rounds':>8}{'lost':>6}{'ndcg@10':>9}{'wall s':>8}{'resub':>6}{'SL rst':>7}"
          f"{'SN rst':>7}  RSS MiB start (daemons)  end (daemons)")
    for r in results:
        m = r["memory"]
        print(f"{r['case']:<14}{r['rounds_completed']:>5}/{r['rounds']:<2}{len(r['rounds_lost']):>6}"
              f"{r['final_ndcg@10']:>9.4f}{r['wall_s']:>8.0f}{r['resubmissions']:>6}{r['superlink_restarts']:>7}"
              f"{r['supernode_restarts']:>7}{m['start'].get('deployment_mb', 0):>8.0f} ({m['start'].get('daemons_mb', 0):.0f})"
              f"{m['end'].get('deployment_mb', 0):>7.0f} ({m['end'].get('daemons_mb', 0):.0f})")


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="runs/deploy-faults")
    p.add_argument("--cases", default=",".join(CASES), help=f"comma-separated subset of {', '.join(CASES)}")
    p.add_argument("--scenario", default="smoke", help="data and run config (smoke: the tiny marketplace)")
    p.add_argument("--nodes", type=int, default=3)
    p.add_argument("--rounds", type=int, default=5, help="rounds of the uninterrupted, superlink and churn runs")
    p.add_argument("--soak-rounds", type=int, default=40)
    p.add_argument("--soak-eval-every", type=int, default=10, help="central evaluation every N soak rounds")
    p.add_argument("--kill-after", type=int, default=2, help="SuperLink killed a few seconds after this round")
    p.add_argument("--round-timeout", type=float, default=120.0)
    p.add_argument("--sample-every", type=float, default=3.0)
    p.add_argument("--limit", type=float, default=3600.0, help="seconds per run before `deploy run` gives up")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    args = p.parse_args(argv)
    cases = [c.strip() for c in args.cases.split(",") if c.strip()]
    bad = [c for c in cases if c not in CASES]
    if bad:
        p.error(f"--cases: unknown {bad}; choose from {CASES}")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results = []
    for case in cases:
        print(f"== {case}", flush=True)
        results.append(run_case(case, args))
        (out / "deploy_faults.json").write_text(json.dumps({"args": vars(args), "results": results}, indent=2))
    print_table(results)
    print(f"\nwritten {out / 'deploy_faults.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
