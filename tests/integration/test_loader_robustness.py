"""Drills of the pipeline-robustness issue on the real broker and chDB: after each, every honest
window is in ClickHouse exactly once and the loader is still running."""

from __future__ import annotations

import hashlib
import secrets
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from kafka import KafkaConsumer, KafkaProducer

from gpumeter.demo.broker import LocalBroker, create_topic
from gpumeter.record import encode_batch, record_id, signature_headers
from pipeline.keys import parse_registry
from pipeline.loader import DeadLetter, Loader, make_consumer

pytestmark = pytest.mark.integration

T0 = int(datetime(2026, 3, 2, tzinfo=UTC).timestamp() * 1000)
HOST, PROVIDER = "P01-H01", "P01"
SECRET = secrets.token_bytes(32)
KEYS = parse_registry({"hosts": {HOST: {"provider_id": PROVIDER, "keys": {"k1": SECRET.hex()}}}})


def window(gpu: str, minute: int) -> dict[str, Any]:
    start = T0 + minute * 60_000
    return {
        "record_id": record_id(HOST, gpu, "F0001", start), "seq": minute, "provider_id": PROVIDER, "host_id": HOST,
        "gpu_uuid": gpu, "gpu_class": "H100-80G", "firm_id": "F0001", "window_start": start,
        "window_end": start + 60_000, "allocated_seconds": 60, "busy_seconds": None, "energy_joules": None,
        "signature": None,
    }  # fmt: skip


def produce(bootstrap: str, topic: str, batches: list[list[dict[str, Any]]], **send: Any) -> None:
    producer = KafkaProducer(bootstrap_servers=bootstrap, acks="all")
    for ws in batches:
        value = encode_batch(HOST, "test", ws)
        producer.send(topic, value=value, headers=signature_headers(value, "k1", SECRET), partition=0, **send)
    producer.flush()
    producer.close()


def load(bootstrap: str, topic: str, ch: tuple[Any, str], expect: int, **kw: Any) -> Loader:
    client, db = ch
    consumer = make_consumer(bootstrap, topic, "g-robust", fast_rebalance=True)
    loader = Loader(consumer, client, db, topic, keys=KEYS, **kw)
    try:
        loader.run(until=lambda s: s.messages >= expect, idle_timeout_s=30)
    finally:
        consumer.close(autocommit=False)
    return loader


def stored(ch: tuple[Any, str]) -> list[str]:
    client, db = ch
    return sorted(str(r[0]) for r in client.query(f"SELECT DISTINCT gpu_uuid FROM {db}.usage_raw").result_rows)


def test_a_topic_made_again_from_offset_zero_loses_nothing(ch: tuple[Any, str], tmp_path: Path) -> None:
    """A new Kafka cluster (here: a second broker; its memory starts empty) with the same topic name
    hands out the same offsets again. Its blocks are new data, not replays of the old ones."""
    topic = "usage-made-again"
    for n, gpu in enumerate(("GPU-first-cluster", "GPU-second-cluster")):
        with LocalBroker(log_path=tmp_path / f"broker{n}.log") as broker:
            create_topic(broker.bootstrap, topic, partitions=1)
            produce(broker.bootstrap, topic, [[window(gpu, m) for m in range(i * 5, i * 5 + 5)] for i in range(3)])
            loader = load(broker.bootstrap, topic, ch, expect=3)
            assert loader.stats.windows == 15
    assert stored(ch) == ["GPU-first-cluster", "GPU-second-cluster"]
    client, db = ch
    assert client.query(f"SELECT count() FROM {db}.usage_raw").result_rows[0][0] == 30


def test_an_oversize_rejected_message_is_dead_lettered_by_digest(
    kafka_bootstrap: str, topic: str, ch: tuple[Any, str]
) -> None:
    """An unsigned 1 MiB value is quarantined; the dead-letter producer cannot send it whole, so it
    sends its digest, size and reason instead, and the loader goes on to the honest batch."""
    big = b"\x00" * (1024 * 1024 + 100)
    producer = KafkaProducer(bootstrap_servers=kafka_bootstrap, acks="all", max_request_size=4 * 1024 * 1024)
    producer.send(topic, value=big, partition=0)
    producer.flush()
    producer.close()
    produce(kafka_bootstrap, topic, [[window("GPU-honest", m) for m in range(5)]])
    dlq = topic + ".dead-letter"
    create_topic(kafka_bootstrap, dlq, partitions=1)
    dead = DeadLetter(kafka_bootstrap, dlq)
    try:
        loader = load(kafka_bootstrap, topic, ch, expect=2, dead_letter=dead)
    finally:
        dead.close()
    assert loader.stats.windows == 5 and loader.stats.quarantined == 1
    assert stored(ch) == ["GPU-honest"]
    consumer = KafkaConsumer(dlq, bootstrap_servers=kafka_bootstrap, auto_offset_reset="earliest",
                             consumer_timeout_ms=5000)  # fmt: skip
    got = [(dict(m.headers), m.value) for m in consumer]
    consumer.close()
    assert len(got) == 1
    headers, value = got[0]
    assert headers["gm-reason"] == b"unsigned batch"
    assert headers["gm-oversize"] == str(len(big)).encode() and value == b""
    assert headers["gm-sha256"] == hashlib.sha256(big).hexdigest().encode()


def test_a_batch_over_too_many_months_is_quarantined_alone_and_the_rest_loads(
    kafka_bootstrap: str, topic: str, ch: tuple[Any, str]
) -> None:
    """One signed batch whose 150 windows fall in 150 months: ClickHouse refuses any insert holding
    it (too many partitions for one block), for good. The block is split until that message is alone;
    it is quarantined with the reason, and the honest batches on either side load."""
    months = []
    for n in range(150):
        start = int(datetime(2014 + n // 12, n % 12 + 1, 3, tzinfo=UTC).timestamp() * 1000)
        months.append({**window("GPU-history", 0), "record_id": record_id(HOST, "GPU-history", "F0001", start),
                       "window_start": start, "window_end": start + 60_000})  # fmt: skip
    produce(kafka_bootstrap, topic, [[window("GPU-before", m) for m in range(5)], months,
                                     [window("GPU-after", m) for m in range(5)]])  # fmt: skip
    loader = load(kafka_bootstrap, topic, ch, expect=3)
    assert loader.stats.windows == 10 and loader.stats.quarantined == 1
    assert stored(ch) == ["GPU-after", "GPU-before"]
    client, db = ch
    reasons = [str(r[0]) for r in client.query(f"SELECT reason FROM {db}.usage_quarantine").result_rows]
    assert reasons == ["ClickHouse refused the insert: its windows fall in too many months for one block"]


def test_a_store_that_cannot_take_inserts_stops_the_loader_with_nothing_committed(
    kafka_bootstrap: str, topic: str, ch: tuple[Any, str]
) -> None:
    """A missing table will not come back by retrying: the loader stops with one clear message and
    commits nothing, so a loader started after the fix loads every window."""
    from pipeline import clickhouse
    from pipeline.framing import shipped_versions
    from pipeline.loader import LoaderStopped

    client, db = ch
    tables = sorted({w.ingest_table for w in shipped_versions().values()})
    produce(kafka_bootstrap, topic, [[window("GPU-a", m) for m in range(5)]])
    for table in tables:
        client.command(f"DROP TABLE {db}.{table}")
    with pytest.raises(LoaderStopped, match=r"UNKNOWN_TABLE.*nothing of this block was committed"):
        load(kafka_bootstrap, topic, ch, expect=1)
    clickhouse.ensure_schema(client, db)
    assert load(kafka_bootstrap, topic, ch, expect=1).stats.windows == 5
    assert stored(ch) == ["GPU-a"]
