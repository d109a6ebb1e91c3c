"""Split the marketplace's shoppers into federated clients and write one data shard per client.

A shard is what one device holds: its own sessions (impressions, clicks, purchases; a time-based train/test
split) and the embeddings of exactly the items its slates and history need. A ClientApp reads only its shard.

Schemes (partitioners from ``flwr-datasets``, applied to the table of users):
    natural    one shopper per client (``NaturalIdPartitioner`` on the user id)
    iid        shoppers spread uniformly at random (``IidPartitioner``)
    dirichlet  per-client mix of user segments drawn from Dirichlet(alpha) (``DirichletPartitioner``)
    quantity   client sizes drawn from a log-normal, so a few clients hold many shoppers (``SizePartitioner``)
The non-natural schemes group several shoppers into one client (a cohort), to study heterogeneity at a number
of clients the data set does not have shoppers for.
"""

from __future__ import annotations

import json
import logging
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from shared_model.config import RunSettings
from shared_model.data import ItemTable, Slates, build_slates
from shared_model.prepared import Prepared
from shared_model.schema import SessionLog, atomic_write

log = logging.getLogger(__name__)
SCHEMES = ("natural", "iid", "dirichlet", "quantity")
SHARD_FORMAT = 1


def user_segments(data_dir: Path, users: np.ndarray) -> np.ndarray:
    """Segment of each user id (from the simulator's users.json; 0 for all if absent)."""
    path = data_dir / "users.json"
    if not path.is_file():
        return np.zeros(len(users), np.int64)
    info = json.loads(path.read_text())
    rows = info["users"] if isinstance(info, dict) and "users" in info else info
    seg = {int(u.get("user_id", i)): int(u.get("segment", 0)) for i, u in enumerate(rows)}
    return np.array([seg.get(int(u), 0) for u in users], np.int64)


def partition_users(
    users: np.ndarray, segments: np.ndarray, scheme: str, num_clients: int, alpha: float = 0.5, seed: int = 0
) -> list[np.ndarray]:
    """User ids of each client."""
    import datasets
    from flwr_datasets import partitioner as fp

    if scheme not in SCHEMES:
        raise ValueError(f"partition.scheme: {scheme!r} is not one of {SCHEMES}")
    users = np.asarray(users)
    if scheme == "natural":
        if num_clients > len(users):
            raise ValueError(f"partition.num-clients={num_clients} but the data has only {len(users)} shoppers")
        chosen = np.sort(np.random.default_rng(seed).choice(users, size=num_clients, replace=False))
        return [np.array([u]) for u in chosen]
    if num_clients > len(users):
        raise ValueError(f"partition.num-clients={num_clients} exceeds the {len(users)} shoppers to group")
    ds = datasets.Dataset.from_dict({"user": users.tolist(), "segment": segments.tolist()})
    if scheme == "iid":
        part: fp.Partitioner = fp.IidPartitioner(num_partitions=num_clients)
    elif scheme == "dirichlet":
        part = fp.DirichletPartitioner(num_partitions=num_clients, partition_by="segment", alpha=alpha,
                                       min_partition_size=1, self_balancing=True, seed=seed)
    else:
        ds = ds.shuffle(seed=seed)
        raw = np.random.default_rng(seed).lognormal(0.0, 1.0, num_clients)
        extra = np.floor(raw / raw.sum() * (len(users) - num_clients)).astype(int)
        extra[: len(users) - num_clients - extra.sum()] += 1
        part = fp.SizePartitioner(partition_sizes=(1 + extra).tolist())
    part.dataset = ds
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return [np.array(part.load_partition(i)["user"], np.int64) for i in range(num_clients)]


def shard_dir(settings: RunSettings) -> Path:
    """Where the data folder keeps one shard per client for this partitioning."""
    p = settings.partition
    return Path(settings.data.dir) / "clients" / f"{p.scheme}-{p.num_clients}-a{p.alpha:g}-s{p.seed}"


def shard_path(settings: RunSettings, node_config: dict[str, object]) -> Path:
    """A deployed SuperNode names its shard (``data-shard``); a simulated one maps its partition id."""
    if "data-shard" in node_config:
        return Path(str(node_config["data-shard"]))
    pid = int(node_config["partition-id"])  # type: ignore[call-overload]
    n = int(node_config.get("num-partitions", settings.partition.num_clients))  # type: ignore[call-overload]
    if n != settings.partition.num_clients:
        raise ValueError(f"{n} simulated nodes but partition.num-clients={settings.partition.num_clients}: "
                         "run with as many nodes as clients")
    return shard_dir(settings) / f"{pid}.npz"


def ensure_shards(prep: Prepared, settings: RunSettings) -> list[Path]:
    """One shard per client (what each device holds), written once per partitioning."""
    p = settings.partition
    users = np.unique(prep.log.user)
    clients = partition_users(users, user_segments(prep.data_dir, users), p.scheme, p.num_clients, p.alpha, p.seed)
    return write_shards(prep, shard_dir(settings), clients)


@dataclass
class ClientData:
    train: Slates
    test: Slates
    table: ItemTable
    num_users: int


def write_shards(prep: Prepared, out_dir: Path, clients: list[np.ndarray]) -> list[Path]:
    """One ``<cid>.npz`` per client in ``out_dir`` (atomic; skipped if the folder is already complete)."""
    done = out_dir / "DONE.json"
    paths = [out_dir / f"{cid}.npz" for cid in range(len(clients))]
    if done.is_file() and json.loads(done.read_text()).get("num_clients") == len(clients):
        return paths
    lg = prep.log
    test_set = np.zeros(len(lg), bool)
    test_set[prep.test_idx] = True
    sess_of_user: dict[int, list[int]] = {}
    for s, u in enumerate(lg.user):
        sess_of_user.setdefault(int(u), []).append(s)
    st = prep.store
    prices = prep.prices
    for cid, users in enumerate(clients):
        sessions = np.sort(np.concatenate([np.array(sess_of_user.get(int(u), []), np.int64) for u in users]))
        sub = lg.subset(sessions)
        rows = np.unique(sub.items)
        qids, qlocal = np.unique(sub.query, return_inverse=True)
        arrays = {k: getattr(sub, k) for k in SessionLog.ARRAYS}
        arrays["query"] = qlocal.astype(np.int32)
        arrays["items"] = np.searchsorted(rows, sub.items).astype(np.int32)  # local item rows
        payload = {
            **{f"log_{k}": v for k, v in arrays.items()},
            "is_test": test_set[sessions], "rows": rows, "query_emb": prep.query_emb[qids].astype(np.float32),
            "text": st.text[rows], "image": st.image[rows], "video": st.video[rows],
            "mask": st.mask[rows], "dense": st.dense[rows], "price": prices[rows],
            "num_users": np.array(len(users)), "format": np.array(SHARD_FORMAT),
        }
        atomic_write(paths[cid], lambda f, p=payload: np.savez(f, **p))
    atomic_write(done, lambda f: f.write(json.dumps({"num_clients": len(clients)}).encode()))
    return paths


def load_shard(path: str | Path) -> ClientData:
    """A device's local data: train/test slates over its local item table."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: client shard not found")
    with np.load(path, allow_pickle=False) as z:
        if int(z["format"]) != SHARD_FORMAT:
            raise ValueError(f"{path}: shard format {int(z['format'])} != {SHARD_FORMAT}")
        kw = {k: z[f"log_{k}"] for k in SessionLog.ARRAYS}
        qemb = z["query_emb"]
        sub = SessionLog(queries=[""] * len(qemb), **kw)
        is_test = z["is_test"]
        table = ItemTable.from_store(_Arrays(z["text"], z["image"], z["video"], z["mask"], z["dense"]))
        price = z["price"]
        n_users = int(z["num_users"])
    train = build_slates(sub, qemb, price, sessions=np.flatnonzero(~is_test))
    test = build_slates(sub, qemb, price, sessions=np.flatnonzero(is_test))
    return ClientData(train=train, test=test, table=table, num_users=n_users)


@dataclass
class _Arrays:
    text: np.ndarray
    image: np.ndarray
    video: np.ndarray
    mask: np.ndarray
    dense: np.ndarray
