"""The base of user-created objects: typed properties readable and settable by name (domain ring).

Each subclass names its QOM type, its properties struct in the schema and which properties
qom-set may change after creation. Invariant: `set_property` validates through the schema with
qsd's wording before anything changes, so a failed qom-set leaves the object as it was.
"""

from __future__ import annotations

from typing import Any, ClassVar

from storage_daemon.errors import QmpError
from storage_daemon.qapi.runtime import to_wire, visit_input
from storage_daemon.qom.types import PROPERTIES


class UserObject:
    qom_type: ClassVar[str]
    properties_struct: ClassVar[str]
    # Properties qom-set may change once the object exists.
    writable: ClassVar[frozenset[str]] = frozenset()

    def __init__(self, object_id: str, options: Any) -> None:
        self.id = object_id
        self.values: dict[str, Any] = {}
        wire = to_wire(options)
        for name, _ in PROPERTIES.get(self.qom_type, ()):
            if name in wire:
                self.values[name] = wire[name]

    def complete(self) -> None:
        """Check the object once every property is set (QOM's `complete`)."""

    def close(self) -> None:
        """Release what the object holds when it is deleted."""

    def property_names(self) -> list[tuple[str, str]]:
        return [("type", "string"), *PROPERTIES.get(self.qom_type, ())]

    def get_property(self, name: str) -> Any:
        if name == "type":
            return self.qom_type
        if name not in dict(PROPERTIES.get(self.qom_type, ())):
            raise QmpError(f"Property '{self.qom_type}.{name}' not found")
        return self.read(name)

    def read(self, name: str) -> Any:
        return self.values.get(name, self.default(name))

    def default(self, name: str) -> Any:
        kinds = dict(PROPERTIES.get(self.qom_type, ()))
        return {"string": "", "bool": False, "int": 0}.get(kinds.get(name, ""))

    def set_property(self, name: str, value: Any) -> None:
        if name == "type":
            raise QmpError(f"Property '{self.qom_type}.{name}' is not writable")
        if name not in dict(PROPERTIES.get(self.qom_type, ())):
            raise QmpError(f"Property '{self.qom_type}.{name}' not found")
        if name not in self.writable:
            raise QmpError("Property cannot be set after initialization")
        typed = visit_input(self.properties_struct, {name: value, **self.required_extra(name)})
        self.write(name, to_wire(typed)[name])

    def required_extra(self, name: str) -> dict[str, Any]:
        """Mandatory struct members other than `name`, so that visiting one member works."""
        return {}

    def write(self, name: str, value: Any) -> None:
        self.values[name] = value
