"""The event bus: QMP events from the domain to every listening monitor (domain ring).

Emitters call `emit(name, data)`; the bus stamps the time from the injected clock and hands
the event to each subscriber (a monitor writes it to its client if negotiation is complete).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from storage_daemon.clock import Clock

Listener = Callable[[str, dict[str, Any] | None, int], None]


class EventBus:
    def __init__(self, clock: Clock) -> None:
        self._clock = clock
        self._listeners: list[Listener] = []

    def subscribe(self, listener: Listener) -> None:
        self._listeners.append(listener)

    def unsubscribe(self, listener: Listener) -> None:
        if listener in self._listeners:
            self._listeners.remove(listener)

    def emit(self, name: str, data: dict[str, Any] | None = None) -> None:
        timestamp_ns = self._clock.realtime_ns()
        for listener in list(self._listeners):
            listener(name, data, timestamp_ns)
