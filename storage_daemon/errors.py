"""User-visible errors, shared by every ring.

A `QmpError` carries qsd's error class and exact description text; the QMP dispatcher turns it
into an error reply, the CLI into `PROGRAM: --option ARG: MESSAGE`. Nothing else crosses a
ring boundary as a user error: drivers raise `OSError`, which the edges map in one place each.
"""

from __future__ import annotations


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
