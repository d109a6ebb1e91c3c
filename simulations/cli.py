"""``fedrank generate | train | baselines | evaluate | simulate | demo``: registered by :func:`add_commands`.

Handlers parse arguments, call the simulator, the centralized trainers and the experiment runner, and print for
people; they return an exit code (0 ok, 2 unusable input or an output folder another command is writing: one line on
stderr naming the file/field or the holder; the front door turns an interruption into exit 130). Every output folder
is locked while written (:mod:`shared_model.outdir`).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from shared_model.console import add_command, parse_sets, print_table
from shared_model.outdir import locked_dir


def _model_and_train_cfg(args: argparse.Namespace) -> tuple[Any, Any]:
    from dataclasses import replace

    from shared_model.config import ModelConfig, TrainConfig, load_defaults, section_to_dataclass

    flat = load_defaults()
    mcfg = section_to_dataclass(ModelConfig, "model", flat)
    tcfg = section_to_dataclass(TrainConfig, "train", flat)
    if getattr(args, "fusion", None):
        mcfg = replace(mcfg, fusion=args.fusion)
    if getattr(args, "text_only", False):
        mcfg = replace(mcfg, use_image=False, use_video=False)
    if getattr(args, "naive", False):
        tcfg = replace(tcfg, ips=False)
    if getattr(args, "loss", None):
        tcfg = replace(tcfg, loss=args.loss)
    return mcfg, tcfg


def cmd_generate(args: argparse.Namespace) -> int:
    if args.catalog:
        from simulations.marketplace import simulate_catalog_dir

        out = simulate_catalog_dir(args.catalog, args.out, preset=args.preset, seed=args.seed,
                                   skip_bad=args.skip_bad)
    else:
        from simulations.marketplace import generate_marketplace

        out = generate_marketplace(args.out, preset=args.preset, seed=args.seed)
    meta = json.loads((Path(out) / "meta.json").read_text())
    print(f"marketplace in {out}: {json.dumps(meta.get('counts', {}))}")
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    if args.catalog or args.judgments:  # train from a shop's relevance judgments: simulations/judged_training.py
        return _train_judged(args)
    from shared_model.checkpoint import save_checkpoint
    from shared_model.prepared import prepare
    from shared_model.training import evaluate_model
    from simulations.centralized import train_central

    out = Path(args.out)
    with locked_dir(out):  # one writer per output folder; head.pt itself is written atomically
        prep = prepare(args.data)
        mcfg, tcfg = _model_and_train_cfg(args)
        model, info = train_central(prep, mcfg, tcfg, epochs=args.epochs, seed=args.seed, criterion=args.selection)
        metrics = evaluate_model(model, prep.slates("test"), prep.table())
        save_checkpoint(out / "head.pt", model, run_config={"data.dir": str(args.data), "train": vars(tcfg)},
                        metrics_history=[*info["history"], {"test": metrics}], seeds={"seed": args.seed})
    print_table(f"held-out sessions ({args.data})", {"trained head": metrics})
    print(f"checkpoint: {out / 'head.pt'} ({info['params']} parameters, weights of epochs "
          f"{info['selected_epochs'][0]}-{info['selected_epochs'][1]} of {info['epochs_run']} averaged, {info['seconds']:.1f} s)")
    return 0


def _train_judged(args: argparse.Namespace) -> int:
    from simulations.judged_training import HEAD, train_from_judgments

    if not (args.catalog and args.judgments):
        print("fedrank train: --catalog and --judgments go together", file=sys.stderr)
        return 2
    mcfg, tcfg = _model_and_train_cfg(args)
    with locked_dir(Path(args.out)):
        res = train_from_judgments(args.catalog, args.judgments, args.out, mcfg, tcfg, epochs=args.epochs,
                                   seed=args.seed, devices=args.devices, rounds=args.rounds,
                                   local_epochs=args.local_epochs, skip_bad=args.skip_bad, **_judged_options(args))
    q = res["split"]["queries"]
    print_table(f"{q['test']} held-out judged queries of {res['num_queries']} ({args.judgments}; trained on "
                f"{q['train']}, validated on {q['validation']}; gain {res['gain']['formula']})",
                _for_display(res["rankers"]))
    for name, info in res["training"].items():
        if isinstance(info, dict) and "seconds" in info:
            best = (f"best epoch {info['best_epoch']}" if name == HEAD else f"best round {info['best_round']} of "
                    f"{info['rounds_run']}; Flower run {info['run_dir']}, data folder {info['data_dir']}")
            print(f"{name}: {res['checkpoints'][name]} ({best}, {info['seconds']:.1f} s)")
    print(f"results: {Path(args.out) / 'results.json'}")
    return 0


def cmd_baselines(args: argparse.Namespace) -> int:
    from shared_model.prepared import prepare
    from simulations.centralized import run_baselines

    with locked_dir(Path(args.out)):  # results.json is written atomically
        prep = prepare(args.data)
        mcfg, tcfg = _model_and_train_cfg(args)
        res = run_baselines(prep, Path(args.out), mcfg, tcfg, epochs=args.epochs, seed=args.seed,
                            criterion=args.selection)
    print_table(f"held-out sessions, {res['num_test_sessions']} slates ({args.data})", res["rankers"])
    print(f"results: {Path(args.out) / 'results.json'}")
    return 0


def _judged_options(args: argparse.Namespace) -> dict[str, Any]:
    """``--gain``, ``--label-map`` and ``--max-grade`` as :func:`simulations.evaluate.evaluate_judgments` keywords."""
    from shared_model.catalog_io import parse_label_map

    return {"gain": args.gain or "exp2", "max_grade": args.max_grade,
            "label_map": parse_label_map(args.label_map) if args.label_map else None}


def _for_display(rows: dict[str, dict[str, float | None]]) -> dict[str, dict[str, float]]:
    return {name: {k: float("nan") if v is None else v for k, v in m.items()} for name, m in rows.items()}


def cmd_evaluate(args: argparse.Namespace) -> int:
    from simulations.centralized import checkpoint_names, load_heads
    from simulations.evaluate import evaluate_data, print_data_table, results_bytes

    checkpoints = checkpoint_names(args.checkpoint or [])
    if args.catalog or args.judgments:
        if not (args.catalog and args.judgments and args.out):
            print("fedrank evaluate: --catalog, --judgments and --out go together", file=sys.stderr)
            return 2
        from shared_model.prepared import prepare
        from simulations.evaluate import evaluate_judgments
        from simulations.judged_training import split_queries  # the split `fedrank train --judgments` makes

        options = _judged_options(args)
        heads = load_heads(list(checkpoints.values()))
        with locked_dir(Path(args.out)):
            ltr_data = prepare(args.ltr_data) if args.ltr_data else None  # LightGBM's clicks
            res = evaluate_judgments(args.catalog, args.judgments, heads, args.out, skip_bad=args.skip_bad,
                                     checkpoints=checkpoints, ltr_data=ltr_data, seed=args.seed,
                                     ltr_judgments=split_queries if args.ltr_judgments else None, **options)
        print_table(f"{res['num_queries']} judged queries ({args.judgments}; gain {res['gain']['formula']})",
                    _for_display(res["rankers"]))
        excluded = {k: v for k, v in res["queries_excluded"].items() if v}
        if excluded:
            print(f"queries left out (no relevant item for the metric): {json.dumps(excluded)}")
        if "held_out" in res:
            held = res["held_out"]
            print_table(f"the {held['num_queries']} held-out test queries (split seed {args.seed}): every ranker, "
                        "with LightGBM trained on the other queries' judgments", _for_display(held["rankers"]))
        print(f"results: {Path(args.out) / 'results.json'}")
        return 0
    if args.gain or args.label_map or args.max_grade is not None or args.ltr_data or args.ltr_judgments:
        print("fedrank evaluate: --gain, --label-map, --max-grade, --ltr-data and --ltr-judgments go with --catalog "
              "and --judgments", file=sys.stderr)
        return 2
    from shared_model.prepared import prepare
    from shared_model.schema import atomic_write

    heads = load_heads(list(checkpoints.values()))
    with locked_dir(Path(args.out)) if args.out else contextlib.nullcontext(None):
        prep = prepare(args.data)
        res = evaluate_data(prep, heads, checkpoints)  # graded metrics if the log has grades, click metrics always
        print_data_table(f"held-out sessions ({args.data})", res)
        if args.out:
            data = results_bytes(res)
            atomic_write(Path(args.out) / "results.json", lambda f: f.write(data))
    return 0


def averaged_row(res: dict[str, Any]) -> dict[str, dict[str, float]]:
    """The tail-averaged head's row (``averaged.pt``, ``server.average-rounds``), when the run wrote one."""
    avg = res.get("averaged") or {}
    if not avg:
        return {}
    first, last = avg["rounds"]
    return {f"  mean of rounds {first}-{last} (averaged.pt)": avg["central"]}


def cmd_simulate(args: argparse.Namespace) -> int:
    from simulations.runner import resume_config, simulate, simulate_config

    if args.resume:
        res = simulate_config(resume_config(args.resume, args.rounds), scenario=f"resumed {args.resume}",
                              local_only=args.local_only, central=not args.no_reference)
    elif args.scenario:
        res = simulate(args.scenario, rounds=args.rounds, out=args.out, extra=parse_sets(args.set),
                       local_only=args.local_only, central=not args.no_reference)
    else:
        print("fedrank simulate: give --scenario NAME or --resume DIR", file=sys.stderr)
        return 2
    rows = {f"federated ({res['run_config']['strategy.name']})": res["final"]}
    rows.update(averaged_row(res))
    rows.update(res.get("references", {}))
    print_table(f"{res['scenario']}: held-out sessions after {len(res['rounds'])} rounds", rows)
    spr = res["seconds_per_round"]
    print(f"seconds per round min/median/max: {spr['min']:.1f}/{spr['median']:.1f}/{spr['max']:.1f}; "
          f"peak memory (process tree) {res.get('peak_tree_rss_mb', res['peak_rss_mb']):.0f} MiB; results: {Path(res['run_config']['server.out-dir']) / 'results.json'}")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    """Marketplace -> centralized baselines -> federated simulation -> one comparison table."""
    from shared_model.prepared import prepare
    from simulations.centralized import run_baselines
    from simulations.runner import simulate

    out = Path(args.out)
    cmd_generate(argparse.Namespace(catalog=None, out=args.data, preset=args.preset, seed=args.seed, skip_bad=False))
    prep = prepare(args.data)
    mcfg, tcfg = _model_and_train_cfg(args)
    with locked_dir(out / "baselines"):
        base = run_baselines(prep, out / "baselines", mcfg, tcfg, epochs=args.epochs, seed=args.seed)
    fed = simulate("demo", rounds=args.rounds, out=str(out / "federated"),
                   extra={"data.dir": args.data, "data.preset": args.preset, "data.seed": args.seed}, central=False)
    rows = dict(base["rankers"])
    cfg = fed["run_config"]
    rows[f"federated head ({cfg['strategy.name']}, {cfg['partition.num-clients']} clients, "
         f"{len(fed['rounds'])} rounds)"] = fed["final"]
    rows.update(averaged_row(fed))
    print_table(f"held-out sessions, {base['num_test_sessions']} slates ({args.data})", rows)
    share = fed["final"]["ndcg@10"] / base["rankers"]["fused head"]["ndcg@10"]
    print(f"federated / centralized fused head NDCG@10: {share:.1%}; "
          f"results: {out / 'baselines' / 'results.json'}, {out / 'federated' / 'results.json'}")
    return 0


def add_commands(subparsers: Any) -> None:
    """Register this area's commands on an ``argparse`` ``add_subparsers()`` object."""

    def add(name: str, fn: Callable[[argparse.Namespace], int], help_: str) -> argparse.ArgumentParser:
        return add_command(subparsers, name, fn, help_)

    g = add("generate", cmd_generate, "generate a simulated marketplace (or simulate shoppers over a real catalog)")
    g.add_argument("--out", required=True)
    g.add_argument("--preset", default="default", help="tiny | small | default | large")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--catalog", help="simulate users, queries and clicks over this catalog (generic CSV/TSV/JSONL, "
                                     "or a Kaggle fashion styles.csv with images/ beside it)")
    g.add_argument("--skip-bad", action="store_true", help="skip and count malformed catalog rows")

    def head_opts(sp: argparse.ArgumentParser) -> None:
        sp.add_argument("--data", default="data/default", help="data folder (fedrank generate --out)")
        sp.add_argument("--out", required=True)
        sp.add_argument("--epochs", type=int, default=12, help="at most; early stopping on validation clicks")
        sp.add_argument("--seed", type=int, default=0)
        sp.add_argument("--fusion", choices=["concat", "gated", "attention"])
        sp.add_argument("--loss", help="softmax | listnet | approx_ndcg | lambdaloss | ranknet")
        # simulations.centralized.CRITERIA / DEFAULT_CRITERION, spelt out so that --help does not import torch
        sp.add_argument("--selection", choices=["loss", "ips-dcg"], default="loss",
                        help="what picks the epochs on validation clicks: the debiased training loss (default) or "
                             "the IPS-estimated DCG@10")

    t = add("train", cmd_train, "train the head centrally on the pooled click logs (the upper bound)")
    head_opts(t)
    t.add_argument("--text-only", action="store_true", help="text modality only")
    t.add_argument("--naive", action="store_true", help="naive click training (no IPS)")
    t.add_argument("--catalog", help="train from judgments: a catalog (generic CSV/TSV/JSONL or Kaggle styles.csv)")
    t.add_argument("--judgments", help="train from judgments: query,item_id,grade rows (split by query)")
    t.add_argument("--gain", choices=["exp2", "linear"], help="with --judgments: the gain of grades (default exp2)")
    t.add_argument("--label-map", metavar="FILE_OR_INLINE", help="with --judgments: text label -> grade")
    t.add_argument("--max-grade", type=float, metavar="G", help="with --judgments: the grade scale's top")
    t.add_argument("--skip-bad", action="store_true", help="with --judgments: skip and count malformed rows")
    t.add_argument("--devices", type=int, default=0, metavar="N",
                   help="with --judgments: also train federated over N devices through Flower's simulation engine "
                        "(scenario 'judged'; writes OUT/data and OUT/federated)")
    t.add_argument("--rounds", type=int, default=30, help="with --devices: federated rounds at most")
    t.add_argument("--local-epochs", type=int, default=2, help="with --devices: epochs per device per round")
    b = add("baselines", cmd_baselines, "train every head variant and compare all rankers on held-out sessions")
    head_opts(b)

    e = add("evaluate", cmd_evaluate, "score rankers on held-out sessions or on a catalog + judgments file")
    e.add_argument("--data", default="data/default")
    e.add_argument("--checkpoint", action="append", help="a trained head (repeatable)")
    e.add_argument("--catalog", help="a catalog (generic CSV/TSV/JSONL, or a Kaggle fashion styles.csv)")
    e.add_argument("--judgments", help="query,item_id,grade rows (CSV/TSV/JSONL; ESCI's query,product_id,esci_label)")
    e.add_argument("--out")
    e.add_argument("--skip-bad", action="store_true")
    e.add_argument("--gain", choices=["exp2", "linear"], help="NDCG gain: exp2 = 2^grade - 1 (default), linear = grade")
    e.add_argument("--label-map", metavar="FILE_OR_INLINE",
                   help="text label -> grade, e.g. 'E=3,S=2,C=1,I=0' (the default) or a .json/.toml file")
    e.add_argument("--max-grade", type=float, metavar="G",
                   help="the grade scale's top (grades above are errors); default: the largest grade judged")
    e.add_argument("--ltr-data", metavar="DATA",
                   help="with --judgments: add LightGBM LambdaRank trained on DATA's clicks (IPS) to the table")
    e.add_argument("--ltr-judgments", action="store_true",
                   help="with --judgments: add LightGBM trained on the judgments (query split; every ranker is then "
                        "also reported on the held-out test queries)")
    e.add_argument("--seed", type=int, default=0, help="with --ltr-*: LightGBM's seed and the query split's")

    sm = add("simulate", cmd_simulate, "run a federated scenario through Flower's simulation engine")
    sm.add_argument("--scenario", help="name in simulations/scenarios/ or a .toml path")
    sm.add_argument("--resume", metavar="DIR", help="continue the interrupted run in DIR from its last checkpoint")
    sm.add_argument("--rounds", type=int)
    sm.add_argument("--out")
    sm.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a run-config value (repeatable)")
    sm.add_argument("--local-only", action="store_true", help="also compute the local-only lower bound")
    sm.add_argument("--no-reference", action="store_true", help="skip the centralized upper bound")

    d = add("demo", cmd_demo, "the main job on the embedded default data")
    d.add_argument("--data", default="data/default")
    d.add_argument("--out", default="runs/demo")
    d.add_argument("--preset", default="default")
    d.add_argument("--seed", type=int, default=0)
    d.add_argument("--epochs", type=int, default=12)
    d.add_argument("--rounds", type=int, help="federated rounds (default: the demo scenario's)")
