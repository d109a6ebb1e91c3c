"""``fedrank``: the command-line front door. Each area registers its own commands (``add_commands``); this
module only builds the parser, sets up logging, turns bad input (or an output folder another command holds) into
one line and exit code 2, and an interruption (SIGINT, SIGTERM) into one line and exit code 130, after the
command's own cleanup ran. Nothing imports it."""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import threading
import time
from collections.abc import Sequence

from deploy.cli import add_commands as add_deploy_commands
from export.cli import add_commands as add_export_commands
from export.errors import ExportError
from export.shop import add_commands as add_shop_commands
from shared_model.console import EXIT_BAD_INPUT, one_line
from shared_model.outdir import INTERRUPTED
from simulations.cli import add_commands as add_simulation_commands
from simulations.logs_cli import add_commands as add_log_commands


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="fedrank", description="Federated, on-device, multimodal product reranking.")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    add_simulation_commands(sub)  # generate, train, baselines, evaluate, simulate, demo
    add_log_commands(sub)  # import-logs, export-logs
    add_export_commands(sub)  # export, rerank, bench
    add_shop_commands(sub)  # shop: the demo shop page (web/)
    add_deploy_commands(sub)  # deploy certs | up | down | status | run
    return p


EXIT_INTERRUPTED = 130  # 128 + SIGINT, what shells report for Ctrl-C


def _interrupt(signum: int, frame: object) -> None:
    """SIGINT/SIGTERM: ``KeyboardInterrupt`` in this process, so every ``finally`` cleans up (staging folders,
    temporary files, Ray); a forked worker (a rendering pool) just dies of the signal, without a traceback."""
    if os.getpid() != _MAIN_PID:
        signal.signal(signum, signal.SIG_DFL)
        os.kill(os.getpid(), signum)
        return
    INTERRUPTED.set()
    raise KeyboardInterrupt


_MAIN_PID = os.getpid()


def main(argv: Sequence[str] | None = None) -> int:
    global _MAIN_PID
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if not getattr(args, "func", None):
        parser.print_help()
        return 0
    _MAIN_PID = os.getpid()
    threads_before = set(threading.enumerate())
    handlers = {}
    if threading.current_thread() is threading.main_thread():  # Python handles signals in the main thread only
        handlers = {s: signal.signal(s, _interrupt) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        return int(args.func(args))
    except (ValueError, OSError, KeyError, ExportError) as e:
        # bad input (config, catalog, logs, judgments, checkpoint, bundle...) or an output folder another
        # command is writing: one line naming the file/field, exit 2 like a usage error; the traceback only
        # with --verbose
        logging.getLogger("fedrank").debug("traceback", exc_info=True)
        print(f"fedrank {args.command}: error: {one_line(e)}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except KeyboardInterrupt:
        # the command's own cleanup already ran (staging folders, temporary files); existing outputs are as
        # they were. One line, exit 130.
        return _interrupted(args.command, own_process=argv is None, threads_before=threads_before)
    except SystemExit as e:
        if e.code != signal.SIGTERM:
            raise
        # ray.init replaces the SIGTERM handler with sys.exit(SIGTERM)
        return _interrupted(args.command, own_process=argv is None, threads_before=threads_before)
    finally:
        for s, h in handlers.items():
            signal.signal(s, h)


def _interrupted(command: str, own_process: bool, threads_before: set[threading.Thread],
                 grace_s: float = 5.0) -> int:
    """One line, exit 130. A thread the command started and that does not end within ``grace_s`` (Flower's
    ServerApp thread waits up to ``server.round-timeout`` for replies that Ray, already shut down, will never send)
    would hold the process at exit: when this is the process's own command line (``main()`` without ``argv``),
    the process then exits at once. Files are written atomically, so no output is left half-written."""
    logging.getLogger("fedrank").debug("interrupted", exc_info=True)
    print(f"fedrank {command}: interrupted", file=sys.stderr)
    deadline = time.monotonic() + grace_s
    lingering = [t for t in threading.enumerate() if t not in threads_before and not t.daemon]
    for t in lingering:
        t.join(timeout=max(0.0, deadline - time.monotonic()))
    if own_process and any(t.is_alive() for t in lingering):
        logging.getLogger("fedrank").debug("not waiting for threads %s", [t.name for t in lingering if t.is_alive()])
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(EXIT_INTERRUPTED)
    return EXIT_INTERRUPTED


if __name__ == "__main__":
    sys.exit(main())
