"""Pipeline throughput: records/s one loader process makes durable in ClickHouse, vs a naive loop.

Same broker (a local Tansu), same embedded ClickHouse, same 200,000 windows:

- pipeline: production framing (UsageBatch of 100 windows per message, key = host,
  signed), ``pipeline.loader.Loader`` with the keys registry (every signature
  checked), every window checked in ClickHouse, dedup tokens, commit after insert;
- naive_loop: one window per Kafka message, kafka-python poll, fastavro
  schemaless_reader per record, insert row tuples, commit per poll;
- fastavro_alone: decoding the same batches with fastavro, no Kafka, no ClickHouse.

Timed from the first fetched message to the last commit, so group-join time is excluded for both.
"""

from __future__ import annotations

import io
import tempfile
import time
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime
from typing import Any

import fastavro
from bench_framing import windows
from kafka import KafkaConsumer, KafkaProducer

from gpumeter.demo.broker import LocalBroker, create_topic
from gpumeter.record import decode_batch, encode_batch, plain_writer, record_id, schema_versions, signature_headers
from pipeline import clickhouse
from pipeline.keys import parse_registry
from pipeline.loader import Loader, consumer_config, make_consumer

N = 200_000
BATCH = 100
HOSTS = 8
SECRET = bytes.fromhex("5e" * 32)


def host_windows(n: int) -> dict[str, list[dict[str, Any]]]:
    out: dict[str, list[dict[str, Any]]] = {}
    for i, w in enumerate(windows(n)):
        host = f"P01-H{i % HOSTS:02d}"
        w = dict(w, host_id=host, gpu_uuid=f"GPU-{i % 64}", window_start=w["window_start"] + i % 7 * 1000)
        w["window_end"] = w["window_start"] + 60_000
        w["record_id"] = record_id(host, w["gpu_uuid"], w["firm_id"], w["window_start"])
        out.setdefault(host, []).append(w)
    return out


def produce(bootstrap: str, topic: str, items: list[tuple[bytes, bytes, list[tuple[str, bytes]]]]) -> None:
    p = KafkaProducer(bootstrap_servers=bootstrap, acks="all", linger_ms=20, batch_size=1 << 20)
    for key, value, headers in items:
        p.send(topic, key=key, value=value, headers=headers)
    p.flush()
    p.close()


def pipeline_rate(bootstrap: str, topic: str, client: Any, messages: int) -> float:
    db = "bench_pipeline"
    clickhouse.ensure_schema(client, db)
    keys = parse_registry(
        {"hosts": {f"P01-H{h:02d}": {"provider_id": "P01", "keys": {f"k{h}": SECRET.hex()}} for h in range(HOSTS)}}
    )
    consumer = make_consumer(bootstrap, topic, "bench-pipeline", fast_rebalance=True)
    loader = Loader(consumer, client, db, topic, keys=keys)
    t0 = None
    while loader.stats.messages < messages:
        loader.poll_once(timeout_ms=100)
        if t0 is None and (loader._buffers or loader.stats.messages):
            t0 = time.perf_counter()
    assert t0 is not None
    elapsed = time.perf_counter() - t0
    consumer.close(autocommit=False)
    loaded = int(client.query(f"SELECT count() FROM {db}.usage_raw").result_rows[0][0])
    assert loaded == N and loader.stats.quarantined == 0, (loaded, loader.stats)
    return N / elapsed


def naive_rate(bootstrap: str, topic: str, client: Any) -> float:
    db = "bench_naive"
    clickhouse.ensure_schema(client, db)
    config = consumer_config("bench-naive", fast_rebalance=True)
    config["max_poll_records"] = 2000
    consumer = KafkaConsumer(topic, bootstrap_servers=bootstrap, **config)
    schema = plain_writer(next(iter(schema_versions())))["fields"][2]["type"]["items"]
    records = 0
    t0 = None
    while records < N:
        fetched = consumer.poll(timeout_ms=100)
        if not fetched:
            continue
        t0 = t0 or time.perf_counter()
        now = datetime.now(UTC)
        rows = []
        for tp, msgs in fetched.items():
            for m in msgs:
                w = fastavro.schemaless_reader(io.BytesIO(m.value), schema, None)
                rows.append((
                    w["record_id"], w["seq"], w["provider_id"], w["host_id"], w["gpu_uuid"], w["gpu_class"],
                    w["firm_id"], w["window_start"], w["window_end"], w["allocated_seconds"], w["busy_seconds"],
                    w["energy_joules"], "bench", "kafka", tp.partition, m.offset, now,
                ))  # fmt: skip
        clickhouse.insert_raw(client, db, rows, None)
        consumer.commit()
        records += len(rows)
    assert t0 is not None
    elapsed = time.perf_counter() - t0
    consumer.close(autocommit=False)
    return N / elapsed


def fastavro_rate(values: list[bytes]) -> float:
    t0 = time.perf_counter()
    n = sum(len(decode_batch(v)["windows"]) for v in values)
    return n / (time.perf_counter() - t0)


def run() -> Iterator[str]:
    by_host = host_windows(N)
    batched: list[tuple[bytes, bytes, list[tuple[str, bytes]]]] = []
    for h, ws in by_host.items():
        for i in range(0, len(ws), BATCH):
            value = encode_batch(h, "bench", ws[i : i + BATCH])
            batched.append((h.encode(), value, signature_headers(value, f"k{int(h[-2:])}", SECRET)))
    schema = plain_writer(next(iter(schema_versions())))["fields"][2]["type"]["items"]
    singles = []
    for ws in by_host.values():
        for w in ws:
            buf = io.BytesIO()
            fastavro.schemaless_writer(buf, schema, w)
            singles.append((w["host_id"].encode(), buf.getvalue(), []))
    with LocalBroker() as broker, tempfile.TemporaryDirectory() as tmp:
        t_ours, t_naive = f"bench-p-{uuid.uuid4().hex[:6]}", f"bench-n-{uuid.uuid4().hex[:6]}"
        create_topic(broker.bootstrap, t_ours, 3)
        create_topic(broker.bootstrap, t_naive, 3)
        produce(broker.bootstrap, t_ours, batched)
        produce(broker.bootstrap, t_naive, singles)
        client = clickhouse.connect(f"chdb://{tmp}/ch", "bench_pipeline")
        clickhouse.connect(f"chdb://{tmp}/ch", "bench_naive")
        ours = pipeline_rate(broker.bootstrap, t_ours, client, len(batched))
        naive = naive_rate(broker.bootstrap, t_naive, client)
    alone = fastavro_rate([v for _, v, _ in batched])
    crc = "C" if consumer_config("x").get("check_crcs", True) else "off (no C crc32c; batches HMAC-verified)"
    yield f"BENCH naive_loop_records_per_s {naive:.0f} records/s"
    yield f"BENCH fastavro_alone_records_per_s {alone:.0f} records/s"
    yield f"BENCH pipeline_records_per_s {ours:.0f} records/s vs naive_loop {ours / naive:.2f}x (kafka crc: {crc})"


if __name__ == "__main__":
    for line in run():
        print(line, flush=True)
