"""Injected time: the only place wall and monotonic clocks are read.

Pure cores take a `Clock` (or plain numbers) instead of importing `time`, so tests can drive
them with a fake clock. The real clock lives here, at the edge.
"""

from __future__ import annotations

import time
from typing import Protocol


class Clock(Protocol):
    def monotonic_ns(self) -> int: ...

    def realtime_ns(self) -> int: ...


class SystemClock:
    """The operating system's clocks (the C functions themselves: the I/O path reads the
    clock twice per request and node, and a Python-level wrapper would double the cost)."""

    monotonic_ns = staticmethod(time.monotonic_ns)
    realtime_ns = staticmethod(time.time_ns)


class FakeClock:
    """A clock tests advance by hand."""

    def __init__(self, start_ns: int = 1_700_000_000_000_000_000) -> None:
        self.now_ns = start_ns

    def monotonic_ns(self) -> int:
        return self.now_ns

    def realtime_ns(self) -> int:
        return self.now_ns

    def advance(self, ns: int) -> None:
        self.now_ns += ns
