"""Judged queries as a data folder that ``fedrank simulate`` reads unchanged (:func:`write_judged_data`).

``fedrank train --catalog C --judgments J --devices N`` trains its federated head through Flower's simulation
engine (the project's ServerApp and ClientApp, :mod:`simulations.runner`); this module writes the data folder that
run reads, as ``fedrank import-logs`` writes one for a shop's logs:

``catalog.jsonl``
    the whole catalog (image paths point at the original files), so the dense features are the central head's.
``sessions.npz``
    a :class:`shared_model.schema.SessionLog`: one session per judged query placed on a device, its judged items
    in BM25 order (:func:`simulations.evaluate.judged_sessions`). ``user`` = the device (``natural`` partition:
    one device per user id). ``clicks`` = the training labels of the grades for ``train.loss``
    (float32; ``SessionLog`` and the loader take any number, and every loss takes graded labels: see
    :func:`simulations.judged_training.label_values`). ``grades`` = the judged grades (evaluation only),
    ``purchases`` = 0, ``randomized`` = false, ``timestamp`` = the session's place on its device.
``log_extra.npz``
    every list marked ``resorted``: no shopper saw the BM25 order, so the lists say nothing about position bias
    and :func:`shared_model.prepared.prepare` estimates no propensities from them (uniform; the judged scenario
    trains without IPS anyway).
``meta.json``
    ``generator``, the sources, counts, the labels and the ``judged`` layout (which queries each device holds).

What is held out. The training queries (``split["train"]``) are dealt to the devices (:func:`partition_queries`,
seeded, as even as possible). :func:`shared_model.data.split_by_time` (what ``prepare`` and every client use)
holds out each device's last ``round(20%)`` sessions (at least one when it has two or more), so each device
gets, after its training sessions, exactly as many held-out sessions as that split takes
(:func:`held_out_slots`): test queries first, then validation queries, then (only when the devices have more
slots than there are held-out queries) held-out queries again. No training query is ever in the test split,
and no held-out query ever in the training split (checked after writing). Held-out queries beyond the slots
stay with the server only, like the validation queries that choose the round: the reported figures score every
test query on the server from the judgments (:func:`simulations.judged_training.train_from_judgments`).
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import numpy as np

from shared_model.catalog_io import save_catalog_jsonl
from shared_model.data import split_by_time
from shared_model.logs_io import EXTRA_FILE, LogExtra
from shared_model.outdir import staged_dir
from shared_model.prepared import TEST_FRAC
from shared_model.schema import Catalog, SessionLog, atomic_write

GENERATOR = "fedrank train --judgments (judged data folder)"
HELD_OUT_ORDER = ("test", "validation")  # which held-out queries fill the devices' held-out slots first


class JudgedDataError(ValueError):
    """The judged data folder cannot be written (a folder that is not one in the way, too few queries)."""


def partition_queries(train_idx: np.ndarray, num_devices: int, seed: int = 0) -> list[np.ndarray]:
    """Deal the training queries to ``num_devices`` devices (seeded, as even as possible, each non-empty)."""
    if num_devices < 1:
        raise ValueError(f"num_devices must be >= 1, got {num_devices}")
    if num_devices > len(train_idx):
        raise ValueError(f"{num_devices} devices but only {len(train_idx)} training queries: each device needs one")
    shuffled = np.random.default_rng([seed, 12]).permutation(np.asarray(train_idx))
    return [np.sort(part) for part in np.array_split(shuffled, num_devices)]


def held_out_slots(num_train: int, test_frac: float = TEST_FRAC) -> int:
    """How many sessions to add after a device's ``num_train`` training sessions so that
    :func:`shared_model.data.split_by_time` holds out exactly those (its rule: the last ``round(n * test_frac)``
    of ``n`` sessions, at least one when ``n >= 2``)."""
    for k in range(num_train + 2):
        n = num_train + k
        n_test = int(round(n * test_frac))
        if n >= 2:
            n_test = max(1, n_test)
        if n_test == k:
            return k
    raise ValueError(f"no held-out count fits a device with {num_train} training sessions at test_frac={test_frac}")


def device_layout(split: dict[str, np.ndarray], num_devices: int, seed: int = 0) -> list[dict[str, list[int]]]:
    """Per device, the query indices of its ``train`` sessions (in their order) and of its ``held_out`` sessions
    (after them): see the module docstring."""
    rng = np.random.default_rng([seed, 13])
    shares = partition_queries(split["train"], num_devices, seed)
    pool = np.concatenate([rng.permutation(np.asarray(split[k], np.int64)) for k in HELD_OUT_ORDER])
    slots = [held_out_slots(len(s)) for s in shares]
    if sum(slots) and not len(pool):
        raise JudgedDataError("no held-out queries to put in the devices' held-out sessions")
    picks = np.resize(pool, sum(slots)) if len(pool) else np.zeros(0, np.int64)  # cycles when slots > pool
    bounds = np.cumsum([0, *slots])
    return [{"train": rng.permutation(share).tolist(), "held_out": picks[bounds[d]:bounds[d + 1]].tolist()}
            for d, share in enumerate(shares)]


def judged_log(sessions: SessionLog, labels: np.ndarray, layout: list[dict[str, list[int]]]) -> SessionLog:
    """The devices' sessions (see the module docstring) from the judged sessions (one per query, ``labels`` [M]
    per impression)."""
    if labels.shape != sessions.clicks.shape:
        raise ValueError(f"labels {labels.shape} do not match the {sessions.clicks.shape} impressions")
    labelled = dataclasses.replace(sessions, clicks=labels.astype(np.float32),
                                   purchases=np.zeros_like(sessions.purchases, dtype=np.uint8))
    order = np.array([q for dev in layout for q in (*dev["train"], *dev["held_out"])], np.int64)
    per_device = [len(dev["train"]) + len(dev["held_out"]) for dev in layout]
    out = labelled.subset(order)
    out.user = np.repeat(np.arange(len(layout), dtype=np.int32), per_device)
    out.timestamp = np.concatenate([np.arange(n, dtype=np.int64) for n in per_device]) if per_device \
        else np.zeros(0, np.int64)
    out.randomized = np.zeros(len(order), bool)
    return out


def _check_replaceable(out: Path) -> None:
    if not out.exists():
        return
    if not out.is_dir():
        raise JudgedDataError(f"{out}: exists and is not a folder")
    if any(out.iterdir()):
        try:
            generator = json.loads((out / "meta.json").read_text()).get("generator")
        except (OSError, ValueError, AttributeError):
            generator = None
        if generator != GENERATOR:
            raise JudgedDataError(f"{out}: not empty and not a judged data folder; refusing to replace it")


def write_judged_data(
    out_dir: str | Path,
    catalog: Catalog,
    sessions: SessionLog,
    labels: np.ndarray,
    split: dict[str, np.ndarray],
    num_devices: int,
    seed: int = 0,
    info: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Write the judged data folder ``out_dir`` (see the module docstring), built beside it and swapped in whole.

    Parameters
    ----------
    catalog : the catalog the judged ``sessions`` index
    sessions : one session per judged query (:func:`simulations.evaluate.judged_sessions`)
    labels : float [M] the training label of every impression of ``sessions`` (its ``clicks`` in the folder)
    split : query indices by ``train`` / ``validation`` / ``test``
    info : more for ``meta.json`` (sources, labels)

    Returns
    -------
    The ``judged`` block of ``meta.json``: the devices' queries and what is held out.
    """
    out = Path(out_dir)
    layout = device_layout(split, num_devices, seed)
    log_ = judged_log(sessions, labels, layout)
    held = np.array([q for dev in layout for q in dev["held_out"]], np.int64)
    expected_test = np.flatnonzero(np.concatenate(
        [np.r_[np.zeros(len(d["train"]), bool), np.ones(len(d["held_out"]), bool)] for d in layout]))
    _, test_idx = split_by_time(log_, TEST_FRAC)
    if not np.array_equal(test_idx, expected_test):  # the module's promise: held out = exactly the held-out queries
        raise RuntimeError("judged data folder: split_by_time does not hold out exactly the held-out sessions")
    placed = {k: int(np.isin(np.unique(held), split[k]).sum()) for k in HELD_OUT_ORDER}
    judged = {
        "devices": len(layout),
        "queries_per_device": [len(d["train"]) for d in layout],
        "held_out_per_device": [len(d["held_out"]) for d in layout],
        "held_out": {"rule": f"each device's last sessions: split_by_time(test_frac={TEST_FRAC})",
                     "sessions": int(len(held)), "distinct_queries": placed,
                     "repeated_sessions": int(len(held) - len(np.unique(held))),
                     "server_only": {k: int(len(split[k])) - placed[k] for k in HELD_OUT_ORDER}},
        "split_queries": {k: int(len(v)) for k, v in split.items()},
        "seed": seed,
        "layout": layout,
    }
    n_imp = int(log_.offsets[-1])
    meta = {
        "generator": GENERATOR, **(info or {}),
        "counts": {"items": len(catalog), "users": len(layout), "sessions": len(log_), "queries": len(log_.queries),
                   "impressions": n_imp, "randomized_sessions": 0, "resorted_sessions": len(log_)},
        "judged": judged,
        "files": {"catalog": "catalog.jsonl", "sessions": "sessions.npz", "extra": EXTRA_FILE},
    }
    extra = LogExtra(user_ids=np.array([f"device-{u}" for u in log_.user]),
                     session_ids=np.array([f"query-{q}" for q in log_.query]),
                     resorted=np.ones(len(log_), bool), device=np.array(["judged"] * len(log_)),
                     price_shown=np.full(n_imp, np.nan, np.float32))
    _check_replaceable(out)
    with staged_dir(out) as staging:
        save_catalog_jsonl(catalog, staging / "catalog.jsonl")
        log_.save(staging / "sessions.npz")
        extra.save(staging / EXTRA_FILE)
        payload = (json.dumps(meta, indent=1, ensure_ascii=False) + "\n").encode("utf-8")
        atomic_write(staging / "meta.json", lambda f: f.write(payload))
    return judged
