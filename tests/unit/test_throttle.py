"""Throttle accounting (pure): QEMU's leaky buckets, bursts, limits validation and texts."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from storage_daemon.blockdev.throttle import (
    LIMIT_KEYS,
    NS_PER_SEC,
    ThrottleConfig,
    ThrottleState,
    apply_limits,
    check_valid,
)
from storage_daemon.errors import QmpError


def config(**limits: int) -> ThrottleConfig:
    cfg = ThrottleConfig()
    apply_limits(cfg, {k.replace("_", "-"): v for k, v in limits.items()})
    check_valid(cfg)
    return cfg


def run(state: ThrottleState, is_write: bool, size: int, count: int, start: int = 0) -> int:
    """Submit `count` requests back to back, each waiting as long as told; the end time."""
    now = start
    for _ in range(count):
        while wait := state.wait_ns(is_write, now):
            now += wait
        state.account(is_write, size)
    return now


def test_defaults_and_wire_form() -> None:
    limits = ThrottleConfig().limits()
    assert list(limits) == list(LIMIT_KEYS)
    assert all(v == (1 if k.endswith("-max-length") else 0) for k, v in limits.items())


def test_no_limit_never_waits() -> None:
    state = ThrottleState(ThrottleConfig(), 0)
    assert run(state, False, 1 << 30, 100) == 0


def test_average_rate_without_burst_allows_a_tenth_of_a_second() -> None:
    state = ThrottleState(config(bps_total=1000), 0)
    state.account(False, 100)  # exactly the bucket size (avg/10): still no wait
    assert state.wait_ns(False, 0) == 0
    state.account(False, 50)
    assert state.wait_ns(True, 0) == 50 * NS_PER_SEC // 1000  # totals apply to both directions


def test_read_limit_does_not_slow_writes() -> None:
    state = ThrottleState(config(bps_read=1000), 0)
    state.account(False, 10_000)
    assert state.wait_ns(False, 0) > 0
    assert state.wait_ns(True, 0) == 0


def test_burst_allows_max_rate_for_burst_length() -> None:
    # 1000 B/s average, bursts at 10000 B/s for 2 s: the first 20000 bytes go at burst rate.
    state = ThrottleState(config(bps_total=1000, bps_total_max=10000, bps_total_max_length=2), 0)
    end = run(state, False, 100, 200)
    assert end < 2.2 * NS_PER_SEC
    # Beyond the burst, the average rate holds: the bucket (max * length = 20000 bytes) had
    # leaked `end` seconds at 1000 B/s, so 10000 more bytes take (10000 - end*1000)/1000 s.
    end2 = run(state, False, 100, 100, end)
    expected = (10_000 - end * 1000 / NS_PER_SEC) / 1000 * NS_PER_SEC
    assert abs((end2 - end) - expected) < 0.15 * NS_PER_SEC


def test_iops_size_counts_big_requests_as_several() -> None:
    state = ThrottleState(config(iops_total=10, iops_size=4096), 0)
    state.account(False, 4096 * 4)
    assert state.wait_ns(False, 0) == pytest.approx(3 * NS_PER_SEC // 10, abs=1)


@pytest.mark.parametrize(
    ("limits", "message"),
    [
        (
            {"bps-total": 1, "bps-read": 1},
            "bps/iops/max total values and read/write values cannot be used at the same time",
        ),
        ({"iops-size": 10}, "iops size requires an iops value to be set"),
        ({"bps-total-max": 10}, "bps_max/iops_max require corresponding bps/iops values"),
        ({"bps-total": 100, "bps-total-max": 10}, "bps_max/iops_max cannot be lower than bps/iops"),
        ({"bps-total-max-length": 0}, "the burst length cannot be 0"),
        ({"bps-total": 1, "bps-total-max-length": 5}, "burst length set without burst rate"),
        ({"bps-total": -1}, "bps/iops/max values must be within [0, 1000000000000000]"),
        ({"bps-total": 10**16}, "bps/iops/max values must be within [0, 1000000000000000]"),
        (
            {"bps-total-max-length": 1 << 32},
            "bps-total-max-length value must be in the range [0, 4294967295]",
        ),
        (
            {"bps-total": 10**15, "bps-total-max": 10**15, "bps-total-max-length": 2},
            "burst length too high for this burst rate",
        ),
    ],
)
def test_invalid_limits(limits: dict[str, int], message: str) -> None:
    with pytest.raises(QmpError) as info:
        cfg = ThrottleConfig()
        apply_limits(cfg, limits)
        check_valid(cfg)
    assert info.value.desc == message


@settings(max_examples=60, deadline=None)
@given(
    avg=st.integers(1, 10**7),
    burst=st.integers(0, 5),
    length=st.integers(1, 4),
    sizes=st.lists(st.integers(1, 1 << 20), min_size=5, max_size=60),
    gaps=st.lists(st.integers(0, NS_PER_SEC), min_size=5, max_size=60),
)
def test_long_run_rate_never_exceeds_limit_plus_bucket(
    avg: int, burst: int, length: int, sizes: list[int], gaps: list[int]
) -> None:
    """Whatever the arrival pattern, bytes let through by time t never exceed what the buckets
    allow: avg*t plus the bucket (and burst) capacity plus the one request admitted last."""
    mx = avg * burst if burst > 1 else 0
    limits = {"bps-total": avg}
    if mx:
        limits |= {"bps-total-max": mx, "bps-total-max-length": length}
    state = ThrottleState(config(**{k.replace("-", "_"): v for k, v in limits.items()}), 0)
    now = 0
    passed = 0
    capacity = (mx * length if mx else avg / 10) + max(sizes)
    for size, gap in zip(sizes, gaps, strict=False):
        now += gap
        while wait := state.wait_ns(False, now):
            assert wait > 0
            now += wait
        state.account(False, size)
        passed += size
        assert passed <= avg * now / NS_PER_SEC + capacity + 1


@settings(max_examples=40, deadline=None)
@given(avg=st.integers(1000, 10**6), size=st.integers(512, 65536))
def test_saturated_rate_converges_to_limit(avg: int, size: int) -> None:
    state = ThrottleState(config(bps_read=avg), 0)
    count = max(10, 20 * avg // size)
    end = run(state, False, size, count)
    rate = size * count / (end / NS_PER_SEC)
    assert rate <= avg * 1.15 + size
    assert rate >= avg * 0.85


def test_reconfigure_empties_buckets() -> None:
    state = ThrottleState(config(bps_total=1000), 0)
    state.account(False, 10_000)
    assert state.wait_ns(False, 0) > 0
    state.reconfigure(config(bps_total=10**9), 0)
    assert state.wait_ns(False, 0) == 0
