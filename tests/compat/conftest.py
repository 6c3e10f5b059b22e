"""Fixtures for the compat tests: a `Compat` driver per test, skipped without the reference.

Test-support ring. Invariant: every daemon a test starts is stopped by PID at teardown, pass or
fail (Compat.close), and the scratch root is short enough for unix socket paths.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.compat.harness import Compat, ours_missing_reason, reference_missing_reason


@pytest.fixture
def compat() -> Iterator[Compat]:
    reason = reference_missing_reason() or ours_missing_reason()
    if reason is not None:
        pytest.skip(reason)
    driver = Compat()
    try:
        yield driver
    finally:
        driver.close()
