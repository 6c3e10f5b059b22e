"""Compat harness: run one command line or QMP transcript on the reference qsd and on ours.

Test-support ring (subprocesses, sockets, files). Both sides get identical inputs, each in its
own scratch dir (`$D`); outputs are normalised (program name, paths, versions, timestamps,
auto node names, graph ids, key order) and compared as canonical JSON text, never raw bytes.
"""

from __future__ import annotations

import difflib
import hashlib
import json
import re
import shutil
import subprocess
import tempfile
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

from tests.integration.daemon import (
    NO_ID,
    REFERENCE_BINARY,
    CliResult,
    DaemonProcess,
    QmpEof,
    QmpError,
    QmpTimeout,
    RawQmp,
    finish_cli,
    ours_command,
    reference_command,
    start_cli,
)

SIDES = ("reference", "ours")
SYNC_ID = "compat-sync"

Setup = Callable[[Path], None]


def ours_is_reference() -> bool:
    """True in self-test mode (`COMPAT_OURS=reference`)."""
    return ours_command() == reference_command()


def reference_missing_reason() -> str | None:
    if not Path(REFERENCE_BINARY).exists():
        return f"reference {REFERENCE_BINARY} is not installed"
    return None


def ours_missing_reason() -> str | None:
    """Why our daemon cannot run yet (no `storage_daemon/__main__.py`), or None."""
    if ours_is_reference() or ours_command()[1:2] != ["-m"]:
        return None
    import importlib.util

    if importlib.util.find_spec("storage_daemon.__main__") is None:
        return "our daemon has no storage_daemon/__main__.py yet (set COMPAT_OURS=reference to self-test)"
    return None


def raw_image(name: str = "img.raw", size: int = 1 << 20) -> Setup:
    """A setup function creating a sparse zero-filled raw image `$D/<name>`."""

    def setup(d: Path) -> None:
        with open(d / name, "wb") as f:
            f.truncate(size)

    return setup


def qemu_io_nbd(workdir: Path | str, export: str, command: str) -> dict[str, Any]:
    """Run one qemu-io command on export `export` of the daemon whose NBD socket is
    `<workdir>/nbd.sock`; the transcript record of it (the command and its exit status)."""
    url = f"nbd+unix:///{export}?socket={workdir}/nbd.sock"
    proc = subprocess.run(["qemu-io", "-f", "raw", "-c", command, url], capture_output=True,
                          timeout=30)  # fmt: skip
    return {"qemu-io": command, "status": proc.returncode}


def all_of(*setups: Setup) -> Setup:
    """Combine setup functions (run in order)."""

    def setup(d: Path) -> None:
        for s in setups:
            s(d)

    return setup


#: `$D/img.raw`, 1 MiB of zeros.
make_raw_image: Setup = raw_image()


# ---------------------------------------------------------------------------------------------
# Normalisation
# ---------------------------------------------------------------------------------------------

_PROG_RE = re.compile(
    r"^(?:\S*/)?(?:qemu-storage-daemon|storage-daemon|storage_daemon|__main__\.py)(?=:)",
    re.MULTILINE,
)
_AUTO_NODE_RE = re.compile(r"#block\d+")


class Normaliser:
    """Per-side normaliser; auto node names get `#block<N>` by order of first appearance.

    Dicts are walked in sorted key order so that key order cannot change the numbering.
    """

    def __init__(self, scratch: Path) -> None:
        self._paths = sorted({str(scratch), str(scratch.resolve())}, key=len, reverse=True)
        self._nodes: dict[str, str] = {}

    def _node(self, match: re.Match[str]) -> str:
        name = match.group(0)
        if name not in self._nodes:
            self._nodes[name] = f"#block<{len(self._nodes) + 1}>"
        return self._nodes[name]

    def text(self, s: str) -> str:
        for p in self._paths:
            s = s.replace(p, "$D")
        s = _PROG_RE.sub("PROG", s)
        return _AUTO_NODE_RE.sub(self._node, s)

    def value(self, v: Any) -> Any:
        if isinstance(v, str):
            return self.text(v)
        if isinstance(v, list):
            return [self.value(x) for x in v]
        if isinstance(v, dict):
            out = {self.text(k): self.value(v[k]) for k in sorted(v)}
            return _structural(out)
        return v

    def output(self, s: str) -> list[str]:
        """stdout/stderr text -> normalised lines (JSON lines are normalised as values)."""
        lines = []
        for line in s.splitlines():
            stripped = line.rstrip("\r")
            try:
                parsed = json.loads(stripped) if stripped.startswith("{") else None
            except ValueError:
                parsed = None
            lines.append(
                canonical(self.value(parsed)) if parsed is not None else self.text(stripped)
            )
        return lines


def _structural(d: dict[str, Any]) -> dict[str, Any]:
    # VersionInfo (greeting and query-version): the numbers are ours to choose.
    qemu = d.get("qemu")
    if "package" in d and isinstance(qemu, dict) and {"major", "minor", "micro"} <= set(qemu):
        d = {**d, "qemu": {k: "<N>" for k in qemu}, "package": "<PKG>"}
    # Event timestamps.
    if "event" in d and "timestamp" in d:
        d = {**d, "timestamp": "<TS>"}
    return d


def canonical_block_graph(graph: Any) -> Any:
    """x-debug-query-block-graph: ids are arbitrary; renumber by sorted (name, type)."""
    if not isinstance(graph, dict) or "nodes" not in graph:
        return graph
    nodes = sorted(graph["nodes"], key=lambda n: (str(n.get("name")), str(n.get("type"))))
    ids = {n["id"]: i + 1 for i, n in enumerate(nodes)}
    new_nodes = [{**n, "id": ids[n["id"]]} for n in nodes]
    edges = [
        {**e, "parent": ids.get(e["parent"], e["parent"]), "child": ids.get(e["child"], e["child"])}
        for e in graph.get("edges", [])
    ]
    edges.sort(key=lambda e: (e["parent"], e["child"], str(e.get("name"))))
    return {**graph, "nodes": new_nodes, "edges": edges}


#: Per-command reply canonicalisers applied to `return` (after name normalisation).
def without_10_0_members(nodes: Any) -> Any:
    """Drop BlockDeviceInfo's `active` (added in QEMU 10.0; we implement 10.0's inactive
    nodes, qsd 7.2 predates them), so 7.2's answers compare with ours."""
    if not isinstance(nodes, list):
        return nodes
    return [
        {k: v for k, v in node.items() if k != "active"} if isinstance(node, dict) else node
        for node in nodes
    ]


RETURN_CANONICALISERS: dict[str, Callable[[Any], Any]] = {
    "x-debug-query-block-graph": canonical_block_graph,
    "query-named-block-nodes": without_10_0_members,
}


def canonical(v: Any) -> str:
    """The comparison form: sorted keys, exact numbers (1 != 1.0 != true)."""
    return json.dumps(v, sort_keys=True, ensure_ascii=False)


def _display(v: Any) -> Any:
    if isinstance(v, str) and len(v) > 240:
        digest = hashlib.sha1(v.encode("utf-8", "surrogatepass")).hexdigest()[:12]
        return f"{v[:80]}...<{len(v)} chars sha1:{digest}>"
    if isinstance(v, list):
        return [_display(x) for x in v]
    if isinstance(v, dict):
        return {k: _display(x) for k, x in v.items()}
    return v


def render(records: Sequence[Any]) -> list[str]:
    """One canonical line per record, long strings abbreviated with a digest."""
    return [json.dumps(_display(r), sort_keys=True, ensure_ascii=False) for r in records]


def diff_text(ref: Sequence[Any], ours: Sequence[Any]) -> str:
    return "\n".join(
        difflib.unified_diff(render(ref), render(ours), "reference", "ours", lineterm="", n=3)
    )


# ---------------------------------------------------------------------------------------------
# CLI cases
# ---------------------------------------------------------------------------------------------

CliCompare = Literal["full", "last-line", "status"]


@dataclass(frozen=True)
class CliCase:
    """One command line (`$D` = the side's scratch dir).

    compare: "full" (exit status, stderr and stdout lines), "last-line" (status and the last
    stderr line only), "status" (status only). `ours_status` overrides the expected exit
    status of ours where the reference is known to be wrong (ignored when ours is the
    reference).

    "Accepted" (the daemon keeps running) is detected by `--pidfile $D/ready.pid`, prepended
    to the command line (a `--pidfile` in `args` comes later and wins, as in qsd).
    """

    args: tuple[str, ...]
    id: str | None = None
    compare: CliCompare = "full"
    ours_status: int | None = None
    setup: Setup | None = None
    timeout: float = 10.0
    note: str = ""

    @property
    def case_id(self) -> str:
        return self.id or " ".join(self.args)[:80]


def cli(*args: str, **kw: Any) -> CliCase:
    """`cli("--blockdev", "driver=null-co", compare="last-line")`."""
    return CliCase(tuple(args), **kw)


def _status(status: int | None) -> str | int:
    if status is None:
        return "accepted"
    if status < 0:
        return f"signal {-status}"
    return status


@dataclass
class CliComparison:
    case: CliCase
    raw: dict[str, CliResult]
    norm: dict[str, dict[str, Any]]

    def assert_same(self) -> None:
        ref, ours = self.norm["reference"], self.norm["ours"]
        keys = {
            "full": ("status", "stderr", "stdout", "stop_status"),
            "last-line": ("status", "last"),
            "status": ("status",),
        }[self.case.compare]
        ref_view = {k: ref[k] for k in keys}
        ours_view = {k: ours[k] for k in keys}
        if self.case.ours_status is not None and not ours_is_reference():
            ref_view["status"] = self.case.ours_status
        if canonical(ref_view) != canonical(ours_view):
            raise AssertionError(
                f"CLI mismatch for {list(self.case.args)}\n"
                + diff_text(_lines(ref_view), _lines(ours_view))
            )


def _lines(view: dict[str, Any]) -> list[Any]:
    out: list[Any] = []
    for k, v in view.items():
        if isinstance(v, list):
            out.extend({k: x} for x in v)
        else:
            out.append({k: v})
    return out


def _normalise_cli(result: CliResult, scratch: Path) -> dict[str, Any]:
    n = Normaliser(scratch)
    stderr = n.output(result.stderr)
    nonempty = [line for line in stderr if line.strip()]
    return {
        "status": _status(result.exit_status),
        "stderr": stderr,
        "stdout": n.output(result.stdout),
        "stop_status": _status(result.stop_status) if result.accepted else None,
        "last": nonempty[-1] if nonempty else "",
    }


# ---------------------------------------------------------------------------------------------
# QMP transcripts
# ---------------------------------------------------------------------------------------------

_NO_ID: Any = NO_ID


@dataclass(frozen=True)
class Cmd:
    """Send one command, record its reply. `sort_by` sorts a list `return` by that key
    (for lists whose order is an implementation artefact); default is exact order."""

    name: str
    args: dict[str, Any] | None = None
    id: Any = _NO_ID
    oob: bool = False
    sort_by: str | None = None


@dataclass(frozen=True)
class Raw:
    """Send bytes verbatim. With `sync`, a `{"execute":"query-version","id":"compat-sync"}`
    follows and every message before its reply is recorded (zero or many replies); without,
    exactly `replies` messages are read."""

    data: bytes
    sync: bool = True
    replies: int = 1


@dataclass(frozen=True)
class WaitEvent:
    name: str
    timeout: float = 5.0


@dataclass(frozen=True)
class ExpectEof:
    """The daemon closes the connection and exits; records EOF and the exit status."""

    timeout: float = 5.0


Step = Cmd | Raw | WaitEvent | ExpectEof
StepLike = Step | tuple[Any, ...]


def as_step(s: StepLike) -> Step:
    """Accept `("cmd", name[, args[, {opts}]])`, `("raw", bytes)`, `("event", name)`, `("eof",)`."""
    if not isinstance(s, tuple):
        return s
    kind, *rest = s
    if kind == "cmd":
        opts = rest[2] if len(rest) > 2 else {}
        return Cmd(rest[0], rest[1] if len(rest) > 1 else None, **opts)
    if kind == "raw":
        return Raw(rest[0])
    if kind == "event":
        return WaitEvent(rest[0])
    if kind == "eof":
        return ExpectEof()
    raise ValueError(f"unknown step {s!r}")


def _describe(step: Step) -> dict[str, Any]:
    if isinstance(step, Cmd):
        msg: dict[str, Any] = {"exec-oob" if step.oob else "execute": step.name}
        if step.args is not None:
            msg["arguments"] = step.args
        if step.id is not _NO_ID:
            msg["id"] = step.id
        return {"send": msg}
    if isinstance(step, Raw):
        return {"raw": step.data.decode("utf-8", "backslashreplace")}
    if isinstance(step, WaitEvent):
        return {"wait-event": step.name}
    return {"expect-eof": True}


def substitute(value: Any, scratch: Path) -> Any:
    """Replace `$D` by the side's scratch dir in strings (recursively) and bytes."""
    if isinstance(value, str):
        return value.replace("$D", str(scratch))
    if isinstance(value, bytes):
        return value.replace(b"$D", str(scratch).encode())
    if isinstance(value, list):
        return [substitute(x, scratch) for x in value]
    if isinstance(value, dict):
        return {k: substitute(x, scratch) for k, x in value.items()}
    return value


def _for_side(step: Step, scratch: Path) -> Step:
    if isinstance(step, Cmd) and step.args is not None:
        return replace(step, args=substitute(step.args, scratch))
    if isinstance(step, Raw):
        return replace(step, data=substitute(step.data, scratch))
    return step


def run_transcript(
    client: RawQmp,
    daemon: DaemonProcess | None,
    steps: Iterable[StepLike],
    scratch: Path | None = None,
) -> list[dict[str, Any]]:
    """Run steps on one side; returns unnormalised records (one per step, then the events
    nobody waited for). `$D` in command arguments and raw bytes becomes `scratch`. A timeout
    or EOF is recorded, not raised, so both sides compare."""
    records: list[dict[str, Any]] = []
    for s in steps:
        step = as_step(s)
        if scratch is not None:
            step = _for_side(step, scratch)
        rec = _describe(step)
        try:
            if isinstance(step, Cmd):
                rec["reply"] = client.cmd(step.name, step.args, step.id, oob=step.oob)
                if step.sort_by:
                    rec["_sort_by"] = step.sort_by
            elif isinstance(step, Raw):
                client.send_raw(step.data)
                replies: list[dict[str, Any]] = []
                if step.sync:
                    client.send_raw(
                        json.dumps({"execute": "query-version", "id": SYNC_ID}).encode() + b"\n"
                    )
                    while (m := client.recv_reply()).get("id") != SYNC_ID:
                        replies.append(m)
                else:
                    replies = [client.recv_reply() for _ in range(step.replies)]
                rec["replies"] = replies
            elif isinstance(step, WaitEvent):
                rec["event"] = client.wait_event(step.name, step.timeout)
            else:
                rec["eof"] = client.at_eof(step.timeout)
                if daemon is not None:
                    rec["exit"] = _status(daemon.wait_exit(step.timeout))
        except QmpTimeout:
            rec["outcome"] = "TIMEOUT"
        except QmpEof:
            rec["outcome"] = "EOF"
        except (QmpError, OSError) as exc:
            rec["outcome"] = f"{type(exc).__name__}"
        records.append(rec)
        if "outcome" in rec and rec["outcome"] != "TIMEOUT":
            break
    records.append({"unclaimed-events": client.events})
    return records


def normalise_transcript(records: list[dict[str, Any]], scratch: Path) -> list[Any]:
    n = Normaliser(scratch)
    out: list[Any] = []
    for rec in records:
        rec = n.value(rec)
        send = rec.get("send")
        reply = rec.get("reply")
        if isinstance(send, dict) and isinstance(reply, dict) and "return" in reply:
            name = send.get("execute") or send.get("exec-oob")
            ret = reply["return"]
            canon = RETURN_CANONICALISERS.get(str(name))
            if canon is not None:
                ret = canon(ret)
            sort_by = rec.pop("_sort_by", None)
            if sort_by and isinstance(ret, list):
                ret = sorted(
                    ret, key=lambda x: canonical(x.get(sort_by)) if isinstance(x, dict) else ""
                )
            rec = {**rec, "reply": {**reply, "return": ret}}
        rec.pop("_sort_by", None)
        out.append(rec)
    return out


@dataclass
class TranscriptComparison:
    raw: dict[str, list[dict[str, Any]]]
    norm: dict[str, list[Any]]
    greeting: dict[str, Any] = field(default_factory=dict)

    def assert_same(self) -> None:
        ref, ours = self.norm["reference"], self.norm["ours"]
        if [canonical(r) for r in ref] != [canonical(r) for r in ours]:
            raise AssertionError("QMP transcript mismatch\n" + diff_text(ref, ours))

    def replies(self, side: str = "reference") -> list[Any]:
        """The normalised per-step records of one side (for extra assertions)."""
        return self.norm[side]


# ---------------------------------------------------------------------------------------------
# The per-test driver
# ---------------------------------------------------------------------------------------------


def start_then_settle(
    client: RawQmp, workdir: Path, setup: Sequence[Cmd], queries: int = 2000
) -> None:
    """Send `setup` (each must succeed), then poll query-jobs until the first job has made
    progress (a rate-limited job then sleeps in its limit), and forget the events so far."""
    for cmd in setup:
        reply = client.cmd(cmd.name, substitute(cmd.args, workdir))
        assert "return" in reply, (cmd, reply)
    for _ in range(queries):
        jobs = client.cmd("query-jobs")["return"]
        if jobs and jobs[0]["current-progress"] > 0:
            break
    client.events.clear()


def send_recorded(client: RawQmp, workdir: Path, cmds: Sequence[Cmd]) -> list[Any]:
    """Send each command; one {"send", "reply"} record per command."""
    return [
        {"send": cmd.name, "reply": client.cmd(cmd.name, substitute(cmd.args, workdir))}
        for cmd in cmds
    ]


def _is_parse_error(reply: Any) -> bool:
    error = reply.get("error") if isinstance(reply, dict) else None
    return isinstance(error, dict) and str(error.get("desc", "")).startswith("JSON parse error")


def hit_monitor_race(reference: list[dict[str, Any]], ours: list[dict[str, Any]]) -> bool:
    """Whether qsd's side shows its QMP start-up race: qsd 7.2 sets its monitor up in a
    bottom half of another thread, after the PID file is written, and a client that connects
    in between may get a second greeting where a reply belongs, lose the connection at its
    first command, or lose part of a later message's bytes to the handler being replaced (a
    "JSON parse error" for a command the harness serialised itself, where ours parsed it).
    None is behaviour a test compares, so such a run is repeated."""
    for rec in reference[1:3]:
        answer = rec.get("negotiate", rec.get("reply"))
        if isinstance(answer, dict) and "QMP" in answer:
            return True
    for i, rec in enumerate(reference):
        if "send" in rec and _is_parse_error(rec.get("reply")):
            return i >= len(ours) or not _is_parse_error(ours[i].get("reply"))
    first = next((i for i, rec in enumerate(reference) if "send" in rec), None)
    return (
        first is not None
        and reference[first].get("outcome") == "EOF"
        and (first >= len(ours) or ours[first].get("outcome") != "EOF")
    )


class Compat:
    """Owns one scratch root with `ref/` and `ours/` and every daemon started for a test.

    `close()` stops all of them by PID (the conftest fixture calls it, even on failure).
    """

    def __init__(self, root: Path | None = None) -> None:
        self.root = Path(tempfile.mkdtemp(prefix="qc", dir="/tmp")) if root is None else root
        self.dirs = {"reference": self.root / "ref", "ours": self.root / "ours"}
        self.commands = {"reference": reference_command(), "ours": ours_command()}
        self._daemons: list[DaemonProcess] = []
        self._clients: list[RawQmp] = []
        self._run = 0

    def _fresh_dirs(self, setup: Setup | None) -> dict[str, Path]:
        self._run += 1
        dirs = {}
        for side, base in self.dirs.items():
            d = base if self._run == 1 else base.with_name(f"{base.name}{self._run}")
            d.mkdir(parents=True, exist_ok=True)
            if setup is not None:
                setup(d)
            dirs[side] = d
        return dirs

    @staticmethod
    def _subst(args: Sequence[str], d: Path) -> list[str]:
        return [a.replace("$D", str(d)) for a in args]

    # -- CLI -----------------------------------------------------------------------------------

    def run_cli(self, case: CliCase) -> CliComparison:
        dirs = self._fresh_dirs(case.setup)
        started = {}
        for side in SIDES:
            daemon = start_cli(self.commands[side], self._subst(case.args, dirs[side]), dirs[side])
            self._daemons.append(daemon)
            started[side] = daemon
        raw = {side: finish_cli(started[side], case.timeout) for side in SIDES}
        norm = {side: _normalise_cli(raw[side], dirs[side]) for side in SIDES}
        return CliComparison(case, raw, norm)

    def check_cli(self, case: CliCase) -> CliComparison:
        result = self.run_cli(case)
        result.assert_same()
        return result

    # -- QMP -----------------------------------------------------------------------------------

    def daemons(
        self, args: Sequence[str] = (), setup: Setup | None = None, ready_timeout: float = 15.0
    ) -> dict[str, DaemonProcess]:
        """Start both daemons (monitor appended), wait for both greetings; stopped at close()."""
        dirs = self._fresh_dirs(setup)
        started = {}
        for side in SIDES:
            daemon = DaemonProcess(self.commands[side], self._subst(args, dirs[side]), dirs[side])
            self._daemons.append(daemon.start())
            started[side] = daemon
        for side, daemon in started.items():
            if not daemon.wait_ready(ready_timeout):
                raise AssertionError(
                    f"{side} daemon exited ({daemon.returncode}) at start-up: {daemon.stderr}"
                )
        return started

    def connect(self, daemon: DaemonProcess, timeout: float = 5.0) -> RawQmp:
        client = daemon.connect_qmp(timeout)
        self._clients.append(client)
        return client

    def run_transcript(
        self,
        steps: Sequence[StepLike],
        *,
        args: Sequence[str] = (),
        setup: Setup | None = None,
        negotiate: bool = True,
        timeout: float = 5.0,
    ) -> TranscriptComparison:
        """Start a fresh pair, run `steps` on each (after `qmp_capabilities` if `negotiate`),
        record the greeting first, normalise.

        A reference transcript that shows qsd's monitor start-up race (see
        `hit_monitor_race`) is run again on a fresh pair, at most twice."""
        built = [as_step(s) for s in steps]
        for attempt in range(3):
            pair = self.daemons(args, setup)
            raw: dict[str, list[dict[str, Any]]] = {}
            for side, daemon in pair.items():
                client = self.connect(daemon, timeout)
                records: list[dict[str, Any]] = [{"greeting": client.greeting}]
                if negotiate:
                    records.append({"negotiate": client.negotiate()})
                records += run_transcript(client, daemon, built, daemon.workdir)
                raw[side] = records
            if attempt == 2 or not hit_monitor_race(raw["reference"], raw["ours"]):
                break
            for daemon in pair.values():
                daemon.stop()
        norm = {
            side: normalise_transcript(records, pair[side].workdir) for side, records in raw.items()
        }
        return TranscriptComparison(raw, norm)

    def check_transcript(self, steps: Sequence[StepLike], **kw: Any) -> TranscriptComparison:
        result = self.run_transcript(steps, **kw)
        result.assert_same()
        return result

    def normaliser(self, daemon: DaemonProcess) -> Normaliser:
        return Normaliser(daemon.workdir)

    # -- teardown ------------------------------------------------------------------------------

    def close(self) -> None:
        for client in self._clients:
            client.close()
        errors = []
        for daemon in self._daemons:
            try:
                daemon.stop()
            except Exception as exc:  # keep stopping the others
                errors.append(exc)
        shutil.rmtree(self.root, ignore_errors=True)
        if errors:
            raise errors[0]
