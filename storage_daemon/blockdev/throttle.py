"""Throttle accounting: QEMU's leaky buckets with bursts, as pure arithmetic (pure ring).

Six buckets (bytes and operations; total, read, write) fill as requests are accounted and leak
at their average rate as time passes; a request waits while a relevant bucket holds more than
its size (avg/10 without a burst rate, max*burst_length with one, the burst bucket max/10).
Invariant: time comes in as `now_ns` arguments only; nothing here reads a clock.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from storage_daemon.errors import QmpError

NS_PER_SEC = 1_000_000_000
VALUE_MAX = 1_000_000_000_000_000
UINT_MAX = 0xFFFFFFFF

# Bucket names in QEMU's order; each has avg, max and burst length limits.
BUCKETS = ("bps-total", "bps-read", "bps-write", "iops-total", "iops-read", "iops-write")
LIMIT_KEYS: tuple[str, ...] = (
    *(
        f"{kind}-{direction}{suffix}"
        for kind in ("iops", "bps")
        for direction in ("total", "read", "write")
        for suffix in ("", "-max", "-max-length")
    ),
    "iops-size",
)


@dataclass
class LeakyBucket:
    avg: int = 0  # units per second; 0: no limit
    max: int = 0  # burst rate; 0: no burst
    burst_length: int = 1  # seconds the burst rate may last
    level: float = 0.0
    burst_level: float = 0.0

    def leak(self, delta_ns: int) -> None:
        self.level = max(self.level - self.avg * delta_ns / NS_PER_SEC, 0.0)
        if self.burst_length > 1:
            self.burst_level = max(self.burst_level - self.max * delta_ns / NS_PER_SEC, 0.0)

    def wait_ns(self) -> int:
        """How long until the bucket accepts another request (0: now)."""
        if not self.avg:
            return 0
        if not self.max:
            # Without a burst rate short bursts are still allowed (avg/10), or every other
            # request would wait.
            bucket_size = self.avg / 10
            burst_size = 0.0
        else:
            bucket_size = float(self.max * self.burst_length)
            burst_size = self.max / 10
        extra = self.level - bucket_size
        if extra > 0:
            return int(extra / self.avg * NS_PER_SEC)
        if self.burst_length > 1:
            extra = self.burst_level - burst_size
            if extra > 0:
                return int(extra / self.max * NS_PER_SEC)
        return 0

    def fill(self, amount: float) -> None:
        self.level += amount
        if self.burst_length > 1:
            self.burst_level += amount


@dataclass
class ThrottleConfig:
    """The limits of a throttle group; `limits()` is the ThrottleLimits wire form."""

    buckets: dict[str, LeakyBucket] = field(
        default_factory=lambda: {name: LeakyBucket() for name in BUCKETS}
    )
    op_size: int = 0

    def limits(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for key in LIMIT_KEYS:
            out[key] = self.get(key)
        return out

    def get(self, key: str) -> int:
        if key == "iops-size":
            return self.op_size
        name, attr = _split(key)
        bucket = self.buckets[name]
        return bucket.burst_length if attr == "burst_length" else getattr(bucket, attr)

    def set(self, key: str, value: int) -> None:
        if key == "iops-size":
            self.op_size = value
            return
        name, attr = _split(key)
        setattr(self.buckets[name], attr, value)

    def copy(self) -> ThrottleConfig:
        return ThrottleConfig(
            {n: LeakyBucket(b.avg, b.max, b.burst_length) for n, b in self.buckets.items()},
            self.op_size,
        )


def _split(key: str) -> tuple[str, str]:
    if key.endswith("-max-length"):
        return key.removesuffix("-max-length"), "burst_length"
    if key.endswith("-max"):
        return key.removesuffix("-max"), "max"
    if key in BUCKETS:
        return key, "avg"
    raise KeyError(key)


def apply_limits(cfg: ThrottleConfig, limits: Mapping[str, int | None]) -> None:
    """Set the members present in a ThrottleLimits value, with qsd's range checks."""
    for key in LIMIT_KEYS:
        value = limits.get(key)
        if value is None:
            continue
        if key.endswith("-max-length"):
            if not 0 <= value <= UINT_MAX:
                raise QmpError(f"{key} value must be in the range [0, {UINT_MAX}]")
        elif not 0 <= value <= VALUE_MAX:
            raise QmpError(f"bps/iops/max values must be within [0, {VALUE_MAX}]")
        cfg.set(key, value)


def check_valid(cfg: ThrottleConfig) -> None:
    """QEMU's throttle_is_valid, with its texts."""
    b = cfg.buckets
    for kind in ("bps", "iops"):
        total, read, write = b[f"{kind}-total"], b[f"{kind}-read"], b[f"{kind}-write"]
        if (total.avg and (read.avg or write.avg)) or (total.max and (read.max or write.max)):
            raise QmpError(
                "bps/iops/max total values and read/write values cannot be used at the same time"
            )
    if cfg.op_size and not (b["iops-total"].avg or b["iops-read"].avg or b["iops-write"].avg):
        raise QmpError("iops size requires an iops value to be set")
    for bucket in b.values():
        if bucket.avg > VALUE_MAX or bucket.max > VALUE_MAX:
            raise QmpError(f"bps/iops/max values must be within [0, {VALUE_MAX}]")
        if not bucket.burst_length:
            raise QmpError("the burst length cannot be 0")
        if bucket.burst_length > 1 and not bucket.max:
            raise QmpError("burst length set without burst rate")
        if bucket.max and bucket.burst_length > VALUE_MAX // bucket.max:
            raise QmpError("burst length too high for this burst rate")
        if bucket.max and not bucket.avg:
            raise QmpError("bps_max/iops_max require corresponding bps/iops values")
        if bucket.max and bucket.max < bucket.avg:
            raise QmpError("bps_max/iops_max cannot be lower than bps/iops")


_READ_BUCKETS = ("bps-total", "bps-read", "iops-total", "iops-read")
_WRITE_BUCKETS = ("bps-total", "bps-write", "iops-total", "iops-write")


class ThrottleState:
    """Bucket levels of one group under one config; the caller supplies the time."""

    def __init__(self, cfg: ThrottleConfig, now_ns: int) -> None:
        self.cfg = cfg.copy()
        self.previous_leak = now_ns

    def reconfigure(self, cfg: ThrottleConfig, now_ns: int) -> None:
        """New limits; QEMU starts the new buckets empty."""
        self.cfg = cfg.copy()
        self.previous_leak = now_ns

    def enabled(self) -> bool:
        return any(bucket.avg for bucket in self.cfg.buckets.values())

    def leak(self, now_ns: int) -> None:
        delta = now_ns - self.previous_leak
        if delta <= 0:
            return
        self.previous_leak = now_ns
        for bucket in self.cfg.buckets.values():
            bucket.leak(delta)

    def wait_ns(self, is_write: bool, now_ns: int) -> int:
        """Leak up to `now_ns`, then how long a request of this direction must wait."""
        self.leak(now_ns)
        names = _WRITE_BUCKETS if is_write else _READ_BUCKETS
        return max(self.cfg.buckets[name].wait_ns() for name in names)

    def account(self, is_write: bool, size: int) -> None:
        """Charge one request of `size` bytes."""
        op_size = self.cfg.op_size
        units = size / op_size if op_size and size > op_size else 1.0
        b = self.cfg.buckets
        direction = "write" if is_write else "read"
        b["bps-total"].fill(size)
        b[f"bps-{direction}"].fill(size)
        b["iops-total"].fill(units)
        b[f"iops-{direction}"].fill(units)
