"""Update compression frontier: bytes per device per round against NDCG@10, on the `dirichlet` scenario.

Every variant is the same seeded run (100 non-IID clients, 30% sampled per round, 30 rounds, the same devices
drawn each round) with only ``compression.*`` changed, so differences come from compression alone. Bytes are
Flower's own message-size accounting (``Record.count_bytes``) of the train messages, from each run's
``results.json`` (``upload_bytes_per_device``, ``download_bytes_per_device``).

    python benchmarks/compression_frontier.py --out runs/compression            # all variants (one run each)
    python benchmarks/compression_frontier.py --out runs/compression --only fp32 int8
    python benchmarks/compression_frontier.py --out runs/compression --report   # tabulate finished runs only

Prints a table (KB up / down per device per round, final NDCG@10, % of the uncompressed run, seconds per round)
and writes ``frontier.json`` and ``frontier.png`` into ``--out``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

VARIANTS: dict[str, dict[str, Any]] = {
    "fp32": {},
    "int8": {"compression.uplink": "int8"},
    "topk-10%": {"compression.uplink": "topk", "compression.topk-fraction": 0.1},
    "topk-1%": {"compression.uplink": "topk", "compression.topk-fraction": 0.01},
    "fp16": {"compression.uplink": "fp16"},
    "int8+fp16-down": {"compression.uplink": "int8", "compression.downlink": "fp16"},
    "int8-channel": {"compression.uplink": "int8", "compression.int8-granularity": "channel"},
    "topk-10%-no-ef": {"compression.uplink": "topk", "compression.topk-fraction": 0.1,
                       "compression.error-feedback": False},
}
BASE = "fp32"


def run_variant(name: str, out: Path, scenario: str, rounds: int | None) -> None:
    from simulations.runner import simulate

    simulate(scenario, rounds=rounds, out=str(out / name), extra=VARIANTS[name], central=False, progress=False)


def summarize(name: str, results: dict[str, Any]) -> dict[str, Any]:
    import numpy as np

    rounds = results["rounds"]
    up = [r["upload_bytes_per_device"] for r in rounds if "upload_bytes_per_device" in r]
    down = [r["download_bytes_per_device"] for r in rounds if "download_bytes_per_device" in r]
    return {
        "variant": name, "config": VARIANTS.get(name, {}),
        "upload_kb_per_device": float(np.mean(up)) / 1000 if up else None,
        "download_kb_per_device": float(np.mean(down)) / 1000 if down else None,
        "ndcg@10": results["final"].get("ndcg@10"), "mrr": results["final"].get("mrr"),
        "ndcg_per_round": [r.get("central", {}).get("ndcg@10") for r in rounds],
        "seconds_per_round": results["seconds_per_round"],
        "rejected": sum(int(r.get("rejected", 0)) for r in rounds),
    }


def plot(rows: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(12, 4.5))
    for r in rows:
        a.scatter(r["upload_kb_per_device"], r["ndcg@10"], s=40)
        a.annotate(r["variant"], (r["upload_kb_per_device"], r["ndcg@10"]), textcoords="offset points",
                   xytext=(5, 3), fontsize=8)
        b.plot(range(1, len(r["ndcg_per_round"]) + 1), r["ndcg_per_round"], label=r["variant"], lw=1.2)
    a.set_xscale("log")
    a.axvline(150, ls="--", c="grey", lw=0.8)
    a.set_xlabel("uploaded KB per device per round (Flower's count_bytes)")
    a.set_ylabel("final NDCG@10")
    a.set_title("compression frontier (dirichlet, 30 rounds)")
    b.set_xlabel("round")
    b.set_ylabel("NDCG@10 (held-out sessions)")
    b.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="runs/compression")
    ap.add_argument("--scenario", default="dirichlet")
    ap.add_argument("--rounds", type=int, help="server.num-rounds (default: the scenario's)")
    ap.add_argument("--only", nargs="+", choices=sorted(VARIANTS), help="run these variants only")
    ap.add_argument("--report", action="store_true", help="run nothing: tabulate the finished runs in --out")
    args = ap.parse_args()
    out = Path(args.out)
    names = args.only or list(VARIANTS)
    if not args.report:
        for name in names:
            print(f"running {name} ...", flush=True)
            run_variant(name, out, args.scenario, args.rounds)
    rows = [summarize(n, json.loads((out / n / "results.json").read_text()))
            for n in VARIANTS if (out / n / "results.json").is_file()]
    base = next((r for r in rows if r["variant"] == BASE), None)
    print(f"{'variant':<16} {'KB up':>8} {'KB down':>8} {'NDCG@10':>8} {'% fp32':>7} {'s/round (min/med/max)':>22}")
    for r in rows:
        r["pct_of_fp32"] = 100 * r["ndcg@10"] / base["ndcg@10"] if base else None
        spr = r["seconds_per_round"]
        pct = f"{r['pct_of_fp32']:.2f}" if r["pct_of_fp32"] is not None else "-"
        print(f"{r['variant']:<16} {r['upload_kb_per_device']:>8.1f} {r['download_kb_per_device']:>8.1f} "
              f"{r['ndcg@10']:>8.4f} {pct:>7} {spr['min']:>6.1f}/{spr['median']:.1f}/{spr['max']:.1f}")
    (out / "frontier.json").write_text(json.dumps(rows, indent=2))
    if rows:
        plot(rows, out / "frontier.png")
        print(f"wrote {out / 'frontier.json'} and {out / 'frontier.png'}")


if __name__ == "__main__":
    main()
