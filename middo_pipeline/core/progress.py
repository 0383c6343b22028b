"""Progress lines for long steps: samples done, rate, ETA — at most every few seconds."""

from __future__ import annotations

import time
from collections.abc import Callable


class ProgressLogger:
    """Call with (done, total); logs through ``log(message)`` when enough time has passed."""

    def __init__(self, log: Callable[[str], None], label: str, every_s: float = 10.0, unit: str = "samples"):
        self.log, self.label, self.every_s, self.unit = log, label, every_s, unit
        self.start = time.monotonic()
        self.last = float("-inf")

    def __call__(self, done: int, total: int) -> None:
        now = time.monotonic()
        if done < total and now - self.last < self.every_s:
            return
        self.last = now
        elapsed = max(now - self.start, 1e-9)
        rate = done / elapsed
        eta = (total - done) / rate if rate > 0 else float("nan")
        self.log(
            f"{self.label}: {done}/{total} {self.unit} ({100 * done / max(total, 1):.0f}%), "
            f"{rate:.2f} {self.unit}/s, elapsed {elapsed:.0f}s, ETA {eta:.0f}s"
        )
