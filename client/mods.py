"""The ClientApp's mods, outermost first. Each mod reads the run config from the Context and passes messages
through untouched when its feature is off, so one ClientApp serves every scenario."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from flwr.clientapp.typing import Mod

from client.compression import make_compression_mod
from client.faults import make_fault_mod
from client.privacy import make_privacy_mod
from client.secagg import make_secagg_mod


def client_mods(overrides: Mapping[str, Any] | None = None) -> list[Mod]:
    """Order matters: secure aggregation must see the final (clipped, noised) update and the constant weight, so
    it sits outside the differential-privacy mod, which sits outside fault injection (a faulty device's update is
    what gets clipped). Compression (never together with SecAgg+) sits between them: it widens an fp16 global head
    before DP clips against it, and encodes the update after DP clipped and noised it. Under DP the privacy mod also drops the handler's metrics and refuses evaluate messages
    (client/privacy.py): nothing but the clipped update and ``num-examples = 1`` reaches SecAgg+ or the server."""
    mods: list[Mod] = []
    mods.append(make_secagg_mod())  # outermost: SecAgg+ messages only (client/secagg.py)
    mods.append(make_compression_mod(overrides))  # compression.uplink / .downlink (client/compression.py)
    mods.append(make_privacy_mod(overrides))  # privacy.mode client-fixed / client-adaptive / local (client/privacy.py)
    # ``overrides``: the run config `fedrank simulate` hands the ClientApp (run_simulation's Context has none)
    mods.append(make_fault_mod(overrides))  # innermost: faults (client/faults.py)
    return mods
