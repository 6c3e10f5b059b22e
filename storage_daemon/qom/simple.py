"""The plain user-creatable objects: iothread, secret, authz-simple, authz-list (domain ring).

They hold their properties and answer qom-get/qom-set; secrets load their data on creation
with qsd's checks and texts. Invariant: a secret's `value` is set once, in `complete`.
"""

from __future__ import annotations

import fnmatch
import os
from collections.abc import Callable
from typing import Any

from storage_daemon.errors import QmpError
from storage_daemon.hostpath import host_path
from storage_daemon.qdict import qdict_order
from storage_daemon.qom.base import UserObject

_INT64_MAX = (1 << 63) - 1
_INT_MAX = (1 << 31) - 1


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

    def __init__(self, object_id: str, options: Any) -> None:
        super().__init__(object_id, options)
        # qsd's property setters check each value, in QDict order, before the object is
        # inserted under /objects.
        for name in qdict_order(self.values):
            value = self.values[name]
            if not 0 <= value <= _INT64_MAX:
                raise QmpError(f"{name} value must be in range [0, {_INT64_MAX}]")

    def complete(self) -> None:
        self._check_pool()

    def _check_pool(self) -> None:
        low, high = self.read("thread-pool-min"), self.read("thread-pool-max")
        if low > high or not high or high > _INT_MAX:
            raise QmpError("bad thread-pool-min/thread-pool-max values")

    def write(self, name: str, value: Any) -> None:
        if not 0 <= value <= _INT64_MAX:
            raise QmpError(f"{name} value must be in range [0, {_INT64_MAX}]")
        # qsd stores the value, then fails to apply a bad pool size: the value stays.
        super().write(name, value)
        if name.startswith("thread-pool-"):
            self._check_pool()

    def default(self, name: str) -> Any:
        # qsd's defaults: adaptive polling up to 32 us, a thread pool of 0..64 workers.
        return {"poll-max-ns": 32768, "thread-pool-max": 64}.get(name, 0)


_BASE64_ALPHABET = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"
_BASE64_RANK = {c: i for i, c in enumerate(_BASE64_ALPHABET)} | {ord("="): 0}


def _b64decode(text: bytes | str) -> bytes:
    """As qsd: only the alphabet, '=' and newlines are allowed; then glib's lenient decoding
    (newlines skipped, '=' worth 0 and dropping a byte only at a group's end, an incomplete
    last group ignored)."""
    raw = text.encode() if isinstance(text, str) else text
    if raw.translate(None, _BASE64_ALPHABET + b"=\n"):
        raise QmpError("Base64 data contains invalid characters")
    out = bytearray()
    value = count = 0
    last = previous = 0
    for char in raw:
        rank = _BASE64_RANK.get(char)
        if rank is None:
            continue  # a newline
        previous, last = last, char
        value = (value << 6) | rank
        count += 1
        if count == 4:
            out.append((value >> 16) & 0xFF)
            if previous != ord("="):
                out.append((value >> 8) & 0xFF)
            if last != ord("="):
                out.append(value & 0xFF)
            value = count = 0
    return bytes(out)


_AES_BLOCK = 16


class Secret(UserObject):
    """A password or key; `lookup` finds other objects (the AES key of an encrypted one)."""

    qom_type = "secret"
    properties_struct = "SecretProperties"
    # qsd 7.2 registers `loaded` without a setter: setting it fails, even in object-add.
    writable = frozenset({"data", "file", "format", "keyid", "iv"})

    def __init__(
        self, object_id: str, options: Any, lookup: Callable[[str], UserObject | None]
    ) -> None:
        if getattr(options, "loaded", None) is not None:
            raise QmpError("Property 'secret.loaded' is not writable")
        super().__init__(object_id, options)
        self._lookup = lookup
        self.value = b""

    def default(self, name: str) -> Any:
        if name == "format":
            return "raw"
        if name == "loaded":
            return True
        return super().default(name)

    def set_property(self, name: str, value: Any) -> None:
        if name == "loaded":
            raise QmpError("Property 'secret.loaded' is not writable")
        # qsd accepts the new text but keeps the value loaded at creation.
        super().set_property(name, value)

    def complete(self) -> None:
        data, path = self.values.get("data"), self.values.get("file")
        if data is not None and path is not None:
            raise QmpError("'file' and 'data' are mutually exclusive")
        if data is None and path is None:
            raise QmpError("Either 'file' or 'data' must be provided")
        if path is not None:
            try:
                with open(host_path(path), "rb") as handle:
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

    def _decrypt(self, keyid: str, text: bytes) -> bytes:
        """AES-256-CBC with the `keyid` secret as key; `format` says how `text` is encoded.

        As qsd does it: the plaintext is never base64-decoded, and the padding check only
        bounds the last byte (it is not full PKCS#7 validation).
        """
        key_secret = self._lookup(keyid)
        if key_secret is None:
            raise QmpError(f"No secret with id '{keyid}'")
        if not isinstance(key_secret, Secret):
            raise QmpError(f"Object with id '{keyid}' is not a secret")
        key = key_secret.value
        if len(key) != 32:
            raise QmpError("Key should be 32 bytes in length")
        iv_text = self.values.get("iv")
        if iv_text is None:
            raise QmpError("IV is required to decrypt secret")
        iv = _b64decode(iv_text)
        if len(iv) != _AES_BLOCK:
            raise QmpError(f"IV should be 16 bytes in length not {len(iv)}")
        data = _b64decode(text) if self.values.get("format") == "base64" else text
        if len(data) % _AES_BLOCK:
            raise QmpError(f"Length {len(data)} must be a multiple of block size {_AES_BLOCK}")
        if not data:
            return b""
        plain = _aes_cbc_decrypt(key, iv, data)
        pad = plain[-1]
        if pad > _AES_BLOCK or pad > len(plain):
            raise QmpError(f"Incorrect number of padding bytes ({pad}) found on decrypted data")
        return plain[: len(plain) - pad]


def _aes_cbc_decrypt(key: bytes, iv: bytes, data: bytes) -> bytes:
    # Imported here, at the first encrypted secret: never on the daemon's start-up path.
    try:
        from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
    except ImportError as exc:
        raise QmpError(
            "Encrypted secrets (keyid) are not supported: the Python 'cryptography' "
            "package is not installed"
        ) from exc
    decryptor = Cipher(algorithms.AES(key), modes.CBC(iv)).decryptor()
    return decryptor.update(data) + decryptor.finalize()


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
