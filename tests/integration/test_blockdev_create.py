"""blockdev-create of a file through a real monitor: the wire order of events and replies,
query-jobs, the image on disk, and qemu-img's view of it.

Every daemon is started through tests/integration/daemon.py and stopped by PID.
"""

from __future__ import annotations

import contextlib
import json
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest

from tests.integration.daemon import RawQmp, ours_command, running_daemon


def mark(client: RawQmp) -> int:
    """Start a new observation: forget events already read."""
    client.events.clear()
    return len(client.raw_lines)


def wire_sequence(client: RawQmp, lines_before: int) -> list[str]:
    """What came over the wire since `lines_before`: statuses, event names and 'return'."""
    out: list[str] = []
    for line in client.raw_lines[lines_before:]:
        message = json.loads(line)
        if message.get("event") == "JOB_STATUS_CHANGE":
            out.append(message["data"]["status"])
        elif "event" in message:
            out.append(message["event"])
        elif "return" in message:
            out.append("return")
        else:
            out.append("error")
    return out


def wait_status(client: RawQmp, status: str) -> None:
    while True:
        event = client.wait_event("JOB_STATUS_CHANGE")
        if event["data"]["status"] == status:
            return


def create(client: RawQmp, job_id: str, **options: Any) -> dict[str, Any]:
    return client.cmd(
        "blockdev-create", {"job-id": job_id, "options": {"driver": "file", **options}}
    )


def test_create_file_events_query_and_image(scratch: Path) -> None:
    image = scratch / "new.raw"
    with contextlib.ExitStack() as stack:
        daemon = stack.enter_context(running_daemon(ours_command(), [], scratch))
        client = stack.enter_context(daemon.connect_qmp())
        assert client.negotiate() == {"return": {}}
        start = mark(client)
        assert create(client, "cr0", filename=str(image), size=1 << 20) == {"return": {}}
        wait_status(client, "concluded")
        # created/running are written before the reply, the rest after it, as qsd does.
        assert wire_sequence(client, start) == [
            "created", "running", "return", "waiting", "pending", "concluded",
        ]  # fmt: skip
        assert client.cmd("query-jobs") == {
            "return": [
                {"id": "cr0", "type": "create", "status": "concluded",
                 "current-progress": 1, "total-progress": 1}
            ]
        }  # fmt: skip
        assert client.cmd("query-block-jobs") == {"return": []}
        start = mark(client)
        assert client.cmd("job-dismiss", {"id": "cr0"}) == {"return": {}}
        assert wire_sequence(client, start) == ["null", "return"]
        assert client.cmd("query-jobs") == {"return": []}
        # The new file opens as a node of the right size.
        added = client.cmd(
            "blockdev-add", {"driver": "file", "node-name": "f", "filename": str(image)}
        )
        assert added == {"return": {}}
    assert image.stat().st_size == 1 << 20
    if shutil.which("qemu-img"):
        info = json.loads(
            subprocess.run(
                ["qemu-img", "info", "--output=json", str(image)],
                check=True, capture_output=True, timeout=30,
            ).stdout
        )  # fmt: skip
        assert (info["format"], info["virtual-size"]) == ("raw", 1 << 20)


def test_create_failures_keep_qsd_order_and_texts(scratch: Path) -> None:
    with contextlib.ExitStack() as stack:
        daemon = stack.enter_context(running_daemon(ours_command(), [], scratch))
        client = stack.enter_context(daemon.connect_qmp())
        client.negotiate()
        # Fails before qsd's first wait: every event precedes the reply.
        start = mark(client)
        assert create(client, "e1", filename=str(scratch / "no" / "x"), size=1) == {"return": {}}
        assert wire_sequence(client, start) == [
            "created", "running", "aborting", "concluded", "return",
        ]  # fmt: skip
        # Fails after it: the reply comes first.
        start = mark(client)
        reply = create(client, "e2", filename=str(scratch / "m"), size=1, preallocation="metadata")
        assert reply == {"return": {}}
        wait_status(client, "concluded")
        assert wire_sequence(client, start) == [
            "created",
            "running",
            "return",
            "aborting",
            "concluded",
        ]
        errors = {job["id"]: job.get("error") for job in client.cmd("query-jobs")["return"]}
        assert errors == {
            "e1": f"Could not create '{scratch}/no/x': No such file or directory",
            "e2": "Unsupported preallocation mode: metadata",
        }
        assert create(client, "e1", filename=str(scratch / "y"), size=1)["error"] == {
            "class": "GenericError",
            "desc": "Job ID 'e1' already in use",
        }
        assert (
            client.cmd("blockdev-create", {"job-id": "n", "options": {"driver": "null-co"}})[
                "error"
            ]["desc"]
            == "Driver does not support blockdev-create"
        )


@pytest.mark.parametrize(
    ("size", "prealloc", "length"),
    [(5, "off", 512), (5, "falloc", 512), (5, "full", 5), (100000, "off", 100000), (0, "off", 0)],
)
def test_created_file_layout(scratch: Path, size: int, prealloc: str, length: int) -> None:
    """qsd zero-fills the first block of a new file, which makes tiny files 512 bytes long."""
    image = scratch / "img"
    with contextlib.ExitStack() as stack:
        daemon = stack.enter_context(running_daemon(ours_command(), [], scratch))
        client = stack.enter_context(daemon.connect_qmp())
        client.negotiate()
        create(client, "c", filename=str(image), size=size, preallocation=prealloc)
        wait_status(client, "concluded")
        assert "error" not in client.cmd("query-jobs")["return"][0]
    assert image.stat().st_size == length
