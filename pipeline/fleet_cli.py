"""``gpumeter fleet``: load and show the fleet registry (which GPUs each provider really has)."""

from __future__ import annotations

from collections import Counter
from datetime import UTC, datetime
from pathlib import Path

import click

from gpumeter.cli import settings_from
from gpumeter.errors import GpumeterError
from gpumeter.fleet import read_fleet
from pipeline import clickhouse, fleet_store


@click.group()
def fleet() -> None:
    """The fleet registry: which GPUs each provider has, on which host, in which price class."""


def _client(ctx: click.Context) -> tuple[object, str]:
    s = settings_from(ctx)
    client = clickhouse.connect(s.clickhouse_dsn_resolved, s.clickhouse_database, s.clickhouse_ca_file)
    clickhouse.ensure_schema(client, s.clickhouse_database)
    return client, s.clickhouse_database


@fleet.command("load")
@click.argument("fleet_file", metavar="FLEET.csv", type=click.Path(dir_okay=False, path_type=Path))
@click.pass_context
def load(ctx: click.Context, fleet_file: Path) -> None:
    """Make a fleet file the current registry (a new version; the old ones stay).

    \b
    Header: provider_id, host_id, gpu_uuid, gpu_class, window_seconds, valid_from,
            valid_to, parent_uuid
    One row per device and period; the format and its rules are in docs/file-formats.md.
    Providers need not type UUIDs: `gpumeter agent inventory` prints a host's rows.
    The file is checked whole; a bad row refuses it (FILE:LINE: reason) and nothing
    is written. Loading the same content again changes nothing.

    \b
    Example:
      gpumeter agent inventory > P01-H01.csv       # on each GPU host
      gpumeter fleet load fleet.csv                # the providers' rows, one file
    """
    devices = read_fleet(fleet_file)
    client, db = _client(ctx)
    result = fleet_store.load_fleet(client, db, devices, source=fleet_file.name)
    v = result.version
    if not result.changed:
        click.echo(f"{fleet_file}: unchanged, the current registry is already version {v.version} "
                   f"({v.devices} devices)")  # fmt: skip
        return
    hosts = len({d.host_id for d in devices})
    providers = len({d.provider_id for d in devices})
    click.echo(f"{fleet_file}: loaded as version {v.version}: {v.devices} device row(s), {hosts} host(s), "
               f"{providers} provider(s)")  # fmt: skip


@fleet.command("show")
@click.option(
    "--at",
    type=click.DateTime(["%Y-%m-%dT%H:%M:%S%z", "%Y-%m-%d"]),
    help="Registered at this time (default: now), e.g. 2026-03-01 or 2026-03-01T08:00:00+08:00.",
)
@click.pass_context
def show(ctx: click.Context, at: datetime | None) -> None:
    """GPUs registered per provider and class at one time, from the current version.

    \b
    Example:
      gpumeter fleet show --at 2026-03-01
    """
    client, db = _client(ctx)
    version = fleet_store.current_version(client, db)
    if version is None:
        raise GpumeterError("no fleet registry loaded yet: run `gpumeter fleet load FLEET.csv` first")
    when = (at or datetime.now(UTC)).replace(tzinfo=(at.tzinfo if at and at.tzinfo else UTC))
    rows = [d for d in fleet_store.devices(client, db, version.version) if d.valid_from <= when < d.valid_to]
    click.echo(f"fleet registry version {version.version}, loaded {version.loaded_at:%Y-%m-%d %H:%M} UTC "
               f"from {version.source}; at {when.astimezone(UTC):%Y-%m-%d %H:%M} UTC:")  # fmt: skip
    counts = Counter((d.provider_id, d.gpu_class) for d in rows)
    hosts = Counter(p for p, _ in {(d.provider_id, d.host_id) for d in rows})
    click.echo(f"{'provider':<12} {'class':<14} {'GPUs':>6} {'hosts':>6}")
    for (provider, gpu_class), n in sorted(counts.items()):
        click.echo(f"{provider:<12} {gpu_class:<14} {n:>6} {hosts[provider]:>6}")
    click.echo(f"{'total':<12} {'':<14} {len(rows):>6} {sum(hosts.values()):>6}")
