"""The opt-in loop stall reporter (storage_daemon/loop_diagnostics.py), driven by a fake clock."""

from __future__ import annotations

import asyncio
import gc
import io
import re
import threading

import pytest

from storage_daemon.loop_diagnostics import (
    ENV_VAR,
    HEARTBEAT_S,
    LoopWatch,
    describe_stack,
    install_from_env,
    run_delay,
    thread_state,
    threshold_from_env,
)


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


@pytest.mark.parametrize(
    ("value", "expected"),
    [(None, None), ("", None), ("abc", None), ("0", None), ("-3", None), ("5", 0.005),
     (" 2.5 ", 0.0025)],
)  # fmt: skip
def test_threshold_from_env(value: str | None, expected: float | None) -> None:
    env = {} if value is None else {ENV_VAR: value}
    assert threshold_from_env(env) == expected


def _watch(clock: Clock, threshold: float = 0.005) -> tuple[LoopWatch, io.StringIO]:
    out = io.StringIO()
    loop = asyncio.new_event_loop()
    loop.close()  # check() never touches the loop; only start() schedules on it
    return LoopWatch(loop, threshold, out=out, clock=clock), out


def test_stall_reported_once_with_length_and_the_loop_stack() -> None:
    clock = Clock()
    watch, out = _watch(clock)
    watch.heartbeat()
    clock.now += HEARTBEAT_S / 2
    watch.check()  # on time: nothing sampled
    clock.now += 0.010
    for _ in range(2):  # late: the loop thread (this one) is sampled, twice at one place
        watch.check()
    assert out.getvalue() == ""
    clock.now += 0.002
    watch.heartbeat()  # the loop is back, 12.5 ms after the beat was due
    watch.check()
    line = out.getvalue()
    assert re.match(r"loop-watch: stall 11\.5 ms, no gc, waited for a CPU \d+\.\d ms: 2x ", line)
    assert "(check)" in line and "test_loop_diagnostics.py" in line
    assert line.count("\n") == 1
    watch.check()
    assert out.getvalue() == line  # reported once


def test_short_stall_not_reported() -> None:
    clock = Clock()
    watch, out = _watch(clock, threshold=0.020)
    watch.heartbeat()
    clock.now += 0.012  # late by more than half the threshold: sampled
    watch.check()
    clock.now += 0.001
    watch.heartbeat()
    watch.check()
    assert out.getvalue() == ""


def test_gc_inside_the_stall_is_reported() -> None:
    clock = Clock()
    watch, out = _watch(clock)
    watch.heartbeat()
    clock.now += 0.003
    watch._on_gc("start", {"generation": 2})
    clock.now += 0.004
    watch._on_gc("stop", {"generation": 2})
    clock.now += 0.001
    watch.check()
    clock.now += 0.001
    watch.heartbeat()
    watch.check()
    assert out.getvalue().startswith("loop-watch: stall 8.0 ms, gc 4.0 ms gens [2], waited for")


def test_thread_state_and_run_delay_of_this_thread() -> None:
    assert re.fullmatch(r"\[R \S+\] ", thread_state(threading.get_native_id()))
    assert (run_delay(threading.get_native_id()) or 0) >= 0
    assert thread_state(-1) == "" and run_delay(-1) is None


def test_main_checks_the_same_variable() -> None:
    from storage_daemon.__main__ import LOOP_WATCH_ENV

    assert LOOP_WATCH_ENV == ENV_VAR


def test_describe_stack_without_frame() -> None:
    assert describe_stack(None) == "<no Python frame>"


async def test_install_from_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(ENV_VAR, raising=False)
    assert install_from_env(asyncio.get_running_loop()) is None
    monkeypatch.setenv(ENV_VAR, "50")
    watch = install_from_env(asyncio.get_running_loop())
    assert watch is not None
    try:
        assert watch._on_gc in gc.callbacks
        assert watch._thread.is_alive()
    finally:
        watch.stop()
    assert watch._on_gc not in gc.callbacks
    assert not watch._thread.is_alive()
