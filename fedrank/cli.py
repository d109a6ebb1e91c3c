"""``fedrank``: the command-line front door. Each area registers its own commands (``add_commands``); this
module only builds the parser, sets up logging and turns bad input into one line and exit code 2.
Nothing imports it."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence

from deploy.cli import add_commands as add_deploy_commands
from export.cli import add_commands as add_export_commands
from export.errors import ExportError
from shared_model.console import EXIT_BAD_INPUT, one_line
from simulations.cli import add_commands as add_simulation_commands


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="fedrank", description="Federated, on-device, multimodal product reranking.")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    add_simulation_commands(sub)  # generate, train, baselines, evaluate, simulate, demo
    add_export_commands(sub)  # export, rerank, bench
    add_deploy_commands(sub)  # deploy certs | up | down | status
    return p


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if not getattr(args, "func", None):
        parser.print_help()
        return 0
    try:
        return int(args.func(args))
    except (ValueError, OSError, KeyError, ExportError) as e:
        # bad input (config, catalog, logs, judgments, checkpoint, bundle...): one line naming the file/field,
        # exit 2 like a usage error; the traceback only with --verbose
        logging.getLogger("fedrank").debug("traceback", exc_info=True)
        print(f"fedrank {args.command}: error: {one_line(e)}", file=sys.stderr)
        return EXIT_BAD_INPUT


if __name__ == "__main__":
    sys.exit(main())
