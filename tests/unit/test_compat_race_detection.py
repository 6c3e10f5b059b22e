"""The compat harness's detection of qsd's monitor start-up race: only the two shapes that
race produces on the reference side count, never a difference of ours.

Unit ring: records are built by hand in the harness's format.
"""

from __future__ import annotations

from typing import Any

from tests.compat.harness import hit_monitor_race

Record = dict[str, Any]

GREETING: Record = {"greeting": {"QMP": {"version": {}, "capabilities": ["oob"]}}}
ADD: Record = {"execute": "blockdev-add", "arguments": {"driver": "null-co", "node-name": "n0"}}


def sent(reply: Record | None = None, outcome: str | None = None) -> Record:
    rec: Record = {"send": ADD}
    if reply is not None:
        rec["reply"] = reply
    if outcome is not None:
        rec["outcome"] = outcome
    return rec


NORMAL: list[Record] = [GREETING, {"negotiate": {"return": {}}}, sent({"return": {}})]


def test_a_normal_pair_is_no_race() -> None:
    assert not hit_monitor_race(NORMAL, NORMAL)


def test_a_second_greeting_as_the_negotiation_reply_is_the_race() -> None:
    reference: list[Record] = [GREETING, {"negotiate": GREETING["greeting"]}, sent(outcome="EOF")]
    assert hit_monitor_race(reference, NORMAL)


def test_a_second_greeting_as_the_first_reply_without_negotiation_is_the_race() -> None:
    reference: list[Record] = [GREETING, sent(GREETING["greeting"])]
    assert hit_monitor_race(reference, [GREETING, sent({"return": {}})])


def test_eof_at_the_first_command_on_the_reference_only_is_the_race() -> None:
    reference: list[Record] = [GREETING, {"negotiate": {"return": {}}}, sent(outcome="EOF")]
    assert hit_monitor_race(reference, NORMAL)


def test_eof_at_the_first_command_on_both_sides_is_behaviour_to_compare() -> None:
    both: list[Record] = [GREETING, {"negotiate": {"return": {}}}, sent(outcome="EOF")]
    assert not hit_monitor_race(both, both)


def test_eof_later_in_the_transcript_is_behaviour_to_compare() -> None:
    reference: list[Record] = [*NORMAL, sent(outcome="EOF")]
    assert not hit_monitor_race(reference, [*NORMAL, sent({"return": {}})])


def test_a_parse_error_for_a_serialised_command_on_the_reference_is_the_race() -> None:
    torn = sent({"error": {"class": "GenericError", "desc": "JSON parse error, stray '-ad'"}})
    reference: list[Record] = [*NORMAL, torn]
    assert hit_monitor_race(reference, [*NORMAL, sent({"return": {}})])


def test_a_parse_error_for_raw_bytes_is_behaviour_to_compare() -> None:
    error: Record = {"error": {"class": "GenericError", "desc": "JSON parse error, stray 'x'"}}
    both: list[Record] = [*NORMAL, {"raw": "x", "reply": error}]
    assert not hit_monitor_race(both, both)


def test_a_parse_error_on_both_sides_is_behaviour_to_compare() -> None:
    error: Record = {"error": {"class": "GenericError", "desc": "JSON parse error, too deep"}}
    both: list[Record] = [*NORMAL, sent(error)]
    assert not hit_monitor_race(both, both)
