"""block-set-write-threshold, x-blockdev-set-iothread and blockdev-reopen on the reference qsd
and on ours: replies, events and the graph compared live.

Test ring (compat). The write-threshold case writes through an NBD export with qemu-io between
commands; each test starts a fresh pair of daemons, stopped by PID at teardown.
"""

from __future__ import annotations

import subprocess
from pathlib import Path
from typing import Any

import pytest

from tests.compat.harness import (
    Cmd,
    Compat,
    diff_text,
    normalise_transcript,
    qemu_io_nbd,
    raw_image,
    without_10_0_members,
)

pytestmark = pytest.mark.compat


def _run(*argv: str) -> None:
    subprocess.run(argv, check=True, capture_output=True)


def make_chain(d: Path) -> None:
    """base.qcow2 (data in its first 64 KiB), top.qcow2 over it, other.qcow2, w.qcow2."""
    _run("qemu-img", "create", "-f", "qcow2", f"{d}/base.qcow2", "4M")
    _run("qemu-io", "-c", "write -P 7 0 64k", f"{d}/base.qcow2")
    _run("qemu-img", "create", "-f", "qcow2", "-b", "base.qcow2", "-F", "qcow2",
         f"{d}/top.qcow2", "4M")  # fmt: skip
    _run("qemu-img", "create", "-f", "qcow2", f"{d}/other.qcow2", "4M")
    _run("qemu-img", "create", "-f", "qcow2", f"{d}/w.qcow2", "1M")


def reopen(*options: dict[str, Any]) -> Cmd:
    return Cmd("blockdev-reopen", {"options": list(options)})


NODES = Cmd("query-named-block-nodes", {"flat": True}, sort_by="node-name")
NBD = ["--nbd-server", "addr.type=unix,addr.path=$D/nbd.sock"]


# -- block-set-write-threshold --------------------------------------------------------------

# (command, arguments) or ("qemu-io", command line for the export).
THRESHOLD_STEPS: list[tuple[str, Any]] = [
    ("block-set-write-threshold", {"node-name": "nosuch", "write-threshold": 1}),
    ("block-set-write-threshold", {"node-name": "r0", "write-threshold": 1000}),
    ("block-set-write-threshold", {"node-name": "f0", "write-threshold": 1000}),
    ("qemu-io", "write 0 1000"),  # ends at the threshold: nothing
    ("query-named-block-nodes", {"flat": True}),
    ("qemu-io", "write 2000 10"),  # both nodes, once each
    ("qemu-io", "write 3000 10"),  # disarmed
    ("block-set-write-threshold", {"node-name": "r0", "write-threshold": 1000}),
    ("qemu-io", "discard 0 4096"),  # discard=unmap: counts
    ("block-set-write-threshold", {"node-name": "r0", "write-threshold": 1000}),
    ("qemu-io", "write -z 0 4096"),
    ("block-set-write-threshold", {"node-name": "r0", "write-threshold": 4000}),
    ("qemu-io", "write 1048570 10"),  # outside the node: EIO, no event
    ("block-set-write-threshold", {"node-name": "r0", "write-threshold": -5}),
    ("query-named-block-nodes", {"flat": True}),
    ("block-set-write-threshold", {"node-name": "r0", "write-threshold": 1 << 63}),
    ("query-named-block-nodes", {"flat": True}),
    ("block-set-write-threshold", {"node-name": "r0", "write-threshold": 1 << 64}),
    ("block-set-write-threshold", {"node-name": "r0", "write-threshold": "1"}),
    ("block-set-write-threshold", {"node-name": "r0"}),
    ("block-set-write-threshold", {"node-name": "r0", "write-threshold": 0}),
    ("qemu-io", "write 5000 10"),
]


def test_write_threshold_through_nbd_writes(compat: Compat) -> None:
    args = [
        "--blockdev", "driver=file,filename=$D/r.raw,node-name=f0,discard=unmap",
        "--blockdev", "driver=raw,file=f0,node-name=r0,discard=unmap",
        *NBD,
        "--export", "type=nbd,id=e0,node-name=r0,writable=on",
    ]  # fmt: skip
    pair = compat.daemons(args, raw_image("r.raw"))
    out: dict[str, list[Any]] = {}
    for side, daemon in pair.items():
        client = compat.connect(daemon)
        client.negotiate()
        records: list[Any] = []
        for name, value in THRESHOLD_STEPS:
            if name == "qemu-io":
                records.append(qemu_io_nbd(daemon.workdir, "r0", value))
                records.append(client.cmd("query-version"))  # events sent before come first
                records.append({"events": client.events[:]})
                client.events.clear()
            else:
                reply = client.cmd(name, value)
                if name == "query-named-block-nodes" and "return" in reply:
                    reply["return"] = without_10_0_members(reply["return"])
                records.append(reply)
        out[side] = normalise_transcript(records, daemon.workdir)
    if out["ours"] != out["reference"]:
        raise AssertionError(diff_text(out["reference"], out["ours"]))


# -- x-blockdev-set-iothread ----------------------------------------------------------------


def test_set_iothread(compat: Compat) -> None:
    def bind(node: str, iothread: Any, **extra: Any) -> Cmd:
        return Cmd("x-blockdev-set-iothread", {"node-name": node, "iothread": iothread, **extra})

    compat.check_transcript(
        [
            bind("nosuch", "nosuch"),
            bind("n1", "nosuch"),
            bind("n1", "tg"),  # an object, but no iothread
            bind("n1", "io0"),
            bind("n1", "io0"),
            bind("n1", None),
            bind("n1", ""),
            bind("n0", "io0"),  # its parent r0 is exported: no BlockBackend on n0 itself
            bind("r0", "nosuch"),  # the export's refusal comes first
            bind("n2", "io0"),
            bind("n2", "io0", force=False),
            bind("n2", "io0", force=True),
            bind("n1", 5),
            Cmd("x-blockdev-set-iothread", {"node-name": "n1"}),
        ],
        args=[
            "--object",
            "iothread,id=io0",
            "--object",
            "throttle-group,id=tg",
            "--blockdev",
            "driver=null-co,node-name=n0",
            "--blockdev",
            "driver=raw,file=n0,node-name=r0",
            "--blockdev",
            "driver=null-co,node-name=n1",
            "--blockdev",
            "driver=null-co,node-name=n2",
            *NBD,
            "--export",
            "type=nbd,id=e0,node-name=n2",
            "--export",
            "type=nbd,id=e1,node-name=r0",
        ],
    )


# -- blockdev-reopen ------------------------------------------------------------------------

NULL_ARGS = [
    "--blockdev", "driver=null-co,node-name=n0",
    "--blockdev", "driver=null-co,node-name=n1,size=4096",
    "--blockdev", "driver=null-co,node-name=n2,discard=unmap",
]  # fmt: skip


def test_reopen_options_and_errors(compat: Compat) -> None:
    def null(name: str, **extra: Any) -> dict[str, Any]:
        return {"driver": "null-co", "node-name": name, **extra}

    compat.check_transcript(
        [
            reopen(null("nosuch")),
            reopen({"driver": "null-co"}),
            reopen({"driver": "null-aio", "node-name": "n0"}),
            reopen(null("n0", **{"read-only": True})),
            NODES,
            reopen(null("n0")),  # read-only back to its default
            reopen(null("n1")),
            reopen(null("n1", size=8192)),
            reopen(null("n1", size=4096, **{"read-zeroes": True})),
            reopen(null("n1", size=4096, **{"detect-zeroes": "unmap"})),
            reopen(null("n1", size=4096, **{"detect-zeroes": "on", "cache": {"direct": True}})),
            NODES,
            reopen(null("n1", size=4096, **{"force-share": True, "read-only": True})),
            reopen(null("n1", size=4096, **{"auto-read-only": True})),
            NODES,  # detect-zeroes and cache back to their defaults
            reopen(null("n2")),  # discard is kept when left out...
            reopen(null("n2", **{"detect-zeroes": "unmap"})),
            reopen(null("n2", discard="ignore")),
            reopen(null("n2", **{"detect-zeroes": "unmap"})),  # ...not when set to ignore
            # All or nothing: the first entry is not applied when the second fails.
            reopen(null("n0", **{"read-only": True}), null("n1", size=1)),
            reopen(null("n0", **{"read-only": True}), null("nosuch")),
            NODES,
            reopen(null("n0", **{"read-only": True}), null("n1", size=4096, **{"read-only": True})),
            NODES,
        ],
        args=NULL_ARGS,
    )


def test_reopen_backing_links(compat: Compat) -> None:
    def top(**extra: Any) -> dict[str, Any]:
        return {"driver": "qcow2", "node-name": "top", "file": "top-file", **extra}

    compat.check_transcript(
        [
            reopen(top()),  # the header names a backing file
            reopen({"driver": "qcow2", "node-name": "top"}),
            reopen(top(backing="nosuch")),
            reopen(top(backing={"driver": "null-co"})),
            reopen(top(file="nosuch", backing="other")),
            reopen(top(backing="top")),
            reopen(top(backing="other")),
            NODES,  # the implicit base nodes are gone
            reopen(top(backing=None)),
            NODES,
            reopen(top(backing="other", **{"l2-cache-size": 131072, "cache-size": 65536})),
            reopen(top(backing="other", **{"l2-cache-size": 65536, "cache-clean-interval": 5})),
            reopen(top(backing="other", **{"data-file": "other-file"})),
            reopen(top(backing="other", **{"read-only": True})),
            reopen(
                {"driver": "qcow2", "node-name": "other", "file": "other-file", "read-only": True}
            ),
            NODES,
            Cmd("x-debug-query-block-graph"),
        ],
        args=[
            "--blockdev",
            "driver=file,filename=$D/other.qcow2,node-name=other-file",
            "--blockdev",
            "driver=qcow2,file=other-file,node-name=other",
            "--blockdev",
            "driver=file,filename=$D/top.qcow2,node-name=top-file",
            "--blockdev",
            "driver=qcow2,file=top-file,node-name=top",
        ],
        setup=make_chain,
    )


def test_reopen_read_only_with_users(compat: Compat) -> None:
    file = {"driver": "file", "node-name": "wf", "filename": "$D/w.qcow2"}
    qcow2 = {"driver": "qcow2", "node-name": "w", "file": "wf"}

    def export(writable: bool) -> Cmd:
        return Cmd(
            "block-export-add",
            {"type": "nbd", "id": "e0", "node-name": "w", "writable": writable, "name": "w"},
        )

    compat.check_transcript(
        [
            export(True),
            reopen({**qcow2, "read-only": True}),
            reopen({**file, "read-only": True}),
            Cmd("block-export-del", {"id": "e0"}),
            reopen({**file, "read-only": True}, {**qcow2, "read-only": True}),
            NODES,
            export(True),
            reopen(qcow2),  # its file is read-only still
            reopen(file, qcow2),
            NODES,
            export(True),
            Cmd("block-export-del", {"id": "e0"}),
            reopen({**qcow2, "read-only": True}),
            reopen(qcow2),
            NODES,
        ],
        args=[
            "--blockdev",
            "driver=file,filename=$D/w.qcow2,node-name=wf",
            "--blockdev",
            "driver=qcow2,file=wf,node-name=w",
            *NBD,
        ],
        setup=make_chain,
    )


def test_reopen_inline_children(compat: Compat) -> None:
    """A child the node opened itself is reopened with the inline options given for it,
    inheriting read-only from its parent; a node-name reference would not be accepted."""
    file = {"driver": "file", "filename": "$D/w.qcow2"}

    def q(**extra: Any) -> dict[str, Any]:
        return {"driver": "qcow2", "node-name": "q", "file": file, **extra}

    compat.check_transcript(
        [
            reopen({"driver": "qcow2", "node-name": "q", "read-only": True}),
            reopen(q(**{"read-only": True})),
            NODES,
            reopen(q(file={**file, "read-only": True})),
            reopen(q(file={**file, "locking": "off"})),
            reopen(q(file={"driver": "null-co"})),
            reopen(q(file={"driver": "file"})),
            reopen(q()),
            NODES,
        ],
        args=["--blockdev", "driver=qcow2,node-name=q,file.driver=file,file.filename=$D/w.qcow2"],
        setup=make_chain,
    )
