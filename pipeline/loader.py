"""Kafka -> ClickHouse loader: a consumer-group member that decodes usage batches and inserts them.

Durability order, per poll (never reorder these steps):

1. decode every fetched message; undecodable ones become quarantine rows;
2. insert the rows into ClickHouse, one insert per partition's contiguous offset
   range with ``insert_deduplication_token = topic:partition:first-last``, so a
   replay of the same range is dropped by ClickHouse;
3. only then commit the consumer offsets.

A crash between 2 and 3 replays the range: the token absorbs an identical
block, and ``usage_windows`` reads each record_id once whatever was replayed.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from gpumeter.errors import RecordError
from gpumeter.record import decode_batch, verify
from pipeline import clickhouse

log = logging.getLogger(__name__)


@dataclass(slots=True)
class LoaderStats:
    messages: int = 0
    windows: int = 0
    quarantined: int = 0
    inserts: int = 0
    commits: int = 0


def consumer_config(group_id: str, fast_rebalance: bool = False) -> dict[str, Any]:
    """kafka-python consumer settings; ``fast_rebalance`` for tests/demo on a local broker."""
    config: dict[str, Any] = {
        "group_id": group_id,
        "enable_auto_commit": False,
        "auto_offset_reset": "earliest",
        "max_poll_records": 2000,
        "fetch_max_bytes": 64 * 1024 * 1024,
        "max_partition_fetch_bytes": 8 * 1024 * 1024,
    }
    if fast_rebalance:
        # A JOIN waits for the rebalance timeout (= max_poll_interval_ms in kafka-python).
        config.update(max_poll_interval_ms=10_000, session_timeout_ms=6_000, heartbeat_interval_ms=1_000)
    return config


class Loader:
    def __init__(
        self,
        consumer: Any,
        client: Any,
        database: str,
        topic: str,
        keys: dict[str, bytes] | None = None,
        clock: Callable[[], datetime] = lambda: datetime.now(UTC),
    ) -> None:
        self.consumer = consumer
        self.client = client
        self.database = database
        self.topic = topic
        self.keys = keys  # None: signatures not checked (verification comes with the pipeline issue)
        self.clock = clock
        self.stats = LoaderStats()

    def poll_once(self, timeout_ms: int = 1000) -> int:
        """One poll -> decode -> insert -> commit cycle. Returns messages handled."""
        fetched = self.consumer.poll(timeout_ms=timeout_ms)
        if not fetched:
            return 0
        now = self.clock()
        handled = 0
        for tp, messages in sorted(fetched.items(), key=lambda kv: kv[0].partition):
            rows, bad = self._decode(tp.partition, messages, now)
            token = f"{tp.topic}:{tp.partition}:{messages[0].offset}-{messages[-1].offset}"
            if rows:
                clickhouse.insert_raw(self.client, self.database, rows, token)
                self.stats.inserts += 1
            if bad:
                clickhouse.insert_quarantine(self.client, self.database, bad, token)
            self.stats.windows += len(rows)
            self.stats.quarantined += len(bad)
            handled += len(messages)
        # the rows above are durable in ClickHouse: now, and only now, commit
        self.consumer.commit()
        self.stats.commits += 1
        self.stats.messages += handled
        return handled

    def _decode(self, partition: int, messages: list[Any], now: datetime) -> tuple[list[Any], list[Any]]:
        rows: list[Any] = []
        bad: list[Any] = []
        for msg in messages:
            value = msg.value if msg.value is not None else b""
            try:
                if self.keys is not None:
                    verify(value, msg.headers or [], self.keys)
                batch = decode_batch(value)
            except RecordError as exc:
                bad.append((value, str(exc), "kafka", partition, msg.offset, now))
                continue
            version = batch["agent_version"]
            for w in batch["windows"]:
                rows.append(
                    (
                        w["record_id"], w["seq"], w["provider_id"], w["host_id"], w["gpu_uuid"],
                        w["gpu_class"], w["firm_id"], w["window_start"], w["window_end"],
                        w["allocated_seconds"], w["busy_seconds"], w["energy_joules"],
                        version, "kafka", partition, msg.offset, now,
                    )
                )  # fmt: skip
        return rows, bad

    def run(
        self,
        until: Callable[[LoaderStats], bool] = lambda s: False,
        idle_timeout_s: float | None = None,
        poll_timeout_ms: int = 1000,
    ) -> LoaderStats:
        """Poll until ``until(stats)`` holds, or nothing arrived for ``idle_timeout_s``."""
        last_data = time.monotonic()
        while not until(self.stats):
            if self.poll_once(poll_timeout_ms):
                last_data = time.monotonic()
            elif idle_timeout_s is not None and time.monotonic() - last_data > idle_timeout_s:
                break
        return self.stats


def make_consumer(bootstrap: str, topic: str, group_id: str, fast_rebalance: bool = False) -> Any:
    from kafka import KafkaConsumer

    consumer = KafkaConsumer(bootstrap_servers=bootstrap, **consumer_config(group_id, fast_rebalance))
    consumer.subscribe([topic])
    return consumer
