"""The error types of a deployment: what every ``deploy`` module raises and ``fedrank deploy`` reports.

:class:`DeployInputError` (also a ``ValueError``, like every other bad-input error of the project) is input the
command cannot use: a port number, a state folder, TLS files, a run-config value. ``fedrank deploy`` reports it
on one line and exits 2. Any other :class:`DeployError` is a process that would not start or stop (exit 1, with
the tail of its log).
"""

from __future__ import annotations


class DeployError(RuntimeError):
    """A deployment cannot start or stop; the message says why and names the file, port or process."""


class DeployInputError(DeployError, ValueError):
    """Input ``fedrank deploy`` cannot use (a port, a folder, a TLS file, an option); the message names it."""


def report(cmd: str, e: Exception) -> int:
    """``fedrank deploy CMD``'s error: bad input (a ``ValueError``) on one line naming it, exit 2; anything else
    with its whole message (a process's log tail), exit 1."""
    import sys

    from shared_model.console import EXIT_BAD_INPUT, one_line

    if isinstance(e, ValueError):
        print(f"fedrank deploy {cmd}: error: {one_line(e)}", file=sys.stderr)
        return EXIT_BAD_INPUT
    print(f"fedrank deploy {cmd}: error: {e}", file=sys.stderr)
    return 1
