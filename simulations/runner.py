"""``fedrank simulate``: a scenario file through Flower's simulation engine, then references and plots."""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import os
import signal
import threading
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from flwr.clientapp import ClientApp

from shared_model.config import RunSettings, parse_run_config, resolve_run_config, scenario_layer
from shared_model.outdir import INTERRUPTED, locked_dir
from shared_model.prepared import Prepared, prepare
from shared_model.schema import atomic_write
from shared_model.shards import ensure_shards
from simulations.marketplace import generate_marketplace
from simulations.memory import PeakTreeMemory

log = logging.getLogger(__name__)
OBJECT_STORE_MB = 512


def ensure_data(settings: RunSettings, progress: bool = True) -> Prepared:
    """The prepared data folder; the marketplace is generated first if the folder has none."""
    data_dir = Path(settings.data.dir)
    if not (data_dir / "sessions.npz").is_file():
        log.info("no data in %s: generating the %r marketplace", data_dir, settings.data.preset)
        generate_marketplace(data_dir, preset=settings.data.preset, seed=settings.data.seed, progress=progress)
    return prepare(data_dir, progress=progress)


class _QuietOnceInterrupted(logging.Filter):
    """Flower's message threads log every ClientApp actor that Ray stops on an interruption, with its traceback:
    once the front door got SIGINT/SIGTERM, the one line it prints says it all."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not INTERRUPTED.is_set()


@contextlib.contextmanager
def _interruptible() -> Iterator[None]:
    """Around ``run_simulation``: SIGTERM stays with the front door's handler (``ray.init`` would replace it with
    ``sys.exit``), and Flower's logs of the shutdown after an interruption are left out."""
    import ray._private.utils as ray_utils  # Flower's simulation engine runs on Ray

    quiet = _QuietOnceInterrupted()
    flwr_log = logging.getLogger("flwr")
    setter = getattr(ray_utils, "set_sigterm_handler", None)
    flwr_log.addFilter(quiet)
    if setter is not None and signal.getsignal(signal.SIGTERM) not in (signal.SIG_DFL, signal.SIG_IGN, None):
        ray_utils.set_sigterm_handler = lambda handler: None
    try:
        yield
    finally:
        if setter is not None:
            ray_utils.set_sigterm_handler = setter
        flwr_log.removeFilter(quiet)


def backend_config(object_store_mb: int = OBJECT_STORE_MB) -> dict[str, Any]:
    """Flower's Ray backend settings: one ClientApp actor per core (a device's training is single-threaded and
    small: more actors than cores only share them), and a capped object store (Ray reserves 30% of the machine's
    memory by default; a round's messages need a few MB)."""
    cores = os.cpu_count() or 1
    return {"client_resources": {"num_cpus": 1, "num_gpus": 0.0},
            "init_args": {"num_cpus": cores, "include_dashboard": False,
                          "object_store_memory": object_store_mb * 2**20}}


@functools.lru_cache(maxsize=4)
def _client_app_of(config_json: str) -> ClientApp:
    """The ClientApp of a run config, built once per process (what a Ray actor turns a pickled
    :class:`_ClientAppByConfig` into)."""
    from client.client_app import make_client_app

    return make_client_app(json.loads(config_json))


class _ClientAppByConfig(ClientApp):
    """A ClientApp that pickles as its run config.

    Flower's Ray backend sends the ClientApp to an actor with every message, pickled by value: the handlers'
    closures, about 28 KB and 5-30 ms of the driver's time per message (measured), so hundreds of messages a round
    and 10,000 at start-up (the partition-id query). Pickled as ``(_client_app_of, (run config JSON,))`` it is a
    few KB, and each actor builds the app once (:func:`_client_app_of`)."""

    _config_json: str

    def __reduce__(self) -> tuple[Any, tuple[str]]:
        return _client_app_of, (self._config_json,)


def client_app_for(flat: Mapping[str, Any]) -> ClientApp:
    """The ClientApp for a flat run config, cheap to send to Ray's actors (:class:`_ClientAppByConfig`)."""
    key = json.dumps(dict(flat), sort_keys=True)
    app = _ClientAppByConfig.__new__(_ClientAppByConfig)
    app.__dict__.update(_client_app_of(key).__dict__)  # the same handlers and mods, in this process
    app._config_json = key
    return app


def _deliver_pending(state: Any, nodes: Mapping[int, int]) -> list[Any]:
    """The stored messages not yet delivered to a node of ``nodes``, marked delivered (as
    ``LinkState.get_message_ins`` marks them), after dropping the expired ones (its ``_check_stored_messages``)."""
    from flwr.supercore.date import now

    with state.lock:
        pending = [mid for mid, m in state.message_ins_store.items()
                   if m.metadata.delivered_at == "" and m.metadata.dst_node_id in nodes]
        if not pending:
            return []
        state._check_stored_messages(set(pending))  # noqa: SLF001 -- what get_message_ins does per message
        stamp, out = now().isoformat(), []
        for mid in pending:
            msg = state.message_ins_store.get(mid)
            if msg is not None and msg.metadata.delivered_at == "":
                msg.metadata.delivered_at = stamp
                out.append(msg)
        return out


@contextlib.contextmanager
def _one_pass_delivery() -> Iterator[None]:
    """Flower 1.41's simulation engine hands messages to its ClientApp workers from a thread that, every 0.1 s,
    calls ``state.get_message_ins(node)`` for every node, and each call scans every stored message: work
    proportional to nodes x messages in flight, under the state's lock and the GIL, so it grows with the square
    of the fleet (the partition-id query to all 10,000 nodes alone: 10^8 checks per sweep). Around
    ``run_simulation`` that thread's loop is replaced by one pass over the stored messages per sweep
    (:func:`_deliver_pending`); with a state other than Flower's in-memory one, Flower's own loop runs."""
    from flwr.server.superlink.fleet.vce import vce_api
    from flwr.server.superlink.linkstate.in_memory_linkstate import InMemoryLinkState

    original = vce_api.add_messages_to_queue

    def add_messages_to_queue(state: Any, queue: Any, nodes_mapping: dict[int, int],
                              f_stop: threading.Event) -> None:
        if not isinstance(state, InMemoryLinkState):
            original(state, queue, nodes_mapping, f_stop)
            return
        while not f_stop.is_set():
            for msg in _deliver_pending(state, nodes_mapping):
                queue.put(msg)
            f_stop.wait(0.1)

    vce_api.add_messages_to_queue = add_messages_to_queue
    try:
        yield
    finally:
        vce_api.add_messages_to_queue = original


def scenario_config(scenario: str, rounds: int | None = None, out: str | None = None,
                    extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """pyproject defaults < scenario file < command-line values, as one flat run config."""
    cli: dict[str, Any] = dict(extra or {})
    if rounds is not None:
        cli["server.num-rounds"] = rounds
    if out is not None:
        cli["server.out-dir"] = out
    return resolve_run_config(scenario_layer(scenario), ("command line", cli))


def simulate(
    scenario: str,
    rounds: int | None = None,
    out: str | None = None,
    extra: dict[str, Any] | None = None,
    local_only: bool = False,
    central: bool = True,
    progress: bool = True,
) -> dict[str, Any]:
    """Run one scenario in-process with ``flwr.simulation.run_simulation``; returns its results."""
    flat = scenario_config(scenario, rounds, out, extra)
    return simulate_config(flat, scenario, local_only=local_only, central=central, progress=progress)


def resume_config(run_dir: str | Path, rounds: int | None = None) -> dict[str, Any]:
    """The run config saved in ``run_dir/last.pt``, to continue that run (optionally to more rounds)."""
    from server.loop import LAST
    from shared_model.checkpoint import load_checkpoint

    _, payload = load_checkpoint(Path(run_dir) / LAST)
    flat = resolve_run_config((f"{run_dir}/{LAST}", payload["run_config"]))
    flat.update({"server.out-dir": str(run_dir), "server.resume": True})
    if rounds is not None:
        flat["server.num-rounds"] = rounds
    return flat


def simulate_config(
    flat: dict[str, Any],
    scenario: str = "custom",
    local_only: bool = False,
    central: bool = True,
    progress: bool = True,
) -> dict[str, Any]:
    """Run a complete flat run config in-process with ``flwr.simulation.run_simulation``.

    The run folder (``server.out-dir``) is locked for the whole run (a second run into it fails at once with
    :class:`shared_model.outdir.OutputBusyError`) and written in place: checkpoints every round, ``results.json``
    at the end. An interruption (``KeyboardInterrupt``) stops Ray's workers and leaves the last checkpoint, from
    which ``fedrank simulate --resume`` continues.
    """
    if signal.getsignal(signal.SIGTERM) not in (signal.SIG_DFL, signal.SIG_IGN, None):
        # the front door handles SIGTERM: keep Ray's C++ crash handler off it (it prints a stack trace, then the
        # process aborts while shutting down). Read when Ray is imported, so before that.
        os.environ.setdefault("RAY_DISABLE_FAILURE_SIGNAL_HANDLER", "1")
    settings = parse_run_config(flat)
    with locked_dir(settings.server.out_dir):  # written in place: it holds the checkpoints a resume starts from
        return _simulate_locked(flat, settings, scenario, local_only, central, progress)


def _simulate_locked(flat: dict[str, Any], settings: RunSettings, scenario: str, local_only: bool, central: bool,
                     progress: bool) -> dict[str, Any]:
    from flwr.simulation import run_simulation

    from server.run import write_results
    from server.server_app import make_server_app
    from simulations.references import centralized_reference, local_only_reference

    prep = ensure_data(settings, progress)  # here, so that generation and embedding show their progress
    shards = ensure_shards(prep, settings, layout="packed")  # one store, not a file per device
    logging.getLogger("flwr").setLevel(logging.WARNING)
    with PeakTreeMemory() as memory, _interruptible(), _one_pass_delivery():
        run_simulation(
            server_app=make_server_app(flat, progress=progress),
            client_app=client_app_for(flat),
            num_supernodes=settings.partition.num_clients,
            backend_config=backend_config(),
        )
    out_dir = Path(settings.server.out_dir)
    results_path = out_dir / "results.json"
    if not results_path.is_file():
        raise RuntimeError(f"the simulation ended without writing {results_path}; see the log above")
    results = json.loads(results_path.read_text())
    results["scenario"] = scenario
    results["peak_tree_rss_mb"] = memory.peak_mb  # this process + Ray's workers, sampled every 0.5 s
    if central:
        results["references"]["centralized"] = centralized_reference(prep, settings)
    if local_only:
        # as many local epochs as a client trains on average in the federated run
        epochs = max(1, round(settings.strategy.fraction_train * settings.server.num_rounds * settings.train.local_epochs))
        results["references"]["local-only"] = local_only_reference(settings, shards, epochs=epochs, progress=progress)
    write_results(out_dir, results)
    atomic_write(out_dir / "run_config.json", lambda f: f.write(json.dumps(flat, indent=2).encode()))
    return results
