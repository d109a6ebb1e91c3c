"""The Flower ServerApp. A thin ``main`` over ``server.run.run_server``."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from server.run import run_server
from shared_model.config import resolve_settings


def make_server_app(overrides: Mapping[str, Any] | None = None, progress: bool = True) -> ServerApp:
    """A ServerApp; ``overrides`` sit on top of Flower's run config (used by ``fedrank simulate``)."""
    overrides = dict(overrides or {})
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        settings = resolve_settings(("run config", context.run_config), ("overrides", overrides))
        run_server(grid, settings, progress=progress)

    return app


app = make_server_app()
