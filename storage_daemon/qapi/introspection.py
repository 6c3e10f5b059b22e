"""Access to the committed `query-qmp-schema` payload (qapi_generated/introspection.json).

Reads package data once and caches it; the payload itself is produced by `introspect.py` at
generation time. Invariant: callers must not mutate the returned list (it is shared).
"""

from __future__ import annotations

import functools
import json
from importlib import resources
from typing import Any


@functools.cache
def schema_payload() -> list[dict[str, Any]]:
    """The `query-qmp-schema` return value, exactly as generated from schema/*.json."""
    text = (
        resources.files("storage_daemon.qapi_generated")
        .joinpath("introspection.json")
        .read_text("utf-8")
    )
    payload: list[dict[str, Any]] = json.loads(text)
    return payload
