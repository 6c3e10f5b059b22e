"""`python -m storage_daemon` and the `storage-daemon` console script: qsd's command line.

Edge ring. The pre-pass (help, version, pidfile, daemonize) runs before the event loop
starts; then options are applied left to right, the pidfile is written once all succeeded,
and the daemon serves until quit or a signal. Startup failures leave no socket or pidfile.
Start-up speed: the cyclic collector is off until ready (start-up frees almost nothing);
start-up imports only the command modules the command line uses; the others and the block
drivers are imported in a worker thread before ready, so none is imported on the event loop.
"""

from __future__ import annotations

import gc
import os
import sys
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

from storage_daemon.errors import PROG, prog_name

if TYPE_CHECKING:
    import asyncio

    from storage_daemon.cli import CliOption
    from storage_daemon.loop_diagnostics import LoopWatch
    from storage_daemon.pidfile import PidFile

LOOP_WATCH_ENV = "STORAGE_DAEMON_LOOP_WATCH_MS"  # loop_diagnostics.ENV_VAR


def _loop_factory() -> Callable[[], asyncio.AbstractEventLoop]:
    """uvloop when it is installed (the default), plain asyncio otherwise."""
    import asyncio

    if os.environ.get("STORAGE_DAEMON_LOOP", "uvloop") == "uvloop":
        try:
            import uvloop

            return uvloop.new_event_loop
        except ImportError:
            pass
    return asyncio.new_event_loop


async def serve(
    options: Sequence[CliOption], prog: str, pidfile: PidFile | None, ready: Callable[[], None]
) -> int:
    """Apply the options, then serve until asked to exit. Returns the exit status."""
    from storage_daemon.daemon import Daemon
    from storage_daemon.startup import OptionFailed, apply_option

    daemon = Daemon()
    daemon.begin_startup()
    daemon.install_signal_handlers()
    try:
        for option in options:
            await apply_option(daemon, option, prog)
    except OptionFailed as failure:
        stream = sys.stdout if failure.stdout else sys.stderr
        stream.write(failure.text if failure.stdout else failure.text + "\n")
        stream.flush()
        await daemon.shutdown()
        return failure.status
    daemon.end_startup()
    await _preload()
    if pidfile is not None:
        pidfile.write(os.getpid())
    ready()
    watch = _loop_watch()
    await daemon.wait_exit()
    if watch is not None:
        watch.stop()
    await daemon.shutdown()
    return 0


def _loop_watch() -> LoopWatch | None:
    """The opt-in stall reporter (bench/README.md, job_bench); None unless asked for. Its
    module is imported only then."""
    if not os.environ.get(LOOP_WATCH_ENV):
        return None
    import asyncio

    from storage_daemon.loop_diagnostics import install_from_env

    return install_from_env(asyncio.get_running_loop())


def _load_everything() -> None:
    from storage_daemon.blockdev.drivers import DRIVERS
    from storage_daemon.monitor.dispatch import IMPORT_LOCK, load_handlers

    load_handlers()  # first: a client may already be waiting for a command's module
    for name in DRIVERS:
        with IMPORT_LOCK:  # one at a time, as load_handlers() imports (see there)
            DRIVERS[name]


async def _preload() -> None:
    """Import every command module and block driver in a worker thread before reporting ready.

    Start-up imports only what the command line used; commands a client sends meanwhile
    import their own module (in a thread too). An import on the loop would stall it later
    (the qcow2 package alone takes tens of ms), and any command may need a driver."""
    import asyncio

    await asyncio.to_thread(_load_everything)
    # Everything built so far lives as long as the daemon: keep it out of the collector's
    # full passes, which would otherwise stall the event loop now and then. No collection
    # first: it would hold the loop for ~10 ms to free a hundred-odd objects.
    gc.freeze()
    gc.enable()


def _daemonize() -> Callable[[int], None]:
    """Fork; the parent exits with the child's startup status. Returns the child's notifier."""
    read_fd, write_fd = os.pipe()
    child = os.fork()
    if child:
        os.close(write_fd)
        status = os.read(read_fd, 1)
        os._exit(status[0] if status else 1)
    os.close(read_fd)
    os.setsid()

    def notify(status: int) -> None:
        try:
            os.write(write_fd, bytes([status]))
            os.close(write_fd)
        except OSError:
            pass
        if status == 0:
            # Detach from the caller's terminal or pipes, as qsd does once it is ready.
            null = os.open(os.devnull, os.O_RDWR)
            for fd in (0, 1, 2):
                os.dup2(null, fd)
            os.close(null)

    return notify


def run(argv: Sequence[str], argv0: str) -> int:
    import asyncio

    from storage_daemon.cli import (
        CliError,
        help_text,
        main_pass,
        parse_argv,
        pre_pass,
        version_text,
    )
    from storage_daemon.errors import QmpError
    from storage_daemon.pidfile import PidFile

    prog = prog_name(argv0)
    try:
        # glibc's getopt names the program by argv[0] exactly as given.
        options = parse_argv(argv, argv0 if prog != PROG else PROG)
    except CliError as err:
        sys.stderr.write(err.line + "\n")
        return err.status
    first = pre_pass(options)
    if first.action == "--help":
        sys.stdout.write(help_text(prog))
        return 0
    if first.action == "--version":
        sys.stdout.write(version_text(prog))
        return 0
    pidfile = PidFile(first.pidfile) if first.pidfile else None
    if pidfile is not None:
        try:
            pidfile.lock()  # before anything exists: a second daemon leaves nothing behind
        except QmpError as err:
            sys.stderr.write(f"{prog}: {err.desc}\n")
            return 1
    notify: Callable[[int], None] = lambda status: None  # noqa: E731
    if first.daemonize:
        notify = _daemonize()
    status = 1
    try:
        with asyncio.Runner(loop_factory=_loop_factory()) as runner:
            status = runner.run(serve(main_pass(options), prog, pidfile, lambda: notify(0)))
    finally:
        notify(status)
        if pidfile is not None:
            pidfile.remove()
    return status


def main() -> None:
    # Start-up allocates a lot and frees almost nothing: the collector's passes would only
    # cost time. It is enabled again once the daemon is ready (`_preload`).
    gc.disable()
    sys.exit(run(sys.argv[1:], sys.argv[0]))


if __name__ == "__main__":
    main()
