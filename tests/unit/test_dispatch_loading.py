"""Command handler modules are imported when needed, and all of them before the daemon is ready.

The checks that depend on what a process has imported so far run in a fresh interpreter
(the test process has imported everything long ago).
"""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

from storage_daemon.monitor import dispatch
from storage_daemon.monitor.dispatch import HANDLERS, handler_index, load_handlers, scan_package

COMMANDS_DIR = Path(dispatch.__file__).parent / "commands"


def run_fresh(code: str) -> str:
    done = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    return done.stdout


def test_index_names_the_module_of_every_handler() -> None:
    load_handlers()
    modules, index = scan_package(COMMANDS_DIR)
    assert "control" in modules and "block" in modules
    for name, handler in HANDLERS.items():
        module = handler.__module__.rpartition(".")[2]
        if module in modules:  # tests may import a module the package does not (yet)
            assert index.get(name) == module, (
                f"{name}: register it with a literal @command({name!r}) in {module}.py, "
                "or its first use loads every command module"
            )
    assert set(index) <= set(HANDLERS)


def test_index_reads_only_modules_the_package_imports(tmp_path: Path) -> None:
    (tmp_path / "__init__.py").write_text(
        "from storage_daemon.monitor.commands import (\n    one,\n    two,\n)\n"
    )
    (tmp_path / "one.py").write_text('@command("a")\nasync def a(): ...\n@command( "b" )\n')
    (tmp_path / "two.py").write_text("@command('c')\n")
    (tmp_path / "draft.py").write_text('@command("d")\n')  # not imported by __init__
    assert handler_index(tmp_path) == {"a": "one", "b": "one", "c": "two"}


def test_a_command_imports_only_its_module_until_everything_is_loaded() -> None:
    out = run_fresh(
        """
        import asyncio, sys
        from storage_daemon.daemon import Daemon

        PKG = "storage_daemon.monitor.commands"

        async def main():
            daemon = Daemon()
            await daemon.run_command(
                "blockdev-add", {"driver": "null-co", "node-name": "n0"}
            )
            print(sorted(m for m in sys.modules if m.startswith(PKG + ".")))
            print(await daemon.run_command("query-version", None))
            print(sorted(m for m in sys.modules if m.startswith(PKG + ".")))
            from storage_daemon.monitor.dispatch import load_handlers
            handlers = await asyncio.to_thread(load_handlers)
            import storage_daemon.monitor.commands as package
            print(sorted(package.__all__) == sorted(
                m.rpartition(".")[2] for m in sys.modules if m.startswith(PKG + ".")
            ))
            print(len(handlers))
            print("pydantic" in sys.modules)
            await daemon.shutdown()

        asyncio.run(main())
        """
    )
    lines = out.splitlines()
    assert lines[0] == "['storage_daemon.monitor.commands.block']"
    assert "'qemu': {'major': 7" in lines[1]
    assert lines[2] == (
        "['storage_daemon.monitor.commands.block', 'storage_daemon.monitor.commands.control']"
    )
    assert lines[3] == "True"
    load_handlers()
    assert int(lines[4]) == len(HANDLERS)
    assert lines[5] == "False"


def test_unknown_and_unimplemented_commands() -> None:
    out = run_fresh(
        """
        import asyncio
        from storage_daemon.daemon import Daemon
        from storage_daemon.errors import QmpError
        from storage_daemon.monitor.dispatch import HANDLERS

        async def main():
            daemon = Daemon()
            for name in ("no-such-command", "query-version"):
                try:
                    await daemon.run_command(name, {"bogus": 1})
                except QmpError as err:
                    print(err.error_class, err.desc)
            await daemon.shutdown()

        asyncio.run(main())
        """
    )
    assert out.splitlines() == [
        "CommandNotFound The command no-such-command has not been found",
        "GenericError Parameter 'bogus' is unexpected",
    ]


def test_loading_everything_while_commands_import_their_modules() -> None:
    """The preload thread runs the package's __init__ while commands import single modules
    in other threads: every handler ends up registered once, and nobody sees half a table."""
    out = run_fresh(
        """
        import threading
        from storage_daemon.monitor import dispatch

        names = ["query-version", "block-export-add", "job-cancel", "qom-list",
                 "blockdev-add", "chardev-add", "object-add"]
        errors, found, sizes = [], [], []

        def one(name):
            try:
                dispatch.import_handler(name)
                found.append(name in dispatch.HANDLERS)
            except BaseException as err:
                errors.append(repr(err))

        def everything():
            try:
                sizes.append(len(dispatch.load_handlers()))
            except BaseException as err:
                errors.append(repr(err))

        threads = [threading.Thread(target=one, args=(n,)) for n in names]
        threads[3:3] = [threading.Thread(target=everything) for _ in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        print(errors)
        print(found)
        print(sizes)
        """
    )
    load_handlers()
    assert out.splitlines() == ["[]", str([True] * 7), str([len(HANDLERS)] * 2)]
