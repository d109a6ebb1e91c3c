"""SecAgg+ (Flower's ``SecAggPlusWorkflow`` + ``secaggplus_mod`` through ``server.secagg`` / ``client.secagg``):
on the same device updates the securely aggregated head equals plain FedAvg up to SecAgg+'s quantization.

Tolerance: a device scales its arrays by ``r_i = w_i / max-weight``, clips them to ``[-c, c]`` (c =
``secagg.clipping-range``) and rounds them stochastically to one of ``Q = secagg.quantization-range`` levels, a
step of ``delta = 2c / Q``; the server divides the unmasked sum by ``R = sum_i r_i``. Each device's rounding error
is below one step, so every element of the aggregate is within ``k * delta / R`` of the weighted average
(k devices), plus float32 rounding of the result. The weights themselves are quantized to ``1/Q`` of max-weight,
a relative error below ``1 / (2 Q r_i)``, negligible here.

The devices run the real mod chain (``client.mods.client_mods``) behind a grid that serializes every message
with Flower's protobuf serde, as a real transport does (SecAgg+ shares one config record between the messages
of a stage and the client mod pops from it, so an in-process grid must copy).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any, cast

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid
from flwr.supercore.task_identity import TaskIdentity

from client.mods import client_mods
from server.loop import LoopState, init_state, run_rounds
from server.privacy import wrap_strategy
from server.strategies import build_strategy
from shared_model.config import ConfigError, RunSettings, load_defaults, merge_overrides, parse_run_config
from shared_model.head import build_head
from shared_model.records import ARRAYS, METRICS, NUM_EXAMPLES, TRAIN_LOSS
from tests.local_grid import WireGrid

N = 5
ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(autouse=True)
def _task_identity() -> None:
    TaskIdentity.run_id, TaskIdentity.task_id, TaskIdentity.node_id = 1, 1, 0


def delta_for(pid: int, like: dict[str, np.ndarray], scale: float = 0.01) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(100 + pid)
    return {k: (scale * (1 + pid) * rng.standard_normal(v.shape)).astype(np.float32) for k, v in like.items()}


def weight_for(pid: int) -> int:
    return 10 + 7 * pid


def device(overrides: dict, pid: int, fail: bool = False) -> ClientApp:
    """A deterministic device behind the real mods: replies global + delta_for(pid), weight_for(pid)."""
    app = ClientApp(mods=client_mods(overrides))

    @app.train()
    def train(msg: Message, context) -> Message:
        if fail:
            raise RuntimeError("device dropped out")
        g = {k: v.numpy() for k, v in msg.content.array_records[ARRAYS].items()}
        d = delta_for(pid, g)
        out = ArrayRecord({k: Array(g[k] + d[k]) for k in g})
        metrics = MetricRecord({NUM_EXAMPLES: weight_for(pid), TRAIN_LOSS: float(pid)})
        return Message(RecordDict({ARRAYS: out, METRICS: metrics}), reply_to=msg)

    return app


def overrides_for(tmp: Path, **extra: object) -> dict:
    return {"partition.num-clients": N, "strategy.min-train-clients": 2, "server.num-rounds": 1,
            "server.eval-every": 0, "server.out-dir": str(tmp), "server.resume": False, **extra}


def one_round(tmp: Path, failing: tuple[int, ...] = (), **extra: object
              ) -> tuple[LoopState, dict[str, np.ndarray], RunSettings]:
    """One round of the real loop; returns the state, the initial global arrays and the settings."""
    ov = overrides_for(tmp, **extra)
    s = parse_run_config(merge_overrides(load_defaults(), ov))
    strategy = wrap_strategy(build_strategy(s.strategy), s)
    state = init_state(s, tmp, strategy, resume=False)
    glob = {k: v.numpy().copy() for k, v in state.arrays.items()}
    apps = {pid: device(ov, pid, fail=pid in failing) for pid in range(N)}
    grid = cast(Grid, WireGrid(N, lambda pid: apps[pid]))  # a test grid: get_node_ids and send_and_receive
    state = run_rounds(grid, strategy, s, state, tmp, ConfigRecord({"propensity-eta": 1.0}), central_eval=lambda m: {})
    return state, glob, s


def _np(rec: ArrayRecord) -> dict[str, np.ndarray]:
    return {k: v.numpy() for k, v in rec.items()}


def weighted_average(glob: dict[str, np.ndarray], pids: list[int], weights: list[float]) -> dict[str, np.ndarray]:
    w = np.asarray(weights, np.float64) / np.sum(weights)
    out = {}
    for k, g in glob.items():
        out[k] = sum(wi * (g.astype(np.float64) + delta_for(p, glob)[k]) for wi, p in zip(w, pids, strict=True))
    return out


def quantization_bound(settings, weights: list[float]) -> float:
    c = settings.secagg
    step = 2 * c.clipping_range / c.quantization_range
    return len(weights) * step / (sum(weights) / c.max_weight)


def _max_abs_diff(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> float:
    return max(float(np.max(np.abs(a[k].astype(np.float64) - b[k]))) for k in a)


def test_secagg_aggregate_equals_fedavg_within_the_quantization_bound(tmp_path: Path) -> None:
    # Prepare: the same five deterministic devices, once through plain FedAvg, once through SecAgg+
    plain, glob, _ = one_round(tmp_path / "plain")
    extra: dict[str, Any] = {"secagg.enabled": True, "secagg.max-weight": 100.0}
    secure, _, settings = one_round(tmp_path / "secagg", **extra)
    pids = list(range(N))
    weights = [float(weight_for(p)) for p in pids]
    reference = weighted_average(glob, pids, weights)
    bound = quantization_bound(settings, weights)  # 5 * 3.8e-6 / 1.2 = 1.6e-5
    # Assert: plain FedAvg is the weighted average (float32), SecAgg+ is within the quantization bound of it
    assert _max_abs_diff(_np(plain.arrays), reference) < 1e-6
    diff = _max_abs_diff(_np(secure.arrays), reference)
    assert 0 < diff <= bound + 1e-6, (diff, bound)
    rec = secure.rounds[0]
    assert [s["stage"] for s in rec["secagg"]["stages"]] == ["setup", "share-keys", "collect-masked-vectors", "unmask"]
    assert rec["secagg"]["completed"] and (rec["sampled"], rec["accepted"], rec["failures"]) == (N, N, 0)
    # the masked vectors travel as 64-bit integers: about twice the float32 upload of plain FedAvg
    assert 1.5 * plain.rounds[0]["bytes_received"] < rec["bytes_received"] < 2.5 * plain.rounds[0]["bytes_received"]
    # train metrics still arrive (in the clear, as in Flower's SecAgg+), weighted by num-examples
    assert rec["train"][TRAIN_LOSS] == pytest.approx(np.dot(pids, weights) / sum(weights))


def test_a_device_dropping_out_is_recovered_from_its_shares(tmp_path: Path) -> None:
    # device 2 fails while the masked vectors are collected; its neighbours' shares remove its pairwise masks
    extra = {"secagg.enabled": True, "secagg.max-weight": 100.0}
    secure, glob, settings = one_round(tmp_path / "secagg", failing=(2,), **extra)
    pids = [0, 1, 3, 4]
    weights = [float(weight_for(p)) for p in pids]
    diff = _max_abs_diff(_np(secure.arrays), weighted_average(glob, pids, weights))
    assert diff <= quantization_bound(settings, weights) + 1e-6
    rec = secure.rounds[0]
    assert rec["accepted"] == 4 and rec["failures"] == 1 and rec["secagg"]["completed"]


def test_secagg_with_client_side_dp_clips_on_the_device(tmp_path: Path) -> None:
    # client-fixed DP under SecAgg+: devices clip (Flower's fixedclipping_mod inside the SecAgg+ adapter), declare
    # weight 1, and Flower's legacy wrapper adds the noise to the secure aggregate (noise 0 here, to compare)
    clip = 0.5
    extra: dict[str, Any] = {"secagg.enabled": True, "secagg.max-weight": 1.0, "privacy.mode": "client-fixed",
             "privacy.noise-multiplier": 0.0, "privacy.clipping-norm": clip}
    secure, glob, settings = one_round(tmp_path / "dp", **extra)
    expected = {}
    for k, g in glob.items():
        acc = np.zeros(g.shape)
        for p in range(N):
            d = delta_for(p, glob)
            norm = np.sqrt(sum(float(np.sum(v.astype(np.float64) ** 2)) for v in d.values()))
            acc += d[k] * min(1.0, clip / norm)
        expected[k] = g + acc / N
    assert _max_abs_diff(_np(secure.arrays), expected) <= quantization_bound(settings, [1.0] * N) + 1e-6
    priv = secure.rounds[0]["privacy"]
    assert priv["released"] and priv["averaged"] == N and priv["clipping_norm"] == clip


def test_secagg_refuses_server_side_dp() -> None:
    s = parse_run_config(merge_overrides(load_defaults(), {"secagg.enabled": True, "privacy.mode": "server-fixed"}))
    with pytest.raises(ConfigError, match="secagg.enabled"):
        wrap_strategy(build_strategy(s.strategy), s)


def test_secagg_config_is_checked_like_flowers_workflow() -> None:
    with pytest.raises(ConfigError, match="reconstruction-threshold"):
        parse_run_config(merge_overrides(load_defaults(), {"secagg.enabled": True, "secagg.num-shares": 3,
                                                           "secagg.reconstruction-threshold": 3}))


def test_non_secagg_messages_pass_through_the_secagg_mod(tmp_path: Path) -> None:
    from client.secagg import make_secagg_mod

    msg = Message(RecordDict({ARRAYS: ArrayRecord(build_head(parse_run_config(load_defaults()).model).state_dict())}),
                  message_type="train", dst_node_id=1)
    seen = []

    def call_next(m: Message, c: Context) -> Message:
        seen.append(m)
        return Message(RecordDict(), reply_to=m)

    ctx = Context(run_id=1, node_id=1, node_config={}, state=RecordDict(), run_config={})
    reply = make_secagg_mod()(msg, ctx, call_next)
    assert seen == [msg] and reply.has_content()


@pytest.mark.slow
def test_smoke_run_with_secagg(tmp_path: Path) -> None:
    """``fedrank simulate --scenario smoke --set secagg.enabled=true``: Flower's simulation engine, 10 devices."""
    out = tmp_path / "run"
    cmd = [str(Path(sys.executable).parent / "fedrank"), "simulate", "--scenario", "smoke", "--out", str(out),
           "--set", "secagg.enabled=true", "--set", "secagg.max-weight=1000.0", "--no-reference"]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    res = json.loads((out / "results.json").read_text())
    assert res["run_config"]["secagg.enabled"] is True
    for r in res["rounds"]:
        assert r["secagg"]["completed"] and r["accepted"] == r["sampled"] == 10
        assert 0.0 < r["central"]["ndcg@10"] <= 1.0
    assert res["rounds"][-1]["central"]["ndcg@10"] > 0.3
