"""Stragglers: synchronous FedAvg with a timeout against asynchronous buffered aggregation (FedBuff), in
simulated device time (``server/simclock.py``), on the `stragglers` scenario: 100 non-IID devices, 30% of them
five times slower (5 s a job against 1 s).

- ``sync``: FedAvg, 30% sampled per round, the server waits 2 simulated seconds; the slow devices miss every round.
- ``fedbuff``: 30 devices at work at once, a server step every 10 arrived updates, staleness weight (1+s)^-0.5.
- ``sync-wait`` (``--with-wait``): FedAvg waiting for every device (5 s rounds whenever a slow one is sampled).

    python benchmarks/stragglers.py --out runs/stragglers                 # sync, then fedbuff
    python benchmarks/stragglers.py --out runs/stragglers --report        # tabulate finished runs only

Target: 95% of the final NDCG@10 of the synchronous run. Prints, per run, the simulated seconds to reach it (the
first evaluated step at or above it), final NDCG@10, simulated seconds in all and device jobs aggregated; writes
``stragglers.json`` and ``stragglers.png`` (NDCG@10 against simulated seconds).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

RUNS: dict[str, dict[str, Any]] = {
    "sync": {},
    "fedbuff": {"strategy.name": "fedbuff", "server.num-rounds": 75, "server.eval-every": 3},
    "sync-wait": {"faults.sim-timeout": 0.0},
}
TARGET = 0.95


def curve(results: dict[str, Any]) -> list[tuple[float, float]]:
    return [(r["sim_time"], r["central"]["ndcg@10"]) for r in results["rounds"] if "central" in r]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="runs/stragglers")
    ap.add_argument("--with-wait", action="store_true", help="also run synchronous FedAvg without a timeout")
    ap.add_argument("--report", action="store_true", help="run nothing: tabulate the finished runs in --out")
    args = ap.parse_args()
    out = Path(args.out)
    names = ["sync", "fedbuff"] + (["sync-wait"] if args.with_wait else [])
    if not args.report:
        from simulations.runner import simulate

        for name in names:
            print(f"running {name} ...", flush=True)
            simulate("stragglers", out=str(out / name), extra=RUNS[name], central=False, progress=False)
    found = {n: json.loads((out / n / "results.json").read_text()) for n in RUNS if (out / n / "results.json").is_file()}
    if "sync" not in found:
        raise SystemExit(f"{out / 'sync' / 'results.json'} not found: run without --report first")
    target = TARGET * found["sync"]["final"]["ndcg@10"]
    rows = []
    print(f"target: {TARGET:.0%} of the synchronous run's final NDCG@10 = {target:.4f}")
    print(f"{'run':<10} {'sim s to target':>16} {'final NDCG@10':>14} {'sim s in all':>13} {'jobs aggregated':>16}")
    for name, res in found.items():
        pts = curve(res)
        hit = next((t for t, v in pts if v >= target), None)
        jobs = sum(int(r.get("accepted", 0)) for r in res["rounds"])
        last = res["final"].get("ndcg@10", pts[-1][1] if pts else None)  # a run stopped between evaluations
        row = {"run": name, "sim_seconds_to_target": hit, "final_ndcg@10": last,
               "sim_seconds": res["rounds"][-1]["sim_time"], "jobs_aggregated": jobs, "curve": pts,
               "timeouts": sum(int(r.get("timeouts", 0)) for r in res["rounds"]),
               "staleness_mean": (sum(sum(r.get("staleness", [])) for r in res["rounds"]) / jobs
                                  if name == "fedbuff" and jobs else None)}
        rows.append(row)
        shown = f"{hit:.1f}" if hit is not None else "not reached"
        print(f"{name:<10} {shown:>16} {last if last is not None else float('nan'):>14.4f} "
              f"{row['sim_seconds']:>13.1f} {jobs:>16}")
    sync_pts = curve(found["sync"])
    for row in rows:  # the synchronous run's NDCG@10 at the same simulated second (last evaluated before it)
        if row["curve"]:
            t_end = row["curve"][-1][0]
            before = [v for t, v in sync_pts if t <= t_end]
            row["sync_ndcg_at_same_time"] = before[-1] if before else float("nan")
            print(f"{row['run']:<10} at {t_end:.1f} simulated s: NDCG@10 {row['curve'][-1][1]:.4f} "
                  f"(sync at the same time: {row['sync_ndcg_at_same_time']:.4f})")
    (out / "stragglers.json").write_text(json.dumps({"target": target, "runs": rows}, indent=2))
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for row in rows:
        ts, vs = zip(*row["curve"], strict=True) if row["curve"] else ((), ())
        ax.plot(ts, vs, marker=".", label=row["run"])
    ax.axhline(target, ls="--", c="grey", lw=0.8, label=f"target ({TARGET:.0%} of sync final)")
    ax.set_xlabel("simulated seconds")
    ax.set_ylabel("NDCG@10 (held-out sessions)")
    ax.set_title("30% of devices 5x slower: synchronous (2 s timeout) vs buffered")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "stragglers.png", dpi=120)
    print(f"wrote {out / 'stragglers.json'} and {out / 'stragglers.png'}")


if __name__ == "__main__":
    main()
