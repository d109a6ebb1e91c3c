"""Fleet scale: seconds per round (on-device training vs framework overhead) and memory at 1,000 to 10,000 devices.

    OMP_NUM_THREADS=1 nice python benchmarks/fleet_scale.py --out runs/fleet_scale \
        [--devices 1000 3000 10000] [--rounds 20] [--small-rounds 5] [--per-round 100] [--calibrate 200]

Every run is the ``fleet10k`` scenario (the ``fleet10k`` marketplace: 10,000 shoppers; natural partition, one
shopper per device, ``--per-round`` devices sampled per round), with ``partition.num-clients`` set to each fleet
size (the natural partitioner draws that many of the 10,000 shoppers) and training rounds only: no federated and
no central evaluation inside the rounds (``server.eval-every = 0``; the server's evaluation of all 29,924
held-out sessions takes about 50 s on one core, far more than a round). The largest fleet runs ``--rounds``
rounds, the others ``--small-rounds``. Each fleet runs in its own process (``--one N``), so that its peak memory
(that process and all its descendants: Ray's workers and services, sampled every 0.5 s by
:class:`simulations.memory.PeakTreeMemory`) is its own.

A round's wall seconds (``results.json``: ``rounds[i].seconds``) are split into
    training   the devices' local training: each device times ``local_train`` and replies ``train-seconds``;
               Flower's FedAvg averages it weighted by ``num-examples``, so a round's total is estimated as
               accepted devices x that mean, divided by the parallelism available (one ClientApp actor per core);
               ``--calibrate K`` devices trained in the benchmark's process give the unweighted mean beside the
               weighted one, to show how far that estimate can be off
    overhead   the rest: Flower's message passing and Ray, loading each device's shard and building its slates,
               screening, aggregation, checkpoints.
NDCG@10 per round of the largest fleet comes afterwards from each round's checkpoint, on a fixed random
``--eval-sample`` share of the held-out sessions (the last round also on all of them, timed).
Writes ``OUT/fleet_scale.json`` and ``OUT/fleet_scale.png``, and prints the table.
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from shared_model.schema import atomic_write  # noqa: E402

log = logging.getLogger("fleet_scale")
SCENARIO = "fleet10k"


def run_one(devices: int, rounds: int, per_round: int, out: Path, calibrate: int, ndcg_rounds: bool,
            eval_sample: float) -> dict[str, Any]:
    """One fleet size in this process: the simulation (training rounds only), then the calibration and, with
    ``ndcg_rounds``, NDCG@10 of every round's checkpointed head."""
    import numpy as np
    import torch

    from client.local import local_train
    from server.loop import LAST
    from shared_model.checkpoint import load_checkpoint
    from shared_model.config import parse_run_config
    from shared_model.records import TRAIN_SECONDS
    from shared_model.shards import ensure_shards, load_shard
    from shared_model.training import evaluate_model
    from simulations.runner import ensure_data, scenario_config, simulate_config

    run_dir = out / f"devices-{devices}"
    shutil.rmtree(run_dir, ignore_errors=True)  # a fresh run, never a resume
    flat = scenario_config(SCENARIO, rounds=rounds, out=str(run_dir), extra={
        "partition.num-clients": devices, "strategy.min-train-clients": per_round,
        "strategy.fraction-train": per_round / devices, "strategy.fraction-evaluate": 0.0,
        "server.eval-every": 0, "server.resume": False})
    settings = parse_run_config(flat)
    prep = ensure_data(settings, progress=False)  # outside the timed run: generation is not a round's cost
    t0 = time.perf_counter()
    shard_paths = ensure_shards(prep, settings, layout="packed")
    shards_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    results = simulate_config(flat, SCENARIO, central=False, progress=False)
    wall = time.perf_counter() - t0
    cores = os.cpu_count() or 1
    torch.set_num_threads(1)

    # calibration: devices trained here, one thread, as an actor trains them
    model, _ = load_checkpoint(run_dir / LAST)
    rng = np.random.default_rng(0)
    pick = rng.choice(len(shard_paths), size=min(calibrate, len(shard_paths)), replace=False)
    times, weights, loads = [], [], []
    for pid in pick:
        t0 = time.perf_counter()
        data = load_shard(shard_paths[int(pid)])
        loads.append(time.perf_counter() - t0)
        trained = copy.deepcopy(model)
        t0 = time.perf_counter()
        local_train(trained, data, settings.train, eta=float(prep.eta), seed=int(pid))
        times.append(time.perf_counter() - t0)
        weights.append(len(data.train))
    calib = {"devices": len(pick), "train_mean_s": float(np.mean(times)) if times else 0.0,
             "train_weighted_mean_s": float(np.average(times, weights=weights)) if sum(weights) else 0.0,
             "load_shard_median_s": float(np.median(loads)) if loads else 0.0}

    # NDCG@10 of each round's head: on a fixed sample of the held-out sessions, and the last round on all of them
    ndcg: dict[int, float] = {}
    final: dict[str, float] = {}
    central_s = 0.0
    if ndcg_rounds:
        test, table = prep.slates("test"), prep.table()
        n_test = len(test)
        sample = np.sort(np.random.default_rng(1).choice(n_test, size=max(1, int(eval_sample * n_test)),
                                                         replace=False))
        sub = test.select(sample)
        for r in results["rounds"]:
            head, _ = load_checkpoint(run_dir / "checkpoints" / f"round-{r['round']:03d}.pt")
            ndcg[r["round"]] = float(evaluate_model(head, sub, table)["ndcg@10"])
        t0 = time.perf_counter()
        final = evaluate_model(model, test, table)
        central_s = time.perf_counter() - t0

    rows = []
    for r in results["rounds"]:
        mean_t = float(r.get("train", {}).get(TRAIN_SECONDS, 0.0))
        train_total = mean_t * r["accepted"]
        training = train_total / cores
        rows.append({"round": r["round"], "seconds": r["seconds"], "accepted": r["accepted"],
                     "train_seconds_mean": mean_t, "train_seconds_total": train_total, "training_s": training,
                     "overhead_s": max(0.0, r["seconds"] - training), "ndcg@10": ndcg.get(r["round"])})
    secs = [p["seconds"] for p in rows]
    return {"devices": devices, "rounds": len(rows), "cores": cores, "per_round": rows,
            "seconds_per_round": {"min": min(secs), "median": statistics.median(secs), "max": max(secs)},
            "training_share": sum(p["training_s"] for p in rows) / sum(secs),
            "overhead_share": sum(p["overhead_s"] for p in rows) / sum(secs),
            "ndcg_eval_sample": eval_sample if ndcg_rounds else None,
            "final_all_heldout": {k: float(v) for k, v in final.items()},
            "central_eval_s": central_s, "shards_s": shards_s, "wall_s": wall,
            "setup_s": wall - sum(secs),  # Ray start, prepare, the partition-id query to every node, shutdown
            "peak_tree_gib": results["peak_tree_rss_mb"] / 1024, "calibration": calib,
            "bytes_per_round": statistics.median(r["bytes_sent"] + r["bytes_received"] for r in results["rounds"])}


def table(rows: list[dict[str, Any]]) -> str:
    head = (f"{'devices':>8} {'rounds':>6} {'s/round min/med/max':>22} {'training':>9} "
            f"{'overhead':>9} {'setup s':>8} {'peak GiB':>9}")
    lines = [head, "-" * len(head)]
    for r in rows:
        s = r["seconds_per_round"]
        lines.append(f"{r['devices']:>8} {r['rounds']:>6} {s['min']:>6.1f}/{s['median']:>6.1f}/{s['max']:>6.1f}   "
                     f"{r['training_share']:>8.0%} {r['overhead_share']:>9.0%} "
                     f"{r['setup_s']:>8.0f} {r['peak_tree_gib']:>9.2f}")
    return "\n".join(lines)


def plot(rows: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2, ax3) = plt.subplots(1, 3, figsize=(15, 4.2))
    labels = [f"{r['devices']:,}" for r in rows]
    med = {k: [statistics.median(p[k] for p in r["per_round"]) for r in rows]
           for k in ("training_s", "overhead_s")}
    bottom = [0.0] * len(rows)
    for key, name in (("training_s", "on-device training / cores"), ("overhead_s", "framework overhead")):
        ax1.bar(labels, med[key], bottom=bottom, label=name)
        bottom = [b + v for b, v in zip(bottom, med[key], strict=True)]
    lo = [r["seconds_per_round"]["median"] - r["seconds_per_round"]["min"] for r in rows]
    hi = [r["seconds_per_round"]["max"] - r["seconds_per_round"]["median"] for r in rows]
    ax1.errorbar(labels, [r["seconds_per_round"]["median"] for r in rows], yerr=[lo, hi], fmt="k.", capsize=4,
                 label="round wall s (median, min-max)")
    ax1.set_xlabel("devices (100 sampled per round)")
    ax1.set_ylabel("seconds per round (medians)")
    ax1.legend(fontsize=8, loc="upper left")
    ax2.bar(labels, [r["peak_tree_gib"] for r in rows], color="tab:purple")
    ax2.axhline(8.0, color="r", linestyle="--", label="8 GiB budget")
    ax2.set_ylabel("peak memory of the process tree (GiB)")
    ax2.set_xlabel("devices")
    ax2.legend(fontsize=8)
    big = rows[-1]
    pts = [(p["round"], p["ndcg@10"]) for p in big["per_round"] if p["ndcg@10"] is not None]
    ax3.plot([p[0] for p in pts], [p[1] for p in pts], "o-")
    ax3.xaxis.get_major_locator().set_params(integer=True)
    ax3.set_xlabel("round")
    ax3.set_ylabel(f"NDCG@10 ({big['ndcg_eval_sample']:.0%} of held-out sessions)")
    ax3.set_title(f"{big['devices']:,} devices")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default="runs/fleet_scale")
    ap.add_argument("--devices", type=int, nargs="+", default=[1000, 3000, 10000])
    ap.add_argument("--rounds", type=int, default=20, help="rounds of the largest fleet")
    ap.add_argument("--small-rounds", type=int, default=5, help="rounds of the other fleets")
    ap.add_argument("--per-round", type=int, default=100, help="devices sampled per round")
    ap.add_argument("--calibrate", type=int, default=200, help="devices trained in-process to check the estimate")
    ap.add_argument("--eval-sample", type=float, default=0.25,
                    help="share of the held-out sessions for the per-round NDCG@10 of the largest fleet")
    ap.add_argument("--plot-only", action="store_true", help="redraw the table and plot from OUT/fleet_scale.json")
    ap.add_argument("--one", type=int, default=None, help=argparse.SUPPRESS)  # one fleet size, in this process
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    sizes = sorted(args.devices)
    if args.one is not None:
        rounds = args.rounds if args.one == sizes[-1] else args.small_rounds
        res = run_one(args.one, rounds, args.per_round, out, args.calibrate, ndcg_rounds=args.one == sizes[-1],
                      eval_sample=args.eval_sample)
        atomic_write(out / f"devices-{args.one}.json", lambda f: f.write(json.dumps(res, indent=1).encode()))
        return
    if args.plot_only:
        rows = json.loads((out / "fleet_scale.json").read_text())["fleets"]
        report(rows, out)
        return
    rows = []
    for n in sizes:
        log.info("fleet of %d devices", n)
        cmd = [sys.executable, __file__, "--one", str(n), "--out", str(out), "--rounds", str(args.rounds),
               "--small-rounds", str(args.small_rounds), "--per-round", str(args.per_round),
               "--calibrate", str(args.calibrate), "--eval-sample", str(args.eval_sample),
               "--devices", *map(str, sizes)]
        subprocess.run(cmd, check=True, cwd=REPO)
        rows.append(json.loads((out / f"devices-{n}.json").read_text()))
    summary = {"scenario": SCENARIO, "per_round": args.per_round, "fleets": rows}
    atomic_write(out / "fleet_scale.json", lambda f: f.write(json.dumps(summary, indent=1).encode()))
    report(rows, out)


def report(rows: list[dict[str, Any]], out: Path) -> None:
    """The plot, and the table and figures printed."""
    plot(rows, out / "fleet_scale.png")
    print(table(rows))
    big = rows[-1]
    print(f"NDCG@10 per round, {big['devices']:,} devices ({big['ndcg_eval_sample']:.0%} of the held-out sessions): "
          + " ".join(f"{p['ndcg@10']:.4f}" for p in big["per_round"] if p["ndcg@10"] is not None))
    print(f"after round {big['rounds']}, all held-out sessions: NDCG@10 {big['final_all_heldout'].get('ndcg@10', 0):.4f} "
          f"(central evaluation {big['central_eval_s']:.0f} s)")
    for r in rows:
        c = r["calibration"]
        print(f"{r['devices']:>6} devices: train-seconds per device (in-process, {c['devices']} devices) mean "
              f"{c['train_mean_s'] * 1000:.0f} ms, example-weighted {c['train_weighted_mean_s'] * 1000:.0f} ms; "
              f"load_shard median {c['load_shard_median_s'] * 1000:.0f} ms; shard store {r['shards_s']:.1f} s")
    print(f"plot: {out / 'fleet_scale.png'}  results: {out / 'fleet_scale.json'}")


if __name__ == "__main__":
    main()
