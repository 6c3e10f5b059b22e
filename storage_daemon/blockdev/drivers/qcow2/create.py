"""blockdev-create for qcow2: format an already open node (the `file` reference) as qcow2.

Domain ring: all writes go through `io.*` on an edge the job holds with WRITE and RESIZE
(as qsd's temporary backend does); preallocation falloc/full gives the data clusters (or the
external data file) disk space as qsd does. Invariant: the header is written last, after a
flush, so an interrupted create never leaves a header that points at unwritten tables;
failures qsd reports after it wrote an empty image (size limits, encryption) leave the same
empty image.
"""

from __future__ import annotations

import errno
from typing import TYPE_CHECKING, Any

from storage_daemon.blockdev import io
from storage_daemon.blockdev.backend import UnnamedBackend
from storage_daemon.blockdev.child import BdrvChild, ChildRole
from storage_daemon.blockdev.drivers.qcow2 import layout as lay
from storage_daemon.blockdev.jobs.create import CreateJob, register_creator
from storage_daemon.blockdev.perm import PERM_ALL, Perm
from storage_daemon.errors import QmpError

if TYPE_CHECKING:
    from storage_daemon.blockdev.graph import BlockGraph
    from storage_daemon.blockdev.node import BlockNode

_CHUNK = 1 << 20
_PERM = Perm.WRITE | Perm.RESIZE


def _wire(value: Any) -> Any:
    return getattr(value, "value", value)


async def _resolve(graph: BlockGraph, ref: Any, opened: list[BlockNode]) -> BlockNode:
    """A BlockdevRef: a node name, or inline options opened for the job's duration."""
    if isinstance(ref, str):
        return graph.lookup(ref)
    node = await graph.add(ref, monitor_owned=False)
    opened.append(node)
    return node


async def _write_zeroes_span(edge: BdrvChild, offset: int, length: int) -> None:
    zero = bytes(min(length, _CHUNK))
    pos = offset
    while pos < offset + length:
        n = min(_CHUNK, offset + length - pos)
        await io.pwrite(edge, pos, zero[:n])
        pos += n


async def preallocate(edge: BdrvChild, offset: int, length: int, mode: str) -> None:
    """Give `[offset, offset+length)` disk space as qsd's file driver does for new data:
    `falloc` allocates without writing (a fast zero write: unwritten extents), `full`
    writes zeroes. Where allocation is impossible, falloc writes zeroes too."""
    if mode not in ("falloc", "full") or length <= 0:
        return
    if mode == "falloc":
        try:
            await io.pwrite_zeroes(edge, offset, length, fast_only=True)
            return
        except OSError as err:
            if err.errno not in (errno.ENOTSUP, errno.EOPNOTSUPP):
                raise
    await _write_zeroes_span(edge, offset, length)


async def write_image(edge: BdrvChild, layout: lay.Layout, backing: bool = False) -> None:
    """Write every structure of `layout`, header last (after a flush). With `backing` (the
    image gets one afterwards), preallocated extended L2 entries leave every subcluster
    unallocated, so reads still come from the backing file (as qsd's)."""
    p = layout.params
    cb = p.cluster_bits
    # qsd's create backend writes past the end of the file; our job edge may not, so a
    # shorter file is grown first. A longer one keeps its length (its old tail is left,
    # unreferenced, as qsd leaves it): truncating it would shrink a node used as the file,
    # e.g. a qcow2 node, whose size its users see.
    if io.length(edge) < layout.file_length:
        await io.truncate(edge, layout.file_length)
    await io.pwrite(edge, layout.reftable_cluster << cb, lay.reftable_bytes(layout))
    for cluster, block in lay.refblocks(layout):
        await io.pwrite(edge, cluster << cb, block)
    if layout.l1_size:
        l1 = lay.l1_bytes(layout)
        for pos in range(0, len(l1), _CHUNK):
            await io.pwrite(edge, (layout.l1_cluster << cb) + pos, l1[pos : pos + _CHUNK])
    if layout.l2_tables:
        bitmap = 0 if p.backing_file or backing else (1 << 32) - 1
        for index in range(layout.l2_tables):
            table = lay.l2_table(layout, index, bitmap)
            await io.pwrite(edge, (layout.l2_cluster + index) << cb, table)
    if p.data_file is None and layout.data_clusters:
        await preallocate(
            edge, layout.data_cluster << cb, layout.data_clusters << cb, p.preallocation
        )
    await io.flush(edge)
    await io.pwrite(edge, 0, lay.header_cluster(layout))
    await io.flush(edge)


async def create_qcow2(job: CreateJob, options: Any) -> None:
    graph = job.graph
    if graph is None:
        raise QmpError("blockdev-create of qcow2 needs the block graph")
    opened: list[BlockNode] = []
    edges: list[BdrvChild] = []
    try:
        node = await _resolve(graph, options.file, opened)
        data_node = (
            await _resolve(graph, options.data_file, opened)
            if options.data_file is not None
            else None
        )
        try:
            params = lay.validate(
                size=options.size,
                version=_wire(options.version),
                cluster_size=options.cluster_size,
                refcount_bits=options.refcount_bits,
                lazy_refcounts=options.lazy_refcounts,
                extended_l2=options.extended_l2,
                compression_type=_wire(options.compression_type),
                backing_file=options.backing_file,
                backing_fmt=_wire(options.backing_fmt),
                has_data_file=data_node is not None,
                data_file_raw=options.data_file_raw,
                preallocation=_wire(options.preallocation),
            )
        except lay.CreateError as err:
            raise QmpError(str(err)) from err
        if data_node is not None:
            params = _with(params, data_file=data_node.filename())
        edge = graph.attach(UnnamedBackend(), node, "root", ChildRole.PRIMARY, _PERM, PERM_ALL)
        edges.append(edge)
        job.release_start()
        # qsd writes an empty image, grows it, then records the backing file; a failure
        # at one step leaves the image of the step before.
        bare = _with(params, backing_file=None, backing_fmt=None)
        empty = _with(bare, size=0, preallocation="off")
        await write_image(edge, lay.plan(empty))
        try:
            lay.check_length(params.size, params.cluster_bits, params.l2_entry_size)
            layout = lay.plan(params)
            if bare != empty:
                await write_image(edge, lay.plan(bare), backing=bool(params.backing_file))
            if params.backing_file:
                header = lay.header_cluster(layout)
                await io.pwrite(edge, 0, header)
                await io.flush(edge)
        except lay.CreateError as err:
            raise QmpError(str(err)) from err
        if options.encrypt is not None:
            secret = getattr(options.encrypt, "key_secret", None)
            if secret is None:
                raise QmpError("Parameter 'encrypt.key-secret' is required for cipher")
            # This daemon has no secret objects: qsd's answer for an unknown secret.
            raise QmpError(f"No secret with id '{secret}'")
        if data_node is not None:
            data_edge = graph.attach(
                UnnamedBackend(), data_node, "root", ChildRole.PRIMARY, _PERM, PERM_ALL
            )
            edges.append(data_edge)
            await io.truncate(data_edge, params.size)
            await preallocate(data_edge, 0, params.size, params.preallocation)
            await io.flush(data_edge)
    finally:
        for e in edges:
            graph.detach(e)
        for n in opened:
            await graph.remove(n)


def _with(p: lay.CreateParams, **changes: Any) -> lay.CreateParams:
    values = {name: getattr(p, name) for name in p.__dataclass_fields__}
    values.update(changes)
    return lay.CreateParams(**values)


register_creator("qcow2", create_qcow2)

__all__ = ["create_qcow2", "write_image"]
