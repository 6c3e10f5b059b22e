"""The daemon never imports pydantic, the pydantic models (qapi_generated/models.py) nor the
schema generators: its input visitor builds the plain classes of qapi_generated/plain.py, and
pydantic is for tests and tools. Two checks: every import the daemon's source can execute
(function bodies included, `if TYPE_CHECKING:` blocks excepted), read from the AST; and a fresh
interpreter that imports every daemon module and builds every plain class, then reads
sys.modules. tests/integration/test_startup.py checks a running daemon's mapped files too.
"""

from __future__ import annotations

import ast
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[2] / "storage_daemon"

# Build tools, run by hand or by tests: these may use pydantic.
TOOLS = ("qapi/gen.py", "qapi/gen_models.py", "qapi/gen_plain.py")
FORBIDDEN = (
    "pydantic",
    "pydantic_core",
    "storage_daemon.qapi_generated.models",
    "storage_daemon.qapi.gen",
    "storage_daemon.qapi.gen_models",
    "storage_daemon.qapi.gen_plain",
)


def forbidden(module: str) -> bool:
    return any(module == name or module.startswith(name + ".") for name in FORBIDDEN)


def module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _dotted(node: ast.expr) -> str:
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        return f"{_dotted(node.value)}.{node.attr}"
    return ""


class _Imports(ast.NodeVisitor):
    """(line, module) for every import a module's code may execute."""

    def __init__(self, module: str, is_package: bool) -> None:
        self.package = module if is_package else module.rpartition(".")[0]
        self.found: list[tuple[int, str]] = []

    def visit_If(self, node: ast.If) -> None:
        if _dotted(node.test) in ("TYPE_CHECKING", "typing.TYPE_CHECKING"):
            for stmt in node.orelse:  # the body only runs under a type checker
                self.visit(stmt)
        else:
            self.generic_visit(node)

    def visit_Import(self, node: ast.Import) -> None:
        self.found += [(node.lineno, alias.name) for alias in node.names]

    def visit_ImportFrom(self, node: ast.ImportFrom) -> None:
        base = node.module or ""
        if node.level:
            parts = self.package.split(".")
            parts = parts[: len(parts) - (node.level - 1)]
            base = ".".join([*parts, base] if base else parts)
        self.found.append((node.lineno, base))
        # `from a import b`: b may be a submodule
        self.found += [(node.lineno, f"{base}.{alias.name}") for alias in node.names]

    def visit_Call(self, node: ast.Call) -> None:
        name = _dotted(node.func).rpartition(".")[2]
        if name in ("import_module", "__import__") and node.args:
            arg = node.args[0]
            if isinstance(arg, ast.Constant) and isinstance(arg.value, str):
                self.found.append((node.lineno, arg.value))
        self.generic_visit(node)

    def visit_Attribute(self, node: ast.Attribute) -> None:
        # `qapi_generated.models.X` after `import storage_daemon.qapi_generated`
        if node.attr == "models" and _dotted(node.value).endswith("qapi_generated"):
            self.found.append((node.lineno, "storage_daemon.qapi_generated.models"))
        self.generic_visit(node)


def forbidden_imports(source: str, module: str, is_package: bool = False) -> list[str]:
    visitor = _Imports(module, is_package)
    visitor.visit(ast.parse(source))
    return [f"{line}: {name}" for line, name in visitor.found if forbidden(name)]


def daemon_modules() -> list[Path]:
    tools = {PACKAGE / tool for tool in TOOLS}
    return [
        path
        for path in sorted(PACKAGE.rglob("*.py"))
        if "qapi_generated" not in path.parts and path not in tools
    ]


@pytest.mark.parametrize(
    "source",
    [
        "import pydantic",
        "from pydantic import BaseModel",
        "import pydantic_core.core_schema",
        "from storage_daemon.qapi_generated import models",
        "from storage_daemon.qapi_generated import plain, models as m",
        "from storage_daemon.qapi_generated.models import BlockdevOptions",
        "import storage_daemon.qapi_generated.models",
        "from ..qapi_generated import models",
        "from .. import qapi_generated\nx = qapi_generated.models.X",
        "from storage_daemon.qapi.gen_models import field_name",
        "from storage_daemon.qapi import gen_plain",
        "def f():\n    from storage_daemon.qapi_generated import models\n    return models",
        "import importlib\nimportlib.import_module('storage_daemon.qapi_generated.models')",
        "__import__('pydantic')",
        "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    pass\nelse:\n    import pydantic",
        "if sys.version_info >= (3, 11):\n    from storage_daemon.qapi_generated import models",
    ],
)
def test_scanner_finds(source: str) -> None:
    assert forbidden_imports(source, "storage_daemon.qapi.runtime") != []


@pytest.mark.parametrize(
    "source",
    [
        "from storage_daemon.qapi_generated import plain",
        "from storage_daemon.qapi_generated.types import TYPES",
        "from storage_daemon.qapi import runtime, spec",
        "from storage_daemon.qapi.generic import x",
        "from . import plain_model",
        "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from pydantic import BaseModel",
        "import typing\nif typing.TYPE_CHECKING:\n    from storage_daemon.qapi_generated import models",
        "'''Nothing here imports pydantic: from pydantic import BaseModel'''",
        "models = 1\nx = obj.models",
    ],
)
def test_scanner_allows(source: str) -> None:
    assert forbidden_imports(source, "storage_daemon.qapi.runtime") == []


def test_scanner_reads_the_tools() -> None:
    """The tools left out below exist and do import pydantic: the scan reads real files."""
    for tool in TOOLS:
        path = PACKAGE / tool
        assert path.exists(), tool
    source = (PACKAGE / "qapi/gen_models.py").read_text(encoding="utf-8")
    assert forbidden_imports(source, "storage_daemon.qapi.gen_models") != []


def test_daemon_source_never_imports_pydantic_or_models() -> None:
    modules = daemon_modules()
    assert len(modules) > 100
    assert PACKAGE / "qapi/runtime.py" in modules and PACKAGE / "daemon.py" in modules
    found = []
    for path in modules:
        source = path.read_text(encoding="utf-8")
        name = module_name(path)
        for hit in forbidden_imports(source, name, path.name == "__init__.py"):
            found.append(f"{path.relative_to(PACKAGE.parent)}:{hit}")
    assert found == [], "the daemon must not import these (tests and tools only)"


def test_importing_every_daemon_module_loads_no_pydantic() -> None:
    names = [module_name(path) for path in daemon_modules()]
    code = f"""
        import importlib, sys
        for name in {names!r}:
            importlib.import_module(name)
        from storage_daemon.qapi_generated import plain
        from storage_daemon.qapi_generated.types import TYPES
        plain.build_all()
        specs = [TYPES[name] for name in TYPES]
        print(len({names!r}), len(specs))
        print(sorted(m for m in sys.modules if m.partition(".")[0] in ("pydantic", "pydantic_core")
                     or m.startswith("storage_daemon.qapi_generated.models")
                     or m.startswith("storage_daemon.qapi.gen")))
    """
    done = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    counts, loaded = done.stdout.splitlines()
    assert int(counts.split()[0]) == len(names) and int(counts.split()[1]) > 200
    assert loaded == "[]"
