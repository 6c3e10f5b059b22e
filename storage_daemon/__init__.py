"""A wire-compatible re-implementation of qemu-storage-daemon (qsd) 7.2 in Python.

The package is layered in three rings (see the architecture notes): pure cores that never touch
the operating system, an async domain runtime, and the edges (CLI, sockets, syscalls).
"""

__version__ = "0.1.0"
