"""User-visible errors, shared by every ring.

A `QmpError` carries qsd's error class and exact description text; the QMP dispatcher turns it
into an error reply, the CLI into `PROGRAM: --option ARG: MESSAGE`. Nothing else crosses a
ring boundary as a user error: drivers raise `OSError`, which the edges map in one place each.
"""

from __future__ import annotations

import os
import sys
from contextvars import ContextVar

PROG = "storage-daemon"
"""The program name in messages when run as `python -m storage_daemon`."""


def prog_name(argv0: str) -> str:
    """The name messages start with, as qsd prints its argv[0]."""
    base = os.path.basename(argv0)
    return PROG if base in ("__main__.py", "") else base


IN_COMMAND: ContextVar[bool] = ContextVar("in_command", default=False)
"""Set while a monitor command runs (and in the tasks it starts)."""


def report(message: str) -> None:
    """qsd's error_report on standard error: `PROG: message`, but the bare message while a
    monitor command runs (qsd prints its name only when no monitor is current)."""
    if IN_COMMAND.get():
        sys.stderr.write(f"{message}\n")
    else:
        sys.stderr.write(f"{prog_name(sys.argv[0])}: {message}\n")


class QmpError(Exception):
    """A failure reported to a QMP client (or the command line) in qsd's words."""

    def __init__(
        self, desc: str, error_class: str = "GenericError", hint: str | None = None
    ) -> None:
        super().__init__(desc)
        self.desc = desc
        self.error_class = error_class
        # QEMU prints hints after the message on the command line, never over QMP.
        self.hint = hint

    def __repr__(self) -> str:
        return f"QmpError({self.desc!r}, {self.error_class!r})"


class CommandNotFound(QmpError):
    """qsd's `CommandNotFound` class: unknown command or negotiation-state refusals."""

    def __init__(self, desc: str) -> None:
        super().__init__(desc, "CommandNotFound")


class DeviceNotActive(QmpError):
    """qsd's `DeviceNotActive` class (block-job-* on an unknown job)."""

    def __init__(self, desc: str) -> None:
        super().__init__(desc, "DeviceNotActive")


def strerror(err: OSError) -> str:
    """The libc text QEMU prints for an errno ("No such file or directory")."""
    import os

    if err.errno is None:
        return str(err)
    return os.strerror(err.errno)
