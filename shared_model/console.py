"""What every command-line area shares: exit codes, one-line errors, ``--set`` parsing, result tables.

The ``fedrank`` front door (``fedrank/cli.py``) builds the parser from each area's ``add_commands``; the areas
print through these helpers so that every command looks and fails the same way.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable, Sequence
from typing import Any

METRIC_COLUMNS = ("ndcg@10", "mrr", "recall@10")
EXIT_BAD_INPUT = 2  # what every command returns for input it cannot use (argparse uses 2 for usage errors)


def print_table(title: str, rows: dict[str, dict[str, float]], columns: Sequence[str] = METRIC_COLUMNS) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=title)
    table.add_column("ranker")
    for c in columns:
        table.add_column(c, justify="right")
    for name, metrics in rows.items():
        table.add_row(name, *(f"{metrics.get(c, float('nan')):.4f}" for c in columns))
    Console().print(table)


def parse_sets(items: list[str] | None) -> dict[str, Any]:
    """``--set KEY=VALUE`` options as a dict; a value is read as TOML, else kept as a bare string."""
    import tomllib

    out: dict[str, Any] = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        if not sep:
            raise ValueError(f"--set {item!r}: expected KEY=VALUE (e.g. strategy.name=\"fedprox\")")
        try:
            out[key.strip()] = tomllib.loads(f"v = {value}")["v"]
        except tomllib.TOMLDecodeError:
            out[key.strip()] = value  # a bare string
    return out


def one_line(e: BaseException) -> str:
    """An exception's message on one line (a KeyError's without the quotes str() adds)."""
    text = str(e.args[0]) if isinstance(e, KeyError) and e.args else str(e)
    return " ".join(part.strip() for part in text.splitlines() if part.strip()) or e.__class__.__name__


def add_command(subparsers: Any, name: str, fn: Callable[[argparse.Namespace], int],
                help_: str) -> argparse.ArgumentParser:
    """One command on an ``argparse`` ``add_subparsers()`` object: ``help_`` as its help and description, ``fn`` as
    the handler the front door calls (``args.func``)."""
    sp: argparse.ArgumentParser = subparsers.add_parser(name, help=help_, description=help_)
    sp.set_defaults(func=fn)
    return sp
