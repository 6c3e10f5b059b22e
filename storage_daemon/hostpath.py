"""File names from QMP and the command line as the host sees them.

Pure helper (no I/O). JSON lets a client put U+0000 in a string; qsd keeps strings in
modified UTF-8, where it is the two bytes C0 80, so a NUL never ends a name early: qsd opens,
creates or binds a name holding those bytes. Python's os calls refuse a NUL outright
(ValueError); the same name, written with the two surrogate escapes that the file system
encoding turns into C0 80, reaches the host exactly as qsd's does. Only for system calls:
messages keep the name the client sent.
"""

from __future__ import annotations

_NUL_AS_QSD = "\udcc0\udc80"  # bytes C0 80 under the file system encoding's surrogateescape


def host_path(name: str) -> str:
    """`name` as the file system argument qsd would pass for it."""
    return name.replace("\0", _NUL_AS_QSD) if "\0" in name else name
