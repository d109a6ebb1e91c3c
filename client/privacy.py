"""The device side of differential privacy: Flower's own client mods, chosen by ``privacy.mode``, and what a
device withholds under DP.

- ``client-fixed``: Flower's ``fixedclipping_mod`` clips the update (reply arrays minus the arrays received) to
  the clipping norm the server's ``DifferentialPrivacyClientSideFixedClipping`` wrapper sends in the train
  config (key ``clipping_norm``).
- ``client-adaptive``: Flower's ``adaptiveclipping_mod`` does the same and adds the ``norm_bit`` metric (was the
  update clipped?) that ``DifferentialPrivacyClientSideAdaptiveClipping`` needs to adapt the norm; the server
  releases the count of these bits with noise and the accountant counts that release.
- ``local``: :class:`AnalyticLocalDpMod`, Flower's ``LocalDpMod`` with the noise calibrated by the analytic
  Gaussian mechanism (Balle & Wang 2018), so that ``privacy.local-epsilon`` holds for every epsilon (Flower's
  classic ``sqrt(2 ln(1.25 / delta)) / epsilon`` is proven for epsilon < 1 only, and at delta 1e-5 it gives
  epsilon 18.9 where 16 is asked).

Metrics under DP (any ``privacy.mode`` but ``none``): the DP mechanisms cover the model update only (Flower's
wrappers say so), so a device sends nothing else it computed from its data. A train reply carries one metric,
``num-examples = 1``: a public constant (the weight FedAvg needs; the DP average is uniform anyway, and a true
example count would tell the server how much each device shops), plus Flower's ``norm_bit`` under
``client-adaptive``. Train loss and step count stay on the device. Evaluate messages are refused with an error
reply that carries no metric (the server does not send them under DP: ``server.privacy.wrap_strategy``).

Flower's mods act on whatever single ArrayRecord / ConfigRecord / MetricRecord a message holds (our ``arrays``,
``config`` and ``metrics`` keys), but they do not look at the message type: applied to an evaluate message they
would reply with an error (no arrays in the reply). So the mod below hands them train messages only, and only in
the mode that calls for them; query messages and every message with ``privacy.mode = none`` pass through.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from typing import Any

import numpy as np
from flwr.app import Context, Error, Message, MessageType, MetricRecord, RecordDict
from flwr.clientapp.mod import LocalDpMod, adaptiveclipping_mod, fixedclipping_mod
from flwr.clientapp.typing import ClientAppCallable, Mod
from flwr.common.constant import ErrorCode

from client.settings import settings_from
from shared_model.records import METRICS, NUM_EXAMPLES

# the weight a device declares under DP: a public constant, so the reply says nothing about its data
DP_TRAIN_WEIGHT = 1
EVALUATE_REFUSED = "federated evaluation is off under differential privacy (privacy.mode={mode}): no metrics sent"


def analytic_gaussian_std(epsilon: float, delta: float, sensitivity: float) -> float:
    """Smallest Gaussian noise std giving (epsilon, delta)-DP for an L2 ``sensitivity``: the analytic Gaussian
    mechanism (Balle & Wang 2018, Theorem 8), valid for every epsilon > 0 (``dp_accounting.gaussian_mechanism``)."""
    from dp_accounting.gaussian_mechanism import get_sigma_gaussian

    return sensitivity * float(get_sigma_gaussian(epsilon, delta))


def classic_gaussian_std(epsilon: float, delta: float, sensitivity: float) -> float:
    """The classic calibration ``sensitivity * sqrt(2 ln(1.25 / delta)) / epsilon`` (Dwork & Roth, Theorem A.1;
    proven for epsilon < 1), which Flower's ``LocalDpMod`` uses."""
    return sensitivity * math.sqrt(2 * math.log(1.25 / delta)) / epsilon


class AnalyticLocalDpMod(LocalDpMod):
    """Flower's ``LocalDpMod`` (clip the update to ``clipping_norm``, add Gaussian noise to every coordinate)
    with the noise std of the analytic Gaussian mechanism for (``epsilon``, ``delta``) at ``sensitivity``.

    Flower's mod computes its std inline with the classic formula from its ``epsilon`` attribute; this subclass
    hands it the epsilon at which that formula yields the analytic std (``flower_epsilon``), so Flower's own
    clipping, record checks and noise run unchanged. ``target_epsilon`` is the guarantee; ``noise_std`` the std.
    """

    def __init__(self, clipping_norm: float, sensitivity: float, epsilon: float, delta: float) -> None:
        if sensitivity <= 0 or epsilon <= 0 or not 0 < delta < 1:
            raise ValueError("AnalyticLocalDpMod needs sensitivity > 0, epsilon > 0 and 0 < delta < 1")
        self.target_epsilon = epsilon
        self.noise_std = analytic_gaussian_std(epsilon, delta, sensitivity)
        flower_epsilon = sensitivity * math.sqrt(2 * math.log(1.25 / delta)) / self.noise_std
        super().__init__(clipping_norm, sensitivity, flower_epsilon, delta)
        # Flower's formula on the epsilon it holds must give our std (fails loudly if Flower's formula changes)
        if not math.isclose(classic_gaussian_std(self.epsilon, delta, sensitivity), self.noise_std, rel_tol=1e-9):
            raise RuntimeError("Flower's LocalDpMod no longer uses the classic calibration: re-check this subclass")


def _only_the_weight(call_next: ClientAppCallable) -> ClientAppCallable:
    """``call_next`` whose train reply keeps its arrays and one metric: ``num-examples = 1``."""

    def withhold(msg: Message, ctxt: Context) -> Message:
        reply = call_next(msg, ctxt)
        if reply.has_error() or not reply.has_content():
            return reply
        content = RecordDict(dict(reply.content.array_records))
        content[METRICS] = MetricRecord({NUM_EXAMPLES: DP_TRAIN_WEIGHT})
        reply.content = content
        return reply

    return withhold


def make_privacy_mod(overrides: Mapping[str, Any] | None = None) -> Mod:
    """A Flower mod applying the ``privacy.mode`` of the run config (``context.run_config`` merged over pyproject's
    defaults, then ``overrides``, as the ClientApp's handlers read it) to train and evaluate messages."""
    overrides = dict(overrides or {})

    def privacy_mod(msg: Message, ctxt: Context, call_next: ClientAppCallable) -> Message:
        kind = msg.metadata.message_type.split(".")[0]
        if kind not in (MessageType.TRAIN, MessageType.EVALUATE):
            return call_next(msg, ctxt)
        p = settings_from(ctxt, overrides).privacy
        if p.mode == "none":
            return call_next(msg, ctxt)
        if kind == MessageType.EVALUATE:
            return Message(Error(code=ErrorCode.MOD_FAILED_PRECONDITION, reason=EVALUATE_REFUSED.format(mode=p.mode)),
                           reply_to=msg)
        # innermost first: the handler's metrics are dropped, then Flower's mod clips (and may add norm_bit)
        inner = _only_the_weight(call_next)
        if p.mode == "client-fixed":
            return fixedclipping_mod(msg, ctxt, inner)
        if p.mode == "client-adaptive":
            return adaptiveclipping_mod(msg, ctxt, inner)
        if p.mode == "local":
            # LocalDpMod draws from numpy's global generator: make sure no seeded state makes the noise predictable
            np.random.seed(np.frombuffer(os.urandom(4 * 624), dtype=np.uint32))
            return AnalyticLocalDpMod(p.clipping_norm, p.local_sensitivity, p.local_epsilon, p.target_delta)(
                msg, ctxt, inner)
        return inner(msg, ctxt)  # server-fixed / server-adaptive: the server clips and adds the noise

    return privacy_mod
