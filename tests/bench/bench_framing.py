"""Kafka framing: records/s a consumer decodes with one window per message vs batches.

Same windows, same broker (a local Tansu), same kafka-python consume loop
(poll + fastavro decode of every record); only the framing differs:

- one_per_message: each Kafka message carries one window (the naive framing);
- batched: each message carries a UsageBatch of 100 windows (our framing).
"""

from __future__ import annotations

import io
import time
import uuid
from collections.abc import Iterator

import fastavro
from kafka import KafkaConsumer, KafkaProducer, TopicPartition

from gpumeter.demo.broker import LocalBroker, create_topic
from gpumeter.record import decode_batch, encode_batch, plain_writer, record_id, schema_versions

N = 200_000
BATCH = 100


def windows(n: int) -> list[dict[str, object]]:
    out = []
    for i in range(n):
        start = 1_772_323_200_000 + (i // 8) * 60_000
        out.append({
            "record_id": record_id("h1", f"GPU-{i % 8}", "F0001", start), "seq": i, "provider_id": "P01",
            "host_id": "h1", "gpu_uuid": f"GPU-{i % 8}", "gpu_class": "H100-80G", "firm_id": "F0001",
            "window_start": start, "window_end": start + 60_000, "allocated_seconds": 60,
            "busy_seconds": 31.5, "energy_joules": 21000.0, "signature": None,
        })  # fmt: skip
    return out


def produce(bootstrap: str, topic: str, values: list[bytes]) -> None:
    p = KafkaProducer(bootstrap_servers=bootstrap, acks="all", linger_ms=20, batch_size=1 << 20)
    for v in values:
        p.send(topic, key=b"h1", value=v)
    p.flush()
    p.close()


def consume_rate(bootstrap: str, topic: str, expect_records: int, per_message: int) -> float:
    consumer = KafkaConsumer(
        bootstrap_servers=bootstrap, enable_auto_commit=False, max_poll_records=5000,
        fetch_max_bytes=64 << 20, max_partition_fetch_bytes=16 << 20,
    )  # fmt: skip
    consumer.assign([TopicPartition(topic, 0)])
    consumer.seek_to_beginning()
    writer = plain_writer(next(iter(schema_versions())))
    window_schema = writer["fields"][2]["type"]["items"]
    records = 0
    t0 = time.perf_counter()
    while records < expect_records:
        for msgs in consumer.poll(timeout_ms=1000).values():
            for m in msgs:
                if per_message == 1:
                    fastavro.schemaless_reader(io.BytesIO(m.value), window_schema, None)
                    records += 1
                else:
                    records += len(decode_batch(m.value)["windows"])
    elapsed = time.perf_counter() - t0
    consumer.close()
    return records / elapsed


def run() -> Iterator[str]:
    ws = windows(N)
    writer = plain_writer(next(iter(schema_versions())))
    window_schema = writer["fields"][2]["type"]["items"]
    singles = []
    for w in ws:
        buf = io.BytesIO()
        fastavro.schemaless_writer(buf, window_schema, w)
        singles.append(buf.getvalue())
    batches = [encode_batch("h1", "bench", ws[i : i + BATCH]) for i in range(0, N, BATCH)]
    with LocalBroker() as broker:
        t1, t2 = f"bench-1-{uuid.uuid4().hex[:6]}", f"bench-b-{uuid.uuid4().hex[:6]}"
        create_topic(broker.bootstrap, t1, 1)
        create_topic(broker.bootstrap, t2, 1)
        produce(broker.bootstrap, t1, singles)
        produce(broker.bootstrap, t2, batches)
        naive = consume_rate(broker.bootstrap, t1, N, 1)
        batched = consume_rate(broker.bootstrap, t2, N, BATCH)
    yield f"BENCH consume_decode_one_per_message {naive:.0f} records/s"
    ratio = batched / naive
    yield f"BENCH consume_decode_batched_{BATCH} {batched:.0f} records/s vs one_per_message {ratio:.2f}x"
