"""One training round with secure aggregation: Flower's ``SecAggPlusWorkflow`` on the Grid.

The server never sees an individual update, only the masked sum. Flower 1.41's SecAgg+ speaks the legacy
FitIns/FitRes record layout and drives a legacy strategy through a ``LegacyContext``, so one round here:

1. builds a legacy ``flwr.server.strategy.FedAvg`` (sampling ``strategy.fraction-train`` /
   ``strategy.min-train-clients`` like the Message-API strategy; the train config, the round and the names of
   the head's arrays ride in its fit config), wrapped in Flower's legacy
   ``DifferentialPrivacyClientSideFixedClipping`` when ``privacy.mode = "client-fixed"`` (devices clip, the
   server adds the noise to the securely aggregated average);
2. registers every node of the Grid with a ``SimpleClientManager`` (``GridClientProxy`` per node id);
3. runs the workflow's four stages (setup, share keys, collect masked vectors, unmask) once, through a Grid
   wrapper that counts messages and bytes per stage;
4. turns the aggregate (legacy ``Parameters``, float64) back into an ArrayRecord with the head's names, dtypes
   and shapes.

Devices run ``client.secagg`` (an adapter around Flower's ``secaggplus_mod``). SecAgg+ quantizes: each device
scales its arrays by its weight ``w / max-weight``, clips them to ``[-clipping-range, clipping-range]`` and rounds
them stochastically to ``quantization-range`` levels over that interval. The aggregate is therefore the weighted
average up to at most one quantization step ``2 * clipping-range / quantization-range`` per device and element,
divided by the sum of the weight ratios (see tests/test_secagg.py).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any, cast

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, RecordDict
from flwr.common import bytes_to_ndarray
from flwr.compat.common import recorddict_compat as compat
from flwr.server.client_manager import SimpleClientManager
from flwr.server.compat.grid_client_proxy import GridClientProxy
from flwr.server.compat.legacy_context import LegacyContext
from flwr.server.server_config import ServerConfig
from flwr.server.strategy import DifferentialPrivacyClientSideFixedClipping as LegacyClientSideFixedClipping
from flwr.server.strategy import FedAvg as LegacyFedAvg
from flwr.server.strategy import Strategy as LegacyStrategy
from flwr.server.workflow import SecAggPlusWorkflow
from flwr.server.workflow.constant import MAIN_CONFIGS_RECORD, MAIN_PARAMS_RECORD
from flwr.server.workflow.constant import Key as WorkflowKey
from flwr.serverapp import Grid

from server.privacy import effective_noise_multipliers, num_sampled_clients
from server.validation import check_update
from shared_model.config import RunSettings
from shared_model.records import NUM_EXAMPLES, SERVER_ROUND

log = logging.getLogger(__name__)

ARRAY_NAMES = "array-names"  # fit-config key: the head's state-dict keys in order, comma-separated
STAGES = ("setup", "share-keys", "collect-masked-vectors", "unmask")


def _record_bytes(record: Any) -> int:
    if isinstance(record, ConfigRecord):  # Flower's ConfigRecord.count_bytes fails on an empty list value
        empty = [k for k, v in record.items() if isinstance(v, list) and not v]
        rest = ConfigRecord({k: v for k, v in record.items() if k not in empty})
        return rest.count_bytes() + sum(len(k) for k in empty)
    return int(record.count_bytes())


def message_bytes(msgs: Iterable[Message]) -> int:
    """Bytes of every record a message carries, as Flower's ``count_bytes`` counts them (arrays, metrics, and
    configs: SecAgg+ ships public keys, encrypted shares and masked vectors as bytes in config records)."""
    total = 0
    for m in msgs:
        if m.has_content():
            total += sum(_record_bytes(r) for r in m.content.values())
    return total


@dataclass
class _Stage:
    sent: int
    replied: int
    errors: int
    bytes_sent: int
    bytes_received: int


@dataclass
class CountingGrid:
    """Delegates to a Grid and counts each ``send_and_receive`` call (one per SecAgg+ stage)."""

    grid: Grid
    stages: list[_Stage] = field(default_factory=list)

    def get_node_ids(self) -> Iterable[int]:
        return self.grid.get_node_ids()

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        out = list(messages)
        replies = list(self.grid.send_and_receive(out, timeout=timeout))
        self.stages.append(_Stage(len(out), len(replies), sum(r.has_error() for r in replies),
                                  message_bytes(out), message_bytes(replies)))
        return replies

    def __getattr__(self, name: str) -> Any:
        return getattr(self.grid, name)


def _weighted_metrics(results: list[tuple[int, dict[str, Any]]]) -> dict[str, Any]:
    total = sum(n for n, _ in results)
    keys = {k for _, m in results for k, v in m.items() if isinstance(v, int | float) and not isinstance(v, bool)}
    return {k: sum(n * float(m.get(k, 0.0)) for n, m in results) / total for k in sorted(keys)} if total else {}


def legacy_strategy(settings: RunSettings, fit_config: dict[str, Any]) -> LegacyStrategy:
    """Legacy FedAvg sampling like the Message-API strategy, DP-wrapped for ``privacy.mode = "client-fixed"``."""
    s = settings.strategy
    base = LegacyFedAvg(
        fraction_fit=s.fraction_train, fraction_evaluate=0.0, min_fit_clients=s.min_train_clients,
        min_evaluate_clients=0, min_available_clients=s.min_available_clients,
        on_fit_config_fn=lambda rnd: {**fit_config, SERVER_ROUND: rnd},
        fit_metrics_aggregation_fn=_weighted_metrics,
    )
    p = settings.privacy
    if p.mode == "client-fixed":
        return LegacyClientSideFixedClipping(base, p.noise_multiplier, p.clipping_norm, num_sampled_clients(settings))
    return base


def client_manager_for(grid: Grid) -> SimpleClientManager:
    """Every node of the Grid, registered as a ``GridClientProxy`` (the proxies only carry node ids here)."""
    cm = SimpleClientManager()
    run = getattr(grid, "run", None)
    run_id = int(getattr(run, "run_id", 0) or 0)
    for nid in grid.get_node_ids():
        cm.register(GridClientProxy(node_id=int(nid), grid=grid, run_id=run_id))
    return cm


def workflow_for(settings: RunSettings) -> SecAggPlusWorkflow:
    c = settings.secagg
    return SecAggPlusWorkflow(num_shares=c.num_shares, reconstruction_threshold=c.reconstruction_threshold,
                              max_weight=c.max_weight, clipping_range=c.clipping_range,
                              quantization_range=c.quantization_range, timeout=settings.server.round_timeout)


def _to_named(record: ArrayRecord, like: ArrayRecord) -> ArrayRecord:
    """Legacy parameters (keys "0", "1", ..., float64) back to the head's names, dtypes and shapes."""
    params = compat.arrayrecord_to_parameters(record, keep_input=True)
    if len(params.tensors) != len(like):
        raise ValueError(f"SecAgg+ returned {len(params.tensors)} arrays, the head has {len(like)}")
    out = {}
    for (name, ref), data in zip(like.items(), params.tensors, strict=True):
        ref_np = ref.numpy()
        out[name] = Array(np.ascontiguousarray(bytes_to_ndarray(data).astype(ref_np.dtype).reshape(ref_np.shape)))
    return ArrayRecord(out)


def secagg_train_round(
    grid: Grid, settings: RunSettings, arrays: ArrayRecord, rnd: int, train_config: ConfigRecord,
) -> tuple[ArrayRecord | None, dict[str, Any]]:
    """Run one SecAgg+ training round; returns the new global arrays (None if the round aggregated nothing)
    and the round's record for results.json (counts, bytes per stage, train metrics, DP release)."""
    fit_config: dict[str, Any] = {**dict(train_config), ARRAY_NAMES: ",".join(arrays.keys())}
    strategy = legacy_strategy(settings, fit_config)
    counting = CountingGrid(grid)
    ctx = LegacyContext(Context(run_id=0, node_id=0, node_config={}, state=RecordDict(), run_config={}),
                        config=ServerConfig(num_rounds=1, round_timeout=settings.server.round_timeout),
                        strategy=strategy, client_manager=client_manager_for(grid))
    ctx.state.array_records[MAIN_PARAMS_RECORD] = arrays
    ctx.state.config_records[MAIN_CONFIGS_RECORD] = ConfigRecord({WorkflowKey.CURRENT_ROUND: rnd})
    dp = settings.privacy.mode == "client-fixed"
    if dp:  # the legacy wrapper draws its noise from numpy's global generator (see server.privacy)
        np.random.seed(np.frombuffer(os.urandom(4 * 624), dtype=np.uint32))
    workflow_for(settings)(cast(Grid, counting), ctx)  # the workflow only calls send_and_receive

    st = counting.stages
    sampled = st[0].sent if st else 0
    contributed = (st[2].replied - st[2].errors) if len(st) > 2 else 0
    new_record = ctx.state.array_records[MAIN_PARAMS_RECORD]
    done = len(st) == len(STAGES) and new_record is not arrays
    record: dict[str, Any] = {
        "round": rnd, "sampled": sampled, "replied": contributed, "accepted": contributed if done else 0,
        "failures": sum(s.errors for s in st), "timeouts": sum(s.sent - s.replied for s in st), "rejected": 0,
        "rejected_reasons": [], "bytes_sent": sum(s.bytes_sent for s in st),
        "bytes_received": sum(s.bytes_received for s in st),
        "secagg": {"stages": [{"stage": name, **vars(s)} for name, s in zip(STAGES, st, strict=False)],
                   "completed": done},
    }
    new_arrays: ArrayRecord | None = None
    if done:
        candidate = _to_named(new_record, arrays)
        reason = check_update(candidate, {k: v.numpy() for k, v in arrays.items()})
        if reason:
            log.warning("round %d: SecAgg+ aggregate refused: %s", rnd, reason)
            record["rejected_reasons"] = [f"aggregate: {reason}"]
        else:
            new_arrays = candidate
    else:
        log.warning("round %d: SecAgg+ halted after %d of %d stages; global head unchanged", rnd, len(st), len(STAGES))
    hist = ctx.history.metrics_distributed_fit
    record["train"] = {k: float(v[-1][1]) for k, v in hist.items()} if new_arrays is not None else {}
    record["train"].pop(NUM_EXAMPLES, None)
    if dp:
        p = settings.privacy
        m = num_sampled_clients(settings)
        rel: dict[str, Any] = {"released": new_arrays is not None, "sampled": sampled, "averaged": contributed,
                               "clipping_norm": p.clipping_norm, "noise_clipping_norm": p.clipping_norm,
                               "noise_std": p.noise_multiplier * p.clipping_norm / m,
                               "noise_multiplier_updates": p.noise_multiplier}
        rel["z_replace_one"], rel["z_add_remove"] = effective_noise_multipliers(rel)
        record["privacy"] = rel
    return new_arrays, record
