"""From a session log and a feature store to padded slate tensors the head trains and is evaluated on.

One :class:`Slates` holds N sessions padded to S candidates. Item embeddings are not copied per session: slates
hold catalog rows into an :class:`ItemTable` (the feature store as tensors) and batches gather from it, so a
device holds each item it has seen once.

Every feature (slate features, dense layout, user context) is computed by ``shared_model/head_features.py``, the
same numpy functions the on-device runtime calls; this module only gathers rows and pads.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from shared_model.head_features import (
    HISTORY_LEN,
    SLATE_DENSE_DIM,
    head_feeds,
    log_prices,
    recent_history,
    slate_features,
    user_context,
)
from shared_model.schema import SessionLog


@dataclass
class ItemTable:
    """Per-item model inputs as tensors (rows = catalog rows, or a device's local subset)."""

    text: Tensor  # [N, Dt]
    image: Tensor  # [N, Di]
    video: Tensor  # [N, Di]
    mask: Tensor  # [N, 3] float
    dense: Tensor  # [N, Dd_item]

    @classmethod
    def from_store(cls, store: object) -> ItemTable:
        s = store
        return cls(
            text=torch.from_numpy(np.ascontiguousarray(s.text, dtype=np.float32)),  # type: ignore[attr-defined]
            image=torch.from_numpy(np.ascontiguousarray(s.image, dtype=np.float32)),  # type: ignore[attr-defined]
            video=torch.from_numpy(np.ascontiguousarray(s.video, dtype=np.float32)),  # type: ignore[attr-defined]
            mask=torch.from_numpy(np.asarray(s.mask, dtype=np.float32)),  # type: ignore[attr-defined]
            dense=torch.from_numpy(np.ascontiguousarray(s.dense, dtype=np.float32)),  # type: ignore[attr-defined]
        )


@dataclass
class Slates:
    """N sessions padded to S candidates (display order). ``grades``/``utility`` are for evaluation only."""

    query: Tensor  # [N, Dt]
    items: Tensor  # [N, S] long, rows into the ItemTable (0 at padding)
    valid: Tensor  # [N, S] bool
    slate_dense: Tensor  # [N, S, SLATE_DENSE_DIM] head_features.slate_features (0 at padding)
    user_items: Tensor  # [N, H] long, recently clicked rows (0 at padding)
    user_valid: Tensor  # [N, H] bool
    clicks: Tensor  # [N, S] float
    purchases: Tensor  # [N, S] float
    positions: Tensor  # [N, S] long display position
    grades: Tensor  # [N, S] float (evaluation only)
    utility: Tensor  # [N, S] float (evaluation only)
    session_ids: np.ndarray  # [N] index of each session in the source log
    users: np.ndarray  # [N]

    def __len__(self) -> int:
        return int(self.items.shape[0])

    def select(self, idx: np.ndarray | Tensor) -> Slates:
        ii = torch.as_tensor(np.asarray(idx), dtype=torch.long)
        kw = {k: getattr(self, k)[ii] for k in self.__dataclass_fields__ if k not in ("session_ids", "users")}
        return Slates(**kw, session_ids=self.session_ids[ii.numpy()], users=self.users[ii.numpy()])


def user_histories(log: SessionLog, history_len: int = HISTORY_LEN) -> list[list[int]]:
    """For every session, the catalog rows the same user clicked in earlier sessions (most recent last)."""
    order = np.lexsort((log.timestamp, log.user))
    recent: dict[int, deque[int]] = {}
    out: list[list[int]] = [[] for _ in range(len(log))]
    for s in order:
        u = int(log.user[s])
        dq = recent.setdefault(u, deque(maxlen=history_len))
        out[s] = list(dq)
        sl = log.slate(int(s))
        dq.extend(int(r) for r in log.items[sl][log.clicks[sl] > 0])
    return out


def build_slates(
    log: SessionLog,
    query_emb: np.ndarray,
    item_price: np.ndarray,
    sessions: np.ndarray | None = None,
    row_map: np.ndarray | None = None,
    max_slate: int | None = None,
    history_len: int = HISTORY_LEN,
) -> Slates:
    """Pad the log's sessions into tensors.

    Parameters
    ----------
    log : the sessions (``log.items`` are catalog rows)
    query_emb : [Q, Dt] embeddings of ``log.queries``
    item_price : [num_catalog_rows] raw prices (NaN allowed), for the slate-relative price feature
    sessions : which sessions to turn into slates (default all); user histories always come from the whole log,
        so a held-out session still sees the clicks of the same shopper's earlier (training) sessions
    row_map : optional [num_catalog_rows] map from catalog row to ItemTable row (a device's local subset)
    """
    hist_all = user_histories(log, history_len)
    sel = np.arange(len(log)) if sessions is None else np.asarray(sessions, np.int64)
    hist = [hist_all[s] for s in sel]
    log = log.subset(sel)
    n = len(log)
    lens = np.diff(log.offsets)
    S = int(max_slate or (lens.max() if n else 1))
    H = history_len
    items = np.zeros((n, S), np.int64)
    valid = np.zeros((n, S), bool)
    sdense = np.zeros((n, S, SLATE_DENSE_DIM), np.float32)
    clicks = np.zeros((n, S), np.float32)
    purch = np.zeros((n, S), np.float32)
    grades = np.zeros((n, S), np.float32)
    util = np.zeros((n, S), np.float32)
    uitems = np.zeros((n, H), np.int64)
    uvalid = np.zeros((n, H), bool)
    log_price = log_prices(item_price)
    for s in range(n):
        sl = log.slate(s)
        k = min(sl.stop - sl.start, S)
        rows = log.items[sl][:k]
        items[s, :k] = rows
        valid[s, :k] = True
        clicks[s, :k] = log.clicks[sl][:k]
        purch[s, :k] = log.purchases[sl][:k]
        grades[s, :k] = log.grades[sl][:k]
        util[s, :k] = log.utility[sl][:k]
        sdense[s, :k] = slate_features(log_price[rows], log.prod_rank[sl][:k], log.retrieval_score[sl][:k])
        h = recent_history(hist[s], H)
        uitems[s, : len(h)] = h
        uvalid[s, : len(h)] = True
    if row_map is not None:
        items = np.where(valid, row_map[items], 0)
        uitems = np.where(uvalid, row_map[uitems], 0)
        if (items[valid] < 0).any() or (uitems[uvalid] < 0).any():
            raise ValueError("row_map does not cover every item in the sessions")
    positions = np.broadcast_to(np.arange(S), (n, S)).copy()
    return Slates(
        query=torch.from_numpy(np.asarray(query_emb, np.float32)[log.query]) if n else torch.zeros(0, query_emb.shape[1]),
        items=torch.from_numpy(items),
        valid=torch.from_numpy(valid),
        slate_dense=torch.from_numpy(sdense),
        user_items=torch.from_numpy(uitems),
        user_valid=torch.from_numpy(uvalid),
        clicks=torch.from_numpy(clicks),
        purchases=torch.from_numpy(purch),
        positions=torch.from_numpy(positions),
        grades=torch.from_numpy(grades),
        utility=torch.from_numpy(util),
        session_ids=sel.copy(),
        users=log.user.astype(np.int64).copy(),
    )


def head_inputs(batch: Slates, table: ItemTable) -> dict[str, Tensor]:
    """The head's keyword inputs for a batch of slates (see ``FusedRankingHead.forward``): rows gathered from the
    table, features from :func:`shared_model.head_features.head_feeds` and ``user_context`` (as on the device)."""
    it, ui = batch.items, batch.user_items  # [B, S], [B, H]
    user = user_context(table.text[ui].numpy(), table.image[ui].numpy(), table.mask[ui][..., 1].numpy(),
                        batch.user_valid.numpy())  # [B, Dt], [B, Di], [B, 1]
    feeds = head_feeds(batch.query.numpy(), table.text[it].numpy(), table.image[it].numpy(), table.video[it].numpy(),
                       table.mask[it].numpy(), table.dense[it].numpy(), batch.slate_dense.numpy(), user,
                       valid=batch.valid.numpy())
    return {k: torch.from_numpy(v) for k, v in feeds.items()}


def iterate_batches(slates: Slates, batch_size: int, shuffle: bool, seed: int = 0) -> Iterator[Slates]:
    n = len(slates)
    order = np.random.default_rng(seed).permutation(n) if shuffle else np.arange(n)
    for start in range(0, n, batch_size):
        yield slates.select(order[start : start + batch_size])


def split_by_time(log: SessionLog, test_frac: float = 0.2) -> tuple[np.ndarray, np.ndarray]:
    """Per user, the last ``test_frac`` of sessions (by timestamp) are held out; returns (train, test) indices."""
    train: list[int] = []
    test: list[int] = []
    order = np.lexsort((log.timestamp, log.user))
    users = log.user[order]
    bounds = np.flatnonzero(np.diff(users)) + 1
    for group in np.split(order, bounds):
        n_test = int(round(len(group) * test_frac))
        if len(group) >= 2:
            n_test = max(1, n_test)
        cut = len(group) - n_test
        train.extend(group[:cut].tolist())
        test.extend(group[cut:].tolist())
    return np.sort(np.array(train, np.int64)), np.sort(np.array(test, np.int64))
