"""qcow2's runtime options: qsd's checks of them (at open and at reopen) and their values.

Domain ring. `check_options` raises qsd's texts in qsd's order and has no side effects, so
blockdev-reopen can run it for every node before it changes anything. The other helpers
derive the driver's live settings from typed BlockdevOptionsQcow2.
"""

from __future__ import annotations

import os
from typing import Any

from storage_daemon.blockdev.drivers.qcow2 import format as fmt
from storage_daemon.blockdev.drivers.qcow2.alloc import (
    FREE_OTHER,
    FREE_REQUEST,
    FREE_SNAPSHOT,
    OL_OPTION_NAMES,
    OL_TEMPLATES,
)
from storage_daemon.blockdev.drivers.qcow2.cache import CacheConfig, CacheSizeError, cache_config
from storage_daemon.errors import QmpError

# Driver options blockdev-reopen may change or drop (qsd refuses the others).
REOPEN_MUTABLE = frozenset(
    {
        "lazy-refcounts",
        "pass-discard-request",
        "pass-discard-snapshot",
        "pass-discard-other",
        "overlap-check",
        "cache-size",
        "l2-cache-size",
        "l2-cache-entry-size",
        "refcount-cache-size",
        "cache-clean-interval",
    }
)


def _wire(value: Any) -> Any:
    return getattr(value, "value", value)


def memory_limit() -> int:
    """Physical memory: a larger cache is an allocation qsd fails (no swap assumed)."""
    try:
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError):  # pragma: no cover - every Linux has both
        return 1 << 62


def overlap_checks(option: Any) -> frozenset[str]:
    """The metadata overlap checks an `overlap-check` option (or its absence) enables."""
    if option is None:
        return OL_TEMPLATES["cached"]
    if isinstance(option, str) or (hasattr(option, "value") and not hasattr(option, "template")):
        return OL_TEMPLATES[_wire(option)]
    template = _wire(option.template) if option.template is not None else "cached"
    checks = set(OL_TEMPLATES[template])
    for wire_name, name in OL_OPTION_NAMES.items():
        value = getattr(option, wire_name.replace("-", "_"))
        if value is True:
            checks.add(name)
        elif value is False:
            checks.discard(name)
    return frozenset(checks)


def discard_kinds(options: Any, discard: str) -> set[str]:
    """Which kinds of freed clusters are discarded in the file too (pass-discard-*)."""
    kinds = set()
    if options.pass_discard_request is True or (
        options.pass_discard_request is None and discard == "unmap"
    ):
        kinds.add(FREE_REQUEST)
    if options.pass_discard_snapshot is not False:
        kinds.add(FREE_SNAPSHOT)
    if options.pass_discard_other is True:
        kinds.add(FREE_OTHER)
    return kinds


def lazy_refcounts(options: Any, hdr: fmt.Header) -> bool:
    """The option, or by default the header's compatible bit."""
    if options.lazy_refcounts is not None:
        return bool(options.lazy_refcounts)
    return bool(hdr.compatible & fmt.COMPAT_LAZY_REFCOUNTS)


def check_options(options: Any, hdr: fmt.Header) -> CacheConfig:
    """qsd's option checks, in qsd's order; the metadata cache configuration."""
    given = [
        x
        for x in (options.cache_size, options.l2_cache_size, options.refcount_cache_size)
        if x is not None
    ]
    if len(given) == 3:
        raise QmpError(
            "cache-size, l2-cache-size and refcount-cache-size may not be set at the same time"
        )
    if options.cache_size is not None:
        if options.l2_cache_size is not None and options.l2_cache_size > options.cache_size:
            raise QmpError("l2-cache-size may not exceed cache-size")
        if (
            options.refcount_cache_size is not None
            and options.refcount_cache_size > options.cache_size
        ):
            raise QmpError("refcount-cache-size may not exceed cache-size")
    entry = options.l2_cache_entry_size
    cs = hdr.cluster_size
    if entry is not None and (entry < 512 or entry > cs or entry & (entry - 1)):
        raise QmpError(
            f"L2 cache entry size must be a power of two between 512 and the cluster size ({cs})"
        )
    try:
        config = cache_config(
            cluster_size=cs,
            virtual_size=hdr.size,
            l2_entry_size=hdr.l2_entry_size,
            cache_size=options.cache_size,
            l2_cache_size=options.l2_cache_size,
            l2_cache_entry_size=entry,
            refcount_cache_size=options.refcount_cache_size,
            memory_limit=memory_limit(),
        )
    except CacheSizeError as err:
        raise QmpError(str(err)) from err
    interval = options.cache_clean_interval
    if interval is not None and (interval < 0 or interval > 0xFFFFFFFF):
        raise QmpError("Cache clean interval too big")
    if options.lazy_refcounts and hdr.version < 3:
        raise QmpError(
            "Lazy refcounts require a qcow2 image with at least qemu 1.1 compatibility level"
        )
    return config
