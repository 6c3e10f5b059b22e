"""x-query-block-node (our extension): one node's options, permissions, users and activity.

Domain ring, and no I/O at all: everything comes from the graph's memory, so the query
answers at once even when the node's storage is slow. Invariant: `options` references every
child by node name, so it can be fed back to blockdev-add (with a new node-name).
"""

from __future__ import annotations

from enum import Enum
from typing import Any

from storage_daemon.blockdev.graph import BlockGraph
from storage_daemon.blockdev.node import BlockNode
from storage_daemon.blockdev.perm import perm_names


def _wire(value: Any) -> Any:
    """A typed model's value as it arrives on the wire: set members only, wire names.

    Walks the fields itself rather than calling pydantic's model_dump, which needs every
    lazily built model class to be complete.
    """
    fields = getattr(type(value), "model_fields", None)
    if fields is not None:
        out: dict[str, Any] = {}
        for name in value.model_fields_set:
            info = fields.get(name)
            if info is None:
                continue
            out[info.alias or name] = _wire(getattr(value, name))
        return out
    if isinstance(value, Enum):
        return value.value
    if isinstance(value, list | tuple):
        return [_wire(item) for item in value]
    if isinstance(value, dict):
        return {key: _wire(item) for key, item in value.items()}
    return value


def set_members(value: Any) -> Any:
    """A typed model's members as a client sent them (wire names, set members only)."""
    return _wire(value)


def node_options_dict(node: BlockNode) -> dict[str, Any]:
    """BlockdevOptions as the node was opened, base options as in effect, children by name."""
    out: dict[str, Any] = {"driver": node.driver.name, "node-name": node.name}
    given = node.open_options
    if given is not None:
        dumped = _wire(given)
        out.update({key: value for key, value in dumped.items() if value is not None})
        # An explicit `backing: null` (no backing file) must survive the round trip.
        if "backing" in dumped and dumped["backing"] is None:
            out["backing"] = None
    out["driver"] = node.driver.name
    out["node-name"] = node.name
    opts = node.options
    out["discard"] = opts.discard
    out["cache"] = {"direct": opts.cache_direct, "no-flush": opts.cache_no_flush}
    out["active"] = opts.active
    out["read-only"] = opts.read_only
    out["auto-read-only"] = opts.auto_read_only
    out["force-share"] = opts.force_share
    out["detect-zeroes"] = opts.detect_zeroes
    for edge in node.children:
        out[edge.name] = edge.node.name
    return out


def query_block_node(graph: BlockGraph, node_name: str) -> dict[str, Any]:
    node = graph.lookup_node_name(node_name)
    parents = []
    for edge in node.parents:
        parent = edge.parent_node
        parents.append(
            {
                "parent": parent.name if parent is not None else edge.describe(),
                "child": edge.name,
                "perm": perm_names(edge.perm),
                "shared-perm": perm_names(edge.shared),
            }
        )
    return {
        "options": node_options_dict(node),
        "permissions": {"perm": perm_names(node.perm), "shared-perm": perm_names(node.shared)},
        "parents": parents,
        "active": node.options.active,
    }
