"""The pure cores import nothing from the edges (architecture: three rings).

Pure modules take bytes, values and the current time as arguments; they never touch the
operating system or the event loop. This walks their ASTs and fails on a forbidden import.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2] / "storage_daemon"

PURE_MODULES = [
    "keyval.py",
    "hostpath.py",
    "qdict.py",
    "qapi/parser.py",
    "qapi/schema.py",
    "qapi/spec.py",
    "monitor/jsonstream.py",
    "monitor/protocol.py",
    "export/nbd/constants.py",
    "export/nbd/handshake.py",
    "export/nbd/transmission.py",
    "export/nbd/protocol.py",
    "export/nbd/buffers.py",
    "export/nbd/replies.py",
    "blockdev/perm.py",
    "blockdev/io_align.py",
    "blockdev/throttle.py",
    "blockdev/jobs/fsm.py",
    "blockdev/jobs/mirror_bitmap.py",
    "blockdev/drivers/qcow2/format.py",
    "blockdev/drivers/qcow2/layout.py",
    "blockdev/drivers/qcow2/cache.py",
]

EDGE_MODULES = {
    "asyncio",
    "socket",
    "time",
    "threading",
    "subprocess",
    "selectors",
    "signal",
    "fcntl",
    "select",
    "mmap",
    "ctypes",
    "uvloop",
}


def imported_roots(tree: ast.AST) -> set[str]:
    roots: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            roots.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            roots.add(node.module.split(".")[0])
    return roots


@pytest.mark.parametrize("module", PURE_MODULES)
def test_pure_module_imports_no_edge(module: str) -> None:
    path = ROOT / module
    tree = ast.parse(path.read_text(), filename=str(path))
    forbidden = imported_roots(tree) & EDGE_MODULES
    assert not forbidden, f"{module} is a pure core but imports {sorted(forbidden)}"


def test_the_list_names_real_files() -> None:
    missing = [m for m in PURE_MODULES if not (ROOT / m).is_file()]
    assert missing == []
