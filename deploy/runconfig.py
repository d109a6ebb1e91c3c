"""The deployment's run config: resolved once (pyproject defaults < scenario < overrides < options), written as
``run-config.toml`` for ``flwr run --run-config``, and its data prepared with one shard per SuperNode."""

from __future__ import annotations

import json
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from deploy.errors import DeployError, DeployInputError


def resolve_run_config(scenario: str | None = None, nodes: int | None = None, rounds: int | None = None,
                       out: str | None = None, extra: Mapping[str, Any] | None = None,
                       base: Path | None = None) -> dict[str, Any]:
    """The flat run config of the deployment: pyproject defaults < scenario < ``extra`` < explicit options.
    ``data.dir`` and ``server.out-dir`` become absolute (the ServerApp runs from the installed app bundle)."""
    from shared_model.config import parse_run_config, scenario_layer
    from shared_model.config import resolve_run_config as resolve

    cli: dict[str, Any] = dict(extra or {})
    if nodes is not None:
        if nodes < 1:
            raise DeployInputError(f"--nodes {nodes}: need at least one SuperNode")
        cli["partition.num-clients"] = nodes
    if rounds is not None:
        cli["server.num-rounds"] = rounds
    if out is not None:
        cli["server.out-dir"] = out
    flat = resolve(*([scenario_layer(scenario)] if scenario else []), ("command line", cli))
    base = base or Path.cwd()
    for key in ("data.dir", "server.out-dir"):
        flat[key] = str((base / str(flat[key])).resolve())
    parse_run_config(flat)  # validates every value
    return flat


def run_config_overrides(flat: Mapping[str, Any]) -> dict[str, Any]:
    """The keys that differ from pyproject's defaults, plus the two paths: what ``flwr run`` must be given."""
    from shared_model.config import load_defaults

    defaults = load_defaults()
    keep = {"data.dir", "server.out-dir", "partition.num-clients"}
    return {k: v for k, v in flat.items() if k in keep or defaults.get(k) != v}


def _toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int | float):
        return repr(v)
    return json.dumps(str(v))  # a TOML basic string is a JSON string for these characters


def write_run_config(path: Path, overrides: Mapping[str, Any]) -> None:
    """A TOML file for ``flwr run --run-config FILE`` (dotted keys as quoted keys, so they stay flat)."""
    text = "# written by `fedrank deploy up`: flwr run . NAME --stream --run-config THIS_FILE\n"
    text += "".join(f"{json.dumps(k)} = {_toml_value(v)}\n" for k, v in sorted(overrides.items()))
    if tomllib.loads(text) != dict(overrides):
        raise DeployError(f"{path}: run config does not survive TOML round trip: {dict(overrides)}")
    path.write_text(text)


def export_device_shards(flat: Mapping[str, Any], out_dir: Path, progress: bool = True) -> list[Path]:
    """The run's data prepared (generated first if needed) and one self-contained ``<k>.npz`` per partition in
    ``out_dir``: the file a device on another host is given (``fedrank deploy node --data``). The partitioning
    is the one :func:`shared_model.shards.ensure_shards` makes, so partition ``k`` holds the same sessions."""
    from shared_model.config import parse_run_config
    from shared_model.shards import partition_users, user_segments, write_shards
    from simulations.runner import ensure_data

    settings = parse_run_config(flat)
    prep = ensure_data(settings, progress)
    p = settings.partition
    users = np.unique(prep.log.user)
    clients = partition_users(users, user_segments(prep.data_dir, users), p.scheme, p.num_clients, p.alpha, p.seed)
    return [q.resolve() for q in write_shards(prep, out_dir, clients)]


def prepare_shards(flat: Mapping[str, Any], progress: bool = True) -> list[Path]:
    """Generate/prepare the data folder if needed and write one shard per client; their absolute paths."""
    from shared_model.config import parse_run_config
    from shared_model.shards import ensure_shards
    from simulations.runner import ensure_data

    settings = parse_run_config(flat)
    prep = ensure_data(settings, progress)
    return [p.resolve() for p in ensure_shards(prep, settings, layout="files")]  # a file per SuperNode
