"""errors.report: qsd's error_report wording on standard error (unit ring).

qsd puts its program name in front of a report only when no monitor command is running.
"""

from __future__ import annotations

import sys

import pytest

from storage_daemon.errors import IN_COMMAND, prog_name, report


def test_report_outside_a_command_names_the_program(capsys: pytest.CaptureFixture[str]) -> None:
    report("Lost persistent bitmaps")
    assert capsys.readouterr().err == f"{prog_name(sys.argv[0])}: Lost persistent bitmaps\n"


def test_report_inside_a_command_is_bare(capsys: pytest.CaptureFixture[str]) -> None:
    token = IN_COMMAND.set(True)
    try:
        report("Lost persistent bitmaps")
    finally:
        IN_COMMAND.reset(token)
    assert capsys.readouterr().err == "Lost persistent bitmaps\n"


@pytest.mark.parametrize(
    ("argv0", "name"),
    [("/usr/bin/qemu-storage-daemon", "qemu-storage-daemon"), ("x/__main__.py", "storage-daemon")],
)
def test_prog_name(argv0: str, name: str) -> None:
    assert prog_name(argv0) == name
