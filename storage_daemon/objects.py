"""User-creatable objects (`--object`, object-add): the /objects container (domain ring).

Objects are kept by id in creation order, each an instance of its QOM type's class in
`storage_daemon.qom`. Invariant: an object is registered only after `complete()` succeeded, and
one whose `in_use` count is non-zero cannot be deleted.
"""

from __future__ import annotations

import re
from typing import Any

from storage_daemon.clock import Clock, SystemClock
from storage_daemon.errors import QmpError
from storage_daemon.qom.base import UserObject
from storage_daemon.qom.simple import AuthzList, AuthzSimple, IoThread, Secret
from storage_daemon.qom.throttle_group import ThrottleGroup

_ID = re.compile(r"[A-Za-z][A-Za-z0-9_.-]*\Z")
ID_HINT = "Identifiers consist of letters, digits, '-', '.', '_', starting with a letter."


def check_id(value: str) -> None:
    """qsd's check on object and chardev ids."""
    if not _ID.match(value):
        raise QmpError("Parameter 'id' expects an identifier", hint=ID_HINT)


# qom-type (the schema's ObjectType value) -> the schema struct holding its properties.
PROPERTY_TYPES = {
    "authz-list": "AuthZListProperties",
    "authz-listfile": "AuthZListFileProperties",
    "authz-simple": "AuthZSimpleProperties",
    "iothread": "IothreadProperties",
    "secret": "SecretProperties",
    "throttle-group": "ThrottleGroupProperties",
}


# Schema values qsd 7.2 accepts but has no QOM class for: its file-backed access list is the
# QOM type `authz-list-file`, which no ObjectType value names.
_NO_CLASS = frozenset({"authz-listfile"})


def _wire(value: Any) -> str:
    return str(getattr(value, "value", value))


_ACTIVE: list[ObjectRegistry] = []


def active_registry() -> ObjectRegistry:
    """The registry of the daemon created last: how block drivers (throttle) find objects.

    Drivers receive only their options; until the graph carries a reference to the daemon's
    registry, the newest registry is the one in use (one daemon per process).
    """
    if not _ACTIVE:
        ObjectRegistry()
    return _ACTIVE[-1]


class ObjectRegistry:
    def __init__(self, clock: Clock | None = None) -> None:
        self.clock: Clock = clock or SystemClock()
        self.objects: dict[str, UserObject] = {}
        self.in_use: dict[str, int] = {}
        # qsd creates the /objects container on the first object-add and keeps it.
        self.container_created = False
        _ACTIVE[:] = [self]

    def user_creatable_types(self) -> list[str]:
        return sorted(PROPERTY_TYPES)

    def properties_type(self, qom_type: str) -> str:
        if qom_type not in PROPERTY_TYPES:
            raise QmpError(f"Parameter 'qom-type' does not accept value '{qom_type}'")
        return PROPERTY_TYPES[qom_type]

    def _create(self, options: Any) -> UserObject:
        qom_type = _wire(options.qom_type)
        if qom_type == "throttle-group":
            return ThrottleGroup(options.id, options, self.clock)
        if qom_type == "secret":
            return Secret(options.id, options, self.objects.get)
        classes: dict[str, type[UserObject]] = {
            "iothread": IoThread,
            "authz-simple": AuthzSimple,
            "authz-list": AuthzList,
        }
        return classes[qom_type](options.id, options)

    def add(self, options: Any) -> UserObject:
        check_id(options.id)
        if _wire(options.qom_type) in _NO_CLASS:
            raise QmpError(f"invalid object type: {_wire(options.qom_type)}")
        # Property errors come first; qsd then creates /objects to insert the object into,
        # and keeps it even when the insertion or `complete` fails.
        obj = self._create(options)
        self.container_created = True
        try:
            if options.id in self.objects:
                raise QmpError(
                    f"attempt to add duplicate property '{options.id}' to object (type 'container')"
                )
            obj.complete()
        except BaseException:
            obj.close()
            raise
        self.objects[options.id] = obj
        return obj

    def delete(self, object_id: str) -> None:
        obj = self.objects.get(object_id)
        if obj is None:
            raise QmpError(f"object '{object_id}' not found")
        if self.in_use.get(object_id):
            raise QmpError(f"object '{object_id}' is in use, can not be deleted")
        del self.objects[object_id]
        obj.close()

    def close_all(self) -> None:
        for obj in self.objects.values():
            obj.close()

    def type_of(self, object_id: str) -> str | None:
        obj = self.objects.get(object_id)
        return None if obj is None else obj.qom_type

    # --- lookups for users of objects --------------------------------------------------

    def secret(self, object_id: str) -> Secret | None:
        obj = self.objects.get(object_id)
        return obj if isinstance(obj, Secret) else None

    def throttle_group(self, object_id: str) -> ThrottleGroup:
        obj = self.objects.get(object_id)
        if not isinstance(obj, ThrottleGroup):
            raise QmpError(f"Throttle group '{object_id}' does not exist")
        return obj

    def use(self, object_id: str) -> None:
        self.in_use[object_id] = self.in_use.get(object_id, 0) + 1

    def unuse(self, object_id: str) -> None:
        count = self.in_use.get(object_id, 0) - 1
        if count > 0:
            self.in_use[object_id] = count
        else:
            self.in_use.pop(object_id, None)
