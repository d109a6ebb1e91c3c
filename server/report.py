"""Plots for experiment folders: NDCG@10 per round against the references, and per-client NDCG spread."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from shared_model.records import NDCG_GLOBAL, NDCG_PERSONAL, PNDCG_GLOBAL, PNDCG_PERSONAL  # noqa: E402


def plot_run(results: dict[str, Any], out: Path) -> list[Path]:
    """Write ``ndcg_per_round.png`` and ``client_ndcg.png`` into ``out``; returns the paths written."""
    written = []
    rounds = [r for r in results.get("rounds", []) if "central" in r]
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot([r["round"] for r in rounds], [r["central"].get("ndcg@10", float("nan")) for r in rounds],
            marker="o", label=f"federated ({results['run_config'].get('strategy.name', '')})")
    styles = {"centralized": ("k", "--"), "local-only": ("tab:red", ":")}
    for name, ref in results.get("references", {}).items():
        if "ndcg@10" in ref:
            color, ls = styles.get(name, ("tab:gray", "-."))
            ax.axhline(ref["ndcg@10"], color=color, linestyle=ls, label=name)
    ax.set_xlabel("round")
    ax.set_ylabel("NDCG@10 (held-out sessions)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    p = out / "ndcg_per_round.png"
    fig.savefig(p, dpi=110)
    plt.close(fig)
    written.append(p)

    clients = results.get("clients", {})
    names = {NDCG_GLOBAL: "global\nNDCG@10", NDCG_PERSONAL: "personalized\nNDCG@10",
             PNDCG_GLOBAL: "global\npersonal-gain NDCG@10", PNDCG_PERSONAL: "personalized\npersonal-gain NDCG@10"}
    data = [(names[k], clients[k]) for k in names if clients.get(k)]
    if data:
        fig, ax = plt.subplots(figsize=(8, 4))
        ax.boxplot([v for _, v in data], tick_labels=[n for n, _ in data], showmeans=True)
        ax.set_ylabel("per client, own held-out sessions")
        ax.set_title(f"{len(data[0][1])} clients, final round")
        ax.grid(alpha=0.3)
        fig.tight_layout()
        p = out / "client_ndcg.png"
        fig.savefig(p, dpi=110)
        plt.close(fig)
        written.append(p)
    return written
