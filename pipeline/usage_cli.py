"""``gpumeter usage``: look at and import usage in ClickHouse."""

from __future__ import annotations

import hashlib
from datetime import UTC, datetime
from pathlib import Path
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import click

from gpumeter.cli import settings_from
from gpumeter.inputfiles import InputFileError
from gpumeter.settings import Settings
from gpumeter.storemeta import peek_meta
from pipeline import clickhouse
from pipeline.report import gpu_hours_table
from pipeline.usage_csv import read_usage
from pipeline.usage_store import UsageStore


def _store(s: Settings) -> UsageStore:
    client = clickhouse.connect(s.clickhouse_dsn_resolved, s.clickhouse_database, s.clickhouse_ca_file)
    clickhouse.ensure_schema(client, s.clickhouse_database)
    return UsageStore(client, s.clickhouse_database)


def _billing_timezone(s: Settings) -> str | None:
    """The billing store's time zone, if it has one (read only; ``gpumeter.storemeta``)."""
    return peek_meta(s.billing_db_resolved, "timezone")


@click.group()
def usage() -> None:
    """Inspect and import usage in ClickHouse."""


@usage.command("summary")
@click.option("--from", "first_day", type=click.DateTime(["%Y-%m-%d"]), help="First day (inclusive).")
@click.option("--to", "last_day", type=click.DateTime(["%Y-%m-%d"]), help="Last day (inclusive).")
@click.option(
    "--timezone", "tz", default=None, help="Time zone that defines days. Default: the billing time zone (else UTC)."
)
@click.option(
    "--by",
    type=click.Choice(["firm-class", "firm-day-provider-class"]),
    default="firm-class",
    show_default=True,
    help="Grouping of the table.",
)
@click.pass_context
def summary(ctx: click.Context, first_day: datetime | None, last_day: datetime | None, tz: str | None, by: str) -> None:
    """GPU-hours from deduplicated usage (each record_id once, its first delivery).

    Days are those of the billing time zone (the rate card's), as on invoices, so
    the hours match the invoiced hours; without a billing store, UTC.

    \b
    Example:
      gpumeter usage summary --from 2026-03-01 --to 2026-03-31
      gpumeter usage summary --from 2026-03-01 --to 2026-03-31 --timezone Asia/Shanghai
    """
    s = settings_from(ctx)
    if tz is None:
        billing_tz = _billing_timezone(s)
        tz = billing_tz or "UTC"
        click.echo(f"days in {tz}" + (" (the billing time zone)" if billing_tz else " (no billing time zone loaded)"),
                   err=True)  # fmt: skip
    else:
        try:
            ZoneInfo(tz)
        except (ZoneInfoNotFoundError, ValueError):
            raise click.BadParameter(
                f"{tz!r} is not an IANA time zone such as Asia/Shanghai", param_hint="--timezone"
            ) from None
    rows = _store(s).gpu_seconds_by_day(
        tz, first_day.date() if first_day else None, last_day.date() if last_day else None
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
    busy_seconds and energy_joules may be empty. record_id is the first 32 hex
    digits of the SHA-256 of host_id, gpu_uuid, firm_id and window_start (epoch
    milliseconds) joined by the byte 0x1f, as the agent computes it.

    The file is checked whole, by the same rules the Kafka loader applies to every
    window (record id, length, seconds, energy, time); a bad row refuses it
    (FILE:LINE: reason) and nothing is written, as do two rows of the file with
    one record_id and different content (both lines named). Records are
    deduplicated by record_id: one already known is not billed again, and a
    record_id delivered again later with different content is reported at
    settlement and never billed twice.
    Importing the same file again changes nothing.

    \b
    Example:
      gpumeter usage import usage-2026-03.csv
    """
    s = settings_from(ctx)
    windows, problems = read_usage(csv_file)
    content = csv_file.read_bytes()
    token = "import:" + hashlib.sha256(content).hexdigest()
    store = _store(s)
    now = datetime.now(UTC)
    problems += store.rejected(windows, now)  # the loader's rules, over the rows that parsed
    if problems:
        raise InputFileError(csv_file, sorted(problems))
    ids = list(dict.fromkeys(w.record_id for w in windows))
    known = store.known_record_ids(ids)
    store.import_windows(windows, source=f"import:{csv_file.name}", token=token, now=now)
    new = len(ids) - len(known)
    click.echo(
        f"{csv_file}: {len(windows)} row(s), {len(ids)} record_id(s): {new} new, {len(known)} already in the store "
        "(counted once)"
    )
