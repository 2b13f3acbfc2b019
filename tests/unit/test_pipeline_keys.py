"""The keys registry file: format errors say exactly what is wrong; verification names the signer."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from gpumeter.errors import ConfigError, RecordError
from gpumeter.record import signature_headers
from pipeline.keys import Signer, load_registry, parse_registry

SECRET = "00112233445566778899aabbccddeeff"
GOOD = {"hosts": {"P01-H01": {"provider_id": "P01", "keys": {"k1": SECRET, "k1b": SECRET[::-1]}}}}


def test_verify_names_the_host_and_provider_of_the_key() -> None:
    reg = parse_registry(GOOD)
    value = b"\xc3\x01batch"
    assert reg.verify(value, signature_headers(value, "k1b", bytes.fromhex(SECRET[::-1]))) == Signer("P01-H01", "P01")
    assert reg.hosts == {"P01-H01"}


@pytest.mark.parametrize(
    ("headers", "reason"),
    [
        ([], "unsigned batch"),
        (signature_headers(b"v", "nope", bytes.fromhex(SECRET)), "unknown signing key id 'nope'"),
        (signature_headers(b"v", "k1", bytes.fromhex(SECRET[::-1])), "bad signature for key id 'k1'"),
        (signature_headers(b"other", "k1", bytes.fromhex(SECRET)), "bad signature for key id 'k1'"),
    ],
    ids=["unsigned", "unknown-key", "wrong-secret", "other-value"],
)
def test_verify_rejects(headers: list[tuple[str, bytes]], reason: str) -> None:
    with pytest.raises(RecordError) as err:
        parse_registry(GOOD).verify(b"v", headers)
    assert str(err.value) == reason


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({}, 'f: needs at least one [hosts."HOST_ID"] table'),
        ({**GOOD, "extra": 1}, "f: unknown top-level key(s) extra; expected only [hosts.*]"),
        ({"hosts": {"h": {"keys": {"k": SECRET}}}}, "f: hosts.h.provider_id must be a non-empty string"),
        ({"hosts": {"h": {"provider_id": "P"}}}, "f: hosts.h.keys must map at least one key id to a hex secret"),
        (
            {"hosts": {"h": {"provider_id": "P", "keys": {"k": "zz"}}}},
            "f: hosts.h.keys.k must be at least 16 bytes of hex",
        ),
        (
            {"hosts": {"h": {"provider_id": "P", "keys": {"k": "00ff"}}}},
            "f: hosts.h.keys.k must be at least 16 bytes of hex",
        ),
        (
            {
                "hosts": {
                    "a": {"provider_id": "P", "keys": {"k": SECRET}},
                    "b": {"provider_id": "P", "keys": {"k": SECRET}},
                }
            },
            "f: key id 'k' appears for more than one host",
        ),
    ],
    ids=["empty", "unknown-top", "no-provider", "no-keys", "not-hex", "short", "shared-key-id"],
)
def test_bad_registry_says_what_is_wrong(data: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError) as err:
        parse_registry(data, "f")
    assert str(err.value) == message


def test_load_registry_from_toml(tmp_path: Path) -> None:
    path = tmp_path / "keys.toml"
    path.write_text(f'[hosts."P01-H01"]\nprovider_id = "P01"\nkeys = {{ "k1" = "{SECRET}" }}\n')
    assert load_registry(path).signers == {"k1": Signer("P01-H01", "P01")}
    with pytest.raises(ConfigError) as err:
        load_registry(tmp_path / "missing.toml")
    assert str(err.value) == f"{tmp_path / 'missing.toml'}: keys file not found"
