"""What billing reads from (and, for CSV import, writes to) ClickHouse.

Billing reads each record_id once, its first delivery (the semantics of the
pipeline's ``usage_windows`` view), computed as every raw row minus the later
deliveries of re-delivered records, so the bulk of the rows is read without its
record_id (see ``first_delivery_totals``).
A settlement bills the records that are dated up to the end of its month and
were ingested up to its cutoff, minus those the previous settlement already
billed (dated up to the end of the previous month and ingested up to the previous
cutoff). So a record is billed by exactly one settlement: the first one whose
month reaches its day and whose cutoff reaches its arrival.
"""

from __future__ import annotations

import itertools
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, date, datetime
from typing import Any, NamedTuple

from billing.files import UsageRow
from pipeline import clickhouse

UNATTRIBUTED = "unattributed"


class UsageGroup(NamedTuple):  # a tuple: a settlement reads ~10^6 of them
    firm_id: str
    day: date
    provider_id: str
    gpu_class: str
    allocated_seconds: int
    records: int
    busy_seconds: int
    energy_joules: int


@dataclass(frozen=True, slots=True)
class Window:
    """The part of the usage stream a settlement bills: (last day, cutoff), minus the previous one."""

    last_day: date
    cutoff: datetime
    prev_last_day: date | None = None
    prev_cutoff: datetime | None = None

    def where(self) -> tuple[str, dict[str, Any]]:
        sql = "toDate(window_start, {tz:String}) <= {last_day:Date} AND ingested_at <= {cutoff:DateTime64(6, 'UTC')}"
        params: dict[str, Any] = {"last_day": self.last_day, "cutoff": _naive_utc(self.cutoff)}
        if self.prev_last_day is not None and self.prev_cutoff is not None:
            sql += (
                " AND NOT (toDate(window_start, {tz:String}) <= {prev_last_day:Date}"
                " AND ingested_at <= {prev_cutoff:DateTime64(6, 'UTC')})"
            )
            params.update(prev_last_day=self.prev_last_day, prev_cutoff=_naive_utc(self.prev_cutoff))
        return sql, params


DELIVERY_COLUMNS = (
    "record_id, provider_id, host_id, gpu_uuid, gpu_class, firm_id, window_start, window_end, "
    "allocated_seconds, busy_seconds, energy_joules, ingested_at, kafka_partition, kafka_offset"
)


ID_RANGE_ROWS = 25_000_000  # raw rows per record_id range searched for re-deliveries at once


def id_range_bounds(rows: int, rows_per_range: int = ID_RANGE_ROWS) -> list[tuple[str | None, str | None]]:
    """Consecutive record_id ranges [low, high) of about ``rows_per_range`` raw rows each (None: no
    bound). record_ids are hex digests, so ranges of the first two hex digits are even; together
    the ranges cover every string, hex or not, each exactly once."""
    count = 1
    while count < 256 and rows > count * rows_per_range:
        count *= 2
    bounds: list[str | None] = [None, *(f"{i * 256 // count:02x}" for i in range(1, count)), None]
    return list(itertools.pairwise(bounds))


def id_ranges(rows: int, rows_per_range: int = ID_RANGE_ROWS) -> list[str]:
    """``id_range_bounds`` as SQL conditions. The table is sorted by record_id, so each range reads
    only its own granules."""
    conditions = []
    for low, high in id_range_bounds(rows, rows_per_range):
        parts = ([f"record_id >= '{low}'"] if low else []) + ([f"record_id < '{high}'"] if high else [])
        conditions.append(" AND ".join(parts) or "1")
    return conditions


def redeliveries(db: str, id_range: str = "1") -> str:
    """Every delivery of each record_id in ``id_range`` delivered more than once, with ``is_first``
    on its first one (earliest ingested_at, then partition, offset): the rows that deduplication
    has to look at.

    Found in two steps so no step holds every id as a string: a GROUP BY over a 64-bit hash of
    record_id finds the candidate hashes (a hash shared by two different ids is only a candidate),
    then the exact record_ids among the candidates' rows decide. Measured at 100M windows on a
    merged table: the hashed GROUP BY took 10.0 s and 2.4 GB over all ids at once, 6.7-8.0 s and
    0.6 GB in eight ranges; an in-order GROUP BY record_id over the strings took 36 s.
    """
    return f"""
    SELECT {DELIVERY_COLUMNS}, position = 1 AS is_first
    FROM (
        SELECT {DELIVERY_COLUMNS},
               count() OVER (PARTITION BY record_id) AS deliveries,
               row_number() OVER (PARTITION BY record_id ORDER BY ingested_at, kafka_partition, kafka_offset)
                   AS position
        FROM {db}.usage_raw
        WHERE ({id_range}) AND cityHash64(record_id) IN (
            SELECT h FROM (SELECT cityHash64(record_id) AS h FROM {db}.usage_raw WHERE {id_range})
            GROUP BY h HAVING count() > 1
        )
    )
    WHERE deliveries > 1"""


def first_delivery_totals(db: str, snapshot: str, keys: Sequence[tuple[str, str]], where: str) -> tuple[str, str]:
    """Two queries whose difference is, per ``keys`` (expression, alias), the allocated seconds,
    records, busy seconds and energy (both in thousandths) of each record_id's first delivery among
    the deliveries matching ``where``: (all raw rows, the later deliveries of re-delivered records).

    The raw rows are read without their record_id, so deduplication costs only the re-delivered
    rows (``snapshot``, from ``redeliveries``). Exact: a record's later deliveries are in the raw
    rows too, under their own keys, and subtracting them leaves exactly its first delivery wherever
    ``where`` holds. A key whose records come to 0 (every matching delivery was a later one) is not
    a group. The caller subtracts: as a UNION ALL with an outer GROUP BY it cost 6 s more at 100M rows.
    (Grouping the raw rows by a hash of the text keys was measured too: no faster, so not done.)
    """
    select = ", ".join(f"{expr} AS {alias}" for expr, alias in keys)
    names = ", ".join(alias for _, alias in keys)
    sums = (
        "toInt64(sum(allocated_seconds)) AS seconds, toInt64(count()) AS records, "
        "sum(toInt64(round(ifNull(busy_seconds, 0) * 1000))) AS busy, "
        "sum(toInt64(round(ifNull(energy_joules, 0) * 1000))) AS energy"
    )  # busy and energy in integer thousandths, so the subtraction is exact (floats would not be)
    raw = f"SELECT {select}, {sums} FROM {db}.usage_raw WHERE {where} GROUP BY {names}"
    later = f"SELECT {select}, {sums} FROM {snapshot} WHERE NOT is_first AND ({where}) GROUP BY {names}"
    return raw, later


def _whole(thousandths: int) -> int:
    """Integer thousandths rounded half-up to a whole unit (busy seconds, joules)."""
    return (thousandths + 500) // 1000


def _naive_utc(t: datetime) -> datetime:
    return t.astimezone(UTC).replace(tzinfo=None)


class ClickHouseUsage:
    """Billing's reads. The deliveries of re-delivered records are snapshotted once per instance
    (a settlement, a reconcile) into a table, after the settlement took its cutoff: a delivery
    arriving later is past the cutoff and filtered out anyway."""

    def __init__(
        self,
        client: Any,
        database: str,
        rows_per_id_range: int = ID_RANGE_ROWS,
        progress: Callable[[str], None] = lambda _: None,
    ) -> None:
        self.client = client
        self.db = database
        self.rows_per_id_range = rows_per_id_range
        self.progress = progress  # hears one line per long query, with its time
        self._snapshot: str | None = None

    def _timed(self, text: str, started: float) -> None:
        self.progress(f"  {text}: {time.perf_counter() - started:.1f} s")

    def _redeliveries(self) -> str:
        if self._snapshot is None:
            # MergeTree, not Memory: a full replay re-delivers every record, and the snapshot is then
            # as large as the raw table
            table = f"{self.db}._redeliveries_{uuid.uuid4().hex[:12]}"
            # EMPTY AS over an empty range: ClickHouse builds the IN set even for EMPTY (6.7 s at 100M)
            self.client.command(
                f"CREATE TABLE {table} ENGINE = MergeTree ORDER BY record_id EMPTY AS {redeliveries(self.db, '0')}"
            )
            try:
                rows = self.client.query(f"SELECT count() FROM {self.db}.usage_raw").result_rows[0][0]
                ranges = id_ranges(int(rows), self.rows_per_id_range)
                for n, id_range in enumerate(ranges, start=1):
                    started = time.perf_counter()
                    self.client.command(f"INSERT INTO {table} {redeliveries(self.db, id_range)}")
                    self._timed(f"re-deliveries among {rows:,} raw rows, record_id range {n} of {len(ranges)}", started)
            except BaseException:  # never leave a partial snapshot to be read as complete
                self.client.command(f"DROP TABLE IF EXISTS {table}")
                raise
            self._snapshot = table
        return self._snapshot

    def _totals(
        self, keys: Sequence[tuple[str, str]], where: str, params: dict[str, Any], order: str = ""
    ) -> list[tuple[Any, ...]]:
        """(*keys, seconds, records, busy, energy) of first deliveries (see ``first_delivery_totals``),
        in the raw query's ``order``."""
        snapshot = self._redeliveries()
        raw, later = first_delivery_totals(self.db, snapshot, keys, where)
        started = time.perf_counter()
        rows = self.client.query(raw + order, parameters=params).result_rows
        self._timed(f"raw rows summed into {len(rows):,} groups", started)
        width = len(keys)
        totals = {tuple(r[:width]): list(r[width:]) for r in rows}
        for r in self.client.query(later, parameters=params).result_rows:
            sums = totals.get(tuple(r[:width]))
            if sums is None:  # a later delivery matching `where` is a raw row matching it
                raise RuntimeError(f"usage_raw lost a delivery the re-delivery snapshot holds: {r[:width]}")
            for n, value in enumerate(r[width:]):
                sums[n] -= value
        return [(*key, *sums) for key, sums in totals.items() if sums[1] > 0]

    def __enter__(self) -> ClickHouseUsage:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Drop the snapshot (a leftover one, after a crash, is harmless: nothing reads it again)."""
        if self._snapshot is not None:
            self.client.command(f"DROP TABLE IF EXISTS {self._snapshot}")
            self._snapshot = None

    def groups(self, tz: str, window: Window) -> list[UsageGroup]:
        """Usage per (firm, billing day, provider, class) inside ``window``."""
        where, params = window.where()
        keys = [
            ("firm_id", "firm_id"),
            ("toDate(window_start, {tz:String})", "day"),
            ("provider_id", "provider_id"),
            ("gpu_class", "gpu_class"),
        ]
        rows = self._totals(keys, where, {"tz": tz, **params}, " ORDER BY day, firm_id, provider_id, gpu_class")
        return [UsageGroup(str(r[0]), r[1], str(r[2]), str(r[3]), r[4], r[5], _whole(r[6]), _whole(r[7])) for r in rows]

    def months_before(self, tz: str, first_day: date, cutoff: datetime) -> list[str]:
        """Months before ``first_day`` that have usage ingested up to ``cutoff``."""
        where = "toDate(window_start, {tz:String}) < {first:Date} AND ingested_at <= {cutoff:DateTime64(6, 'UTC')}"
        params = {"tz": tz, "first": first_day, "cutoff": _naive_utc(cutoff)}
        # raw rows are a superset of first deliveries: if none is that early, nothing is
        early = self.client.query(f"SELECT count() FROM {self.db}.usage_raw WHERE {where}", parameters=params)
        if not early.result_rows[0][0]:
            return []
        keys = [("formatDateTime(toDate(window_start, {tz:String}), '%Y-%m')", "m")]
        return [str(r[0]) for r in self._totals(keys, where, params, " ORDER BY m")]

    def conflicting_records(self, window: Window, limit: int = 20) -> tuple[int, list[str]]:
        """record_ids delivered again with different content (only the first is billed), reported by the
        settlement whose window the latest delivery arrived in: (previous cutoff, this cutoff]."""
        params: dict[str, Any] = {"cutoff": _naive_utc(window.cutoff)}
        since = ""
        if window.prev_cutoff is not None:
            since = "AND max(ingested_at) > {prev_cutoff:DateTime64(6, 'UTC')}"
            params["prev_cutoff"] = _naive_utc(window.prev_cutoff)
        rows = self.client.query(
            f"""
            SELECT record_id FROM {self._redeliveries()}
            GROUP BY record_id
            HAVING uniqExact((provider_id, host_id, gpu_uuid, gpu_class, firm_id, window_start, window_end,
                              allocated_seconds, busy_seconds, energy_joules)) > 1
               AND max(ingested_at) <= {{cutoff:DateTime64(6, 'UTC')}} {since}
            ORDER BY record_id
            """,
            parameters=params,
        ).result_rows
        return len(rows), [str(r[0]) for r in rows[:limit]]

    def seconds_by_month(self, tz: str, cutoff: datetime | None = None) -> dict[tuple[str, str], tuple[int, int]]:
        """(month, firm_id) -> (allocated_seconds, records) of every record ingested up to ``cutoff``."""
        where = "ingested_at <= {cutoff:DateTime64(6, 'UTC')}" if cutoff else "1"
        params: dict[str, Any] = {"tz": tz}
        if cutoff:
            params["cutoff"] = _naive_utc(cutoff)
        keys = [("formatDateTime(toDate(window_start, {tz:String}), '%Y-%m')", "m"), ("firm_id", "firm_id")]
        return {(str(r[0]), str(r[1])): (int(r[2]), int(r[3])) for r in self._totals(keys, where, params)}

    def known_record_ids(self, record_ids: Sequence[str]) -> set[str]:
        known: set[str] = set()
        for i in range(0, len(record_ids), 50_000):
            chunk = list(record_ids[i : i + 50_000])
            rows = self.client.query(
                f"SELECT DISTINCT record_id FROM {self.db}.usage_raw WHERE record_id IN {{ids:Array(String)}}",
                parameters={"ids": chunk},
            ).result_rows
            known.update(str(r[0]) for r in rows)
        return known

    def import_rows(self, rows: Sequence[UsageRow], source: str, token: str, now: datetime) -> None:
        """Insert CSV usage as deliveries: line number as the offset, so the first line is the first delivery."""
        ingested = _naive_utc(now)
        data = [
            (
                r.record_id, 0, r.provider_id, r.host_id, r.gpu_uuid, r.gpu_class, r.firm_id,
                _naive_utc(r.window_start), _naive_utc(r.window_end), r.allocated_seconds, r.busy_seconds,
                r.energy_joules, "import", source, -1, r.line, ingested,
            )
            for r in rows
        ]  # fmt: skip
        for i in range(0, len(data), 100_000):
            clickhouse.insert_raw(self.client, self.db, data[i : i + 100_000], f"{token}:{i}")

    def hours_by_host(self, tz: str, month: str, provider_id: str) -> list[tuple[str, str, int, int]]:
        """(gpu_class, host_id, allocated_seconds, records) of a provider's usage dated in ``month``."""
        where = (
            "provider_id = {provider:String}"
            " AND formatDateTime(toDate(window_start, {tz:String}), '%Y-%m') = {month:String}"
        )
        params = {"tz": tz, "month": month, "provider": provider_id}
        rows = self._totals([("gpu_class", "gpu_class"), ("host_id", "host_id")], where, params,
                            " ORDER BY gpu_class, host_id")  # fmt: skip
        return [(str(r[0]), str(r[1]), int(r[2]), int(r[3])) for r in rows]
