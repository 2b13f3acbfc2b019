"""Two writer schema versions on one topic both load (Avro schema evolution).

The previous version here is test-only: v1 without the optional ``energy_joules``
and ``signature`` fields, registered as version 900. When a real v2 ships in
gpumeter/schemas, ``test_every_shipped_version_has_an_ingest_path`` covers it too.
"""

from __future__ import annotations

import copy
import io
from datetime import UTC, datetime
from typing import Any

import fastavro
import pytest
from fastavro.schema import fingerprint, to_parsing_canonical_form
from kafka import KafkaProducer
from test_end_to_end import START, measured

from agent.runner import Agent, run_simulated
from agent.simulate import SimulatedFleet
from gpumeter.record import SOE_MAGIC, encode_batch, record_id
from pipeline import clickhouse
from pipeline.framing import Framed, WriterVersion, container, shipped_versions, split_value
from pipeline.loader import Loader, make_consumer
from pipeline.schema import RAW_ORDER, Ddl

pytestmark = pytest.mark.integration


def older_version() -> WriterVersion:
    schema = copy.deepcopy(next(iter(shipped_versions().values())).schema)
    items = schema["fields"][2]["type"]["items"]
    items["fields"] = [f for f in items["fields"] if f["name"] not in ("energy_joules", "signature")]
    fp_hex = fingerprint(to_parsing_canonical_form(fastavro.parse_schema(copy.deepcopy(schema))), "CRC-64-AVRO")
    return WriterVersion(900, int(fp_hex, 16).to_bytes(8, "little"), schema)


def encode_old(writer: WriterVersion, host: str, windows: list[dict[str, Any]]) -> bytes:
    buf = io.BytesIO()
    buf.write(SOE_MAGIC + writer.fingerprint)
    old = [{k: v for k, v in w.items() if k not in ("energy_joules", "signature")} for w in windows]
    fastavro.schemaless_writer(buf, fastavro.parse_schema(copy.deepcopy(writer.schema)),
                               {"host_id": host, "agent_version": "old", "windows": old})  # fmt: skip
    return buf.getvalue()


def metered_batches(fleet: SimulatedFleet) -> list[tuple[str, list[dict[str, Any]]]]:
    """(host_id, windows) of every batch the fleet's agents would send, captured instead of produced."""
    captured: list[tuple[str, list[dict[str, Any]]]] = []

    class Capture:
        def send(self, host_id: str, agent_version: str, windows: list[dict[str, Any]], gpu_windows: Any) -> None:
            captured.append((host_id, list(windows)))

    agents = [Agent(fleet.host_source(h.host_id), h, Capture(), 60, 20, 100) for h in fleet.hosts()]
    run_simulated(agents, fleet.start_s, fleet.end_s, 20)
    return captured


def publish_and_load(
    kafka_bootstrap: str,
    topic: str,
    ch: Any,
    group: str,
    values: list[tuple[str, bytes]],
    writers: dict[bytes, WriterVersion] | None = None,
) -> Loader:
    """Send each (host, message value) keyed by host, then load until every message is read."""
    producer = KafkaProducer(bootstrap_servers=kafka_bootstrap, acks="all")
    for host, value in values:
        producer.send(topic, key=host.encode(), value=value)
    producer.flush()
    producer.close()
    client, db = ch
    consumer = make_consumer(kafka_bootstrap, topic, group, fast_rebalance=True)
    loader = Loader(consumer, client, db, topic, writers=writers)
    try:
        loader.run(until=lambda s: s.messages >= len(values), idle_timeout_s=20)
    finally:
        consumer.close(autocommit=False)
    return loader


def test_previous_and_current_writer_versions_both_load(kafka_bootstrap: str, topic: str, ch: Any) -> None:
    fleet = SimulatedFleet(seed=2, start=START, days=1, providers=2, hosts_per_provider=1, gpus_per_host=2, firms=2)
    old = older_version()
    captured = metered_batches(fleet)
    values = [  # alternate old and new agents
        (host, encode_old(old, host, windows) if n % 2 else encode_batch(host, "new", windows))
        for n, (host, windows) in enumerate(captured)
    ]
    client, db = ch
    writers = {**shipped_versions(), old.fingerprint: old}
    clickhouse.ensure_schema(client, db, writers=writers.values())
    loader = publish_and_load(kafka_bootstrap, topic, ch, "g-evo", values, writers)
    assert loader.stats.quarantined == 0
    assert measured(ch, "UTC") == fleet.ground_truth("UTC")
    versions = dict(client.query(
        f"SELECT agent_version, countIf(energy_joules IS NULL) = count() FROM {db}.usage_raw GROUP BY agent_version"
    ).result_rows)  # fmt: skip
    assert versions == {"old": True, "new": False}


def test_every_shipped_version_has_an_ingest_path(ch: Any) -> None:
    client, db = ch
    tables = {r[0] for r in client.query(f"SHOW TABLES FROM {db}").result_rows}
    for writer in shipped_versions().values():
        messages = Ddl(db).messages_view_name(writer)  # from v3 on, a view of each message's high water
        assert (messages is None) == (writer.version < 3)
        gpu = Ddl(db).gpu_view_names(writer) or ()  # from v4 on, GPU windows (to their table, or quarantined)
        assert (gpu == ()) == (writer.version < 4)
        views = {*Ddl(db).view_names(writer), *([messages] if messages else []), *gpu}
        assert {writer.ingest_table, *views} <= tables
        assert {t for t in tables if t.startswith(writer.ingest_table + "_to_")} == views


def test_views_made_under_older_checks_are_replaced(ch: Any) -> None:
    client, db = ch
    writer = max(shipped_versions().values(), key=lambda w: w.version)
    old = f"{writer.ingest_table}_to_raw"  # the name views had before their names carried the checks
    client.command(f"CREATE MATERIALIZED VIEW {db}.{old} TO {db}.usage_raw AS SELECT * FROM {db}.usage_raw WHERE 0")
    clickhouse.ensure_schema(client, db)
    tables = {r[0] for r in client.query(f"SHOW TABLES FROM {db}").result_rows}
    assert old not in tables and set(Ddl(db).view_names(writer)) <= tables


def test_shipped_v1_and_v2_writers_mix_and_v2_carries_sample_counts(kafka_bootstrap: str, topic: str, ch: Any) -> None:
    fleet = SimulatedFleet(seed=4, start=START, days=1, providers=2, hosts_per_provider=1, gpus_per_host=2, firms=2)
    captured = metered_batches(fleet)
    values = [  # a rolling upgrade: 0.1.0 agents (v1) beside new ones (v2)
        (host, encode_batch(host, "v1-agent", windows, version=1) if n % 2 else encode_batch(host, "v2-agent", windows))
        for n, (host, windows) in enumerate(captured)
    ]
    client, db = ch
    loader = publish_and_load(kafka_bootstrap, topic, ch, "g-v1v2", values)
    assert loader.stats.quarantined == 0
    assert measured(ch, "UTC") == fleet.ground_truth("UTC")
    rows = client.query(
        f"SELECT agent_version, countIf(samples_taken IS NULL), countIf(samples_taken * 20 = allocated_seconds), "
        f"count() FROM {db}.usage_raw GROUP BY agent_version ORDER BY agent_version"
    ).result_rows
    (v1, v1_null, _, v1_count), (v2, v2_null, v2_exact, v2_count) = rows
    assert (v1, v1_null) == ("v1-agent", v1_count)  # a v1 writer has no counts: NULL, never 0
    assert (v2, v2_null, v2_exact) == ("v2-agent", 0, v2_count)  # allocated = samples x interval


def test_a_store_sorted_by_record_id_is_resorted_once_and_keeps_every_row(ch: Any) -> None:
    client, db = ch
    old = Ddl(db).raw_table().replace(f"ORDER BY ({RAW_ORDER})", "ORDER BY (record_id, ingested_at)")
    assert old != Ddl(db).raw_table()
    writer = max(shipped_versions().values(), key=lambda w: w.version)
    for name in [r[0] for r in client.query(f"SHOW TABLES FROM {db}").result_rows]:
        if name == "usage_raw" or "_to_" in name:
            client.command(f"DROP TABLE {db}.{name}")
    client.command(old)  # a 0.2 store: sorted by record, with views towards it
    for statement in Ddl(db).ingest_views(writer):
        client.command(statement)
    rows = [
        (f"r{n}", n, "P01", "P01-H01", f"GPU-{n % 3}", "H100", "F1", datetime(2026, 3, 1, tzinfo=UTC),
         datetime(2026, 3, 1, 0, 1, tzinfo=UTC), 60, None, None, "t", "kafka", 0, n, datetime(2026, 3, 2, tzinfo=UTC))
        for n in range(10)
    ]  # fmt: skip
    clickhouse.insert_raw(client, db, rows, None)
    clickhouse.ensure_schema(client, db)
    key = client.query(f"SELECT sorting_key FROM system.tables WHERE database = '{db}' AND name = 'usage_raw'")
    assert key.result_rows == [(RAW_ORDER,)]
    assert client.query(f"SELECT count(), sum(seq) FROM {db}.usage_raw").result_rows == [(10, 45)]
    tables = {r[0] for r in client.query(f"SHOW TABLES FROM {db}").result_rows}
    assert "usage_raw_resorted" not in tables
    views = sorted(t for t in tables if t.startswith(writer.ingest_table + "_to_"))
    # made again, towards the new table; the heartbeats' and GPU windows' views too (dropped with them)
    again = (*Ddl(db).view_names(writer), Ddl(db).messages_view_name(writer), *(Ddl(db).gpu_view_names(writer) or ()))
    assert views == sorted(again)
    clickhouse.ensure_schema(client, db)  # once: a second run changes nothing
    assert client.query(f"SELECT count() FROM {db}.usage_raw").result_rows == [(10,)]
    start = 1_772_323_200_000
    w = {"record_id": record_id("P01-H01", "GPU-x", "F1", start), "seq": 1, "provider_id": "P01", "host_id": "P01-H01",
         "gpu_uuid": "GPU-x", "gpu_class": "H100", "firm_id": "F1", "window_start": start, "window_end": start + 60_000,
         "allocated_seconds": 60, "busy_seconds": None, "energy_joules": None, "signature": None}  # fmt: skip
    written, body = split_value(encode_batch("P01-H01", "t", [w]), shipped_versions())
    data = container(written, 0, start * 1000, [Framed(1, start, body, "", "")])
    clickhouse.insert_ingest(client, db, written, data, "x")
    assert client.query(f"SELECT count() FROM {db}.usage_raw").result_rows == [(11,)]  # the views feed the new table
