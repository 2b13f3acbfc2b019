"""The generated DDL: single server, and ON CLUSTER with Replicated engines (no cluster here to run it on)."""

from __future__ import annotations

import re

from pipeline.framing import shipped_versions
from pipeline.schema import WINDOW_CHECKS, Ddl, ch_type, reject_reason_sql


def test_single_server_ddl_uses_plain_engines_and_a_dedup_window() -> None:
    text = "\n".join(Ddl("gm").statements(shipped_versions().values()))
    assert "ON CLUSTER" not in text and "Replicated" not in text
    assert (
        text.count("non_replicated_deduplication_window = 10000") == 5
    )  # usage_raw, usage_quarantine, usage_blocks, agent_messages, gpu_windows
    assert "CREATE TABLE IF NOT EXISTS gm.usage_ingest_v1 (" in text
    assert "ENGINE = Null" in text


def test_cluster_ddl_is_on_cluster_and_replicated() -> None:
    statements = Ddl("gm", cluster="metering").statements(shipped_versions().values())
    for statement in statements:
        head = statement.splitlines()[0]
        assert "ON CLUSTER metering" in head, head
    text = "\n".join(statements)
    assert "ENGINE = ReplicatedMergeTree('/clickhouse/tables/{shard}/gm/usage_raw', '{replica}')" in text
    assert (
        "ENGINE = ReplicatedReplacingMergeTree('/clickhouse/tables/{shard}/gm/usage_hourly', '{replica}', "
        "refreshed_at)" in text
    )
    assert "non_replicated_deduplication_window" not in text
    assert text.count("replicated_deduplication_window = 10000") == 5
    assert not re.search(r"ENGINE = MergeTree\b", text)


def test_one_ingest_table_and_two_views_per_writer_version() -> None:
    statements = Ddl("gm").statements(shipped_versions().values())
    views = [re.sub(r"_[0-9a-f]{10}$", "_<checks>", s.splitlines()[0]) for s in statements if "MATERIALIZED VIEW" in s]
    assert views == [
        "CREATE MATERIALIZED VIEW IF NOT EXISTS gm.usage_ingest_v1_to_raw_<checks>",
        "CREATE MATERIALIZED VIEW IF NOT EXISTS gm.usage_ingest_v1_to_quarantine_<checks>",
        "CREATE MATERIALIZED VIEW IF NOT EXISTS gm.usage_ingest_v2_to_raw_<checks>",
        "CREATE MATERIALIZED VIEW IF NOT EXISTS gm.usage_ingest_v2_to_quarantine_<checks>",
        "CREATE MATERIALIZED VIEW IF NOT EXISTS gm.usage_ingest_v3_to_raw_<checks>",
        "CREATE MATERIALIZED VIEW IF NOT EXISTS gm.usage_ingest_v3_to_quarantine_<checks>",
        "CREATE MATERIALIZED VIEW IF NOT EXISTS gm.usage_ingest_v3_to_messages_4",  # v3 batches carry a high water
        "CREATE MATERIALIZED VIEW IF NOT EXISTS gm.usage_ingest_v4_to_raw_<checks>",
        "CREATE MATERIALIZED VIEW IF NOT EXISTS gm.usage_ingest_v4_to_quarantine_<checks>",
        "CREATE MATERIALIZED VIEW IF NOT EXISTS gm.usage_ingest_v4_to_messages_4",
        "CREATE MATERIALIZED VIEW IF NOT EXISTS gm.usage_ingest_v4_to_gpu_<checks>",  # v4 batches carry GPU windows
        "CREATE MATERIALIZED VIEW IF NOT EXISTS gm.usage_ingest_v4_to_gpu_quarantine_<checks>",
    ]


def test_views_of_other_checks_are_stale_and_todays_are_not() -> None:
    writers = list(shipped_versions().values())
    ddl = Ddl("gm")
    today = [name for w in writers for name in (*ddl.view_names(w), *(ddl.gpu_view_names(w) or ()))]
    old = ["usage_ingest_v1_to_raw", "usage_ingest_v2_to_quarantine_0123456789", "usage_ingest_v4_to_gpu_0123456789"]
    drops = ddl.stale_views(writers, [*today, *old, "usage_raw", "usage_ingest_v1"])
    assert drops == [f"DROP VIEW IF EXISTS gm.{name}" for name in sorted(old)]


def test_reject_reason_names_every_rule_in_order() -> None:
    sql = reject_reason_sql()
    positions = [sql.index("'" + reason.replace("'", "\\'") + "'") for reason, _ in WINDOW_CHECKS]
    assert positions == sorted(positions)
    assert sql.endswith(", '')")


def test_avro_types_map_to_clickhouse_types() -> None:
    assert ch_type(["null", "double"]) == "Nullable(Float64)"
    assert ch_type({"type": "array", "items": "long"}) == "Array(Int64)"
    assert ch_type({"type": "long", "logicalType": "timestamp-millis"}) == "Int64"
