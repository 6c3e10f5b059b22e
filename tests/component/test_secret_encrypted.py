"""Secrets encrypted with another secret (`keyid` + `iv`): AES-256-CBC as qsd 7.2 decrypts them.

Component ring: object-add through the daemon's command path. The ciphertexts are made here
with the `cryptography` package; the expected texts were checked against the reference qsd
(tests/compat/test_objects_compat.py compares them live).
"""

from __future__ import annotations

import base64
import subprocess
import sys
from typing import Any

import pytest
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

import storage_daemon.monitor.commands  # noqa: F401  (handlers imported before any loop runs)
from storage_daemon.daemon import Daemon
from storage_daemon.errors import QmpError
from storage_daemon.qom.simple import Secret

KEY = bytes(range(32))
IV = bytes(range(16, 32))
B64 = base64.b64encode


def encrypt(plain: bytes, pad: bool = True) -> bytes:
    if pad:
        count = 16 - len(plain) % 16
        plain += bytes([count]) * count
    encryptor = Cipher(algorithms.AES(KEY), modes.CBC(IV)).encryptor()
    return encryptor.update(plain) + encryptor.finalize()


async def keyed_daemon() -> Daemon:
    daemon = Daemon()
    await add(daemon, "k", data=B64(KEY).decode(), format="base64")
    return daemon


async def add(daemon: Daemon, object_id: str, **props: Any) -> Secret:
    await daemon.run_command("object-add", {"qom-type": "secret", "id": object_id, **props})
    secret = daemon.objects.secret(object_id)
    assert secret is not None
    return secret


async def add_error(daemon: Daemon, object_id: str, **props: Any) -> str:
    with pytest.raises(QmpError) as info:
        await add(daemon, object_id, **props)
    assert object_id not in daemon.objects.objects
    return info.value.desc


@pytest.mark.parametrize(
    "plain", [b"", b"hello world", b"0123456789abcdef", b"\x00\xff" * 20, B64(b"not decoded")]
)
async def test_base64_ciphertext_decrypts_to_the_plaintext(plain: bytes) -> None:
    daemon = await keyed_daemon()
    iv = B64(IV).decode()
    secret = await add(
        daemon, "s", data=B64(encrypt(plain)).decode(), format="base64", keyid="k", iv=iv
    )
    # `format` describes the ciphertext: the plaintext is never base64-decoded.
    assert secret.value == plain


def decrypt(data: bytes) -> bytes:
    decryptor = Cipher(algorithms.AES(KEY), modes.CBC(IV)).decryptor()
    return decryptor.update(data) + decryptor.finalize()


async def test_raw_ciphertext_is_the_data_text_itself() -> None:
    daemon = await keyed_daemon()
    # Without format=base64 the 16 characters of `data` are the ciphertext: pick printable
    # blocks whose decryption ends in a valid padding count, and one whose does not.
    blocks = [f"{n:016d}".encode() for n in range(2000)]
    good = next(b for b in blocks if 1 <= decrypt(b)[-1] <= 16)
    bad = next(b for b in blocks if decrypt(b)[-1] > 16)
    iv = B64(IV).decode()
    plain = decrypt(good)
    secret = await add(daemon, "s", data=good.decode(), keyid="k", iv=iv)
    assert secret.value == plain[: 16 - plain[-1]]
    assert await add_error(daemon, "e", data=bad.decode(), keyid="k", iv=iv) == (
        f"Incorrect number of padding bytes ({decrypt(bad)[-1]}) found on decrypted data"
    )


async def test_padding_is_bounded_not_validated() -> None:
    daemon = await keyed_daemon()
    iv = B64(IV).decode()
    # qsd only checks that the last byte is at most 16: a zero or inconsistent pad passes.
    zero = await add(
        daemon,
        "z",
        data=B64(encrypt(b"x" * 15 + b"\0", pad=False)).decode(),
        format="base64",
        keyid="k",
        iv=iv,
    )
    assert zero.value == b"x" * 15 + b"\0"
    odd = await add(
        daemon,
        "o",
        data=B64(encrypt(b"y" * 14 + b"\1\2", pad=False)).decode(),
        format="base64",
        keyid="k",
        iv=iv,
    )
    assert odd.value == b"y" * 14
    big = B64(encrypt(b"z" * 15 + b"\x66", pad=False)).decode()
    assert await add_error(daemon, "b", data=big, format="base64", keyid="k", iv=iv) == (
        "Incorrect number of padding bytes (102) found on decrypted data"
    )


async def test_encrypted_secret_errors() -> None:
    daemon = await keyed_daemon()
    await add(daemon, "short", data="abc")
    await daemon.run_command("object-add", {"qom-type": "iothread", "id": "io"})
    iv = B64(IV).decode()
    good = B64(encrypt(b"pw")).decode()
    cases: list[tuple[dict[str, Any], str]] = [
        ({"keyid": "nosuch", "iv": iv}, "No secret with id 'nosuch'"),
        ({"keyid": "io", "iv": iv}, "Object with id 'io' is not a secret"),
        ({"keyid": "short", "iv": iv}, "Key should be 32 bytes in length"),
        ({"keyid": "k"}, "IV is required to decrypt secret"),
        ({"keyid": "k", "iv": "AAAA"}, "IV should be 16 bytes in length not 3"),
        ({"keyid": "k", "iv": "!!"}, "Base64 data contains invalid characters"),
        # Without format=base64 the base64 text itself is the (24-byte) ciphertext.
        ({"keyid": "k", "iv": iv}, "Length 24 must be a multiple of block size 16"),
        (
            {"keyid": "k", "iv": iv, "format": "base64", "data": "YWJj"},
            "Length 3 must be a multiple of block size 16",
        ),
        (
            {"keyid": "k", "iv": iv, "format": "base64", "data": "!!"},
            "Base64 data contains invalid characters",
        ),
    ]
    for props, message in cases:
        assert await add_error(daemon, "e", **{"data": good, **props}) == message


async def test_loaded_is_read_only() -> None:
    daemon = Daemon()
    for value in (True, False):
        desc = await add_error(daemon, "s", data="abc", loaded=value)
        assert desc == "Property 'secret.loaded' is not writable"
    await add(daemon, "s", data="abc")
    assert await daemon.run_command("qom-get", {"path": "/objects/s", "property": "loaded"})
    with pytest.raises(QmpError) as info:
        await daemon.run_command(
            "qom-set", {"path": "/objects/s", "property": "loaded", "value": True}
        )
    assert info.value.desc == "Property 'secret.loaded' is not writable"
    # The other properties take new text after creation (the loaded value stays).
    await daemon.run_command("qom-set", {"path": "/objects/s", "property": "iv", "value": "x"})
    assert await daemon.run_command("qom-get", {"path": "/objects/s", "property": "iv"}) == "x"
    assert daemon.objects.secret("s").value == b"abc"  # type: ignore[union-attr]


def test_cryptography_is_not_imported_at_start_up() -> None:
    code = (
        "import sys, storage_daemon.daemon, storage_daemon.objects, storage_daemon.cli;"
        "import storage_daemon.monitor.commands;"
        "sys.exit(1 if 'cryptography' in sys.modules else 0)"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, timeout=60)
    assert done.returncode == 0, done.stderr
