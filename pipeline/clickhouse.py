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
- ``usage_ingest_v<N>`` (Null engine, one per writer schema version): the loader
  inserts Avro containers here; two materialized views check each window and
  route it to ``usage_raw`` or ``usage_quarantine`` (``schema.py``).
- ``usage_blocks``: the loader's ledger, a row per block loaded (topic, partition,
  offsets, digest, counts): a replay of a block in it is not inserted again.
- ``agent_messages``: one row per v3 message, a batch or a heartbeat: the agent's
  high-water seq when it made it and when it arrived (``pipeline gaps``).
- ``usage_hourly``: dashboard rollup recomputed from first deliveries
  (``usage_store.UsageStore.refresh_rollups``), so replays cannot inflate it.

Which delivery of a record counts (its first) is defined once, in ``usage_store.py``;
every read of usage goes through it.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlparse

from gpumeter.errors import ConfigError, StoreBusyError
from gpumeter.redact import redact
from pipeline.framing import WriterVersion, shipped_versions
from pipeline.schema import RAW_ORDER, Ddl

RAW_COLUMNS = (
    "record_id", "seq", "provider_id", "host_id", "gpu_uuid", "gpu_class", "firm_id",
    "window_start", "window_end", "allocated_seconds", "busy_seconds", "energy_joules",
    "agent_version", "source", "kafka_partition", "kafka_offset", "ingested_at",
)  # fmt: skip

HOURLY_COLUMNS = ("hour", "provider_id", "gpu_class", "firm_id", "allocated_seconds", "records", "refreshed_at")
QUARANTINE_COLUMNS = (
    "raw", "reason", "source", "kafka_partition", "kafka_offset", "quarantined_at", "block_id", "headers",
)  # fmt: skip

_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


# DSN query parameters clickhouse-connect would take over secure/verify/ca_cert
WEAKENING_DSN_PARAMETERS = {"verify", "secure", "ca_cert", "server_host_name", "tls_mode", "client_cert",
                            "client_cert_key", "https_proxy"}  # fmt: skip


def tls_options(dsn: str, ca_file: str = "") -> dict[str, Any]:
    """What an ``https://`` DSN means: TLS, the server's certificate verified (against ``ca_file``,
    else the system's CAs). clickhouse-connect takes TLS only from ``secure`` or the ports 8443/443,
    never from the scheme: without this an https:// DSN on another port went over plain HTTP."""
    scheme = dsn.split("://", 1)[0].lower() if "://" in dsn else ""
    if scheme == "https":
        # clickhouse-connect lets the DSN's query override what is passed here: none may weaken TLS
        weakening = sorted(set(parse_qs(urlparse(dsn).query)) & WEAKENING_DSN_PARAMETERS)
        if weakening:
            raise ConfigError(
                f"the ClickHouse DSN sets {', '.join(weakening)}: an https:// DSN is always verified TLS; "
                "remove it (a private CA goes in clickhouse_ca_file)"
            )
        if ca_file and not Path(ca_file).is_file():
            raise ConfigError(f"clickhouse_ca_file {ca_file}: no such file")
        return {"secure": True, "verify": True, **({"ca_cert": ca_file} if ca_file else {})}
    if ca_file and scheme != "chdb":
        raise ConfigError(f"clickhouse_ca_file is set but the DSN is {scheme}://, not https://: no TLS to verify")
    return {}


def connect(dsn: str, database: str, ca_file: str = "") -> Any:
    """A clickhouse-connect client with ``database`` created; StoreBusyError if chDB's path is held.
    An ``https://`` DSN is TLS with the certificate verified (``tls_options``)."""
    if not _NAME.match(database):
        raise ConfigError(f"ClickHouse database name {database!r} is not a plain identifier")
    try:
        import clickhouse_connect
    except ModuleNotFoundError as exc:  # pragma: no cover - depends on the install
        from gpumeter.errors import MissingExtraError

        raise MissingExtraError("pipeline", "clickhouse_connect") from exc
    try:
        client = clickhouse_connect.get_client(dsn=dsn, **tls_options(dsn, ca_file))
    except Exception as exc:
        text = str(exc)
        if "EmbeddedServer" in text or "Code: 36" in text or "already initialized" in text:
            raise StoreBusyError(
                f"the embedded ClickHouse store {redact(dsn)} is in use by another process (or this process "
                "opened a different chdb path). Stop that process (e.g. a running 'gpumeter pipeline "
                "run') and try again, or point GPUMETER_CLICKHOUSE_DSN at a ClickHouse server, which "
                "has no such limit."
            ) from exc
        raise
    client.command(f"CREATE DATABASE IF NOT EXISTS {database}")
    return client


def ensure_schema(
    client: Any,
    database: str,
    cluster: str | None = None,
    writers: Iterable[WriterVersion] | None = None,
) -> None:
    """Create every table and view (idempotent); ``cluster``: ON CLUSTER with Replicated engines."""
    versions = list(shipped_versions().values() if writers is None else writers)
    ddl = Ddl(database, cluster)
    for statement in ddl.statements(versions):
        client.command(statement)
    _resort_raw(client, ddl, versions)
    existing = [str(r[0]) for r in client.query(f"SHOW TABLES FROM {database}").result_rows]
    for statement in ddl.stale_views(versions, existing):  # views of older checks, after the new ones exist
        client.command(statement)


def _sorting_key(client: Any, database: str, table: str) -> str:
    rows = client.query(
        "SELECT sorting_key FROM system.tables WHERE database = {db:String} AND name = {t:String}",
        parameters={"db": database, "t": table},
    ).result_rows
    return str(rows[0][0]) if rows else ""


def _resort_raw(client: Any, ddl: Ddl, versions: list[WriterVersion]) -> None:
    """Databases made before 0.3 sorted ``usage_raw`` by (record_id, ingested_at); the reads need
    ``schema.RAW_ORDER``. Re-sort once: a copy in the new order, swapped in, with the ingest views
    made again towards it. Run with every loader stopped (``gpumeter pipeline init`` says so)."""
    if _sorting_key(client, ddl.db, "usage_raw") == RAW_ORDER:
        return
    if ddl.cluster:
        raise ConfigError(
            f"{ddl.db}.usage_raw is sorted by ({_sorting_key(client, ddl.db, 'usage_raw')}), this version needs "
            f"({RAW_ORDER}); on a cluster, re-sort it per docs/operations.md before starting this version"
        )
    views = [str(r[0]) for r in client.query(f"SHOW TABLES FROM {ddl.db}").result_rows]
    for name in views:  # towards the old table: made again below
        if name.startswith(tuple(f"{w.ingest_table}_to_" for w in versions)):
            client.command(f"DROP VIEW IF EXISTS {ddl.db}.{name}")
    client.command(f"DROP TABLE IF EXISTS {ddl.db}.usage_raw_resorted")
    client.command(ddl.raw_table().replace(f"{ddl.db}.usage_raw ", f"{ddl.db}.usage_raw_resorted ", 1))
    columns = ", ".join((*RAW_COLUMNS, "samples_taken", "samples_missed"))
    client.command(f"INSERT INTO {ddl.db}.usage_raw_resorted ({columns}) SELECT {columns} FROM {ddl.db}.usage_raw")
    client.command(f"EXCHANGE TABLES {ddl.db}.usage_raw AND {ddl.db}.usage_raw_resorted")
    client.command(f"DROP TABLE {ddl.db}.usage_raw_resorted")
    for writer in versions:  # every view of the ingest tables was dropped above: the heartbeats' and GPU windows' too
        for statement in ddl.ingest_views(writer) + ddl.messages_view(writer) + ddl.gpu_views(writer):
            client.command(statement)


def insert_raw(client: Any, database: str, rows: Sequence[Sequence[Any]], dedup_token: str | None) -> None:
    settings = {"insert_deduplication_token": dedup_token} if dedup_token else None
    client.insert(f"{database}.usage_raw", rows, column_names=RAW_COLUMNS, settings=settings)


def insert_quarantine(client: Any, database: str, rows: Sequence[Sequence[Any]], dedup_token: str | None) -> None:
    settings = {"insert_deduplication_token": dedup_token} if dedup_token else None
    client.insert(f"{database}.usage_quarantine", rows, column_names=QUARANTINE_COLUMNS, settings=settings)


def insert_ingest(client: Any, database: str, writer: WriterVersion, container: bytes, dedup_token: str) -> int:
    """Insert one Avro container into ``usage_ingest_v<N>``; the views fan it out. Returns messages read."""
    settings = {
        "insert_deduplication_token": dedup_token,
        "deduplicate_blocks_in_dependent_materialized_views": 1,
    }
    summary = client.raw_insert(f"{database}.{writer.ingest_table}", None, container, settings=settings, fmt="Avro")
    return int(summary.written_rows or 0)


def quarantined_in_range(
    client: Any, database: str, partition: int, first_offset: int, last_offset: int, block: str
) -> list[tuple[bytes, str, int, str]]:
    """(raw, reason, offset, record_id) quarantined from one block: the loader's ``block`` id (a topic
    made again has other blocks at the same offsets), one partition's offset range. Each rejection
    once: an insert refused after its views wrote some rejections, then split, writes them again."""
    result = client.query(
        f"""
        SELECT any(raw) AS value, reason, kafka_offset, record_id FROM {database}.usage_quarantine
        WHERE source = 'kafka' AND kafka_partition = {{p:Int32}} AND block_id = {{blk:String}}
          AND kafka_offset BETWEEN {{a:Int64}} AND {{b:Int64}}
        GROUP BY kafka_offset, record_id, reason
        ORDER BY kafka_offset, record_id, reason
        """,
        parameters={"p": partition, "a": first_offset, "b": last_offset, "blk": block},
        column_formats={"value": "bytes"},
    )
    return [(bytes(r[0]), str(r[1]), int(r[2]), str(r[3])) for r in result.result_rows]


BLOCK_COLUMNS = (
    "topic", "kafka_partition", "first_offset", "last_offset", "digest", "messages", "windows", "quarantined",
    "loaded_at",
)  # fmt: skip


def block_loaded(client: Any, database: str, topic: str, partition: int, first_offset: int, digest: str) -> bool:
    """Whether the loader's ledger (``usage_blocks``) has this block: every insert of it went in."""
    result = client.query(
        f"""
        SELECT count() FROM {database}.usage_blocks
        WHERE topic = {{t:String}} AND kafka_partition = {{p:Int32}} AND first_offset = {{a:Int64}}
          AND digest = {{d:String}}
        """,
        parameters={"t": topic, "p": partition, "a": first_offset, "d": digest},
    )
    return bool(result.result_rows[0][0])


def record_block(client: Any, database: str, row: Sequence[Any], dedup_token: str) -> None:
    """One ``usage_blocks`` row (``BLOCK_COLUMNS``), after every insert of the block went in.

    Sent as one JSON line: ``client.insert`` would import pandas into the loader (about 0.4 s and
    tens of MB the first time) for a single row."""
    values = {
        c: v.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S.%f") if isinstance(v, datetime) else v
        for c, v in zip(BLOCK_COLUMNS, row, strict=True)
    }
    client.raw_insert(
        f"{database}.usage_blocks", list(BLOCK_COLUMNS), json.dumps(values).encode(),
        settings={"insert_deduplication_token": dedup_token}, fmt="JSONEachRow",
    )  # fmt: skip


def seq_gaps(client: Any, database: str) -> list[tuple[str, int, int, int]]:
    """(host_id, first missing seq, last missing seq, seqs seen) per gap, from every delivery of a
    window or a GPU window (one sequence numbers both)."""
    result = client.query(
        f"""
        SELECT host_id, prev + 1 AS first_missing, seq - 1 AS last_missing, seen
        FROM (
            SELECT host_id, seq,
                   lagInFrame(seq, 1, seq) OVER w AS prev,
                   count() OVER (PARTITION BY host_id) AS seen
            FROM (SELECT DISTINCT host_id, seq FROM (
                SELECT host_id, seq FROM {database}.usage_raw WHERE source = 'kafka'
                UNION ALL SELECT host_id, seq FROM {database}.gpu_windows))
            WINDOW w AS (PARTITION BY host_id ORDER BY seq ROWS BETWEEN 1 PRECEDING AND CURRENT ROW)
        )
        WHERE seq > prev + 1
        ORDER BY host_id, first_missing
        """
    )
    return [(str(r[0]), int(r[1]), int(r[2]), int(r[3])) for r in result.result_rows]


def seq_extents(client: Any, database: str) -> list[tuple[str, int, int, int]]:
    """(host_id, lowest seq, highest seq, distinct seqs) per agent, windows and GPU windows together."""
    result = client.query(
        f"""
        SELECT host_id, min(seq), max(seq), uniqExact(seq) FROM (
            SELECT host_id, seq FROM {database}.usage_raw WHERE source = 'kafka'
            UNION ALL SELECT host_id, seq FROM {database}.gpu_windows)
        GROUP BY host_id ORDER BY host_id
        """
    )
    return [(str(r[0]), int(r[1]), int(r[2]), int(r[3])) for r in result.result_rows]


def agent_contact(client: Any, database: str) -> list[tuple[str, int, Any]]:
    """(host_id, high-water seq, last heard) per agent: the highest seq it said it had numbered (v3
    messages; -1 from older agents) or sent, and when it last spoke (UTC): a message's ``made_at``
    or a window's end, never later than its arrival - a message of a dead host replayed or requeued
    today does not make it look alive (older messages, without ``made_at``: their arrival)."""
    result = client.query(
        f"""
        SELECT host_id, max(hw), max(t) FROM (
            SELECT host_id, high_water_seq AS hw,
                   if(made_at > toDateTime64(0, 3, 'UTC'), least(toDateTime64(made_at, 6, 'UTC'), ingested_at),
                      ingested_at) AS t
            FROM {database}.agent_messages
            UNION ALL
            SELECT host_id, toInt64(max(seq)) AS hw,
                   max(least(toDateTime64(window_end, 6, 'UTC'), ingested_at)) AS t FROM {database}.usage_raw
            WHERE source = 'kafka' GROUP BY host_id
        )
        GROUP BY host_id ORDER BY host_id
        """
    )
    return [(str(r[0]), int(r[1]), r[2]) for r in result.result_rows]


def insert_hourly(client: Any, database: str, rows: Sequence[Sequence[Any]]) -> None:
    """Rows of (hour, provider_id, gpu_class, firm_id, allocated_seconds, records, refreshed_at)."""
    if rows:
        client.insert(f"{database}.usage_hourly", rows, column_names=HOURLY_COLUMNS)
