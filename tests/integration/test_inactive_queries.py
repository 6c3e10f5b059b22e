"""Queries stay fast while another monitor's command waits on slow storage (daemon subprocess).

A qcow2 open over a null-aio node with 2 s of latency keeps monitor A waiting on I/O; monitor B's
query-version, query-named-block-nodes and x-query-block-node (on the slow node itself) must
answer as fast as when the daemon is idle (within 10 ms), before A's answer arrives.
"""

from __future__ import annotations

import statistics
import time
from pathlib import Path

from tests.integration.daemon import RawQmp, monitor_args, ours_command, running_daemon

LATENCY_NS = 2_000_000_000


def _rtt(qmp: RawQmp, name: str, args: dict[str, str] | None = None) -> float:
    started = time.monotonic()
    reply = qmp.cmd(name, args)
    assert "return" in reply, reply
    return time.monotonic() - started


def test_queries_do_not_wait_for_slow_storage(scratch: Path) -> None:
    second = scratch / "qmp2.sock"
    args = [
        *monitor_args(second, "qmp1"),
        "--blockdev",
        f"null-aio,node-name=slow,size=1048576,latency-ns={LATENCY_NS}",
    ]
    with running_daemon(ours_command(), args, scratch) as daemon:
        a = daemon.connect_qmp()
        assert "return" in a.negotiate()
        b = RawQmp.connect(second)
        try:
            assert "return" in b.negotiate()
            baseline = [_rtt(b, "query-version") for _ in range(10)]
            started = time.monotonic()
            a.send_json(
                {
                    "execute": "blockdev-add",
                    "arguments": {"driver": "qcow2", "node-name": "q", "file": "slow"},
                }
            )
            during = []
            for _ in range(5):
                during.append(_rtt(b, "query-version"))
                during.append(_rtt(b, "query-named-block-nodes"))
                during.append(_rtt(b, "x-query-block-node", {"node-name": "slow"}))
            answered_b = time.monotonic() - started
            reply = a.recv_reply(timeout=10)
            answered_a = time.monotonic() - started
        finally:
            b.close()
            a.close()
    # A really waited on the slow node (it reads the header), and B was done long before.
    assert reply["error"]["desc"] == "Image is not in qcow2 format"
    assert answered_a >= LATENCY_NS / 1e9 * 0.9
    assert answered_b < answered_a / 2
    assert max(during) < max(baseline) + 0.010, (statistics.median(baseline), during)
