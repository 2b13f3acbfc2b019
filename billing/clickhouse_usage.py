"""What billing reads from (and, for CSV import, writes to) ClickHouse.

Billing reads each record_id once, its first delivery (the semantics of the
pipeline's ``usage_windows`` view), in one ordered pass over the raw rows (see
``first_delivery_sql``).
A settlement bills the records that are dated up to the end of its month and
were ingested up to its cutoff, minus those the previous settlement already
billed (dated up to the end of the previous month and ingested up to the previous
cutoff). So a record is billed by exactly one settlement: the first one whose
month reaches its day and whose cutoff reaches its arrival.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, date, datetime
from typing import Any, NamedTuple

from billing.files import UsageRow
from billing.money import half_up
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
# a delivery's content: every field of the window (NULL told apart from 0, -0.0 read as 0.0); deliveries
# of one record with different hashes have different content (equal hashes of different content: 2^-64)
CONTENT = (
    "cityHash64(provider_id, host_id, gpu_uuid, gpu_class, firm_id, window_start, window_end, allocated_seconds, "
    "isNull(busy_seconds), ifNull(busy_seconds, 0) + 0, isNull(energy_joules), ifNull(energy_joules, 0) + 0)"
)
FAST_ORDER = "ingested_at"  # with the table's ORDER BY (record_id, ingested_at): read in order, no sort
EXACT_ORDER = "ingested_at, kafka_partition, kafka_offset"  # the definition of "first"; needs a sort
# Without it (chDB 26's default is 0) the window sorts all rows instead of reading them in the table's
# order: measured at 100M windows, 147 s and 16 GB instead of 29-36 s and 1.4 GB. Changing a setting
# needs a ClickHouse user with readonly=0 or 2.
READ_SETTINGS = {"optimize_read_in_window_order": 1}


def first_delivery_sql(
    db: str, keys: Sequence[tuple[str, str]], where: str, conflicts_in: str = "0", tied: bool = False
) -> str:
    """One pass over the raw rows: per ``keys`` (expression, alias over DELIVERY_COLUMNS), the
    allocated seconds, records, busy seconds and energy (both in integer thousandths) of each
    record_id's first delivery where that delivery matches ``where``; ``conflicts``, the record_ids
    with deliveries of different content whose latest delivery matches ``conflicts_in`` (a condition
    on ``latest``); and ``tied``, the record_ids this pass leaves out of the sums.

    The table is sorted by (record_id, ingested_at), so a window partitioned by record_id reads
    every record's deliveries together, in arrival order, without a sort or a hash table of ids.
    The first delivery is the earliest (ingested_at, kafka_partition, kafka_offset). This pass
    orders by ingested_at alone, which avoids the sort and picks the right content unless the
    record's earliest deliveries arrived at one instant and its contents differ. Those records
    (found generously: contents differ anywhere and the second delivery shares the first's instant)
    are left out and listed in ``tied``; with ``tied=True`` the query sums exactly those ids
    (parameter ``tied``, read through the primary key) in the exact order. Measured at 100M windows
    on a merged table: 29-36 s, where the re-delivery snapshot plus the raw sum it replaced took 38 s;
    the exact order over every row would cost about 1 s more per 12.5M rows.
    """
    select = ", ".join(f"{expr} AS {alias}" for expr, alias in keys)
    names = ", ".join(alias for _, alias in keys)
    tie = "0" if tied else "differs AND second = ingested_at"
    only = " WHERE record_id IN {tied:Array(String)}" if tied else ""
    return f"""
    SELECT {select},
           toInt64(sumIf(allocated_seconds, bill)) AS seconds, toInt64(countIf(bill)) AS records,
           sumIf(toInt64(round(ifNull(busy_seconds, 0) * 1000)), bill) AS busy,
           sumIf(toInt64(round(ifNull(energy_joules, 0) * 1000)), bill) AS energy,
           groupArrayIf(record_id, conflict) AS conflicts, groupArrayIf(record_id, tie) AS tied
    FROM (
        SELECT {DELIVERY_COLUMNS}, row_number() OVER p AS n,
               min(content) OVER p != max(content) OVER p AS differs,
               max(ingested_at) OVER p AS latest, nth_value(ingested_at, 2) OVER p AS second,
               {tie} AS tie, ({where}) AND NOT tie AS bill, differs AND ({conflicts_in}) AS conflict
        FROM (SELECT {DELIVERY_COLUMNS}, {CONTENT} AS content FROM {db}.usage_raw{only})
        WINDOW p AS (PARTITION BY record_id ORDER BY {EXACT_ORDER if tied else FAST_ORDER}
                     ROWS BETWEEN UNBOUNDED PRECEDING AND UNBOUNDED FOLLOWING)
    )
    WHERE n = 1 AND (bill OR conflict OR tie)
    GROUP BY {names}"""


def _conflict_window(window: Window) -> tuple[str, dict[str, Any]]:
    """The condition on a record's ``latest`` delivery for its conflict to be reported by ``window``'s
    settlement: arrived in (previous cutoff, this cutoff]."""
    sql = "latest <= {conflicts_to:DateTime64(6, 'UTC')}"
    params: dict[str, Any] = {"conflicts_to": _naive_utc(window.cutoff)}
    if window.prev_cutoff is not None:
        sql += " AND latest > {conflicts_from:DateTime64(6, 'UTC')}"
        params["conflicts_from"] = _naive_utc(window.prev_cutoff)
    return sql, params


def _naive_utc(t: datetime) -> datetime:
    return t.astimezone(UTC).replace(tzinfo=None)


class ClickHouseUsage:
    """Billing's reads: each one pass over the raw rows (see ``first_delivery_sql``)."""

    def __init__(self, client: Any, database: str, progress: Callable[[str], None] = lambda _: None) -> None:
        self.client = client
        self.db = database
        self.progress = progress  # hears one line per pass, with its time
        self._conflicts: dict[Window, list[str]] = {}  # found by groups(), asked for by conflicting_records()

    def _totals(
        self,
        keys: Sequence[tuple[str, str]],
        where: str,
        params: dict[str, Any],
        order: Sequence[int] = (),
        conflicts_in: str = "0",
    ) -> tuple[list[tuple[Any, ...]], list[str]]:
        """(rows of (*keys, seconds, records, busy, energy) with records > 0, sorted by the keys at
        ``order``; sorted record_ids of conflicting records) - see ``first_delivery_sql``."""
        width = len(keys)
        by = f" ORDER BY {', '.join(keys[i][1] for i in order)}" if order else ""
        started = time.perf_counter()
        sql = first_delivery_sql(self.db, keys, where, conflicts_in) + by
        rows = self.client.query(sql, parameters=params, settings=READ_SETTINGS).result_rows
        self._timed(f"first deliveries of every record_id, {len(rows):,} groups", started)
        conflicts = sorted({str(rid) for r in rows for rid in r[width + 4]})
        tied = sorted({str(rid) for r in rows for rid in r[width + 5]})
        totals = {tuple(r[:width]): list(r[width : width + 4]) for r in rows}
        if tied:  # their first delivery, in the exact order, added to the sums
            started = time.perf_counter()
            sql = first_delivery_sql(self.db, keys, where, tied=True)
            for r in self.client.query(sql, parameters={**params, "tied": tied}, settings=READ_SETTINGS).result_rows:
                sums = totals.setdefault(tuple(r[:width]), [0, 0, 0, 0])
                for i, value in enumerate(r[width : width + 4]):
                    sums[i] += value
            self._timed(f"{len(tied):,} record(s) with same-instant deliveries re-read in the exact order", started)
        out = [(*key, *sums) for key, sums in totals.items() if sums[1] > 0]
        if tied and order:  # rows the exact pass added go in their place
            out.sort(key=lambda r: tuple(r[i] for i in order))
        return out, conflicts

    def _timed(self, text: str, started: float) -> None:
        self.progress(f"  {text}: {time.perf_counter() - started:.1f} s")

    def groups(self, tz: str, window: Window) -> list[UsageGroup]:
        """Usage per (firm, billing day, provider, class) inside ``window`` (and, from the same pass,
        the window's conflicting records for ``conflicting_records``)."""
        where, params = window.where()
        keys = [
            ("firm_id", "firm_id"),
            ("toDate(window_start, {tz:String})", "day"),
            ("provider_id", "provider_id"),
            ("gpu_class", "gpu_class"),
        ]
        conflicts_in, conflict_params = _conflict_window(window)
        rows, self._conflicts[window] = self._totals(
            keys, where, {"tz": tz, **params, **conflict_params}, (1, 0, 2, 3), conflicts_in,
        )  # fmt: skip
        # busy and energy were summed in integer thousandths: each rounded half-up to a whole unit
        return [
            UsageGroup(str(r[0]), r[1], str(r[2]), str(r[3]), r[4], r[5], half_up(r[6], 1000), half_up(r[7], 1000))
            for r in rows
        ]

    def months_before(self, tz: str, first_day: date, cutoff: datetime) -> list[str]:
        """Months before ``first_day`` that have usage ingested up to ``cutoff``."""
        where = "toDate(window_start, {tz:String}) < {first:Date} AND ingested_at <= {cutoff:DateTime64(6, 'UTC')}"
        params = {"tz": tz, "first": first_day, "cutoff": _naive_utc(cutoff)}
        # raw rows are a superset of first deliveries: if none is that early, nothing is
        early = self.client.query(f"SELECT count() FROM {self.db}.usage_raw WHERE {where}", parameters=params)
        if not early.result_rows[0][0]:
            return []
        keys = [("formatDateTime(toDate(window_start, {tz:String}), '%Y-%m')", "m")]
        return [str(r[0]) for r in self._totals(keys, where, params, (0,))[0]]

    def conflicting_records(self, window: Window, limit: int = 20) -> tuple[int, list[str]]:
        """record_ids delivered again with different content (only the first is billed), reported by the
        settlement whose window the latest delivery arrived in: (previous cutoff, this cutoff]. Taken
        from ``groups`` of the same window when it ran, else one pass of its own."""
        if window not in self._conflicts:
            conflicts_in, params = _conflict_window(window)
            self._conflicts[window] = self._totals([("0", "none")], "0", params, (), conflicts_in)[1]
        found = self._conflicts[window]
        return len(found), found[:limit]

    def seconds_by_month(self, tz: str, cutoff: datetime | None) -> dict[tuple[str, str], tuple[int, int]]:
        """(month, firm_id) -> allocated_seconds of (every record, the records that arrived up to
        ``cutoff``; 0 when it is None), in one pass."""
        params: dict[str, Any] = {"tz": tz}
        if cutoff:
            params["cutoff"] = _naive_utc(cutoff)
        keys = [
            ("formatDateTime(toDate(window_start, {tz:String}), '%Y-%m')", "m"),
            ("firm_id", "firm_id"),
            ("ingested_at <= {cutoff:DateTime64(6, 'UTC')}" if cutoff else "0", "arrived"),
        ]
        out: dict[tuple[str, str], tuple[int, int]] = {}
        for m, firm, arrived, seconds, *_ in self._totals(keys, "1", params)[0]:
            every, by_cutoff = out.get((str(m), str(firm)), (0, 0))
            out[(str(m), str(firm))] = (every + int(seconds), by_cutoff + (int(seconds) if arrived else 0))
        return out

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
                            (0, 1))[0]  # fmt: skip
        return [(str(r[0]), str(r[1]), int(r[2]), int(r[3])) for r in rows]
