"""The loader's loop logic against fakes (real Kafka and ClickHouse are in tests/integration)."""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from kafka import TopicPartition
from kafka.errors import CommitFailedError, CorruptRecordError

from gpumeter.record import CURRENT_VERSION as V
from gpumeter.record import encode_batch, record_id
from pipeline.loader import Loader

TOPIC = "usage"


@dataclass
class Msg:
    offset: int
    value: bytes
    headers: list[tuple[str, bytes]] = field(default_factory=list)
    timestamp: int = 1


def value(n: int = 2) -> bytes:
    ws = [
        {"record_id": record_id("h", "G", "F", i), "seq": i, "provider_id": "P", "host_id": "h", "gpu_uuid": "G",
         "gpu_class": "H100-80G", "firm_id": "F", "window_start": i, "window_end": i + 60_000,
         "allocated_seconds": 60, "busy_seconds": None, "energy_joules": None, "signature": None}
        for i in range(n)
    ]  # fmt: skip
    return encode_batch("h", "t", ws)


class FakeConsumer:
    def __init__(self, polls: list[dict[int, list[Msg]]]) -> None:
        self.polls = polls
        self.listener: Any = None
        self.commits: list[dict[int, int]] = []
        self.paused: set[int] = set()
        self.revoke_on_poll: dict[int, set[int]] = {}
        self.commit_error: Exception | None = None
        self.high: dict[int, int] = {}  # partition -> the broker's high water, as the last fetch said
        self.n = 0

    def subscribe(self, topics: list[str], listener: Any) -> None:
        self.listener = listener

    def poll(self, timeout_ms: int = 0) -> dict[TopicPartition, list[Msg]]:
        self.n += 1
        if self.n in self.revoke_on_poll:
            self.listener.on_partitions_revoked([TopicPartition(TOPIC, p) for p in self.revoke_on_poll[self.n]])
        batch = self.polls.pop(0) if self.polls else {}
        return {TopicPartition(TOPIC, p): ms for p, ms in batch.items() if p not in self.paused}

    def commit(self, offsets: dict[TopicPartition, Any]) -> None:
        if self.commit_error is not None:
            raise self.commit_error
        self.commits.append({tp.partition: om.offset for tp, om in offsets.items()})

    def assignment(self) -> set[TopicPartition]:
        return {TopicPartition(TOPIC, p) for p in (0, 1)}

    def highwater(self, tp: TopicPartition) -> int | None:
        return self.high.get(tp.partition)

    def pause(self, *tps: TopicPartition) -> None:
        self.paused |= {tp.partition for tp in tps}

    def resume(self, *tps: TopicPartition) -> None:
        self.paused -= {tp.partition for tp in tps}


@dataclass
class Summary:
    written_rows: int


@dataclass
class Result:
    result_rows: list[Any]


def _offsets(token: str) -> str:
    """A block token without its content digest (``block_digest``, tested on its own below) and the
    digest of what it accepted or refused (``accepted_digest``, below)."""
    topic, partition, span, digest, *rest = token.split(":")
    assert len(digest) == 32 and int(digest, 16) >= 0
    if len(rest) >= 2 and (rest[0] == "q" or rest[0].startswith("v")) and len(rest[1]) == 16:
        int(rest[1], 16)
        rest = [rest[0], *rest[2:]]
    return ":".join((topic, partition, span, *rest))


def test_what_a_block_accepted_and_under_which_key_is_in_its_insert_token() -> None:
    """A retry after the keys file changed accepts other messages (a key revoked, one added): it must
    not be taken for the first attempt's duplicate and dropped."""
    from pipeline.framing import Framed
    from pipeline.loader import accepted_digest

    a, b = Framed(1, 0, b"x", "h", "P"), Framed(2, 0, b"y", "h", "P")
    assert accepted_digest([a, b]) == accepted_digest([Framed(1, 0, b"other", "h", "P"), b])  # offsets, not bytes
    assert accepted_digest([a, b]) != accepted_digest([b])
    assert accepted_digest([a]) != accepted_digest([Framed(1, 0, b"x", "h", "P", 0, 1000)])  # other key bounds


class FakeClient:
    def __init__(self) -> None:
        self.tokens: list[str] = []
        self.ledger: list[tuple[Any, ...]] = []  # usage_blocks rows
        self.quarantine: list[tuple[Any, ...]] = []  # usage_quarantine rows the loader wrote itself
        self.fail: Callable[[], bool] = lambda: False

    def raw_insert(self, table: str, cols: Any, data: bytes, settings: dict[str, Any], fmt: str) -> Summary:
        if self.fail():
            raise ConnectionError("ClickHouse is down")
        if table.endswith(".usage_blocks"):  # record_block: one JSON line
            row = json.loads(data)
            self.ledger.append(tuple(row[c] for c in cols))
            return Summary(1)
        self.tokens.append(_offsets(settings["insert_deduplication_token"]))
        return Summary(0)

    def insert(self, table: str, rows: Any, column_names: Any, settings: dict[str, Any]) -> None:
        if table.endswith(".usage_quarantine"):
            self.quarantine += [tuple(r) for r in rows]
        self.tokens.append(_offsets(settings["insert_deduplication_token"]))

    def query(self, sql: str, parameters: Any = None, column_formats: Any = None) -> Result:
        if self.fail():
            raise ConnectionError("ClickHouse is down")
        if "usage_blocks" in sql:  # block_loaded
            known = any(r[1:3] == (parameters["p"], parameters["a"]) and r[4] == parameters["d"] for r in self.ledger)
            return Result([(int(known),)])
        if "usage_quarantine" in sql:  # quarantined_in_range: (raw, reason, offset, record_id) of one block
            p, a, b, blk = (parameters[k] for k in ("p", "a", "b", "blk"))
            rows = [(r[0], r[1], r[4], "") for r in self.quarantine if r[3] == p and a <= r[4] <= b and r[6] == blk]
            return Result(rows)
        return Result([])


def loader(consumer: FakeConsumer, client: FakeClient, **kw: Any) -> Loader:
    return Loader(consumer, client, "db", TOPIC, block_offsets=10, linger_s=60, sleep=lambda s: None, **kw)


def msgs(first: int, last: int) -> list[Msg]:
    return [Msg(o, value()) for o in range(first, last + 1)]


def test_blocks_are_cut_at_fixed_offset_boundaries() -> None:
    consumer = FakeConsumer([{0: msgs(5, 23)}, {0: msgs(24, 29)}])
    client = FakeClient()
    ld = loader(consumer, client)
    assert ld.poll_once() == 5 + 10  # 5..9 and 10..19 are complete; 20..23 waits (more arrived)
    assert ld.poll_once() == 10  # 20..29 complete
    assert client.tokens == [f"usage:0:5-9:v{V}", f"usage:0:10-19:v{V}", f"usage:0:20-29:v{V}"]
    assert consumer.commits == [{0: 20}, {0: 30}]
    assert ld.stats.windows == 2 * 25


def test_tail_is_flushed_when_nothing_more_arrives() -> None:
    consumer = FakeConsumer([{0: msgs(0, 3)}, {}])
    ld = loader(consumer, FakeClient())
    assert ld.poll_once() == 0
    assert ld.poll_once() == 4
    assert consumer.commits == [{0: 4}]


def test_revoked_partition_is_dropped_and_never_committed() -> None:
    consumer = FakeConsumer([{0: msgs(0, 3), 1: msgs(0, 3)}, {}])
    consumer.revoke_on_poll = {2: {1}}
    client = FakeClient()
    ld = loader(consumer, client)
    ld.poll_once()
    ld.poll_once()
    assert consumer.commits == [{0: 4}]
    assert client.tokens == [f"usage:0:0-3:v{V}"]
    assert ld.stats.dropped_on_revoke == 4


def test_clickhouse_down_commits_nothing_backs_off_and_catches_up() -> None:
    consumer = FakeConsumer([{0: msgs(0, 9)}, {}, {}, {}])
    client = FakeClient()
    down = [True, True]
    client.fail = lambda: bool(down) and down.pop(0)
    ld = loader(consumer, client)
    ld._retry_at = 0  # no real waiting in the test
    assert ld.poll_once() == 0
    assert consumer.commits == [] and consumer.paused == {0, 1}
    ld._retry_at = 0
    assert ld.poll_once() == 0
    ld._retry_at = 0
    assert ld.poll_once() == 10
    assert consumer.commits == [{0: 10}] and consumer.paused == set()
    assert ld.stats.flush_failures == 2
    assert client.tokens == [f"usage:0:0-9:v{V}"]


def test_commit_failure_loses_nothing_and_keeps_running() -> None:
    consumer = FakeConsumer([{0: msgs(0, 9)}, {0: msgs(10, 19)}])
    consumer.commit_error = CommitFailedError("rebalanced")
    ld = loader(consumer, FakeClient())
    assert ld.poll_once() == 10
    consumer.commit_error = None
    assert ld.poll_once() == 10
    assert ld.stats.commit_failures == 1
    assert consumer.commits == [{0: 20}]


def test_garbage_is_quarantined_without_touching_the_container() -> None:
    consumer = FakeConsumer([{0: [Msg(0, b"junk"), *msgs(1, 9)]}])
    client = FakeClient()
    ld = loader(consumer, client)
    assert ld.poll_once() == 10
    assert client.tokens == [f"usage:0:0-9:v{V}", "usage:0:0-9:q"]


def test_the_block_digest_tells_a_replay_from_new_data_at_the_same_offsets() -> None:
    """A replay of a block (same messages) has the token of the first attempt; a topic made again,
    whose offsets start at 0 again, has other messages there and so other tokens."""
    from types import SimpleNamespace

    from pipeline.loader import block_digest

    def block(values: list[bytes], headers: list[tuple[str, bytes]] | None = None) -> list[Any]:
        return [SimpleNamespace(offset=i, value=v, headers=headers or []) for i, v in enumerate(values)]

    first = block([b"a", b"bc"])
    assert block_digest(first) == block_digest(block([b"a", b"bc"]))
    assert block_digest(first) != block_digest(block([b"a", b"bd"]))
    assert block_digest(first) != block_digest(block([b"ab", b"c"]))  # same bytes, other messages
    assert block_digest(first) != block_digest(block([b"a", b"bc"], [("gm-sig", b"x")]))


def test_a_block_replayed_after_it_loaded_is_not_inserted_again_and_is_counted() -> None:
    """A crash after the inserts and before the commit: the next owner replays the same block. The
    ledger has it, so nothing is inserted again; the block is committed and counted as deduplicated."""
    client = FakeClient()
    first = loader(FakeConsumer([{0: msgs(0, 9)}]), client)
    assert first.poll_once() == 10
    assert client.tokens == [f"usage:0:0-9:v{V}"] and len(client.ledger) == 1
    consumer = FakeConsumer([{0: msgs(0, 9)}])
    again = loader(consumer, client)
    assert again.poll_once() == 10
    assert client.tokens == [f"usage:0:0-9:v{V}"] and consumer.commits == [{0: 10}]
    assert again.stats.deduplicated_blocks == 1 and again.stats.windows == 0
    other = loader(FakeConsumer([{0: [Msg(0, value(3)), *msgs(1, 9)]}]), client)  # other data, same offsets
    assert other.poll_once() == 10 and other.stats.deduplicated_blocks == 0
    assert client.tokens == [f"usage:0:0-9:v{V}", f"usage:0:0-9:v{V}"]


def test_a_message_over_the_contract_limits_is_quarantined_before_it_is_read() -> None:
    from gpumeter.record import MAX_VALUE_BYTES, MAX_WINDOWS_PER_BATCH

    consumer = FakeConsumer([{0: [Msg(0, b"\x00" * (MAX_VALUE_BYTES + 1)), Msg(1, value(MAX_WINDOWS_PER_BATCH + 1)),
                                  Msg(2, value(MAX_WINDOWS_PER_BATCH))]}])  # fmt: skip
    client = FakeClient()
    rows: list[Any] = []
    client.insert = lambda table, r, column_names, settings: rows.extend(r)  # type: ignore[method-assign]
    ld = loader(consumer, client)
    assert ld.poll_once(drain=True) == 3
    assert [(r[3], r[4], r[1]) for r in rows if len(r) == 8] == [
        (0, 0, f"message of {MAX_VALUE_BYTES + 1} bytes, over the limit of {MAX_VALUE_BYTES}"),
        (0, 1, f"message of {MAX_WINDOWS_PER_BATCH + 1} windows, over the limit of {MAX_WINDOWS_PER_BATCH}"),
    ]
    assert ld.stats.windows == MAX_WINDOWS_PER_BATCH


def test_blocks_end_where_their_bytes_would_pass_the_budget() -> None:
    """Memory per block is bounded: a block also ends before the message that would take its values
    over ``block_bytes``; that block is complete at once, and a replay cuts it the same way."""
    size = len(value())
    consumer = FakeConsumer([{0: msgs(0, 6)}, {0: msgs(0, 6)}])
    client = FakeClient()
    ld = loader(consumer, client, block_bytes=3 * size)
    assert ld.poll_once() == 6  # 0-2 and 3-5 are full; 6 is the tail and waits (more may come)
    assert client.tokens == [f"usage:0:0-2:v{V}", f"usage:0:3-5:v{V}"]
    replay = loader(FakeConsumer([{0: msgs(0, 6)}]), FakeClient(), block_bytes=3 * size)
    replay.poll_once()
    assert replay.client.tokens == client.tokens


def test_the_dead_letter_limit_is_read_from_the_topic_config() -> None:
    from pipeline.loader import message_limit

    described = {"topic": {"dlq": {"max.message.bytes": {"name": "max.message.bytes", "value": "2097152"}}}}
    assert message_limit(described, "dlq") == 2_097_152
    assert message_limit(described, "other") is None
    assert message_limit({"topic": {"dlq": {}}}, "dlq") is None


def test_the_metrics_show_lag_rejections_by_bounded_reason_and_the_last_commit() -> None:
    from gpumeter.metrics import render
    from pipeline.loader_metrics import collect

    consumer = FakeConsumer([{0: [Msg(0, b"junk"), *msgs(1, 9)]}, {0: msgs(10, 12)}, {}])
    consumer.high = {0: 40}
    ld = loader(consumer, FakeClient())
    assert ld.poll_once() == 10
    ld.poll_once()  # 10..12 buffered, not due yet
    text = render(collect(ld))
    assert 'gpumeter_loader_lag_messages{partition="0",topic="usage"} 30' in text  # 40 at the broker, 10 committed
    assert 'gpumeter_loader_quarantined_by_reason_total{reason="bad_magic"} 1' in text
    assert "gpumeter_loader_windows_loaded_total 18" in text
    assert f"gpumeter_loader_last_commit_timestamp_seconds {ld.stats.last_commit_unix!r}" in text
    assert ld.stats.last_commit_unix > 0


def test_reason_labels_are_bounded_whatever_the_message_says() -> None:
    from pipeline.loader import reason_label

    assert reason_label("unknown signing key id 'x' * 1000") == "unknown_key"
    assert reason_label("bad signature for key id 'k1'") == "bad_signature"
    assert reason_label("allocated_seconds > window length") == "allocated_seconds > window length"
    assert reason_label("message of 2000000 bytes, over the limit of 1048576") == "too_large"
    assert reason_label("anything an attacker writes") == "other"


def test_windows_loaded_never_go_below_zero_and_count_only_what_went_in() -> None:
    from pipeline.loader import windows_loaded

    counts = {0: 5, 1: 300, 2: 4}  # offset 1 wrote 600 windows in two Avro blocks: its count says 300
    rejected = [(b"", "bad", 1, f"r{i}") for i in range(600)] + [(b"", "bad", 2, "r-x"), (b"v", "whole", 3, "")]
    assert windows_loaded(counts, rejected) == 5 + 0 + 3
    assert windows_loaded(counts, [(b"v", "refused", 0, "")]) == 300 + 4  # offset 0 rejected whole
    # a rejected GPU window is not a rejected usage window, told by its reason; a usage window whose
    # sender named it like one ("gw:...") still counts as rejected
    gpu = (b"g", "GPU window: its seconds do not add up to the window's length", 0, "gw:GPU-1:60000")
    forged = (b"w", "record_id does not match (host_id, gpu_uuid, firm_id, window_start)", 2, "gw:GPU-1:0")
    assert windows_loaded(counts, [gpu, forged]) == 5 + 300 + 3


def test_a_key_id_a_sender_chose_is_shown_bounded() -> None:
    from gpumeter.errors import RecordError
    from gpumeter.record import verify

    try:
        verify(b"v", [("gm-key-id", b"k" * 1_000_000), ("gm-sig", b"00")], {})
    except RecordError as exc:
        assert len(str(exc)) < 200 and "1000000 bytes" in str(exc)
    else:
        raise AssertionError("an unknown key id verified")


def test_dead_letter_headers_are_bounded_and_kafka_failures_are_transient() -> None:
    import pytest
    from kafka.errors import KafkaTimeoutError

    from pipeline.loader import HEADER_VALUE_BYTES, DeadLetter, TransientError, _bounded

    assert _bounded(b"x" * 10) == b"x" * 10
    long = _bounded(b"x" * 5_000_000)
    assert len(long) == HEADER_VALUE_BYTES and b"5000000 bytes, sha256 " in long

    sent: list[list[tuple[str, bytes]]] = []

    class Producer:
        def send(self, topic: str, value: bytes, headers: list[tuple[str, bytes]]) -> Any:
            sent.append(headers)
            raise KafkaTimeoutError("Failed to update metadata after 60.0 secs.")

    dead = DeadLetter.__new__(DeadLetter)
    dead.topic, dead.max_bytes, dead._producer = "dlq", 1_048_588, Producer()
    with pytest.raises(TransientError, match="dead-letter topic dlq"):
        dead.send_and_wait("usage", 0, [(b"v", "r" * 2_000_000, 7, "i" * 2_000_000)])
    assert all(len(v) <= HEADER_VALUE_BYTES for v in (v for h in sent for _, v in h))


def test_a_privilege_missing_on_the_ledger_stops_the_loader() -> None:
    import pytest

    from pipeline.loader import LoaderStopped

    class Denied(FakeClient):
        def query(self, sql: str, parameters: Any = None, column_formats: Any = None) -> Result:
            raise RuntimeError("Code: 497. DB::Exception: ACCESS_DENIED: Not enough privileges on db.usage_blocks")

    consumer = FakeConsumer([{0: msgs(0, 9)}])
    ld = loader(consumer, Denied())
    with pytest.raises(LoaderStopped, match="ACCESS_DENIED"):
        ld.poll_once()
    assert consumer.commits == []


class CorruptAfterFirstPoll(FakeConsumer):
    """After the first poll every poll meets a record kafka-python cannot read (it names no offset);
    the fetch positions stop there: partition 0 at 4, partition 1 at 0."""

    def poll(self, timeout_ms: int = 0) -> dict[TopicPartition, list[Msg]]:
        if self.n >= 1:
            self.n += 1
            raise CorruptRecordError("Found invalid record structure: UnicodeDecodeError(...)")
        return super().poll(timeout_ms)

    def position(self, tp: TopicPartition) -> int:
        return {0: 4, 1: 0}[tp.partition]


def test_a_record_the_kafka_client_cannot_read_stops_the_loader_after_loading_what_came_before() -> None:
    import pytest

    from pipeline.loader import LoaderStopped

    consumer = CorruptAfterFirstPoll([{0: msgs(0, 3)}])
    client = FakeClient()
    ld = loader(consumer, client)
    assert ld.poll_once() == 0  # 0..3 is a tail that waits for more
    with pytest.raises(LoaderStopped, match="partition 0 at 4, partition 1 at 0"):
        ld.poll_once()
    assert consumer.commits == [{0: 4}] and client.tokens == [f"usage:0:0-3:v{V}"]


def test_headers_count_towards_a_blocks_bytes() -> None:
    """Messages with empty values and large headers cannot build a block of gigabytes."""
    heavy = [Msg(o, b"", [("gm-key-id", b"k" * 1000)]) for o in range(7)]
    consumer = FakeConsumer([{0: heavy}])
    client = FakeClient()
    ld = loader(consumer, client, block_bytes=3 * 1009)
    assert ld.poll_once() == 6  # 0-2 and 3-5 are full, by their headers alone
    assert client.tokens == ["usage:0:0-2:q", "usage:0:3-5:q"]


def test_lag_keeps_growing_while_the_partitions_are_paused() -> None:
    """In a ClickHouse outage nothing is fetched, so the last fetch's high water would freeze the lag:
    the broker is asked for the end offsets instead."""

    class Ends(FakeConsumer):
        def end_offsets(self, tps: list[TopicPartition]) -> dict[TopicPartition, int]:
            return {tp: {0: 500, 1: 7}[tp.partition] for tp in tps}

    consumer = Ends([{0: msgs(0, 9)}, {}, {}])
    consumer.high = {0: 10}
    client = FakeClient()
    client.fail = lambda: True
    ld = loader(consumer, client)
    ld.poll_once()  # the flush fails: paused, backing off
    assert ld._backoff > 0
    ld._retry_at = 0
    ld.poll_once()
    assert ld.lag == {0: 500}  # 500 at the broker, nothing committed, the fetch began at 0


def test_an_unreadable_record_waits_until_what_came_before_it_is_loaded() -> None:
    import pytest

    from pipeline.loader import LoaderStopped

    consumer = CorruptAfterFirstPoll([{0: msgs(0, 3)}])
    client = FakeClient()
    down = [True]
    client.fail = lambda: bool(down) and down.pop(0)
    ld = loader(consumer, client)
    assert ld.poll_once() == 0  # 0..3 buffered
    assert ld.poll_once() == 0  # the record: ClickHouse is down, nothing committed, no stop yet
    assert consumer.commits == [] and ld._buffers
    ld._retry_at = 0
    with pytest.raises(LoaderStopped, match="partition 0 at 4"):
        ld.poll_once()
    assert consumer.commits == [{0: 4}]
