"""The order of a transaction's phases (prepare / commit / abort / clean), with stand-in
actions: qsd's rules, including abort of the failing action itself and clean of everything
that was prepared, whatever the outcome.
"""

from __future__ import annotations

from collections.abc import Iterator
from types import SimpleNamespace
from typing import Any, ClassVar

import pytest
from hypothesis import given
from hypothesis import strategies as st

from storage_daemon.blockdev import transaction as txn
from storage_daemon.blockdev.jobs.job import JobTxn
from storage_daemon.errors import QmpError


class Recorder(txn.Action):
    """Records its phases in the context's shared log; fails `prepare` if told to."""

    kind: ClassVar[str] = "test-record"
    supports_grouped = True

    async def prepare(self) -> None:
        self.ctx.trace.append(("did-prepare", self.data["name"]))
        if self.data.get("fail"):
            raise QmpError(f"{self.data['name']} refused")

    async def commit(self) -> None:
        self.ctx.trace.append(("did-commit", self.data["name"]))

    async def abort(self) -> None:
        self.ctx.trace.append(("did-abort", self.data["name"]))
        if self.data.get("abort_raises"):
            raise RuntimeError("undo failed")

    async def clean(self) -> None:
        self.ctx.trace.append(("did-clean", self.data["name"]))


class NoGroup(Recorder):
    kind: ClassVar[str] = "test-nogroup"
    supports_grouped = False

    async def prepare(self) -> None:
        self.check_completion_mode()
        await super().prepare()


@pytest.fixture(autouse=True)
def registered() -> Iterator[None]:
    txn.action_class("abort")  # the real actions are registered before the snapshot below
    txn._load_actions()
    saved = dict(txn.ACTIONS)
    txn.register_action(Recorder)
    txn.register_action(NoGroup)
    yield
    txn.ACTIONS.clear()
    txn.ACTIONS.update(saved)


# The phases need no daemon: only its (empty) graph, which the drain of every node visits.
NO_DAEMON = SimpleNamespace(graph=[])


def did(ctx: txn.TransactionContext) -> list[tuple[str, str]]:
    return [(phase[4:], name) for phase, name in ctx.trace if phase.startswith("did-")]


def act(name: str, **kw: Any) -> tuple[str, dict[str, Any]]:
    return ("test-record", {"name": name, **kw})


async def test_success_prepares_all_then_commits_then_cleans() -> None:
    ctx = txn.TransactionContext(daemon=NO_DAEMON)  # type: ignore[arg-type]
    await txn.run_transaction(ctx.daemon, [act("a"), act("b"), act("c")], ctx=ctx)
    assert did(ctx) == [
        ("prepare", "a"), ("prepare", "b"), ("prepare", "c"),
        ("commit", "a"), ("commit", "b"), ("commit", "c"),
        ("clean", "a"), ("clean", "b"), ("clean", "c"),
    ]  # fmt: skip


async def test_failure_aborts_in_reverse_including_the_failing_action() -> None:
    ctx = txn.TransactionContext(daemon=NO_DAEMON)  # type: ignore[arg-type]
    with pytest.raises(QmpError, match="b refused"):
        await txn.run_transaction(ctx.daemon, [act("a"), act("b", fail=True), act("c")], ctx=ctx)
    # "c" is never even prepared; "b" gets its abort and clean although its prepare failed.
    assert did(ctx) == [
        ("prepare", "a"), ("prepare", "b"),
        ("abort", "b"), ("abort", "a"),
        ("clean", "a"), ("clean", "b"),
    ]  # fmt: skip


async def test_a_failing_undo_does_not_hide_the_error_nor_stop_the_others() -> None:
    ctx = txn.TransactionContext(daemon=NO_DAEMON)  # type: ignore[arg-type]
    with pytest.raises(QmpError, match="c refused"):
        await txn.run_transaction(
            ctx.daemon,
            [act("a"), act("b", abort_raises=True), act("c", fail=True)],
            ctx=ctx,
        )
    assert [name for phase, name in did(ctx) if phase == "abort"] == ["c", "b", "a"]
    assert [name for phase, name in did(ctx) if phase == "clean"] == ["a", "b", "c"]


async def test_abort_action_rolls_everything_back() -> None:
    ctx = txn.TransactionContext(daemon=NO_DAEMON)  # type: ignore[arg-type]
    with pytest.raises(QmpError, match=r"^Transaction aborted using Abort action$"):
        await txn.run_transaction(ctx.daemon, [act("a"), ("abort", None), act("b")], ctx=ctx)
    assert did(ctx) == [("prepare", "a"), ("abort", "a"), ("clean", "a")]


async def test_empty_transaction_succeeds() -> None:
    ctx = txn.TransactionContext(daemon=NO_DAEMON)  # type: ignore[arg-type]
    await txn.run_transaction(ctx.daemon, [], ctx=ctx)
    assert ctx.trace == []


async def test_grouped_mode_shares_one_job_txn_and_refuses_actions_without_jobs() -> None:
    ctx = txn.TransactionContext(daemon=NO_DAEMON, completion_mode=txn.GROUPED)  # type: ignore[arg-type]
    await txn.run_transaction(ctx.daemon, [act("a")], ctx=ctx)
    assert isinstance(ctx.job_txn, JobTxn)
    ctx = txn.TransactionContext(daemon=NO_DAEMON, completion_mode=txn.GROUPED)  # type: ignore[arg-type]
    with pytest.raises(QmpError) as info:
        await txn.run_transaction(ctx.daemon, [act("a"), ("test-nogroup", {"name": "n"})], ctx=ctx)
    assert info.value.desc == (
        "Action 'test-nogroup' does not support Transaction property completion-mode = grouped"
    )
    assert did(ctx) == [("prepare", "a"), ("abort", "n"), ("abort", "a"), ("clean", "a"),
                        ("clean", "n")]  # fmt: skip
    ctx = txn.TransactionContext(daemon=NO_DAEMON)  # type: ignore[arg-type]
    await txn.run_transaction(ctx.daemon, [("test-nogroup", {"name": "n"})], ctx=ctx)
    assert ctx.job_txn is None


async def test_abort_action_ignores_the_completion_mode() -> None:
    ctx = txn.TransactionContext(daemon=NO_DAEMON, completion_mode=txn.GROUPED)  # type: ignore[arg-type]
    with pytest.raises(QmpError, match=r"^Transaction aborted using Abort action$"):
        await txn.run_transaction(ctx.daemon, [("abort", None)], ctx=ctx)


def test_every_schema_action_kind_has_an_action() -> None:
    from storage_daemon.qapi_generated.types import TYPES

    kinds = TYPES["TransactionActionKind"].values
    for kind in kinds:
        assert txn.action_class(kind).kind == kind


@given(
    n=st.integers(min_value=0, max_value=6),
    fail_at=st.one_of(st.none(), st.integers(min_value=0, max_value=5)),
)
async def test_phase_rules_hold_for_any_failure_point(n: int, fail_at: int | None) -> None:
    names = [str(i) for i in range(n)]
    actions = [act(name, fail=(i == fail_at)) for i, name in enumerate(names)]
    ctx = txn.TransactionContext(daemon=NO_DAEMON)  # type: ignore[arg-type]
    failed = fail_at is not None and fail_at < n
    if failed:
        with pytest.raises(QmpError):
            await txn.run_transaction(ctx.daemon, actions, ctx=ctx)
    else:
        await txn.run_transaction(ctx.daemon, actions, ctx=ctx)
    log = did(ctx)
    prepared = names[: fail_at + 1] if failed and fail_at is not None else names
    assert [x for p, x in log if p == "prepare"] == prepared
    assert [x for p, x in log if p == "abort"] == (list(reversed(prepared)) if failed else [])
    assert [x for p, x in log if p == "commit"] == ([] if failed else names)
    assert [x for p, x in log if p == "clean"] == prepared
    # Every clean comes after every commit and abort.
    last_undo_or_commit = max(
        (i for i, (p, _) in enumerate(log) if p in ("commit", "abort")), default=-1
    )
    first_clean = min((i for i, (p, _) in enumerate(log) if p == "clean"), default=len(log))
    assert last_undo_or_commit < first_clean


def test_internal_snapshot_action_is_in_the_schema() -> None:
    """qsd 7.2's blockdev-snapshot-internal-sync action: the schema checks its data like the
    command's (device and name required)."""
    from storage_daemon.qapi.runtime import command_args

    kind = "blockdev-snapshot-internal-sync"
    command_args("transaction", {"actions": [{"type": kind, "data": {"device": "d", "name": "n"}}]})
    with pytest.raises(QmpError) as info:
        command_args("transaction", {"actions": [{"type": kind, "data": {"device": "d"}}]})
    assert "name" in info.value.desc
