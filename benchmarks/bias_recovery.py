"""Bias recovery: position bias harvested from a log that never randomized, against the simulator's true curve.

    OMP_NUM_THREADS=1 python benchmarks/bias_recovery.py --data data/harvest --out runs/bias_recovery \
        [--preset harvest] [--seed 0] [--set retrieval_noise=0.0 ...] [--epochs 12] [--no-train] \
        [--runs harvested true naive]

1. **Data**: the ``harvest`` preset by default (the default marketplace with ``randomized_share = 0`` and a
   production ranker retrained weekly, ``ranker_update_days = 7``), generated into ``--data`` if it is not there
   (``--set FIELD=VALUE`` overrides any :class:`MarketConfig` field; the catalog, and so the feature cache, is the
   default one's).
2. **Curve**: ``prepare(..., propensity="harvest")`` estimates the examination curve from the training sessions
   by intervention harvesting (AllPairs over the same item for the same query at different positions), then
   fits a power law to it. Compared at display positions 1-10 with the true curve ``(1 / position) ** eta``
   (``meta.json``'s ``ground_truth``): the raw AllPairs curve, the power law used for IPS, and, for scale,
   naive CTR-by-position ratios (biased: the production order puts relevant items on top).
3. **IPS training**: the fused head (the run config's defaults, IPS on) trained centrally twice with the same
   seed, once with the harvested propensities and once with the true ones (early stopping on each one's
   validation loss, ``train_central``'s default), and evaluated on the held-out sessions against the true grades. ``--runs ...
   naive`` adds, for scale, IPS with a power law fitted to the naive CTR ratios.

Writes ``OUT/results.json`` and prints the comparison.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from shared_model.config import ModelConfig, TrainConfig, load_defaults, section_to_dataclass  # noqa: E402
from shared_model.metrics import NDCG10  # noqa: E402
from shared_model.prepared import Prepared, prepare  # noqa: E402
from shared_model.propensity import power_law_propensities  # noqa: E402
from shared_model.schema import atomic_write  # noqa: E402
from shared_model.training import evaluate_model  # noqa: E402
from simulations.centralized import DEFAULT_EPOCHS, train_central  # noqa: E402
from simulations.marketplace import generate_marketplace  # noqa: E402

log = logging.getLogger("bias_recovery")
SHOWN = 10  # display positions 1..10 are compared


def parse_overrides(items: list[str]) -> dict[str, Any]:
    """``FIELD=VALUE`` pairs; values parsed as JSON where possible (numbers, booleans), else kept as strings."""
    out: dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep:
            raise SystemExit(f"--set expects FIELD=VALUE, got {item!r}")
        try:
            out[key] = json.loads(value)
        except json.JSONDecodeError:
            out[key] = value
    return out


def naive_curve(prep: Prepared) -> np.ndarray:
    """CTR by display position over the training sessions, divided by the top position's ``[SHOWN]``."""
    lg, s = prep.log, prep.train_idx
    lens = lg.offsets[s + 1] - lg.offsets[s]
    rows = np.concatenate([np.arange(lg.offsets[i], lg.offsets[i + 1]) for i in s])
    pos = rows - np.repeat(lg.offsets[s], lens)
    keep = pos < SHOWN
    ctr = np.bincount(pos[keep], weights=lg.clicks[rows][keep], minlength=SHOWN) / np.bincount(pos[keep],
                                                                                               minlength=SHOWN)
    return np.asarray(ctr / ctr[0])


def train_and_score(prep: Prepared, props: np.ndarray, eta: float, mcfg: ModelConfig, tcfg: TrainConfig,
                    epochs: int, seed: int) -> dict[str, Any]:
    """The fused head trained with IPS weights from ``props``; held-out metrics and training info."""
    variant = replace(prep, propensities=np.asarray(props, dtype=np.float32), eta=float(eta))
    model, info = train_central(variant, mcfg, tcfg, epochs=epochs, seed=seed)
    metrics = evaluate_model(model, prep.slates("test"), prep.table())
    return {"test": metrics, "best_epoch": info["best_epoch"], "epochs_run": info["epochs_run"],
            "seconds": round(info["seconds"], 1)}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data", default="data/harvest")
    ap.add_argument("--preset", default="harvest")
    ap.add_argument("--seed", type=int, default=0, help="marketplace seed and training seed")
    ap.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE", help="MarketConfig override")
    ap.add_argument("--out", default="runs/bias_recovery")
    ap.add_argument("--epochs", type=int, default=DEFAULT_EPOCHS)
    ap.add_argument("--no-train", action="store_true", help="only the curve")
    ap.add_argument("--runs", nargs="+", default=["harvested", "true"], choices=["harvested", "true", "naive"],
                    help="IPS trainings: harvested / true / naive-CTR propensities")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    t0 = time.perf_counter()

    data = generate_marketplace(args.data, preset=args.preset, seed=args.seed, progress=False,
                                **parse_overrides(args.set))
    meta = json.loads((data / "meta.json").read_text())
    if meta["config"]["randomized_share"] > 0:
        log.warning("this marketplace has randomized sessions; they are ignored by the harvest estimator")
    prep = prepare(data, progress=False, propensity="harvest")
    true_eta = float(meta["ground_truth"]["eta"])
    truth = power_law_propensities(true_eta, len(prep.propensities))
    raw = np.array([np.nan if v is None else v for v in prep.propensity_info["allpairs_curve"]])
    naive = naive_curve(prep)
    rows = {"true": truth[:SHOWN], "harvested (AllPairs, raw)": raw[:SHOWN],
            "harvested (power law, used for IPS)": prep.propensities[:SHOWN], "naive CTR ratio": naive}
    errors = {k: float(np.max(np.abs(v - truth[:SHOWN]))) for k, v in rows.items() if k != "true"}
    print(f"examination curve at display positions 1-{SHOWN} ({data}; true eta {true_eta}, fitted "
          f"{prep.eta:.4f}; harvested weight {prep.propensity_info['harvested_weight']:.0f})")
    print(f"{'':38s}" + "".join(f"{k:>7d}" for k in range(1, SHOWN + 1)) + "   max |err|")
    for name, v in rows.items():
        err = f"   {errors[name]:.4f}" if name in errors else ""
        print(f"{name:38s}" + "".join(f"{x:7.3f}" for x in v) + err)
    result: dict[str, Any] = {
        "data_dir": str(data), "preset": args.preset, "overrides": parse_overrides(args.set),
        "marketplace": {k: meta["config"][k] for k in ("randomized_share", "ranker_update_days", "ranker_drift",
                                                       "retrieval_noise", "eta")},
        "train_sessions": int(len(prep.train_idx)), "test_sessions": int(len(prep.test_idx)),
        "true_eta": true_eta, "fitted_eta": prep.eta,
        "harvested_weight": prep.propensity_info["harvested_weight"],
        "curve_positions_1_to_10": {k: [round(float(x), 5) for x in v] for k, v in rows.items()},
        "max_abs_error_positions_1_to_10": errors,
    }
    if not args.no_train:
        flat = load_defaults()
        mcfg = section_to_dataclass(ModelConfig, "model", flat)
        tcfg = replace(section_to_dataclass(TrainConfig, "train", flat), ips=True)
        naive_eta = max(0.0, float(-np.polyfit(np.log(np.arange(1, SHOWN + 1)), np.log(naive), 1)[0]))
        runs = {"IPS, harvested curve": ("harvested", prep.propensities, prep.eta),
                "IPS, true curve": ("true", truth.astype(np.float32), true_eta),
                "IPS, naive CTR curve": ("naive", power_law_propensities(naive_eta, len(truth)), naive_eta)}
        result["training"] = {}
        for name, (key, props, eta) in runs.items():
            if key not in args.runs:
                continue
            log.info("training the fused head: %s", name)
            result["training"][name] = train_and_score(prep, props, eta, mcfg, tcfg, args.epochs, args.seed)
        nd = {k: v["test"][NDCG10] for k, v in result["training"].items()}
        if "IPS, true curve" in nd and "IPS, harvested curve" in nd:
            result["ndcg@10_gap_true_minus_harvested"] = nd["IPS, true curve"] - nd["IPS, harvested curve"]
            print(f"NDCG@10 gap (true - harvested): {result['ndcg@10_gap_true_minus_harvested']:+.4f}")
        for name, v in result["training"].items():
            print(f"{name:24s} NDCG@10 {v['test'][NDCG10]:.4f}  MRR {v['test']['mrr']:.4f}  "
                  f"Recall@10 {v['test']['recall@10']:.4f}  (best epoch {v['best_epoch']} of {v['epochs_run']})")
    result["seconds"] = round(time.perf_counter() - t0, 1)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write(out / "results.json", lambda f: f.write(json.dumps(result, indent=2).encode()))
    print(f"results: {out / 'results.json'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
