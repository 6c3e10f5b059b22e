"""QEMU's dictionary iteration order, so our JSON output matches qsd's byte for byte.

Pure ring. QEMU keeps JSON objects in a 512-bucket hash table (tdb hash) and iterates the
buckets in order, newest key first within a bucket; every object qsd prints (QMP replies,
events, `json:{...}` pseudo-filenames) comes out in that order. `qdict_ordered` reorders a
value recursively; nothing else in the daemon needs to care about key order.
"""

from __future__ import annotations

from typing import Any

_BUCKETS = 512
_MASK = 0xFFFFFFFF


def qdict_hash(key: str) -> int:
    """The bucket QEMU puts `key` in (Samba's tdb hash, modulo the bucket count)."""
    data = key.encode()
    value = (0x238F13AF * len(data)) & _MASK
    for i, byte in enumerate(data):
        value = (value + (byte << (i * 5 % 24))) & _MASK
    return ((1103515243 * value + 12345) & _MASK) % _BUCKETS


_cache: dict[str, int] = {}


def _bucket(key: str) -> int:
    bucket = _cache.get(key)
    if bucket is None:
        bucket = _cache[key] = qdict_hash(key)
    return bucket


def qdict_keys(keys: list[str]) -> list[str]:
    """`keys` (in insertion order) in the order QEMU iterates them."""
    # Within a bucket the newest insertion comes first: sort by (bucket, -insertion index).
    indexed = sorted(enumerate(keys), key=lambda item: (_bucket(item[1]), -item[0]))
    return [key for _, key in indexed]


def qdict_ordered(value: Any) -> Any:
    """A copy of a JSON value with every object's keys in QEMU's iteration order."""
    if isinstance(value, dict):
        return {key: qdict_ordered(value[key]) for key in qdict_keys(list(value))}
    if isinstance(value, list):
        return [qdict_ordered(item) for item in value]
    return value
