"""qsd 7.2's QOM type hierarchy and class properties, as qom-list-types shows them (domain ring).

Facts observed from the reference daemon: the type table keeps qsd's listing order; only the
property lists of types we implement are given. Invariant: data only, no behaviour.
"""

from __future__ import annotations

from typing import Any

from storage_daemon.errors import QmpError

# (name, parent, abstract) in the order qsd 7.2 lists them.
TYPES: tuple[tuple[str, str | None, bool], ...] = (
    ("qio-channel-null", "qio-channel", False),
    ("authz-simple", "authz", False),
    ("secret_common", "object", True),
    ("qio-channel-socket", "qio-channel", False),
    ("fw_cfg-data-generator", "interface", True),
    ("container", "object", False),
    ("interface", None, True),
    ("tls-creds-anon", "tls-creds", False),
    ("pr-manager-helper", "pr-manager", False),
    ("iothread", "event-loop-base", False),
    ("secret", "secret_common", False),
    ("authz", "object", True),
    ("chardev-serial", "chardev-fd", False),
    ("qio-channel", "object", True),
    ("chardev-mux", "chardev", False),
    ("tls-creds-psk", "tls-creds", False),
    ("tls-creds", "object", True),
    ("qio-channel-file", "qio-channel", False),
    ("qio-channel-command", "qio-channel", False),
    ("qio-channel-websock", "qio-channel", False),
    ("chardev-pipe", "chardev-fd", False),
    ("main-loop", "event-loop-base", False),
    ("chardev-parallel", "chardev", False),
    ("chardev-fd", "chardev", True),
    ("qio-channel-tls", "qio-channel", False),
    ("qio-net-listener", "object", False),
    ("authz-list-file", "authz", False),
    ("pr-manager", "object", True),
    ("chardev-null", "chardev", False),
    ("chardev-ringbuf", "chardev", False),
    ("event-loop-base", "object", True),
    ("qio-dns-resolver", "object", False),
    ("authz-list", "authz", False),
    ("chardev-stdio", "chardev-fd", False),
    ("chardev", "object", True),
    ("user-creatable", "interface", True),
    ("chardev-socket", "chardev", False),
    ("chardev-file", "chardev-fd", False),
    ("chardev-memory", "chardev-ringbuf", False),
    ("qio-channel-buffer", "qio-channel", False),
    ("object", None, True),
    ("chardev-udp", "chardev", False),
    ("tls-creds-x509", "tls-creds", False),
    ("tls-cipher-suites", "tls-creds", False),
    ("chardev-pty", "chardev", False),
    ("thread-context", "object", False),
    ("secret_keyring", "secret_common", False),
    ("throttle-group", "object", False),
)

_PARENT = {name: parent for name, parent, _ in TYPES}
_ABSTRACT = {name for name, _, abstract in TYPES if abstract}
# Types implementing the user-creatable interface (what --object help lists).
USER_CREATABLE = frozenset(
    {
        "authz-simple",
        "tls-creds-anon",
        "pr-manager-helper",
        "iothread",
        "secret",
        "tls-creds-psk",
        "main-loop",
        "authz-list-file",
        "authz-list",
        "tls-creds-x509",
        "tls-cipher-suites",
        "thread-context",
        "secret_keyring",
        "throttle-group",
    }
)

_X_LIMITS = [
    "x-bps-write-max-length",
    "x-iops-total-max-length",
    "x-iops-size",
    "limits",
    "x-bps-total",
    "x-iops-read-max-length",
    "x-bps-write",
    "x-iops-write-max-length",
    "x-bps-read-max",
    "x-iops-read-max",
    "x-bps-total-max",
    "x-bps-read-max-length",
    "x-iops-read",
    "x-bps-read",
    "x-bps-write-max",
    "x-iops-total-max",
    "x-iops-total",
    "x-iops-write",
    "x-bps-total-max-length",
    "x-iops-write-max",
]

# Class properties after `type`, in qsd's listing order: name -> QOM type string.
PROPERTIES: dict[str, tuple[tuple[str, str], ...]] = {
    "throttle-group": tuple(
        (name, "ThrottleLimits" if name == "limits" else "int") for name in _X_LIMITS
    ),
    "secret": (
        ("iv", "string"),
        ("keyid", "string"),
        ("loaded", "bool"),
        ("format", "QCryptoSecretFormat"),
        ("file", "string"),
        ("data", "string"),
    ),
    "authz-simple": (("identity", "string"),),
    "authz-list": (("policy", "QAuthZListPolicy"), ("rules", "QAuthZListRule")),
    "authz-list-file": (("filename", "string"), ("refresh", "bool")),
    "iothread": (
        ("thread-pool-min", "int"),
        ("aio-max-batch", "int"),
        ("thread-pool-max", "int"),
        ("poll-max-ns", "int"),
        ("poll-grow", "int"),
        ("poll-shrink", "int"),
    ),
}


def is_a(name: str, ancestor: str) -> bool:
    """Whether type `name` is `ancestor` or derives from it (or implements it)."""
    if ancestor == "user-creatable" and name in USER_CREATABLE:
        return True
    current: str | None = name
    while current is not None:
        if current == ancestor:
            return True
        current = _PARENT.get(current)
    return False


def list_types(implements: str | None, abstract: bool) -> list[dict[str, Any]]:
    """qom-list-types."""
    out: list[dict[str, Any]] = []
    for name, parent, is_abstract in TYPES:
        if is_abstract and not abstract:
            continue
        if implements is not None and not is_a(name, implements):
            continue
        entry: dict[str, Any] = {"name": name}
        if is_abstract:
            entry = {"abstract": True, "name": name}
        if parent is not None:
            entry["parent"] = parent
        out.append(entry)
    return out


def class_properties(typename: str) -> list[dict[str, Any]]:
    """qom-list-properties: `type`, then the type's own properties."""
    if typename not in _PARENT:
        raise QmpError(f"Class '{typename}' not found", error_class="DeviceNotFound")
    props = [{"name": "type", "type": "string"}]
    props += [{"name": n, "type": t} for n, t in PROPERTIES.get(typename, ())]
    return props
