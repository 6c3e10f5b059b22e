"""QEMU's job state machine as two tables: legal transitions and legal verbs per state.

Pure ring: no I/O, no asyncio. `Job._set_status()` and the verb checks of job.py consult these
tables and nothing else, so every state change and every refusal of the daemon is decided here.
Invariant: the tables are QEMU 7.2's (checked in tests against transitions observed on qsd).

Theory of operation
-------------------
A job is born CREATED (with an implicit pause, so a `job-pause` before it starts sticks) and
becomes RUNNING when started. While it works, pause requests park it at its next pause point:
RUNNING -> PAUSED -> RUNNING, or, once it declared itself READY (mirror, active commit),
READY -> STANDBY -> READY. When its work ends it waits (WAITING) for the other jobs of its
transaction, then goes PENDING; finalizing (automatic unless auto-finalize=false) commits or
aborts its effect and CONCLUDES it; dismissing (automatic unless auto-dismiss=false) makes it
NULL, after which it no longer exists. A failure or a cancel goes through ABORTING on the way to
CONCLUDED. A job that fails while being set up goes straight from CREATED to NULL. A transition
to the state a job is already in is legal only for ABORTING and emits no event.
"""

from __future__ import annotations

from enum import StrEnum


class JobStatus(StrEnum):
    UNDEFINED = "undefined"
    CREATED = "created"
    RUNNING = "running"
    PAUSED = "paused"
    READY = "ready"
    STANDBY = "standby"
    WAITING = "waiting"
    PENDING = "pending"
    ABORTING = "aborting"
    CONCLUDED = "concluded"
    NULL = "null"


class JobVerb(StrEnum):
    CANCEL = "cancel"
    PAUSE = "pause"
    RESUME = "resume"
    SET_SPEED = "set-speed"
    COMPLETE = "complete"
    FINALIZE = "finalize"
    DISMISS = "dismiss"
    CHANGE = "change"


S = JobStatus

# From each state, the states a job may move to.
TRANSITIONS: dict[JobStatus, frozenset[JobStatus]] = {
    S.UNDEFINED: frozenset({S.CREATED}),
    S.CREATED: frozenset({S.RUNNING, S.ABORTING, S.NULL}),
    S.RUNNING: frozenset({S.PAUSED, S.READY, S.WAITING, S.ABORTING}),
    S.PAUSED: frozenset({S.RUNNING}),
    S.READY: frozenset({S.STANDBY, S.WAITING, S.ABORTING}),
    S.STANDBY: frozenset({S.READY}),
    S.WAITING: frozenset({S.PENDING, S.ABORTING}),
    S.PENDING: frozenset({S.ABORTING, S.CONCLUDED}),
    S.ABORTING: frozenset({S.ABORTING, S.CONCLUDED}),
    S.CONCLUDED: frozenset({S.NULL}),
    S.NULL: frozenset(),
}

_LIVE = frozenset({S.CREATED, S.RUNNING, S.PAUSED, S.READY, S.STANDBY})

# For each verb, the states in which a user may apply it.
VERBS: dict[JobVerb, frozenset[JobStatus]] = {
    JobVerb.CANCEL: _LIVE | {S.WAITING, S.PENDING},
    JobVerb.PAUSE: _LIVE,
    JobVerb.RESUME: _LIVE,
    JobVerb.SET_SPEED: _LIVE,
    JobVerb.COMPLETE: frozenset({S.READY, S.STANDBY}),
    JobVerb.FINALIZE: frozenset({S.PENDING}),
    JobVerb.DISMISS: frozenset({S.CONCLUDED}),
    JobVerb.CHANGE: _LIVE,
}

# States in which the job's work is over (QEMU's job_is_completed).
COMPLETED_STATES = frozenset({S.WAITING, S.PENDING, S.ABORTING, S.CONCLUDED, S.NULL})
# States in which query-block-jobs reports `ready: true`.
READY_STATES = frozenset({S.READY, S.STANDBY})


class IllegalTransition(Exception):
    """The daemon (not a user) tried a transition the table forbids: a bug."""


def can_transition(old: JobStatus, new: JobStatus) -> bool:
    return new in TRANSITIONS[old]


def check_transition(old: JobStatus, new: JobStatus) -> None:
    if not can_transition(old, new):
        raise IllegalTransition(f"job state {old.value} -> {new.value} is not allowed")


def verb_allowed(verb: JobVerb, status: JobStatus) -> bool:
    return status in VERBS[verb]


def verb_refusal(job_id: str, status: JobStatus, verb: JobVerb) -> str | None:
    """qsd's message when `verb` is not allowed in `status`, else None."""
    if verb_allowed(verb, status):
        return None
    return f"Job '{job_id}' in state '{status.value}' cannot accept command verb '{verb.value}'"


def paused_state(status: JobStatus) -> JobStatus:
    """Where a pause point parks a job: READY jobs stand by, the others pause."""
    return S.STANDBY if status is S.READY else S.PAUSED
