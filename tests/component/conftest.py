"""Fixtures of the component ring: an in-process daemon, shut down whatever the test did."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from storage_daemon.daemon import Daemon


@pytest.fixture
async def daemon() -> AsyncIterator[Daemon]:
    d = Daemon()
    try:
        yield d
    finally:
        await d.shutdown()
