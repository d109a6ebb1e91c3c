"""Marketplace files: ``sessions.npz`` (byte-reproducible), ``users.json``, ``judgments.csv`` and meta content."""

from __future__ import annotations

import csv
import io
import json
import os
import zipfile
from pathlib import Path
from typing import Any

import numpy as np

from shared_model.schema import Catalog, SessionLog, atomic_write
from simulations.market_config import MarketConfig, random_streams
from simulations.market_users import Users

__all__ = ["ground_truth", "read_meta", "save_session_log", "summary_counts", "write_json", "write_judgments",
           "write_session_files"]


def save_session_log(sessions: SessionLog, path: str | os.PathLike[str]) -> None:
    """Save like :meth:`SessionLog.save` (same arrays, loadable by :meth:`SessionLog.load`), atomically, but
    byte-reproducibly: zip entry timestamps are fixed, so the same log always gives the same bytes."""
    arrays = {k: np.asanyarray(getattr(sessions, k)) for k in SessionLog.ARRAYS}
    arrays["queries_json"] = np.array(json.dumps(sessions.queries))

    def write(f: io.BufferedWriter) -> None:
        with zipfile.ZipFile(f, mode="w", compression=zipfile.ZIP_DEFLATED) as zf:
            for name, arr in arrays.items():
                info = zipfile.ZipInfo(name + ".npy", date_time=(1980, 1, 1, 0, 0, 0))
                info.compress_type = zipfile.ZIP_DEFLATED
                info.external_attr = 0o644 << 16
                with zf.open(info, "w", force_zip64=True) as fid:
                    np.lib.format.write_array(fid, arr, allow_pickle=False)

    atomic_write(Path(path), write)


def write_json(path: Path, obj: Any) -> None:
    """Write ``obj`` as indented UTF-8 JSON, atomically."""
    payload = (json.dumps(obj, indent=1, ensure_ascii=False) + "\n").encode("utf-8")
    atomic_write(path, lambda f: f.write(payload))


def read_meta(path: Path) -> Any:
    """The content of an existing ``meta.json`` ({} when unreadable)."""
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return {}


def write_judgments(path: Path, catalog: Catalog, sessions: SessionLog, cfg: MarketConfig,
                    num_queries: int = 200) -> int:
    """Write ``query,item_id,grade`` rows for the first slate of up to ``num_queries`` drawn queries; row count."""
    rng = np.random.default_rng(random_streams(cfg.seed)["judgments"])
    uq, first = np.unique(sessions.query, return_index=True)
    take = np.sort(rng.choice(len(uq), size=min(num_queries, len(uq)), replace=False))
    buf = io.StringIO(newline="")
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["query", "item_id", "grade"])
    rows = 0
    ids = catalog.ids()
    for k in take:
        s = int(first[k])
        q = sessions.queries[int(uq[k])]
        sl = sessions.slate(s)
        for i, g in zip(sessions.items[sl].tolist(), sessions.grades[sl].tolist(), strict=True):
            w.writerow([q, ids[i], g])
            rows += 1
    payload = buf.getvalue().encode("utf-8")
    atomic_write(path, lambda f: f.write(payload))
    return rows


def summary_counts(catalog: Catalog, sessions: SessionLog) -> dict[str, Any]:
    """The ``counts`` block of ``meta.json``."""
    n_imp = int(sessions.offsets[-1])
    return {
        "items": len(catalog),
        "items_with_video": sum(1 for it in catalog if it.video_frames),
        "items_with_feature": sum(1 for it in catalog if it.attributes.get("feature")),
        "users": int(sessions.user.max()) + 1 if len(sessions) else 0,
        "sessions": len(sessions),
        "randomized_sessions": int(sessions.randomized.sum()),
        "queries": len(sessions.queries),
        "impressions": n_imp,
        "clicks": int(sessions.clicks.sum()),
        "purchases": int(sessions.purchases.sum()),
        "ctr": round(float(sessions.clicks.mean()), 5) if n_imp else 0.0,
    }


def ground_truth(cfg: MarketConfig) -> dict[str, Any]:
    """The ``ground_truth`` block of ``meta.json``: the click and purchase model actually used."""
    return {
        "eta": cfg.eta,
        "examination": "(1 / (display_position + 1)) ** eta, display_position 0 = top",
        "click_eps": cfg.click_eps,
        "attractiveness": "clip((eps + (1 - eps) * (2**grade - 1) / 7) * (1 + utility_gain * utility), 0, 1)",
        "utility_gain": cfg.utility_gain,
        "purchase": "clip((base + g2*[grade==2] + g3*[grade==3]) * (1 + purchase_utility * utility), 0, 1)",
        "purchase_params": {"base": cfg.purchase_base, "g2": cfg.purchase_grade2, "g3": cfg.purchase_grade3,
                            "purchase_utility": cfg.purchase_utility},
        "randomized_share": cfg.randomized_share,
    }


def write_session_files(out: Path, catalog: Catalog, users: Users, sessions: SessionLog,
                        cfg: MarketConfig) -> dict[str, Any]:
    """Write ``users.json``, ``judgments.csv`` and ``sessions.npz`` (last) into ``out``; the meta counts."""
    write_json(out / "users.json", users.to_json())
    n_judg = write_judgments(out / "judgments.csv", catalog, sessions, cfg)
    save_session_log(sessions, out / "sessions.npz")
    result = summary_counts(catalog, sessions)
    result["judgments"] = n_judg
    return result
