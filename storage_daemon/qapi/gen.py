"""Entry point `python -m storage_daemon.qapi.gen [--check]`: schema/*.json -> qapi_generated/.

Edge (a build tool): it alone reads the schema files and writes the generated modules; the work
itself is done by the pure `generate()`. Invariant: `--check` writes nothing and exits 1 when any
committed generated file differs from what the schema produces now.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from storage_daemon.qapi.gen_models import HEADER, generate_models, generate_types
from storage_daemon.qapi.gen_plain import generate_plain
from storage_daemon.qapi.introspect import introspection
from storage_daemon.qapi.parser import QAPIError, Reader, parse_schema
from storage_daemon.qapi.schema import Schema

REPO = Path(__file__).resolve().parents[2]
SCHEMA_ROOT = "schema/storage-daemon.json"
OUT_DIR = "storage_daemon/qapi_generated"


def load_schema(root: str, reader: Reader) -> Schema:
    return Schema(parse_schema(root, reader))


def generate_commands(schema: Schema) -> str:
    out = [
        f'"""QMP command table — {HEADER}."""',
        "",
        "from __future__ import annotations",
        "",
        "from storage_daemon.qapi.spec import CommandSpec",
        "",
        "COMMANDS: dict[str, CommandSpec] = {",
    ]
    for c in schema.commands.values():
        arg = c.arg_type.name if c.arg_type else None
        ret = c.ret_type.name if c.ret_type else None
        doc = " ".join(c.doc.split())
        out.append(
            f"    {c.name!r}: CommandSpec({c.name!r}, arg_type={arg!r}, ret_type={ret!r}, boxed={c.boxed}, "
            f"allow_oob={c.allow_oob}, coroutine={c.coroutine}, features={c.features!r}, doc={doc!r}),"
        )
    out.append("}")
    return "\n".join(out) + "\n"


def generate_events(schema: Schema) -> str:
    out = [
        f'"""QMP event table (event name -> data type) — {HEADER}."""',
        "",
        "from __future__ import annotations",
        "",
        "EVENTS: dict[str, str | None] = {",
    ]
    for e in schema.events.values():
        out.append(f"    {e.name!r}: {(e.arg_type.name if e.arg_type else None)!r},")
    out.append("}")
    return "\n".join(out) + "\n"


def generate_introspection(schema: Schema) -> str:
    payload = introspection(schema)
    body = ",\n".join(" " + json.dumps(entry) for entry in payload)
    return "[\n" + body + "\n]\n"


def generate(schema: Schema) -> dict[str, str]:
    """Every generated file, by path relative to the repository root."""
    return {
        f"{OUT_DIR}/models.py": generate_models(schema),
        f"{OUT_DIR}/plain.py": generate_plain(schema),
        f"{OUT_DIR}/types.py": generate_types(schema),
        f"{OUT_DIR}/commands.py": generate_commands(schema),
        f"{OUT_DIR}/events.py": generate_events(schema),
        f"{OUT_DIR}/introspection.json": generate_introspection(schema),
    }


def file_reader(base: Path) -> Reader:
    def read(name: str) -> str:
        return (base / name).read_text(encoding="utf-8")

    return read


def stale_files(base: Path = REPO) -> tuple[dict[str, str], list[str]]:
    """Generate from the schema under `base`; return the outputs and the paths that differ."""
    outputs = generate(load_schema(SCHEMA_ROOT, file_reader(base)))
    stale = []
    for rel, text in outputs.items():
        path = base / rel
        if not path.exists() or path.read_text(encoding="utf-8") != text:
            stale.append(rel)
    return outputs, stale


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m storage_daemon.qapi.gen", description=__doc__)
    ap.add_argument("--check", action="store_true", help="verify generated files are up to date")
    args = ap.parse_args(argv)
    try:
        outputs, stale = stale_files()
    except QAPIError as exc:
        print(f"{exc}", file=sys.stderr)
        return 1
    if args.check:
        if stale:
            print(
                "generated files are stale: "
                + ", ".join(stale)
                + "\nrun: python -m storage_daemon.qapi.gen",
                file=sys.stderr,
            )
            return 1
        return 0
    for rel in stale:
        (REPO / rel).write_text(outputs[rel], encoding="utf-8")
        print(f"wrote {rel}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
