"""The device side of SecAgg+: Flower's ``secaggplus_mod`` around our train handler.

Flower 1.41's SecAgg+ protocol (``flwr.client.mod.secure_aggregation.secaggplus_mod``) runs four train-type
messages per round and, in its "collect masked vectors" stage, calls the rest of the ClientApp with a legacy FitIns
layout (``fitins.parameters``: unnamed serialized arrays, ``fitins.config``) and expects a legacy FitRes layout back
(``fitres.parameters``, ``fitres.num_examples``, ``fitres.metrics``, ``fitres.status``). Our handlers speak
``arrays`` / ``config`` / ``metrics``. The mod below hands SecAgg+ messages (those carrying Flower's
``secaggplus_configs`` record) to ``secaggplus_mod`` and converts between the two layouts around the inner mods
(differential privacy, fault injection) and the train handler; every other message passes through untouched.

The server (``server.secagg``) sends the head's array names in the fit config (``array-names``), so the legacy
arrays get their names back. The weight the device declares is its ``num-examples``, or 1 when the server asks
for client-side DP clipping (uniform weights, as the DP noise calibration requires).
"""

from __future__ import annotations

from typing import Any, cast

from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MessageType, RecordDict
from flwr.client.mod import secaggplus_mod
from flwr.clientapp.typing import ClientAppCallable, Mod
from flwr.common import Code, FitRes, Status, bytes_to_ndarray, ndarrays_to_parameters
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS
from flwr.compat.common import recorddict_compat as compat
from flwr.supercore.differential_privacy import KEY_CLIPPING_NORM

from shared_model.records import ARRAYS, CONFIG, METRICS, NUM_EXAMPLES

ARRAY_NAMES = "array-names"  # same key as server.secagg.ARRAY_NAMES (the client never imports server code)


def is_secagg_message(msg: Message) -> bool:
    return (msg.metadata.message_type.split(".")[0] == MessageType.TRAIN and msg.has_content()
            and RECORD_KEY_CONFIGS in msg.content.config_records)


def _legacy_train(msg: Message, ctxt: Context, call_next: ClientAppCallable) -> Message:
    """FitIns layout -> our layout -> inner mods + train handler -> FitRes layout."""
    fitins = compat.recorddict_to_fitins(msg.content, keep_input=True)
    config = dict(fitins.config)
    names = str(config.pop(ARRAY_NAMES, "")).split(",")
    tensors = fitins.parameters.tensors
    if len(names) != len(tensors):
        raise ValueError(f"SecAgg+ fit message: {len(tensors)} arrays but {len(names)} names in '{ARRAY_NAMES}'")
    arrays = ArrayRecord({n: Array(bytes_to_ndarray(t)) for n, t in zip(names, tensors, strict=True)})
    msg.content = RecordDict({ARRAYS: arrays, CONFIG: ConfigRecord(cast(dict[str, Any], config))})
    reply = call_next(msg, ctxt)
    if reply.has_error():  # secaggplus_mod cannot carry an error reply: raise, Flower turns it into one
        raise RuntimeError(f"train handler failed under SecAgg+: {reply.error.reason}")
    out = reply.content.array_records[ARRAYS]
    if list(out.keys()) != names:
        raise ValueError("the train reply's arrays do not match the arrays SecAgg+ sent")
    metrics = dict(reply.content.metric_records[METRICS])
    weight = 1 if KEY_CLIPPING_NORM in config else int(cast(float, metrics[NUM_EXAMPLES]))
    fitres = FitRes(status=Status(code=Code.OK, message="ok"),
                    parameters=ndarrays_to_parameters([out[n].numpy() for n in names]),
                    num_examples=weight, metrics=cast(dict[str, Any], metrics))
    return Message(compat.fitres_to_recorddict(fitres, keep_input=True), reply_to=msg)


def make_secagg_mod() -> Mod:
    """A Flower mod: SecAgg+ messages go through ``secaggplus_mod`` (the protocol) and the layout adapter."""

    def secagg_mod(msg: Message, ctxt: Context, call_next: ClientAppCallable) -> Message:
        if not is_secagg_message(msg):
            return call_next(msg, ctxt)
        return secaggplus_mod(msg, ctxt, lambda m, c: _legacy_train(m, c, call_next))

    return secagg_mod
