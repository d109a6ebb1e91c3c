"""Ranking losses vs loop-based NumPy/SciPy references, padding invariance, IPS semantics, edge cases."""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
import pytest
import torch
from scipy.special import expit, log_softmax, softmax

from shared_model.losses import (
    LOSSES,
    approx_ndcg,
    get_loss,
    ips_weights,
    lambdaloss,
    listnet,
    ranknet,
    softmax_ce,
)
from shared_model.metrics import ndcg_at_k

ALL = [softmax_ce, listnet, approx_ndcg, lambdaloss, ranknet]
IDS = [f.__name__ for f in ALL]


# ----------------------------------------------------------------------------------------------- references
def _ideal_dcg(gains: np.ndarray) -> float:
    g = np.sort(gains)[::-1]
    return float((g / np.log2(np.arange(len(g)) + 2.0)).sum())


def ref_softmax_ce(s: np.ndarray, y: np.ndarray, w: np.ndarray) -> float | None:
    if not (y > 0).any():
        return None
    return float(-(w * y * log_softmax(s)).sum() / y.sum())


def ref_listnet(s: np.ndarray, y: np.ndarray, w: np.ndarray) -> float | None:
    if not (y > 0).any():
        return None
    v = np.where(y > 0, w, 1.0)
    return float(-(v * softmax(y) * log_softmax(s)).sum())


def ref_approx_ndcg(s: np.ndarray, y: np.ndarray, w: np.ndarray, alpha: float = 1.0) -> float | None:
    gains = 2.0**y - 1.0
    idcg = _ideal_dcg(gains)
    if idcg <= 0:
        return None
    n = len(s)
    dcg = 0.0
    for i in range(n):
        rank = 1.0 + sum(expit(-alpha * (s[i] - s[j])) for j in range(n) if j != i)
        dcg += w[i] * gains[i] / math.log2(1.0 + rank)
    return 1.0 - dcg / idcg


def ref_lambdaloss(
    s: np.ndarray, y: np.ndarray, w: np.ndarray, sigma: float = 1.0, mu: float = 10.0
) -> float | None:
    n = len(s)
    gains = 2.0**y - 1.0
    idcg = _ideal_dcg(gains)
    order = np.argsort(-s, kind="stable")
    rank = np.empty(n)
    rank[order] = np.arange(1, n + 1)

    def d(r: float) -> float:
        return math.log2(1.0 + r)

    total, found = 0.0, False
    for i in range(n):
        for j in range(n):
            if y[i] <= y[j]:
                continue
            found = True
            gdiff = abs(gains[i] - gains[j]) / idcg
            rho = abs(1.0 / d(rank[i]) - 1.0 / d(rank[j]))
            k = abs(rank[i] - rank[j])
            delta = abs(1.0 / d(k) - 1.0 / d(k + 1))
            p = expit(sigma * (s[i] - s[j]))
            total -= w[i] * (rho + mu * delta) * gdiff * math.log2(p)
    return total if found else None


def ref_ranknet(s: np.ndarray, y: np.ndarray, w: np.ndarray, sigma: float = 1.0) -> float | None:
    losses = [
        w[i] * math.log1p(math.exp(-sigma * (s[i] - s[j])))
        for i in range(len(s))
        for j in range(len(s))
        if y[i] > y[j]
    ]
    return float(np.mean(losses)) if losses else None


REFS: dict[Callable[..., torch.Tensor], Callable[..., float | None]] = {
    softmax_ce: ref_softmax_ce,
    listnet: ref_listnet,
    approx_ndcg: ref_approx_ndcg,
    lambdaloss: ref_lambdaloss,
    ranknet: ref_ranknet,
}


def reference(
    fn: Callable[..., torch.Tensor], s: np.ndarray, y: np.ndarray, m: np.ndarray, w: np.ndarray
) -> float:
    rows = [REFS[fn](s[b][m[b]], y[b][m[b]], w[b][m[b]]) for b in range(len(s))]
    vals = [r for r in rows if r is not None]
    return float(np.mean(vals)) if vals else 0.0


def make_batch(seed: int, b: int = 7, n: int = 9) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Random graded batch with interleaved padding, an empty list and a list without positives."""
    rng = np.random.default_rng(seed)
    s = rng.normal(size=(b, n))
    y = rng.integers(0, 4, size=(b, n)).astype(np.float64)
    m = rng.random((b, n)) < 0.75
    m[0] = False  # empty list
    y[1] = 0.0  # no positive label
    m[2] = False
    m[2, 3] = True  # single real item
    y[2, 3] = 2.0
    w = rng.uniform(1.0, 5.0, size=(b, n))
    return s, y, m, w


def as_t(*arrays: np.ndarray) -> list[torch.Tensor]:
    return [torch.tensor(a) for a in arrays]


# ----------------------------------------------------------------------------------------------- values
@pytest.mark.parametrize("fn", ALL, ids=IDS)
@pytest.mark.parametrize("weighted", [False, True])
def test_matches_reference(fn: Callable[..., torch.Tensor], weighted: bool) -> None:
    for seed in range(3):
        s, y, m, w = make_batch(seed)
        ts, ty, tm, tw = as_t(s, y, m, w)
        got = fn(ts, ty, tm, tw if weighted else None)
        want = reference(fn, s, y, m, w if weighted else np.ones_like(w))
        assert got.dtype == torch.float64
        assert got.item() == pytest.approx(want, rel=1e-9, abs=1e-12)


def test_hyperparameters_match_reference() -> None:
    s, y, m, w = make_batch(5)
    ts, ty, tm, tw = as_t(s, y, m, w)
    for alpha in (0.3, 7.0):
        want = np.mean(
            [
                r
                for b in range(len(s))
                if (r := ref_approx_ndcg(s[b][m[b]], y[b][m[b]], w[b][m[b]], alpha)) is not None
            ]
        )
        assert approx_ndcg(ts, ty, tm, tw, alpha=alpha).item() == pytest.approx(want, rel=1e-9)
    for sigma, mu in ((0.5, 0.0), (2.0, 3.0)):
        rows = [ref_lambdaloss(s[b][m[b]], y[b][m[b]], w[b][m[b]], sigma, mu) for b in range(len(s))]
        want = np.mean([r for r in rows if r is not None])
        assert lambdaloss(ts, ty, tm, tw, sigma=sigma, mu=mu).item() == pytest.approx(want, rel=1e-9)
        rows = [ref_ranknet(s[b][m[b]], y[b][m[b]], w[b][m[b]], sigma) for b in range(len(s))]
        want = np.mean([r for r in rows if r is not None])
        assert ranknet(ts, ty, tm, tw, sigma=sigma).item() == pytest.approx(want, rel=1e-9)


def test_approx_ndcg_tends_to_exact_ndcg() -> None:
    rng = np.random.default_rng(0)
    b, n = 5, 12
    s = rng.permutation(b * n).reshape(b, n) * 0.01  # distinct, gaps >= 0.01
    y = rng.integers(0, 4, size=(b, n)).astype(np.float64)
    y[:, 0] = 3.0
    m = np.ones((b, n), dtype=bool)
    ts, ty, tm = as_t(s, y, m)
    loss = approx_ndcg(ts, ty, tm, alpha=1e4)
    assert 1.0 - loss.item() == pytest.approx(np.mean(ndcg_at_k(s, y, m, k=None)), abs=1e-9)


def test_lambdaloss_prefers_correct_order() -> None:
    y = torch.tensor([[3.0, 2.0, 1.0, 0.0, 0.0]])
    m = torch.ones_like(y, dtype=torch.bool)
    good = torch.tensor([[4.0, 3.0, 2.0, 1.0, 0.0]])
    for fn in ALL:
        assert fn(good, y, m) < fn(good.flip(1), y, m), fn.__name__


# ----------------------------------------------------------------------------------------------- padding
@pytest.mark.parametrize("fn", ALL, ids=IDS)
def test_padding_changes_nothing(fn: Callable[..., torch.Tensor]) -> None:
    s, y, m, w = make_batch(11)
    b, n = s.shape
    base_s = torch.tensor(s, requires_grad=True)
    base = fn(base_s, *as_t(y, m, w))
    base.backward()

    junk = 6
    rng = np.random.default_rng(1)
    pad_s = np.concatenate([s, rng.choice([1e4, -1e4, np.inf, np.nan], size=(b, junk))], axis=1)
    pad_y = np.concatenate([y, rng.choice([3.0, -1.0, np.nan], size=(b, junk))], axis=1)
    pad_m = np.concatenate([m, np.zeros((b, junk), dtype=bool)], axis=1)
    pad_w = np.concatenate([w, np.full((b, junk), 1e6)], axis=1)
    perm = rng.permutation(n + junk)  # padding interleaved with the real items (relative order kept below)
    perm = np.concatenate([np.sort(perm[:n]), perm[n:]])  # real items keep their order -> same tie-breaks
    order = np.argsort(perm, kind="stable")
    ts = torch.tensor(pad_s[:, order], requires_grad=True)
    got = fn(ts, *as_t(pad_y[:, order], pad_m[:, order], pad_w[:, order]))
    got.backward()

    assert got.item() == pytest.approx(base.item(), rel=1e-12, abs=1e-15)
    assert ts.grad is not None and base_s.grad is not None
    grad = ts.grad.numpy()[:, np.argsort(order)]
    assert np.all(np.isfinite(grad))
    np.testing.assert_allclose(grad[:, :n], base_s.grad.numpy(), rtol=1e-10, atol=1e-14)
    assert np.all(grad[:, n:] == 0.0)


@pytest.mark.parametrize("fn", ALL, ids=IDS)
def test_no_signal_returns_zero_with_grad(fn: Callable[..., torch.Tensor]) -> None:
    s = torch.randn(3, 5, requires_grad=True)
    y = torch.zeros(3, 5)
    y[2, 1] = 1.0  # positive only on a padded item
    m = torch.ones(3, 5, dtype=torch.bool)
    m[1] = False
    m[2, 1] = False
    loss = fn(s, y, m)
    assert loss.item() == 0.0 and loss.requires_grad
    loss.backward()
    assert s.grad is not None and torch.equal(s.grad, torch.zeros_like(s))


@pytest.mark.parametrize("fn", ALL, ids=IDS)
@pytest.mark.parametrize("shape", [(0, 4), (3, 0)])
def test_empty_batch(fn: Callable[..., torch.Tensor], shape: tuple[int, int]) -> None:
    s = torch.zeros(shape, requires_grad=True)
    loss = fn(s, torch.zeros(shape), torch.ones(shape, dtype=torch.bool))
    assert loss.item() == 0.0
    loss.backward()


# ----------------------------------------------------------------------------------------------- numerics
@pytest.mark.parametrize("fn", ALL, ids=IDS)
@pytest.mark.parametrize("scale", [0.0, 1e-30, 1e-8, 1e4])
def test_extreme_scores_are_finite(fn: Callable[..., torch.Tensor], scale: float) -> None:
    torch.manual_seed(0)
    s = (torch.randn(4, 10) * scale).requires_grad_(True)
    y = torch.randint(0, 4, (4, 10)).float()
    y[:, 0] = 2.0
    m = torch.rand(4, 10) < 0.8
    m[:, 0] = True
    loss = fn(s, y, m, torch.rand(4, 10) * 10 + 1)
    loss.backward()
    assert torch.isfinite(loss)
    assert s.grad is not None and torch.all(torch.isfinite(s.grad))


@pytest.mark.parametrize("fn", ALL, ids=IDS)
def test_gradcheck(fn: Callable[..., torch.Tensor]) -> None:
    s, y, m, w = make_batch(3, b=4, n=6)
    ts = torch.tensor(s, requires_grad=True)
    ty, tm, tw = as_t(y, m, w)
    assert torch.autograd.gradcheck(lambda x: fn(x, ty, tm, tw), (ts,), eps=1e-6, atol=1e-6)


@pytest.mark.parametrize("fn", ALL, ids=IDS)
def test_half_precision_scores(fn: Callable[..., torch.Tensor]) -> None:
    s, y, m, w = make_batch(4)
    want = fn(*as_t(s.astype(np.float16).astype(np.float32), y, m, w))
    got = fn(torch.tensor(s, dtype=torch.float16), *as_t(y, m, w))
    assert got.dtype == torch.float32
    assert got.item() == pytest.approx(want.item(), rel=1e-5)


@pytest.mark.parametrize("fn", ALL, ids=IDS)
def test_training_free_scores_reaches_ideal_ranking(fn: Callable[..., torch.Tensor]) -> None:
    gen = torch.Generator().manual_seed(0)
    y = torch.randint(0, 4, (8, 10), generator=gen).float()
    y[:, 0] = 3.0
    m = torch.ones_like(y, dtype=torch.bool)
    s = torch.nn.Parameter(torch.randn(8, 10, generator=gen))
    before = np.mean(ndcg_at_k(s.detach(), y, m, k=None))
    opt = torch.optim.Adam([s], lr=0.1)
    for _ in range(150):
        opt.zero_grad()
        fn(s, y, m).backward()
        opt.step()
    after = np.mean(ndcg_at_k(s.detach(), y, m, k=None))
    assert after > max(before, 0.97)


# ----------------------------------------------------------------------------------------------- IPS
def test_weights_none_equals_ones() -> None:
    s, y, m, w = make_batch(8)
    for fn in ALL:
        ts, ty, tm = as_t(s, y, m)
        assert fn(ts, ty, tm, None).item() == pytest.approx(
            fn(ts, ty, tm, torch.ones_like(ts)).item(), rel=1e-12
        )


@pytest.mark.parametrize("fn", ALL, ids=IDS)
def test_weight_scales_single_click(fn: Callable[..., torch.Tensor]) -> None:
    """One click per list: the IPS weight multiplies that list's loss (approx_ndcg: its DCG)."""
    s = torch.tensor([[0.3, -1.0, 2.0, 0.1]], dtype=torch.float64)
    y = torch.tensor([[0.0, 1.0, 0.0, 0.0]], dtype=torch.float64)
    m = torch.ones_like(s, dtype=torch.bool)
    w1 = torch.ones_like(s)
    w5 = w1.clone()
    w5[0, 1] = 5.0
    if fn is approx_ndcg:
        assert 1 - fn(s, y, m, w5).item() == pytest.approx(5 * (1 - fn(s, y, m, w1).item()))
    elif fn is listnet:  # only the clicked item's term is weighted
        logp = torch.log_softmax(s, 1)
        tgt = torch.softmax(y, 1)
        want = -(tgt * logp).sum() - 4 * (tgt * logp)[0, 1]
        assert fn(s, y, m, w5).item() == pytest.approx(want.item())
    else:
        assert fn(s, y, m, w5).item() == pytest.approx(5 * fn(s, y, m, w1).item())


@pytest.mark.parametrize("fn", [softmax_ce, approx_ndcg, lambdaloss, ranknet], ids=lambda f: f.__name__)
def test_weights_of_unclicked_items_are_ignored(fn: Callable[..., torch.Tensor]) -> None:
    s, y, m, w = make_batch(9)
    y = (y >= 2).astype(np.float64)  # clicks
    ts, ty, tm, tw = as_t(s, y, m, w)
    tw2 = torch.where(ty > 0, tw, tw * 100)
    assert fn(ts, ty, tm, tw).item() == pytest.approx(fn(ts, ty, tm, tw2).item(), rel=1e-12)


def test_ips_weights() -> None:
    prop = torch.tensor([1.0, 0.5, 0.25, 0.01])
    pos = torch.tensor([[0, 1, 2, 3, 7, -1]])
    w = ips_weights(pos, prop, clip=20.0)
    assert w.dtype == torch.float32 and w.shape == pos.shape
    np.testing.assert_allclose(w.numpy(), [[1.0, 2.0, 4.0, 20.0, 20.0, 1.0]])
    np.testing.assert_allclose(
        ips_weights(pos, prop, clip=math.inf).numpy(), [[1, 2, 4, 100, 100, 1]], rtol=1e-6
    )
    w64 = ips_weights(pos, np.array([1.0, 0.5]))
    np.testing.assert_allclose(w64.numpy(), [[1, 2, 2, 2, 2, 1]])
    assert ips_weights(pos, prop.double()).dtype == torch.float64
    assert ips_weights(pos, torch.tensor([1.0, 0.0]))[0, 1].item() == 20.0
    with pytest.raises(ValueError):
        ips_weights(pos, torch.tensor([]))
    with pytest.raises(ValueError):
        ips_weights(pos, prop, clip=0.0)


# ----------------------------------------------------------------------------------------------- registry
def test_registry() -> None:
    assert set(LOSSES) >= {"softmax_ce", "softmax", "listnet", "approx_ndcg", "lambdaloss", "ranknet"}
    for name, fn in LOSSES.items():
        assert get_loss(name) is fn
    assert get_loss("Approx-NDCG") is approx_ndcg
    assert get_loss("softmax") is softmax_ce  # the run-config default
    with pytest.raises(ValueError, match="ranknet"):
        get_loss("nope")
    s, y, m, _ = make_batch(2)
    bound = get_loss("approx_ndcg", alpha=3.0)
    ts, ty, tm = as_t(s, y, m)
    assert bound(ts, ty, tm).item() == approx_ndcg(ts, ty, tm, alpha=3.0).item()
    with pytest.raises(ValueError, match="alpha"):
        get_loss("ranknet", alpha=3.0)


def test_shape_errors() -> None:
    s = torch.zeros(2, 3)
    with pytest.raises(ValueError):
        softmax_ce(s, torch.zeros(2, 4), torch.ones(2, 3, dtype=torch.bool))
    with pytest.raises(ValueError):
        ranknet(s, s, torch.ones(2, 3, dtype=torch.bool), torch.ones(3))
    with pytest.raises(ValueError):
        listnet(torch.zeros(3), torch.zeros(3), torch.ones(3, dtype=torch.bool))
    with pytest.raises(ValueError, match="gain"):
        approx_ndcg(s, s, torch.ones(2, 3, dtype=torch.bool), gain="cubic")
