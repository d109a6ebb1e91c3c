"""Differential privacy: Flower's DP strategy wrappers and client mods chosen by ``privacy.mode``, checked against
numpy (clipping, uniform averaging, noise std), and the accountant (``dp-accounting``'s RDP accountant) checked
against independent computations (the exact (epsilon, delta) curve of the Gaussian mechanism at full sampling,
and dp-accounting's PLD accountant under Poisson sampling)."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, cast

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid
from flwr.serverapp import strategy as fs
from flwr.supercore.differential_privacy import KEY_CLIPPING_NORM, KEY_NORM_BIT
from flwr.supercore.task_identity import TaskIdentity
from scipy.optimize import brentq
from scipy.stats import norm

from client.mods import client_mods
from server.loop import init_state, run_rounds
from server.privacy import (
    DP_WRAPPERS,
    effective_noise_multipliers,
    epsilon_poisson,
    epsilon_without_replacement,
    local_noise_std,
    num_sampled_clients,
    privacy_report,
    wrap_strategy,
)
from server.strategies import base_strategy, build_strategy, restore_strategy_state, strategy_state
from shared_model.config import ConfigError, RunSettings, load_defaults, merge_overrides, parse_run_config
from shared_model.records import ARRAYS, CONFIG, METRICS, NUM_EXAMPLES, TRAIN_LOSS
from tests.local_grid import WireGrid

N = 4
DELTA = 1e-5


@pytest.fixture(autouse=True)
def _task_identity() -> None:
    TaskIdentity.run_id, TaskIdentity.task_id, TaskIdentity.node_id = 1, 1, 0


def settings_with(**extra: object) -> RunSettings:
    return parse_run_config(merge_overrides(load_defaults(), dict(extra)))


def delta_for(pid: int, like: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Device pid's update: norm grows with pid (about 0.3, 0.6, 0.9, 1.2 for the default head)."""
    rng = np.random.default_rng(200 + pid)
    n = sum(v.size for v in like.values())
    return {k: (0.3 * (1 + pid) / math.sqrt(n) * rng.standard_normal(v.shape)).astype(np.float32)
            for k, v in like.items()}


def device(overrides: dict, pid: int) -> ClientApp:
    """A deterministic device behind the real mods (``client.mods.client_mods``): global + delta_for(pid), with
    very different num-examples, so a weighted average differs from a uniform one."""
    app = ClientApp(mods=client_mods(overrides))

    @app.train()
    def train(msg: Message, context) -> Message:
        g = {k: v.numpy() for k, v in msg.content.array_records[ARRAYS].items()}
        d = delta_for(pid, g)
        out = ArrayRecord({k: Array(g[k] + d[k]) for k in g})
        metrics = MetricRecord({NUM_EXAMPLES: 10 ** (pid + 1), TRAIN_LOSS: float(pid)})
        return Message(RecordDict({ARRAYS: out, METRICS: metrics}), reply_to=msg)

    @app.evaluate()
    def evaluate(msg: Message, context) -> Message:
        return Message(RecordDict({METRICS: MetricRecord({NUM_EXAMPLES: 5, "ndcg@10-global": 0.5})}), reply_to=msg)

    return app


def overrides_for(tmp: Path, rounds: int = 1, **extra: object) -> dict:
    return {"partition.num-clients": N, "strategy.min-train-clients": N, "server.num-rounds": rounds,
            "server.eval-every": 0, "server.out-dir": str(tmp), **extra}


def run_loop(tmp: Path, rounds: int = 1, resume: bool = False, **extra: object):
    ov = overrides_for(tmp, rounds, **extra)
    s = parse_run_config(merge_overrides(load_defaults(), ov))
    strategy = wrap_strategy(build_strategy(s.strategy), s)
    state = init_state(s, tmp, strategy, resume=resume)
    glob = {k: v.numpy().copy() for k, v in state.arrays.items()}
    apps = {pid: device(ov, pid) for pid in range(N)}
    grid = cast(Grid, WireGrid(N, lambda pid: apps[pid]))  # a test grid: get_node_ids and send_and_receive
    state = run_rounds(grid, strategy, s, state, tmp,
                       ConfigRecord({"propensity-eta": 1.0}), central_eval=lambda m: {})
    return state, glob, strategy, s


def clipped(d: dict[str, np.ndarray], clip: float) -> dict[str, np.ndarray]:
    n = math.sqrt(sum(float(np.sum(v.astype(np.float64) ** 2)) for v in d.values()))
    return {k: v.astype(np.float64) * min(1.0, clip / n) for k, v in d.items()}


def uniform_clipped_average(glob: dict[str, np.ndarray], clip: float) -> dict[str, np.ndarray]:
    deltas = [clipped(delta_for(p, glob), clip) for p in range(N)]
    return {k: g + sum(d[k] for d in deltas) / N for k, g in glob.items()}


def max_abs_diff(a: ArrayRecord, b: dict[str, np.ndarray]) -> float:
    return max(float(np.max(np.abs(a[k].numpy().astype(np.float64) - b[k]))) for k in b)


# ------------------------------------------------------------------------------------------- wrappers


@pytest.mark.parametrize("mode, cls", [
    ("none", None), ("local", None),
    ("server-fixed", fs.DifferentialPrivacyServerSideFixedClipping),
    ("client-fixed", fs.DifferentialPrivacyClientSideFixedClipping),
    ("server-adaptive", fs.DifferentialPrivacyServerSideAdaptiveClipping),
    ("client-adaptive", fs.DifferentialPrivacyClientSideAdaptiveClipping),
])
def test_wrapper_is_chosen_by_privacy_mode(mode: str, cls: type | None) -> None:
    s = settings_with(**{"privacy.mode": mode, "privacy.noise-multiplier": 0.8, "privacy.clipping-norm": 0.3,
                         "partition.num-clients": 100, "strategy.fraction-train": 0.3, "strategy.min-train-clients": 10})
    base = build_strategy(s.strategy)
    wrapped = wrap_strategy(base, s)
    if cls is None:
        assert wrapped is base
        return
    assert type(wrapped) is cls and base_strategy(wrapped) is base
    assert isinstance(wrapped, DP_WRAPPERS)
    assert wrapped.num_sampled_clients == num_sampled_clients(s) == 30
    assert wrapped.clipping_norm == 0.3


@pytest.mark.parametrize("extra, match", [
    ({"privacy.mode": "server-fixed", "strategy.name": "fedadam"}, "strategy.name"),
    ({"privacy.mode": "client-fixed", "strategy.name": "krum"}, "strategy.name"),
    ({"privacy.mode": "server-adaptive", "privacy.noise-multiplier": 2.0, "partition.num-clients": 20,
      "strategy.fraction-train": 0.5}, "clipped-count"),
    ({"privacy.mode": "bogus"}, "privacy.mode"),
    ({"privacy.mode": "client-fixed", "model.personal-layers": True}, "personal-layers"),
    ({"secagg.enabled": True, "model.personal-layers": True}, "personal-layers"),
])
def test_unsound_privacy_settings_are_refused(extra: dict, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        s = settings_with(**extra)
        wrap_strategy(build_strategy(s.strategy), s)


# ------------------------------------------------------------------------------------------- client mods


def _train_message(arrays: ArrayRecord, config: dict) -> Message:
    return Message(RecordDict({ARRAYS: arrays, CONFIG: ConfigRecord(config)}), message_type="train", dst_node_id=1)


def _context():
    from flwr.app import Context

    return Context(run_id=1, node_id=1, node_config={"partition-id": 0}, state=RecordDict(), run_config={})


def _global() -> dict[str, np.ndarray]:
    from shared_model.head import build_head

    return {k: v.numpy() for k, v in ArrayRecord(build_head(settings_with().model, seed=0).state_dict()).items()}


@pytest.mark.parametrize("pid", [0, 3])  # an update below (0.3) and above (1.2) the clipping norm 0.7
def test_client_fixed_mod_clips_the_update_to_the_norm(pid: int) -> None:
    clip = 0.7
    glob = _global()
    app = device({"privacy.mode": "client-fixed"}, pid)
    msg = _train_message(ArrayRecord({k: Array(v) for k, v in glob.items()}), {KEY_CLIPPING_NORM: clip})
    reply = app(msg, _context())
    got = {k: reply.content.array_records[ARRAYS][k].numpy().astype(np.float64) - glob[k] for k in glob}
    want = clipped(delta_for(pid, glob), clip)
    for k in glob:
        np.testing.assert_allclose(got[k], want[k], rtol=1e-4, atol=1e-7)
    norm_got = math.sqrt(sum(float(np.sum(v ** 2)) for v in got.values()))
    assert norm_got == pytest.approx(min(clip, 0.3 * (1 + pid)), rel=2e-2)


def test_client_adaptive_mod_reports_whether_it_clipped() -> None:
    glob = _global()
    bits = []
    for pid in (0, 3):
        reply = device({"privacy.mode": "client-adaptive"}, pid)(
            _train_message(ArrayRecord({k: Array(v) for k, v in glob.items()}), {KEY_CLIPPING_NORM: 0.7}), _context())
        bits.append(reply.content[METRICS][KEY_NORM_BIT])
    assert bits == [0, 1]


def test_local_dp_mod_clips_and_adds_the_calibrated_noise() -> None:
    ov = {"privacy.mode": "local", "privacy.clipping-norm": 0.005, "privacy.local-epsilon": 2.0,
          "privacy.local-sensitivity": 0.01}
    s = settings_with(**ov)
    glob = _global()
    reply = device(ov, 3)(_train_message(ArrayRecord({k: Array(v) for k, v in glob.items()}), {}), _context())
    want = clipped(delta_for(3, glob), 0.005)
    got = reply.content.array_records[ARRAYS]
    noise = np.concatenate([(got[k].numpy().astype(np.float64) - glob[k] - want[k]).ravel()
                            for k in glob])
    std = local_noise_std(s)  # analytic Gaussian at (2, 1e-5): 0.01 * 1.9938 (the classic formula: 0.0242)
    assert std == pytest.approx(0.01 * 1.99384, rel=1e-4)
    assert float(np.std(noise)) == pytest.approx(std, rel=0.02)  # 141,700 draws: ~0.2% standard error
    assert abs(float(np.mean(noise))) < 5 * std / math.sqrt(noise.size)


@pytest.mark.parametrize("mode", ["none", "client-fixed", "local", "server-fixed"])
def test_mods_leave_other_messages_and_modes_untouched(mode: str) -> None:
    glob = _global()
    ov = {"privacy.mode": mode, "privacy.clipping-norm": 0.5}
    app = device(ov, 3)
    ev = Message(RecordDict({ARRAYS: ArrayRecord({k: Array(v) for k, v in glob.items()}), CONFIG: ConfigRecord({})}),
                 message_type="evaluate", dst_node_id=1)
    ev_reply = app(ev, _context())
    if mode == "none":  # evaluate: never clipped or noised
        assert ev_reply.content[METRICS]["ndcg@10-global"] == 0.5
    else:  # under DP a device sends no evaluation metrics (tests/test_privacy_claims.py)
        assert ev_reply.has_error() and not ev_reply.has_content()
    if mode in ("none", "server-fixed"):  # no clipping or noise on the device: the handler's arrays as they are
        reply = app(_train_message(ArrayRecord({k: Array(v) for k, v in glob.items()}), {}), _context())
        d = delta_for(3, glob)
        for k in glob:
            np.testing.assert_array_equal(reply.content.array_records[ARRAYS][k].numpy(), glob[k] + d[k])


# ------------------------------------------------------------------------------------------- server side


@pytest.mark.parametrize("mode", ["server-fixed", "client-fixed"])
def test_dp_round_is_the_uniform_average_of_clipped_updates(tmp_path: Path, mode: str) -> None:
    # noise 0: the aggregate must be global + mean of the clipped updates, weights ignored (10 .. 10,000)
    clip = 0.7
    extra: dict[str, Any] = {"privacy.mode": mode, "privacy.noise-multiplier": 0.0,
                             "privacy.clipping-norm": clip}
    state, glob, _, _ = run_loop(tmp_path, **extra)
    assert max_abs_diff(state.arrays, uniform_clipped_average(glob, clip)) < 1e-6
    # an independent check that the test can fail: the example-weighted average is far from it
    w = np.array([10 ** (p + 1) for p in range(N)], float)
    weighted = {k: g + sum(w[p] * clipped(delta_for(p, glob), clip)[k] for p in range(N)) / w.sum()
                for k, g in glob.items()}
    assert max_abs_diff(state.arrays, weighted) > 1e-4
    rec = state.rounds[0]["privacy"]
    assert rec["released"] and rec["sampled"] == rec["averaged"] == N and rec["clipping_norm"] == clip
    assert rec["z_replace_one"] == rec["z_add_remove"] == 0.0  # no noise


def test_server_noise_has_the_calibrated_std(tmp_path: Path) -> None:
    z, clip = 1.5, 0.7
    extra: dict[str, Any] = {"privacy.mode": "server-fixed", "privacy.noise-multiplier": z,
                             "privacy.clipping-norm": clip}
    state, glob, _, _ = run_loop(tmp_path, **extra)
    ref = uniform_clipped_average(glob, clip)
    noise = np.concatenate([(state.arrays[k].numpy().astype(np.float64) - ref[k]).ravel() for k in ref])
    assert float(np.std(noise)) == pytest.approx(z * clip / N, rel=0.02)
    rec = state.rounds[0]["privacy"]
    assert rec["noise_std"] == pytest.approx(z * clip / N)
    assert (rec["z_replace_one"], rec["z_add_remove"]) == pytest.approx((z / 2, z))
    assert state.rounds[0]["train"] == {}  # under DP no device metric is aggregated or reported


def test_adaptive_clipping_norm_survives_resume(tmp_path: Path) -> None:
    extra: dict[str, Any] = {"privacy.mode": "server-adaptive", "privacy.noise-multiplier": 0.0,
                             "privacy.clipping-norm": 0.1}
    state, _, strategy, s = run_loop(tmp_path, rounds=2, **extra)
    moved = strategy.clipping_norm
    assert moved != pytest.approx(0.1)  # all four updates exceed 0.1: the norm grows
    assert strategy_state(strategy)["clipping_norm"] == moved
    # a fresh wrapper resumed from last.pt continues from the adapted norm
    s3 = parse_run_config({**s.to_flat(), "server.num-rounds": 3})
    fresh = wrap_strategy(build_strategy(s3.strategy), s3)
    assert isinstance(fresh, DP_WRAPPERS)
    resumed = init_state(s3, tmp_path, fresh, resume=True)
    assert resumed.resumed_from == 2 and fresh.clipping_norm == pytest.approx(moved)
    restore_strategy_state(fresh, {"class": "FedAvg", "clipping_norm": 0.5})
    assert fresh.clipping_norm == 0.5
    assert [r["privacy"]["clipping_norm"] for r in state.rounds][0] == pytest.approx(0.1)


def test_a_short_dp_run_reports_epsilon(tmp_path: Path) -> None:
    z, clip = 1.0, 0.7
    extra: dict[str, Any] = {"privacy.mode": "client-fixed", "privacy.noise-multiplier": z,
                             "privacy.clipping-norm": clip}
    state, _, _, s = run_loop(tmp_path, rounds=3, **extra)
    rep = privacy_report(s, state.rounds)
    assert rep["mode"] == "client-fixed" and rep["releases"] == 3 and rep["sampling_rate"] == 1.0
    assert rep["accountant"] == "dp_accounting.rdp.RdpAccountant" and rep["delta"] == DELTA
    assert rep["epsilon"] == pytest.approx(epsilon_without_replacement(N, [(N, z / 2)] * 3, DELTA))
    assert rep["epsilon_poisson_add_remove"] == pytest.approx(epsilon_poisson(N, [(N, z)] * 3, DELTA))
    json.dumps(rep)  # results.json-ready


# ------------------------------------------------------------------------------------------- accountant


def exact_gaussian_epsilon(mu: float, delta: float) -> float:
    """Tight epsilon of a Gaussian mechanism with mu = sensitivity / std (Balle & Wang 2018, Theorem 8)."""
    return brentq(lambda e: norm.cdf(mu / 2 - e / mu) - math.exp(e) * norm.cdf(-mu / 2 - e / mu) - delta, 0, 300.0)


@pytest.mark.parametrize("z, rounds", [(0.5, 10), (1.0, 20), (2.0, 30)])
def test_full_sampling_matches_the_exact_gaussian_mechanism(z: float, rounds: int) -> None:
    # q = 1: every round is a plain Gaussian; T of them compose exactly into one with mu = sqrt(T) / z
    eps = epsilon_without_replacement(50, [(50, z)] * rounds, DELTA)
    exact = exact_gaussian_epsilon(math.sqrt(rounds) / z, DELTA)
    assert exact <= eps <= 1.10 * exact  # RDP is an upper bound, here 6-7% above the tight value


@pytest.mark.parametrize("q, z, rounds", [(0.3, 1.0, 30), (0.1, 2.0, 30)])
def test_poisson_epsilon_is_close_to_the_pld_accountant(q: float, z: float, rounds: int) -> None:
    import dp_accounting as dpa
    from dp_accounting.pld import PLDAccountant

    pld = PLDAccountant()
    pld.compose(dpa.PoissonSampledDpEvent(q, dpa.GaussianDpEvent(z)), rounds)
    eps = epsilon_poisson(100, [(int(q * 100), z)] * rounds, DELTA)
    tight = pld.get_epsilon(DELTA)
    assert 0.999 * tight <= eps <= 1.2 * tight  # RDP is looser than PLD by 11-13% here


def test_epsilon_grows_with_rounds_and_sampling_and_falls_with_noise() -> None:
    def eps(m: int, z: float, t: int) -> float:
        return epsilon_without_replacement(100, [(m, z)] * t, DELTA)

    assert eps(30, 1.0, 10) < eps(30, 1.0, 20) < eps(30, 1.0, 30)
    assert eps(30, 2.0, 20) < eps(30, 1.0, 20) < eps(30, 0.7, 20)
    assert eps(10, 1.0, 20) < eps(30, 1.0, 20) < eps(100, 1.0, 20)
    assert epsilon_without_replacement(100, [], DELTA) == 0.0
    assert math.isinf(epsilon_without_replacement(100, [(30, 0.0)], DELTA))


def test_effective_noise_multipliers() -> None:
    z, clip, m = 1.2, 0.5, 10
    full = {"averaged": m, "noise_std": z * clip / m, "clipping_norm": clip}
    assert effective_noise_multipliers(full) == pytest.approx((z / 2, z))
    # 6 of 10 replied: FedAvg divides by 6, the noise was sized for 10
    assert effective_noise_multipliers({**full, "averaged": 6}) == pytest.approx((0.6 * z / 2, 0.6 * z))
    # adaptive: the clipped-count release (std 0.5, sensitivity 1) composes with the update release
    zr, za = effective_noise_multipliers({**full, "clipped_count_stddev": 0.5})
    assert za == pytest.approx((z ** -2 + 0.5 ** -2) ** -0.5)
    assert zr == pytest.approx(((2 / z) ** 2 + 0.5 ** -2) ** -0.5)


def test_privacy_report_of_a_run_without_dp() -> None:
    rep = privacy_report(settings_with(), [{"round": 1}])
    assert rep["mode"] == "none" and rep["epsilon"] is None


# ------------------------------------------------------------------------------------------- Flower's engine


@pytest.mark.slow
def test_dp_simulation_writes_the_privacy_section(tmp_path: Path) -> None:
    """The smoke scenario (10 devices, 2 rounds) through Flower's simulation engine with client-side DP:
    Flower's fixedclipping_mod runs in the Ray workers, the wrapper adds noise, results.json has the section."""
    from simulations.runner import scenario_config, simulate_config

    extra = {"privacy.mode": "client-fixed", "privacy.noise-multiplier": 0.8, "privacy.clipping-norm": 2.0}
    flat = scenario_config("smoke", rounds=2, out=str(tmp_path / "run"), extra=extra)
    simulate_config(flat, "smoke+dp", central=False, progress=False)
    res = json.loads((tmp_path / "run" / "results.json").read_text())
    priv = res["privacy"]
    assert priv["mode"] == "client-fixed" and priv["releases"] == 2 and priv["clients_per_round"] == 10
    assert priv["noise_multiplier"] == 0.8 and priv["clipping_norm"] == 2.0 and priv["sampling_rate"] == 1.0
    assert priv["epsilon"] == pytest.approx(epsilon_without_replacement(10, [(10, 0.4)] * 2, DELTA), rel=1e-6)
    for r in res["rounds"]:
        assert r["accepted"] == 10 and r["privacy"]["released"] and r["privacy"]["averaged"] == 10
        assert 0.0 < r["central"]["ndcg@10"] <= 1.0
        assert r["federated"] == {} and r["train"] == {}  # under DP devices send no metrics, none are reported
    assert priv["device_metrics"]["train_withheld"] and "not sent" in priv["device_metrics"]["evaluate"]
