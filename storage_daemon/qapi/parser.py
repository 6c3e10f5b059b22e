"""QAPI schema reader: QAPI-syntax text -> expressions with source positions and doc blocks.

Pure core (schema toolchain): files are obtained through a caller-supplied `reader`, so this
module never touches the file system. Invariant: every error is a `QAPIError` whose text starts
with `file:line:col:`, and every expression carries the `Info` of its opening brace.
"""

from __future__ import annotations

import posixpath
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Union

# A parsed QAPI value: dicts keep their key order, which matters (member order is wire order).
Value = Union[str, bool, list["Value"], dict[str, "Value"]]  # noqa: UP007 (recursive alias)


@dataclass(frozen=True)
class Info:
    """A position in a schema file (1-based line and column)."""

    file: str
    line: int
    col: int

    def __str__(self) -> str:
        return f"{self.file}:{self.line}:{self.col}"


class QAPIError(Exception):
    """A schema error, reported as `file:line:col: message`."""

    def __init__(self, info: Info | None, msg: str) -> None:
        self.info = info
        self.msg = msg
        super().__init__(f"{info}: {msg}" if info else msg)


@dataclass
class DocBlock:
    """A `##` documentation block: the symbol it documents, its text and per-member lines."""

    info: Info
    symbol: str | None
    body: str = ""
    args: dict[str, str] = field(default_factory=dict)
    features: dict[str, str] = field(default_factory=dict)
    sections: dict[str, str] = field(default_factory=dict)


@dataclass
class Expression:
    """One top-level definition, with where it starts and the doc block just before it."""

    expr: dict[str, Value]
    info: Info
    doc: DocBlock | None


class _Lexer:
    """Tokeniser for one file; tracks line and column for error messages."""

    def __init__(self, fname: str, text: str) -> None:
        self.fname = fname
        self.text = text
        self.pos = 0
        self.line = 1
        self.line_start = 0
        self.docs: list[DocBlock] = []

    def info(self, pos: int | None = None) -> Info:
        p = self.pos if pos is None else pos
        return Info(self.fname, self.line, p - self.line_start + 1)

    def error(self, msg: str, pos: int | None = None) -> QAPIError:
        return QAPIError(self.info(pos), msg)

    def _newline(self) -> None:
        self.line += 1
        self.line_start = self.pos

    def skip_space(self) -> None:
        """Skip blanks and comments, collecting `##` doc blocks as they go past."""
        text = self.text
        while self.pos < len(text):
            c = text[self.pos]
            if c == "\n":
                self.pos += 1
                self._newline()
            elif c in " \t\r":
                self.pos += 1
            elif c == "#":
                if text.startswith("##", self.pos) and self._at_line_start():
                    self._read_doc()
                else:
                    while self.pos < len(text) and text[self.pos] != "\n":
                        self.pos += 1
            else:
                return

    def _at_line_start(self) -> bool:
        return self.text[self.line_start : self.pos].strip() == ""

    def _read_line(self) -> str:
        end = self.text.find("\n", self.pos)
        if end < 0:
            end = len(self.text)
        line = self.text[self.pos : end]
        self.pos = end
        if self.pos < len(self.text):
            self.pos += 1
            self._newline()
        return line

    def _read_doc(self) -> None:
        start = self.info()
        first = self._read_line().strip()
        if first != "##":
            raise QAPIError(start, "junk after '##' at start of documentation comment")
        lines: list[tuple[Info, str]] = []
        while True:
            while self.pos < len(self.text) and self.text[self.pos] in " \t":
                self.pos += 1
            if self.pos >= len(self.text):
                raise QAPIError(start, "documentation comment must end with '##'")
            linfo = self.info()
            line = self._read_line().rstrip()
            if line == "##":
                break
            if not line.startswith("#"):
                raise QAPIError(linfo, "missing '#' at start of documentation comment line")
            if line.startswith("# "):
                line = line[2:]
            elif line == "#":
                line = ""
            else:
                raise QAPIError(linfo, "missing space after #")
            lines.append((linfo, line))
        self.docs.append(_parse_doc(start, lines))


def _parse_doc(start: Info, lines: list[tuple[Info, str]]) -> DocBlock:
    doc = DocBlock(start, None)
    if lines and lines[0][1].startswith("@"):
        head = lines[0][1]
        if not head.endswith(":") or " " in head:
            raise QAPIError(lines[0][0], "line should end with ':'")
        doc.symbol = head[1:-1]
        lines = lines[1:]
    body: list[str] = []
    current: tuple[dict[str, str], str] | None = None
    in_features = False
    for linfo, line in lines:
        if line.startswith("@"):
            name, sep, text = line[1:].partition(":")
            if not sep or not name or " " in name:
                raise QAPIError(linfo, "invalid member documentation line")
            table = doc.features if in_features else doc.args
            if name in table:
                raise QAPIError(linfo, f"'{name}' parameter name duplicated")
            table[name] = text.strip()
            current = (table, name)
        elif line == "Features:":
            in_features = True
            current = None
        elif line.startswith((" ", "\t")) and current is not None and line.strip():
            table, key = current
            table[key] = (table[key] + " " + line.strip()).strip()
        elif line[:1].isupper() and line.partition(":")[0] in (
            "Since",
            "Returns",
            "Note",
            "Features",
        ):
            key, _, text = line.partition(":")
            doc.sections[key] = text.strip()
            current = (doc.sections, key)
        else:
            current = None
            body.append(line)
    doc.body = "\n".join(body).strip()
    return doc


class _Parser:
    def __init__(self, lexer: _Lexer) -> None:
        self.lx = lexer

    def value(self) -> Value:
        lx = self.lx
        lx.skip_space()
        if lx.pos >= len(lx.text):
            raise lx.error("expected value, got end of file")
        c = lx.text[lx.pos]
        if c == "{":
            return self.obj()
        if c == "[":
            return self.array()
        if c == "'":
            return self.string()
        for word, val in (("true", True), ("false", False)):
            if lx.text.startswith(word, lx.pos):
                lx.pos += len(word)
                return val
        raise lx.error(f"stray '{c}'")

    def string(self) -> str:
        lx = self.lx
        start = lx.pos
        lx.pos += 1
        out: list[str] = []
        while True:
            if lx.pos >= len(lx.text) or lx.text[lx.pos] == "\n":
                raise lx.error('missing terminating "\'"', start)
            c = lx.text[lx.pos]
            lx.pos += 1
            if c == "'":
                return "".join(out)
            if c == "\\":
                raise lx.error("backslash not supported in strings", lx.pos - 1)
            if not (" " <= c <= "~"):
                raise lx.error("funny character in string", lx.pos - 1)
            out.append(c)

    def expect(self, chars: str, what: str) -> str:
        lx = self.lx
        lx.skip_space()
        if lx.pos >= len(lx.text):
            raise lx.error(f"expected {what}, got end of file")
        c = lx.text[lx.pos]
        if c not in chars:
            raise lx.error(f"expected {what}")
        lx.pos += 1
        return c

    def obj(self) -> dict[str, Value]:
        lx = self.lx
        lx.pos += 1
        out: dict[str, Value] = {}
        lx.skip_space()
        if lx.pos < len(lx.text) and lx.text[lx.pos] == "}":
            lx.pos += 1
            return out
        while True:
            lx.skip_space()
            if lx.pos >= len(lx.text) or lx.text[lx.pos] != "'":
                raise lx.error("expected string")
            kpos = lx.pos
            key = self.string()
            if key in out:
                raise lx.error(f"duplicate key '{key}'", kpos)
            self.expect(":", "':'")
            out[key] = self.value()
            if self.expect(",}", "',' or '}'") == "}":
                return out

    def array(self) -> list[Value]:
        lx = self.lx
        lx.pos += 1
        out: list[Value] = []
        lx.skip_space()
        if lx.pos < len(lx.text) and lx.text[lx.pos] == "]":
            lx.pos += 1
            return out
        while True:
            out.append(self.value())
            if self.expect(",]", "',' or ']'") == "]":
                return out


Reader = Callable[[str], str]


def parse_text(fname: str, text: str) -> list[tuple[Expression | DocBlock, str | None]]:
    """Parse one file's text; returns expressions and free-standing doc blocks in order.

    The second tuple item is the include target for `{'include': ...}` expressions.
    """
    lx = _Lexer(fname, text)
    parser = _Parser(lx)
    out: list[tuple[Expression | DocBlock, str | None]] = []
    while True:
        n_docs = len(lx.docs)
        lx.skip_space()
        new_docs = lx.docs[n_docs:]
        if lx.pos >= len(lx.text):
            out.extend((d, None) for d in new_docs)
            return out
        info = lx.info()
        if lx.text[lx.pos] != "{":
            raise lx.error("expected '{'")
        expr = parser.obj()
        for d in new_docs[:-1]:
            out.append((d, None))
        doc = new_docs[-1] if new_docs else None
        if "include" in expr:
            target = expr["include"]
            if len(expr) != 1 or not isinstance(target, str):
                raise QAPIError(info, "invalid 'include' directive")
            if doc is not None:
                out.append((doc, None))
            out.append((Expression(expr, info, None), target))
        else:
            out.append((Expression(expr, info, doc), None))


def parse_schema(fname: str, reader: Reader) -> list[Expression]:
    """Parse `fname` and everything it includes (each file once), in definition order."""
    seen: set[str] = set()
    result: list[Expression] = []

    def visit(name: str, incl_info: Info | None) -> None:
        norm = posixpath.normpath(name)
        if norm in seen:
            return
        seen.add(norm)
        try:
            text = reader(norm)
        except OSError as exc:
            raise QAPIError(incl_info, f"can't read include file '{name}': {exc.strerror}") from exc
        for item, include in parse_text(norm, text):
            if isinstance(item, DocBlock):
                if item.symbol is not None:
                    raise QAPIError(
                        item.info,
                        f"documentation for '{item.symbol}' is not followed by the definition",
                    )
                continue
            if include is not None:
                visit(posixpath.join(posixpath.dirname(norm), include), item.info)
            else:
                result.append(item)

    visit(fname, None)
    return result
