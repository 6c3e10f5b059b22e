"""The plain user-creatable objects: iothread, secret, authz-simple, authz-list (domain ring).

They hold their properties and answer qom-get/qom-set; secrets load their data on creation
with qsd's checks and texts. Invariant: a secret's `value` is set once, in `complete`.
"""

from __future__ import annotations

import base64
import binascii
import fnmatch
import os
from collections.abc import Callable
from typing import Any

from storage_daemon.errors import QmpError
from storage_daemon.qom.base import UserObject

_INT64_MAX = (1 << 63) - 1


class IoThread(UserObject):
    qom_type = "iothread"
    properties_struct = "IothreadProperties"
    writable = frozenset(
        {
            "poll-max-ns",
            "poll-grow",
            "poll-shrink",
            "aio-max-batch",
            "thread-pool-min",
            "thread-pool-max",
        }
    )

    def complete(self) -> None:
        for name in ("poll-max-ns", "poll-grow", "poll-shrink", "aio-max-batch"):
            value = self.values.get(name)
            if value is not None and not 0 <= value <= _INT64_MAX:
                raise QmpError(f"{name} value must be in range [0, {_INT64_MAX}]")

    def default(self, name: str) -> Any:
        # qsd's defaults: adaptive polling up to 32 us, a thread pool of 0..64 workers.
        return {"poll-max-ns": 32768, "thread-pool-max": 64}.get(name, 0)


def _b64decode(text: bytes | str) -> bytes:
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise QmpError("Base64 data contains invalid characters") from exc


class Secret(UserObject):
    """A password or key; `lookup` finds other secrets (the AES key of an encrypted one)."""

    qom_type = "secret"
    properties_struct = "SecretProperties"
    writable = frozenset({"data", "file", "format", "keyid", "iv", "loaded"})

    def __init__(
        self, object_id: str, options: Any, lookup: Callable[[str], Secret | None]
    ) -> None:
        super().__init__(object_id, options)
        self._lookup = lookup
        self.value = b""

    def default(self, name: str) -> Any:
        if name == "format":
            return "raw"
        if name == "loaded":
            return True
        return super().default(name)

    def complete(self) -> None:
        data, path = self.values.get("data"), self.values.get("file")
        if data is not None and path is not None:
            raise QmpError("'file' and 'data' are mutually exclusive")
        if data is None and path is None:
            raise QmpError("Either 'file' or 'data' must be provided")
        if path is not None:
            try:
                with open(path, "rb") as handle:
                    raw = handle.read()
            except OSError as exc:
                reason = os.strerror(exc.errno or 0)
                raise QmpError(
                    f"Unable to read {path}: Failed to open file \u201c{path}\u201d: {reason}"
                ) from exc
        else:
            raw = str(data).encode()
        keyid = self.values.get("keyid")
        if keyid is not None:
            raw = self._decrypt(keyid, raw)
        elif self.values.get("format") == "base64":
            raw = _b64decode(raw)
        self.value = raw

    def _decrypt(self, keyid: str, ciphertext: bytes) -> bytes:
        key_secret = self._lookup(keyid)
        if key_secret is None:
            raise QmpError(f"No secret with id '{keyid}'")
        key = key_secret.value
        if len(key) != 32:
            raise QmpError("Key should be 32 bytes in length")
        iv_text = self.values.get("iv")
        if iv_text is None:
            raise QmpError("IV is required to decrypt secret")
        iv = _b64decode(iv_text)
        if len(iv) != 16:
            raise QmpError(f"IV should be 16 bytes in length not {len(iv)}")
        data = _b64decode(ciphertext)
        try:
            from cryptography.hazmat.primitives.ciphers import (  # type: ignore[import-not-found]
                Cipher,
                algorithms,
                modes,
            )
        except ImportError as exc:
            raise QmpError(
                "Encrypted secrets (keyid) are not supported: the Python 'cryptography' "
                "package is not installed"
            ) from exc
        decryptor = Cipher(algorithms.AES(key), modes.CBC(iv)).decryptor()
        plain: bytes = decryptor.update(data) + decryptor.finalize()
        if (
            not plain
            or not 1 <= plain[-1] <= 16
            or plain[-plain[-1] :] != bytes([plain[-1]]) * plain[-1]
        ):
            raise QmpError("Incorrect number of padding bytes")
        plain = plain[: -plain[-1]]
        if self.values.get("format") == "base64":
            plain = _b64decode(plain)
        return plain


class AuthzSimple(UserObject):
    qom_type = "authz-simple"
    properties_struct = "AuthZSimpleProperties"
    writable = frozenset({"identity"})

    def is_allowed(self, identity: str) -> bool:
        return identity == self.values.get("identity")


class AuthzList(UserObject):
    qom_type = "authz-list"
    properties_struct = "AuthZListProperties"
    writable = frozenset({"policy", "rules"})

    def default(self, name: str) -> Any:
        return "deny" if name == "policy" else []

    def read(self, name: str) -> Any:
        if name == "rules":
            # qsd shows each rule with its members in its own (hash) order.
            return [
                {
                    **({"format": r["format"]} if "format" in r else {}),
                    "policy": r["policy"],
                    "match": r["match"],
                }
                for r in self.values.get("rules", [])
            ]
        return super().read(name)

    def is_allowed(self, identity: str) -> bool:
        for rule in self.values.get("rules", []):
            if rule.get("format") == "glob":
                hit = fnmatch.fnmatchcase(identity, rule["match"])
            else:
                hit = identity == rule["match"]
            if hit:
                return bool(rule["policy"] == "allow")
        return bool(self.read("policy") == "allow")
