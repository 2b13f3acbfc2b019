"""``gpumeter keys``: the registry of the keys hosts sign their usage with (pipeline/keys.py)."""

from __future__ import annotations

import fcntl
import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from pathlib import Path

import click

from gpumeter.errors import ConfigError
from gpumeter.fleet import ID
from gpumeter.record import public_key_text
from pipeline.keys import (
    ED25519,
    HostKey,
    KeyRegistry,
    key_order,
    load_registry,
    parse_public_key,
    write_registry,
)

# a rotation or a new key may start this long before now (clocks differ); earlier would refuse batches
# the old key already signed
PAST_SLACK = timedelta(minutes=5)

PUBLIC_KEY_HELP = "base64, or a file holding it (PEM or base64)."
REGISTRY_OPTION = click.option(
    "--registry",
    "registry_path",
    envvar="GPUMETER_KEYS",
    required=True,
    type=click.Path(dir_okay=False, path_type=Path),
    help="The keys registry file the loader reads (env GPUMETER_KEYS).",
)


@click.group()
def keys() -> None:
    """The keys hosts sign their usage with: add, rotate, revoke, list.

    The loader holds only public keys: an agent makes its own key pair
    (`gpumeter agent keygen`) and its provider hands over the public key.
    Every change rewrites the registry whole, at mode 0600; a running loader
    reads it again within a few seconds.

    \b
    A host's key, from first install to retirement:
      gpumeter agent keygen /etc/gpumeter/agent.key     # on the host: prints the public key
      gpumeter keys new --registry keys.toml --host P01-H01 --provider P01 --public-key BASE64
      gpumeter agent keygen /etc/gpumeter/agent-2027.key  # a year on, a new pair
      gpumeter keys rotate --registry keys.toml --host P01-H01 --public-key BASE64
      gpumeter keys revoke --registry keys.toml P01-H01.20261204 --reason "host disk stolen"
      gpumeter keys list --registry keys.toml
    """


@contextmanager
def _locked(path: Path) -> Iterator[None]:
    """One change to the registry at a time (two staff, or a script beside a person)."""
    lock = path.with_name(f".{path.name}.lock")
    fd = os.open(lock, os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def _read(path: Path, may_be_new: bool = False) -> KeyRegistry:
    if may_be_new and not path.exists():
        return KeyRegistry({})
    return load_registry(path)


def _public_key(text: str) -> str:
    """The base64 public key of ``--public-key``: the key itself, or a file holding it (PEM or base64)."""
    candidate = Path(text)
    try:
        is_file = candidate.is_file()
    except OSError:  # a base64 string too long to be a file name
        is_file = False
    source = candidate.read_text(encoding="utf-8", errors="replace") if is_file else text
    try:
        return public_key_text(parse_public_key(source))
    except ValueError as exc:
        where = f"{text} (a file)" if is_file else "--public-key"
        raise click.BadParameter(f"{where} is not an Ed25519 public key: {exc}", param_hint="--public-key") from None


def _time(value: str | None, option: str) -> datetime:
    if value is None:
        return datetime.now(UTC).replace(microsecond=0)
    try:
        when = datetime.fromisoformat(value)
    except ValueError:
        raise click.BadParameter(f"{value!r} is not an ISO-8601 time", param_hint=option) from None
    if when.tzinfo is None:
        raise click.BadParameter(f"{value!r} needs its UTC offset (e.g. 2026-12-04T00:00:00Z)", param_hint=option)
    return when.astimezone(UTC)


def _not_past(when: datetime, option: str) -> None:
    if when < datetime.now(UTC) - PAST_SLACK:
        raise click.BadParameter(
            f"{when.isoformat()} is in the past: batches already signed since then would be refused",
            param_hint=option,
        )


def _key_id(registry: KeyRegistry, host: str, when: datetime, wanted: str | None) -> str:
    if wanted is not None:
        if wanted in registry.keys:
            raise click.BadParameter(f"key id {wanted!r} is already in the registry", param_hint="--key-id")
        if not ID.fullmatch(wanted):
            raise click.BadParameter(f"{wanted!r}: letters, digits, then . _ - (at most 64)", param_hint="--key-id")
        return wanted
    base = f"{host}.{when:%Y%m%d}"
    key_id, n = base, 1
    while key_id in registry.keys:
        n += 1
        key_id = f"{base}.{n}"
    return key_id


def _with(registry: KeyRegistry, *changed: HostKey) -> KeyRegistry:
    keys = dict(registry.keys)
    keys.update({k.key_id: k for k in changed})
    return KeyRegistry(keys)


def _save(path: Path, registry: KeyRegistry) -> None:
    write_registry(path, registry)


def _shown(when: datetime | None) -> str:
    return when.strftime("%Y-%m-%dT%H:%M:%SZ") if when is not None else "-"


@keys.command("new")
@REGISTRY_OPTION
@click.option("--host", "host_id", required=True, help="The host the key signs for (its agent's host_id).")
@click.option("--provider", "provider_id", required=True, help="The provider that owns the host.")
@click.option(
    "--public-key", required=True, help="The agent's public key: base64, or a file holding it (PEM or base64)."
)
@click.option("--key-id", default=None, help="Key id (default HOST.YYYYMMDD); the agent's key_id must match.")
@click.option(
    "--valid-from",
    default=None,
    help="ISO-8601 time the key starts to be valid (default: no start, so what the agent spooled "
    "before it was registered loads too).",
)
@click.option("--note", default="", help="Free text kept with the key (who handed it over, a ticket).")
def new(
    registry_path: Path,
    host_id: str,
    provider_id: str,
    public_key: str,
    key_id: str | None,
    valid_from: str | None,
    note: str,
) -> None:
    """Register a host's first key (the registry file is made if it does not exist).

    A host that already has a key gets its next one with `keys rotate`.

    \b
    Example:
      gpumeter keys new --registry /etc/gpumeter/keys.toml --host P01-H01 --provider P01 \\
          --public-key 3L6gqM0...=
    """
    for value, option in ((host_id, "--host"), (provider_id, "--provider")):
        if not ID.fullmatch(value):
            raise click.BadParameter(f"{value!r}: letters, digits, then . _ - (at most 64)", param_hint=option)
    material = _public_key(public_key)
    start = _time(valid_from, "--valid-from") if valid_from is not None else None
    with _locked(registry_path):
        registry = _read(registry_path, may_be_new=True)
        if host_id in registry.hosts:
            raise ConfigError(f"host {host_id} already has keys in {registry_path}; give it a new one with keys rotate")
        if any(k.material == material for k in registry.keys.values()):
            raise ConfigError(f"that public key is already registered in {registry_path}: every host has its own")
        kid = _key_id(registry, host_id, start or datetime.now(UTC), key_id)
        key = HostKey(kid, host_id, provider_id, ED25519, material, valid_from=start, note=note)
        _save(registry_path, _with(registry, key))
    since = f"valid from {_shown(start)}" if start is not None else "valid now"
    click.echo(f"{registry_path}: key {kid} of host {host_id} (provider {provider_id}) {since}")
    click.echo(f"set key_id = {kid!r} in the agent's config (or name its key file {kid}.key)")


@keys.command("rotate")
@REGISTRY_OPTION
@click.option("--host", "host_id", required=True, help="The host whose key is replaced.")
@click.option("--public-key", required=True, help=f"The new public key: {PUBLIC_KEY_HELP}")
@click.option("--key-id", default=None, help="Id of the new key (default HOST.YYYYMMDD).")
@click.option("--at", "at", default=None, help="ISO-8601 time the new key takes over (default: now).")
@click.option(
    "--overlap",
    type=click.FloatRange(min=0, max=30),
    default=1.0,
    show_default=True,
    metavar="DAYS",
    help="Both keys are valid this long either side of --at: the agent switches when it restarts, "
    "not at the second, and its clock may be off.",
)
@click.option("--note", default="", help="Free text kept with the new key.")
def rotate(
    registry_path: Path,
    host_id: str,
    public_key: str,
    key_id: str | None,
    at: str | None,
    overlap: float,
    note: str,
) -> None:
    """Give a host a new key; its current key stays valid for batches made before the switch.

    The old key stays valid until --overlap after the switch and the new one
    is valid from --overlap before it: a backlog the agent made durable
    (spooled) before it switched keys still verifies, whenever it arrives
    (up to 30 days after the old key's end), and so does what it signs with
    the new key once restarted. Point the agent at the new key file within
    the overlap; a batch the old key signs after that is refused.

    \b
    Example:
      gpumeter keys rotate --registry /etc/gpumeter/keys.toml --host P01-H01 --public-key agent-2027.pub
      gpumeter keys rotate --registry keys.toml --host P01-H01 --public-key 3L6g...= --at 2027-01-01T00:00:00Z
    """
    material = _public_key(public_key)
    switch = _time(at, "--at")
    _not_past(switch, "--at")
    with _locked(registry_path):
        registry = _read(registry_path)
        own = [k for k in registry.keys.values() if k.host_id == host_id]
        if not own:
            raise ConfigError(f"host {host_id} has no key in {registry_path}; register it with keys new")
        if any(k.material == material for k in registry.keys.values()):
            raise ConfigError(f"that public key is already registered in {registry_path}: a rotation needs a new one")
        live = [k for k in own if k.revoked_at is None and (k.valid_until is None or k.valid_until > switch)]
        if any(k.valid_from is not None and k.valid_from >= switch for k in live):
            raise ConfigError(f"host {host_id} already has a key starting at or after {_shown(switch)}")
        end, start = switch + timedelta(days=overlap), switch - timedelta(days=overlap)
        # an open-ended key ends `overlap` after the switch; one with an end already never gets a later one
        retired = [replace(k, valid_until=end if k.valid_until is None else min(k.valid_until, end)) for k in live]
        kid = _key_id(registry, host_id, switch, key_id)
        key = HostKey(kid, host_id, own[0].provider_id, ED25519, material, valid_from=start, note=note)
        _save(registry_path, _with(registry, *retired, key))
    for k in retired:
        click.echo(f"{registry_path}: key {k.key_id} valid until {_shown(k.valid_until)} (batches made before verify)")
    click.echo(f"{registry_path}: key {kid} of host {host_id} valid from {_shown(start)}")


@keys.command("revoke")
@REGISTRY_OPTION
@click.argument("key_id")
@click.option("--reason", required=True, help="Why (kept with the key): a stolen disk, a leaked file.")
@click.option("--yes", is_flag=True, help="Do not ask for confirmation.")
def revoke(registry_path: Path, key_id: str, reason: str, yes: bool) -> None:
    """Revoke a key that may be in other hands: every batch signed with it is refused from now on.

    Unlike a rotation, this refuses the key's backlog too (whoever holds the
    key can make a batch look old). Refused batches are quarantined whole and
    can be loaded later with `pipeline requeue` should the key be cleared.
    Give the host a new key with `keys rotate`.

    \b
    Example:
      gpumeter keys revoke --registry /etc/gpumeter/keys.toml P01-H01.20261204 --reason "disk stolen"
    """
    with _locked(registry_path):
        registry = _read(registry_path)
        key = registry.keys.get(key_id)
        if key is None:
            raise ConfigError(f"no key {key_id!r} in {registry_path} (gpumeter keys list shows them)")
        if key.revoked_at is not None:
            raise ConfigError(f"key {key_id} was revoked at {_shown(key.revoked_at)} already")
        if not yes:
            click.confirm(
                f"Revoke {key_id} of host {key.host_id}? Every batch signed with it will be refused", abort=True
            )
        now = datetime.now(UTC).replace(microsecond=0)
        note = f"{key.note}; revoked: {reason}" if key.note else f"revoked: {reason}"
        saved = _with(registry, replace(key, revoked_at=now, note=note))
        _save(registry_path, saved)
    click.echo(f"{registry_path}: key {key_id} of host {key.host_id} revoked at {_shown(now)}")
    if not any(k.host_id == key.host_id and k.state(now) in {"current", "future"} for k in saved.keys.values()):
        click.echo(f"host {key.host_id} has no valid key now: give it one with keys rotate", err=True)


@keys.command("list")
@REGISTRY_OPTION
@click.option("--host", "host_id", default=None, help="Only this host's keys.")
def list_keys(registry_path: Path, host_id: str | None) -> None:
    """Every key with its host, provider, algorithm, validity and state (current, future, retired, revoked).

    \b
    Example:
      gpumeter keys list --registry /etc/gpumeter/keys.toml
      gpumeter keys list --registry keys.toml --host P01-H01
    """
    registry = _read(registry_path)
    now = datetime.now(UTC)
    rows = [k for k in registry.keys.values() if host_id is None or k.host_id == host_id]
    if not rows:
        raise ConfigError(f"no key of host {host_id} in {registry_path}")
    header = ("key_id", "host_id", "provider_id", "algorithm", "state", "valid_from", "valid_until", "revoked_at")
    table = [header]
    for k in sorted(rows, key=key_order):
        when = (_shown(k.valid_from), _shown(k.valid_until), _shown(k.revoked_at))
        table.append((k.key_id, k.host_id, k.provider_id, k.algorithm, k.state(now), *when))
    widths = [max(len(r[i]) for r in table) for i in range(len(header))]
    for r in table:
        click.echo("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip())
