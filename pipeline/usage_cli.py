"""``gpumeter usage``: look at and import usage in ClickHouse."""

from __future__ import annotations

import hashlib
from datetime import UTC, datetime
from pathlib import Path

import click

from gpumeter.cli import settings_from
from pipeline import clickhouse
from pipeline.report import gpu_hours_table


@click.group()
def usage() -> None:
    """Inspect and import usage in ClickHouse."""


@usage.command("summary")
@click.option("--from", "first_day", type=click.DateTime(["%Y-%m-%d"]), help="First day (inclusive).")
@click.option("--to", "last_day", type=click.DateTime(["%Y-%m-%d"]), help="Last day (inclusive).")
@click.option("--timezone", "tz", default="UTC", show_default=True, help="Billing time zone that defines days.")
@click.option(
    "--by",
    type=click.Choice(["firm-class", "firm-day-provider-class"]),
    default="firm-class",
    show_default=True,
    help="Grouping of the table.",
)
@click.pass_context
def summary(ctx: click.Context, first_day: datetime | None, last_day: datetime | None, tz: str, by: str) -> None:
    """GPU-hours from deduplicated usage (each record_id once)."""
    s = settings_from(ctx)
    client = clickhouse.connect(s.clickhouse_dsn_resolved, s.clickhouse_database)
    clickhouse.ensure_schema(client, s.clickhouse_database)
    rows = clickhouse.gpu_seconds_by_day(
        client,
        s.clickhouse_database,
        tz,
        first_day.date() if first_day else None,
        last_day.date() if last_day else None,
    )
    click.echo(gpu_hours_table(rows, detailed=(by != "firm-class")))


@usage.command("import")
@click.argument("csv_file", metavar="USAGE.csv", type=click.Path(dir_okay=False, path_type=Path))
@click.pass_context
def import_csv(ctx: click.Context, csv_file: Path) -> None:
    """Import usage windows from a CSV file into the usage store.

    \b
    Header: record_id, window_start, window_end, provider_id, host_id, gpu_uuid,
            gpu_class, firm_id, allocated_seconds, busy_seconds, energy_joules
    Timestamps are ISO-8601 with an offset; allocated_seconds is whole seconds;
    busy_seconds and energy_joules may be empty.

    The file is validated whole: a bad row refuses it (FILE:LINE: reason) and
    nothing is written. Records are deduplicated by record_id: one already known
    is not billed again, and a record_id delivered again with different content
    is reported at settlement and never billed twice. Importing the same file
    again changes nothing.
    """
    from billing.clickhouse_usage import ClickHouseUsage
    from billing.files import read_usage

    s = settings_from(ctx)
    rows = read_usage(csv_file)
    content = csv_file.read_bytes()
    token = "import:" + hashlib.sha256(content).hexdigest()
    client = clickhouse.connect(s.clickhouse_dsn_resolved, s.clickhouse_database)
    clickhouse.ensure_schema(client, s.clickhouse_database)
    store = ClickHouseUsage(client, s.clickhouse_database)
    ids = list(dict.fromkeys(r.record_id for r in rows))
    known = store.known_record_ids(ids)
    store.import_rows(rows, source=f"import:{csv_file.name}", token=token, now=datetime.now(UTC))
    new = len(ids) - len(known)
    click.echo(
        f"{csv_file}: {len(rows)} row(s), {len(ids)} record_id(s): {new} new, {len(known)} already in the store "
        "(counted once)"
    )
