"""Real-photo federated benchmark: FedAvg over 100 Dirichlet clients against the centralized fused head.

    python benchmarks/real_photos_federated.py --photos ../shared/data/fashion-photos --out runs/real-photos-fed \
        [--items 3000] [--seeds 0 1 2] [--regimes half none] [--rounds 30] [--scenario dirichlet] \
        [--set KEY=VALUE ...]

The question: does the federated head, trained through the project's real Flower simulation, reach the
centralized head on real product photos? Per seed and title regime, everything up to the clicks is
``benchmarks/real_photos.py``'s (imported, not copied): the item-disjoint 70/30 split, the colour words taken out of
the titles, the judged queries and slates over the judged items, and the shoppers simulated over the train items
(a data folder ``OUT/work/seed<S>-<regime>/data``). Then, on those clicks:

1. **Centralized** (the reference): the default fused head (pyproject's run-config defaults, read once per
   process: :func:`default_configs`) trained by
   ``simulations.centralized.train_central`` on the pooled training sessions (early stopping on validation
   clicks, at most ``--epochs``).
2. **Federated**: the scenario ``--scenario`` (default ``dirichlet``: 100 clients whose mix of shopper segments
   is drawn from Dirichlet(0.5), 30% sampled per round, FedAvg, 2 local epochs) over the pyproject defaults, with
   ``data.dir`` set to that data folder, ``server.seed`` and ``partition.seed`` to the seed, ``--rounds`` rounds
   and any ``--set`` overrides, run by ``simulations.runner.simulate_config`` (Flower's simulation engine). The run
   folder is named by its config (less the round count) and the data folder's ``meta.json``, so a rerun with more
   rounds resumes from the last checkpoint instead of starting again, and new clicks start a new run.
3. **Evaluation**: both heads, and the global head of every round (its checkpoint ``checkpoints/round-NNN.pt``),
   on the judged, item-disjoint slates (``real_photos.evaluate``: NDCG@10, MRR, Recall@10); also on the
   simulator's own held-out sessions. The federated figure is the head the server writes as ``averaged.pt``: the
   mean of the last ``server.average-rounds`` rounds' global heads (``shared_model.checkpoint.tail_window``:
   rounds 21-30 of 30), recomputed here from the checkpoints with the server's own functions; the last round's
   head is reported beside it. No round is picked by looking at the judged slates.

Writes ``OUT/results.json`` (config, per (seed, regime): central and federated figures and their ratio, the
round-by-round curve, timings; aggregate mean/min/max over seeds) and ``OUT/curve.png``. Deterministic by seed
(up to the order in which Flower aggregates the clients' float updates).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import re
import sys
import time
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from benchmarks import real_photos as rp  # noqa: E402
from shared_model.catalog_io import load_catalog  # noqa: E402
from shared_model.checkpoint import (  # noqa: E402
    average_heads,
    load_checkpoint,
    save_checkpoint,
    tail_window,
)
from shared_model.config import ModelConfig, TrainConfig, load_defaults, parse_run_config  # noqa: E402
from shared_model.console import parse_sets  # noqa: E402
from shared_model.embedding_cache import CACHE_ENV, feature_cache_dir  # noqa: E402
from shared_model.head import FusedRankingHead  # noqa: E402
from shared_model.metrics import MRR, NDCG10, RECALL10  # noqa: E402
from shared_model.prepared import Prepared  # noqa: E402
from shared_model.schema import CatalogItem, atomic_write, results_bytes  # noqa: E402
from shared_model.shards import load_shard, shard_dir  # noqa: E402
from shared_model.training import evaluate_model  # noqa: E402
from simulations.centralized import DEFAULT_CRITERION, DEFAULT_EPOCHS, train_central  # noqa: E402
from simulations.runner import scenario_config, simulate_config  # noqa: E402

log = logging.getLogger("real_photos_federated")

RESULT_FORMAT = "fedrank-real-photos-federated/2"
CENTRAL = "centralized fused head"
FEDERATED = "federated fused head"  # tail-averaged (averaged.pt)
LAST_ROUND = "federated fused head, last round"
TARGET_RATIO = 0.95
METRICS = (NDCG10, MRR, RECALL10)
# a rerun with more rounds resumes the same run; tail averaging only reads the checkpoints a run leaves
_NOT_IN_RUN_KEY = ("server.num-rounds", "server.out-dir", "server.average-rounds")
PLATEAU_ROUNDS = 10
SOURCE_AREAS = ("shared_model", "client", "server", "simulations", "benchmarks")


def round_name(rnd: int) -> str:
    return f"round {rnd:03d}"


# ------------------------------------------------------------------------------------------ centralized


def default_configs() -> tuple[ModelConfig, TrainConfig]:
    """The head and training defaults, from pyproject's run config as this process first read it
    (``load_defaults`` reads the file once): the same snapshot the federated run config is built from, so the two
    heads never differ because someone edits the defaults while the benchmark runs."""
    settings = parse_run_config(load_defaults())
    return settings.model, settings.train


def central_head(prep: Prepared, work: Path, seed: int, epochs: int) -> tuple[FusedRankingHead, dict[str, Any]]:
    """The default fused head trained on the pooled clicks; kept in ``work/central.pt`` and reused while the
    data, the default configs, the seed and ``epochs`` are the same."""
    mcfg, tcfg = default_configs()
    key = {"model": asdict(mcfg), "train": asdict(tcfg), "epochs": epochs, "seed": seed, "selection": DEFAULT_CRITERION,
           "data": json.loads((prep.data_dir / "meta.json").read_text())["counts"]}
    path = work / "central.pt"
    if path.is_file():
        model, payload = load_checkpoint(path)
        if payload["extra"].get("key") == json.loads(json.dumps(key)):
            log.info("centralized head: reusing %s (same key)", path)
            return model, {**payload["extra"]["fit"], "reused": True}
    model, fit = train_central(prep, mcfg, tcfg, epochs=epochs, seed=seed, progress=False)
    info = {k: fit[k] for k in ("epochs_run", "selected_epochs", "seconds", "params")}
    save_checkpoint(path, model, run_config={"model": asdict(mcfg), "train": asdict(tcfg)},
                    metrics_history=fit["history"], seeds={"seed": seed}, extra={"key": key, "fit": info})
    log.info("centralized head: %d epochs (weights of epochs %s averaged), %.1f s", fit["epochs_run"],
             fit["selected_epochs"], fit["seconds"])
    return model, {**info, "reused": False}


# ------------------------------------------------------------------------------------------ federated


def federated_config(args: argparse.Namespace, prep: Prepared, work: Path, seed: int) -> dict[str, Any]:
    """Pyproject defaults < scenario < this benchmark's settings < ``--set``, with the run folder under ``work``
    named by the config (less the round count) and the data folder's ``meta.json``."""
    sets = parse_sets(args.set)
    extra = {"data.dir": str(prep.data_dir), "server.seed": seed, **sets}
    flat = scenario_config(args.scenario, rounds=args.rounds, extra=extra)
    if "partition.seed" not in sets:
        # a Dirichlet draw that leaves a client empty is retried with derived seeds by shards.partition_users
        flat["partition.seed"] = seed
    run_key = {k: v for k, v in sorted(flat.items()) if k not in _NOT_IN_RUN_KEY}
    run_key["data.meta"] = (prep.data_dir / "meta.json").read_text()  # new clicks: a new run, never a resumed one
    digest = hashlib.sha256(json.dumps(run_key, sort_keys=True).encode()).hexdigest()[:10]
    flat["server.out-dir"] = str(work / f"fed-{Path(args.scenario).stem}-{digest}")
    return flat


def train_federated(flat: dict[str, Any], scenario: str) -> dict[str, Any]:
    """Run the scenario through Flower's simulation engine (skipped when the run folder already holds the last
    round's checkpoint); the run's ``results.json``."""
    run_dir = Path(flat["server.out-dir"])
    rounds = int(flat["server.num-rounds"])
    if (run_dir / "checkpoints" / f"round-{rounds:03d}.pt").is_file() and (run_dir / "results.json").is_file():
        log.info("federated: %s already holds round %d", run_dir, rounds)
        return {**json.loads((run_dir / "results.json").read_text()), "reused": True}
    settings = parse_run_config(flat)
    mcfg, tcfg = default_configs()
    if settings.model != mcfg or replace(settings.train, local_epochs=tcfg.local_epochs) != tcfg:
        raise SystemExit(f"the federated head's model/train config differs from the centralized one beyond "
                         f"train.local-epochs: {settings.model}, {settings.train} vs {mcfg}, {tcfg}")
    t0 = time.perf_counter()
    res = simulate_config(flat, scenario, central=False, progress=False)
    log.info("federated: %d rounds in %.0f s", rounds, time.perf_counter() - t0)
    return {**res, "reused": False}


def round_heads(run_dir: Path, rounds: int) -> dict[int, FusedRankingHead]:
    """The global head after each round 1..``rounds`` (from the run's per-round checkpoints)."""
    heads: dict[int, FusedRankingHead] = {}
    for rnd in range(1, rounds + 1):
        path = run_dir / "checkpoints" / f"round-{rnd:03d}.pt"
        if not path.is_file():
            raise FileNotFoundError(f"{path}: the federated run left no checkpoint of round {rnd}")
        heads[rnd] = load_checkpoint(path)[0]
    return heads


def client_sizes(flat: dict[str, Any]) -> dict[str, Any]:
    """Sessions per client of the run's partitioning (train and test), from its packed shard index."""
    settings = parse_run_config(flat)
    folder = shard_dir(settings)
    train = np.array([len(load_shard(folder / f"{c}.npz").train) for c in range(settings.partition.num_clients)])
    test = np.array([len(load_shard(folder / f"{c}.npz").test) for c in range(settings.partition.num_clients)])

    def stats(v: np.ndarray) -> dict[str, float]:
        return {"min": int(v.min()), "median": float(np.median(v)), "max": int(v.max()), "total": int(v.sum())}

    return {"clients": int(len(train)), "train_sessions": stats(train), "test_sessions": stats(test),
            "clients_without_train_sessions": int((train == 0).sum())}


# ------------------------------------------------------------------------------------------ one (seed, regime)


def source_digest() -> str:
    """Hash of the code and defaults a run executes (Ray's workers import them afresh for every simulation): a
    change while a run is going makes its clients and its server disagree."""
    root = Path(__file__).resolve().parents[1]
    files = [root / "pyproject.toml", *sorted(p for area in SOURCE_AREAS for p in (root / area).rglob("*.py"))]
    h = hashlib.sha256()
    for f in files:
        h.update(f.relative_to(root).as_posix().encode() + b"\0" + f.read_bytes())
    return h.hexdigest()[:16]


def compute_one(items: list[CatalogItem], pattern: re.Pattern[str], args: argparse.Namespace, seed: int,
                regime: str, cache: Path) -> dict[str, Any]:
    """Split, degrade and simulate as ``real_photos``; train centrally and federated; evaluate both."""
    t0 = time.perf_counter()
    code = source_digest()
    train, judged = rp.choose_and_split(items, args.items, seed)
    titled = rp.degrade(train + judged, regime, seed, pattern)  # one seeded half over the whole subset
    train, judged = titled[: len(train)], titled[len(train):]
    judgments, queries = rp.make_judgments(judged, seed)
    if not queries:
        raise SystemExit(f"no (type, colour) has {rp.MIN_JUDGED} judged items; use a larger --items")
    work = args.out / "work" / f"seed{seed}-{regime}"
    prep, sim = rp.simulate(train, work, seed)
    t1 = time.perf_counter()
    central, central_fit = central_head(prep, work, seed, args.epochs)
    t2 = time.perf_counter()
    flat = federated_config(args, prep, work, seed)
    fed_run = train_federated(flat, args.scenario)
    t3 = time.perf_counter()
    rounds = int(flat["server.num-rounds"])
    run_dir = Path(flat["server.out-dir"])
    per_round = round_heads(run_dir, rounds)
    window = tail_window(rounds, parse_run_config(flat).server.average_rounds)
    averaged = average_heads([per_round[r] for r in window]) if window else per_round[rounds]  # as averaged.pt
    heads = {CENTRAL: central, FEDERATED: averaged, LAST_ROUND: per_round[rounds],
             **{round_name(r): m for r, m in per_round.items()}}
    judged_res = rp.evaluate(prep, heads, None, judged, judgments, cache, seed)
    test, table = prep.slates("test"), prep.table()
    simulated = {name: evaluate_model(heads[name], test, table) for name in (CENTRAL, FEDERATED, LAST_ROUND)}
    t4 = time.perf_counter()
    rankers = judged_res["rankers"]
    curve = [{"round": r, "judged": {m: rankers[round_name(r)][m] for m in METRICS},
              "simulated_heldout_ndcg@10": rec.get("central", {}).get(NDCG10), "seconds": rec.get("seconds")}
             for r, rec in zip(range(1, rounds + 1), fed_run["rounds"][:rounds], strict=True)]
    for form in judged_res["by_query_form"].values():  # the per-round rows live in the curve
        for r in per_round:
            form.pop(round_name(r), None)
    for r in per_round:
        rankers.pop(round_name(r))
    c, f, last = rankers[CENTRAL][NDCG10], rankers[FEDERATED][NDCG10], rankers[LAST_ROUND][NDCG10]
    changed = source_digest() != code
    if changed:
        log.warning("seed %d %s: the code or defaults changed while it ran: its result is not trustworthy", seed,
                    regime)
    return {
        "seed": seed, "regime": regime, "train_items": len(train), "judged_items": len(judged),
        "source_digest": code, "source_changed_during_run": changed, "simulation": sim, "central_fit": central_fit,
        "federated": {"run_dir": str(run_dir), "rounds": rounds, "run_config": flat,
                      "seconds_total": fed_run.get("seconds_total"), "reused": fed_run["reused"],
                      "peak_tree_rss_mb": fed_run.get("peak_tree_rss_mb"),
                      "partition": client_sizes(flat),
                      "averaged_rounds": [window[0], window[-1]] if window else [rounds, rounds]},
        "ndcg10": {"central": c, "federated": f, "ratio": f / c if c else float("nan"), "last_round": last,
                   "last_round_ratio": last / c if c else float("nan")},
        "judged": judged_res, "simulated_heldout": simulated, "curve": curve,
        "timings": {"simulate_prepare_s": t1 - t0, "central_s": t2 - t1, "federated_s": t3 - t2,
                    "evaluate_s": t4 - t3, "total_s": t4 - t0},
    }


def run_key(args: argparse.Namespace, seed: int, regime: str) -> dict[str, Any]:
    """What determines one (seed, regime) result: a stored result with the same key is reused."""
    return {"format": RESULT_FORMAT, "photos": str(args.photos.resolve()), "items": args.items, "seed": seed,
            "regime": regime, "epochs": args.epochs, "scenario": args.scenario, "rounds": args.rounds,
            "set": sorted(args.set or []), "model": asdict(default_configs()[0]), "train": asdict(default_configs()[1]),
            "selection": DEFAULT_CRITERION}


def run_one(items: list[CatalogItem], pattern: re.Pattern[str], args: argparse.Namespace, seed: int,
            regime: str, cache: Path) -> dict[str, Any]:
    key = json.loads(json.dumps(run_key(args, seed, regime)))
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:8]
    path = args.out / "work" / f"seed{seed}-{regime}" / f"result-{Path(args.scenario).stem}-r{args.rounds}-{digest}.json"
    return rp.stored_result(path, key, lambda: compute_one(items, pattern, args, seed, regime, cache))


# ------------------------------------------------------------------------------------------ reporting


def plateau(run: dict[str, Any], last: int = PLATEAU_ROUNDS) -> dict[str, float]:
    """Mean judged NDCG@10 of the global heads of the last ``last`` rounds, and its ratio to the centralized head:
    where the curve levels off, less noisy than one round's head (a description, not a head anyone ships)."""
    tail = [p["judged"][NDCG10] for p in run["curve"][-last:]]
    mean = float(np.mean(tail))
    return {"rounds": len(tail), "ndcg10": mean, "ratio": mean / run["ndcg10"]["central"]}


def aggregate(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Per regime: mean/min/max over seeds of central and federated NDCG@10, their ratio, and the plateau's ratio."""
    out: dict[str, Any] = {}
    for regime in dict.fromkeys(r["regime"] for r in runs):
        rows = [{**r["ndcg10"], "plateau_ratio": plateau(r)["ratio"]} for r in runs if r["regime"] == regime]
        out[regime] = {}
        for k in ("central", "federated", "ratio", "last_round_ratio", "plateau_ratio"):
            v = np.array([row[k] for row in rows], np.float64)
            out[regime][k] = {"mean": float(v.mean()), "min": float(v.min()), "max": float(v.max()), "n": len(v)}
        out[regime]["all_seeds_reach_target"] = bool(min(row["ratio"] for row in rows) >= TARGET_RATIO)
    return out


def table(runs: list[dict[str, Any]], agg: dict[str, Any]) -> str:
    lines = [f"{'seed':>4s} {'regime':6s} {'central':>8s} {'fedavg':>8s} {'ratio':>7s} {'last':>8s} {'ratio':>7s} "
             f"{'plateau':>8s}  (judged NDCG@10; fedavg: the tail-averaged head, averaged.pt; last: the last round's "
             f"head; plateau: mean NDCG@10 of the last {PLATEAU_ROUNDS} rounds' heads)"]
    for r in runs:
        n, pl = r["ndcg10"], plateau(r)
        lines.append(f"{r['seed']:>4d} {r['regime']:6s} {n['central']:8.4f} {n['federated']:8.4f} {n['ratio']:7.3f} "
                     f"{n['last_round']:8.4f} {n['last_round_ratio']:7.3f} {pl['ndcg10']:8.4f} (ratio {pl['ratio']:.3f})")
    for regime, a in agg.items():
        cells = "; ".join(f"{k} {a[k]['mean']:.4f} [{a[k]['min']:.4f},{a[k]['max']:.4f}]"
                          for k in ("central", "federated", "ratio", "last_round_ratio", "plateau_ratio"))
        lines.append(f"{regime}: mean [min,max] over {a['ratio']['n']} seed(s): {cells}")
    return "\n".join(lines)


def plot(runs: list[dict[str, Any]], path: Path) -> None:
    """Judged NDCG@10 of the global head per round, the centralized head as a dashed line, one panel per regime."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    regimes = list(dict.fromkeys(r["regime"] for r in runs))
    fig, axes = plt.subplots(1, len(regimes), figsize=(5 * len(regimes), 4), squeeze=False)
    for ax, regime in zip(axes[0], regimes, strict=True):
        for k, r in enumerate(x for x in runs if x["regime"] == regime):
            colour = f"C{k}"
            xs = [p["round"] for p in r["curve"]]
            ax.plot(xs, [p["judged"][NDCG10] for p in r["curve"]], color=colour, label=f"FedAvg, seed {r['seed']}")
            ax.axhline(r["ndcg10"]["central"], color=colour, ls="--", lw=1, label=f"central, seed {r['seed']}")
            ax.plot([r["federated"]["averaged_rounds"][1]], [r["ndcg10"]["federated"]], marker="*", ms=10,
                    color=colour, ls="none", label=f"tail average, seed {r['seed']}")
        ax.set_title(rp.REGIME_LABELS[regime], fontsize=10)
        ax.set_xlabel("round")
        ax.set_ylabel("NDCG@10 (judged, item-disjoint)")
        ax.legend(fontsize=7)
    fig.tight_layout()
    tmp = path.with_name("." + path.name + ".tmp.png")
    fig.savefig(tmp, dpi=120)
    plt.close(fig)
    os.replace(tmp, path)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    p.add_argument("--photos", type=Path, required=True, help="folder with styles.csv and images/")
    p.add_argument("--out", type=Path, default=Path("runs/real-photos-fed"))
    p.add_argument("--items", type=int, default=3000, help="random subset size (default 3000)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--regimes", nargs="+", choices=rp.REGIMES, default=list(rp.REGIMES))
    p.add_argument("--epochs", type=int, default=DEFAULT_EPOCHS, help="centralized head: epochs at most")
    p.add_argument("--scenario", default="dirichlet", help="federated scenario (name or .toml path)")
    p.add_argument("--rounds", type=int, default=None, help="federated rounds (default: the scenario's)")
    p.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a federated run-config value")
    args = p.parse_args(argv)
    if args.rounds is None:
        args.rounds = int(scenario_config(args.scenario)["server.num-rounds"])
    return args


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s", datefmt="%H:%M:%S")
    torch.set_num_threads(1)
    args = parse_args(argv)
    mcfg, tcfg = default_configs()  # the snapshot of the defaults that every step of this process uses
    if (mcfg, tcfg) != (ModelConfig(), TrainConfig()):
        log.warning("pyproject's defaults differ from the config dataclasses'; pyproject's are used")
    os.environ.setdefault(CACHE_ENV, str((args.out / ".feature-cache").resolve()))  # one cache for every step
    cache = feature_cache_dir(args.photos)
    t0 = time.perf_counter()
    items = load_catalog(args.photos / "styles.csv").items
    pattern = rp.colour_pattern(items)
    runs = []
    for seed in args.seeds:
        for regime in args.regimes:
            log.info("=== seed %d, regime %s ===", seed, regime)
            runs.append(run_one(items, pattern, args, seed, regime, cache))
            log.info("seed %d %s: NDCG@10 %s", seed, regime, {k: round(v, 4) for k, v in runs[-1]["ndcg10"].items()})
    agg = aggregate(runs)
    payload = {
        "config": {"photos": str(args.photos), "items": args.items, "seeds": args.seeds, "regimes": args.regimes,
                   "central_epochs": args.epochs, "scenario": args.scenario, "rounds": args.rounds,
                   "set": args.set or [], "target_ratio": TARGET_RATIO, "cache": str(cache),
                   "model": asdict(default_configs()[0]), "train": asdict(default_configs()[1]),
                   "federated_head": "the mean of the last server.average-rounds rounds' global heads (averaged.pt); "
                                     "the last round's head beside it; no round chosen on the judged slates"},
        "per_seed": runs, "aggregate": agg, "timings": {"total_s": time.perf_counter() - t0},
    }
    args.out.mkdir(parents=True, exist_ok=True)
    data = results_bytes(payload)
    atomic_write(args.out / "results.json", lambda f: f.write(data))
    plot(runs, args.out / "curve.png")
    print(table(runs, agg))
    print(f"\nwrote {args.out / 'results.json'} and {args.out / 'curve.png'} in {time.perf_counter() - t0:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
