"""The keys registry: which host signs with which key, when the key is valid, which provider owns the host.

File format (TOML), one table per host and one per key; key ids are unique across the file::

    [hosts."P01-H01"]
    provider_id = "P01"

    [hosts."P01-H01".keys."P01-H01.2026-12"]
    algorithm = "ed25519"                       # the default; the pipeline holds only the public key
    public_key = "u3T1...="                     # base64 of the 32 raw bytes (``gpumeter agent keygen``)
    valid_from = 2026-12-01T00:00:00Z           # optional: batches made before it are refused
    valid_until = 2027-06-01T00:00:00Z          # optional: set by ``keys rotate``; batches made after it refused
    # revoked_at = 2027-01-10T09:30:00Z         # set by ``keys revoke``: every batch signed with it refused

    [hosts."P01-H02".keys."P01-H02.legacy"]     # a host set up before Ed25519: a shared HMAC secret
    algorithm = "hmac-sha256"
    secret = "9f2c...e1"                        # hex, at least 32 bytes

The form of 0.3 (``keys = { "key id" = "hex secret" }`` under a host) still loads, as HMAC keys with no
validity bounds. The file must not be readable or writable by anyone but its owner (0600).

A batch is accepted when its ``gm-key-id`` names a key in this file that is not revoked, its ``gm-sig``
verifies under that key (gpumeter.record.check_signature), and - checked inside ClickHouse, window by
window, since the batch's ``made_at`` lies past its windows - it was made inside the key's validity,
none of its windows ends after it was made, its host is the key's host and every window's provider is
that host's provider. So a rotation keeps the old key's backlog: a batch verifies under the key that
was valid when the agent made it durable.
"""

from __future__ import annotations

import base64
import binascii
import logging
import os
import stat
import time
import tomllib
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from gpumeter.errors import ConfigError, RecordError
from gpumeter.files import check_owner_only, write_atomic
from gpumeter.record import VerifyingKey, check_signature, public_key_text, signed_key_id

log = logging.getLogger("gpumeter.keys")

ED25519 = "ed25519"
HMAC_SHA256 = "hmac-sha256"
ALGORITHMS = (ED25519, HMAC_SHA256)
MIN_SECRET_BYTES = 32  # what the agent requires of an HMAC key file
KEY_FIELDS = {"algorithm", "public_key", "secret", "valid_from", "valid_until", "revoked_at", "note"}
NO_BOUND = -1  # a validity bound that is not set, as the ingest prefix carries it


@dataclass(frozen=True, slots=True)
class Signer:
    """Whom a verified batch speaks for, and the bounds (epoch ms, -1 = none) of the key that signed it."""

    host_id: str
    provider_id: str
    valid_from_ms: int = NO_BOUND
    valid_until_ms: int = NO_BOUND


@dataclass(frozen=True, slots=True)
class HostKey:
    """One key of the registry as written (``material``: base64 public key, or hex secret)."""

    key_id: str
    host_id: str
    provider_id: str
    algorithm: str
    material: str
    valid_from: datetime | None = None
    valid_until: datetime | None = None
    revoked_at: datetime | None = None
    note: str = ""

    def state(self, now: datetime) -> str:
        """revoked, future (not yet valid), retired (validity over) or current."""
        if self.revoked_at is not None:
            return "revoked"
        if self.valid_from is not None and now < self.valid_from:
            return "future"
        if self.valid_until is not None and now >= self.valid_until:
            return "retired"
        return "current"

    @property
    def signer(self) -> Signer:
        return Signer(self.host_id, self.provider_id, _ms(self.valid_from), _ms(self.valid_until))

    def verifier(self) -> VerifyingKey:
        """What checks this key's signatures: the Ed25519 public key, or the HMAC secret."""
        return parse_public_key(self.material) if self.algorithm == ED25519 else bytes.fromhex(self.material)


def _ms(when: datetime | None) -> int:
    return NO_BOUND if when is None else int(when.timestamp() * 1000)


@dataclass(frozen=True, slots=True)
class KeyRegistry:
    keys: dict[str, HostKey]  # key id -> the key as written
    # derived from ``keys`` once, so every registry (parsed, or built by ``gpumeter keys``) verifies
    verifiers: dict[str, VerifyingKey] = field(init=False, repr=False)  # key id -> what checks its signatures
    signers: dict[str, Signer] = field(init=False, repr=False)  # key id -> the host it belongs to

    def __post_init__(self) -> None:
        object.__setattr__(self, "verifiers", {k: e.verifier() for k, e in self.keys.items()})
        object.__setattr__(self, "signers", {k: e.signer for k, e in self.keys.items()})

    def verify(self, value: bytes, headers: Iterable[tuple[str, bytes]]) -> Signer:
        """The signer of a message value; RecordError (unsigned, unknown or revoked key, bad signature) if none."""
        key_id, sig, shown = signed_key_id(headers)
        entry = self.keys.get(key_id)
        if entry is None:
            raise RecordError(f"unknown signing key id {shown!r}")
        if entry.revoked_at is not None:
            raise RecordError(f"revoked signing key id {shown!r}")
        check_signature(value, sig, self.verifiers[key_id], shown)
        return self.signers[key_id]

    @property
    def hosts(self) -> set[str]:
        return {k.host_id for k in self.keys.values()}

    @property
    def providers(self) -> dict[str, str]:
        """host id -> its provider."""
        return {k.host_id: k.provider_id for k in self.keys.values()}


def parse_public_key(text: str) -> Ed25519PublicKey:
    """An Ed25519 public key from base64 of its 32 raw bytes, or a PEM ``PUBLIC KEY`` block
    (what ``openssl pkey -pubout`` writes); ValueError saying why not."""
    text = text.strip()
    if text.startswith("-----BEGIN"):
        key = serialization.load_pem_public_key(text.encode())
        if not isinstance(key, Ed25519PublicKey):
            raise ValueError("the PEM block is not an Ed25519 public key")
        return key
    try:
        raw = base64.b64decode(text, validate=True)
    except binascii.Error:
        raise ValueError("not base64") from None
    if len(raw) != 32:
        raise ValueError(f"an Ed25519 public key has 32 bytes, this has {len(raw)}")
    return Ed25519PublicKey.from_public_bytes(raw)


def _when(value: Any, where: str) -> datetime | None:
    if value is None:
        return None
    if isinstance(value, str):
        try:
            value = datetime.fromisoformat(value)
        except ValueError:
            value = None
    if not isinstance(value, datetime) or value.tzinfo is None:
        raise ConfigError(f"{where} must be a date-time with its UTC offset, e.g. 2026-12-01T00:00:00Z")
    return value.astimezone(UTC)


def _host_key(where: str, key_id: str, host_id: str, provider: str, spec: Any) -> HostKey:
    """One key table checked whole; its material as the registry writes it (``HostKey.verifier``)."""
    if isinstance(spec, str):  # the 0.3 form: key id = hex secret
        spec = {"algorithm": HMAC_SHA256, "secret": spec}
    if not isinstance(spec, dict):
        raise ConfigError(f"{where} must be a table (algorithm, public_key or secret, validity)")
    unknown = sorted(set(spec) - KEY_FIELDS)
    if unknown:
        raise ConfigError(f"{where}: unknown field(s) {', '.join(unknown)}; expected {', '.join(sorted(KEY_FIELDS))}")
    algorithm = spec.get("algorithm", ED25519)
    if algorithm not in ALGORITHMS:
        raise ConfigError(f"{where}.algorithm must be one of {', '.join(ALGORITHMS)}, got {algorithm!r}")
    if algorithm == ED25519:
        material = spec.get("public_key")
        if "secret" in spec:
            raise ConfigError(f"{where}: an ed25519 key has a public_key, never a secret")
        try:
            material = public_key_text(parse_public_key(material if isinstance(material, str) else ""))
        except ValueError as exc:
            raise ConfigError(f"{where}.public_key is not an Ed25519 public key: {exc}") from None
    else:
        secret = spec.get("secret")
        if "public_key" in spec:
            raise ConfigError(f"{where}: an hmac-sha256 key has a secret, not a public_key")
        try:
            raw = bytes.fromhex(secret) if isinstance(secret, str) else b""
        except ValueError:
            raw = b""
        if len(raw) < MIN_SECRET_BYTES:
            raise ConfigError(f"{where} must be a secret of at least {MIN_SECRET_BYTES} bytes of hex")
        material = raw.hex()
    note = spec.get("note", "")
    if not isinstance(note, str):
        raise ConfigError(f"{where}.note must be a string")
    valid_from = _when(spec.get("valid_from"), f"{where}.valid_from")
    valid_until = _when(spec.get("valid_until"), f"{where}.valid_until")
    if valid_from is not None and valid_until is not None and valid_until <= valid_from:
        raise ConfigError(f"{where}: valid_until must be after valid_from")
    revoked_at = _when(spec.get("revoked_at"), f"{where}.revoked_at")
    return HostKey(key_id, host_id, provider, algorithm, material, valid_from, valid_until, revoked_at, note)


def parse_registry(data: dict[str, Any], where: str = "keys file") -> KeyRegistry:
    hosts = data.get("hosts")
    if not isinstance(hosts, dict) or not hosts:
        raise ConfigError(f'{where}: needs at least one [hosts."HOST_ID"] table')
    unknown = sorted(set(data) - {"hosts"})
    if unknown:
        raise ConfigError(f"{where}: unknown top-level key(s) {', '.join(unknown)}; expected only [hosts.*]")
    keys: dict[str, HostKey] = {}
    for host_id, entry in sorted(hosts.items()):
        if not isinstance(entry, dict):
            raise ConfigError(f"{where}: hosts.{host_id} must be a table")
        provider = entry.get("provider_id")
        host_keys = entry.get("keys")
        if not isinstance(provider, str) or not provider:
            raise ConfigError(f"{where}: hosts.{host_id}.provider_id must be a non-empty string")
        if not isinstance(host_keys, dict) or not host_keys:
            raise ConfigError(f"{where}: hosts.{host_id}.keys must hold at least one key")
        for key_id, spec in host_keys.items():
            if key_id in keys:
                raise ConfigError(f"{where}: key id {key_id!r} appears for more than one host")
            keys[key_id] = _host_key(f"{where}: hosts.{host_id}.keys.{key_id}", key_id, host_id, provider, spec)
    return KeyRegistry(keys)


def check_private(st: os.stat_result, path: Path, what: str, group_read: bool = False) -> int:
    """ConfigError unless the file of ``st`` is readable and writable by its owner only (0600 or
    stricter; with ``group_read`` its group may read it too) and owned by root or by this user (no
    one else may be able to change it). Its mode."""
    mode = check_owner_only(st.st_mode, f"{path}: {what}", path, group_read)
    if st.st_uid not in (0, os.geteuid()):
        raise ConfigError(f"{path}: {what} is owned by uid {st.st_uid}, neither root nor this user ({os.geteuid()})")
    return mode


def load_registry(path: Path) -> KeyRegistry:
    """The registry file: 0600 or stricter. One of public keys only may also be read by its group (a
    Kubernetes Secret mounted with ``fsGroup`` is 0440); one that holds an HMAC secret may not."""
    try:
        with path.open("rb") as fh:
            mode = check_private(os.fstat(fh.fileno()), path, "keys file", group_read=True)
            data = tomllib.load(fh)
    except FileNotFoundError as exc:
        raise ConfigError(f"{path}: keys file not found") from exc
    except OSError as exc:
        raise ConfigError(f"{path}: {exc.strerror or exc}") from exc
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start})") from exc
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}") from exc
    registry = parse_registry(data, str(path))
    secret = sorted(k for k, key in registry.keys.items() if key.algorithm == HMAC_SHA256)
    if mode & stat.S_IRGRP and secret:
        raise ConfigError(
            f"{path}: keys file holds HMAC secrets ({', '.join(secret[:3])}{'...' if len(secret) > 3 else ''}) "
            f"and its group can read it (mode {mode:04o}); chmod 600 {path}"
        )
    return registry


class RegistryFile:
    """The registry file as a long-running loader sees it: read again when it changes (looked at no
    more than every ``every_s``), so a key added, rotated or revoked takes effect without a restart.
    A change that does not load is logged, and the last registry that loaded stays in force."""

    def __init__(self, path: Path, every_s: float = 5.0, clock: Callable[[], float] = time.monotonic) -> None:
        self.path = path
        self.every_s = every_s
        self.clock = clock
        self.registry = load_registry(path)
        self._seen = self._stamp()
        self._looked = clock()
        self.reloads = 0
        self.stale = False  # the file changed and did not load: the keys in force are older than it

    def _stamp(self) -> tuple[int, ...] | None:
        """What tells a changed file: its content (mtime, size, inode: a Secret swaps a link) and its
        mode and owner (ctime), so a chmod that makes a refused file loadable is seen too."""
        try:
            st = self.path.stat()
        except OSError:
            return None
        return (st.st_mtime_ns, st.st_ctime_ns, st.st_size, st.st_ino, st.st_mode, st.st_uid)

    def current(self) -> KeyRegistry:
        now = self.clock()
        if now - self._looked < self.every_s:
            return self.registry
        self._looked = now
        stamp = self._stamp()
        if stamp == self._seen:
            return self.registry
        self._seen = stamp
        try:
            self.registry = load_registry(self.path)
        except ConfigError as exc:
            self.stale = True
            log.error("keys file changed but does not load, keeping the keys loaded before: %s", exc)
            return self.registry
        self.stale = False
        self.reloads += 1
        log.warning("keys file %s read again: %d key(s) of %d host(s)", self.path, len(self.registry.keys),
                    len(self.registry.hosts))  # fmt: skip
        return self.registry

    def verify(self, value: bytes, headers: Iterable[tuple[str, bytes]]) -> Signer:
        return self.current().verify(value, headers)

    @property
    def hosts(self) -> set[str]:
        return self.current().hosts


Keys = KeyRegistry | RegistryFile  # what the loader verifies with


def key_order(key: HostKey) -> tuple[str, datetime, str]:
    """How keys are listed and written: by host, then oldest first (no start counts as earliest)."""
    return (key.host_id, key.valid_from or datetime.min.replace(tzinfo=UTC), key.key_id)


def registry_document(registry: KeyRegistry) -> dict[str, Any]:
    """The registry as the TOML document ``write_registry`` writes (every key in the table form)."""
    hosts: dict[str, Any] = {}
    for key in sorted(registry.keys.values(), key=key_order):
        host = hosts.setdefault(key.host_id, {"provider_id": key.provider_id, "keys": {}})
        spec: dict[str, Any] = {"algorithm": key.algorithm}
        spec["public_key" if key.algorithm == ED25519 else "secret"] = key.material
        for name in ("valid_from", "valid_until", "revoked_at"):
            if (when := getattr(key, name)) is not None:
                spec[name] = when
        if key.note:
            spec["note"] = key.note
        host["keys"][key.key_id] = spec
    return {"hosts": hosts}


def write_registry(path: Path, registry: KeyRegistry) -> None:
    """Replace the registry file atomically (comments in the old file are not kept). A new file is
    0600; a file that exists keeps its mode (0600 or 0400; 0640/0440 without HMAC secrets) and group,
    so a loader that reads it through its group still can. A symbolic link is followed."""
    import tomli_w

    text = tomli_w.dumps(registry_document(registry))
    parse_registry(tomllib.loads(text), str(path))  # what is written loads back
    target = path.resolve()
    mode, group = 0o600, -1
    try:
        st = target.stat()
        mode = check_private(st, path, "keys file", group_read=True)
        group = st.st_gid
    except FileNotFoundError:
        pass
    if mode & stat.S_IRGRP and any(k.algorithm == HMAC_SHA256 for k in registry.keys.values()):
        mode &= ~stat.S_IRGRP  # never a group-readable secret
    write_atomic(target, text.encode(), sync=True, mode=mode, group=group)
