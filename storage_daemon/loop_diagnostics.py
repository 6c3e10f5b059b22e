"""Opt-in event loop stall reporter: STORAGE_DAEMON_LOOP_WATCH_MS=N logs every stall >= N ms.

Edge ring (threads, clocks, stderr). A heartbeat on the loop stamps the time every
millisecond; a watchdog thread samples the loop thread's Python stack while the stamp is
stale and, once the loop is back, writes one line per stall (its length, the GC time inside
it, the distinct stacks seen) to stderr. Invariant: off by default, and when off nothing is
installed (no thread, no callback, no gc hook).
"""

from __future__ import annotations

import asyncio
import os
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from types import FrameType
from typing import Any, TextIO

ENV_VAR = "STORAGE_DAEMON_LOOP_WATCH_MS"
HEARTBEAT_S = 0.001
STACK_DEPTH = 6


def threshold_from_env(environ: dict[str, str] | os._Environ[str]) -> float | None:
    """The stall threshold in seconds, or None when the variable is unset, empty or invalid."""
    raw = environ.get(ENV_VAR, "").strip()
    if not raw:
        return None
    try:
        ms = float(raw)
    except ValueError:
        return None
    return ms / 1000 if ms > 0 else None


def describe_stack(frame: FrameType | None, depth: int = STACK_DEPTH) -> str:
    """`file:line(func)` of the innermost `depth` frames, innermost first, ` < `-joined."""
    if frame is None:  # the thread runs no Python code (in the loop's C code or a syscall)
        return "<no Python frame>"
    import traceback  # only when diagnosing: a serving daemon never needs it

    parts: list[str] = []
    for summary in reversed(traceback.extract_stack(frame, limit=depth)):
        parts.append(f"{os.path.basename(summary.filename)}:{summary.lineno}({summary.name})")
    return " < ".join(parts)


def thread_state(native_id: int) -> str:
    """`[STATE wchan] `: R = running or waiting for a CPU; S with a futex wchan = most
    likely waiting for the GIL. Empty when /proc cannot tell (not Linux)."""
    base = f"/proc/self/task/{native_id}"
    try:
        with open(f"{base}/stat") as f:
            state = f.read().rsplit(")", 1)[1].split()[0]
        with open(f"{base}/wchan") as f:
            wchan = f.read().strip() or "-"
    except (OSError, IndexError):
        return ""
    return f"[{state} {wchan}] "


def run_delay(native_id: int) -> int | None:
    """Nanoseconds the thread has spent runnable but waiting for a CPU (schedstat), if known."""
    try:
        with open(f"/proc/self/task/{native_id}/schedstat") as f:
            return int(f.read().split()[1])
    except (OSError, IndexError, ValueError):
        return None


@dataclass
class Stall:
    """One stall being observed: when the loop went quiet, and what the watchdog saw."""

    since: float
    run_delay_ns: int | None = None
    stacks: dict[str, int] = field(default_factory=dict)

    def format(
        self, now: float, gc_seconds: float, gc_gens: list[int], run_delay_ns: int | None = None
    ) -> str:
        seen = "; ".join(f"{n}x {s}" for s, n in self.stacks.items()) or "no sample"
        gc_part = f"gc {gc_seconds * 1000:.1f} ms gens {gc_gens}" if gc_gens else "no gc"
        if run_delay_ns is not None and self.run_delay_ns is not None:
            gc_part += f", waited for a CPU {(run_delay_ns - self.run_delay_ns) / 1e6:.1f} ms"
        return f"loop-watch: stall {(now - self.since) * 1000:.1f} ms, {gc_part}: {seen}\n"


class LoopWatch:
    """The heartbeat (on the loop) and the watchdog thread that reads it."""

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        threshold: float,
        out: TextIO = sys.stderr,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._loop = loop
        self._threshold = threshold
        self._out = out
        self._clock = clock
        self._beat = clock()
        self._loop_thread = threading.get_ident()
        self._loop_native = threading.get_native_id()
        self._stop = threading.Event()
        self._timer: asyncio.TimerHandle | None = None
        self._gc_started: float | None = None
        self._gc_log: list[tuple[float, float, int]] = []  # (end, duration, generation)
        self._stall: Stall | None = None
        self._thread = threading.Thread(target=self._watch, name="loop-watch", daemon=True)

    def start(self) -> None:
        import gc

        gc.callbacks.append(self._on_gc)
        self._tick()
        self._thread.start()

    def stop(self) -> None:
        import gc

        if self._on_gc in gc.callbacks:
            gc.callbacks.remove(self._on_gc)
        if self._timer is not None:
            self._timer.cancel()
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()

    def heartbeat(self) -> None:
        """Stamp the time: the loop is running callbacks."""
        self._beat = self._clock()

    def _tick(self) -> None:
        self.heartbeat()
        self._timer = self._loop.call_later(HEARTBEAT_S, self._tick)

    def _on_gc(self, phase: str, info: dict[str, Any]) -> None:
        now = self._clock()
        if phase == "start":
            self._gc_started = now
        elif self._gc_started is not None:
            self._gc_log.append((now, now - self._gc_started, int(info["generation"])))
            del self._gc_log[:-64]
            self._gc_started = None

    def _watch(self) -> None:
        while not self._stop.wait(HEARTBEAT_S):
            self.check()

    def check(self) -> None:
        """One watchdog step: sample the loop's stack while it is late, report once it is back."""
        now = self._clock()
        beat = self._beat
        stall = self._stall
        if stall is not None and beat >= stall.since:
            self._stall = None
            self._report(stall, beat)
            return
        # The heartbeat is due every HEARTBEAT_S: lateness beyond that is the loop's stall.
        if now - beat - HEARTBEAT_S < self._threshold / 2:
            return
        if stall is None:
            stall = self._stall = Stall(beat + HEARTBEAT_S, run_delay(self._loop_native))
        key = thread_state(self._loop_native) + describe_stack(
            sys._current_frames().get(self._loop_thread)
        )
        stall.stacks[key] = stall.stacks.get(key, 0) + 1

    def _report(self, stall: Stall, end: float) -> None:
        if end - stall.since < self._threshold:
            return
        inside = [(d, g) for e, d, g in self._gc_log if stall.since <= e <= end]
        gc_seconds, gens = sum(d for d, _ in inside), [g for _, g in inside]
        self._out.write(stall.format(end, gc_seconds, gens, run_delay(self._loop_native)))
        self._out.flush()


def install_from_env(loop: asyncio.AbstractEventLoop) -> LoopWatch | None:
    """Start a LoopWatch when STORAGE_DAEMON_LOOP_WATCH_MS asks for one."""
    threshold = threshold_from_env(os.environ)
    if threshold is None:
        return None
    watch = LoopWatch(loop, threshold)
    watch.start()
    return watch
