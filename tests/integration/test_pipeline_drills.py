"""Drills on the real broker and real ClickHouse; each ends with billed totals == ground truth."""

from __future__ import annotations

import random
import threading
import time
from datetime import UTC, datetime
from typing import Any

import pytest
from billing_helpers import hourly_rollup
from kafka import KafkaConsumer, KafkaProducer
from test_end_to_end import START, measured, meter_fleet

from agent.kafka_sink import KafkaSink
from agent.runner import Agent, run_simulated
from agent.simulate import SimulatedFleet
from gpumeter.record import decode_batch, record_id, signature_headers
from pipeline.keys import parse_registry
from pipeline.loader import DeadLetter, Loader, make_consumer
from pipeline.usage_store import UsageStore

pytestmark = pytest.mark.integration


def fleet(seed: int = 3, days: int = 1) -> SimulatedFleet:
    return SimulatedFleet(
        seed=seed, start=START, days=days, providers=2, hosts_per_provider=1, gpus_per_host=2, firms=3
    )


def run_loader(bootstrap: str, topic: str, ch: tuple[Any, str], group: str, expect: int, **kw: Any) -> Loader:
    client, db = ch
    consumer = make_consumer(bootstrap, topic, group, fast_rebalance=True)
    ld = Loader(consumer, client, db, topic, **kw)
    try:
        ld.run(until=lambda s: s.messages >= expect, idle_timeout_s=20)
    finally:
        consumer.close(autocommit=False)
    return ld


def test_signed_batches_load_and_forgeries_are_quarantined_and_dead_lettered(
    kafka_bootstrap: str, topic: str, ch: Any
) -> None:
    fl = fleet()
    secrets = {h.host_id: f"{n:02d}" * 32 for n, h in enumerate(fl.hosts())}
    hosts = {
        h.host_id: {"provider_id": h.provider_id, "keys": {f"k-{h.host_id}": secrets[h.host_id]}} for h in fl.hosts()
    }
    registry = parse_registry({"hosts": hosts})
    sent = 0
    for h in fl.hosts():
        sink = KafkaSink(kafka_bootstrap, topic, signing_key=(f"k-{h.host_id}", bytes.fromhex(secrets[h.host_id])))
        agent = Agent(fl.host_source(h.host_id), h, sink, window_s=60, interval_s=20, batch_windows=100)
        run_simulated([agent], fl.start_s, fl.end_s, 20)
        sink.flush()
        sent += sink.messages_sent
        sink.close()
    a, b = fl.hosts()[:2]
    forged = KafkaSink(kafka_bootstrap, topic, signing_key=(f"k-{b.host_id}", bytes.fromhex(secrets[b.host_id])))
    rid = record_id(a.host_id, "GPU-x", "F0001", fl.start_s * 1000)
    w = {"record_id": rid, "seq": 1, "provider_id": a.provider_id, "host_id": a.host_id, "gpu_uuid": "GPU-x",
         "gpu_class": "H100-80G", "firm_id": "F0001", "window_start": fl.start_s * 1000,
         "window_end": fl.start_s * 1000 + 60_000, "allocated_seconds": 60, "busy_seconds": None,
         "energy_joules": None, "signature": None}  # fmt: skip
    forged.send(a.host_id, "evil", [w])  # host a's batch signed with host b's key
    forged.flush()
    forged.close()
    unsigned = KafkaSink(kafka_bootstrap, topic)
    unsigned.send(a.host_id, "evil", [w])
    unsigned.flush()
    unsigned.close()
    dlq = topic + ".dead-letter"
    dead = DeadLetter(kafka_bootstrap, dlq)
    ld = run_loader(kafka_bootstrap, topic, ch, "g-sig", sent + 2, keys=registry, dead_letter=dead)
    dead.close()
    assert measured(ch, "UTC") == fl.ground_truth("UTC")
    client, db = ch
    reasons = sorted(r[0] for r in client.query(f"SELECT reason FROM {db}.usage_quarantine").result_rows)
    assert reasons == ["batch host_id is not the signing key's host", "unsigned batch"]
    assert ld.stats.quarantined == 2
    consumer = KafkaConsumer(
        dlq, bootstrap_servers=kafka_bootstrap, auto_offset_reset="earliest", consumer_timeout_ms=5000
    )
    got = sorted(dict(m.headers)["gm-reason"].decode() for m in consumer)
    consumer.close()
    assert got == reasons


def test_two_loaders_in_one_group_share_partitions_exactly(kafka_bootstrap: str, topic: str, ch: Any) -> None:
    fl = SimulatedFleet(seed=21, start=START, days=1, providers=3, hosts_per_provider=2, gpus_per_host=2, firms=3)
    sink = meter_fleet(kafka_bootstrap, topic, fl)
    client, db = ch
    loaders: list[Loader] = []
    done = threading.Event()

    def member(name: str) -> None:
        consumer = make_consumer(kafka_bootstrap, topic, "g-two", fast_rebalance=True)
        ld = Loader(consumer, client, db, topic)
        loaders.append(ld)
        try:
            ld.run(until=lambda s: done.is_set(), idle_timeout_s=None)
        finally:
            consumer.close(autocommit=False)

    threads = [threading.Thread(target=member, args=(n,)) for n in ("a", "b")]
    for t in threads:
        t.start()
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and measured(ch, "UTC") != fl.ground_truth("UTC"):
        time.sleep(0.5)
    time.sleep(1)
    done.set()
    for t in threads:
        t.join(30)
    assert measured(ch, "UTC") == fl.ground_truth("UTC")
    distinct = client.query(f"SELECT uniqExact(record_id) FROM {db}.usage_raw").result_rows[0][0]
    assert distinct == sink.windows_sent
    assert all(ld.stats.messages > 0 for ld in loaders), [ld.stats for ld in loaders]


def test_clickhouse_outage_stops_commits_then_catches_up(kafka_bootstrap: str, topic: str, ch: Any) -> None:
    fl = fleet(seed=8)
    sink = meter_fleet(kafka_bootstrap, topic, fl)
    client, db = ch
    # ClickHouse refuses every insert of windows for a while, as a server under back-pressure does
    # ("too many parts", transient): one part, and a limit of one. A missing table would stop the loader.
    client.command(f"INSERT INTO {db}.usage_raw (record_id, gpu_uuid, window_start, window_end, ingested_at) "
                   "VALUES ('seed', 'seed', '2001-01-01 00:00:00', '2001-01-01 00:01:00', now64(6))")  # fmt: skip
    client.command(f"ALTER TABLE {db}.usage_raw MODIFY SETTING parts_to_throw_insert = 1")
    consumer = make_consumer(kafka_bootstrap, topic, "g-outage", fast_rebalance=True)
    ld = Loader(consumer, client, db, topic)
    try:
        t0 = time.monotonic()
        while time.monotonic() - t0 < 30 and ld.stats.flush_failures < 3:
            ld.poll_once()
        assert ld.stats.flush_failures >= 2 and ld.stats.commits == 0 and ld.stats.messages == 0
        client.command(f"ALTER TABLE {db}.usage_raw RESET SETTING parts_to_throw_insert")
        client.command(f"DELETE FROM {db}.usage_raw WHERE record_id = 'seed'")
        ld.run(until=lambda s: s.messages >= sink.messages_sent, idle_timeout_s=20)
    finally:
        consumer.close(autocommit=False)
    assert measured(ch, "UTC") == fl.ground_truth("UTC")
    assert ld.stats.quarantined == 0


def test_garbage_drill_random_truncated_and_bit_flipped(kafka_bootstrap: str, topic: str, ch: Any) -> None:
    """Signed production config: 10k random byte strings, truncated and bit-flipped copies of a real
    batch, and truncated batches a buggy agent signed correctly (these reach ClickHouse and fail there)."""
    fl = fleet(seed=13)
    secret = bytes.fromhex("ab" * 32)
    hosts = {h.host_id: {"provider_id": h.provider_id, "keys": {"k": secret.hex()}} for h in fl.hosts()[:1]}
    for n, h in enumerate(fl.hosts()[1:]):
        hosts[h.host_id] = {"provider_id": h.provider_id, "keys": {f"k{n}": secret.hex()}}
    key_of = {h: next(iter(v["keys"])) for h, v in hosts.items()}  # type: ignore[attr-defined]
    sent = 0
    for h in fl.hosts():
        sink = KafkaSink(kafka_bootstrap, topic, signing_key=(key_of[h.host_id], secret))
        run_simulated([Agent(fl.host_source(h.host_id), h, sink, window_s=60, interval_s=20, batch_windows=100)],
                      fl.start_s, fl.end_s, 20)  # fmt: skip
        sink.flush()
        sent += sink.messages_sent
        sink.close()
    rng = random.Random(4)
    valid = next(iter(KafkaConsumer(topic, bootstrap_servers=kafka_bootstrap, auto_offset_reset="earliest",
                                    consumer_timeout_ms=5000))).value  # fmt: skip
    junk: list[tuple[bytes, list[tuple[str, bytes]]]] = [
        (rng.randbytes(rng.randrange(0, 200)), []) for _ in range(10_000)
    ]
    own = key_of[decode_batch(valid)["host_id"]]  # the key of the host that wrote it
    for _ in range(50):
        cut = valid[: rng.randrange(10, len(valid) - 1)]
        junk.append((cut, signature_headers(valid, "k", secret)))  # signature of the whole value
        junk.append((cut, signature_headers(cut, own, secret)))  # a buggy agent signed the truncation
        flipped = bytearray(valid)
        flipped[rng.randrange(10, len(flipped))] ^= 1 << rng.randrange(8)
        junk.append((bytes(flipped), signature_headers(valid, "k", secret)))
    producer = KafkaProducer(bootstrap_servers=kafka_bootstrap, acks="all", linger_ms=20)
    for value, headers in junk:
        producer.send(topic, key=b"junk", value=value, headers=headers)
    producer.flush()
    producer.close()
    ld = run_loader(kafka_bootstrap, topic, ch, "g-junk", sent + len(junk), keys=parse_registry({"hosts": hosts}))
    client, db = ch
    assert ld.stats.messages == sent + len(junk)
    reasons = dict(client.query(f"SELECT reason, count() FROM {db}.usage_quarantine GROUP BY reason").result_rows)
    assert sum(reasons.values()) == len(junk)
    assert reasons["unsigned batch"] == 10_000
    assert reasons["bad signature for key id 'k'"] == 100
    assert sum(n for r, n in reasons.items() if r.startswith("corrupt Avro body")) == 50 - reasons.get(
        "not an Avro single-object message (bad magic)", 0
    )
    assert measured(ch, "UTC") == fl.ground_truth("UTC")


def test_replay_whole_topic_from_zero_changes_nothing(kafka_bootstrap: str, topic: str, ch: Any) -> None:
    fl = fleet(seed=17, days=2)
    sink = meter_fleet(kafka_bootstrap, topic, fl)
    client, db = ch
    run_loader(kafka_bootstrap, topic, ch, "g-first", sink.messages_sent)
    raw_before = int(client.query(f"SELECT count() FROM {db}.usage_raw").result_rows[0][0])
    since = datetime(2000, 1, 1, tzinfo=UTC)
    UsageStore(client, db).refresh_rollups(since)
    hourly_before = hourly_rollup(client, db)
    run_loader(kafka_bootstrap, topic, ch, "g-replay", sink.messages_sent)  # a new group: offset 0
    assert measured(ch, "UTC") == fl.ground_truth("UTC")
    assert (
        int(client.query(f"SELECT count() FROM {db}.usage_raw").result_rows[0][0]) == raw_before
    )  # same blocks, same tokens
    UsageStore(client, db).refresh_rollups(since)
    assert hourly_rollup(client, db) == hourly_before
    assert sum(r[4] for r in hourly_before) == sum(fl.ground_truth("UTC").values())
