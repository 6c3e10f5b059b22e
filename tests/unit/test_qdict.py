"""QEMU's dict order, checked against key orders seen in qsd 7.2's own replies."""

from __future__ import annotations

import json

from hypothesis import given
from hypothesis import strategies as st

from storage_daemon.qdict import ghash_order, qdict_order, qdict_ordered

# (insertion order, order qsd printed it) from replies recorded in shared/reference/qsd-7.2/.
# Insertion order is the schema's member order; it matters only for keys sharing a bucket.
INSERTED_PRINTED = [
    (["major", "minor", "micro"], ["micro", "minor", "major"]),
]

# Key orders copied from replies recorded in shared/reference/qsd-7.2/qmp-errors.txt.
SEEN = [
    ["read-zeroes", "driver", "size"],
    ["no-flush", "direct", "writeback"],
    ["virtual-size", "filename", "format", "actual-size"],
    ["return", "id"],
    ["id", "error"],
    ["class", "desc"],
    ["timestamp", "event", "data"],
    [
        "iops_rd", "detect_zeroes", "image", "iops_wr", "ro", "node-name",
        "backing_file_depth", "drv", "iops", "bps_wr", "write_threshold", "encrypted",
        "bps", "bps_rd", "cache", "file",
    ],
]  # fmt: skip


def test_matches_orders_seen_on_qsd() -> None:
    for keys in SEEN:
        assert qdict_order(sorted(keys)) == keys
        assert qdict_order(list(reversed(keys))) == keys
    for inserted, printed in INSERTED_PRINTED:
        assert qdict_order(inserted) == printed


def test_nested_values_are_reordered() -> None:
    value = {"id": 1, "return": {"major": 7, "minor": 2, "micro": 22}}
    assert json.dumps(qdict_ordered(value)) == (
        '{"return": {"micro": 22, "minor": 2, "major": 7}, "id": 1}'
    )


@given(st.lists(st.text(min_size=1, max_size=12), unique=True, max_size=20))
def test_order_is_a_permutation_independent_of_distinct_bucket_inputs(keys: list[str]) -> None:
    ordered = qdict_order(keys)
    assert sorted(ordered) == sorted(keys)


def test_ghash_order_matches_qsd_leftover_report() -> None:
    # qsd answered "Parameter 'y' is unexpected" for query-version {"x": 1, "y": 2}.
    assert ghash_order(["x", "y"])[0] == "y"


@given(st.lists(st.text(min_size=1, max_size=8), unique=True, max_size=40))
def test_ghash_order_is_a_permutation(keys: list[str]) -> None:
    assert sorted(ghash_order(keys)) == sorted(keys)
