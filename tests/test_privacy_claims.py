"""The privacy claims of the README, each reproduced by a test.

1. Under DP a device sends nothing but its clipped (noised) update and the constant weight ``num-examples = 1``
   (plus Flower's noisily-released ``norm_bit`` under ``client-adaptive``): no train loss, no step count, no
   evaluation metric; the server runs no federated evaluation, aggregates no device metric and says so.
2. ``privacy.mode = local`` adds the noise of the analytic Gaussian mechanism (Balle & Wang 2018), so the
   epsilon it states holds for every epsilon; checked against the privacy profile computed here with
   scipy.stats.norm and against dp-accounting's PLD accountant.
3. The update-norm screen and DP clipping compose in the documented order (device clip, server screen, server
   clip, average, noise), and a screen that would decide on an honest device's data is refused.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, cast

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid
from flwr.supercore.differential_privacy import KEY_CLIPPING_NORM, KEY_NORM_BIT
from flwr.supercore.task_identity import TaskIdentity
from scipy.optimize import brentq
from scipy.stats import norm

from client.mods import client_mods
from client.privacy import AnalyticLocalDpMod, classic_gaussian_std
from server.loop import LoopState, init_state, run_rounds
from server.privacy import local_noise_std, privacy_report, wrap_strategy
from server.strategies import build_strategy
from shared_model.config import ConfigError, RunSettings, load_defaults, merge_overrides, parse_run_config
from shared_model.head import build_head
from shared_model.records import ARRAYS, CONFIG, METRICS, NDCG_GLOBAL, NUM_EXAMPLES, NUM_STEPS, TRAIN_LOSS
from tests.local_grid import WireGrid

N = 4
DELTA = 1e-5
DP_MODES = ["server-fixed", "server-adaptive", "client-fixed", "client-adaptive", "local"]
HUGE = 1000.0  # a device whose update is 1000 x its honest one (norm about 1,200)


@pytest.fixture(autouse=True)
def _task_identity() -> None:
    TaskIdentity.run_id, TaskIdentity.task_id, TaskIdentity.node_id = 1, 1, 0


def settings_with(**extra: object) -> RunSettings:
    return parse_run_config(merge_overrides(load_defaults(), dict(extra)))


def delta_for(pid: int, like: dict[str, np.ndarray], scale: float = 1.0) -> dict[str, np.ndarray]:
    """Device pid's update: norm about 0.3 * (1 + pid) * scale."""
    rng = np.random.default_rng(200 + pid)
    n = sum(v.size for v in like.values())
    return {k: (scale * 0.3 * (1 + pid) / math.sqrt(n) * rng.standard_normal(v.shape)).astype(np.float32)
            for k, v in like.items()}


def l2(d: dict[str, np.ndarray]) -> float:
    return math.sqrt(sum(float(np.sum(v.astype(np.float64) ** 2)) for v in d.values()))


def device(overrides: dict[str, Any], pid: int, scale: float = 1.0, mods: bool = True) -> ClientApp:
    """A device whose handlers report every metric a real one computes (train loss, steps, NDCG, a large
    example count); behind the real mods (``client.mods.client_mods``) unless ``mods=False``."""
    app = ClientApp(mods=client_mods(overrides) if mods else [])

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        g = {k: v.numpy() for k, v in msg.content.array_records[ARRAYS].items()}
        d = delta_for(pid, g, scale)
        metrics = MetricRecord({NUM_EXAMPLES: 10 ** (pid + 1), TRAIN_LOSS: 0.1 * pid, NUM_STEPS: 7 + pid})
        return Message(RecordDict({ARRAYS: ArrayRecord({k: Array(g[k] + d[k]) for k in g}), METRICS: metrics}),
                       reply_to=msg)

    @app.evaluate()
    def evaluate(msg: Message, context: Context) -> Message:
        metrics = MetricRecord({NUM_EXAMPLES: 5 + pid, NDCG_GLOBAL: 0.1 * (pid + 1)})
        return Message(RecordDict({METRICS: metrics}), reply_to=msg)

    return app


def _context() -> Context:
    return Context(run_id=1, node_id=1, node_config={"partition-id": 0}, state=RecordDict(), run_config={})


def _global() -> dict[str, np.ndarray]:
    return {k: v.numpy() for k, v in ArrayRecord(build_head(settings_with().model, seed=0).state_dict()).items()}


def _message(kind: str, glob: dict[str, np.ndarray], config: dict[str, Any]) -> Message:
    content = RecordDict({ARRAYS: ArrayRecord({k: Array(v) for k, v in glob.items()}), CONFIG: ConfigRecord(config)})
    return Message(content, message_type=kind, dst_node_id=1)


def _mode_overrides(mode: str) -> dict[str, Any]:
    return {"privacy.mode": mode, "privacy.clipping-norm": 0.5, "privacy.local-sensitivity": 1.0}


def run_round(tmp: Path, apps: dict[int, ClientApp], **extra: object) -> tuple[LoopState, dict[str, np.ndarray],
                                                                             RunSettings]:
    """One round through the real loop (screen, DP wrapper, federated evaluation when configured)."""
    ov = {"partition.num-clients": N, "strategy.min-train-clients": N, "server.num-rounds": 1,
          "server.eval-every": 1, "strategy.fraction-evaluate": 1.0, "server.out-dir": str(tmp), **extra}
    s = settings_with(**ov)
    strategy = wrap_strategy(build_strategy(s.strategy), s)
    state = init_state(s, tmp, strategy, resume=False)
    glob = {k: v.numpy().copy() for k, v in state.arrays.items()}
    grid = cast(Grid, WireGrid(N, lambda pid: apps[pid]))
    state = run_rounds(grid, strategy, s, state, tmp, ConfigRecord({"propensity-eta": 1.0}),
                       central_eval=lambda m: {}, max_update_norm=s.faults.max_update_norm or None)
    return state, glob, s


# ------------------------------------------------------------------------------------------- 1. device metrics


@pytest.mark.parametrize("mode", DP_MODES)
def test_train_reply_under_dp_carries_only_the_constant_weight(mode: str) -> None:
    reply = device(_mode_overrides(mode), 3)(_message("train", _global(), {KEY_CLIPPING_NORM: 0.5}), _context())
    assert not reply.has_error(), reply.error.reason if reply.has_error() else ""
    assert set(reply.content.metric_records) == {METRICS} and set(reply.content.array_records) == {ARRAYS}
    metrics = dict(reply.content[METRICS])
    expected_keys = {NUM_EXAMPLES, KEY_NORM_BIT} if mode == "client-adaptive" else {NUM_EXAMPLES}
    assert set(metrics) == expected_keys, metrics  # no train-loss, no num-steps
    assert metrics[NUM_EXAMPLES] == 1  # not the device's 10,000 examples


@pytest.mark.parametrize("mode", DP_MODES)
def test_evaluate_under_dp_sends_no_metric(mode: str) -> None:
    reply = device(_mode_overrides(mode), 3)(_message("evaluate", _global(), {}), _context())
    assert reply.has_error() and not reply.has_content()
    reason = reply.error.reason or ""
    assert "differential privacy" in reason and "0.4" not in reason  # a fixed text, no metric value


def test_without_dp_the_handlers_metrics_travel_unchanged() -> None:
    app = device(_mode_overrides("none"), 3)
    train = app(_message("train", _global(), {}), _context())
    assert dict(train.content[METRICS]) == {NUM_EXAMPLES: 10_000, TRAIN_LOSS: pytest.approx(0.3), NUM_STEPS: 10}
    assert dict(app(_message("evaluate", _global(), {}), _context()).content[METRICS])[NDCG_GLOBAL] == 0.4


@pytest.mark.parametrize("mode", ["server-fixed", "client-fixed", "local"])
def test_dp_run_aggregates_no_device_metric_and_says_so(tmp_path: Path, mode: str) -> None:
    # devices without the mods (they send every metric anyway): the server still evaluates nothing federated,
    # reports no train metric, and results.json's privacy section lists what is withheld
    extra = {**_mode_overrides(mode), "privacy.noise-multiplier": 0.0}
    state, _, s = run_round(tmp_path, {p: device(extra, p, mods=False) for p in range(N)}, **extra)
    rec = state.rounds[0]
    assert rec["accepted"] == N
    assert rec["train"] == {}  # no train-loss, num-steps or num-examples
    assert rec.get("federated") == {}  # no evaluate message was sent
    rep = privacy_report(s, state.rounds)
    assert set(rep["device_metrics"]["train_withheld"]) >= {TRAIN_LOSS, NUM_STEPS}
    assert "not sent" in rep["device_metrics"]["evaluate"]
    assert "no other metric" in rep.get("covers", "no other metric")


def test_without_dp_the_run_aggregates_device_metrics(tmp_path: Path) -> None:
    state, _, _ = run_round(tmp_path, {p: device({}, p) for p in range(N)})
    rec = state.rounds[0]
    assert TRAIN_LOSS in rec["train"] and rec["federated"]["aggregated"][NDCG_GLOBAL] > 0


# ------------------------------------------------------------------------------------------- 2. calibration


def privacy_profile_delta(epsilon: float, sigma: float, sensitivity: float = 1.0) -> float:
    """Exact delta(epsilon) of the Gaussian mechanism with std sigma (Balle & Wang 2018, Theorem 8)."""
    a, b = sensitivity / (2 * sigma), epsilon * sigma / sensitivity
    return float(norm.cdf(a - b) - math.exp(epsilon + norm.logcdf(-a - b)))


def reference_sigma(epsilon: float, delta: float, sensitivity: float) -> float:
    """The smallest sigma with delta(epsilon) <= delta, solved here with scipy (independent of the code)."""
    return sensitivity * brentq(lambda s: privacy_profile_delta(epsilon, s) - delta, 1e-3, 1e3, xtol=1e-13)


@pytest.mark.parametrize("epsilon", [0.5, 1.0, 2.0, 8.0, 16.0])
def test_local_noise_is_the_analytic_gaussian_mechanism(epsilon: float) -> None:
    s = settings_with(**{"privacy.mode": "local", "privacy.clipping-norm": 0.5, "privacy.local-sensitivity": 1.0,
                         "privacy.local-epsilon": epsilon})
    ref = reference_sigma(epsilon, DELTA, 1.0)
    assert local_noise_std(s) == pytest.approx(ref, rel=1e-7)
    assert AnalyticLocalDpMod(0.5, 1.0, epsilon, DELTA).noise_std == pytest.approx(ref, rel=1e-7)
    # the stated epsilon holds, and tightly: delta(epsilon) at the std used is the target delta
    assert privacy_profile_delta(epsilon, local_noise_std(s)) == pytest.approx(DELTA, rel=1e-5)
    # dp-accounting's PLD accountant agrees
    import dp_accounting as dpa
    from dp_accounting.pld import PLDAccountant

    pld = PLDAccountant()
    pld.compose(dpa.GaussianDpEvent(local_noise_std(s)))
    assert pld.get_epsilon(DELTA) == pytest.approx(epsilon, rel=1e-3)


def test_the_classic_calibration_overstates_privacy_at_large_epsilon() -> None:
    # why the classic formula is not used: at (16, 1e-5) its std gives delta(16) about 17 x the target
    classic = classic_gaussian_std(16.0, DELTA, 1.0)
    assert privacy_profile_delta(16.0, classic) > 10 * DELTA
    assert classic < reference_sigma(16.0, DELTA, 1.0)


def test_local_dp_mod_adds_the_analytic_noise() -> None:
    # at epsilon 16 the classic formula would add 12% less noise (0.3028 vs 0.3442 per unit sensitivity)
    ov = {"privacy.mode": "local", "privacy.clipping-norm": 0.005, "privacy.local-epsilon": 16.0,
          "privacy.local-sensitivity": 0.01}
    glob = _global()
    reply = device(ov, 3)(_message("train", glob, {}), _context())
    d = delta_for(3, glob)
    want = {k: v.astype(np.float64) * min(1.0, 0.005 / l2(d)) for k, v in d.items()}
    got = reply.content.array_records[ARRAYS]
    noise = np.concatenate([(got[k].numpy().astype(np.float64) - glob[k] - want[k]).ravel() for k in glob])
    assert float(np.std(noise)) == pytest.approx(reference_sigma(16.0, DELTA, 0.01), rel=0.02)


def test_local_sensitivity_below_the_clipping_diameter_is_refused() -> None:
    with pytest.raises(ConfigError, match="privacy.local-sensitivity"):
        settings_with(**{"privacy.mode": "local", "privacy.clipping-norm": 0.5, "privacy.local-sensitivity": 0.01})


def test_local_report_states_the_epsilon_the_noise_gives() -> None:
    # sensitivity = 2C: one release is exactly the configured epsilon; T releases compose as one Gaussian
    s = settings_with(**{"privacy.mode": "local", "privacy.clipping-norm": 0.5, "privacy.local-sensitivity": 1.0,
                         "privacy.local-epsilon": 2.0})
    one = privacy_report(s, [{"round": 1}])
    assert one["epsilon_per_release"] == pytest.approx(2.0, rel=1e-6) and one["epsilon"] == pytest.approx(2.0, rel=1e-6)
    assert "analytic" in one["calibration"]
    four = privacy_report(s, [{"round": r} for r in range(4)])
    sigma = local_noise_std(s)  # 4 releases with std sigma and sensitivity 1 = one with std sigma / 2
    assert privacy_profile_delta(four["epsilon"], sigma / 2) == pytest.approx(DELTA, rel=1e-5)


# ------------------------------------------------------------------------------------------- 3. screen and clip


@pytest.mark.parametrize("mode", ["server-fixed", "server-adaptive", "client-adaptive"])
def test_a_norm_screen_that_would_decide_on_raw_norms_is_refused(mode: str) -> None:
    s = settings_with(**{"privacy.mode": mode, "faults.max-update-norm": 10.0, "partition.num-clients": 100,
                         "strategy.min-train-clients": 10})
    with pytest.raises(ConfigError, match="faults.max-update-norm"):
        wrap_strategy(build_strategy(s.strategy), s)


def test_a_norm_bound_below_the_devices_clip_is_refused() -> None:
    s = settings_with(**{"privacy.mode": "client-fixed", "privacy.clipping-norm": 0.7, "faults.max-update-norm": 0.5})
    with pytest.raises(ConfigError, match="faults.max-update-norm"):
        wrap_strategy(build_strategy(s.strategy), s)


def _uniform_clipped(glob: dict[str, np.ndarray], clip: float, huge: int) -> dict[str, np.ndarray]:
    deltas = [delta_for(p, glob, HUGE if p == huge else 1.0) for p in range(N)]
    scaled = [{k: v.astype(np.float64) * min(1.0, clip / l2(d)) for k, v in d.items()} for d in deltas]
    return {k: g + sum(d[k] for d in scaled) / N for k, g in glob.items()}


@pytest.mark.parametrize("mode, bound, accepted", [
    ("none", 10.0, N - 1),  # no DP: the screen rejects the huge update
    ("client-fixed", 10.0, N),  # the device clips first: the screen sees norm 0.7 and lets it through
    ("server-fixed", 0.0, N),  # no screen by norm: the server clips the huge update to 0.7
])
def test_a_huge_update_is_screened_or_clipped_in_the_documented_order(tmp_path: Path, mode: str, bound: float,
                                                                       accepted: int) -> None:
    clip, huge = 0.7, 3
    extra = {"privacy.mode": mode, "privacy.clipping-norm": clip, "privacy.noise-multiplier": 0.0,
             "faults.max-update-norm": bound, "strategy.fraction-evaluate": 0.0}
    apps = {p: device(extra, p, HUGE if p == huge else 1.0) for p in range(N)}
    state, glob, s = run_round(tmp_path, apps, **extra)
    rec = state.rounds[0]
    assert rec["accepted"] == accepted and rec["rejected"] == N - accepted
    if mode != "none":
        got = {k: state.arrays[k].numpy().astype(np.float64) for k in glob}
        want = _uniform_clipped(glob, clip, huge)
        assert max(float(np.max(np.abs(got[k] - want[k]))) for k in glob) < 1e-6
        order = privacy_report(s, state.rounds)["order"]
        screen = next(i for i, step in enumerate(order) if step.startswith("server: screen"))
        clips = [i for i, step in enumerate(order) if ": clip" in step]
        assert len(clips) == 1 and (clips[0] < screen) == (mode == "client-fixed")
        assert order[-1].startswith("server: add Gaussian noise")
    else:
        assert "update norm" in rec["rejected_reasons"][0]
