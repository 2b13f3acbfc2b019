"""``gpumeter pipeline requeue``: quarantined messages verified again, and the good ones loaded once.

A message the loader rejected itself (unsigned, unknown key, bad signature, bad framing, over a
limit, refused by ClickHouse) is kept whole in ``usage_quarantine`` with its Kafka headers. After
the cause is fixed - most often a host key added to the keys file - ``requeue`` runs every such
message through the loader's own checks (``loader.check_message``) and inserts the ones that pass
the way the loader does, one container per message, so ClickHouse checks every window again.

Exactly once: each message is known by (partition, offset, SHA-256 of its bytes), which tells a
topic made again apart. Its insert carries the token ``requeue:<partition>:<offset>:<digest>``, and
then ``usage_requeued`` records the outcome: a message recorded as loaded is never tried again; one
rejected again is tried again by the next run. A run killed between the insert and the record
re-inserts under the same token (ClickHouse drops it), and the usage store reads each record_id once
whatever was delivered twice.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from gpumeter.errors import RecordError
from pipeline import clickhouse
from pipeline.framing import WriterVersion, container, decode_body, shipped_versions
from pipeline.keys import Keys
from pipeline.loader import TransientError, check_message, headers_from_text, reason_label, refusal
from pipeline.schema import GPU_WINDOW_REASON_PREFIX

PAGE = 200  # quarantined messages read at once (each up to 1 MiB)
REQUEUED_COLUMNS = ("kafka_partition", "kafka_offset", "digest", "outcome", "reason", "windows", "requeued_at")


@dataclass(frozen=True, slots=True)
class Quarantined:
    partition: int
    offset: int
    digest: str  # SHA-256 of the bytes, hex
    value: bytes
    headers: str  # as the loader kept them (loader.headers_text)
    reason: str  # why the loader rejected it


@dataclass(slots=True)
class RequeueReport:
    tried: int = 0
    loaded: int = 0  # messages inserted
    windows: int = 0  # of their windows, loaded into usage_raw
    window_rejects: int = 0  # of their windows, rejected by the window checks
    still_rejected: Counter[str] = field(default_factory=Counter)  # by reason label

    def text(self, dry_run: bool) -> str:
        if not self.tried:
            return "no quarantined message to try again"
        verb = "would load" if dry_run else "loaded"
        lines = [f"{self.tried} quarantined message(s) tried again: {self.loaded} {verb}"
                 + ("" if dry_run else f" ({self.windows} window(s) loaded, {self.window_rejects} rejected by the "
                    "window checks)")
                 + f", {sum(self.still_rejected.values())} still rejected"]  # fmt: skip
        lines += [f"  {n} {label}" for label, n in sorted(self.still_rejected.items())]
        return "\n".join(lines)


def pending(client: Any, database: str) -> Iterator[Quarantined]:
    """Messages the loader rejected itself (no record_id: not a single window) and requeue has not
    loaded, in (partition, offset) order, a page at a time."""
    after = (-1, -1, "")
    while True:
        rows = client.query(
            f"""
            SELECT kafka_partition, kafka_offset, lower(hex(SHA256(raw))) AS digest, any(raw) AS value,
                   any(headers), any(reason)
            FROM {database}.usage_quarantine
            WHERE source = 'kafka' AND record_id = ''
            GROUP BY kafka_partition, kafka_offset, digest
            HAVING (kafka_partition, kafka_offset, digest) > ({{p:Int32}}, {{o:Int64}}, {{d:String}})
               AND (kafka_partition, kafka_offset, digest) NOT IN (
                   SELECT kafka_partition, kafka_offset, digest FROM {database}.usage_requeued
                   WHERE outcome = 'loaded')
            ORDER BY kafka_partition, kafka_offset, digest
            LIMIT {PAGE}
            """,
            parameters={"p": after[0], "o": after[1], "d": after[2]},
            column_formats={"value": "bytes"},
        ).result_rows
        for r in rows:
            yield Quarantined(int(r[0]), int(r[1]), str(r[2]), bytes(r[3]), str(r[4]), str(r[5]))
        if len(rows) < PAGE:
            return
        after = (int(rows[-1][0]), int(rows[-1][1]), str(rows[-1][2]))


def requeue(
    client: Any,
    database: str,
    keys: Keys,
    dry_run: bool = False,
    writers: dict[bytes, WriterVersion] | None = None,
    clock: Callable[[], datetime] = lambda: datetime.now(UTC),
    progress: Callable[[int], None] = lambda n: None,
) -> RequeueReport:
    """Try every pending message again; insert (unless ``dry_run``) and record the ones that pass."""
    writers = shipped_versions() if writers is None else writers
    report = RequeueReport()
    for q in pending(client, database):
        report.tried += 1
        progress(report.tried)
        try:
            now_ms = int(clock().timestamp() * 1000)
            writer, framed, _ = check_message(q.value, headers_from_text(q.headers), keys, writers, q.offset, None,
                                              now_ms)  # fmt: skip
            windows = len(decode_body(writer, framed.body)["windows"])  # before the insert: it cannot fail after
        except RecordError as exc:
            report.still_rejected[reason_label(str(exc))] += 1
            if not dry_run:
                _record(client, database, q, "rejected", str(exc), 0, clock())
            continue
        if dry_run:
            report.loaded += 1
            continue
        now = clock()
        block = f"requeue:{q.digest}"
        data = container(writer, q.partition, int(now.timestamp() * 1_000_000), [framed], block)
        try:
            clickhouse.insert_ingest(client, database, writer, data, f"requeue:{q.partition}:{q.offset}:{q.digest}")
        except Exception as exc:
            kind, reason = refusal(exc)  # a 'stop' raises LoaderStopped
            if kind == "transient":
                raise TransientError(f"{reason}; nothing of this message was recorded, run requeue again") from exc
            report.still_rejected[reason_label(reason)] += 1
            _record(client, database, q, "rejected", reason, 0, now)
            continue
        rejected = clickhouse.quarantined_in_range(client, database, q.partition, q.offset, q.offset, block)
        rejected = [r for r in rejected if not r[1].startswith(GPU_WINDOW_REASON_PREFIX)]  # not usage windows
        windows = max(0, windows - len(rejected))
        report.loaded += 1
        report.windows += windows
        report.window_rejects += len(rejected)
        _record(client, database, q, "loaded", "", windows, now)
    return report


def _record(client: Any, database: str, q: Quarantined, outcome: str, reason: str, windows: int,
            at: datetime) -> None:  # fmt: skip
    row = (q.partition, q.offset, q.digest, outcome, reason, windows, at)
    client.insert(f"{database}.usage_requeued", [row], column_names=REQUEUED_COLUMNS)
