"""The keys registry: which host signs with which key, and which provider owns the host.

File format (TOML), one table per host; key ids are unique across the file and
secrets are hex (what ``KafkaSink(signing_key=(key_id, bytes.fromhex(secret)))``
signs with)::

    [hosts."P01-H01"]
    provider_id = "P01"
    keys = { "P01-H01.2026-03" = "9f2c...e1" }   # key id = hex secret; several during rotation

A batch is accepted when its ``gm-key-id`` names a key in this file, its
``gm-sig`` is the HMAC of the value under that key (gpumeter.record.verify), and
- checked inside ClickHouse, window by window - its host is the key's host and
every window's provider is that host's provider.
"""

from __future__ import annotations

import tomllib
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gpumeter.errors import ConfigError
from gpumeter.record import verify


@dataclass(frozen=True, slots=True)
class Signer:
    host_id: str
    provider_id: str


@dataclass(frozen=True, slots=True)
class KeyRegistry:
    secrets: dict[str, bytes]  # key id -> secret
    signers: dict[str, Signer]  # key id -> the host it belongs to

    def verify(self, value: bytes, headers: Iterable[tuple[str, bytes]]) -> Signer:
        """The signer of a message value; RecordError (unsigned, unknown key, bad signature) if none."""
        return self.signers[verify(value, headers, self.secrets)]

    @property
    def hosts(self) -> set[str]:
        return {s.host_id for s in self.signers.values()}


def parse_registry(data: dict[str, Any], where: str = "keys file") -> KeyRegistry:
    hosts = data.get("hosts")
    if not isinstance(hosts, dict) or not hosts:
        raise ConfigError(f'{where}: needs at least one [hosts."HOST_ID"] table')
    unknown = sorted(set(data) - {"hosts"})
    if unknown:
        raise ConfigError(f"{where}: unknown top-level key(s) {', '.join(unknown)}; expected only [hosts.*]")
    secrets: dict[str, bytes] = {}
    signers: dict[str, Signer] = {}
    for host_id, entry in sorted(hosts.items()):
        if not isinstance(entry, dict):
            raise ConfigError(f"{where}: hosts.{host_id} must be a table")
        provider = entry.get("provider_id")
        keys = entry.get("keys")
        if not isinstance(provider, str) or not provider:
            raise ConfigError(f"{where}: hosts.{host_id}.provider_id must be a non-empty string")
        if not isinstance(keys, dict) or not keys:
            raise ConfigError(f"{where}: hosts.{host_id}.keys must map at least one key id to a hex secret")
        for key_id, secret in keys.items():
            if key_id in secrets:
                raise ConfigError(f"{where}: key id {key_id!r} appears for more than one host")
            try:
                raw = bytes.fromhex(secret) if isinstance(secret, str) else b""
            except ValueError:
                raw = b""
            if len(raw) < 16:
                raise ConfigError(f"{where}: hosts.{host_id}.keys.{key_id} must be at least 16 bytes of hex")
            secrets[key_id] = raw
            signers[key_id] = Signer(host_id, provider)
    return KeyRegistry(secrets, signers)


def load_registry(path: Path) -> KeyRegistry:
    try:
        with path.open("rb") as fh:
            data = tomllib.load(fh)
    except FileNotFoundError as exc:
        raise ConfigError(f"{path}: keys file not found") from exc
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}") from exc
    return parse_registry(data, str(path))
