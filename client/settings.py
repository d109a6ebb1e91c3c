"""The run settings a device works with: one resolver, shared by the ClientApp's handlers and its mods."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from flwr.app import Context

from shared_model.config import RunSettings, resolve_settings


def settings_from(context: Context, overrides: Mapping[str, Any]) -> RunSettings:
    """pyproject defaults < Flower's run config < programmatic overrides (``fedrank simulate``), parsed once per
    process for the same run config."""
    return resolve_settings(("run config", context.run_config), ("overrides", overrides))
