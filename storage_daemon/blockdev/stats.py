"""Per-node I/O accounting for query-blockstats (domain ring, no I/O of its own).

Counters are plain integers updated by the generic I/O path (`io.py`) at every node a request
passes through (an export's write on raw counts on raw and on its file). qsd 7.2 itself shows
only `wr_highest_offset` per node; its other counters stay 0 there (QEMU's device models
account, NBD exports do not), so query-blockstats decides which of these it reports.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class IoStats:
    rd_bytes: int = 0
    wr_bytes: int = 0
    unmap_bytes: int = 0
    rd_operations: int = 0
    wr_operations: int = 0
    flush_operations: int = 0
    unmap_operations: int = 0
    failed_rd_operations: int = 0
    failed_wr_operations: int = 0
    failed_flush_operations: int = 0
    failed_unmap_operations: int = 0
    invalid_rd_operations: int = 0
    invalid_wr_operations: int = 0
    invalid_flush_operations: int = 0
    invalid_unmap_operations: int = 0
    rd_total_time_ns: int = 0
    wr_total_time_ns: int = 0
    flush_total_time_ns: int = 0
    unmap_total_time_ns: int = 0
    wr_highest_offset: int = 0
