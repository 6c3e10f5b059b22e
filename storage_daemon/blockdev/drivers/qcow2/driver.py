"""The `qcow2` format driver: opening, options, permissions, info and the data operations.

Domain ring. Reads go through `Mapper`; every metadata change runs under one lock and goes
through `Metadata`, which keeps the on-disk invariants (see alloc.py); writes into clusters
already writable in place skip the lock (Writer.write_in_place), and so does the data of
large runs of new clusters between their reservation and their L2 link (inflight.py; requests
on those guest clusters wait). Detected corruption
marks the image corrupt (when writable), emits BLOCK_IMAGE_CORRUPTED through `EVENT_SINK`, and
fences the node: every later request fails.
"""

from __future__ import annotations

import asyncio
import errno
import os
import posixpath
import sys
from collections.abc import Callable
from contextvars import ContextVar
from typing import Any

from storage_daemon.blockdev import io
from storage_daemon.blockdev.child import ROLE_BACKING, ROLE_FILE_OF_FORMAT, BdrvChild, ChildRole
from storage_daemon.blockdev.driver import BlockDriver, BlockStatus, ChildOpener, ReopenChange
from storage_daemon.blockdev.drivers.blkdebug import debug_event
from storage_daemon.blockdev.drivers.qcow2 import bitmaps, status
from storage_daemon.blockdev.drivers.qcow2 import format as fmt
from storage_daemon.blockdev.drivers.qcow2 import options as opts
from storage_daemon.blockdev.drivers.qcow2.alloc import (
    OL_INACTIVE_L2,
    OL_SNAPSHOT_TABLE,
    Corruption,
    Metadata,
)
from storage_daemon.blockdev.drivers.qcow2.cache import (
    DEFAULT_CLEAN_INTERVAL_S,
    CacheConfig,
    TableCache,
)
from storage_daemon.blockdev.drivers.qcow2.inflight import EVERYTHING
from storage_daemon.blockdev.drivers.qcow2.mapping import Mapper
from storage_daemon.blockdev.drivers.qcow2.writer import Writer
from storage_daemon.blockdev.perm import Perm, cow_child_perm
from storage_daemon.clock import Clock, SystemClock
from storage_daemon.errors import QmpError, report, strerror

# The daemon sets this to its event bus' emit (name, data); tests may too.
EVENT_SINK: Callable[[str, dict[str, Any]], None] | None = None

MAX_CHAIN_DEPTH = 64
_OPENING: ContextVar[tuple[str, ...]] = ContextVar("qcow2_opening", default=())
# Read by the cache-clean-interval check only; tests put a FakeClock here.
_clock: Clock = SystemClock()


def use_clock(clock: Clock) -> None:
    global _clock
    _clock = clock


def set_event_sink(sink: Callable[[str, dict[str, Any]], None] | None) -> None:
    global EVENT_SINK
    EVENT_SINK = sink


def _wire(value: Any) -> Any:
    return getattr(value, "value", value)


class Qcow2Driver(BlockDriver):
    name = "qcow2"
    supports_backing = True
    reopen_mutable = opts.REOPEN_MUTABLE
    raises_debug_events = True  # blkdebug below hears qsd's qcow2 events from us

    def __init__(self, node: Any) -> None:
        super().__init__(node)
        self._file: BdrvChild | None = None
        self._data_file: BdrvChild | None = None
        self.backing: BdrvChild | None = None
        self.hdr: fmt.Header | None = None
        self.meta: Metadata | None = None
        self.mapper: Mapper | None = None
        self.writer: Writer | None = None
        self.snapshots: list[fmt.Snapshot] = []
        self.stored: list[bitmaps.StoredBitmap] = []  # the image's bitmap directory
        self.lazy_refcounts = False
        self._fenced = False
        self._corruption_reported = False
        self._lock = asyncio.Lock()
        self._writable = False
        self._dirty_set = False
        self._backing_filename: str | None = None
        self._full_backing_filename: str | None = None
        self._strong: dict[str, Any] = {}
        self.cache_config: CacheConfig | None = None
        self._clean_interval_s = 0
        self._last_clean_ns = 0
        self._clean_timer: asyncio.TimerHandle | None = None
        self._prealloc: bool | None = None  # metadata preallocation (None: not checked yet)
        self._bitmaps_stored_for_reopen = False
        self._background: set[asyncio.Task[None]] = set()
        self._options: Any = None  # the typed open options (kept current by reopen)

    # --- opening ------------------------------------------------------------------------

    async def open(self, options: Any, opener: ChildOpener) -> None:
        self._file = await opener.open_child(self.node, options.file, "file", ROLE_FILE_OF_FORMAT)
        file = self._file
        name = file.node.filename()
        chain = _OPENING.get()
        if name in chain:
            raise QmpError(f"Backing file '{name}' creates an infinite loop.")
        if len(chain) >= MAX_CHAIN_DEPTH:
            raise QmpError("Backing chain too deep")
        token = _OPENING.set((*chain, name))
        try:
            await self._open(options, opener, file)
        finally:
            _OPENING.reset(token)

    async def _open(self, options: Any, opener: ChildOpener, file: BdrvChild) -> None:
        self._writable = not self.node.options.read_only
        self._options = options
        await self._load_image(options, file)
        hdr = self.hdr
        assert hdr is not None
        # Data file.
        if hdr.incompatible & fmt.INCOMPAT_DATA_FILE:
            if options.data_file is None:
                raise QmpError("'data-file' is required for this image")
            self._data_file = await opener.open_child(
                self.node, options.data_file, "data-file", ChildRole.DATA
            )
        elif options.data_file is not None:
            raise QmpError("'data-file' can only be set for images with an external data file")
        self._map_guest()
        await self._open_backing(options, opener)
        await self._take_over()
        self._start_cache_cleaner(options.cache_clean_interval)

    async def _load_image(self, options: Any, file: BdrvChild) -> None:
        """Header, tables, snapshots and the metadata caches, as the image holds them now."""
        file_len = file.node.driver.getlength()
        try:
            head = await io.pread(file, 0, fmt.V3_HEADER_LENGTH + 8)
            hdr = fmt.parse_fixed_header(bytes(head))
            # qsd reads the extensions piecemeal from here; one failure text covers both.
            cluster0 = bytes(await io.pread(file, 0, hdr.cluster_size))
            hdr = fmt.parse_header(cluster0, writable=self._writable)
        except fmt.FormatError as err:
            raise QmpError(str(err)) from err
        except OSError as err:  # e.g. a snapshot-access node with no copy-before-write below
            raise QmpError(f"Could not read qcow2 header: {strerror(err)}") from err
        self.hdr = hdr
        cs = hdr.cluster_size
        cache_cfg = opts.check_options(options, hdr)
        l1 = await self._read_table(file, hdr.l1_table_offset, hdr.l1_size, file_len)
        debug_event(file, "reftable_load")
        reftable = await self._read_table(
            file, hdr.refcount_table_offset, hdr.reftable_entries, file_len
        )
        try:
            fmt.parse_extensions(cluster0, hdr)
        except fmt.FormatError as err:
            raise QmpError(str(err)) from err
        if hdr.crypt_method:
            if options.encrypt is None or options.encrypt.key_secret is None:
                raise QmpError("Parameter 'encrypt.key-secret' is required for cipher")
            raise QmpError("qcow2 encryption is not supported by this daemon")
        if options.encrypt is not None:
            raise QmpError(
                "No encryption in image header, but options specified format "
                f"'{_wire(options.encrypt.format)}'"
            )
        meta = Metadata(
            file,
            hdr,
            l1,
            reftable,
            2,
            cache_cfg.refcount_entries,
            opts.overlap_checks(options.overlap_check),
        )
        # Counted in l2-cache-entry-size slices; readers load single slices (mapping.py).
        meta.l2_cache = TableCache(cache_cfg.l2_entries, cs, cache_cfg.l2_slice_size)
        self.cache_config = cache_cfg
        meta.end_cluster = -(-file_len // cs)
        meta.before_l2_writeback = self.mark_dirty
        self.meta = meta
        await self._read_snapshots(file, file_len)
        meta.build_overlap_map()
        meta.mark_snapshot_table(hdr.snapshots_offset, self._snapshot_table_size)
        meta.discard_kinds = opts.discard_kinds(options, self.node.options.discard)
        self.lazy_refcounts = opts.lazy_refcounts(options, hdr)
        self._dirty_set = False

    def _map_guest(self) -> None:
        hdr, meta, file = self.hdr, self.meta, self._file
        assert hdr is not None and meta is not None and file is not None
        data_edge = self._data_file if self._data_file is not None else file
        self.mapper = Mapper(meta, hdr.size, data_edge, self._data_file is not None)
        if self.backing is not None:
            self.mapper.backing = self.backing
        self.writer = Writer(self, meta, self.mapper)

    async def _take_over(self) -> None:
        """The persistent bitmaps loaded; a writable, active node then readies the image for
        writes. An inactive node (QEMU 10.0) leaves the image alone until it is activated:
        another process may own it meanwhile."""
        active = self.node.options.active
        await bitmaps.load(self, readonly=not (self._writable and active), attach=active)
        if self._writable and active:
            await self._prepare_writable()
            await bitmaps.mark_in_use(self)
            # Before our first write (see _check_preallocation).
            await self._check_preallocation()

    @staticmethod
    async def _read_table(file: BdrvChild, offset: int, entries: int, file_len: int) -> list[int]:
        """A table of u64 entries; the part past EOF reads as zeroes and costs no I/O."""
        if not entries:
            return []
        in_file = max(0, min(entries * 8, file_len - offset)) if offset < file_len else 0
        values: list[int] = []
        if in_file:
            raw = await io.pread(file, offset, in_file)
            if in_file > 64 * 1024:  # large tables are decoded off the event loop
                values = await asyncio.to_thread(fmt.unpack_u64s, raw)
            else:
                values = fmt.unpack_u64s(raw)
        values.extend([0] * (entries - len(values)))
        return values

    async def _read_snapshots(self, file: BdrvChild, file_len: int) -> None:
        hdr = self.hdr
        assert hdr is not None
        self._snapshot_table_size = 0
        if not hdr.nb_snapshots:
            return
        want = min(fmt.MAX_SNAPSHOT_TABLE, hdr.nb_snapshots * fmt.SNAPSHOT_HEADER_SIZE + 1024)
        while True:
            avail = max(0, min(want, file_len - hdr.snapshots_offset))
            buf = (
                bytearray(await io.pread(file, hdr.snapshots_offset, avail))
                if avail
                else bytearray()
            )
            buf.extend(bytes(want - len(buf)))
            try:
                self.snapshots, size = fmt.parse_snapshots(buf, hdr.nb_snapshots)
                break
            except fmt.NeedMore as more:
                if more.need > fmt.MAX_SNAPSHOT_TABLE:
                    raise QmpError("Snapshot table is too big") from None
                want = min(fmt.MAX_SNAPSHOT_TABLE, max(more.need, want * 2))
            except fmt.FormatError as err:
                raise QmpError(str(err)) from err
        self._snapshot_table_size = size
        meta = self.meta
        assert meta is not None
        for snap in self.snapshots:
            if (
                snap.l1_table_offset % hdr.cluster_size == 0
                and snap.l1_size <= fmt.MAX_L1_SIZE // 8
            ):
                meta.snapshot_l1s.append((snap.l1_table_offset, snap.l1_size))
        if OL_INACTIVE_L2 in meta.overlap_checks:
            for offset, size in meta.snapshot_l1s:
                for entry in await self._read_table(file, offset, size, file_len):
                    if entry & fmt.L1E_OFFSET_MASK:
                        meta.inactive_l2.add(entry & fmt.L1E_OFFSET_MASK)

    async def _open_backing(self, options: Any, opener: ChildOpener) -> None:
        hdr = self.hdr
        assert hdr is not None
        self._backing_filename = hdr.backing_file
        self.node.auto_backing_file = hdr.backing_file or ""
        explicit = "backing" in options.model_fields_set
        if hdr.backing_file:
            self._full_backing_filename = self._resolve(hdr.backing_file)
        if explicit:
            if options.backing is None:
                return
            self.backing = await opener.open_child(
                self.node, options.backing, "backing", ROLE_BACKING
            )
        elif hdr.backing_file:
            self.backing = await self._open_backing_file(opener)
            self.node.auto_backing_file = self.backing.node.filename()
        if self.backing is not None and self.mapper is not None:
            self.mapper.backing = self.backing

    def _resolve(self, name: str) -> str:
        if name.startswith("/") or ":" in name.split("/", 1)[0]:
            return name
        base = self._file.node.filename() if self._file is not None else ""
        if base.startswith("json:"):
            raise QmpError(f"Cannot use relative backing file names for '{base}'")
        # As QEMU's bdrv_dirname: filters (blkdebug, throttle...) pass it to their child.
        node = self._file.node if self._file is not None else None
        while node is not None and node.primary is not None:
            node = node.primary.node
        if node is not None:
            base = node.filename()
        return posixpath.join(posixpath.dirname(base), name)

    async def _open_backing_file(self, opener: ChildOpener) -> BdrvChild:
        from storage_daemon.qapi.runtime import visit_input

        hdr = self.hdr
        assert hdr is not None and self._full_backing_filename is not None
        path = self._full_backing_filename
        formats = [hdr.backing_format] if hdr.backing_format else ["qcow2", "raw"]
        last: QmpError | None = None
        for driver in formats:
            spec = {
                "driver": driver,
                "read-only": True,
                "file": {"driver": "file", "filename": path},
            }
            try:
                ref = visit_input("BlockdevOptions", spec)
            except QmpError as err:
                raise QmpError(f"Could not open backing file: {err.desc}") from err
            try:
                return await opener.open_child(self.node, ref, "backing", ROLE_BACKING)
            except QmpError as err:
                last = err
                if err.desc == "Image is not in qcow2 format" and driver != formats[-1]:
                    continue
                break
        assert last is not None
        raise QmpError(f"Could not open backing file: {last.desc}") from last

    async def _prepare_writable(self) -> None:
        hdr = self.hdr
        meta = self.meta
        assert hdr is not None and meta is not None
        if hdr.version == 3 and hdr.autoclear & ~fmt.AUTOCLEAR_KNOWN:
            hdr.autoclear &= fmt.AUTOCLEAR_KNOWN
            await meta.write_header_field(88, hdr.autoclear.to_bytes(8, "big"))
        if hdr.incompatible & fmt.INCOMPAT_DIRTY:
            from storage_daemon.blockdev.drivers.qcow2.check import repair

            try:
                await repair(self)
            except (OSError, Corruption) as err:
                raise QmpError(f"Could not repair dirty image: {err}") from err
            await self._set_incompat(hdr.incompatible & ~fmt.INCOMPAT_DIRTY)

    async def _set_incompat(self, value: int) -> None:
        hdr = self.hdr
        meta = self.meta
        assert hdr is not None and meta is not None
        if hdr.version < 3:
            return
        hdr.incompatible = value
        await meta.write_header_field(72, value.to_bytes(8, "big"))

    async def mark_dirty(self) -> None:
        """Lazy refcounts: the dirty bit is on disk before the first L2 write-back."""
        hdr = self.hdr
        if not self.lazy_refcounts or self._dirty_set or hdr is None or hdr.version < 3:
            return
        await self._set_incompat(hdr.incompatible | fmt.INCOMPAT_DIRTY)
        self._dirty_set = True

    @property
    def writable(self) -> bool:
        return self._writable

    @property
    def metadata_lock(self) -> asyncio.Lock:
        return self._lock

    async def close(self) -> None:
        self._stop_cache_cleaner()
        if self._writable and not self._fenced and self.meta is not None:
            try:
                async with self._lock:
                    await self._store_bitmaps()
                    await self._writeback()
                    await self._mark_clean()
            except (OSError, Corruption):
                pass
        elif not self._writable and bitmaps.unstorable(self):
            report(
                f"Lost persistent bitmaps during inactivation of node '{self.node.name}': "
                "No write access"
            )

    # --- blockdev-set-active (QEMU 10.0) -------------------------------------------------

    async def inactivate(self) -> None:
        """Before another process may take the image over: the persistent bitmaps stored
        (and dropped from memory), every cached table written back, the dirty bit off."""
        if not self._writable or self._fenced or self.meta is None:
            return
        try:
            async with self._lock:
                await bitmaps.store(self)
                await self._writeback()
                await self._mark_clean()
                await self.meta.sync()
        except Corruption as err:
            raise OSError(errno.EIO, str(err)) from err
        bitmaps.release(self)

    async def activate(self) -> None:
        """Another process may have changed the image while we were inactive: nothing cached
        is trusted; header, tables and bitmaps are read again (QEMU's invalidate-cache)."""
        file = self._file
        if file is None or self._fenced:
            return
        async with self._lock:
            bitmaps.release(self, loaded_only=True)  # loaded read-only while inactive
            await self._load_image(self._options, file)
            self._prealloc = None
            self._map_guest()
        await self._take_over()  # (takes the lock itself where it writes)

    async def _store_bitmaps(self) -> None:
        """Persistent bitmaps into the image (lock held); a failure is reported, as qsd
        reports it, and the rest of the close goes on."""
        try:
            await bitmaps.store(self)
        except (OSError, Corruption) as err:
            report(
                f"Lost persistent bitmaps during inactivation of node '{self.node.name}': "
                + _error_text(err)
            )

    async def _mark_clean(self) -> None:
        """Lazy refcounts: the refcounts on disk, then the dirty bit off (lock held)."""
        if self._dirty_set and self.hdr is not None and self.meta is not None:
            await self.meta.sync()
            await self._set_incompat(self.hdr.incompatible & ~fmt.INCOMPAT_DIRTY)
            self._dirty_set = False

    # --- blockdev-reopen ----------------------------------------------------------------

    def reopen_check(self, options: Any) -> None:
        if self.hdr is not None:
            opts.check_options(options, self.hdr)

    async def reopen_ready(self, change: ReopenChange) -> None:
        """Turning read-write gets the header ready for writes (the dirty-image repair). The
        I/O the new runtime options need comes first too: no dirty image left behind when
        lazy refcounts go off, caches written back before new ones replace them, the inactive
        L2 tables located when their overlap check is turned on."""
        if not change.new.read_only and change.old.read_only:
            self._writable = True
            change.saved = True
            await self._prepare_writable()
            await bitmaps.mark_in_use(self)
        options, hdr, meta = change.options, self.hdr, self.meta
        if hdr is None or meta is None or self._fenced:
            return
        checks = opts.overlap_checks(options.overlap_check)
        try:
            async with self._lock:
                if not opts.lazy_refcounts(options, hdr):
                    await self._mark_clean()
                if opts.check_options(options, hdr) != self.cache_config:
                    await self._writeback()
                if OL_INACTIVE_L2 in checks - meta.overlap_checks:
                    file = self._file
                    assert file is not None
                    file_len = file.node.driver.getlength()
                    meta.inactive_l2.clear()
                    for offset, size in meta.snapshot_l1s:
                        for entry in await self._read_table(file, offset, size, file_len):
                            if entry & fmt.L1E_OFFSET_MASK:
                                meta.inactive_l2.add(entry & fmt.L1E_OFFSET_MASK)
                    meta.build_overlap_map()
                    meta.mark_snapshot_table(hdr.snapshots_offset, self._snapshot_table_size)
        except (OSError, Corruption) as err:
            raise QmpError(f"Failed to flush the metadata caches: {err}") from err

    def reopen_commit(self, change: ReopenChange) -> None:
        self._bitmaps_stored_for_reopen = False
        self._options = change.options
        if change.new.read_only:
            if self._writable:
                bitmaps.set_readonly(self)
            self._writable = False
        options, hdr, meta = change.options, self.hdr, self.meta
        if hdr is None or meta is None:
            return
        self.lazy_refcounts = opts.lazy_refcounts(options, hdr)
        meta.discard_kinds = opts.discard_kinds(options, self.node.options.discard)
        meta.overlap_checks = opts.overlap_checks(options.overlap_check)
        config = opts.check_options(options, hdr)
        # New caches start empty: only when nothing waits in the old ones (reopen_ready wrote
        # them back and the node is drained; else the old sizes stay until the next reopen).
        if config != self.cache_config and not (meta.l2_cache.has_dirty or meta.rb_cache.has_dirty):
            meta.l2_cache = TableCache(config.l2_entries, hdr.cluster_size, config.l2_slice_size)
            meta.rb_cache = TableCache(config.refcount_entries)
            self.cache_config = config
        self._stop_cache_cleaner()
        self._start_cache_cleaner(options.cache_clean_interval)

    async def reopen_flush(self, change: ReopenChange) -> None:
        """qsd stores the persistent bitmaps before a node turns read-only."""
        if self.meta is None or self._fenced:
            return
        self._bitmaps_stored_for_reopen = True
        try:
            async with self._lock:
                await bitmaps.store(self)
        except (OSError, Corruption) as err:
            raise QmpError(f"Failed to store the persistent bitmaps: {err}") from err

    def reopen_flush_abort(self, change: ReopenChange) -> None:
        self._remark_bitmaps()

    def reopen_abort(self, change: ReopenChange) -> None:
        if change.saved:
            self._writable = False
        self._remark_bitmaps()

    def _remark_bitmaps(self) -> None:
        """A reopen to read-only stored the bitmaps, then failed: the node stays read-write,
        so flag them stale on disk again (in the background: this hook cannot wait)."""
        if self._bitmaps_stored_for_reopen:
            self._bitmaps_stored_for_reopen = False
            task = asyncio.get_running_loop().create_task(bitmaps.mark_in_use(self))
            self._background.add(task)
            task.add_done_callback(self._background.discard)

    def backing_changed(self, edge: BdrvChild | None) -> None:
        self.backing = edge
        if self.mapper is not None:
            self.mapper.backing = edge

    # --- cache-clean-interval -----------------------------------------------------------

    def _start_cache_cleaner(self, interval: int | None) -> None:
        """Every `interval` seconds (qsd's default: 600; 0: never), drop the cached tables
        that were not used since the previous time, as qsd does to give memory back."""
        seconds = DEFAULT_CLEAN_INTERVAL_S if interval is None else interval
        meta = self.meta
        if not seconds or meta is None:
            return
        self._clean_interval_s = seconds
        meta.l2_cache.watch_use()
        meta.rb_cache.watch_use()
        self._last_clean_ns = _clock.monotonic_ns()
        self._clean_timer = asyncio.get_running_loop().call_later(seconds, self._on_clean_timer)

    def _stop_cache_cleaner(self) -> None:
        if self._clean_timer is not None:
            self._clean_timer.cancel()
            self._clean_timer = None
        self._clean_interval_s = 0

    def _on_clean_timer(self) -> None:
        self._clean_timer = None
        if not self._clean_interval_s:
            return
        self.clean_caches()
        self._clean_timer = asyncio.get_running_loop().call_later(
            self._clean_interval_s, self._on_clean_timer
        )

    def clean_caches(self) -> int:
        """When an interval has passed on the injected clock since the last clean, drop the
        clean cache entries unused since then; the number dropped. The event loop's timer
        calls this; the 50 ms of slack absorbs the loop clock firing a little early."""
        meta = self.meta
        if meta is None or not self._clean_interval_s:
            return 0
        now = _clock.monotonic_ns()
        if now - self._last_clean_ns < self._clean_interval_s * 1_000_000_000 - 50_000_000:
            return 0
        self._last_clean_ns = now
        return meta.l2_cache.clean_unused() + meta.rb_cache.clean_unused()

    # --- permissions --------------------------------------------------------------------

    def child_perm(self, child: BdrvChild, perm: Perm, shared: Perm) -> tuple[Perm, Perm]:
        if child.role & ChildRole.COW:
            return cow_child_perm(perm, shared)
        # Users' write-unchanged passes through to the file, as QEMU's default storage perms.
        wanted = Perm.CONSISTENT_READ | (perm & Perm.WRITE_UNCHANGED)
        if not self.node.options.read_only:
            wanted |= Perm.WRITE | Perm.RESIZE
        return wanted, Perm.CONSISTENT_READ | Perm.WRITE_UNCHANGED

    # --- naming and info ----------------------------------------------------------------

    def strong_options(self) -> dict[str, Any]:
        return {}

    def exact_filename(self) -> str | None:
        if self._file is None:
            return None
        name = self._file.node.filename()
        return None if name.startswith("json:") else name

    def format_name(self) -> str:
        return "qcow2"

    def image_info_extra(self) -> dict[str, Any]:
        hdr = self.hdr
        if hdr is None:
            return {}
        info: dict[str, Any] = {
            "dirty-flag": bool(hdr.incompatible & fmt.INCOMPAT_DIRTY),
            "cluster-size": hdr.cluster_size,
        }
        if hdr.crypt_method:
            info["encrypted"] = True
        if self._backing_filename:
            info["backing-filename"] = self._backing_filename
            if self._full_backing_filename:
                info["full-backing-filename"] = self._full_backing_filename
            if hdr.backing_format:
                info["backing-filename-format"] = hdr.backing_format
        if self.snapshots:
            info["snapshots"] = [snap.info() for snap in self.snapshots]
        data: dict[str, Any]
        if hdr.version == 2:
            data = {"compat": "0.10", "refcount-bits": hdr.refcount_bits}
        else:
            data = {"compat": "1.1"}
            if hdr.data_file is not None or hdr.incompatible & fmt.INCOMPAT_DATA_FILE:
                if hdr.data_file is not None:
                    data["data-file"] = hdr.data_file
                data["data-file-raw"] = bool(hdr.autoclear & fmt.AUTOCLEAR_DATA_FILE_RAW)
            data["extended-l2"] = hdr.extended_l2
            data["lazy-refcounts"] = bool(hdr.compatible & fmt.COMPAT_LAZY_REFCOUNTS)
            data["corrupt"] = bool(hdr.incompatible & fmt.INCOMPAT_CORRUPT)
            data["refcount-bits"] = hdr.refcount_bits
            if self.stored:
                data["bitmaps"] = bitmaps.image_info(self.stored)
        data["compression-type"] = "zstd" if hdr.compression_type == 1 else "zlib"
        info["format-specific"] = {"type": "qcow2", "data": data}
        return info

    # --- corruption ---------------------------------------------------------------------

    def _check_fenced(self) -> None:
        if self._fenced:
            raise OSError(errno.ENOMEDIUM, os.strerror(errno.ENOMEDIUM))

    async def signal_corruption(self, err: Corruption) -> OSError:
        """Report corruption as QEMU does; the caller raises the returned EIO."""
        fatal = err.fatal and self._writable
        if not self._corruption_reported:
            self._corruption_reported = True
            if fatal:
                print(
                    f"qcow2: Marking image as corrupt: {err.msg}; further corruption events "
                    "will be suppressed",
                    file=sys.stderr,
                )
            else:
                print(
                    f"qcow2: Image is corrupt: {err.msg}; further non-fatal corruption events "
                    "will be suppressed",
                    file=sys.stderr,
                )
            # The graph's hook (the daemon's event bus); the module-level sink, when set,
            # still wins (tests that watch events without a daemon).
            graph = self.node.graph
            sink = EVENT_SINK if EVENT_SINK is not None or graph is None else graph.emit
            if sink is not None:
                data: dict[str, Any] = {"device": "", "node-name": self.node.name, "msg": err.msg}
                if err.offset >= 0:
                    data["offset"] = err.offset
                if err.size >= 0:
                    data["size"] = err.size
                data["fatal"] = fatal
                sink("BLOCK_IMAGE_CORRUPTED", data)
        if fatal and not self._fenced:
            self._fenced = True
            self._stop_cache_cleaner()
            hdr = self.hdr
            if hdr is not None and hdr.version == 3 and self.meta is not None:
                try:
                    await self._set_incompat(hdr.incompatible | fmt.INCOMPAT_CORRUPT)
                except OSError:
                    pass
            # Users of the node get an EIO node in its place (drivers/error.py).
            if self.node.graph is not None:
                await self.node.graph.fence(self.node, "corrupt")
        return OSError(errno.EIO, os.strerror(errno.EIO))

    # --- data path ----------------------------------------------------------------------

    def getlength(self) -> int:
        return self.hdr.size if self.hdr is not None else 0

    def _mapper(self) -> Mapper:
        self._check_fenced()
        assert self.mapper is not None
        return self.mapper

    async def preadv(self, offset: int, length: int) -> bytes | bytearray | memoryview:
        mapper = self._mapper()
        try:
            return await mapper.read(offset, length)
        except Corruption as err:
            raise await self.signal_corruption(err) from err

    def preadv_now(
        self, offset: int, length: int, live: bool
    ) -> bytes | bytearray | memoryview | None:
        mapper = self.mapper
        if self._fenced or mapper is None:
            return None
        return status.read_now(mapper, offset, length)

    async def block_status(self, offset: int, length: int) -> BlockStatus:
        mapper = self._mapper()
        if self._prealloc is None:
            await self._check_preallocation()
        try:
            return await status.block_status(mapper, bool(self._prealloc), offset, length)
        except Corruption as err:
            raise await self.signal_corruption(err) from err

    def block_status_now(self, offset: int, length: int) -> BlockStatus | None:
        mapper = self.mapper
        if self._fenced or self._prealloc is None or mapper is None:
            return None
        return status.block_status_now(mapper, self._prealloc, offset, length)

    async def _check_preallocation(self) -> None:
        """Once per open: a writable image at open, else at the first block status (see
        `status.preallocated`)."""
        async with self._lock:
            if self._prealloc is None and self.meta is not None and self._file is not None:
                self._prealloc = await status.preallocated(self.meta, self._file)

    async def _run_write(
        self,
        op: Callable[[Writer], Any],
        fua: bool,
        span: tuple[int, int] = EVERYTHING,
    ) -> None:
        """`op` under the metadata lock, once no allocation in flight shares a guest
        cluster with `span` (offset, length); then the data of the runs of new clusters it
        reserved, without the lock, and their L2 entries under it again."""
        self._check_fenced()
        writer = self.writer
        meta = self.meta
        assert writer is not None and meta is not None
        try:
            await writer.tracker.acquire(self._lock, *span)
            try:
                self._check_fenced()
                await op(writer)
                await meta.trim()
            except BaseException:
                for alloc in writer.take_deferred():
                    writer.give_up(alloc)
                raise
            finally:
                deferred = writer.take_deferred()
                self._lock.release()
            if deferred:
                await writer.finish(self._lock, deferred, self._check_fenced)
            if fua:
                await self.flush()
        except Corruption as err:
            raise await self.signal_corruption(err) from err

    async def pwritev(self, offset: int, data: bytes | memoryview, fua: bool) -> None:
        self._check_fenced()
        writer = self.writer
        assert writer is not None
        try:
            done = await writer.write_in_place(offset, data)
        except Corruption as err:
            raise await self.signal_corruption(err) from err
        if done:
            if fua:
                await self.flush()
            return

        async def op(writer: Writer) -> None:
            await writer.write(offset, memoryview(data))

        await self._run_write(op, fua, (offset, len(data)))

    def pwritev_now(self, offset: int, data: bytes | memoryview, fua: bool) -> bool:
        """A write into allocated clusters whose L2 table is cached, done at once on tmpfs
        (`Writer.write_in_place_now`); False: nothing done, await `pwritev`."""
        writer = self.writer
        if fua or self._fenced or writer is None:
            return False
        return writer.write_in_place_now(offset, data, None)

    def pwritev_start(
        self, offset: int, data: bytes | memoryview, fua: bool, done: io.WriteDone
    ) -> bool:
        """The same write started on the file's writer thread, `done(error)` once it ended;
        False: nothing done."""
        writer = self.writer
        if fua or self._fenced or writer is None:
            return False
        return writer.write_in_place_now(offset, data, done)

    async def pwritev_compressed(self, offset: int, data: bytes | memoryview) -> None:
        """Whole clusters, compressed (QEMU's rules in compressed.py)."""
        from storage_daemon.blockdev.drivers.qcow2.compressed import write_compressed

        self._check_fenced()
        await write_compressed(self, offset, data)

    async def pwrite_zeroes(self, offset: int, length: int, unmap: bool, fua: bool) -> None:
        hdr = self.hdr
        assert hdr is not None
        if hdr.version < 3 and self.backing is not None:
            # No zero flag in v2: deallocating would expose the backing file.
            raise OSError(errno.ENOTSUP, os.strerror(errno.ENOTSUP))

        async def op(writer: Writer) -> None:
            await writer.zero(offset, length, unmap)

        await self._run_write(op, fua, (offset, length))

    async def pdiscard(self, offset: int, length: int) -> None:
        async def op(writer: Writer) -> None:
            await writer.discard(offset, length)

        await self._run_write(op, False, (offset, length))

    async def _writeback(self) -> None:
        meta = self.meta
        assert meta is not None
        edges = (self._data_file,) if self._data_file is not None else ()
        await meta.writeback(edges)

    async def flush(self) -> None:
        self._check_fenced()
        try:
            # QEMU's generic flush raises these on the node's primary child; the I/O path
            # calls this only when the node was written since its last flush, when QEMU
            # raises both.
            debug_event(self._file, "flush_to_os")
            async with self._lock:
                await self._writeback()
            debug_event(self._file, "flush_to_disk")
        except Corruption as err:
            raise await self.signal_corruption(err) from err

    async def truncate(self, size: int) -> None:
        from storage_daemon.blockdev.drivers.qcow2 import resize

        resize.check_new_size(self, size)
        if self.hdr is not None and size == self.hdr.size:
            return

        async def op(writer: Writer) -> None:
            await resize.resize(self, size)

        await self._run_write(op, False)

    async def set_backing(self, name: str | None, backing_fmt: str | None) -> None:
        """Rewrite the backing file name (and format extension) in the header, in place."""
        hdr = self.hdr
        assert hdr is not None
        name = name or None
        if name is not None and len(name.encode()) > fmt.MAX_BACKING_NAME:
            raise OSError(errno.EINVAL, os.strerror(errno.EINVAL))
        exts = [e for e in hdr.extensions if e.type != fmt.EXT_BACKING_FORMAT]
        if name is not None and backing_fmt:
            exts.insert(0, fmt.Extension(fmt.EXT_BACKING_FORMAT, backing_fmt.encode()))
        await self._write_header(exts, hdr.autoclear, name)
        hdr.backing_file = name
        hdr.backing_format = backing_fmt if name is not None else None
        self._backing_filename = name
        self.node.auto_backing_file = name or ""
        self._full_backing_filename = self._resolve(name) if name is not None else None

    async def rewrite_header(self, exts: list[fmt.Extension], autoclear: int) -> None:
        """New header extensions and autoclear bits; the backing file name kept (synced)."""
        hdr = self.hdr
        assert hdr is not None
        await self._write_header(exts, autoclear, hdr.backing_file)

    async def _write_header(
        self, exts: list[fmt.Extension], autoclear: int, name: str | None
    ) -> None:
        """The header cluster rewritten in place: fixed fields, `exts`, then the backing file
        name (QEMU's layout); in memory only once it is on disk."""
        hdr = self.hdr
        file = self._file
        assert hdr is not None and file is not None and self.meta is not None
        cs = hdr.cluster_size
        body = bytearray()
        for ext in exts:
            body += ext.type.to_bytes(4, "big") + len(ext.data).to_bytes(4, "big") + ext.data
            body += bytes(-len(ext.data) % 8)
        body += bytes(8)  # end of extensions
        raw_name = name.encode() if name is not None else b""
        old_end = hdr.backing_file_offset + hdr.backing_file_size if hdr.backing_file_offset else 0
        cluster0 = bytearray(await io.pread(file, 0, cs))
        start = hdr.header_length
        if start + len(body) + len(raw_name) > cs:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        saved = (hdr.backing_file_offset, hdr.backing_file_size, hdr.autoclear)
        hdr.backing_file_offset = start + len(body) if raw_name else 0
        hdr.backing_file_size = len(raw_name)
        if hdr.version >= 3:
            hdr.autoclear = autoclear
        fixed = fmt.header_field_bytes(hdr)
        tail = bytes(body) + raw_name
        end = max(start + len(tail), old_end)
        cluster0[: len(fixed)] = fixed
        cluster0[start:end] = tail + bytes(end - start - len(tail))
        try:
            await self.meta.write_header_field(0, bytes(cluster0[:end]))
        except BaseException:
            hdr.backing_file_offset, hdr.backing_file_size, hdr.autoclear = saved
            raise
        hdr.extensions = exts

    # --- persistent dirty bitmaps ---------------------------------------------------------

    def check_can_store_bitmap(self, name: str, granularity: int) -> None:
        bitmaps.check_can_store(self, name, granularity)

    async def remove_stored_bitmap(self, name: str) -> None:
        try:
            await bitmaps.remove(self, name)
        except Corruption as err:
            raise await self.signal_corruption(err) from err
        except OSError as err:
            raise QmpError(_error_text(err)) from err

    def snapshot_table_offset(self) -> tuple[int, int]:
        hdr = self.hdr
        assert hdr is not None
        return hdr.snapshots_offset, self._snapshot_table_size


def _error_text(err: OSError | Corruption) -> str:
    """What a failed bitmap store or removal says: the text qsd's words were put in
    (bitmaps.py), else the errno's text."""
    if isinstance(err, Corruption):
        return str(err)
    return err.strerror or strerror(err)


__all__ = ["EVENT_SINK", "OL_SNAPSHOT_TABLE", "Qcow2Driver", "set_event_sink"]
