"""``gpumeter pipeline`` and ``gpumeter usage``."""

from __future__ import annotations

import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import click

from gpumeter.cli import settings_from
from gpumeter.errors import GpumeterError
from gpumeter.kafkalog import until_connected
from gpumeter.metrics import render, serve, write_textfile
from gpumeter.redact import redact
from gpumeter.signals import stop_requested
from pipeline import clickhouse
from pipeline.coverage import coverage_table
from pipeline.gaps import SILENT_AFTER_S, gaps_table
from pipeline.keys import RegistryFile, load_registry
from pipeline.loader import DeadLetter, Loader, LoaderStats, LoaderStopped, TransientError, make_consumer
from pipeline.loader_metrics import collect
from pipeline.requeue import requeue
from pipeline.usage_store import UsageStore

CLUSTER_OPTION = click.option(
    "--cluster",
    envvar="GPUMETER_CLICKHOUSE_CLUSTER",
    default=None,
    help="Create the DDL ON CLUSTER with Replicated engines (env GPUMETER_CLICKHOUSE_CLUSTER).",
)
METRICS_EVERY_S = 15.0
UNCHECKED = (
    "WARNING: --insecure: batch signatures and host/provider registrations are NOT checked; "
    "only plausibility checks run. Never in production."
)
NO_KEYS = (
    "no --keys file: the loader verifies every batch's signature against the keys registry "
    "(see `gpumeter keys --help`); pass --keys FILE, or --insecure for a test that checks no signatures"
)


@click.group()
def pipeline() -> None:
    """Load usage from Kafka into ClickHouse, exactly once."""


@pipeline.command("init")
@CLUSTER_OPTION
@click.pass_context
def init(ctx: click.Context, cluster: str | None) -> None:
    """Create the ClickHouse database and tables (idempotent).

    \b
    Example:
      gpumeter pipeline init
      gpumeter pipeline init --cluster prod
    """
    s = settings_from(ctx)
    client = clickhouse.connect(s.clickhouse_dsn_resolved, s.clickhouse_database, s.clickhouse_ca_file)
    clickhouse.ensure_schema(client, s.clickhouse_database, cluster=cluster)
    click.echo(f"ClickHouse schema ready in {s.clickhouse_database} ({redact(s.clickhouse_dsn_resolved)})")


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
@click.option(
    "--keys",
    "keys_file",
    type=click.Path(dir_okay=False, path_type=Path),
    envvar="GPUMETER_KEYS",
    help="Keys registry (TOML: hosts, their provider and signing keys; env GPUMETER_KEYS); see pipeline/README.md.",
)
@click.option(
    "--insecure",
    is_flag=True,
    help="Run without --keys: check no signature or host registration (tests and demos only).",
)
@click.option(
    "--dead-letter-topic",
    default=None,
    help="Topic for rejected messages and windows (default: <topic>.dead-letter; '-' for none).",
)
@click.option(
    "--rebalance-timeout",
    type=click.FloatRange(min=1, max=3600),
    default=None,
    metavar="SECONDS",
    help="Longest pause between polls before the group reassigns this loader's partitions; also how "
    "long a join waits for the group (default 300).",
)
@click.option(
    "--metrics-port",
    type=click.IntRange(min=1, max=65535),
    help="Serve Prometheus self-metrics at /metrics on this port.",
)
@click.option(
    "--metrics-addr",
    default="127.0.0.1",
    show_default=True,
    help="Address the metrics endpoint listens on (0.0.0.0 in a pod network).",
)
@click.option(
    "--metrics-textfile",
    type=click.Path(dir_okay=False, path_type=Path),
    help="Also write the metrics to this file (node_exporter textfile collector) every 15 s and at exit.",
)
@CLUSTER_OPTION
@click.pass_context
def run(
    ctx: click.Context,
    kafka_bootstrap: str | None,
    topic: str | None,
    group_id: str,
    idle_exit: float | None,
    keys_file: Path | None,
    insecure: bool,
    dead_letter_topic: str | None,
    rebalance_timeout: float | None,
    metrics_port: int | None,
    metrics_addr: str,
    metrics_textfile: Path | None,
    cluster: str | None,
) -> None:
    """Consume usage batches and insert them into ClickHouse; offsets are committed only after the insert.

    Verifies each batch's signature against --keys, checks every window, and
    quarantines what fails (table usage_quarantine and the dead-letter topic).
    Run several with the same --group to share partitions (against a ClickHouse
    server: the embedded store is one process per path). Exit 3: a permanent
    failure (a missing table or privilege) stopped it, nothing committed; fix
    it and start again. Self-metrics: lag per partition, windows loaded,
    rejections by reason, blocks deduplicated, last commit time.

    \b
    Example:
      gpumeter pipeline run --keys /etc/gpumeter/keys.toml --group loaders
      gpumeter pipeline run --keys keys.toml --metrics-port 9465
    """
    s = settings_from(ctx, kafka_bootstrap=kafka_bootstrap, topic=topic)
    security = s.kafka_security()  # a bad TLS/SASL setting stops here, before anything is made
    if keys_file is None and not insecure:
        raise click.UsageError(NO_KEYS)
    if keys_file is not None and insecure:
        raise click.UsageError("--keys and --insecure together: choose one")
    keys = RegistryFile(keys_file) if keys_file is not None else None
    if keys is None:
        click.echo(UNCHECKED, err=True)
    client = clickhouse.connect(s.clickhouse_dsn_resolved, s.clickhouse_database, s.clickhouse_ca_file)
    clickhouse.ensure_schema(client, s.clickhouse_database, cluster=cluster)
    should_stop = stop_requested()
    consumer = until_connected(
        lambda: make_consumer(
            s.kafka_bootstrap, s.topic, group_id, rebalance_timeout_s=rebalance_timeout, security=security
        ),
        s.kafka_bootstrap,
        should_stop,
    )
    dlq_topic = dead_letter_topic or f"{s.topic}.dead-letter"
    dead_letter = (
        until_connected(
            lambda: DeadLetter(s.kafka_bootstrap, dlq_topic, security=security), s.kafka_bootstrap, should_stop
        )
        if dlq_topic != "-" and consumer is not None
        else None
    )
    if consumer is None or (dead_letter is None and dlq_topic != "-"):
        click.echo("stopped before Kafka could be reached; nothing consumed", err=True)
        if consumer is not None:
            consumer.close(autocommit=False)
        return
    loader = Loader(consumer, client, s.clickhouse_database, s.topic, keys=keys, dead_letter=dead_letter)

    def body() -> str:
        return render(collect(loader))

    server = serve(metrics_addr, metrics_port, body) if metrics_port else None
    written = [0.0]

    def until(_: LoaderStats) -> bool:
        if metrics_textfile is not None and time.monotonic() - written[0] >= METRICS_EVERY_S:
            write_textfile(metrics_textfile, body())
            written[0] = time.monotonic()
        return should_stop()

    try:
        stats = loader.run(until=until, idle_timeout_s=idle_exit)
    except LoaderStopped:
        loader.stats.stopped = 1
        raise
    finally:
        consumer.close(autocommit=False)
        if dead_letter is not None:
            dead_letter.close()
        if metrics_textfile is not None:
            write_textfile(metrics_textfile, body())
        if server is not None:
            server.shutdown()
    click.echo(f"messages={stats.messages} windows={stats.windows} quarantined={stats.quarantined}", err=True)


@pipeline.command("gaps")
@click.option(
    "--silent-after",
    type=click.FloatRange(min=1),
    default=SILENT_AFTER_S,
    show_default=True,
    metavar="SECONDS",
    help="Report an agent not heard from for this long as silent (agents send at least once a minute).",
)
@click.option(
    "--keys",
    "keys_file",
    type=click.Path(dir_okay=False, path_type=Path),
    help="Keys registry: its hosts that never sent anything are listed too.",
)
@click.pass_context
def gaps(ctx: click.Context, silent_after: float, keys_file: Path | None) -> None:
    """List, per agent (host_id), the sequence numbers never loaded, and silent agents.

    One sequence numbers an agent's usage windows and (from 0.3.0 on) its GPU
    windows. A gap between seqs seen shows exactly which did not arrive. A
    missing tail - windows after the last one that arrived - shows from the
    agent's high-water mark, which every message (and a heartbeat at least once
    a minute) carries from schema v3 on. An agent not heard from for
    --silent-after seconds is "silent since" its last message (when the agent made it, or for
    older agents when its last window ended, never later than its arrival: a replayed message of a
    dead host does not make it look alive).

    \b
    Example:
      gpumeter pipeline gaps
      gpumeter pipeline gaps --silent-after 900 --keys /etc/gpumeter/keys.toml
    """
    s = settings_from(ctx)
    registered = sorted(load_registry(keys_file).hosts) if keys_file is not None else []
    client = clickhouse.connect(s.clickhouse_dsn_resolved, s.clickhouse_database, s.clickhouse_ca_file)
    clickhouse.ensure_schema(client, s.clickhouse_database)
    db = s.clickhouse_database
    table = gaps_table(
        clickhouse.seq_extents(client, db),
        clickhouse.seq_gaps(client, db),
        clickhouse.agent_contact(client, db),
        silent_after_s=silent_after,
        registered=registered,
    )
    click.echo(table)


DAY = click.DateTime(["%Y-%m-%d"])


@pipeline.command("coverage")
@click.option("--from", "first_day", required=True, type=DAY, help="First UTC day (inclusive).")
@click.option("--to", "last_day", required=True, type=DAY, help="Last UTC day (inclusive).")
@click.option("--strict", is_flag=True, help="Exit 1 when there is a problem (for monitoring).")
@click.pass_context
def coverage_command(ctx: click.Context, first_day: datetime, last_day: datetime, strict: bool) -> None:
    """Show, per GPU, where every second of its windows went, and what does not add up.

    From the GPU windows agents send from 0.3.0 on (schema v4): each GPU window
    accounts its seconds as sold (held by firms), unattributed, idle, unread
    (the driver did not answer: NVML down, the GPU lost) or unsampled (the agent
    was not sampling: down, a tick skipped). Listed as problems: a GPU window
    whose usage windows do not add up to what it says, time between a GPU's
    first and last GPU window that none covers, GPU windows that overlap, and
    usage windows no GPU window accounts for.

    \b
    Example:
      gpumeter pipeline coverage --from 2026-03-01 --to 2026-03-31
      gpumeter pipeline coverage --from 2026-03-01 --to 2026-03-01 --strict
    """
    if last_day < first_day:
        raise click.BadParameter("--to is before --from", param_hint="--to")
    s = settings_from(ctx)
    client = clickhouse.connect(s.clickhouse_dsn_resolved, s.clickhouse_database, s.clickhouse_ca_file)
    clickhouse.ensure_schema(client, s.clickhouse_database)
    start, end = first_day.replace(tzinfo=UTC), last_day.replace(tzinfo=UTC) + timedelta(days=1)
    db = s.clickhouse_database
    text, problems = coverage_table(
        UsageStore(client, db).coverage(start, end), UsageStore(client, db).uncovered(start, end)
    )
    click.echo(text)
    if strict and problems:
        ctx.exit(1)


@pipeline.command("requeue")
@click.option(
    "--keys",
    "keys_file",
    required=True,
    type=click.Path(dir_okay=False, path_type=Path),
    help="Keys registry to verify the signatures with (the one the loader will use).",
)
@click.option("--dry-run", is_flag=True, help="Verify and report; insert and record nothing.")
@click.pass_context
def requeue_command(ctx: click.Context, keys_file: Path, dry_run: bool) -> None:
    """Verify quarantined messages again and load the ones that now pass, exactly once.

    For messages the loader rejected whole (unsigned, unknown key, bad signature,
    bad framing, over a limit, refused by ClickHouse) - say after a host's key
    was added to the keys file. Each passes the loader's checks again, then
    every window is checked in ClickHouse as on the way in. A message loaded
    once is never loaded again; one still rejected stays quarantined and is
    tried again by the next run. With the embedded store, stop the loader first.

    \b
    Example:
      gpumeter pipeline requeue --keys /etc/gpumeter/keys.toml --dry-run
      gpumeter pipeline requeue --keys /etc/gpumeter/keys.toml
    """
    s = settings_from(ctx)
    keys = load_registry(keys_file)
    client = clickhouse.connect(s.clickhouse_dsn_resolved, s.clickhouse_database, s.clickhouse_ca_file)
    clickhouse.ensure_schema(client, s.clickhouse_database)

    def progress(n: int) -> None:
        if n % 100 == 0:
            click.echo(f"... {n} message(s) tried", err=True)

    try:
        report = requeue(client, s.clickhouse_database, keys, dry_run=dry_run, progress=progress)
    except TransientError as exc:
        raise GpumeterError(str(exc)) from exc
    click.echo(report.text(dry_run))


@pipeline.command("rollup")
@click.option(
    "--since",
    default=None,
    help="Recompute hours with deliveries ingested since this UTC time "
    "(ISO-8601). Default: 10 minutes before the last rollup, or everything on the first run.",
)
@click.pass_context
def rollup(ctx: click.Context, since: str | None) -> None:
    """Refresh the hourly dashboard rollup (usage_hourly, read it with FINAL).

    Hours are recomputed from first deliveries, so replays and re-sent windows
    never inflate them; running it again changes nothing. Billing never reads it.

    \b
    Example:
      gpumeter pipeline rollup
      gpumeter pipeline rollup --since 2026-03-01T00:00:00+00:00
    """
    s = settings_from(ctx)
    client = clickhouse.connect(s.clickhouse_dsn_resolved, s.clickhouse_database, s.clickhouse_ca_file)
    clickhouse.ensure_schema(client, s.clickhouse_database)
    if since is not None:
        try:
            start = datetime.fromisoformat(since)
        except ValueError:
            raise click.BadParameter(f"{since!r} is not an ISO-8601 time", param_hint="--since") from None
        start = start.astimezone(UTC).replace(tzinfo=None) if start.tzinfo else start
    else:
        last = client.query(f"SELECT max(refreshed_at), count() FROM {s.clickhouse_database}.usage_hourly").result_rows
        start = last[0][0] - timedelta(minutes=10) if last and last[0][1] else datetime(2000, 1, 1)
    hours = UsageStore(client, s.clickhouse_database).refresh_rollups(start)
    click.echo(f"usage_hourly: {hours} hour(s) recomputed from deliveries ingested since {start.isoformat()} UTC")
