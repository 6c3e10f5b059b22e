"""Suite-wide fixtures: the slow-callback detector, the leftover-process check, scratch dirs.

Every asyncio test runs its loop in debug mode with `slow_callback_duration` at 50 ms; asyncio
then logs each callback that held the loop longer. The autouse fixture below collects those
records and fails the test that caused them, so blocking the event loop is a test failure.
Another autouse fixture fails a test that leaves a child process (a daemon, a client) running.
Subprocesses import this checkout's package, whichever checkout the venv was installed from.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import os
import shutil
import signal
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from hypothesis import HealthCheck, settings

# Wall-clock deadlines make property tests flaky on a loaded 2-core machine; speed is measured
# in bench/, never in tests.
settings.register_profile("suite", deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.load_profile("suite")

# Daemons started as `python -m storage_daemon` from a scratch directory would import the
# package the venv was installed from (an editable install of another checkout); put this
# checkout first so that every subprocess runs the code under test.
_CHECKOUT = str(Path(__file__).resolve().parents[1])
os.environ["PYTHONPATH"] = os.pathsep.join(
    [_CHECKOUT, *filter(None, os.environ.get("PYTHONPATH", "").split(os.pathsep))]
)

SLOW_CALLBACK_SECONDS = 0.05


class _SlowCallbackCollector(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.records: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        message = record.getMessage()
        if "took" in message and "seconds" in message:
            self.records.append(message)


def _debug_loop() -> asyncio.AbstractEventLoop:
    loop = asyncio.new_event_loop()
    loop.set_debug(True)
    loop.slow_callback_duration = SLOW_CALLBACK_SECONDS
    return loop


def pytest_asyncio_loop_factories(
    config: pytest.Config, item: pytest.Item
) -> dict[str, Callable[[], asyncio.AbstractEventLoop]]:
    """Every asyncio test runs on a debug loop that reports slow callbacks."""
    return {"debugloop": _debug_loop}


@pytest.fixture(autouse=True)
def no_slow_callbacks() -> Iterator[None]:
    # What earlier tests left alive leaves the collector's view, as the daemon's start-up
    # objects do (gc.freeze after start-up): a full collection over it took 20-60 ms in the
    # middle of some later test's callback (measured over tests/component), which the limit
    # below then blamed on that test. Only cycles left by earlier tests stay uncollected.
    gc.freeze()
    collector = _SlowCallbackCollector()
    logger = logging.getLogger("asyncio")
    logger.addHandler(collector)
    try:
        yield
    finally:
        logger.removeHandler(collector)
    if collector.records:
        pytest.fail("event loop blocked: " + "; ".join(collector.records[:5]))


def _live_children() -> dict[int, str]:
    """This process's children that have not exited yet: pid -> command line."""
    me = os.getpid()
    found: dict[int, str] = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            with open(f"/proc/{entry.name}/stat", "rb") as f:
                stat = f.read()
        except OSError:
            continue  # exited meanwhile
        fields = stat[stat.rindex(b")") + 2 :].split()
        if int(fields[1]) == me and fields[0] != b"Z":
            try:
                with open(f"/proc/{entry.name}/cmdline", "rb") as f:
                    found[int(entry.name)] = f.read().replace(b"\0", b" ").decode(errors="replace")
            except OSError:
                continue
    return found


def _fail_on_new_children(before: set[int]) -> None:
    """Fails if processes not in `before` still run after a grace time; kills them by PID."""
    deadline = time.monotonic() + 3.0  # a client may still be on its way out
    while (left := {p: c for p, c in _live_children().items() if p not in before}) and (
        time.monotonic() < deadline
    ):
        time.sleep(0.05)
    if left:
        for pid in left:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        pytest.fail("test left processes running: " + "; ".join(left.values()))


@pytest.fixture(autouse=True)
def no_leftover_processes() -> Iterator[None]:
    """Fails a test that leaves a process it started running."""
    before = set(_live_children())
    yield
    _fail_on_new_children(before)


@pytest.fixture(scope="session", autouse=True)
def no_leftover_processes_at_exit() -> Iterator[None]:
    """The same for module- and session-scoped fixtures, checked once they are torn down."""
    yield
    _fail_on_new_children(set())


@pytest.fixture(scope="session", autouse=True)
def built_models() -> None:
    """Build the lazily created schema classes once, before any test's event loop runs.

    The daemon builds a plain class on first use (start-up stays fast), and tests also use
    the pydantic models; inside a test that one-off cost would count against the
    slow-callback limit of whichever test came first.
    """
    import gc

    from storage_daemon.qapi_generated import models, plain

    plain.build_all()
    models.build_all()
    # Like the daemon after start-up: long-lived objects leave the collector's view, so a
    # full collection in the middle of a test does not stall its event loop.
    gc.collect()
    gc.freeze()


@pytest.fixture
def scratch(tmp_path: Path) -> Path:
    """A scratch directory short enough for unix socket paths (108-byte limit)."""
    return tmp_path


@pytest.fixture
def shm_dir() -> Iterator[Path]:
    """A fresh directory on /dev/shm (skips where /dev/shm is missing or not tmpfs): the
    file driver's tmpfs paths (live reads, inline requests) only run there."""
    from storage_daemon.blockdev.drivers.file import syscalls

    shm = Path("/dev/shm")
    if not shm.is_dir():
        pytest.skip("no /dev/shm")
    fd = os.open(shm, os.O_RDONLY)
    try:
        if syscalls.filesystem_type(fd) != syscalls.TMPFS_MAGIC:
            pytest.skip("/dev/shm is not tmpfs")
    finally:
        os.close(fd)
    made = shm / f"sd-test-{os.getpid()}-{id(object())}"
    made.mkdir()
    try:
        yield made
    finally:
        shutil.rmtree(made)
