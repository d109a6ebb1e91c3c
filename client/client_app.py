"""The Flower ClientApp: one device. Thin handlers that translate Flower records to plain functions in
``client.local``; the device's logs never leave it, only head arrays and scalar metrics do."""

from __future__ import annotations

import time
from collections.abc import Mapping
from typing import Any, cast

import torch
from flwr.app import ArrayRecord, Context, Message, MetricRecord, MetricRecordValues, RecordDict
from flwr.clientapp import ClientApp

from client.faults import maybe_poison
from client.local import load_device_data, local_evaluate, local_train, personal_state, personalize
from client.mods import client_mods
from client.settings import settings_from
from shared_model.config import RunSettings
from shared_model.head import FusedRankingHead, build_head
from shared_model.records import (
    ARRAYS,
    CONFIG,
    METRICS,
    MRR_GLOBAL,
    NDCG_GLOBAL,
    NDCG_PERSONAL,
    NUM_EXAMPLES,
    NUM_STEPS,
    PARTITION_ID,
    PERSONAL_STATE,
    PNDCG_GLOBAL,
    PNDCG_PERSONAL,
    PROPENSITY_ETA,
    PROXIMAL_MU,
    RECALL_GLOBAL,
    SERVER_ROUND,
    TRAIN_LOSS,
    TRAIN_SECONDS,
)


def _personal(context: Context) -> dict[str, torch.Tensor] | None:
    if PERSONAL_STATE not in context.state.array_records:
        return None
    return context.state.array_records[PERSONAL_STATE].to_torch_state_dict()


def _global_head(s: RunSettings, msg: Message) -> FusedRankingHead:
    """The head the server sent, or a clear error naming what is wrong with the message."""
    if ARRAYS not in msg.content.array_records:
        raise ValueError(f"{msg.metadata.message_type} message without an '{ARRAYS}' record "
                         f"(has {sorted(msg.content.array_records.keys())})")
    model = build_head(s.model)
    sent = msg.content.array_records[ARRAYS]
    expected = set(model.state_dict().keys())
    if set(sent.keys()) != expected:
        missing, extra = sorted(expected - set(sent.keys())), sorted(set(sent.keys()) - expected)
        raise ValueError(f"'{ARRAYS}' record does not match the head: missing {missing[:3]}, unexpected {extra[:3]}")
    try:
        model.load_state_dict(sent.to_torch_state_dict())
    except RuntimeError as e:
        raise ValueError(f"'{ARRAYS}' record does not match the head ({s.model.fusion}): {e}") from e
    return model


def make_client_app(overrides: Mapping[str, Any] | None = None) -> ClientApp:
    overrides = dict(overrides or {})
    app = ClientApp(mods=client_mods(overrides))

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        s = settings_from(context, overrides)
        cfg = msg.content.config_records[CONFIG]
        rnd = int(cast(int, cfg.get(SERVER_ROUND, 0)))
        pid = int(context.node_config.get("partition-id", 0))
        torch.manual_seed(s.server.seed * 7919 + rnd * 104_729 + pid)
        data = load_device_data(s, dict(context.node_config))
        data = maybe_poison(s, context.node_config, data)  # faults.byzantine-attack = "poisoned-clicks"
        model = _global_head(s, msg)
        if s.model.personal_layers and (mine := _personal(context)):
            model.load_state_dict(mine, strict=False)
        t0 = time.perf_counter()
        stats = local_train(model, data, s.train, eta=float(cast(float, cfg[PROPENSITY_ETA])),
                            proximal_mu=float(cast(float, cfg.get(PROXIMAL_MU, 0.0))), seed=rnd * 1000 + pid)
        train_seconds = time.perf_counter() - t0
        if s.model.personal_layers:
            context.state[PERSONAL_STATE] = ArrayRecord(personal_state(model))
        metrics: dict[str, MetricRecordValues] = {
            NUM_EXAMPLES: len(data.train), TRAIN_LOSS: stats["train_loss"], NUM_STEPS: stats["num_steps"],
            TRAIN_SECONDS: train_seconds,
        }
        shared = model.shared_state_keys()  # personal layers (model.personal-layers) never leave the device
        state = {k: v for k, v in model.state_dict().items() if k in shared}
        content = RecordDict({ARRAYS: ArrayRecord(state), METRICS: MetricRecord(metrics)})
        return Message(content=content, reply_to=msg)

    @app.query()
    def query(msg: Message, context: Context) -> Message:
        """The partition id this node holds: the server orders node ids by it, so seeded sampling repeats."""
        if "partition-id" not in context.node_config:
            raise ValueError("node config has no 'partition-id'")
        pid = int(context.node_config["partition-id"])
        return Message(content=RecordDict({METRICS: MetricRecord({PARTITION_ID: pid})}), reply_to=msg)

    @app.evaluate()
    def evaluate(msg: Message, context: Context) -> Message:
        s = settings_from(context, overrides)
        cfg = msg.content.config_records[CONFIG]
        data = load_device_data(s, dict(context.node_config))
        model = _global_head(s, msg)
        glob = local_evaluate(model, data)
        eta = float(cast(float, cfg.get(PROPENSITY_ETA, 1.0)))
        mine = personalize(model, data, s.train, eta, _personal(context))
        pers = local_evaluate(mine, data)
        metrics: dict[str, MetricRecordValues] = {
            NUM_EXAMPLES: int(glob.get("num_lists", 0)),  # held-out slates with a relevant item: the weight
            NDCG_GLOBAL: glob.get("ndcg@10", 0.0), MRR_GLOBAL: glob.get("mrr", 0.0),
            RECALL_GLOBAL: glob.get("recall@10", 0.0), NDCG_PERSONAL: pers.get("ndcg@10", 0.0),
            PNDCG_GLOBAL: glob.get("pndcg@10", 0.0), PNDCG_PERSONAL: pers.get("pndcg@10", 0.0),
        }
        metrics = {k: (0.0 if v != v else v) for k, v in metrics.items()}  # NaN only when the weight is 0
        return Message(content=RecordDict({METRICS: MetricRecord(metrics)}), reply_to=msg)

    return app


app = make_client_app()
