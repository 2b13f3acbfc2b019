"""Everything the project says to ClickHouse: connection, DDL, inserts, usage reads.

One code path for the embedded engine (``chdb://PATH``) and a server
(``http://host:8123``). The pipeline owns the DDL and creates it idempotently.

Tables (database from settings, default ``gpumeter``):

- ``usage_raw``: every delivery of every usage window, as delivered, with its
  Kafka topic/partition/offset (or ``import`` source) and ``ingested_at``.
  Plain MergeTree: nothing is ever collapsed away behind our back.
  ``non_replicated_deduplication_window`` makes a replayed insert block (same
  ``insert_deduplication_token``) a no-op.
- ``usage_quarantine``: messages that could not be decoded or verified: raw
  bytes, reason, source offset. Never billed.
- ``usage_windows`` (view): one row per record_id, the *first* delivery
  (earliest ``ingested_at``, then partition, offset). Billing reads only this.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from datetime import date
from typing import Any

from gpumeter.errors import ConfigError, StoreBusyError

RAW_COLUMNS = (
    "record_id", "seq", "provider_id", "host_id", "gpu_uuid", "gpu_class", "firm_id",
    "window_start", "window_end", "allocated_seconds", "busy_seconds", "energy_joules",
    "agent_version", "source", "kafka_partition", "kafka_offset", "ingested_at",
)  # fmt: skip

QUARANTINE_COLUMNS = ("raw", "reason", "source", "kafka_partition", "kafka_offset", "quarantined_at")

_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


def connect(dsn: str, database: str) -> Any:
    """A clickhouse-connect client with ``database`` created; StoreBusyError if chDB's path is held."""
    if not _NAME.match(database):
        raise ConfigError(f"ClickHouse database name {database!r} is not a plain identifier")
    try:
        import clickhouse_connect
    except ModuleNotFoundError as exc:  # pragma: no cover - depends on the install
        from gpumeter.errors import MissingExtraError

        raise MissingExtraError("pipeline", "clickhouse_connect") from exc
    try:
        client = clickhouse_connect.get_client(dsn=dsn)
    except Exception as exc:
        text = str(exc)
        if "EmbeddedServer" in text or "Code: 36" in text or "already initialized" in text:
            raise StoreBusyError(
                f"the embedded ClickHouse store {dsn} is in use by another process (or this process "
                "opened a different chdb path). Stop that process (e.g. a running 'gpumeter pipeline "
                "run') and try again, or point GPUMETER_CLICKHOUSE_DSN at a ClickHouse server, which "
                "has no such limit."
            ) from exc
        raise
    client.command(f"CREATE DATABASE IF NOT EXISTS {database}")
    return client


def ensure_schema(client: Any, database: str) -> None:
    db = database
    client.command(
        f"""
        CREATE TABLE IF NOT EXISTS {db}.usage_raw (
            record_id String,
            seq UInt64,
            provider_id LowCardinality(String),
            host_id LowCardinality(String),
            gpu_uuid LowCardinality(String),
            gpu_class LowCardinality(String),
            firm_id LowCardinality(String),
            window_start DateTime64(3, 'UTC'),
            window_end DateTime64(3, 'UTC'),
            allocated_seconds UInt32,
            busy_seconds Nullable(Float64),
            energy_joules Nullable(Float64),
            agent_version LowCardinality(String),
            source LowCardinality(String),
            kafka_partition Int32,
            kafka_offset Int64,
            ingested_at DateTime64(6, 'UTC')
        )
        ENGINE = MergeTree
        PARTITION BY toYYYYMM(window_start)
        ORDER BY (record_id, ingested_at)
        SETTINGS non_replicated_deduplication_window = 10000
        """
    )
    client.command(
        f"""
        CREATE TABLE IF NOT EXISTS {db}.usage_quarantine (
            raw String,
            reason String,
            source LowCardinality(String),
            kafka_partition Int32,
            kafka_offset Int64,
            quarantined_at DateTime64(6, 'UTC')
        )
        ENGINE = MergeTree
        ORDER BY (source, kafka_partition, kafka_offset)
        SETTINGS non_replicated_deduplication_window = 10000
        """
    )
    client.command(
        f"""
        CREATE VIEW IF NOT EXISTS {db}.usage_windows AS
        SELECT
            record_id,
            first.1 AS provider_id, first.2 AS host_id, first.3 AS gpu_uuid, first.4 AS gpu_class,
            first.5 AS firm_id, first.6 AS window_start, first.7 AS window_end,
            first.8 AS allocated_seconds, first.9 AS busy_seconds, first.10 AS energy_joules,
            first.11 AS ingested_at,
            deliveries
        FROM (
            SELECT
                record_id,
                argMin(
                    (provider_id, host_id, gpu_uuid, gpu_class, firm_id, window_start, window_end,
                     allocated_seconds, busy_seconds, energy_joules, ingested_at),
                    (ingested_at, kafka_partition, kafka_offset)
                ) AS first,
                count() AS deliveries
            FROM {db}.usage_raw
            GROUP BY record_id
        )
        """
    )


def insert_raw(client: Any, database: str, rows: Sequence[Sequence[Any]], dedup_token: str | None) -> None:
    settings = {"insert_deduplication_token": dedup_token} if dedup_token else None
    client.insert(f"{database}.usage_raw", rows, column_names=RAW_COLUMNS, settings=settings)


def insert_quarantine(
    client: Any, database: str, rows: Sequence[Sequence[Any]], dedup_token: str | None
) -> None:
    settings = {"insert_deduplication_token": dedup_token} if dedup_token else None
    client.insert(f"{database}.usage_quarantine", rows, column_names=QUARANTINE_COLUMNS, settings=settings)


def gpu_seconds_by_day(
    client: Any, database: str, tz: str, first_day: date | None = None, last_day: date | None = None
) -> list[tuple[str, date, str, str, int, int]]:
    """(firm_id, day, provider_id, gpu_class, allocated_seconds, records) from deduplicated usage."""
    where = []
    params: dict[str, Any] = {"tz": tz}
    if first_day is not None:
        where.append("toDate(window_start, {tz:String}) >= {first:Date}")
        params["first"] = first_day
    if last_day is not None:
        where.append("toDate(window_start, {tz:String}) <= {last:Date}")
        params["last"] = last_day
    clause = ("WHERE " + " AND ".join(where)) if where else ""
    result = client.query(
        f"""
        SELECT firm_id, toDate(window_start, {{tz:String}}) AS day, provider_id, gpu_class,
               sum(allocated_seconds) AS allocated_seconds, count() AS records
        FROM {database}.usage_windows
        {clause}
        GROUP BY firm_id, day, provider_id, gpu_class
        ORDER BY firm_id, day, provider_id, gpu_class
        """,
        parameters=params,
    )
    return [(str(r[0]), r[1], str(r[2]), str(r[3]), int(r[4]), int(r[5])) for r in result.result_rows]


def count_rows(client: Any, database: str, table: str) -> int:
    if not _NAME.match(table):
        raise ValueError(table)
    return int(client.query(f"SELECT count() FROM {database}.{table}").result_rows[0][0])
