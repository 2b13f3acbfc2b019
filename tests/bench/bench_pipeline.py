"""Pipeline throughput: records/s one loader process makes durable in ClickHouse, vs a naive loop.

Same broker (a local Tansu), same embedded ClickHouse, same 200,000 windows:

- pipeline: production framing (UsageBatch of 100 windows per message, key = host,
  Ed25519-signed), ``pipeline.loader.Loader`` with the keys registry (every signature
  checked), every window checked in ClickHouse, dedup tokens, commit after insert;
- pipeline_hmac: the same with HMAC-SHA256 keys (hosts of 0.3): what Ed25519 costs the loader;
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
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from kafka import KafkaConsumer, KafkaProducer

from gpumeter.demo.broker import LocalBroker, create_topic
from gpumeter.record import (
    decode_batch,
    encode_batch,
    plain_writer,
    public_key_text,
    record_id,
    schema_versions,
    signature_headers,
)
from pipeline import clickhouse
from pipeline.keys import parse_registry
from pipeline.loader import Loader, consumer_config, make_consumer

N = 200_000
BATCH = 100
HOSTS = 8
SECRET = bytes.fromhex("5e" * 32)
PRIVATE = {h: Ed25519PrivateKey.from_private_bytes(bytes([h + 1]) * 32) for h in range(HOSTS)}


def registry(ed25519: bool) -> Any:
    def spec(h: int) -> Any:
        return {"public_key": public_key_text(PRIVATE[h].public_key())} if ed25519 else SECRET.hex()

    return parse_registry(
        {"hosts": {f"P01-H{h:02d}": {"provider_id": "P01", "keys": {f"k{h}": spec(h)}} for h in range(HOSTS)}}
    )


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


def pipeline_rate(bootstrap: str, topic: str, client: Any, messages: int, db: str, keys: Any) -> float:
    clickhouse.ensure_schema(client, db)
    consumer = make_consumer(bootstrap, topic, f"bench-{db}", fast_rebalance=True)
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


def verify_us(values: list[bytes], keys: Any, signed: list[list[tuple[str, bytes]]]) -> float:
    """Microseconds per message of the registry's verify alone."""
    t0 = time.perf_counter()
    for value, headers in zip(values, signed, strict=True):
        keys.verify(value, headers)
    return (time.perf_counter() - t0) / len(values) * 1e6


def run() -> Iterator[str]:
    by_host = host_windows(N)
    batched: list[tuple[bytes, bytes, list[tuple[str, bytes]]]] = []
    batched_hmac: list[tuple[bytes, bytes, list[tuple[str, bytes]]]] = []
    for h, ws in by_host.items():
        n = int(h[-2:])
        for i in range(0, len(ws), BATCH):
            value = encode_batch(h, "bench", ws[i : i + BATCH])
            batched.append((h.encode(), value, signature_headers(value, f"k{n}", PRIVATE[n])))
            batched_hmac.append((h.encode(), value, signature_headers(value, f"k{n}", SECRET)))
    schema = plain_writer(next(iter(schema_versions())))["fields"][2]["type"]["items"]
    singles = []
    for ws in by_host.values():
        for w in ws:
            buf = io.BytesIO()
            fastavro.schemaless_writer(buf, schema, w)
            singles.append((w["host_id"].encode(), buf.getvalue(), []))
    with LocalBroker() as broker, tempfile.TemporaryDirectory() as tmp:
        tag = uuid.uuid4().hex[:6]
        t_ours, t_hmac, t_naive = f"bench-p-{tag}", f"bench-h-{tag}", f"bench-n-{tag}"
        for t in (t_ours, t_hmac, t_naive):
            create_topic(broker.bootstrap, t, 3)
        produce(broker.bootstrap, t_ours, batched)
        produce(broker.bootstrap, t_hmac, batched_hmac)
        produce(broker.bootstrap, t_naive, singles)
        client = clickhouse.connect(f"chdb://{tmp}/ch", "bench_pipeline")
        clickhouse.connect(f"chdb://{tmp}/ch", "bench_naive")
        clickhouse.connect(f"chdb://{tmp}/ch", "bench_hmac")
        ours = pipeline_rate(broker.bootstrap, t_ours, client, len(batched), "bench_pipeline", registry(True))
        hmac = pipeline_rate(broker.bootstrap, t_hmac, client, len(batched), "bench_hmac", registry(False))
        naive = naive_rate(broker.bootstrap, t_naive, client)
    values = [v for _, v, _ in batched]
    alone = fastavro_rate(values)
    ed_us = verify_us(values, registry(True), [hd for _, _, hd in batched])
    hmac_us = verify_us(values, registry(False), [hd for _, _, hd in batched_hmac])
    crc = "C" if consumer_config("x").get("check_crcs", True) else "off (no C crc32c; batches signature-verified)"
    yield f"BENCH naive_loop_records_per_s {naive:.0f} records/s"
    yield f"BENCH fastavro_alone_records_per_s {alone:.0f} records/s"
    yield f"BENCH pipeline_hmac_records_per_s {hmac:.0f} records/s vs naive_loop {hmac / naive:.2f}x"
    yield f"BENCH pipeline_records_per_s {ours:.0f} records/s vs naive_loop {ours / naive:.2f}x (kafka crc: {crc})"
    yield f"BENCH pipeline_ed25519_vs_hmac {ours / hmac:.3f} ratio vs pipeline_hmac {ours / hmac:.3f}x"
    # a message of 100 windows: the share of its loading time that checking its signature takes
    per_message_us = 1e6 / ours * BATCH
    yield f"BENCH verify_ed25519_us_per_message {ed_us:.1f} us vs hmac {ed_us / hmac_us:.1f}x"
    yield f"BENCH verify_share_of_load {ed_us / per_message_us:.3f} ratio (Ed25519 verify / loading time per message)"


if __name__ == "__main__":
    for line in run():
        print(line, flush=True)
