"""The anonymous dirty bitmaps a backup keeps, as query-named-block-nodes lists them on the
reference qsd and on ours: block-copy's copy bitmap on the source, the copy-before-write
filter's done and access bitmaps on the filter, a sync bitmap's successor; their order among
the named ones, counts, granularity and flags, before and after guest writes and the job's end.
Test ring (compat); every daemon is stopped by PID at teardown.
"""

from __future__ import annotations

import subprocess
from pathlib import Path
from typing import Any

import pytest

from tests.compat.harness import Compat, all_of, diff_text, normalise_transcript, raw_image
from tests.compat.harness import qemu_io_nbd as qemu_io
from tests.integration.daemon import RawQmp

pytestmark = pytest.mark.compat

STATUS = "JOB_STATUS_CHANGE"
ARGS = [
    "--blockdev", "driver=file,filename=$D/a.raw,node-name=f0",
    "--blockdev", "driver=raw,file=f0,node-name=r0",
    "--blockdev", "driver=file,filename=$D/b.raw,node-name=fb",
    "--blockdev", "driver=raw,file=fb,node-name=tgt",
    "--nbd-server", "addr.type=unix,addr.path=$D/nbd.sock",
    "--export", "type=nbd,id=e0,node-name=r0,name=r0,writable=on",
]  # fmt: skip


def data_image(d: Path) -> None:
    subprocess.run(
        ["qemu-io", "-f", "raw", "-c", "write -P 7 0 3M", f"{d}/a.raw"],
        check=True,
        capture_output=True,
        timeout=60,
    )


# 4 MiB and a half cluster: the last granule of every bitmap is short.
SETUP = all_of(
    raw_image("a.raw", (4 << 20) + 32768), raw_image("b.raw", (4 << 20) + 32768), data_image
)


def wait_status(client: RawQmp, status: str) -> None:
    """Read messages until the job reaches `status` (every event stays in `events`)."""
    seen = 0
    while True:
        for event in client.events[seen:]:
            if event["event"] == STATUS and event["data"]["status"] == status:
                return
        seen = len(client.events)
        client.events.append(client.recv(30))


def bitmaps(client: RawQmp) -> dict[str, Any]:
    nodes = client.cmd("query-named-block-nodes", {"flat": True}).get("return", [])
    return {"bitmaps": [[n["node-name"], n.get("dirty-bitmaps")] for n in nodes]}


# (sync, bitmap or None, bitmap-mode or None)
CASES = [
    ("full", None, None),
    ("top", None, None),
    ("incremental", "b0", None),
    ("bitmap", "b0", "always"),
    ("full", "b0", "on-success"),
]


@pytest.mark.parametrize(("sync", "bitmap", "mode"), CASES)
def test_backup_anonymous_bitmaps(
    compat: Compat, sync: str, bitmap: str | None, mode: str | None
) -> None:
    pair = compat.daemons(ARGS, SETUP)
    out: dict[str, list[Any]] = {}
    for side, daemon in pair.items():
        client = compat.connect(daemon)
        client.negotiate()
        wd = daemon.workdir
        rec: list[Any] = [
            client.cmd("block-dirty-bitmap-add", {"node": "r0", "name": "b0", "granularity": 4096}),
            qemu_io(wd, "r0", "write 4096 512"),
            client.cmd("block-dirty-bitmap-add", {"node": "r0", "name": "b1"}),
            qemu_io(wd, "r0", "write 1M 300k"),
        ]
        backup: dict[str, Any] = {
            "device": "r0",
            "target": "tgt",
            "job-id": "j",
            "sync": sync,
            "auto-finalize": False,
        }
        if bitmap is not None:
            backup["bitmap"] = bitmap
        if mode is not None:
            backup["bitmap-mode"] = mode
        rec.append(client.cmd("blockdev-backup", backup))
        wait_status(client, "pending")
        rec.append(bitmaps(client))
        # Through the filter: one copy-before-write, clusters 32-33 done; the successor
        # records it.
        rec.append(qemu_io(wd, "r0", "write 2080k 64k"))
        rec.append(qemu_io(wd, "r0", "write 4M 4k"))
        rec.append(bitmaps(client))
        rec.append(client.cmd("job-finalize", {"id": "j"}))
        wait_status(client, "concluded")
        rec.append(bitmaps(client))
        rec.append(client.cmd("job-dismiss", {"id": "j"}))
        rec.append(bitmaps(client))
        out[side] = normalise_transcript(rec, wd)
    if out["ours"] != out["reference"]:
        raise AssertionError(diff_text(out["reference"], out["ours"]))


def test_fleecing_filter_bitmaps(compat: Compat) -> None:
    """A copy-before-write filter added by hand (fleecing), with and without a bitmap."""
    pair = compat.daemons(ARGS[:-2], SETUP)  # no export: a writer on r0 keeps snapshot-access out
    out: dict[str, list[Any]] = {}
    for side, daemon in pair.items():
        client = compat.connect(daemon)
        client.negotiate()
        wd = daemon.workdir
        export = {"type": "nbd", "id": "e0", "node-name": "r0", "name": "r0", "writable": True}
        rec: list[Any] = [
            client.cmd("block-dirty-bitmap-add", {"node": "r0", "name": "b0"}),
            client.cmd("block-export-add", export),
            qemu_io(wd, "r0", "write -P 0xcd 1M 128k"),
            client.cmd("block-export-del", {"id": "e0"}),
            client.wait_event("BLOCK_EXPORT_DELETED")["data"],
        ]
        for extra in ({}, {"bitmap": {"node": "r0", "name": "b0"}}):
            rec.append(
                client.cmd(
                    "blockdev-add",
                    {
                        "driver": "copy-before-write",
                        "node-name": "cbw",
                        "file": "r0",
                        "target": "tgt",
                        **extra,
                    },
                )
            )
            rec.append(bitmaps(client))
            # The snapshot reads what the filter's access bitmap allows (with a bitmap: only
            # its clusters).
            access = {"driver": "snapshot-access", "node-name": "acc", "file": "cbw"}
            rec.append(client.cmd("blockdev-add", access))
            export = {"type": "nbd", "id": "e1", "node-name": "acc", "name": "acc"}
            rec.append(client.cmd("block-export-add", export))
            rec.append(qemu_io(wd, "acc", "read -P 0 0 64k"))
            rec.append(qemu_io(wd, "acc", "read -P 0xcd 1M 64k"))
            rec.append(client.cmd("block-export-del", {"id": "e1"}))
            rec.append(client.wait_event("BLOCK_EXPORT_DELETED")["data"])
            rec.append(client.cmd("blockdev-del", {"node-name": "acc"}))
            rec.append(client.cmd("blockdev-del", {"node-name": "cbw"}))
            rec.append(bitmaps(client))
        out[side] = normalise_transcript(rec, wd)
    if out["ours"] != out["reference"]:
        raise AssertionError(diff_text(out["reference"], out["ours"]))
