"""The device side of differential privacy: Flower's own client mods, chosen by ``privacy.mode``.

- ``client-fixed``: Flower's ``fixedclipping_mod`` clips the update (reply arrays minus the arrays received) to
  the clipping norm the server's ``DifferentialPrivacyClientSideFixedClipping`` wrapper sends in the train
  config (key ``clipping_norm``).
- ``client-adaptive``: Flower's ``adaptiveclipping_mod`` does the same and adds the ``norm_bit`` metric (was the
  update clipped?) that ``DifferentialPrivacyClientSideAdaptiveClipping`` needs to adapt the norm.
- ``local``: Flower's ``LocalDpMod`` clips to ``privacy.clipping-norm`` and adds Gaussian noise with std
  ``privacy.local-sensitivity * sqrt(2 ln(1.25 / privacy.target-delta)) / privacy.local-epsilon`` before upload.

Flower's mods act on whatever single ArrayRecord / ConfigRecord / MetricRecord a message holds (our ``arrays``,
``config`` and ``metrics`` keys), but they do not look at the message type: applied to an evaluate message they
would reply with an error (no arrays in the reply). So the mod below hands them train messages only, and only in
the mode that calls for them; everything else passes through untouched.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

import numpy as np
from flwr.app import Context, Message, MessageType
from flwr.clientapp.mod import LocalDpMod, adaptiveclipping_mod, fixedclipping_mod
from flwr.clientapp.typing import ClientAppCallable, Mod

from client.settings import settings_from


def make_privacy_mod(overrides: Mapping[str, Any] | None = None) -> Mod:
    """A Flower mod applying the ``privacy.mode`` of the run config (``context.run_config`` merged over pyproject's
    defaults, then ``overrides``, as the ClientApp's handlers read it) to train messages."""
    overrides = dict(overrides or {})

    def privacy_mod(msg: Message, ctxt: Context, call_next: ClientAppCallable) -> Message:
        if msg.metadata.message_type.split(".")[0] != MessageType.TRAIN:
            return call_next(msg, ctxt)
        p = settings_from(ctxt, overrides).privacy
        if p.mode == "client-fixed":
            return fixedclipping_mod(msg, ctxt, call_next)
        if p.mode == "client-adaptive":
            return adaptiveclipping_mod(msg, ctxt, call_next)
        if p.mode == "local":
            # LocalDpMod draws from numpy's global generator: make sure no seeded state makes the noise predictable
            np.random.seed(np.frombuffer(os.urandom(4 * 624), dtype=np.uint32))
            return LocalDpMod(p.clipping_norm, p.local_sensitivity, p.local_epsilon, p.target_delta)(msg, ctxt, call_next)
        return call_next(msg, ctxt)

    return privacy_mod
