"""``gpumeter pipeline`` and ``gpumeter usage``."""

from __future__ import annotations

import signal
from types import FrameType

import click

from gpumeter.cli import settings_from
from pipeline import clickhouse
from pipeline.loader import Loader, make_consumer


@click.group()
def pipeline() -> None:
    """Load usage from Kafka into ClickHouse, exactly once."""


@pipeline.command("init")
@click.pass_context
def init(ctx: click.Context) -> None:
    """Create the ClickHouse database and tables (idempotent)."""
    s = settings_from(ctx)
    client = clickhouse.connect(s.clickhouse_dsn_resolved, s.clickhouse_database)
    clickhouse.ensure_schema(client, s.clickhouse_database)
    click.echo(f"ClickHouse schema ready in {s.clickhouse_database} ({s.clickhouse_dsn_resolved})")


@pipeline.command("run")
@click.option("--kafka", "kafka_bootstrap", metavar="BOOTSTRAP", help="Kafka bootstrap servers.")
@click.option("--topic", help="Usage topic (default gpumeter.usage.v1).")
@click.option("--group", "group_id", default="gpumeter-loader", show_default=True, help="Consumer group id.")
@click.option(
    "--idle-exit",
    type=float,
    default=None,
    help="Exit after this many seconds without new messages (default: run until stopped).",
)
@click.pass_context
def run(
    ctx: click.Context, kafka_bootstrap: str | None, topic: str | None, group_id: str, idle_exit: float | None
) -> None:
    """Consume usage batches and insert them into ClickHouse; offsets are committed only after the insert.

    Run several with the same --group to share partitions.
    """
    s = settings_from(ctx, kafka_bootstrap=kafka_bootstrap, topic=topic)
    client = clickhouse.connect(s.clickhouse_dsn_resolved, s.clickhouse_database)
    clickhouse.ensure_schema(client, s.clickhouse_database)
    consumer = make_consumer(s.kafka_bootstrap, s.topic, group_id)
    stopping = False

    def _stop(signum: int, frame: FrameType | None) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGTERM, _stop)
    signal.signal(signal.SIGINT, _stop)
    loader = Loader(consumer, client, s.clickhouse_database, s.topic)
    try:
        stats = loader.run(until=lambda _: stopping, idle_timeout_s=idle_exit)
    finally:
        consumer.close()
    click.echo(f"messages={stats.messages} windows={stats.windows} quarantined={stats.quarantined}", err=True)
