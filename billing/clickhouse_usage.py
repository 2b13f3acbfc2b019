"""What billing reads from (and, for CSV import, writes to) ClickHouse.

Billing reads each record_id once, its first delivery (the semantics of the
pipeline's ``usage_windows`` view, read here in sorted order for speed).
A settlement bills the records that are dated up to the end of its month and
were ingested up to its cutoff, minus those the previous settlement already
billed (dated up to the end of the previous month and ingested up to the previous
cutoff). So a record is billed by exactly one settlement: the first one whose
month reaches its day and whose cutoff reaches its arrival.
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, date, datetime
from typing import Any

from billing.files import UsageRow
from pipeline import clickhouse

UNATTRIBUTED = "unattributed"


@dataclass(frozen=True, slots=True)
class UsageGroup:
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


def repeated_ids(db: str) -> str:
    """record_ids with more than one delivery, aggregated in the table's sort order
    (record_id first), so it streams in little memory instead of hashing every id."""
    return f"SELECT record_id FROM {db}.usage_raw GROUP BY record_id HAVING count() > 1"


def first_deliveries(db: str, repeated: str) -> str:
    """Each record_id once, as first delivered (earliest ingested_at, then partition, offset).

    Almost every record is delivered once, so this is: every raw row whose record_id
    is not in ``repeated`` (a table or subquery of ids delivered more than once), plus
    the first delivery (argMin) of each repeated id. Outer WHERE clauses are pushed
    into the first branch's scan.

    Measured here: LIMIT 1 BY record_id over 100M rows kept a hash of every id (11 GB
    RSS); a GROUP BY record_id with argMin over everything took 25 s and 3 GB for 10M.
    """
    return f"""(
        SELECT firm_id, window_start, provider_id, gpu_class, host_id, allocated_seconds, busy_seconds,
               energy_joules, ingested_at
        FROM {db}.usage_raw
        WHERE record_id NOT IN {repeated}
        UNION ALL
        SELECT first.1 AS firm_id, first.2 AS window_start, first.3 AS provider_id, first.4 AS gpu_class,
               first.5 AS host_id, first.6 AS allocated_seconds, first.7 AS busy_seconds,
               first.8 AS energy_joules, first.9 AS ingested_at
        FROM (
            SELECT argMin((firm_id, window_start, provider_id, gpu_class, host_id, allocated_seconds, busy_seconds,
                           energy_joules, ingested_at), (ingested_at, kafka_partition, kafka_offset)) AS first
            FROM {db}.usage_raw
            WHERE record_id IN {repeated}
            GROUP BY record_id
        )
    )"""


READ_IN_ORDER = {"optimize_aggregation_in_order": 1}


def _naive_utc(t: datetime) -> datetime:
    return t.astimezone(UTC).replace(tzinfo=None)


class ClickHouseUsage:
    """Billing's reads. The set of repeated record_ids is computed once per instance (a
    settlement, a reconcile) into a Memory table, after the settlement took its cutoff:
    a delivery arriving later is past the cutoff and filtered out anyway."""

    def __init__(self, client: Any, database: str) -> None:
        self.client = client
        self.db = database
        self._repeated: str | None = None

    def _repeated_table(self) -> str:
        if self._repeated is None:
            table = f"{self.db}._repeated_ids_{uuid.uuid4().hex[:12]}"
            self.client.command(
                f"CREATE TABLE {table} ENGINE = Memory AS {repeated_ids(self.db)}", settings=READ_IN_ORDER
            )
            self._repeated = table
        return self._repeated

    def _first(self) -> str:
        return first_deliveries(self.db, self._repeated_table())

    def __enter__(self) -> ClickHouseUsage:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Drop the snapshot of repeated ids (a leftover one is empty after a restart and harmless)."""
        if self._repeated is not None:
            self.client.command(f"DROP TABLE IF EXISTS {self._repeated}")
            self._repeated = None

    def groups(self, tz: str, window: Window) -> list[UsageGroup]:
        """Usage per (firm, billing day, provider, class) inside ``window``."""
        where, params = window.where()
        rows = self.client.query(
            f"""
            SELECT firm_id, toDate(window_start, {{tz:String}}) AS day, provider_id, gpu_class,
                   sum(allocated_seconds), count(), sum(ifNull(busy_seconds, 0)), sum(ifNull(energy_joules, 0))
            FROM {self._first()}
            WHERE {where}
            GROUP BY firm_id, day, provider_id, gpu_class
            ORDER BY day, firm_id, provider_id, gpu_class
            """,
            parameters={"tz": tz, **params},
            settings=READ_IN_ORDER,
        ).result_rows
        return [
            UsageGroup(str(r[0]), r[1], str(r[2]), str(r[3]), int(r[4]), int(r[5]), round(r[6]), round(r[7]))
            for r in rows
        ]

    def months_before(self, tz: str, first_day: date, cutoff: datetime) -> list[str]:
        """Months before ``first_day`` that have usage ingested up to ``cutoff``."""
        # raw rows are a superset of first deliveries: if none is that early, nothing is
        early = self.client.query(
            f"""
            SELECT count() FROM {self.db}.usage_raw
            WHERE toDate(window_start, {{tz:String}}) < {{first:Date}}
              AND ingested_at <= {{cutoff:DateTime64(6, 'UTC')}}
            """,
            parameters={"tz": tz, "first": first_day, "cutoff": _naive_utc(cutoff)},
        ).result_rows[0][0]
        if not early:
            return []
        rows = self.client.query(
            f"""
            SELECT DISTINCT formatDateTime(toDate(window_start, {{tz:String}}), '%Y-%m') AS m
            FROM {self._first()}
            WHERE toDate(window_start, {{tz:String}}) < {{first:Date}}
              AND ingested_at <= {{cutoff:DateTime64(6, 'UTC')}}
            ORDER BY m
            """,
            parameters={"tz": tz, "first": first_day, "cutoff": _naive_utc(cutoff)},
            settings=READ_IN_ORDER,
        ).result_rows
        return [str(r[0]) for r in rows]

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
            SELECT record_id FROM {self.db}.usage_raw
            WHERE record_id IN {self._repeated_table()}
            GROUP BY record_id
            HAVING uniqExact((provider_id, host_id, gpu_uuid, gpu_class, firm_id, window_start, window_end,
                              allocated_seconds, busy_seconds, energy_joules)) > 1
               AND max(ingested_at) <= {{cutoff:DateTime64(6, 'UTC')}} {since}
            ORDER BY record_id
            """,
            parameters=params,
            settings=READ_IN_ORDER,
        ).result_rows
        return len(rows), [str(r[0]) for r in rows[:limit]]

    def seconds_by_month(self, tz: str, cutoff: datetime | None = None) -> dict[tuple[str, str], tuple[int, int]]:
        """(month, firm_id) -> (allocated_seconds, records) of every record ingested up to ``cutoff``."""
        where = "WHERE ingested_at <= {cutoff:DateTime64(6, 'UTC')}" if cutoff else ""
        params: dict[str, Any] = {"tz": tz}
        if cutoff:
            params["cutoff"] = _naive_utc(cutoff)
        rows = self.client.query(
            f"""
            SELECT formatDateTime(toDate(window_start, {{tz:String}}), '%Y-%m') AS m, firm_id,
                   sum(allocated_seconds), count()
            FROM {self._first()} {where}
            GROUP BY m, firm_id
            """,
            parameters=params,
            settings=READ_IN_ORDER,
        ).result_rows
        return {(str(r[0]), str(r[1])): (int(r[2]), int(r[3])) for r in rows}

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
        rows = self.client.query(
            f"""
            SELECT gpu_class, host_id, sum(allocated_seconds), count()
            FROM {self._first()}
            WHERE provider_id = {{provider:String}}
              AND formatDateTime(toDate(window_start, {{tz:String}}), '%Y-%m') = {{month:String}}
            GROUP BY gpu_class, host_id ORDER BY gpu_class, host_id
            """,
            parameters={"tz": tz, "month": month, "provider": provider_id},
            settings=READ_IN_ORDER,
        ).result_rows
        return [(str(r[0]), str(r[1]), int(r[2]), int(r[3])) for r in rows]
