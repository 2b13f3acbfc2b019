"""The whole path on real components: simulated GPUs -> agent -> Avro -> Kafka -> loader -> ClickHouse."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import pytest
from kafka import KafkaProducer

from agent.kafka_sink import KafkaSink
from agent.runner import Agent, run_simulated
from agent.simulate import SimulatedFleet
from pipeline.loader import Loader, LoaderStats, make_consumer
from pipeline.usage_store import UsageStore

pytestmark = pytest.mark.integration

START = datetime(2026, 3, 31, tzinfo=UTC)  # crosses a month boundary


def meter_fleet(bootstrap: str, topic: str, fleet: SimulatedFleet, interval_s: int = 20) -> KafkaSink:
    sink = KafkaSink(bootstrap, topic)
    agents = [
        Agent(fleet.host_source(h.host_id), h, sink, window_s=60, interval_s=interval_s, batch_windows=100)
        for h in fleet.hosts()
    ]
    run_simulated(agents, fleet.start_s, fleet.end_s, interval_s)
    sink.flush()
    sink.close()
    return sink


def load(bootstrap: str, topic: str, ch: tuple[Any, str], group: str, until_messages: int) -> LoaderStats:
    client, db = ch
    consumer = make_consumer(bootstrap, topic, group, fast_rebalance=True)
    try:
        return Loader(consumer, client, db, topic).run(until=lambda s: s.messages >= until_messages, idle_timeout_s=30)
    finally:
        consumer.close()


def measured(ch: tuple[Any, str], tz: str) -> dict[tuple[Any, ...], int]:
    client, db = ch
    return {(f, d, p, c): s for f, d, p, c, s, _ in UsageStore(client, db).gpu_seconds_by_day(tz)}


@pytest.mark.parametrize("tz", ["UTC", "Asia/Shanghai"])
def test_billed_gpu_seconds_equal_ground_truth_exactly(kafka_bootstrap: str, topic: str, ch, tz: str) -> None:  # type: ignore[no-untyped-def]
    fleet = SimulatedFleet(seed=11, start=START, days=2, providers=2, hosts_per_provider=1, gpus_per_host=2, firms=3)
    sink = meter_fleet(kafka_bootstrap, topic, fleet)
    stats = load(kafka_bootstrap, topic, ch, "g-e2e", sink.messages_sent)
    assert stats.messages == sink.messages_sent
    assert stats.windows == sink.windows_sent
    assert stats.quarantined == 0
    truth = fleet.ground_truth(tz)
    assert sum(truth.values()) > 0
    assert measured(ch, tz) == truth


def test_replay_after_crash_before_commit_is_absorbed(kafka_bootstrap: str, topic: str, ch) -> None:  # type: ignore[no-untyped-def]
    """Rows inserted, then the loader dies before committing: the next owner replays, nothing doubles."""
    fleet = SimulatedFleet(seed=5, start=START, days=1, providers=1, hosts_per_provider=2, gpus_per_host=2, firms=2)
    sink = meter_fleet(kafka_bootstrap, topic, fleet)
    client, db = ch

    class Crash(Exception):
        pass

    consumer = make_consumer(kafka_bootstrap, topic, "g-crash", fast_rebalance=True)
    loader = Loader(consumer, client, db, topic)

    def crash(**_: object) -> None:  # the loader commits explicit offsets per partition
        raise Crash

    consumer.commit = crash  # the process dies after the insert, before the commit
    with pytest.raises(Crash):
        while True:
            loader.poll_once()
    consumer.close(autocommit=False)
    inserted_before_crash = int(client.query(f"SELECT count() FROM {db}.usage_raw").result_rows[0][0])
    assert inserted_before_crash > 0

    stats = load(kafka_bootstrap, topic, ch, "g-crash", sink.messages_sent)
    assert stats.messages == sink.messages_sent  # replayed from the last commit (none): everything
    assert measured(ch, "UTC") == fleet.ground_truth("UTC")
    distinct = int(client.query(f"SELECT uniqExact(record_id) FROM {db}.usage_raw").result_rows[0][0])
    assert distinct == sink.windows_sent


def test_garbage_is_quarantined_and_good_batches_still_load(kafka_bootstrap: str, topic: str, ch) -> None:  # type: ignore[no-untyped-def]
    fleet = SimulatedFleet(seed=9, start=START, days=1, providers=1, hosts_per_provider=1, gpus_per_host=2, firms=2)
    producer = KafkaProducer(bootstrap_servers=kafka_bootstrap, acks="all")
    for junk in (b"", b"not avro", b"\xc3\x01" + b"\x00" * 8 + b"zz"):
        producer.send(topic, key=b"h", value=junk)
    producer.flush()
    producer.close()
    sink = meter_fleet(kafka_bootstrap, topic, fleet)
    stats = load(kafka_bootstrap, topic, ch, "g-junk", sink.messages_sent + 3)
    client, db = ch
    assert stats.quarantined == 3
    reasons = sorted(r[0] for r in client.query(f"SELECT reason FROM {db}.usage_quarantine").result_rows)
    assert reasons == [
        "not an Avro single-object message (bad magic)",
        "not an Avro single-object message (bad magic)",
        "unknown writer schema fingerprint 0000000000000000",
    ]
    assert measured(ch, "UTC") == fleet.ground_truth("UTC")
