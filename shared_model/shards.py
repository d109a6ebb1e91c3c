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

Two layouts on disk, read by the same :func:`load_shard`:
    per-file  ``<cid>.npz``, one self-contained file per client (:func:`write_shards`): what a deployed
              SuperNode is given (``data-shard``); the embeddings of a client's items are copied into its file.
    packed    ``packed/``, one store for the whole partitioning (:func:`write_packed`, what simulations use:
              ``ensure_shards(..., layout="packed")``): every client's sessions concatenated in client order with an offsets index, and the item
              and query embedding tables once. Its ``.npy`` arrays are memory-mapped and a client's slice is read
              only when its device runs, so 10,000 clients cost the size of the log, not 10,000 copies of the
              embeddings of their items (about 3.5 MB per client of the ``fleet10k`` marketplace). A path
              ``<shard_dir>/<cid>.npz`` that is not a file resolves to partition ``cid`` of ``<shard_dir>/packed``,
              and what it loads equals the per-file shard exactly (``tests/test_fleet_scale.py``).
"""

from __future__ import annotations

import functools
import json
import logging
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from shared_model.config import RunSettings
from shared_model.data import ItemTable, Slates, build_slates
from shared_model.outdir import staged_dir
from shared_model.prepared import Prepared
from shared_model.schema import SessionLog, atomic_write

log = logging.getLogger(__name__)
SCHEMES = ("natural", "iid", "dirichlet", "quantity")
SHARD_FORMAT = 1
PACKED_FORMAT = 1
PACKED_DIR = "packed"  # inside a shard folder
PACKED_INDEX = "index.json"  # written last: a store without it is not complete
_SESSION_ARRAYS = ("user", "query", "randomized", "timestamp")  # SessionLog arrays with one value per session
_IMPRESSION_ARRAYS = ("items", "clicks", "purchases", "prod_rank", "retrieval_score", "grades", "utility")
_TABLES = ("text", "image", "video", "mask", "dense", "price", "query_emb")  # catalog-wide, stored once


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
        part = _dirichlet_partitioner(ds, num_clients, alpha, seed)  # its dataset already set
    else:
        ds = ds.shuffle(seed=seed)
        raw = np.random.default_rng(seed).lognormal(0.0, 1.0, num_clients)
        extra = np.floor(raw / raw.sum() * (len(users) - num_clients)).astype(int)
        extra[: len(users) - num_clients - extra.sum()] += 1
        part = fp.SizePartitioner(partition_sizes=(1 + extra).tolist())
    if scheme != "dirichlet":
        part.dataset = ds
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return [np.array(part.load_partition(i)["user"], np.int64) for i in range(num_clients)]


DIRICHLET_TRIES = 50


def _dirichlet_partitioner(ds: Any, num_clients: int, alpha: float, seed: int) -> Any:
    """flwr-datasets' ``DirichletPartitioner`` over ``ds``, its partition drawn once.

    It redraws per-client shares up to 10 times and raises when every draw leaves a client without a shopper,
    which is common with few shoppers per client (300 shoppers in 100 clients fail for most seeds at alpha 0.5).
    Then the draw is repeated with the derived seeds ``seed * 1000 + k`` (k = 1, 2, ...): a seed that works is
    always used as given, so existing partitions do not change, and a failing one still gives a deterministic
    partition (logged)."""
    from flwr_datasets import partitioner as fp

    tries = [seed, *(seed * 1000 + k for k in range(1, DIRICHLET_TRIES))]
    for used in tries:
        part = fp.DirichletPartitioner(num_partitions=num_clients, partition_by="segment", alpha=alpha,
                                       min_partition_size=1, self_balancing=True, seed=used)
        part.dataset = ds
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                part.load_partition(0)  # draws every client's share
        except ValueError:
            continue
        if used != seed:
            log.info("partition.seed %d leaves a Dirichlet(%g) client empty; using the derived seed %d", seed, alpha,
                     used)
        return part
    raise ValueError(f"no Dirichlet(alpha={alpha:g}) partition of {len(ds)} shoppers into {num_clients} non-empty "
                     f"clients for partition.seed {seed} or its {DIRICHLET_TRIES - 1} derived seeds: use fewer "
                     "clients or a larger partition.alpha")


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


SHARD_LAYOUTS = ("auto", "packed", "files")


def ensure_shards(prep: Prepared, settings: RunSettings, layout: str = "auto") -> list[Path]:
    """Every client's shard path (what each device holds), written once per partitioning.

    ``layout``: ``files`` makes sure there is one self-contained file per client (what a deployed SuperNode is
    given); ``packed`` uses complete per-file shards if they are there, else one packed store
    (:func:`write_packed`: what simulations use); ``auto`` uses whichever complete layout is there and writes
    per-file shards when there is none. Whatever the layout, ``<shard_dir>/<cid>.npz`` loads with :func:`load_shard`.
    """
    if layout not in SHARD_LAYOUTS:
        raise ValueError(f"shard layout {layout!r} is not one of {SHARD_LAYOUTS}")
    p = settings.partition
    out_dir = shard_dir(settings)
    paths = [out_dir / f"{cid}.npz" for cid in range(p.num_clients)]
    packed_there = _packed_clients(out_dir / PACKED_DIR) == p.num_clients
    if _per_file_complete(out_dir, p.num_clients) or (packed_there and layout != "files"):
        return paths  # partitioning once more (flwr-datasets for the non-natural schemes) is not needed
    users = np.unique(prep.log.user)
    clients = partition_users(users, user_segments(prep.data_dir, users), p.scheme, p.num_clients, p.alpha, p.seed)
    if layout == "packed":
        write_packed(prep, out_dir, clients)
        return paths
    return write_shards(prep, out_dir, clients)


@dataclass
class ClientData:
    train: Slates
    test: Slates
    table: ItemTable
    num_users: int


def _per_file_complete(out_dir: Path, num_clients: int) -> bool:
    done = out_dir / "DONE.json"
    return done.is_file() and json.loads(done.read_text()).get("num_clients") == num_clients


def _sessions_of_clients(prep: Prepared, clients: list[np.ndarray]) -> list[np.ndarray]:
    """Each client's session indices into ``prep.log``, in log order."""
    user = np.asarray(prep.log.user, np.int64)
    order = np.argsort(user, kind="stable")  # sessions grouped by user, log order kept within a user
    uniq, first = np.unique(user[order], return_index=True)
    bounds = dict(zip(uniq.tolist(), zip(first.tolist(), [*first[1:].tolist(), len(order)], strict=True),
                      strict=True))
    out = []
    for users in clients:
        parts = [order[bounds[int(u)][0]:bounds[int(u)][1]] for u in users if int(u) in bounds]
        out.append(np.sort(np.concatenate(parts)) if parts else np.zeros(0, np.int64))
    return out


def write_shards(prep: Prepared, out_dir: Path, clients: list[np.ndarray]) -> list[Path]:
    """One self-contained ``<cid>.npz`` per client in ``out_dir`` (atomic; skipped if the folder is already
    complete): the layout a deployed SuperNode is given. Simulations use :func:`write_packed`."""
    done = out_dir / "DONE.json"
    paths = [out_dir / f"{cid}.npz" for cid in range(len(clients))]
    if _per_file_complete(out_dir, len(clients)):
        return paths
    lg = prep.log
    test_set = np.zeros(len(lg), bool)
    test_set[prep.test_idx] = True
    st = prep.store
    prices = prep.prices
    for cid, (users, sessions) in enumerate(zip(clients, _sessions_of_clients(prep, clients), strict=True)):
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


def write_packed(prep: Prepared, out_dir: Path, clients: list[np.ndarray]) -> Path:
    """One packed store for all ``clients`` in ``out_dir/packed`` (see the module docstring); returns its folder.

    Built in a staging folder and swapped into place whole (:func:`shared_model.outdir.staged_dir`), so a
    killed writer leaves no half-written store; skipped if a complete store for as many clients is there.
    """
    target = out_dir / PACKED_DIR
    if _packed_clients(target) == len(clients):
        return target
    lg = prep.log
    sessions_of = _sessions_of_clients(prep, clients)
    sessions = np.concatenate([*sessions_of, np.zeros(0, np.int64)])
    client_sessions = np.zeros(len(clients) + 1, np.int64)
    np.cumsum([len(x) for x in sessions_of], out=client_sessions[1:])
    lens = (lg.offsets[sessions + 1] - lg.offsets[sessions]).astype(np.int64)
    packed_offsets = np.zeros(len(sessions) + 1, np.int64)  # where each session's impressions start, packed
    np.cumsum(lens, out=packed_offsets[1:])
    client_impressions = packed_offsets[client_sessions]
    # the log's impression rows of `sessions`, in order: the slate's start in the log + position within it
    flat = np.repeat(lg.offsets[sessions] - packed_offsets[:-1], lens) + np.arange(int(packed_offsets[-1]))
    test_set = np.zeros(len(lg), bool)
    test_set[prep.test_idx] = True
    st = prep.store
    arrays: dict[str, np.ndarray] = {
        "client_sessions": client_sessions, "client_impressions": client_impressions,
        "num_users": np.array([len(u) for u in clients], np.int64),
        "session_len": lens.astype(np.int64), "is_test": test_set[sessions],
        **{f"log_{k}": getattr(lg, k)[sessions] for k in _SESSION_ARRAYS},
        **{f"log_{k}": getattr(lg, k)[flat] for k in _IMPRESSION_ARRAYS},
        "text": st.text, "image": st.image, "video": st.video, "mask": st.mask, "dense": st.dense,
        "price": prep.prices, "query_emb": np.asarray(prep.query_emb, np.float32),
    }
    index = {"format": PACKED_FORMAT, "shard_format": SHARD_FORMAT, "num_clients": len(clients),
             "arrays": {k: [list(v.shape), str(v.dtype)] for k, v in arrays.items()}}
    with staged_dir(target) as stage:
        for name, arr in arrays.items():
            np.save(stage / f"{name}.npy", np.ascontiguousarray(arr), allow_pickle=False)
        (stage / PACKED_INDEX).write_text(json.dumps(index, indent=1))
    log.info("packed shard store %s: %d clients, %d sessions, %d impressions",
             target, len(clients), len(sessions), int(packed_offsets[-1]))
    return target


def _packed_clients(store: Path) -> int | None:
    """Clients in a complete packed store (its ``index.json``), or None."""
    index = store / PACKED_INDEX
    if not index.is_file():
        return None
    try:
        return int(json.loads(index.read_text())["num_clients"])
    except (ValueError, KeyError, TypeError):
        return None


@functools.lru_cache(maxsize=4)
def _open_packed(store: str, stamp: tuple[int, int]) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """A packed store's index and its arrays, memory-mapped (read only); one per process and store version
    (``stamp``: the index file's mtime and size, so a rewritten store is opened again)."""
    index_path = Path(store) / PACKED_INDEX
    try:
        index = json.loads(index_path.read_text())
        fmt, names = int(index["format"]), dict(index["arrays"])
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ValueError(f"{index_path}: unreadable packed shard index ({e})") from e
    if fmt != PACKED_FORMAT:
        raise ValueError(f"{index_path}: packed shard format {fmt} != {PACKED_FORMAT}")
    arrays: dict[str, np.ndarray] = {}
    for name, (shape, dtype) in names.items():
        path = Path(store) / f"{name}.npy"
        try:
            arr = np.load(path, mmap_mode="r", allow_pickle=False)
        except (OSError, ValueError) as e:
            raise ValueError(f"{path}: unreadable array of the packed shard store ({e})") from e
        if list(arr.shape) != list(shape) or str(arr.dtype) != dtype:
            raise ValueError(f"{path}: shape {list(arr.shape)} {arr.dtype}, index says {shape} {dtype}")
        arrays[name] = arr
    return index, arrays


def load_partition(store: str | Path, pid: int) -> ClientData:
    """Partition ``pid`` of the packed store in folder ``store``: equal to the per-file shard of that client."""
    store = Path(store)
    index_path = store / PACKED_INDEX
    try:
        st = index_path.stat()
    except OSError as e:
        raise FileNotFoundError(f"{index_path}: packed shard store not found") from e
    index, a = _open_packed(str(store.resolve()), (st.st_mtime_ns, st.st_size))
    n = int(index["num_clients"])
    if not 0 <= pid < n:
        raise FileNotFoundError(f"{index_path}: no partition {pid} in this packed shard store (it holds 0..{n - 1})")
    s0, s1 = int(a["client_sessions"][pid]), int(a["client_sessions"][pid + 1])
    i0, i1 = int(a["client_impressions"][pid]), int(a["client_impressions"][pid + 1])
    kw: dict[str, np.ndarray] = {k: np.array(a[f"log_{k}"][s0:s1]) for k in _SESSION_ARRAYS}
    kw.update({k: np.array(a[f"log_{k}"][i0:i1]) for k in _IMPRESSION_ARRAYS})
    offsets = np.zeros(s1 - s0 + 1, np.int64)
    np.cumsum(a["session_len"][s0:s1], out=offsets[1:])
    if offsets[-1] != i1 - i0:
        raise ValueError(f"{store}: partition {pid}: session lengths add up to {offsets[-1]}, not {i1 - i0}")
    kw["offsets"] = offsets
    rows = np.unique(kw["items"])
    kw["items"] = np.searchsorted(rows, kw["items"]).astype(np.int32)  # local item rows, as in a per-file shard
    qids, qlocal = np.unique(kw["query"], return_inverse=True)
    kw["query"] = qlocal.astype(np.int32)
    table = _Arrays(*(np.asarray(a[k][rows]) for k in ("text", "image", "video", "mask", "dense")))
    return _client_data(kw, np.asarray(a["query_emb"][qids]), np.array(a["is_test"][s0:s1]),
                        table, np.asarray(a["price"][rows]), int(a["num_users"][pid]))


def load_shard(path: str | Path) -> ClientData:
    """A device's local data: train/test slates over its local item table.

    ``path`` is a per-file shard, or ``<shard_dir>/<cid>.npz`` where ``<shard_dir>/packed`` is a packed store
    holding partition ``cid`` (see the module docstring).

    Raises
    ------
    FileNotFoundError
        Neither a shard file nor a partition of a packed store beside it (the message names the file and id).
    ValueError
        A shard or store in another format, or one whose arrays do not fit together (names the file).
    """
    path = Path(path)
    if not path.is_file():
        store = path.parent / PACKED_DIR
        if path.suffix == ".npz" and path.stem.isdigit() and (store / PACKED_INDEX).is_file():
            return load_partition(store, int(path.stem))
        raise FileNotFoundError(f"{path}: client shard not found")
    with np.load(path, allow_pickle=False) as z:
        if int(z["format"]) != SHARD_FORMAT:
            raise ValueError(f"{path}: shard format {int(z['format'])} != {SHARD_FORMAT}")
        kw = {k: z[f"log_{k}"] for k in SessionLog.ARRAYS}
        table = _Arrays(z["text"], z["image"], z["video"], z["mask"], z["dense"])
        return _client_data(kw, z["query_emb"], z["is_test"], table, z["price"], int(z["num_users"]))


def _client_data(kw: dict[str, np.ndarray], qemb: np.ndarray, is_test: np.ndarray, arrays: _Arrays,
                 price: np.ndarray, n_users: int) -> ClientData:
    """Slates from one client's log arrays (local query and item ids) and its item tables."""
    sub = SessionLog(queries=[""] * len(qemb), **kw)
    table = ItemTable.from_store(arrays)
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
