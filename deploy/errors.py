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
