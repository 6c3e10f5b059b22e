"""drive-mirror's target: the image file is created (or opened) before the job exists.

Domain ring (image creation runs the drivers' creators, which use the thread pool). Follows
qsd's qmp_drive_mirror: mode absolute-paths (the default) creates an image in the source's
format (or `format`), recording the source's backing file for sync=top and the source itself
for sync=none; mode existing opens what is there. Invariant: the node returned is not
monitor-owned, so it is closed again once the job and nobody else uses it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, cast

from storage_daemon.blockdev import chain
from storage_daemon.blockdev.jobs.mirror import wire
from storage_daemon.errors import QmpError

if TYPE_CHECKING:
    from storage_daemon.blockdev.jobs.create import CreateJob
    from storage_daemon.blockdev.node import BlockNode
    from storage_daemon.daemon import Daemon


class _InlineCreation:
    """Stands in for a CreateJob: the image is created inside the command."""

    def __init__(self, graph: Any) -> None:
        self.graph = graph

    def release_start(self) -> None:
        pass


def _opts(value: str) -> str:
    return value.replace(",", ",,")  # QemuOpts printing doubles commas inside values


async def create_image(
    daemon: Daemon, filename: str, fmt: str, size: int, backing: BlockNode | None
) -> None:
    """qsd's bdrv_img_create for drive-mirror (it prints the same "Formatting" line)."""
    from storage_daemon.blockdev.drivers import DRIVERS
    from storage_daemon.blockdev.jobs.create import creator_for
    from storage_daemon.qapi.runtime import visit_input

    if fmt not in DRIVERS:
        raise QmpError(f"Unknown file format '{fmt}'")
    job = cast("CreateJob", _InlineCreation(daemon.graph))
    if fmt == "raw":
        if backing is not None:
            raise QmpError(f"Backing file not supported for file format '{fmt}'")
        print(f"Formatting '{filename}', fmt=raw size={size}", flush=True)
        options = visit_input(
            "BlockdevCreateOptions", {"driver": "file", "filename": filename, "size": size}
        )
        await creator_for("file")(job, options)
        return
    if fmt != "qcow2":
        raise QmpError(f"Format driver '{fmt}' does not support image creation")
    line = (
        f"Formatting '{filename}', fmt=qcow2 cluster_size=65536 extended_l2=off "
        f"compression_type=zlib size={size} "
    )
    spec: dict[str, Any] = {
        "driver": "qcow2",
        "file": {"driver": "file", "filename": filename},
        "size": size,
    }
    if backing is not None:
        name, backing_fmt = chain.backing_name_for(backing)
        if name is None:
            raise QmpError("Expected backing file name, got empty string")
        spec["backing-file"] = name
        line += f"backing_file={_opts(name)} "
        if backing_fmt is not None:
            spec["backing-fmt"] = backing_fmt
            line += f"backing_fmt={_opts(backing_fmt)} "
    print(line + "lazy_refcounts=off refcount_bits=16", flush=True)
    file_options = visit_input(
        "BlockdevCreateOptions", {"driver": "file", "filename": filename, "size": 0}
    )
    await creator_for("file")(job, file_options)
    await creator_for("qcow2")(job, visit_input("BlockdevCreateOptions", spec))


async def open_drive_target(
    daemon: Daemon, source: BlockNode, args: Any
) -> tuple[BlockNode, bool, BlockNode | None]:
    """(the target node, whether the job must write zeroes where the source has none, the
    node to make the target's backing when the job succeeds)."""
    from storage_daemon.blockdev.drivers import DRIVERS
    from storage_daemon.qapi.runtime import visit_input

    mode = wire(args.mode) or "absolute-paths"
    sync = wire(args.sync)
    fmt: str | None = args.format
    if fmt is None and mode != "existing":
        fmt = source.driver.format_name()
    unfiltered = chain.skip_filters(source) or source
    backing = chain.below(unfiltered)
    if backing is None and sync == "top":
        sync = "full"
    if sync == "none":
        backing = source
    if args.replaces is not None and args.node_name is None:
        raise QmpError("a node-name must be provided when replacing a named node of the graph")
    size = source.driver.getlength()
    new_backing = None if sync == "full" else backing
    if mode != "existing":
        assert fmt is not None
        await create_image(daemon, args.target, fmt, size, new_backing)
    driver = fmt or "raw"
    if driver not in DRIVERS:
        raise QmpError(f"Unknown driver '{driver}'")
    options: dict[str, Any] = {
        "driver": driver,
        "file": {"driver": "file", "filename": args.target},
    }
    if args.node_name is not None:
        options["node-name"] = args.node_name
    if DRIVERS[driver].supports_backing:
        options["backing"] = None  # mirroring copies what the source's backing holds
    target = await daemon.graph.add(visit_input("BlockdevOptions", options), monitor_owned=False)
    zero_target = sync == "full" and mode == "existing"
    return target, zero_target, new_backing if mode != "existing" else None
