"""QEMU's dictionary iteration order, so our JSON output matches qsd's byte for byte.

Pure ring. QEMU keeps JSON objects in a 512-bucket hash table (tdb hash) and iterates the
buckets in order, newest key first within a bucket; every object qsd prints (QMP replies,
events, `json:{...}` pseudo-filenames) comes out in that order. `qdict_ordered` reorders a
value recursively; nothing else in the daemon needs to care about key order.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

_BUCKETS = 512
_MASK = 0xFFFFFFFF
_CACHE_LIMIT = 65536  # keys come from clients too: keep the memo bounded
_cache: dict[str, int] = {}


def qdict_hash(key: str) -> int:
    """The bucket QEMU puts `key` in (Samba's tdb hash, modulo the bucket count)."""
    bucket = _cache.get(key)
    if bucket is None:
        data = key.encode("utf-8", errors="surrogatepass")
        value = (0x238F13AF * len(data)) & _MASK
        for i, byte in enumerate(data):
            value = (value + (byte << (i * 5 % 24))) & _MASK
        bucket = ((1103515243 * value + 12345) & _MASK) % _BUCKETS
        if len(_cache) < _CACHE_LIMIT:
            _cache[key] = bucket
    return bucket


def qdict_order(keys: Iterable[str]) -> list[str]:
    """`keys` (in insertion order) in the order QEMU iterates them.

    By bucket, and within a bucket the newest insertion first.
    """
    indexed = [(qdict_hash(key), -index, key) for index, key in enumerate(keys)]
    indexed.sort()
    return [key for _, _, key in indexed]


def qdict_ordered(value: Any) -> Any:
    """A copy of a JSON value with every object's keys in QEMU's iteration order."""
    if isinstance(value, dict):
        return {key: qdict_ordered(value[key]) for key in qdict_order(value)}
    if isinstance(value, list):
        return [qdict_ordered(item) for item in value]
    return value


# GLib's hash table, which QEMU's input visitor uses to find members nobody asked for.
_PRIME_MOD = (1, 2, 3, 7, 13, 31, 61, 127, 251, 509, 1021, 2039, 4093, 8191, 16381, 32749)


def _djb2(key: str) -> int:
    value = 5381
    for byte in key.encode("utf-8", errors="surrogatepass"):
        value = (value * 33 + byte) & _MASK
    return value


def _ghash_insert(slots: list[str | None], shift: int, key: str) -> None:
    mask = (1 << shift) - 1
    index = (_djb2(key) * 11) % _PRIME_MOD[shift]
    step = 0
    while slots[index] is not None:
        step += 1
        index = (index + step) & mask
    slots[index] = key


def ghash_order(keys: Iterable[str]) -> list[str]:
    """`keys` (inserted in this order) in the order a GLib string hash table iterates them."""
    shift = 3
    slots: list[str | None] = [None] * (1 << shift)
    for count, key in enumerate(keys, start=1):
        _ghash_insert(slots, shift, key)
        size = 1 << shift
        if size <= count + count // 16:  # GLib grows to fit twice the entries
            old = [k for k in slots if k is not None]
            shift = max(3, (count * 2).bit_length())
            slots = [None] * (1 << shift)
            for old_key in old:
                _ghash_insert(slots, shift, old_key)
    return [k for k in slots if k is not None]
