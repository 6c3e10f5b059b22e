"""User-creatable objects (`--object`, object-add): the /objects container (domain ring).

Objects are kept by id in creation order. Types that need behaviour (throttle groups,
secrets) get their own classes as they land; an `iothread` is accepted and recorded: the
daemon runs all I/O on its event loop plus a thread pool, so it has nothing to bind.
"""

from __future__ import annotations

import re
from enum import Enum
from typing import Any

from storage_daemon.errors import QmpError

_ID = re.compile(r"[A-Za-z][A-Za-z0-9_.-]*\Z")
ID_HINT = "Identifiers consist of letters, digits, '-', '.', '_', starting with a letter."


def check_id(value: str) -> None:
    """qsd's check on object and chardev ids."""
    if not _ID.match(value):
        raise QmpError("Parameter 'id' expects an identifier", hint=ID_HINT)


# qom-type -> the schema struct holding its properties (for `--object TYPE,help`).
PROPERTY_TYPES = {"iothread": "IothreadProperties"}


class ObjectRegistry:
    def user_creatable_types(self) -> list[str]:
        return sorted(PROPERTY_TYPES)

    def properties_type(self, qom_type: str) -> str:
        if qom_type not in PROPERTY_TYPES:
            raise QmpError(f"Parameter 'qom-type' does not accept value '{qom_type}'")
        return PROPERTY_TYPES[qom_type]

    def __init__(self) -> None:
        self.objects: dict[str, Any] = {}
        self.in_use: dict[str, int] = {}

    def add(self, options: Any) -> None:
        check_id(options.id)
        if options.id in self.objects:
            raise QmpError(
                f"attempt to add duplicate property '{options.id}' to object (type 'container')"
            )
        if str(getattr(options.qom_type, "value", options.qom_type)) == "iothread":
            _check_iothread(options)
        self.objects[options.id] = options

    def delete(self, object_id: str) -> None:
        if object_id not in self.objects:
            raise QmpError(f"object '{object_id}' not found")
        if self.in_use.get(object_id):
            raise QmpError(f"object '{object_id}' is in use, can not be deleted")
        del self.objects[object_id]

    def type_of(self, object_id: str) -> str | None:
        options = self.objects.get(object_id)
        if options is None:
            return None
        qom_type = options.qom_type
        return str(qom_type.value if isinstance(qom_type, Enum) else qom_type)


_INT64_MAX = (1 << 63) - 1


def _check_iothread(options: Any) -> None:
    for name in ("poll_max_ns", "poll_grow", "poll_shrink", "aio_max_batch"):
        value = getattr(options, name, None)
        if value is not None and not 0 <= value <= _INT64_MAX:
            wire_name = name.replace("_", "-")
            raise QmpError(f"{wire_name} value must be in range [0, {_INT64_MAX}]")
