"""The one error type of a deployment: what every ``deploy`` module raises and ``fedrank deploy`` reports."""

from __future__ import annotations


class DeployError(RuntimeError):
    """A deployment cannot start or stop; the message says why and names the file, port or process."""
