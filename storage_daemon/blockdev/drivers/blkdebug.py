"""The `blkdebug` filter: injects errors by event, sector and request type (domain ring).

Rules behave as qsd 7.2's (see "theory of operation" below). Invariant: rules are armed only
by an event, and disarmed only by the next event that arms rules (or by `once`).
"""

from __future__ import annotations

import errno
import os
from dataclasses import dataclass
from typing import Any

from storage_daemon.blockdev import io
from storage_daemon.blockdev.child import BdrvChild
from storage_daemon.blockdev.driver import BlockStatus, ChildOpener
from storage_daemon.blockdev.drivers.throttle import FilterDriver
from storage_daemon.blockdev.perm import Perm
from storage_daemon.errors import QmpError
from storage_daemon.qapi.runtime import to_wire

# Theory of operation. Events reach a node as in QEMU: a parent driver raises them on its
# child (`debug_event`: raw's read_aio/write_aio, qcow2's l2_load, cluster_alloc...) and the
# generic write path raises pwritev, pwritev_zero and pwritev_done on the node itself. An
# event first applies the set-state rules for the current state (the first declared one
# wins), then, if any inject rule of that event matches the state, replaces the armed rules
# with those. A request fails with the errno of the first armed rule (declared order) whose
# type and sector match. Requests made right on the node (exports, jobs) raise no event but
# the write path's. Parent drivers that raise their events (qcow2: `raises_debug_events`) do
# so through `debug_event`; below parent nodes that raise none, a blkdebug node raises for
# their requests those a `raw` parent would (qsd with raw above blkdebug), flush events
# included, which QEMU's generic flush path raises on the primary child of a flushed node.

SECTOR = 512
_DEFAULT_IOTYPES = frozenset({"read", "write"})
_PERMS = {
    "consistent-read": Perm.CONSISTENT_READ,
    "write": Perm.WRITE,
    "write-unchanged": Perm.WRITE_UNCHANGED,
    "resize": Perm.RESIZE,
}


def debug_event(edge: BdrvChild | None, event: str) -> None:
    """QEMU's BLKDBG_EVENT(child, event): tell the node below `edge` that `event` happened.

    Only blkdebug nodes listen. A parent driver that raises events declares the class
    attribute `raises_debug_events = True`, so that blkdebug stops raising them itself.
    """
    if edge is not None:
        listener = getattr(edge.node.driver, "debug_event", None)
        if listener is not None:
            listener(event)


@dataclass(eq=False)
class InjectRule:
    event: str
    state: int  # 0: any
    iotypes: frozenset[str]
    error: int  # 0: the request succeeds (and no later rule is tried)
    offset: int  # -1: any
    once: bool
    immediately: bool  # QEMU: fail without yielding first; nothing a client can see


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

    async def actual_size(self) -> int:
        # QEMU opens blkdebug as a protocol driver, which cannot say how much it allocates:
        # qsd leaves actual-size out for it and for every node that sums it.
        raise OSError(errno.ENOTSUP, os.strerror(errno.ENOTSUP))

    # --- events and rules -------------------------------------------------------------

    def debug_event(self, event: str) -> None:
        """An event happened: state changes, then arm this event's inject rules."""
        new_state: int | None = None
        for rule in self.set_state:
            if rule.event == event and rule.state in (0, self.state) and new_state is None:
                new_state = rule.new_state
        armed = [
            rule for rule in self.inject if rule.event == event and rule.state in (0, self.state)
        ]
        if armed:
            self.active = armed
        if new_state is not None:
            self.state = new_state

    def _node_parents(self) -> list[Any]:
        return [edge.parent_node for edge in self.node.parents if edge.parent_node is not None]

    def _raises_own_events(self) -> bool:
        """Whether to raise raw's events for our requests: only below parent nodes, none of
        which raises events itself (see the theory of operation)."""
        parents = self._node_parents()
        return bool(parents) and not any(
            getattr(parent.driver, "raises_debug_events", False) for parent in parents
        )

    def _check(self, iotype: str, offset: int, length: int) -> None:
        for rule in self.active:
            if iotype not in rule.iotypes:
                continue
            if rule.offset != -1 and not (length and offset <= rule.offset < offset + length):
                continue
            if not rule.error:
                return
            if rule.once:
                self.active.remove(rule)
                self.inject.remove(rule)
            raise OSError(rule.error, os.strerror(rule.error))

    async def preadv(self, offset: int, length: int) -> bytes | bytearray | memoryview:
        if self._raises_own_events():
            self.debug_event("read_aio")
        self._check("read", offset, length)
        return await io.pread(self.child(), offset, length)

    async def pwritev(self, offset: int, data: bytes | memoryview, fua: bool) -> None:
        if self._raises_own_events():
            self.debug_event("write_aio")
        self.debug_event("pwritev")  # the generic write path's, on this node
        try:
            self._check("write", offset, len(data))
            await io.pwrite(self.child(), offset, data, fua=fua)
        finally:
            self.debug_event("pwritev_done")  # raised after failed writes too

    async def pwrite_zeroes(self, offset: int, length: int, unmap: bool, fua: bool) -> None:
        self.debug_event("pwritev_zero")
        try:
            self._check("write-zeroes", offset, length)
            await super().pwrite_zeroes(offset, length, unmap, fua)
        finally:
            self.debug_event("pwritev_done")

    async def pdiscard(self, offset: int, length: int) -> None:
        self._check("discard", offset, length)
        await io.pdiscard(self.child(), offset, length)

    async def flush(self) -> None:
        # In QEMU the generic flush path raises these on the primary child of the node being
        # flushed (the parent of this one). A parent that raises its own events (qcow2) does
        # so in its flush; below any other parent they are raised here. This runs only when
        # writes reached the node since its last flush, which is also when QEMU raises
        # flush_to_disk (flush_to_os it raises on every flush).
        if self._raises_own_events():
            self.debug_event("flush_to_os")
            self.debug_event("flush_to_disk")
        self._check("flush", 0, 0)

    async def block_status(self, offset: int, length: int) -> BlockStatus:
        self._check("block-status", offset, length)
        return await io.block_status(self.child(), offset, length)
