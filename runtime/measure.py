"""Measuring what edge users care about: wall time and peak resident memory.

Peak RSS is sampled by a background thread during the measured region
(``ru_maxrss`` alone would report the peak of the whole process lifetime,
model conversion included, which says nothing about prefill).
"""

from __future__ import annotations

import os
import platform
import threading
import time
from dataclasses import dataclass, field

import psutil


def cpu_model() -> str:
    """The CPU's marketing name (machines differ day to day: every table is headed by it)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def rss_bytes() -> int:
    return psutil.Process(os.getpid()).memory_info().rss


@dataclass
class PeakRSS:
    """Context manager: peak RSS (bytes) seen while the block ran, sampled every ``interval`` s."""

    interval: float = 0.002
    start: int = 0
    peak: int = 0
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def __enter__(self) -> PeakRSS:
        proc = psutil.Process(os.getpid())
        self.start = self.peak = proc.memory_info().rss

        def sample() -> None:
            while not self._stop.is_set():
                self.peak = max(self.peak, proc.memory_info().rss)
                time.sleep(self.interval)

        self._thread = threading.Thread(target=sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        self.peak = max(self.peak, rss_bytes())

    @property
    def extra(self) -> int:
        """Growth over the RSS at entry: what the measured work itself needed."""
        return max(0, self.peak - self.start)


class Timer:
    """``with Timer() as t: ...; t.seconds``"""

    def __enter__(self) -> Timer:
        self._t0 = time.perf_counter()
        self.seconds = 0.0
        return self

    def __exit__(self, *exc: object) -> None:
        self.seconds = time.perf_counter() - self._t0


MIB = 1024 * 1024
