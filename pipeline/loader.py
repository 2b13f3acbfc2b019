"""Kafka -> ClickHouse loader: a consumer-group member that verifies usage batches and inserts them.

Per partition, fetched messages are buffered and cut into blocks aligned to
fixed offset boundaries (``BLOCK_OFFSETS``): a block is ``[k*B, (k+1)*B)`` or,
at the live tail, whatever has arrived of it. A replay after a crash or a
rebalance therefore rebuilds the same blocks and the same tokens.

Durability order, per block (never reorder these steps):

1. verify each message (signature, framing); a failure becomes a quarantine row
   with the raw bytes, the reason and the offset;
2. insert the verified bodies as one Avro container into ``usage_ingest_v<N>``
   (a container ClickHouse refuses for its data is split until the refused
   messages are alone), then the quarantine rows, then the block's ledger row
   (``usage_blocks``), each with ``insert_deduplication_token =
   topic:partition:first-last:digest[...]``, the digest of the block's messages
   (``block_digest``: a topic made again from offset 0 is new data, not a replay);
   ClickHouse checks every window and routes it to ``usage_raw`` or
   ``usage_quarantine``; a replayed block is dropped;
3. send this block's quarantined items to the dead-letter topic and wait for
   the broker's acknowledgement;
4. only then commit the offset after the block.

A failure in 2 or 3 (ClickHouse or Kafka unavailable) commits nothing: the
loader pauses its partitions, backs off, retries the same blocks and catches up.
A crash anywhere replays from the last commit; the token absorbs an identical
block and the usage store reads each record_id once (its first delivery) whatever was replayed.
Partitions revoked in a rebalance lose their buffered messages here and are
never committed by this member; the new owner replays them. A record the Kafka
client cannot read at all stops the loader once what came before it is
committed (``_unreadable``).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import time
from collections import Counter
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from kafka import ConsumerRebalanceListener

from gpumeter.errors import GpumeterError, RecordError
from gpumeter.record import MAX_VALUE_BYTES, MAX_WINDOWS_PER_BATCH, SOE_MAGIC
from pipeline import clickhouse
from pipeline.framing import (
    Framed,
    WriterVersion,
    batch_host,
    container,
    decode_body,
    heartbeat_made_at,
    shipped_versions,
    split_value,
    window_count,
)
from pipeline.keys import Keys, RegistryFile, Signer
from pipeline.schema import (
    BATCH_CHECKS,
    FUTURE_TOLERANCE_S,
    GPU_WINDOW_CHECKS,
    GPU_WINDOW_REASON_PREFIX,
    KEY_BACKLOG_REASON,
    KEY_FROM_REASON,
    KEY_NOT_YET_REASON,
    KEY_REASONS,
    KEY_UNTIL_REASON,
    MADE_FUTURE_REASON,
    MAX_BACKLOG_S,
    SIGNER_HOST_REASON,
    WINDOW_CHECKS,
)

log = logging.getLogger(__name__)

VERIFY_THREADS = min(4, os.cpu_count() or 1)  # signature checks of a block at once
BLOCK_OFFSETS = 1000  # block boundaries: multiples of this offset
BLOCK_BYTES = 16 * 2**20  # ... or before the message that takes a block's bytes (values and headers) over this
LINGER_S = 0.5  # a partial block at the tail waits at most this long for more messages
BACKOFF_S = (0.2, 30.0)  # first and longest wait after a failed flush
END_OFFSETS_EVERY_S = 15.0  # while paused, how often the broker is asked for the partitions' end offsets


@dataclass(slots=True)
class LoaderStats:
    messages: int = 0  # durable and committed (or committed by nobody after a commit failure)
    windows: int = 0  # loaded into usage_raw
    quarantined: int = 0  # messages and windows rejected
    inserts: int = 0
    commits: int = 0
    flush_failures: int = 0  # ClickHouse / dead-letter failures that were retried
    commit_failures: int = 0
    dropped_on_revoke: int = 0  # buffered messages of partitions taken away in a rebalance
    deduplicated_blocks: int = 0  # blocks replayed after they had loaded (the ledger had them): not inserted
    quarantined_by_reason: Counter[str] = field(default_factory=Counter)  # by ``reason_label``
    last_commit_unix: float = 0.0  # wall-clock time of the last offset commit
    stopped: int = 0  # 1 once a permanent failure stopped the loader (LoaderStopped)


class TransientError(Exception):
    """ClickHouse or Kafka could not take the block now; retry it later, commit nothing."""


class LoaderStopped(GpumeterError):
    """ClickHouse refused an insert for a reason no retry and no message can change (a missing table
    or privilege, a schema that does not match): the loader stops, nothing of the block committed.
    Its own exit status (3), so a service manager can tell it from a failure worth restarting."""

    code = "loader_stopped"
    exit_code = 3


# How a refused insert is handled, by ClickHouse error code (src/Common/ErrorCodes.cpp). The model is
# Vector's ClickHouse sink (src/sinks/clickhouse/service.rs): retry what may pass later, never what
# cannot. "data": this block's content is refused (split it to find the messages, quarantine them);
# "stop": the store or the account is wrong; anything else, a network error included, is transient.
DATA_CODES = {
    6: "CANNOT_PARSE_TEXT", 27: "CANNOT_PARSE_INPUT_ASSERTION_FAILED", 33: "CANNOT_READ_ALL_DATA",
    38: "CANNOT_PARSE_DATE", 41: "CANNOT_PARSE_DATETIME", 53: "TYPE_MISMATCH", 69: "ARGUMENT_OUT_OF_BOUND",
    70: "CANNOT_CONVERT_TYPE", 72: "CANNOT_PARSE_NUMBER", 117: "INCORRECT_DATA", 131: "TOO_LARGE_STRING_SIZE",
    190: "SIZES_OF_ARRAYS_DONT_MATCH", 321: "VALUE_IS_OUT_OF_RANGE_OF_DATA_TYPE",
}  # fmt: skip
STOP_CODES = {
    10: "NOT_FOUND_COLUMN_IN_BLOCK", 16: "NO_SUCH_COLUMN_IN_TABLE", 47: "UNKNOWN_IDENTIFIER", 60: "UNKNOWN_TABLE",
    62: "SYNTAX_ERROR", 81: "UNKNOWN_DATABASE", 164: "READONLY", 192: "UNKNOWN_USER", 194: "REQUIRED_PASSWORD",
    497: "ACCESS_DENIED", 516: "AUTHENTICATION_FAILED",
}  # fmt: skip
# TOO_MANY_PARTS (252) is both "merges are slower than inserts" (back-pressure: transient) and this:
TOO_MANY_PARTITIONS = "Too many partitions for single INSERT block"


def classify(exc: BaseException) -> tuple[str, str]:
    """('data' | 'stop' | 'transient', a one-line reason) of a failed insert."""
    text = str(exc)
    found = re.search(r"Code: (\d+)", text)
    code = int(found.group(1)) if found else None
    first = next((line.strip() for line in text.splitlines() if line.strip()), type(exc).__name__)[:300]
    if TOO_MANY_PARTITIONS in text:
        return "data", "ClickHouse refused the insert: its windows fall in too many months for one block"
    if code in DATA_CODES:
        return "data", f"ClickHouse refused the insert ({DATA_CODES[code]}): {first}"
    if code in STOP_CODES:
        return "stop", f"ClickHouse refused the insert ({STOP_CODES[code]}): {first}"
    return "transient", f"ClickHouse: {first}"


def refusal(exc: BaseException) -> tuple[str, str]:
    """``classify`` of a failed insert; a 'stop' raises ``LoaderStopped``."""
    kind, reason = classify(exc)
    if kind == "stop":
        raise LoaderStopped(f"{reason}; nothing of this block was committed: fix it, then start again") from exc
    return kind, reason


KAFKA_MESSAGE_BYTES = 1_048_588  # Kafka's default max.message.bytes of a topic


def message_limit(described: dict[str, Any], topic: str) -> int | None:
    """``max.message.bytes`` of ``topic`` from kafka-python's ``describe_configs`` result."""
    entry = described.get("topic", {}).get(topic, {}).get("max.message.bytes")
    value = entry.get("value") if isinstance(entry, dict) else entry
    return int(value) if value not in (None, "") else None


def topic_message_limit(bootstrap: str, topic: str, security: dict[str, Any] | None = None) -> int:
    """The topic's ``max.message.bytes`` as the broker says; Kafka's default if it will not say."""
    from kafka import KafkaAdminClient
    from kafka.admin import ConfigResource, ConfigResourceType

    kafka_log = logging.getLogger("kafka")
    level = kafka_log.level
    kafka_log.setLevel(logging.CRITICAL)  # a broker that drops the request makes kafka-python log errors
    try:
        admin = KafkaAdminClient(bootstrap_servers=bootstrap, request_timeout_ms=5000, bootstrap_timeout_ms=5000,
                                 **(security or {}))  # fmt: skip
        try:
            resource = ConfigResource(ConfigResourceType.TOPIC, topic, configs=["max.message.bytes"])
            limit = message_limit(admin.describe_configs([resource], config_filter="all"), topic)
        finally:
            admin.close()
    except Exception as exc:  # a broker without DescribeConfigs (the local test broker), or no right to it
        log.info("dead-letter topic %s: its max.message.bytes is unknown (%s); assuming Kafka's default", topic, exc)
        limit = None
    finally:
        kafka_log.setLevel(level)
    return limit or KAFKA_MESSAGE_BYTES


class DeadLetter:
    """Rejected items to a Kafka topic, with the reason and source offset in headers. The producer's
    largest request is the topic's ``max.message.bytes``, so what the topic cannot take is known
    before it is sent (and sent as a digest)."""

    def __init__(
        self, bootstrap: str, topic: str, max_bytes: int | None = None, security: dict[str, Any] | None = None
    ) -> None:
        from kafka import KafkaProducer

        self.topic = topic
        self.max_bytes = max_bytes or topic_message_limit(bootstrap, topic, security)
        self._producer = KafkaProducer(
            bootstrap_servers=bootstrap,
            acks="all",
            linger_ms=5,
            max_request_size=self.max_bytes,
            bootstrap_timeout_ms=5000,
            **(security or {}),  # TLS / SASL (Settings.kafka_security)
        )

    def send_and_wait(self, source_topic: str, partition: int, items: list[tuple[bytes, str, int, str]]) -> None:
        """Send each rejected item with its reason and source; one too large for the producer or the
        topic goes as its SHA-256, size and reason, with an empty value (the full bytes stay in
        ``usage_quarantine``). Other failures are transient: nothing is committed, the block retries."""
        from kafka.errors import KafkaError

        try:
            self._send_all(source_topic, partition, items)
        except KafkaError as exc:  # no metadata in time, a flush that timed out, a broker gone
            raise TransientError(f"dead-letter topic {self.topic}: {exc!r}") from exc

    def _send_all(self, source_topic: str, partition: int, items: list[tuple[bytes, str, int, str]]) -> None:
        from kafka.errors import MessageSizeTooLargeError

        futures = []
        for raw, reason, offset, record_id in items:
            headers = [  # each bounded: the reason and the record id carry bytes a sender chose
                ("gm-reason", _bounded(reason.encode())),
                ("gm-source", f"{source_topic}:{partition}:{offset}".encode()),
                ("gm-record-id", _bounded(record_id.encode())),
            ]
            try:
                futures.append((raw, headers, self._producer.send(self.topic, value=raw, headers=headers)))
            except MessageSizeTooLargeError:  # larger than max_request_size: refused before sending
                futures.append((raw, headers, self._send_digest(raw, headers)))
        self._producer.flush(timeout=30)
        refused = [
            (raw, headers)
            for raw, headers, fut in futures
            if fut.is_done and isinstance(fut.exception, MessageSizeTooLargeError)
        ]  # the broker's limit
        self._acknowledged([fut for _, _, fut in futures if not isinstance(fut.exception, MessageSizeTooLargeError)])
        retried = [self._send_digest(raw, headers) for raw, headers in refused]
        if retried:
            self._producer.flush(timeout=30)
        self._acknowledged(retried)

    def _acknowledged(self, futures: list[Any]) -> None:
        for fut in futures:
            if not fut.is_done or fut.exception is not None:
                raise TransientError(f"dead-letter topic {self.topic}: {fut.exception or 'not acknowledged'}")

    def _send_digest(self, raw: bytes, headers: list[tuple[str, bytes]]) -> Any:
        digest = [("gm-sha256", hashlib.sha256(raw).hexdigest().encode()), ("gm-oversize", str(len(raw)).encode())]
        log.warning("dead-letter value of %d bytes is too large to send: sent its digest", len(raw))
        return self._producer.send(self.topic, value=b"", headers=headers + digest)

    def close(self) -> None:
        self._producer.close(timeout=10)


HEADER_VALUE_BYTES = 1024  # a dead-letter header's value at most: the digest of anything always fits


def _bounded(value: bytes) -> bytes:
    """``value``, or its first bytes and its size and SHA-256 when longer than ``HEADER_VALUE_BYTES``."""
    if len(value) <= HEADER_VALUE_BYTES:
        return value
    tail = f"... ({len(value)} bytes, sha256 {hashlib.sha256(value).hexdigest()})".encode()
    return value[: HEADER_VALUE_BYTES - len(tail)] + tail


class RevocationListener(ConsumerRebalanceListener):  # type: ignore[misc]
    """Remembers revoked partitions; the loader drops their buffers after the poll that revoked them."""

    def __init__(self) -> None:
        self.revoked: set[int] = set()

    def on_partitions_revoked(self, revoked: Any) -> None:
        self.revoked.update(tp.partition for tp in revoked)

    def on_partitions_assigned(self, assigned: Any) -> None:
        pass

    def on_partitions_lost(self, lost: Any) -> None:
        self.on_partitions_revoked(lost)


def consumer_config(group_id: str, fast_rebalance: bool = False, rebalance_timeout_s: float | None = None
                    ) -> dict[str, Any]:  # fmt: skip
    """kafka-python consumer settings; ``fast_rebalance`` for tests/demo on a local broker;
    ``rebalance_timeout_s``: the longest a member may go between polls, which is also how long a
    join waits for the group's members (kafka-python's ``max_poll_interval_ms``; default 300 s)."""
    config: dict[str, Any] = {
        "group_id": group_id,
        "enable_auto_commit": False,
        "auto_offset_reset": "earliest",
        "max_poll_records": 4000,
        "fetch_max_bytes": 64 * 1024 * 1024,
        "max_partition_fetch_bytes": 16 * 1024 * 1024,
        "bootstrap_timeout_ms": 5_000,  # then ``until_connected`` says so plainly and tries again
    }
    # Kafka's record-batch CRCs are always checked. The crc32c package (a base dependency)
    # makes that cheap; kafka-python's pure-Python fallback checks only ~10 MB/s.
    if fast_rebalance:
        # A JOIN waits for the rebalance timeout (= max_poll_interval_ms in kafka-python).
        config.update(max_poll_interval_ms=10_000, session_timeout_ms=6_000, heartbeat_interval_ms=1_000)
    if rebalance_timeout_s is not None:
        timeout_ms = int(rebalance_timeout_s * 1000)
        session_ms = min(timeout_ms, 10_000)
        config.update(max_poll_interval_ms=timeout_ms, session_timeout_ms=session_ms,
                      heartbeat_interval_ms=max(session_ms // 3, 100))  # fmt: skip
    return config


class Loader:
    def __init__(
        self,
        consumer: Any,
        client: Any,
        database: str,
        topic: str,
        keys: Keys | None = None,
        clock: Callable[[], datetime] = lambda: datetime.now(UTC),
        dead_letter: DeadLetter | None = None,
        writers: dict[bytes, WriterVersion] | None = None,
        block_offsets: int = BLOCK_OFFSETS,
        block_bytes: int = BLOCK_BYTES,
        linger_s: float = LINGER_S,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        self.consumer = consumer
        self.client = client
        self.database = database
        self.topic = topic
        self.keys = keys  # None: signatures and host/provider are NOT checked (the CLI says so)
        self.clock = clock
        self.dead_letter = dead_letter
        self.writers = shipped_versions() if writers is None else writers
        self.block_offsets = block_offsets
        self.block_bytes = block_bytes
        self.linger_s = linger_s
        self.sleep = sleep
        self.stats = LoaderStats()
        existing = getattr(consumer, "gpumeter_revocations", None)  # set by make_consumer
        if isinstance(existing, RevocationListener):
            self.listener = existing
        else:
            self.listener = RevocationListener()
            consumer.subscribe([topic], listener=self.listener)
        self.lag: dict[int, int] = {}  # partition -> messages at the broker not yet committed by this member
        self.assigned = 0  # partitions assigned to this member at the last poll
        self._committed: dict[int, int] = {}  # partition -> offset this member committed last
        self._buffers: dict[int, list[Any]] = {}
        self._since: dict[int, float] = {}  # partition -> monotonic time its oldest buffered message came
        self._backoff = 0.0
        self._retry_at = 0.0
        self._ends: dict[Any, int] = {}  # end offsets asked of the broker while paused (``_measure_lag``)
        self._ends_at = -END_OFFSETS_EVERY_S
        self._pool: ThreadPoolExecutor | None = None  # signature checks side by side (``_check_block``)

    # --- the loop --------------------------------------------------------
    def poll_once(self, timeout_ms: int = 200, drain: bool = False) -> int:
        """Poll, buffer, flush whatever blocks are ready. Returns messages made durable and committed."""
        from kafka.errors import CorruptRecordError

        try:
            fetched = self.consumer.poll(timeout_ms=0 if self._backoff else timeout_ms)
        except CorruptRecordError as exc:
            self._unreadable(exc)  # stops, or returns while what came before it cannot be loaded yet
            return 0
        self._drop_revoked()
        self._measure_lag()
        now = time.monotonic()
        arrived: set[int] = set()
        for tp, messages in fetched.items():
            if messages:
                self._buffers.setdefault(tp.partition, []).extend(messages)
                self._since.setdefault(tp.partition, now)
                arrived.add(tp.partition)
        if self._backoff and now < self._retry_at:
            self.sleep(min(self._retry_at - now, timeout_ms / 1000))
            return 0
        ready = self._ready_blocks(now, arrived, drain)
        if not ready:
            return 0
        done = self._flush(ready)
        self._measure_lag()  # what the commit just settled, not what the poll saw before it
        return done

    def _unreadable(self, exc: Exception) -> None:
        """kafka-python cannot read a record (a batch failing its CRC, a header key that is not UTF-8):
        it raises at every poll and says neither partition nor offset, so the record cannot be
        quarantined. Load and commit what was fetched before it, then stop with one message (if that
        cannot be loaded now, back off and try again: the next poll meets the record again)."""
        if self._backoff and time.monotonic() < self._retry_at:
            self.sleep(min(self._retry_at - time.monotonic(), 1.0))
            return
        self._flush(self._ready_blocks(time.monotonic(), set(), True))
        if any(self._buffers.values()):
            log.warning("a record cannot be read (%s); loading what came before it first", exc)
            return
        where = ", ".join(
            f"partition {tp.partition} at {self.consumer.position(tp)}"
            for tp in sorted(self.consumer.assignment(), key=lambda tp: tp.partition)
        )
        raise LoaderStopped(
            f"a record of topic {self.topic} cannot be read by the Kafka client ({exc}); what came before it is "
            f"loaded and committed; the first unread records are at {where}. Examine the partition there, move "
            f"the group past the record (kafka-consumer-groups --reset-offsets --to-offset N --topic "
            f"{self.topic}:PARTITION), then start again"
        ) from exc

    def run(
        self,
        until: Callable[[LoaderStats], bool] = lambda s: False,
        idle_timeout_s: float | None = None,
        poll_timeout_ms: int = 200,
    ) -> LoaderStats:
        """Poll until ``until(stats)`` holds, or nothing arrived for ``idle_timeout_s``; then flush."""
        last_data = time.monotonic()
        while not until(self.stats):
            before = sum(len(b) for b in self._buffers.values())
            done = self.poll_once(poll_timeout_ms)
            if done or sum(len(b) for b in self._buffers.values()) != before:
                last_data = time.monotonic()
            elif idle_timeout_s is not None and time.monotonic() - last_data > idle_timeout_s:
                break
        self.flush_all()
        return self.stats

    def flush_all(self, attempts: int = 3) -> None:
        """Make everything buffered durable and committed (used when stopping)."""
        for _ in range(attempts):
            if not any(self._buffers.values()):
                return
            self._backoff = 0.0
            self.poll_once(timeout_ms=0, drain=True)

    # --- blocks ----------------------------------------------------------
    def _measure_lag(self) -> None:
        """Per assigned partition, the broker's high water (from the last fetch, no request) less the
        offset this member committed (or, before its first commit, its fetch position). While the
        partitions are paused (backing off after a failed flush) nothing is fetched, so the high water
        is asked of the broker instead, at most every ``END_OFFSETS_EVERY_S``: lag grows in an outage."""
        lag = {}
        assigned = self.consumer.assignment()
        self.assigned = len(assigned)
        ends = self._end_offsets(assigned) if self._backoff else {}
        for tp in assigned:
            high = ends.get(tp) if tp in ends else self.consumer.highwater(tp)
            done = self._committed.get(tp.partition)
            if done is None:
                buffered = self._buffers.get(tp.partition)
                done = buffered[0].offset if buffered else None
            if high is not None and done is not None:
                lag[tp.partition] = max(high - done, 0)
        self.lag = lag

    def _end_offsets(self, assigned: Any) -> dict[Any, int]:
        now = time.monotonic()
        if not assigned or now - self._ends_at < END_OFFSETS_EVERY_S:
            return self._ends
        self._ends_at = now
        try:
            self._ends = dict(self.consumer.end_offsets(list(assigned)))
        except Exception as exc:  # the broker is down too: the last figures stand
            log.debug("end offsets unavailable: %s", exc)
        return self._ends

    def _drop_revoked(self) -> None:
        if not self.listener.revoked:
            return
        for partition in self.listener.revoked:
            dropped = self._buffers.pop(partition, [])
            self._since.pop(partition, None)
            if dropped:
                self.stats.dropped_on_revoke += len(dropped)
                log.info("partition %d revoked: dropped %d uncommitted messages", partition, len(dropped))
        self.listener.revoked.clear()

    def _ready_blocks(self, now: float, arrived: set[int], drain: bool) -> dict[int, list[list[Any]]]:
        """Per partition, the blocks to flush now: every complete block, and the tail when due. A block
        ends at a multiple of ``block_offsets`` or before the message that would take its bytes (values
        and headers, ``message_bytes``) over ``block_bytes`` (a replay from a block's end cuts the same
        blocks); such a block is complete."""
        out: dict[int, list[list[Any]]] = {}
        size = self.block_offsets
        for partition, buf in self._buffers.items():
            blocks: list[list[Any]] = []
            start = held = 0
            for i, msg in enumerate(buf):
                n = message_bytes(msg)
                if i > start and (msg.offset // size != buf[start].offset // size or held + n > self.block_bytes):
                    blocks.append(buf[start:i])
                    start, held = i, 0
                held += n
            if buf:
                blocks.append(buf[start:])
            last = blocks[-1] if blocks else []
            tail_complete = bool(last) and (last[-1].offset % size == size - 1 or held >= self.block_bytes)
            tail_due = drain or partition not in arrived or now - self._since.get(partition, now) >= self.linger_s
            if blocks and not tail_complete and not tail_due:
                blocks.pop()
            if blocks:
                out[partition] = blocks
        return out

    def _flush(self, ready: dict[int, list[list[Any]]]) -> int:
        from kafka import TopicPartition
        from kafka.structs import OffsetAndMetadata

        commits: dict[Any, Any] = {}
        handled = 0
        try:
            for partition, blocks in sorted(ready.items()):
                for block in blocks:
                    self._load_block(partition, block)
                    handled += len(block)
                    commits[TopicPartition(self.topic, partition)] = OffsetAndMetadata(block[-1].offset + 1, "", -1)
                    done = len(block)
                    self._buffers[partition] = self._buffers[partition][done:]
                    self._since[partition] = time.monotonic()
                if not self._buffers[partition]:
                    del self._buffers[partition]
                    self._since.pop(partition, None)
        except TransientError as exc:
            self.stats.flush_failures += 1
            self._backoff = min(max(self._backoff * 2, BACKOFF_S[0]), BACKOFF_S[1])
            self._retry_at = time.monotonic() + self._backoff
            log.warning("flush failed, nothing committed, retrying in %.1f s: %s", self._backoff, exc)
            self._pause(True)
        else:
            if self._backoff:
                self._backoff = 0.0
                self._pause(False)
        if commits:
            self._commit(commits)
        self.stats.messages += handled
        return handled

    def _pause(self, paused: bool) -> None:
        assigned = self.consumer.assignment()
        if paused:
            self.consumer.pause(*assigned)
        else:
            self.consumer.resume(*assigned)

    def _commit(self, offsets: dict[Any, Any]) -> None:
        # step 4: every block in `offsets` is durable in ClickHouse (and dead-lettered)
        from kafka.errors import CommitFailedError, KafkaError

        try:
            self.consumer.commit(offsets=offsets)
            self.stats.commits += 1
            self.stats.last_commit_unix = time.time()
            self._committed.update({tp.partition: meta.offset for tp, meta in offsets.items()})
        except (CommitFailedError, KafkaError) as exc:
            # The rows are durable; the next owner of these partitions replays them and
            # the tokens and the first-delivery read absorb the replay. Nothing is lost.
            self.stats.commit_failures += 1
            log.warning("offset commit failed (%s); the next owner replays, nothing is lost", exc)

    def _load_block(self, partition: int, block: list[Any]) -> None:
        digest = block_digest(block)
        token = f"{self.topic}:{partition}:{block[0].offset}-{block[-1].offset}:{digest}"
        at = _Attempt(partition, digest, self.clock())
        first, last = block[0].offset, block[-1].offset
        try:
            replay = clickhouse.block_loaded(self.client, self.database, self.topic, partition, first, digest)
            if replay:
                rejected = clickhouse.quarantined_in_range(self.client, self.database, partition, first, last, digest)
        except Exception as exc:
            refusal(exc)  # a missing table or privilege stops the loader
            raise TransientError(f"ClickHouse: {exc}") from exc
        if replay:  # loaded before (a crash or a rebalance after the insert): dead-letter again, commit
            self.stats.deduplicated_blocks += 1
            log.info("block %s:%d:%d-%d was loaded before (a replay): not inserted again", self.topic, partition,
                     first, last)  # fmt: skip
            if self.dead_letter is not None and rejected:
                self.dead_letter.send_and_wait(self.topic, partition, rejected)
            return
        by_version: dict[int, tuple[WriterVersion, list[Framed]]] = {}
        checks = self._check_block(block, int(at.now.timestamp() * 1000))
        for msg, checked in zip(block, checks, strict=True):  # step 1: verify
            at.headers[msg.offset] = list(msg.headers or [])
            if isinstance(checked, RecordError):
                at.reject(msg.value if msg.value is not None else b"", str(checked), msg.offset)
                continue
            writer, framed, count = checked
            by_version.setdefault(writer.version, (writer, []))[1].append(framed)
            at.counts[msg.offset] = count
        try:  # step 2: insert
            for version, (writer, framed_list) in sorted(by_version.items()):
                # what was accepted, and under which key bounds, is in the token: a retry after the keys
                # file changed inserts what it now accepts instead of being taken for a duplicate
                self._insert_container(at, writer, framed_list, f"{token}:v{version}:{accepted_digest(framed_list)}")
            if at.bad:
                refused = hashlib.blake2b(repr([(row[4], row[1]) for row in at.bad]).encode(), digest_size=8)
                clickhouse.insert_quarantine(self.client, self.database, at.bad, f"{token}:q:{refused.hexdigest()}")
            rejected = clickhouse.quarantined_in_range(self.client, self.database, partition, first, last, digest)
            loaded = windows_loaded(at.counts, rejected)
            ledger = (self.topic, partition, first, last, digest, len(block), loaded, len(rejected), at.now)
            clickhouse.record_block(self.client, self.database, ledger, f"{token}:ledger")
        except (TransientError, LoaderStopped):
            raise
        except Exception as exc:
            refusal(exc)  # the quarantine or the ledger insert refused for good: stop
            raise TransientError(f"ClickHouse: {exc}") from exc
        if self.dead_letter is not None and rejected:  # step 3
            self.dead_letter.send_and_wait(self.topic, partition, rejected)
        self.stats.windows += loaded
        self.stats.quarantined += len(rejected)
        self.stats.quarantined_by_reason.update(reason_label(r[1]) for r in rejected)

    def _check_block(self, block: list[Any], now_ms: int) -> list[tuple[WriterVersion, Framed, int] | RecordError]:
        """``check_message`` of every message of a block, in order. An Ed25519 verification (~0.1 ms)
        releases the GIL, so a block's messages are checked in VERIFY_THREADS slices side by side, all
        against one snapshot of the registry."""
        keys = self.keys.current() if isinstance(self.keys, RegistryFile) else self.keys

        def check(msgs: list[Any]) -> list[tuple[WriterVersion, Framed, int] | RecordError]:
            out: list[tuple[WriterVersion, Framed, int] | RecordError] = []
            for msg in msgs:
                value = msg.value if msg.value is not None else b""
                try:
                    out.append(check_message(value, list(msg.headers or []), keys, self.writers, msg.offset,
                                             msg.timestamp, now_ms))  # fmt: skip
                except RecordError as exc:
                    out.append(exc)
            return out

        if keys is None or VERIFY_THREADS < 2 or len(block) < 2 * VERIFY_THREADS:
            return check(block)
        if self._pool is None:
            self._pool = ThreadPoolExecutor(VERIFY_THREADS, thread_name_prefix="gpumeter-verify")
        size = -(-len(block) // VERIFY_THREADS)
        slices = [block[i : i + size] for i in range(0, len(block), size)]
        return [checked for part in self._pool.map(check, slices) for checked in part]

    def _try_insert(self, at: _Attempt, writer: WriterVersion, framed: list[Framed], token: str
                    ) -> tuple[str, str, Exception] | None:  # fmt: skip
        """Insert ``framed`` as one container: None when it went in, else the refusal's (kind,
        reason, error) from ``refusal`` (which raises for a 'stop')."""
        try:
            data = container(writer, at.partition, int(at.now.timestamp() * 1_000_000), framed, at.digest)
            clickhouse.insert_ingest(self.client, self.database, writer, data, token)
        except Exception as exc:
            return (*refusal(exc), exc)
        self.stats.inserts += 1
        return None

    def _insert_container(self, at: _Attempt, writer: WriterVersion, framed: list[Framed], token: str) -> None:
        """Insert; if ClickHouse refuses the data, quarantine the bodies Python cannot decode, then
        split what is left until the refused messages are alone, quarantine those and insert the
        rest (``_Attempt.reject``). See ``classify``."""
        refused = self._try_insert(at, writer, framed, token)
        if refused is None:
            return
        good: list[Framed] = []
        for f in framed:
            try:
                decode_body(writer, f.body)
                good.append(f)
            except RecordError as exc:
                at.reject(framed_value(writer, f), str(exc), f.offset)
        kind, reason, error = refused
        if len(good) == len(framed) and kind == "transient":  # every body decodes: ClickHouse is the problem
            raise TransientError(reason) from error
        self._insert_split(at, writer, good, token + ":checked")

    def _insert_split(self, at: _Attempt, writer: WriterVersion, framed: list[Framed], token: str) -> None:
        """Insert ``framed``; on a refusal of the data, each half on its own (tokens ``token:a``,
        ``token:b``: a replay splits the same way), down to single messages, which are rejected with
        the reason."""
        refused = self._try_insert(at, writer, framed, token) if framed else None
        if refused is None:
            return
        kind, reason, error = refused
        if kind == "transient":
            raise TransientError(reason) from error
        if len(framed) == 1:
            f = framed[0]
            log.warning("quarantined message at %s:%d:%d: %s", self.topic, at.partition, f.offset, reason)
            at.reject(framed_value(writer, f), reason, f.offset)
            return
        half = len(framed) // 2
        self._insert_split(at, writer, framed[:half], token + ":a")
        self._insert_split(at, writer, framed[half:], token + ":b")


def check_message(
    value: bytes,
    headers: list[tuple[str, bytes]],
    keys: Keys | None,
    writers: dict[bytes, WriterVersion],
    offset: int,
    timestamp_ms: int | None,
    now_ms: int | None = None,
) -> tuple[WriterVersion, Framed, int]:
    """Step 1 for one message (the loader's, and ``pipeline requeue``'s): the contract's limits, the
    signature (when ``keys``), the framing. (writer, the body framed for the container, windows), or
    RecordError saying why not."""
    if len(value) > MAX_VALUE_BYTES:
        raise RecordError(f"message of {len(value)} bytes, over the limit of {MAX_VALUE_BYTES}")
    signer = keys.verify(value, headers) if keys is not None else None
    writer, body = split_value(value, writers)
    if signer is not None and batch_host(body) != signer.host_id.encode():
        # the views check each window against the signer too; this also catches a heartbeat (no
        # windows) that speaks for another host, which would otherwise be dropped without a trace
        raise RecordError(SIGNER_HOST_REASON)
    count = window_count(body)
    if count > MAX_WINDOWS_PER_BATCH:
        raise RecordError(f"message of {count} windows, over the limit of {MAX_WINDOWS_PER_BATCH}")
    if signer is not None and count == 0 and writer.version >= 3:
        # a heartbeat: the views would only leave it out of agent_messages; its refusal is kept instead
        made_at = heartbeat_made_at(body)
        reason = key_refusal(signer, made_at, now_ms) if made_at is not None else None
        if reason is not None:
            raise RecordError(reason)
    timestamp = timestamp_ms if timestamp_ms is not None else -1
    if signer is None:
        framed = Framed(offset, timestamp, body)
    else:
        framed = Framed(offset, timestamp, body, signer.host_id, signer.provider_id,
                        signer.valid_from_ms, signer.valid_until_ms)  # fmt: skip
    return writer, framed, count


def key_refusal(signer: Signer, made_at_ms: int, now_ms: int | None) -> str | None:
    """The reason ``schema.MADE_CHECKS`` would give a batch made at ``made_at_ms`` and loaded at
    ``now_ms`` (None: the arrival checks are skipped) under ``signer``'s key, or None."""
    start, end, tolerance = signer.valid_from_ms, signer.valid_until_ms, FUTURE_TOLERANCE_S * 1000
    if now_ms is not None and start >= 0 and now_ms + tolerance < start:
        return KEY_NOT_YET_REASON
    if now_ms is not None and end >= 0 and now_ms > end + MAX_BACKLOG_S * 1000:
        return KEY_BACKLOG_REASON
    if now_ms is not None and end >= 0 and made_at_ms > now_ms + tolerance:
        return MADE_FUTURE_REASON
    if start >= 0 and made_at_ms < start:
        return KEY_FROM_REASON
    if end >= 0 and made_at_ms >= end:
        return KEY_UNTIL_REASON
    return None


def message_bytes(msg: Any) -> int:
    """What a message holds in memory for a block: its value and its headers (a rejected message's
    headers are kept, as hex, for its quarantine row)."""
    return len(msg.value or b"") + sum(len(k) + len(v or b"") for k, v in (msg.headers or ()))


def windows_loaded(counts: dict[int, int], rejected: list[tuple[bytes, str, int, str]]) -> int:
    """Windows of a block that went into ``usage_raw``: per message that passed step 1 (``counts``:
    offset -> its windows), less the windows ClickHouse quarantined (a GPU window is not one); none
    of a message rejected whole (a rejection without a record_id). ``window_count`` reads an array's
    first Avro block, so a message that writes its windows in several blocks can have more rejected
    than counted: it counts 0, never less (its extra windows are checked by the views all the same)."""
    whole = {offset for _, _, offset, rid in rejected if not rid}
    # a GPU window's rejection is told apart by its reason, which no sender writes (a record_id it does)
    per_message = Counter(
        offset for _, reason, offset, rid in rejected if rid and not reason.startswith(GPU_WINDOW_REASON_PREFIX)
    )
    return sum(max(0, n - per_message[offset]) for offset, n in counts.items() if offset not in whole)


def headers_text(headers: list[tuple[str, bytes]]) -> str:
    """A message's headers as quarantine rows keep them (JSON of [name, hex value]): a message
    rejected for its signature can be verified again later (``pipeline requeue``)."""
    return json.dumps([[k, (v or b"").hex()] for k, v in headers])


def headers_from_text(text: str) -> list[tuple[str, bytes]]:
    if not text:
        return []
    return [(str(k), bytes.fromhex(v)) for k, v in json.loads(text)]


@dataclass(slots=True)
class _Attempt:
    """One attempt at loading a block: its partition, digest (``block_digest``), clock reading, each
    message's headers, and the messages rejected so far as quarantine rows
    (``clickhouse.QUARANTINE_COLUMNS``)."""

    partition: int
    digest: str
    now: datetime
    bad: list[tuple[bytes, str, str, int, int, datetime, str, str]] = field(default_factory=list)
    headers: dict[int, list[tuple[str, bytes]]] = field(default_factory=dict)
    counts: dict[int, int] = field(default_factory=dict)  # offset -> windows, of messages that passed step 1

    def reject(self, value: bytes, reason: str, offset: int) -> None:
        headers = headers_text(self.headers.get(offset, []))
        self.bad.append((value, reason, "kafka", self.partition, offset, self.now, self.digest, headers))


# Labels of a rejection for metrics: the checks' own reasons (a fixed set), message-level reasons by
# their start (they carry key ids and sizes, which must not become label values).
MESSAGE_REASONS = (
    ("unsigned batch", "unsigned"), ("unknown signing key id", "unknown_key"), ("bad signature", "bad_signature"),
    ("revoked signing key id", "revoked_key"),
    ("not an Avro single-object message", "bad_magic"), ("unknown writer schema", "unknown_writer"),
    ("corrupt Avro body", "corrupt"), ("trailing bytes", "corrupt"), ("Avro body is not", "corrupt"),
    ("ClickHouse refused the insert", "refused_by_clickhouse"),
)  # fmt: skip


def reason_label(reason: str) -> str:
    """A bounded label value for a quarantine reason."""
    if reason in {r for r, _ in (*BATCH_CHECKS, *WINDOW_CHECKS)} or reason in KEY_REASONS:
        return reason
    if reason in {GPU_WINDOW_REASON_PREFIX + r for r, _ in GPU_WINDOW_CHECKS}:
        return reason
    if reason.startswith("message of ") and reason.endswith(f"limit of {MAX_VALUE_BYTES}"):
        return "too_large"
    if reason.startswith("message of ") and reason.endswith(f"limit of {MAX_WINDOWS_PER_BATCH}"):
        return "too_many_windows"
    return next((label for start, label in MESSAGE_REASONS if reason.startswith(start)), "other")


def framed_value(writer: WriterVersion, f: Framed) -> bytes:
    """The message value ``f`` was cut from (single-object encoding: magic, fingerprint, body)."""
    return SOE_MAGIC + writer.fingerprint + f.body


def accepted_digest(framed: list[Framed]) -> str:
    """A digest of which messages of a block passed step 1 and whom they were verified for."""
    h = hashlib.blake2b(digest_size=8)
    for f in framed:
        h.update(f"{f.offset}:{f.signer_host}:{f.signer_provider}:{f.key_from_ms}:{f.key_until_ms};".encode())
    return h.hexdigest()


def block_digest(block: list[Any]) -> str:
    """A digest of a block's messages (offset, value and headers): a replay of the block has the same
    one, a block of a topic made again (a new cluster, offsets from 0 again) another."""
    h = hashlib.blake2b(digest_size=16)
    for msg in block:
        value = msg.value or b""
        h.update(f"{msg.offset}:{len(value)}:".encode())
        h.update(value)
        for key, v in msg.headers or []:
            h.update(f"{len(key)}:{key}:{len(v or b'')}:".encode())
            h.update(v or b"")
    return h.hexdigest()


def make_consumer(bootstrap: str, topic: str, group_id: str, fast_rebalance: bool = False,
                  rebalance_timeout_s: float | None = None, security: dict[str, Any] | None = None) -> Any:  # fmt: skip
    from kafka import KafkaConsumer

    config = consumer_config(group_id, fast_rebalance, rebalance_timeout_s)
    consumer = KafkaConsumer(bootstrap_servers=bootstrap, **config, **(security or {}))
    listener = RevocationListener()
    consumer.subscribe([topic], listener=listener)
    consumer.gpumeter_revocations = listener  # the Loader drops revoked partitions' buffers through it
    return consumer
