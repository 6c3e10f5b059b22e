"""The throttle-group object: limits shared by throttle filter nodes, and their wait queues.

Domain ring. The bucket arithmetic is the pure `blockdev.throttle`; this module queues requests
per direction in arrival order and wakes them with loop timers, never blocking the loop. Each
queued request knows its member (the throttle node); a drained member's requests all go at
once (`release_member`), charged to the buckets as qsd charges them. New limits (`qom-set`)
leave an armed timer alone, as qsd does. Invariant: while a direction's queue is non-empty,
exactly one timer is armed for it (or the head is being released), so no request waits
without a wake-up scheduled.
"""

from __future__ import annotations

import asyncio
from collections import deque
from typing import Any

from storage_daemon.blockdev.throttle import (
    LIMIT_KEYS,
    UINT_MAX,
    ThrottleConfig,
    ThrottleState,
    apply_limits,
    check_valid,
)
from storage_daemon.clock import Clock
from storage_daemon.errors import QmpError
from storage_daemon.qapi.runtime import to_wire, visit_input
from storage_daemon.qom.base import UserObject

# (the waiting request, its size, its member: the throttle node that queued it)
_Waiter = tuple["asyncio.Future[None]", int, object]


class ThrottleGroup(UserObject):
    qom_type = "throttle-group"
    properties_struct = "ThrottleGroupProperties"
    writable = frozenset({"limits"})

    def __init__(self, object_id: str, options: Any, clock: Clock) -> None:
        super().__init__(object_id, options)
        self._clock = clock
        self.cfg = ThrottleConfig()
        wire = to_wire(options)
        # QOM sets `limits` first (schema order), then each x- property.
        if "limits" in wire:
            apply_limits(self.cfg, wire["limits"])
        for key in LIMIT_KEYS:
            value = wire.get("x-" + key)
            if value is None:
                continue
            if value < 0:
                raise QmpError("Property values cannot be negative")
            if key.endswith("-max-length") and value > UINT_MAX:
                # sic: qsd's text lacks a space
                raise QmpError(f"x-{key} value must be in therange [0, {UINT_MAX}]")
            self.cfg.set(key, value)
        self.state = ThrottleState(self.cfg, clock.monotonic_ns())
        self._queues: dict[bool, deque[_Waiter]] = {False: deque(), True: deque()}
        self._timers: dict[bool, asyncio.TimerHandle | None] = {False: None, True: None}
        self._deadlines: dict[bool, int | None] = {False: None, True: None}

    def complete(self) -> None:
        check_valid(self.cfg)
        self.state.reconfigure(self.cfg, self._clock.monotonic_ns())

    def close(self) -> None:
        for is_write in (False, True):
            self._disarm(is_write)

    # --- properties -------------------------------------------------------------------

    def read(self, name: str) -> Any:
        if name == "limits":
            return self.cfg.limits()
        return self.cfg.get(name.removeprefix("x-"))

    def set_property(self, name: str, value: Any) -> None:
        if name == "limits":
            typed = visit_input(self.properties_struct, {"limits": value})
            cfg = self.cfg.copy()
            apply_limits(cfg, to_wire(typed)["limits"])
            check_valid(cfg)
            self.reconfigure(cfg)
            return
        super().set_property(name, value)

    def reconfigure(self, cfg: ThrottleConfig) -> None:
        """New limits, applied as qsd applies them: the buckets restart empty, but an armed
        timer keeps its old deadline. Until it fires every request of that direction waits,
        even one arriving after the change under limits that would let it go; the request it
        was armed for then goes whatever the new limits say, and those behind it are timed
        by the new limits."""
        self.cfg = cfg
        self.state.reconfigure(cfg, self._clock.monotonic_ns())

    def deadline_ns(self, is_write: bool) -> int | None:
        """When (on the group's clock) the armed timer of a direction fires; None: none armed."""
        return self._deadlines[is_write]

    # --- the I/O path -----------------------------------------------------------------

    async def intercept(self, is_write: bool, size: int, member: object = None) -> None:
        """Wait until the group's limits allow a request of `size` bytes, and charge it."""
        queue = self._queues[is_write]
        idle = not queue and self._timers[is_write] is None
        if idle and not self.state.wait_ns(is_write, self._clock.monotonic_ns()):
            self.state.account(is_write, size)
            return
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        entry: _Waiter = (waiter, size, member)
        queue.append(entry)
        if self._timers[is_write] is None:
            self._release(is_write)
        try:
            await waiter
        except asyncio.CancelledError:
            if entry in queue:
                queue.remove(entry)
            raise

    def charge(self, is_write: bool, size: int) -> None:
        """A request that bypasses the limits (its member is drained) still fills the
        buckets, as in qsd: the requests after the drain wait for it."""
        self.state.account(is_write, size)

    def release_member(self, member: object) -> int:
        """Let every request `member` queued go now, whatever the limits (qsd's drain of a
        throttle node); each is charged. Returns how many were released."""
        released = 0
        for is_write in (False, True):
            queue = self._queues[is_write]
            kept: deque[_Waiter] = deque()
            for entry in queue:
                waiter, size, owner = entry
                if owner is not member or waiter.done():
                    if not waiter.done():
                        kept.append(entry)
                    continue
                self.state.account(is_write, size)
                waiter.set_result(None)
                released += 1
            queue.clear()
            queue.extend(kept)
            timer = self._timers[is_write]
            if not kept and timer is not None:
                self._disarm(is_write)
        return released

    def _release(self, is_write: bool) -> None:
        """Let queued requests go while the buckets allow; else arm the timer for the head."""
        queue = self._queues[is_write]
        while queue:
            waiter, size, _member = queue[0]
            if waiter.done():
                queue.popleft()
                continue
            now = self._clock.monotonic_ns()
            wait = self.state.wait_ns(is_write, now)
            if wait:
                loop = asyncio.get_running_loop()
                self._timers[is_write] = loop.call_later(wait / 1e9, self._fire, is_write)
                self._deadlines[is_write] = now + wait
                return
            queue.popleft()
            self.state.account(is_write, size)
            waiter.set_result(None)

    def _fire(self, is_write: bool) -> None:
        """The timer's request goes without another look at the limits (qsd's timer callback
        restarts it unconditionally, even if the limits were lowered meanwhile); charged
        before the buckets leak, as qsd charges it. The rest follow under the limits."""
        self._timers[is_write] = None
        self._deadlines[is_write] = None
        queue = self._queues[is_write]
        while queue:
            waiter, size, _member = queue.popleft()
            if not waiter.done():
                self.state.account(is_write, size)
                waiter.set_result(None)
                break
        self._release(is_write)

    def _disarm(self, is_write: bool) -> None:
        timer = self._timers[is_write]
        if timer is not None:
            timer.cancel()
        self._timers[is_write] = None
        self._deadlines[is_write] = None
