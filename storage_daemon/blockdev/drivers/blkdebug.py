"""The `blkdebug` filter: injects errors by event, sector and request type (domain ring).

Rules follow QEMU's: an event (here raised by the filter itself for each request: read_aio,
write_aio, pwritev_zero, flush_to_disk) fires the set-state rules matching the current state and
arms the inject-error rules; a request then fails with an armed rule's errno if its type and
sector match. Invariant: a `once` rule fails exactly one request, then is gone.
"""

from __future__ import annotations

import errno
import os
from dataclasses import dataclass
from typing import Any

from storage_daemon.blockdev import io
from storage_daemon.blockdev.driver import BlockStatus, ChildOpener
from storage_daemon.blockdev.drivers.throttle import FilterDriver
from storage_daemon.blockdev.perm import Perm
from storage_daemon.errors import QmpError
from storage_daemon.qapi.runtime import to_wire

SECTOR = 512
_DEFAULT_IOTYPES = frozenset({"read", "write"})
_PERMS = {
    "consistent-read": Perm.CONSISTENT_READ,
    "write": Perm.WRITE,
    "write-unchanged": Perm.WRITE_UNCHANGED,
    "resize": Perm.RESIZE,
}


@dataclass(eq=False)
class InjectRule:
    event: str
    state: int  # 0: any
    iotypes: frozenset[str]
    error: int
    offset: int  # -1: any
    once: bool
    immediately: bool


@dataclass(eq=False)
class SetStateRule:
    event: str
    state: int
    new_state: int


class BlkdebugDriver(FilterDriver):
    name = "blkdebug"
    child_name = "image"

    def __init__(self, node: Any) -> None:
        super().__init__(node)
        self.state = 1
        self.inject: list[InjectRule] = []
        self.set_state: list[SetStateRule] = []
        self.active: list[InjectRule] = []
        self.take = Perm(0)
        self.unshare = Perm(0)
        self._strong: dict[str, Any] = {}

    async def open(self, options: Any, opener: ChildOpener) -> None:
        if options.config is not None:
            raise QmpError("blkdebug config files are not supported: use inject-error/set-state")
        for rule in options.inject_error or []:
            self.inject.append(
                InjectRule(
                    event=str(to_wire(rule.event)),
                    state=int(rule.state or 0),
                    iotypes=(
                        frozenset({str(to_wire(rule.iotype))})
                        if rule.iotype is not None
                        else _DEFAULT_IOTYPES
                    ),
                    error=errno.EIO if rule.errno is None else int(rule.errno),
                    offset=-1 if rule.sector is None else int(rule.sector) * SECTOR,
                    once=bool(rule.once),
                    immediately=bool(rule.immediately),
                )
            )
        for rule in options.set_state or []:
            self.set_state.append(
                SetStateRule(str(to_wire(rule.event)), int(rule.state or 0), int(rule.new_state))
            )
        for perm in options.take_child_perms or []:
            self.take |= _PERMS[str(to_wire(perm))]
        for perm in options.unshare_child_perms or []:
            self.unshare |= _PERMS[str(to_wire(perm))]
        align = options.align
        if align is not None and (align <= 0 or align & (align - 1)):
            raise QmpError(f"Cannot meet constraints with align {align}")
        wire = to_wire(options)
        # The json: filename lists the rules flattened, as qsd does.
        for key in (
            "config",
            "align",
            "max-transfer",
            "opt-write-zero",
            "max-write-zero",
            "opt-discard",
            "max-discard",
        ):
            if key in wire:
                self._strong[key] = wire[key]
        flat: list[tuple[str, Any]] = []
        for key in ("inject-error", "set-state"):
            for index, rule in enumerate(wire.get(key, [])):
                for member, value in rule.items():
                    flat.append((f"{key}.{index}.{member}", value))
        # Inserted last-first, the hash order of json: names then matches qsd's (observed).
        self._strong.update(reversed(flat))
        await self.open_filtered(options.image, opener)
        if align is not None:
            self.request_alignment = max(self.request_alignment, align)
        if options.max_transfer:
            self.max_transfer = int(options.max_transfer)

    def child_perm(self, child: Any, perm: Perm, shared: Perm) -> tuple[Perm, Perm]:
        return perm | self.take, shared & ~self.unshare

    def strong_options(self) -> dict[str, Any]:
        return dict(self._strong)

    def exact_filename(self) -> str | None:
        inner = self.child().node.filename()
        return None if inner.startswith("json:") else "blkdebug::" + inner

    # --- events and rules -------------------------------------------------------------

    def debug_event(self, event: str) -> InjectRule | None:
        """Fire `event`: state changes, then arm inject rules; an `immediately` rule returns."""
        new_state = self.state
        fired: InjectRule | None = None
        for rule in self.set_state:
            if rule.event == event and rule.state in (0, self.state):
                new_state = rule.new_state
        for inject in self.inject:
            if inject.event == event and inject.state in (0, self.state):
                if inject.immediately:
                    fired = fired or inject
                elif inject not in self.active:
                    self.active.append(inject)
        self.state = new_state
        return fired

    def _check(self, event: str, iotype: str, offset: int, length: int) -> None:
        rule = self.debug_event(event) if event else None
        if rule is None or iotype not in rule.iotypes:
            rule = None
            for candidate in self.active:
                if iotype not in candidate.iotypes:
                    continue
                if candidate.offset == -1 or offset <= candidate.offset < offset + max(length, 1):
                    rule = candidate
                    break
        if rule is None:
            return
        if rule.once:
            if rule in self.active:
                self.active.remove(rule)
            self.inject.remove(rule)
        raise OSError(rule.error, os.strerror(rule.error))

    async def preadv(self, offset: int, length: int) -> bytes | bytearray | memoryview:
        self._check("read_aio", "read", offset, length)
        return await io.pread(self.child(), offset, length)

    async def pwritev(self, offset: int, data: bytes | memoryview, fua: bool) -> None:
        self._check("write_aio", "write", offset, len(data))
        await io.pwrite(self.child(), offset, data, fua=fua)

    async def pwrite_zeroes(self, offset: int, length: int, unmap: bool, fua: bool) -> None:
        self._check("pwritev_zero", "write-zeroes", offset, length)
        await super().pwrite_zeroes(offset, length, unmap, fua)

    async def pdiscard(self, offset: int, length: int) -> None:
        self._check("", "discard", offset, length)
        await io.pdiscard(self.child(), offset, length)

    async def flush(self) -> None:
        self._check("flush_to_disk", "flush", 0, 0)

    async def block_status(self, offset: int, length: int) -> BlockStatus:
        self._check("", "block-status", offset, length)
        return await io.block_status(self.child(), offset, length)
