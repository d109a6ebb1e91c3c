"""Typed export errors: a failed check names the file, the check, what was measured and the bar it missed."""

from __future__ import annotations


class ExportError(RuntimeError):
    """The export could not run (bad arguments, no data to validate on, a converter failure)."""


class ExportValidationError(ExportError):
    """An exported file failed a check; nothing was written to the bundle's destination.

    Attributes
    ----------
    file : the bundle file (or ``pipeline[<backend>]``) that failed
    check : what was checked (``output names``, ``shape``, ``cosine@batch=3``, ``ndcg@10 delta``, ...)
    measured : the measured value
    bar : the value it had to reach
    """

    def __init__(self, file: str, check: str, measured: object, bar: object) -> None:
        self.file = file
        self.check = check
        self.measured = measured
        self.bar = bar
        super().__init__(f"{file}: {check} failed: measured {_fmt(measured)}, bar {_fmt(bar)}")


def _fmt(x: object) -> str:
    return f"{x:.6g}" if isinstance(x, float) else str(x)
