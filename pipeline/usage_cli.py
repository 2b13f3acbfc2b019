"""``gpumeter usage``: look at and import usage in ClickHouse."""

from __future__ import annotations

from datetime import datetime

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
@click.option(
    "--timezone", "tz", default="UTC", show_default=True, help="Billing time zone that defines days."
)
@click.option(
    "--by",
    type=click.Choice(["firm-class", "firm-day-provider-class"]),
    default="firm-class",
    show_default=True,
    help="Grouping of the table.",
)
@click.pass_context
def summary(
    ctx: click.Context, first_day: datetime | None, last_day: datetime | None, tz: str, by: str
) -> None:
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
