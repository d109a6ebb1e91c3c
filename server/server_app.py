"""The Flower ServerApp. A thin ``main`` over ``server.run.run_server``."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from server.run import run_server
from shared_model.config import load_defaults, merge_overrides, parse_run_config


def make_server_app(overrides: Mapping[str, Any] | None = None, progress: bool = True) -> ServerApp:
    """A ServerApp; ``overrides`` sit on top of Flower's run config (used by ``fedrank simulate``)."""
    overrides = dict(overrides or {})
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        flat = merge_overrides(load_defaults(), dict(context.run_config), "run config")
        settings = parse_run_config(merge_overrides(flat, overrides, "overrides"))
        run_server(grid, settings, progress=progress)

    return app


app = make_server_app()
