"""Peak resident memory of this process and all its descendants (Ray workers included), sampled from /proc."""

from __future__ import annotations

import os
import threading
from pathlib import Path
from types import TracebackType


def _children_map() -> dict[int, list[int]]:
    kids: dict[int, list[int]] = {}
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            stat = (d / "stat").read_text()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])  # field 4; the command may contain spaces
        kids.setdefault(ppid, []).append(int(d.name))
    return kids


def tree_rss_bytes(root: int | None = None) -> int:
    """Sum of VmRSS over ``root`` (default: this process) and its descendants."""
    root = root or os.getpid()
    kids = _children_map()
    total, stack = 0, [root]
    while stack:
        pid = stack.pop()
        stack.extend(kids.get(pid, []))
        try:
            for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1]) * 1024
                    break
        except OSError:
            continue
    return total


class PeakTreeMemory:
    """``with PeakTreeMemory() as m: ...`` then ``m.peak_mb``: sampled every ``interval`` seconds."""

    def __init__(self, interval: float = 0.5) -> None:
        self.interval = interval
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, tree_rss_bytes())
            self._stop.wait(self.interval)

    def __enter__(self) -> PeakTreeMemory:
        self._thread.start()
        return self

    def __exit__(self, *exc: type[BaseException] | BaseException | TracebackType | None) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, tree_rss_bytes())

    @property
    def peak_mb(self) -> float:
        return self.peak / 2**20
