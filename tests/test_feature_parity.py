"""Train/serve feature parity: the torch pipeline (``build_slates`` + ``head_inputs``) and the on-device runtime
(``Reranker.user_context`` + ``Reranker.head_inputs``) give the head the same inputs for the same slates.

Both sides read one catalog: the runtime's int8 ``PackedCatalog`` and an ``ItemTable`` of its dequantised rows,
so any difference is a difference in feature code, not in quantisation. Edge cases are named in the sessions below:
a slate of one, ties in price, a missing price, missing retrieval scores, a permuted first stage, no history,
a history longer than ``HISTORY_LEN`` with imageless and unknown items, and padding.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch

from client.runtime import Reranker
from client.runtime_bundle import PackedCatalog
from client.runtime_models import ExportedModel
from shared_model.data import ItemTable, build_slates, head_inputs
from shared_model.head_features import (
    DENSE_DIM,
    HEAD_INPUTS,
    HISTORY_LEN,
    IMAGE_DIM,
    ITEM_DENSE_DIM,
    ITEM_DENSE_NAMES,
    SLATE_DENSE_DIM,
    TEXT_DIM,
    log_prices,
    recent_history,
    slate_features,
    user_context,
)
from shared_model.schema import SessionLog

N_ITEMS = 40
IMAGELESS = (3, 5, 7, 30)  # catalog rows without an image
TIED_PRICE = (21, 22, 23, 24)  # four candidates of one slate at the same price
NAN_PRICE = (31,)  # a missing price
ATOL = 1e-6


@dataclass
class Session:
    """One logged search; ``retrieval=None`` means the log has no first-stage scores (all zero)."""

    name: str
    user: int
    time: int
    items: list[int]
    clicks: list[int]
    ranks: list[int] | None = None
    retrieval: list[float] | None = None


SESSIONS = [
    Session("twelve-clicks", 0, 0, list(range(12)), [1] * 12),  # clicks 3, 5, 7: imageless
    Session("slate-of-one", 0, 1, [20], [0], ranks=[4], retrieval=[0.3]),
    Session("ties-in-price-no-retrieval", 0, 2, [*TIED_PRICE, 25], [0, 1, 0, 0, 0], ranks=[3, 0, 4, 1, 2]),
    Session("no-history-nan-price", 1, 0, [31, 30, 32, 33, 34, 35], [0, 1, 0, 0, 1, 0]),
    Session("long-permuted", 1, 1, list(range(12, 27)), [0] * 15, ranks=[int(r) for r in
                                                                          np.random.default_rng(2).permutation(200)[:15]]),
    Session("pair-no-history", 2, 0, [36, 37], [0, 0], retrieval=[1.0, -1.0]),
]


def _catalog() -> tuple[list[str], PackedCatalog, np.ndarray]:
    """Item ids, the packed catalog, and raw prices (ties and a NaN included)."""
    rng = np.random.default_rng(0)
    text = rng.normal(size=(N_ITEMS, TEXT_DIM))
    text /= np.linalg.norm(text, axis=1, keepdims=True)
    image = np.clip(rng.gamma(0.6, 0.5, size=(N_ITEMS, IMAGE_DIM)), 0.0, 6.0)
    video = np.clip(rng.gamma(0.6, 0.5, size=(N_ITEMS, IMAGE_DIM)), 0.0, 6.0)
    mask = np.c_[np.ones(N_ITEMS, bool), np.ones(N_ITEMS, bool), rng.random(N_ITEMS) < 0.4]
    mask[list(IMAGELESS), 1] = False
    image[list(IMAGELESS)] = 0.0
    video[~mask[:, 2]] = 0.0
    price = np.round(rng.uniform(5, 120, N_ITEMS), 2)
    price[list(TIED_PRICE)] = 20.0
    price[list(NAN_PRICE)] = np.nan
    ids = [f"item-{k}" for k in range(N_ITEMS)]
    dense = rng.normal(size=(N_ITEMS, ITEM_DENSE_DIM))
    return ids, PackedCatalog.from_float(ids, text, image, video, mask, dense, price), price


def _log() -> SessionLog:
    items = [r for s in SESSIONS for r in s.items]
    lens = [len(s.items) for s in SESSIONS]
    rng = np.random.default_rng(1)
    ranks = [np.arange(len(s.items)) if s.ranks is None else np.asarray(s.ranks) for s in SESSIONS]
    scores = [np.zeros(len(s.items)) if s.name.endswith("no-retrieval") else
              rng.normal(size=len(s.items)) if s.retrieval is None else np.asarray(s.retrieval) for s in SESSIONS]
    m = len(items)
    return SessionLog(
        user=np.array([s.user for s in SESSIONS], np.int32), query=np.arange(len(SESSIONS), dtype=np.int32),
        randomized=np.zeros(len(SESSIONS), bool), timestamp=np.array([s.time for s in SESSIONS], np.int64),
        offsets=np.r_[0, np.cumsum(lens)].astype(np.int64), items=np.array(items, np.int32),
        clicks=np.array([c for s in SESSIONS for c in s.clicks], np.uint8), purchases=np.zeros(m, np.uint8),
        prod_rank=np.concatenate(ranks).astype(np.int16), retrieval_score=np.concatenate(scores).astype(np.float32),
        grades=np.zeros(m, np.uint8), utility=np.zeros(m, np.float32), queries=[s.name for s in SESSIONS],
    )


class _NoModel(ExportedModel):
    """The runtime's feature code needs no model file."""

    def run(self, feeds: dict[str, np.ndarray]) -> np.ndarray:
        raise AssertionError("feature code must not run a model")


@pytest.fixture(scope="module")
def sides() -> tuple[dict[str, np.ndarray], list[dict[str, np.ndarray]], np.ndarray]:
    """(torch pipeline's inputs for every session [N, S, ...], the runtime's per session [1, S_i, ...], valid)."""
    ids, packed, price = _catalog()
    log = _log()
    qemb = np.random.default_rng(3).normal(size=(len(SESSIONS), TEXT_DIM)).astype(np.float32)
    rows = np.arange(N_ITEMS)
    text, image, video = (torch.from_numpy(packed.modality(m, rows)) for m in ("text", "image", "video"))
    table = ItemTable(text, image, video, mask=torch.from_numpy(packed.arrays["mask"].astype(np.float32)),
                      dense=torch.from_numpy(packed.arrays["dense"]))
    slates = build_slates(log, qemb, price)
    with torch.inference_mode():
        train = {k: v.numpy() for k, v in head_inputs(slates, table).items()}
    rr = Reranker(Path("."), {"catalog": {"history_len": HISTORY_LEN}}, "onnx", 1, None, _NoModel(), _NoModel(),
                  packed)
    serve = []
    for i, s in enumerate(SESSIONS):
        earlier = [e for e in SESSIONS if e.user == s.user and e.time < s.time]
        clicked = [ids[r] for e in earlier for r, c in zip(e.items, e.clicks, strict=True) if c]
        recent = ["unknown-0", *clicked[:3], "unknown-1", *clicked[3:]] if clicked else []  # most recent last
        seg = log.slate(i)
        scores = None if s.name.endswith("no-retrieval") else log.retrieval_score[seg]
        _, cand_rows, _ = rr.candidate_rows([ids[r] for r in s.items])
        serve.append(rr.head_inputs(qemb[i], cand_rows, rr.user_context(recent), scores, log.prod_rank[seg]))
    return train, serve, slates.valid.numpy()


@pytest.mark.parametrize("i", range(len(SESSIONS)), ids=[s.name for s in SESSIONS])
def test_runtime_features_equal_the_training_pipeline(sides, i: int) -> None:
    train, serve, valid = sides
    k = int(valid[i].sum())
    assert k == len(SESSIONS[i].items)
    for name in HEAD_INPUTS:
        got = serve[i][name]
        want = train[name][i : i + 1, :k] if got.ndim == 3 else train[name][i : i + 1]
        assert got.dtype == np.float32 and got.shape == want.shape, name
        np.testing.assert_allclose(got, want, rtol=0, atol=ATOL, err_msg=f"{SESSIONS[i].name}: {name}")


def test_padding_is_inert_in_the_training_pipeline(sides) -> None:
    train, _, valid = sides
    pad = ~valid
    assert pad.any()
    assert not train["item_mask"][pad].any()
    assert not train["dense"][pad][:, ITEM_DENSE_DIM:].any()  # slate features are 0 at padding


def test_edge_cases_have_their_reference_values(sides) -> None:
    """The shared values against plain numpy, so both sides agreeing is agreeing on the right thing."""
    train, serve, _ = sides
    _, packed, price = _catalog()
    one = serve[1]["dense"][0, :, ITEM_DENSE_DIM:]
    np.testing.assert_allclose(one, [[4 / 50, 0.0, 0.0]], atol=ATOL)  # slate of one: z 0, price at its median
    ties = serve[2]["dense"][0, :, ITEM_DENSE_DIM:]
    np.testing.assert_allclose(ties[:, 0], np.array([3, 0, 4, 1, 2]) / 50, atol=ATOL)
    assert not ties[:, 1].any()  # no retrieval scores: 0
    np.testing.assert_allclose(ties[:4, 2], 0.0, atol=ATOL)  # the tied prices are the median
    nan = serve[3]["dense"][0, 0, ITEM_DENSE_DIM + 2]
    lp = np.log1p(np.nan_to_num(price[[31, 30, 32, 33, 34, 35]]))
    assert nan == pytest.approx(0.0 - np.median(lp), abs=ATOL)  # a missing price counts as log1p(0)
    for i in (3, 5):  # no history
        assert serve[i]["user_mask"][0, 0] == 0.0 and not serve[i]["user_text"].any()
    hist = list(range(12))[-HISTORY_LEN:]  # the last HISTORY_LEN clicks of the first session
    img = packed.modality("image", np.asarray(hist))
    np.testing.assert_allclose(serve[1]["user_image"][0], img.sum(0) / len(hist), atol=ATOL)  # imageless: zeros
    np.testing.assert_allclose(serve[1]["user_text"][0], packed.modality("text", np.asarray(hist)).mean(0), atol=ATOL)


# ------------------------------------------------------------------------------------ the functions themselves


def test_slate_features_reference_values() -> None:
    lp = log_prices(np.array([10.0, np.nan, 10.0, 3.0]))
    out = slate_features(lp, ranks=np.array([0, 7, 2, 1]), retrieval_scores=np.array([2.0, 0.0, 1.0, 1.0]))
    rs = np.array([2.0, 0.0, 1.0, 1.0])
    assert out.dtype == np.float32 and out.shape == (4, SLATE_DENSE_DIM)
    np.testing.assert_allclose(out[:, 0], [0, 7 / 50, 2 / 50, 1 / 50], atol=ATOL)
    np.testing.assert_allclose(out[:, 1], (rs - rs.mean()) / (rs.std() + 1e-6), atol=ATOL)
    want = np.log1p([10.0, 0.0, 10.0, 3.0])
    np.testing.assert_allclose(out[:, 2], want - np.median(want), atol=ATOL)
    default = slate_features(lp)  # ranks: the given order; no retrieval scores: 0
    np.testing.assert_allclose(default[:, 0], np.arange(4) / 50, atol=ATOL)
    assert not default[:, 1].any()
    assert slate_features(np.zeros(0)).shape == (0, SLATE_DENSE_DIM)


def test_user_context_reference_values_with_padding_and_no_history() -> None:
    rng = np.random.default_rng(4)
    text, image = rng.normal(size=(2, 4, 5)), rng.normal(size=(2, 4, 6))
    has_image = np.array([[1, 0, 1, 1], [1, 1, 1, 1]])
    valid = np.array([[1, 1, 1, 0], [0, 0, 0, 0]], bool)
    ut, ui, um = user_context(text, image, has_image, valid)
    np.testing.assert_allclose(ut[0], text[0, :3].mean(0), atol=ATOL)
    np.testing.assert_allclose(ui[0], (image[0, [0, 2]]).sum(0) / 3, atol=ATOL)  # imageless counts as zero
    assert um.tolist() == [[1.0], [0.0]] and not ut[1].any() and not ui[1].any()
    assert recent_history([1, None, 2, 3], history_len=2) == [2, 3]
    assert recent_history([None, 4], history_len=0) == []


def test_one_source_for_dimensions() -> None:
    """What other modules derive from the layout (config defaults, the feature store's names, the export spec)
    agrees with it."""
    from export.spec import head_spec
    from shared_model import config
    from shared_model.features import DENSE_NAMES

    assert tuple(DENSE_NAMES) == ITEM_DENSE_NAMES
    assert config.ModelConfig().dense_dim == DENSE_DIM
    shapes = {t.name: t.shape for t in head_spec(DENSE_DIM).inputs}
    assert shapes["dense"][-1] == DENSE_DIM and shapes["item_text"][-1] == TEXT_DIM
    assert shapes["item_image"][-1] == IMAGE_DIM
