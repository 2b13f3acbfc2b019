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


def dead_lettered(bootstrap: str, dlq: str) -> list[tuple[dict[str, bytes], bytes]]:
    consumer = KafkaConsumer(dlq, bootstrap_servers=bootstrap, auto_offset_reset="earliest", consumer_timeout_ms=5000)
    got = [(dict(m.headers), m.value) for m in consumer]
    consumer.close()
    return got


def load_dead_lettering(bootstrap: str, topic: str, ch: tuple[Any, str], expect: int
                        ) -> tuple[Loader, list[tuple[dict[str, bytes], bytes]]]:  # fmt: skip
    """Load with a dead-letter topic (``<topic>.dead-letter``); the loader and what it dead-lettered."""
    dlq = topic + ".dead-letter"
    create_topic(bootstrap, dlq, partitions=1)
    dead = DeadLetter(bootstrap, dlq)
    try:
        loader = load(bootstrap, topic, ch, expect=expect, dead_letter=dead)
    finally:
        dead.close()
    return loader, dead_lettered(bootstrap, dlq)


def send_large(bootstrap: str, topic: str, value: bytes, headers: list[tuple[str, bytes]] | None = None) -> None:
    """One message over Kafka's default request size (the broker's topic limit is what refuses or not)."""
    producer = KafkaProducer(bootstrap_servers=bootstrap, acks="all", max_request_size=4 * 1024 * 1024)
    producer.send(topic, value=value, headers=headers or [], partition=0)
    producer.flush()
    producer.close()


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
    """A value over 1 MiB is quarantined; the dead-letter producer (its limit the topic's) cannot send
    it whole, so it sends its digest, size and reason instead, and the loader goes on."""
    from gpumeter.record import MAX_VALUE_BYTES

    big = b"\x00" * (1024 * 1024 + 100)
    send_large(kafka_bootstrap, topic, big)
    produce(kafka_bootstrap, topic, [[window("GPU-honest", m) for m in range(5)]])
    loader, got = load_dead_lettering(kafka_bootstrap, topic, ch, expect=2)
    assert loader.stats.windows == 5 and loader.stats.quarantined == 1
    assert stored(ch) == ["GPU-honest"]
    assert len(got) == 1
    headers, value = got[0]
    assert headers["gm-reason"] == f"message of {len(big)} bytes, over the limit of {MAX_VALUE_BYTES}".encode()
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


def test_a_topic_made_again_dead_letters_only_its_own_rejections(ch: tuple[Any, str], tmp_path: Path) -> None:
    """Both incarnations of a topic reject a window at the same partition and offset. The second
    loader dead-letters and counts its own rejection only, not the first topic's row stored there."""
    topic = "usage-made-again-rejects"
    for n, gpu in enumerate(("GPU-old-cluster", "GPU-new-cluster")):
        with LocalBroker(log_path=tmp_path / f"broker{n}.log") as broker:
            create_topic(broker.bootstrap, topic, partitions=1)
            create_topic(broker.bootstrap, topic + ".dead-letter", partitions=1)
            produce(broker.bootstrap, topic, [[window(gpu, 0), {**window(gpu, 1), "allocated_seconds": 999}]])
            dead = DeadLetter(broker.bootstrap, topic + ".dead-letter")
            try:
                loader = load(broker.bootstrap, topic, ch, expect=1, dead_letter=dead)
            finally:
                dead.close()
            assert loader.stats.windows == 1 and loader.stats.quarantined == 1
            got = dead_lettered(broker.bootstrap, topic + ".dead-letter")
            assert [h["gm-record-id"] for h, _ in got] == [record_id(HOST, gpu, "F0001", T0 + 60_000).encode()]
    assert stored(ch) == ["GPU-new-cluster", "GPU-old-cluster"]


def test_a_split_block_dead_letters_each_rejection_once(kafka_bootstrap: str, topic: str, ch: tuple[Any, str]) -> None:
    """A block whose insert is refused (a batch over 150 months) and that also holds a rejected window,
    which the halves' inserts reject again: it is counted and dead-lettered once."""
    months = []
    for n in range(150):
        start = int(datetime(2014 + n // 12, n % 12 + 1, 3, tzinfo=UTC).timestamp() * 1000)
        months.append({**window("GPU-history", 0), "record_id": record_id(HOST, "GPU-history", "F0001", start),
                       "window_start": start, "window_end": start + 60_000})  # fmt: skip
    rejected = {**window("GPU-before", 5), "allocated_seconds": 999}
    produce(kafka_bootstrap, topic, [[window("GPU-before", m) for m in range(5)] + [rejected], months])
    loader, got = load_dead_lettering(kafka_bootstrap, topic, ch, expect=2)
    assert loader.stats.windows == 5 and loader.stats.quarantined == 2
    reasons = sorted(h["gm-reason"].decode() for h, _ in got)
    assert reasons == [
        "ClickHouse refused the insert: its windows fall in too many months for one block",
        "allocated_seconds > window length",
    ]


def test_the_rejections_of_a_block_are_read_once_each_and_only_its_own(ch: tuple[Any, str]) -> None:
    """What the loader dead-letters for a block: rows of that block only (another block at the same
    partition and offsets, from a topic made again, is not it), each rejection once, even where an
    insert that ClickHouse refused after its views wrote rejections, then split, wrote them twice."""
    from pipeline import clickhouse

    client, db = ch
    at = datetime(2026, 3, 2, tzinfo=UTC)
    rows = [
        (b"w1", "allocated_seconds > window length", "kafka", 0, 7, at, "this-block", ""),
        (b"w1", "allocated_seconds > window length", "kafka", 0, 7, at, "this-block", ""),
        (b"old", "unsigned batch", "kafka", 0, 7, at, "old-topic-block", ""),
        (b"x", "unsigned batch", "kafka", 0, 9, at, "this-block", ""),
    ]
    clickhouse.insert_quarantine(client, db, rows, None)
    got = clickhouse.quarantined_in_range(client, db, 0, 0, 999, "this-block")
    assert got == [(b"w1", "allocated_seconds > window length", 7, ""), (b"x", "unsigned batch", 9, "")]


def test_a_block_replayed_after_it_loaded_is_logged_counted_and_not_inserted_again(
    kafka_bootstrap: str, topic: str, ch: tuple[Any, str], caplog: pytest.LogCaptureFixture
) -> None:
    """The loader dies after its inserts, before its commit: the next loader replays the block. It is
    found in the ledger, logged and counted as deduplicated, and its windows are stored once."""
    from kafka.errors import CommitFailedError

    produce(kafka_bootstrap, topic, [[window("GPU-replayed", m) for m in range(i * 5, i * 5 + 5)] for i in range(2)])
    client, db = ch
    consumer = make_consumer(kafka_bootstrap, topic, "g-replay", fast_rebalance=True)

    def lost(*_: Any, **__: Any) -> None:
        raise CommitFailedError("the loader died before its commit")

    consumer.commit = lost
    first = Loader(consumer, client, db, topic, keys=KEYS)
    try:
        first.run(until=lambda s: s.messages >= 2, idle_timeout_s=30)
    finally:
        consumer.close(autocommit=False)
    assert first.stats.windows == 10 and first.stats.commit_failures >= 1
    with caplog.at_level("INFO", logger="pipeline.loader"):
        consumer = make_consumer(kafka_bootstrap, topic, "g-replay", fast_rebalance=True)
        again = Loader(consumer, client, db, topic, keys=KEYS)
        try:
            again.run(until=lambda s: s.messages >= 2, idle_timeout_s=30)
        finally:
            consumer.close(autocommit=False)
    assert again.stats.deduplicated_blocks >= 1 and again.stats.windows == 0
    assert "was loaded before (a replay): not inserted again" in caplog.text
    assert client.query(f"SELECT count() FROM {db}.usage_raw").result_rows[0][0] == 10


def test_a_batch_over_the_window_limit_in_several_array_blocks_is_quarantined_by_the_views(
    kafka_bootstrap: str, topic: str, ch: tuple[Any, str]
) -> None:
    """A signed batch of 600 windows written as two Avro array blocks of 300: the loader's count reads
    the first block only (300, under the limit of 500), so ClickHouse's own check of the array's
    length quarantines every window; the honest batch beside it loads."""
    from gpumeter.record import MAX_WINDOWS_PER_BATCH, SOE_MAGIC
    from pipeline.framing import shipped_versions, split_value, zigzag

    versions = shipped_versions()
    ws = [window("GPU-many", m) for m in range(600)]
    writer, empty = split_value(encode_batch(HOST, "test", [], high_water_seq=599), versions)
    strings = zigzag(len(HOST)) + HOST.encode() + zigzag(4) + b"test"  # host_id, agent_version
    trailer = empty[len(strings) + 1 :]  # the batch fields after the array
    one = [split_value(encode_batch(HOST, "test", [w], high_water_seq=599), versions)[1] for w in ws]
    items = [b[len(strings) + 1 : -1 - len(trailer)] for b in one]
    body = strings + zigzag(300) + b"".join(items[:300]) + zigzag(300) + b"".join(items[300:]) + b"\x00" + trailer
    value = SOE_MAGIC + writer.fingerprint + body
    producer = KafkaProducer(bootstrap_servers=kafka_bootstrap, acks="all")
    producer.send(topic, value=value, headers=signature_headers(value, "k1", SECRET), partition=0)
    producer.flush()
    producer.close()
    produce(kafka_bootstrap, topic, [[window("GPU-honest", m) for m in range(5)]])
    loader = load(kafka_bootstrap, topic, ch, expect=2)
    assert stored(ch) == ["GPU-honest"]
    client, db = ch
    rows = client.query(f"SELECT reason, count() FROM {db}.usage_quarantine GROUP BY reason").result_rows
    assert rows == [(f"batch of more than {MAX_WINDOWS_PER_BATCH} windows", 600)]
    # more windows rejected than the first array block counted: the ledger and the metric count what went in
    assert loader.stats.windows == 5
    assert client.query(f"SELECT sum(windows) FROM {db}.usage_blocks").result_rows == [(5,)]


def test_a_huge_key_id_header_is_dead_lettered_bounded_and_the_loader_goes_on(
    kafka_bootstrap: str, topic: str, ch: tuple[Any, str]
) -> None:
    """Anyone who can write to the topic can put ~1 MB in ``gm-key-id``; the rejection's reason names
    the key id, and a dead-letter header that size would be refused by the producer: it is bounded."""
    from pipeline.loader import HEADER_VALUE_BYTES

    value = encode_batch(HOST, "test", [window("GPU-forged", 0)])
    send_large(kafka_bootstrap, topic, value, [("gm-key-id", b"k" * 900_000), ("gm-sig", b"00")])
    produce(kafka_bootstrap, topic, [[window("GPU-honest", m) for m in range(5)]])
    loader, got = load_dead_lettering(kafka_bootstrap, topic, ch, expect=2)
    assert stored(ch) == ["GPU-honest"] and loader.stats.windows == 5 and loader.stats.quarantined == 1
    (headers, dead_value), = got  # fmt: skip
    assert dead_value == value and len(headers["gm-reason"]) <= HEADER_VALUE_BYTES
    assert headers["gm-reason"].startswith(b"unknown signing key id 'kkkk")


def test_gaps_see_a_lost_tail_and_a_silent_agent(kafka_bootstrap: str, topic: str, ch: tuple[Any, str]) -> None:
    """Windows 0..9 arrive, 10..14 are lost at the agent, and its heartbeat says it had numbered up to
    14: the tail is reported missing. Another agent whose last message came an hour ago is silent.
    A heartbeat signed with another host's key does not speak for the host it names."""
    from datetime import timedelta

    from pipeline import clickhouse
    from pipeline.gaps import gaps_table

    client, db = ch
    now = datetime.now(UTC)
    quiet = "P01-H02"
    keys = parse_registry({"hosts": {
        HOST: {"provider_id": PROVIDER, "keys": {"k1": SECRET.hex()}},
        quiet: {"provider_id": PROVIDER, "keys": {"k2": SECRET[::-1].hex()}},
    }})  # fmt: skip
    producer = KafkaProducer(bootstrap_servers=kafka_bootstrap, acks="all")

    def send(value: bytes, key_id: str, secret: bytes) -> None:
        producer.send(topic, value=value, headers=signature_headers(value, key_id, secret), partition=0)
        producer.flush()

    def run(at: datetime, expect: int) -> None:
        consumer = make_consumer(kafka_bootstrap, topic, "g-gaps", fast_rebalance=True)
        try:
            Loader(consumer, client, db, topic, keys=keys, clock=lambda: at).run(
                until=lambda s: s.messages >= expect, idle_timeout_s=30
            )
        finally:
            consumer.close(autocommit=False)

    # the quiet host made its last batch when its window ended, a minute before the batch arrived (an
    # hour ago): silent since it was made, not since it arrived
    end = int((now - timedelta(hours=1)).timestamp()) // 60 * 60 * 1000
    quiet_window = {**window("GPU-q", 0), "host_id": quiet, "window_start": end - 60_000, "window_end": end,
                    "record_id": record_id(quiet, "GPU-q", "F0001", end - 60_000)}  # fmt: skip
    send(encode_batch(quiet, "test", [quiet_window], made_at_ms=end), "k2", SECRET[::-1])
    run(datetime.fromtimestamp(end / 1000 + 60, UTC), expect=1)
    send(encode_batch(HOST, "test", [window("GPU-a", m) for m in range(10)]), "k1", SECRET)
    send(encode_batch(HOST, "test", [], high_water_seq=14), "k1", SECRET)  # the heartbeat
    send(encode_batch(quiet, "test", [], high_water_seq=99), "k1", SECRET)  # HOST's key, the quiet host's name
    run(now, expect=3)
    table = gaps_table(clickhouse.seq_extents(client, db), clickhouse.seq_gaps(client, db),
                       clickhouse.agent_contact(client, db), now=now + timedelta(seconds=5))  # fmt: skip
    hour_ago = datetime.fromtimestamp(end / 1000, UTC).strftime("%Y-%m-%d %H:%M:%S")  # its window's end
    assert table == (
        f"{HOST}: seq 0..9, 10 seen, 5 missing\n  missing tail 10..14 (the agent had numbered up to 14)\n"
        f"{quiet}: seq 0..0, 1 seen, complete\n  silent since {hour_ago} UTC"
    )
    # the forged heartbeat is not dropped without a trace: it is quarantined, whole, with its reason
    rows = client.query(f"SELECT reason, record_id FROM {db}.usage_quarantine").result_rows
    assert rows == [("batch host_id is not the signing key's host", "")]


def test_requeue_loads_what_a_new_key_now_verifies_exactly_once(
    kafka_bootstrap: str, topic: str, ch: tuple[Any, str], cli: Any, tmp_path: Path
) -> None:
    """A host signs with a key the loader does not know yet: its batch is quarantined whole. Once the
    key is in the keys file, requeue verifies it again and loads it (each window checked again: one
    fails); a second run loads nothing more. An unsigned batch stays quarantined through both."""
    from pipeline.requeue import requeue

    new_secret = secrets.token_bytes(32)
    late = [window("GPU-late", m) for m in range(4)] + [{**window("GPU-late", 4), "allocated_seconds": 999}]
    producer = KafkaProducer(bootstrap_servers=kafka_bootstrap, acks="all")
    value = encode_batch(HOST, "test", late)
    producer.send(topic, value=value, headers=signature_headers(value, "k-new", new_secret), partition=0)
    producer.send(topic, value=encode_batch(HOST, "test", [window("GPU-unsigned", 0)]), partition=0)
    producer.flush()
    producer.close()
    produce(kafka_bootstrap, topic, [[window("GPU-honest", m) for m in range(5)]])
    loader = load(kafka_bootstrap, topic, ch, expect=3)
    assert loader.stats.windows == 5 and loader.stats.quarantined == 2
    client, db = ch
    both = parse_registry({"hosts": {HOST: {"provider_id": PROVIDER,
                                            "keys": {"k1": SECRET.hex(), "k-new": new_secret.hex()}}}})  # fmt: skip
    dry = requeue(client, db, both, dry_run=True)
    assert (dry.tried, dry.loaded, dict(dry.still_rejected)) == (2, 1, {"unsigned": 1})
    assert stored(ch) == ["GPU-honest"]
    first = requeue(client, db, both)
    assert (first.tried, first.loaded, first.windows, first.window_rejects) == (2, 1, 4, 1)
    assert first.text(False) == (
        "2 quarantined message(s) tried again: 1 loaded (4 window(s) loaded, 1 rejected by the window checks), "
        "1 still rejected\n  1 unsigned"
    )
    keys = tmp_path / "keys.toml"
    keys.write_text(f'[hosts."{HOST}"]\nprovider_id = "{PROVIDER}"\n'
                    f'keys = {{ "k1" = "{SECRET.hex()}", "k-new" = "{new_secret.hex()}" }}\n')  # fmt: skip
    keys.chmod(0o600)
    again = cli.ok("pipeline", "requeue", "--keys", str(keys))
    assert (
        again.out == "1 quarantined message(s) tried again: 0 loaded (0 window(s) loaded, 0 rejected by the "
        "window checks), 1 still rejected\n  1 unsigned\n"
    )
    assert stored(ch) == ["GPU-honest", "GPU-late"]
    rows = client.query(f"SELECT count() FROM {db}.usage_raw WHERE gpu_uuid = 'GPU-late'").result_rows
    assert rows[0][0] == 4


def test_requeue_rejects_a_body_it_cannot_decode_and_goes_on_to_the_next(
    kafka_bootstrap: str, topic: str, ch: tuple[Any, str]
) -> None:
    """A batch signed with a key added later whose record_id is not UTF-8: ClickHouse would take its
    bytes, Python cannot decode them. Requeue rejects it before inserting anything, records that,
    and loads the batch after it."""
    from pipeline.requeue import requeue

    new_secret = secrets.token_bytes(32)
    odd = encode_batch(HOST, "test", [{**window("GPU-odd", 0), "record_id": "Z" * 32}])
    odd = odd.replace(b"Z" * 32, b"\xff" * 32)
    late = encode_batch(HOST, "test", [window("GPU-late", m) for m in range(3)])
    producer = KafkaProducer(bootstrap_servers=kafka_bootstrap, acks="all")
    for value in (odd, late):
        producer.send(topic, value=value, headers=signature_headers(value, "k-new", new_secret), partition=0)
    producer.flush()
    producer.close()
    loader = load(kafka_bootstrap, topic, ch, expect=2)
    assert loader.stats.quarantined == 2
    client, db = ch
    both = parse_registry({"hosts": {HOST: {"provider_id": PROVIDER,
                                            "keys": {"k1": SECRET.hex(), "k-new": new_secret.hex()}}}})  # fmt: skip
    report = requeue(client, db, both)
    assert (report.tried, report.loaded, report.windows, dict(report.still_rejected)) == (2, 1, 3, {"corrupt": 1})
    assert stored(ch) == ["GPU-late"]
    again = requeue(client, db, both)  # what loaded is done; what is still rejected is tried each run
    assert (again.tried, again.loaded, dict(again.still_rejected)) == (1, 0, {"corrupt": 1})
