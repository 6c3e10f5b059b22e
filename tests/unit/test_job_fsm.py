"""The job state tables (fsm.py) and the rate limit: every pair checked, and the tables
checked against what qsd 7.2 was seen doing (reference traces and observed replies)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from storage_daemon.blockdev.jobs.fsm import (
    COMPLETED_STATES,
    READY_STATES,
    TRANSITIONS,
    VERBS,
    IllegalTransition,
    JobStatus,
    JobVerb,
    can_transition,
    check_transition,
    paused_state,
    verb_allowed,
    verb_refusal,
)
from storage_daemon.blockdev.jobs.job import RateLimit
from storage_daemon.qapi_generated import models

S = JobStatus
V = JobVerb
TRACE = Path("/work/shared/reference/qsd-7.2/jobs-trace.txt")

# QEMU's tables written as rows of 0/1 over (U, C, R, P, Y, S, W, D, X, E, N), a second,
# independent transcription that the dict form in fsm.py must agree with.
ORDER = [S.UNDEFINED, S.CREATED, S.RUNNING, S.PAUSED, S.READY, S.STANDBY, S.WAITING,
         S.PENDING, S.ABORTING, S.CONCLUDED, S.NULL]  # fmt: skip
ROWS = {
    S.UNDEFINED: "0 1 0 0 0 0 0 0 0 0 0",
    S.CREATED: "0 0 1 0 0 0 0 0 1 0 1",
    S.RUNNING: "0 0 0 1 1 0 1 0 1 0 0",
    S.PAUSED: "0 0 1 0 0 0 0 0 0 0 0",
    S.READY: "0 0 0 0 0 1 1 0 1 0 0",
    S.STANDBY: "0 0 0 0 1 0 0 0 0 0 0",
    S.WAITING: "0 0 0 0 0 0 0 1 1 0 0",
    S.PENDING: "0 0 0 0 0 0 0 0 1 1 0",
    S.ABORTING: "0 0 0 0 0 0 0 0 1 1 0",
    S.CONCLUDED: "0 0 0 0 0 0 0 0 0 0 1",
    S.NULL: "0 0 0 0 0 0 0 0 0 0 0",
}
VERB_ROWS = {
    V.CANCEL: "0 1 1 1 1 1 1 1 0 0 0",
    V.PAUSE: "0 1 1 1 1 1 0 0 0 0 0",
    V.RESUME: "0 1 1 1 1 1 0 0 0 0 0",
    V.SET_SPEED: "0 1 1 1 1 1 0 0 0 0 0",
    V.COMPLETE: "0 0 0 0 1 1 0 0 0 0 0",
    V.FINALIZE: "0 0 0 0 0 0 0 1 0 0 0",
    V.DISMISS: "0 0 0 0 0 0 0 0 0 1 0",
    V.CHANGE: "0 1 1 1 1 1 0 0 0 0 0",
}

# Replies seen on qsd 7.2 (mirror/stream/create jobs driven into each state): verb -> state
# -> accepted. "resume" is absent: qsd checks "was it paused" before the table.
OBSERVED_VERBS = [
    (V.COMPLETE, S.RUNNING, False),
    (V.FINALIZE, S.RUNNING, False),
    (V.DISMISS, S.RUNNING, False),
    (V.PAUSE, S.RUNNING, True),
    (V.CANCEL, S.PAUSED, True),
    (V.SET_SPEED, S.PAUSED, True),
    (V.PAUSE, S.READY, True),
    (V.COMPLETE, S.STANDBY, True),
    (V.CANCEL, S.STANDBY, True),
    (V.COMPLETE, S.PENDING, False),
    (V.PAUSE, S.PENDING, False),
    (V.SET_SPEED, S.PENDING, False),
    (V.CANCEL, S.PENDING, True),
    (V.FINALIZE, S.PENDING, True),
    (V.PAUSE, S.CONCLUDED, False),
    (V.CANCEL, S.CONCLUDED, False),
    (V.COMPLETE, S.CONCLUDED, False),
    (V.FINALIZE, S.CONCLUDED, False),
    (V.SET_SPEED, S.CONCLUDED, False),
    (V.DISMISS, S.CONCLUDED, True),
]
# Sequences seen on qsd 7.2 beyond the reference trace (pause/cancel/early failure).
OBSERVED_SEQUENCES = [
    ["created", "running", "paused", "running", "aborting", "concluded", "null"],
    ["created", "running", "ready", "standby", "ready", "waiting", "pending", "concluded"],
    ["created", "running", "ready", "standby", "ready", "aborting", "concluded", "null"],
    ["created", "running", "waiting", "pending", "aborting", "concluded", "null"],
    ["created", "running", "aborting", "concluded", "null"],
    ["created", "null"],
]


def _row(text: str) -> set[JobStatus]:
    return {state for state, bit in zip(ORDER, text.split(), strict=True) if bit == "1"}


def test_enums_match_the_schema() -> None:
    assert [s.value for s in JobStatus] == [m.value for m in models.JobStatus]
    assert set(TRANSITIONS) == set(JobStatus)
    assert set(VERBS) == set(JobVerb)


def test_tables_match_the_transcription() -> None:
    for state, row in ROWS.items():
        assert TRANSITIONS[state] == _row(row), state
    for verb, row in VERB_ROWS.items():
        assert VERBS[verb] == _row(row), verb


@given(st.sampled_from(list(JobStatus)), st.sampled_from(list(JobStatus)))
def test_every_transition_pair(old: JobStatus, new: JobStatus) -> None:
    legal = new in _row(ROWS[old])
    assert can_transition(old, new) is legal
    if legal:
        check_transition(old, new)
    else:
        with pytest.raises(IllegalTransition):
            check_transition(old, new)


@given(st.sampled_from(list(JobVerb)), st.sampled_from(list(JobStatus)), st.text(min_size=1))
def test_every_verb_pair(verb: JobVerb, state: JobStatus, job_id: str) -> None:
    legal = state in _row(VERB_ROWS[verb])
    assert verb_allowed(verb, state) is legal
    refusal = verb_refusal(job_id, state, verb)
    if legal:
        assert refusal is None
    else:
        assert refusal == (
            f"Job '{job_id}' in state '{state.value}' cannot accept command verb '{verb.value}'"
        )


def test_null_is_final_and_everything_but_undefined_is_reachable() -> None:
    assert TRANSITIONS[S.NULL] == frozenset()
    reached = {S.UNDEFINED}
    frontier = [S.UNDEFINED]
    while frontier:
        for nxt in TRANSITIONS[frontier.pop()]:
            if nxt not in reached:
                reached.add(nxt)
                frontier.append(nxt)
    assert reached == set(JobStatus)
    # From every state, NULL (the job's end) can still be reached.
    for start in JobStatus:
        seen, todo = {start}, [start]
        while todo:
            for nxt in TRANSITIONS[todo.pop()]:
                if nxt not in seen:
                    seen.add(nxt)
                    todo.append(nxt)
        assert S.NULL in seen or start is S.NULL


def test_derived_sets() -> None:
    assert paused_state(S.READY) is S.STANDBY
    assert paused_state(S.RUNNING) is S.PAUSED
    assert {S.READY, S.STANDBY} == READY_STATES
    assert {S.RUNNING, S.READY, S.PAUSED}.isdisjoint(COMPLETED_STATES)


def _trace_sequences() -> dict[str, list[list[str]]]:
    """JOB_STATUS_CHANGE statuses per job id in the reference trace (an id may be reused:
    each `null` ends one job)."""
    runs: dict[str, list[list[str]]] = {}
    for line in TRACE.read_text().splitlines():
        match = re.match(r"EVENT (.*)", line)
        if not match:
            continue
        event = json.loads(match[1])
        if event["event"] != "JOB_STATUS_CHANGE":
            continue
        job_runs = runs.setdefault(event["data"]["id"], [[]])
        if job_runs[-1] and job_runs[-1][-1] == "null":
            job_runs.append([])
        job_runs[-1].append(event["data"]["status"])
    return runs


def _assert_legal(sequence: list[str]) -> None:
    state = S.UNDEFINED
    for name in sequence:
        new = JobStatus(name)
        assert can_transition(state, new) and new is not state, (sequence, state, new)
        state = new


@pytest.mark.skipif(not TRACE.exists(), reason="reference trace missing")
def test_reference_trace_transitions_are_legal() -> None:
    runs = _trace_sequences()
    assert {"s0", "c0", "m0", "b0", "cr0"} <= set(runs)
    for job_runs in runs.values():
        for sequence in job_runs:
            _assert_legal(sequence)


@pytest.mark.parametrize("sequence", OBSERVED_SEQUENCES, ids=lambda s: "-".join(s))
def test_observed_sequences_are_legal(sequence: list[str]) -> None:
    _assert_legal(sequence)


@pytest.mark.parametrize(("verb", "state", "accepted"), OBSERVED_VERBS)
def test_observed_verb_replies(verb: JobVerb, state: JobStatus, accepted: bool) -> None:
    assert verb_allowed(verb, state) is accepted


# --- rate limit ---------------------------------------------------------------------------


def test_ratelimit_off_never_delays() -> None:
    limit = RateLimit()
    assert limit.delay_ns(1 << 40, 0) == 0
    limit.set_speed(0)
    assert limit.delay_ns(1 << 40, 5) == 0


def test_ratelimit_first_request_goes_at_once_then_waits_for_its_bytes() -> None:
    limit = RateLimit()
    limit.set_speed(1024)  # 102 bytes per 100 ms slice
    assert limit.slice_quota == 102
    now = 1_000_000_000
    assert limit.delay_ns(512 * 1024, now) > 0  # the chunk itself went out
    # The next request waits about 512 KiB / 1 KiB/s = 512 s.
    wait = limit.delay_ns(0, now)
    assert 500e9 < wait < 520e9
    assert limit.delay_ns(0, now + wait + 1) == 0


@given(
    speed=st.integers(min_value=1, max_value=1 << 30),
    chunks=st.lists(st.integers(min_value=1, max_value=1 << 22), min_size=1, max_size=30),
)
def test_ratelimit_keeps_the_average_below_the_speed(speed: int, chunks: list[int]) -> None:
    """Sending each chunk as soon as allowed never beats speed (one slice of slack)."""
    limit = RateLimit()
    limit.set_speed(speed)
    now = start = 10**12
    for size in chunks:
        now += limit.delay_ns(0, now)
        limit.delay_ns(size, now)
    now += limit.delay_ns(0, now)
    sent = sum(chunks)
    elapsed = now - start
    quota = limit.slice_quota
    assert sent <= (elapsed / limit.slice_ns + 1) * quota + max(chunks)
