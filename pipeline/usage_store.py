"""The usage store: the one definition of "first delivery", every read built on it, and CSV import.

``usage_raw`` keeps every delivery of every usage window. A record (one ``record_id``) counts
once: its **first delivery**, the one with the least ``(ingested_at, kafka_partition,
kafka_offset)`` (an import's line number is its offset). ``first_delivery_sql`` is the only
place that picks it; invoices (through billing's adapter), ``usage summary``, the demo's
ground-truth check, the hourly rollup, provider statements and ``billing reconcile`` all read
through it. There is no view with a definition of its own.

Windows enter the store two ways, both through the one list of checks (``schema.WINDOW_CHECKS``):
the Kafka loader's materialized views, and ``import_windows`` (CSV), which evaluates the same
SQL over the file's rows before it writes any of them.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, date, datetime
from typing import Any, NamedTuple

from gpumeter.record import UNATTRIBUTED
from pipeline import clickhouse
from pipeline.schema import reject_reason_sql
from pipeline.usage_checks import (
    CLAIM_SQL,
    CLAIMED_SQL,
    EPOCH,
    HELD,
    HOLD_SQL,
    HOLD_STATES,
    JUDGED_COLUMNS,
    MARK_BITS,
    OCCUPIED_SQL,
    Checks,
    epoch_ms,
    hold_name,
    registry_columns,
    state_only,
)  # fmt: skip

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
# the table's order (schema.RAW_ORDER): a (GPU, window) and, inside it, each record's deliveries in
# the order that defines "first"; the pass below reads in it without a sort.
WINDOW_ORDER = "PARTITION BY gpu_uuid, window_start ORDER BY record_id, ingested_at, kafka_partition, kafka_offset"
# the same partitions and order: a frame of one record's deliveries (peers in record_id), read alongside
RECORD_PEERS = "PARTITION BY gpu_uuid, window_start ORDER BY record_id RANGE BETWEEN CURRENT ROW AND CURRENT ROW"
# Without it (chDB 26's default is 0) the window sorts all rows instead of reading them in the table's
# order: measured at 100M windows, 147 s and 16 GB instead of 29-36 s and 1.4 GB. Changing a setting
# needs a ClickHouse user with readonly=0 or 2.
READ_SETTINGS = {"optimize_read_in_window_order": 1}

# (host_id, gpu_uuid, gpu_class, capacity, allocated, unattributed, idle, unread, unsampled) seconds
CapacityRow = tuple[str, str, str, int, int, int, int, int, int]
DAY = "toDate(window_start, {tz:String})"
GPU_WINDOW_SECONDS = "intDiv(toUnixTimestamp64Milli(window_end) - toUnixTimestamp64Milli(window_start), 1000)"
IN_SPAN = "window_start >= {s:DateTime64(3, 'UTC')} AND window_start < {e:DateTime64(3, 'UTC')}"


def first_gpu_windows_sql(db: str, where: str) -> str:
    """The first delivery of each GPU window (host, GPU, window start) matching ``where``: least
    (ingested_at, kafka_partition, kafka_offset), as for usage windows."""
    return f"""SELECT * FROM {db}.gpu_windows WHERE {where}
                ORDER BY host_id, gpu_uuid, window_start, ingested_at, kafka_partition, kafka_offset
                LIMIT 1 BY host_id, gpu_uuid, window_start"""


MONTH = "formatDateTime(toDate(window_start, {tz:String}), '%Y-%m')"
HOUR = "toStartOfHour(window_start)"

IMPORT_ROWS_PER_INSERT = 100_000
# below this many granules (8192 rows each) the pass runs as one branch: splitting costs more than it saves
SPLIT_MIN_MARKS = 64
# the scratch table a CSV import is checked in: its line, then a window as the Kafka path sees it
# (times in epoch ms); the checks read the window columns as the tuple ``w``
WINDOW_CHECK_COLUMNS = (
    ("record_id", "String"), ("seq", "Int64"), ("provider_id", "String"), ("host_id", "String"),
    ("gpu_uuid", "String"), ("gpu_class", "String"), ("firm_id", "String"), ("window_start", "Int64"),
    ("window_end", "Int64"), ("allocated_seconds", "Int64"), ("busy_seconds", "Nullable(Float64)"),
    ("energy_joules", "Nullable(Float64)"),
)  # fmt: skip
CHECK_COLUMNS = ("line", *(name for name, _ in WINDOW_CHECK_COLUMNS))
DAY_KEYS = (("firm_id", "firm_id"), (DAY, "day"), ("provider_id", "provider_id"), ("gpu_class", "gpu_class"))


def first_delivery_sql(
    db: str,
    keys: Sequence[tuple[str, str]],
    where: str,
    conflicts_in: str = "0",
    checked: bool = False,
    collect: str = "0",
    marked: bool = False,
    splits: int = 0,
    periods: int = 1,
) -> str:
    """One pass over the raw rows: per ``keys`` (expression, alias over DELIVERY_COLUMNS), the
    allocated seconds, records, busy seconds and energy (both in integer thousandths) of each
    record_id's first delivery where that delivery matches ``where``; ``conflicts``, the
    record_ids with deliveries of different content whose latest delivery matches ``conflicts_in``
    (a condition on ``latest``); and ``collected``, (record_id, host_id, gpu_uuid, window_start,
    allocated_seconds) of the first deliveries matching ``collect``.

    ``splits``: the pass runs as splits + 1 branches over ranges of gpu_uuid bounded by the
    parameters ``split_1`` < ... < ``split_<splits>`` (``UsageStore.split_points``).

    ``checked``: the usage checks (``usage_checks``) run in the same pass. Each delivery gets its
    registry columns, ``gpu_class`` becomes the registered class, and keys and conditions may use
    ``hold`` (the hold as a number, ``usage_checks.hold_name``; 0 for a record that bills) and
    ``hold_state`` (what settlements have recorded of the record, ``usage_checks.HOLD_STATES``);
    parameters from ``Checks.params`` and ``settled_seq``.

    The table is sorted by (gpu_uuid, window_start, record_id, ingested_at, kafka_partition,
    kafka_offset). Every delivery of a record has the record's GPU and window start (the record_id
    is a hash of them, checked on the way in), so a window partitioned by (gpu_uuid, window_start)
    holds every delivery of its records, each record's together and in the order that defines
    "first": a row whose record_id differs from the previous row's is a first delivery. The pass
    reads in the table's order, with no sort and no hash table of ids; the same window partition is
    one GPU's window, where the checks add up what its records claim.
    """
    select = ", ".join(f"{expr} AS {alias}" for expr, alias in keys)
    names = ", ".join(alias for _, alias in keys)
    registry = (
        f",{registry_columns(periods)},\n    {CLAIM_SQL} AS claim, cityHash64(record_id) AS rid_hash" if checked else ""
    )
    marks = f",\n    {_marks_sql(marked)}" if checked else ""
    hold = f", {JUDGED_COLUMNS}, {OCCUPIED_SQL} AS occupied, {HOLD_SQL} AS hold" if checked else ", 0 AS hold"
    claimed = f", {CLAIMED_SQL} OVER p AS claimed" if checked else ""
    as_registered = " REPLACE (registered_class AS gpu_class)" if checked else ""
    # one branch per range of gpu_uuid, each read in order with its own window: every GPU window
    # lies in one range, so the branches run side by side (a window over one stream uses one core)
    bounds = [f"{{split_{i}:String}}" for i in range(1, splits + 1)]
    ranges = [
        " AND ".join(c for c in (f"gpu_uuid >= {lo}" if lo else "", f"gpu_uuid < {hi}" if hi else "") if c) or "1"
        for lo, hi in zip(["", *bounds], [*bounds, ""], strict=True)
    ]
    branches = "\n            UNION ALL\n".join(
        f"""            SELECT *{hold}
            FROM (
                SELECT *, record_id != lagInFrame(record_id, 1, '') OVER p AS first,
                       min(content) OVER r != max(content) OVER r AS differs, max(ingested_at) OVER r AS latest{claimed}
                FROM (SELECT {DELIVERY_COLUMNS}, {CONTENT} AS content{marks}{registry} FROM {db}.usage_raw
                      WHERE {rng})
                WINDOW p AS ({WINDOW_ORDER} ROWS BETWEEN UNBOUNDED PRECEDING AND UNBOUNDED FOLLOWING),
                       r AS ({RECORD_PEERS})
            )
            WHERE first"""
        for rng in ranges
    )
    return f"""
    SELECT {select},
           toInt64(sumIf(allocated_seconds, bill)) AS seconds, toInt64(countIf(bill)) AS records,
           sumIf(toInt64(round(ifNull(busy_seconds, 0) * 1000)), bill) AS busy,
           sumIf(toInt64(round(ifNull(energy_joules, 0) * 1000)), bill) AS energy,
           groupArrayIf(record_id, conflict) AS conflicts,
           groupArrayIf((record_id, host_id, gpu_uuid, window_start, allocated_seconds), bill AND ({collect}))
               AS collected
    FROM (
        SELECT *{as_registered}, ({where}) AS bill, differs AND ({conflicts_in}) AS conflict
        FROM (
{branches}
        )
    )
    WHERE bill OR conflict
    GROUP BY {names}"""


def _marks_sql(marked: bool) -> str:
    """The ``marks`` of a delivery (usage_checks.MARK_BITS) and its ``hold_state``; a lookup in the
    few marked record_ids, or none at all when nothing is marked."""
    marks = (
        "transform(record_id, {mark_ids:Array(String)}, {mark_bits:Array(UInt8)}, toUInt8(0))"
        if marked
        else "toUInt8(0)"
    )
    return f"{marks} AS marks, bitAnd(marks, 7) AS hold_state"


@dataclass(frozen=True, slots=True)
class Span:
    """Records dated (in the time zone of the read) on or before ``last_day`` and ingested at or
    before ``cutoff``, minus those dated on or before ``prev_last_day`` and ingested at or before
    ``prev_cutoff``. Consecutive spans never share a record: a settlement reads one."""

    last_day: date
    cutoff: datetime
    prev_last_day: date | None = None
    prev_cutoff: datetime | None = None

    def where(self) -> tuple[str, dict[str, Any]]:
        sql = f"{DAY} <= {{last_day:Date}} AND ingested_at <= {{cutoff:DateTime64(6, 'UTC')}}"
        params: dict[str, Any] = {"last_day": self.last_day, "cutoff": _naive_utc(self.cutoff)}
        if self.prev_last_day is not None and self.prev_cutoff is not None:
            sql += f" AND NOT ({DAY} <= {{prev_last_day:Date}} AND ingested_at <= {{prev_cutoff:DateTime64(6, 'UTC')}})"
            params.update(prev_last_day=self.prev_last_day, prev_cutoff=_naive_utc(self.prev_cutoff))
        return sql, params

    def conflicts_where(self) -> tuple[str, dict[str, Any]]:
        """The condition on a record's ``latest`` delivery for its conflict to belong to this span:
        it arrived in (previous cutoff, this cutoff]."""
        sql = "latest <= {conflicts_to:DateTime64(6, 'UTC')}"
        params: dict[str, Any] = {"conflicts_to": _naive_utc(self.cutoff)}
        if self.prev_cutoff is not None:
            sql += " AND latest > {conflicts_from:DateTime64(6, 'UTC')}"
            params["conflicts_from"] = _naive_utc(self.prev_cutoff)
        return sql, params


class DayTotals(NamedTuple):  # a tuple: a settlement reads ~10^6 of them
    """First deliveries of one (firm, day, provider, class); busy and energy in exact thousandths."""

    firm_id: str
    day: date
    provider_id: str
    gpu_class: str
    allocated_seconds: int
    records: int
    busy_ms: int  # busy seconds x 1000, summed from each window's value rounded to the millisecond
    energy_mj: int  # energy joules x 1000 (millijoules), likewise


class CheckedDay(NamedTuple):
    """``DayTotals`` of a checked read (``checked_by_day``): also the hold and what was recorded."""

    firm_id: str
    day: date
    provider_id: str
    gpu_class: str  # the registered class (the record's own when its GPU is not registered)
    hold: str  # '' bills; else a code of usage_checks.HOLD_REASONS
    hold_state: str  # '' a record of this span; 'held' one an earlier settlement held
    allocated_seconds: int
    records: int
    busy_ms: int
    energy_mj: int
    collected: list[tuple[str, str, str, datetime, int]]  # (record_id, host, gpu, window_start, seconds)


@dataclass(frozen=True, slots=True)
class HoldRow:
    record_id: str
    state: str  # 'held' | 'billed' | 'excluded'
    reason: str
    firm_id: str
    provider_id: str
    host_id: str
    gpu_uuid: str
    gpu_class: str
    window_start: datetime
    allocated_seconds: int


HOLD_COLUMNS = (
    "store_id", "record_id", "settlement_seq", "month", "state", "reason", "firm_id", "provider_id", "host_id",
    "gpu_uuid", "gpu_class", "window_start", "allocated_seconds", "written_at",
)  # fmt: skip


@dataclass(frozen=True, slots=True)
class ImportWindow:
    """One usage window from a CSV file, parsed but not yet checked (``pipeline.usage_csv``)."""

    line: int
    record_id: str
    window_start: datetime  # aware
    window_end: datetime  # aware
    provider_id: str
    host_id: str
    gpu_uuid: str
    gpu_class: str
    firm_id: str
    allocated_seconds: int
    busy_seconds: float | None
    energy_joules: float | None


def _naive_utc(t: datetime) -> datetime:
    """The naive UTC datetime that a ``DateTime64(.., 'UTC')`` query parameter reads as UTC; a naive
    ``t`` is already UTC. Never for inserted values: an insert reads a naive datetime as local time."""
    return t if t.tzinfo is None else t.astimezone(UTC).replace(tzinfo=None)


def _check_row(w: ImportWindow) -> tuple[Any, ...]:
    return (
        w.line, w.record_id, 0, w.provider_id, w.host_id, w.gpu_uuid, w.gpu_class, w.firm_id,
        epoch_ms(w.window_start), epoch_ms(w.window_end), w.allocated_seconds, w.busy_seconds, w.energy_joules,
    )  # fmt: skip


class UsageStore:
    """Reads (each one pass over the raw rows, see ``first_delivery_sql``) and CSV import."""

    def __init__(self, client: Any, database: str, progress: Callable[[str], None] = lambda _: None) -> None:
        self.client = client
        self.db = database
        self.progress = progress  # hears one line per pass, with its time
        self._conflicts: dict[Span, list[str]] = {}  # found by by_day(), asked for by conflicting_records()

    # ------------------------------------------------------------ the one pass

    def totals(
        self,
        keys: Sequence[tuple[str, str]],
        where: str,
        params: dict[str, Any],
        order: Sequence[int] = (),
        conflicts_in: str = "0",
        checks: Checks | None = None,
        collect: str = "0",
    ) -> tuple[list[tuple[Any, ...]], list[str]]:
        """(rows of (*keys, seconds, records, busy, energy) with records > 0, sorted by the keys at
        ``order``; sorted record_ids of conflicting records) - see ``first_delivery_sql``. With
        ``checks`` (and ``settled_seq`` among ``params``), the usage checks run in the pass and each
        row ends with its ``collected`` first deliveries."""
        width = len(keys)
        by = f" ORDER BY {', '.join(keys[i][1] for i in order)}" if order else ""
        started = time.perf_counter()
        marked = False
        if checks is not None:
            params = {"settled_seq": 0, **checks.params(), **params}
            marks = self.marks(checks.store_id, int(params["settled_seq"]), checks.cutoff)
            marked = bool(marks)
            params.update(mark_ids=list(marks), mark_bits=list(marks.values()))
        points = self.split_points()
        params = {**params, **{f"split_{i}": v for i, v in enumerate(points, start=1)}}  # the caller's is untouched
        periods = checks.periods if checks is not None else 1
        sql = first_delivery_sql(
            self.db, keys, where, conflicts_in, checks is not None, collect, marked, len(points), periods
        )
        sql += by
        rows = self.client.query(sql, parameters=params, settings=READ_SETTINGS).result_rows
        checked = ", usage checks" if checks is not None else ""
        self._timed(f"first deliveries of every record_id{checked}, {len(rows):,} groups", started)
        conflicts = sorted({str(rid) for r in rows for rid in r[width + 4]})
        keep = width + 4 if checks is None else width + 4 + 1
        out = [(*r[: width + 4], r[width + 5]) if checks is not None else tuple(r[:keep]) for r in rows]
        return [r for r in out if r[width + 1] > 0], conflicts

    def split_points(self) -> list[str]:
        """gpu_uuid values that cut the table into about ``max_threads`` ranges of equal rows, from
        the primary index's marks (one per granule, a few milliseconds to read): none when there is
        one thread, the index cannot be read (a server without ``mergeTreeIndex``) or the table is
        small. Read for every pass: any cut is correct, a fresh one keeps the branches even."""
        try:
            threads, marks = self.client.query(
                "SELECT getSetting('max_threads'), arraySort(groupArray(gpu_uuid)) "
                "FROM mergeTreeIndex({db:String}, 'usage_raw')",
                parameters={"db": self.db},
            ).result_rows[0]
        except Exception:  # an older server, or a table the function cannot read: one branch
            return []
        if int(threads) < 2 or len(marks) < SPLIT_MIN_MARKS:
            return []
        # sorted by ClickHouse (bytes), so the cuts increase in the order the ranges are read in
        cuts = dict.fromkeys(str(marks[len(marks) * i // int(threads)]) for i in range(1, int(threads)))
        return [c for c in cuts if c != str(marks[0])]

    def _timed(self, text: str, started: float) -> None:
        self.progress(f"  {text}: {time.perf_counter() - started:.1f} s")

    # ------------------------------------------------------------ reads

    def by_day(self, tz: str, span: Span) -> list[DayTotals]:
        """First deliveries per (firm, day, provider, class) inside ``span``, sorted by (day, firm,
        provider, class); the span's conflicting records come from the same pass."""
        where, params = span.where()
        conflicts_in, conflict_params = span.conflicts_where()
        rows, self._conflicts[span] = self.totals(
            DAY_KEYS, where, {"tz": tz, **params, **conflict_params}, (1, 0, 2, 3), conflicts_in
        )
        return [DayTotals(str(r[0]), r[1], str(r[2]), str(r[3]), r[4], r[5], r[6], r[7]) for r in rows]

    def checked_by_day(self, tz: str, span: Span, checks: Checks, settled_seq: int) -> list[CheckedDay]:
        """What one settlement reads: the span's first deliveries and the records earlier settlements
        held (``hold_state`` 'held'), each judged now (``usage_checks``), per (firm, day, provider,
        registered class, hold, hold_state), sorted by (day, firm, provider, class); the records of a
        group that is held or was held come with it (``collected``). Conflicts as ``by_day``."""
        where, params = span.where()
        conflicts_in, conflict_params = span.conflicts_where()
        keys = (*DAY_KEYS, ("hold", "hold"), ("hold_state", "hold_state"))
        rows, self._conflicts[span] = self.totals(
            keys,
            f"({where}) OR hold_state = {HELD}",
            {"tz": tz, **params, **conflict_params, "settled_seq": settled_seq},
            (1, 0, 2, 3, 4, 5),
            conflicts_in,
            checks=checks,
            collect=f"hold != 0 OR hold_state = {HELD}",
        )
        return [
            CheckedDay(str(r[0]), r[1], str(r[2]), str(r[3]), hold_name(r[4]), HOLD_STATES[r[5]], r[6], r[7], r[8],
                       r[9], [(str(c[0]), str(c[1]), str(c[2]), c[3], int(c[4])) for c in r[10]])
            for r in rows
        ]  # fmt: skip

    def marks(self, store_id: str, settled_seq: int, cutoff: datetime) -> dict[str, int]:
        """record_id -> usage_checks.MARK_BITS of every record the store's settlements up to
        ``settled_seq`` recorded a hold state for, or staff decided on by ``cutoff``."""
        out: dict[str, int] = {}
        for rid, state in self.client.query(
            f"""SELECT record_id, argMax(state, settlement_seq) FROM {self.db}.usage_holds
                WHERE store_id = {{s:String}} AND settlement_seq <= {{q:UInt32}} GROUP BY record_id""",
            parameters={"s": store_id, "q": settled_seq},
        ).result_rows:
            out[str(rid)] = MARK_BITS.get(str(state), 0)
        for rid, decision in self.client.query(
            f"""SELECT record_id, argMax(decision, decided_at) FROM {self.db}.usage_decisions
                WHERE store_id = {{s:String}} AND decided_at <= {{at:DateTime64(6, 'UTC')}} GROUP BY record_id""",
            parameters={"s": store_id, "at": _naive_utc(cutoff)},
        ).result_rows:
            out[str(rid)] = out.get(str(rid), 0) | MARK_BITS.get(str(decision), 0)
        return out

    def discard_holds_after(self, store_id: str, settled_seq: int) -> None:
        """Forget hold rows of settlements after ``settled_seq``: left by an attempt that did not commit."""
        self.client.command(
            f"DELETE FROM {self.db}.usage_holds WHERE store_id = {{s:String}} AND settlement_seq > {{q:UInt32}}",
            parameters={"s": store_id, "q": settled_seq},
        )

    def record_holds(self, store_id: str, seq: int, month: str, rows: Sequence[HoldRow]) -> None:
        """Write what settlement ``seq`` decided of held and once-held records (before it commits)."""
        now = datetime.now(UTC)
        data = [
            (store_id, h.record_id, seq, month, h.state, h.reason, h.firm_id, h.provider_id, h.host_id, h.gpu_uuid,
             h.gpu_class, h.window_start.replace(tzinfo=UTC) if h.window_start.tzinfo is None else h.window_start,
             h.allocated_seconds, now)
            for h in rows
        ]  # fmt: skip
        for i in range(0, len(data), IMPORT_ROWS_PER_INSERT):
            chunk = data[i : i + IMPORT_ROWS_PER_INSERT]
            self.client.insert(f"{self.db}.usage_holds", chunk, column_names=HOLD_COLUMNS)

    def open_holds(
        self,
        store_id: str,
        settled_seq: int,
        reasons: Sequence[str] = (),
        record_ids: Sequence[str] = (),
        provider_id: str = "",
    ) -> list[HoldRow]:
        """Records the store's settlements up to ``settled_seq`` hold now (latest state 'held'),
        optionally only these reasons, ids or provider, by (reason, gpu_uuid, window_start, record_id)."""
        where = ["store_id = {s:String}", "settlement_seq <= {q:UInt32}"]
        params: dict[str, Any] = {"s": store_id, "q": settled_seq}
        if record_ids:
            where.append("record_id IN {ids:Array(String)}")
            params["ids"] = list(record_ids)
        latest = ", ".join(f"argMax({c}, settlement_seq) AS {c}" for c in HOLD_COLUMNS[4:13])
        rows = self.client.query(
            f"""SELECT record_id, {", ".join(HOLD_COLUMNS[4:13])} FROM (
                    SELECT record_id, {latest} FROM {self.db}.usage_holds WHERE {" AND ".join(where)}
                    GROUP BY record_id)
                WHERE state = 'held'{" AND reason IN {reasons:Array(String)}" if reasons else ""}
                      {"AND provider_id = {provider:String}" if provider_id else ""}
                ORDER BY reason, gpu_uuid, window_start, record_id""",
            parameters={**params, "reasons": list(reasons), "provider": provider_id},
        ).result_rows
        return [
            HoldRow(str(r[0]), str(r[1]), str(r[2]), str(r[3]), str(r[4]), str(r[5]), str(r[6]), str(r[7]),
                    r[8].replace(tzinfo=UTC), int(r[9]))
            for r in rows
        ]  # fmt: skip

    def decisions_after(self, store_id: str, after: datetime | None) -> dict[str, tuple[str, str, datetime, str]]:
        """record_id -> (decision, by, at, why) of the latest decision made after ``after`` (None: ever)."""
        rows = self.client.query(
            f"""SELECT record_id, argMax(decision, decided_at), argMax(decided_by, decided_at), max(decided_at),
                       argMax(reason, decided_at)
                FROM {self.db}.usage_decisions
                WHERE store_id = {{s:String}} AND decided_at > {{after:DateTime64(6, 'UTC')}}
                GROUP BY record_id""",
            parameters={"s": store_id, "after": _naive_utc(after or EPOCH)},
        ).result_rows
        return {str(r[0]): (str(r[1]), str(r[2]), r[3].replace(tzinfo=UTC), str(r[4])) for r in rows}

    def decide(self, store_id: str, record_ids: Sequence[str], decision: str, by: str, why: str, at: datetime) -> None:
        """Record staff's ``decision`` ('release' or 'exclude') on records: the next settlement applies it."""
        rows = [(store_id, rid, decision, by, at.astimezone(UTC), why) for rid in record_ids]
        for i in range(0, len(rows), IMPORT_ROWS_PER_INSERT):
            self.client.insert(
                f"{self.db}.usage_decisions",
                rows[i : i + IMPORT_ROWS_PER_INSERT],
                column_names=("store_id", "record_id", "decision", "decided_by", "decided_at", "reason"),
            )

    def conflicting_records(self, span: Span) -> list[str]:
        """record_ids delivered again with different content whose latest delivery arrived in the
        span's (previous cutoff, cutoff], sorted. From ``by_day`` of the same span when it ran."""
        if span not in self._conflicts:
            conflicts_in, params = span.conflicts_where()
            self._conflicts[span] = self.totals([("0", "none")], "0", params, (), conflicts_in)[1]
        return self._conflicts[span]

    def months_before(
        self, tz: str, first_day: date, cutoff: datetime, checks: Checks | None = None, settled_seq: int = 0
    ) -> list[str]:
        """Months before ``first_day`` that have usage ingested up to ``cutoff``; with ``checks``, only
        usage of a firm that the checks would bill (held and unattributed usage does not count)."""
        where = f"{DAY} < {{first:Date}} AND ingested_at <= {{cutoff:DateTime64(6, 'UTC')}}"
        params: dict[str, Any] = {"tz": tz, "first": first_day, "cutoff": _naive_utc(cutoff)}
        # raw rows are a superset of first deliveries: if none is that early, nothing is
        early = self.client.query(f"SELECT count() FROM {self.db}.usage_raw WHERE {where}", parameters=params)
        if not early.result_rows[0][0]:
            return []
        if checks is None:
            return [str(r[0]) for r in self.totals([(MONTH, "m")], where, params, (0,))[0]]
        keys = [(MONTH, "m"), (f"hold = 0 AND firm_id != '{UNATTRIBUTED}'", "bills")]
        rows = self.totals(keys, where, {**params, "settled_seq": settled_seq}, (0,), checks=checks)[0]
        return sorted({str(r[0]) for r in rows if r[1]})

    def seconds_by_month(
        self, tz: str, cutoff: datetime | None, store_id: str = "", settled_seq: int = 0
    ) -> dict[tuple[str, str], tuple[int, int, int, int]]:
        """(month, firm_id) -> allocated_seconds of (every record, the records that arrived up to
        ``cutoff`` (0 when it is None), of those the ones settlements up to ``settled_seq`` of billing
        store ``store_id`` hold, and the ones they excluded), in one pass."""
        params: dict[str, Any] = {"tz": tz, "settled_seq": settled_seq}
        if cutoff:
            params["cutoff"] = _naive_utc(cutoff)
        keys = [
            (MONTH, "m"),
            ("firm_id", "firm_id"),
            ("ingested_at <= {cutoff:DateTime64(6, 'UTC')}" if cutoff else "0", "arrived"),
            ("hold_state", "hold_state"),
        ]
        checks = state_only(cutoff, store_id)
        out: dict[tuple[str, str], tuple[int, int, int, int]] = {}
        for m, firm, arrived, code, seconds, *_ in self.totals(keys, "1", params, checks=checks)[0]:
            every, by_cutoff, held, excluded = out.get((str(m), str(firm)), (0, 0, 0, 0))
            state = HOLD_STATES[code]
            late = int(seconds) if arrived else 0
            out[(str(m), str(firm))] = (
                every + int(seconds),
                by_cutoff + late,
                held + (late if state == "held" else 0),
                excluded + (late if state == "excluded" else 0),
            )
        return out

    def by_host(self, tz: str, month: str, provider_id: str) -> list[tuple[str, str, int, int]]:
        """(gpu_class, host_id, allocated_seconds, records) of a provider's usage dated in ``month``."""
        where = f"provider_id = {{provider:String}} AND {MONTH} = {{month:String}}"
        params = {"tz": tz, "month": month, "provider": provider_id}
        rows = self.totals([("gpu_class", "gpu_class"), ("host_id", "host_id")], where, params, (0, 1))[0]
        return [(str(r[0]), str(r[1]), int(r[2]), int(r[3])) for r in rows]

    def knows_provider(self, provider_id: str) -> bool:
        """Whether ``provider_id`` is in the fleet registry or sent any usage or GPU window, ever."""
        tables = ("fleet_devices", "usage_raw", "gpu_windows")
        sql = " UNION ALL ".join(
            f"SELECT 1 FROM (SELECT 1 FROM {self.db}.{t} WHERE provider_id = {{p:String}} LIMIT 1)" for t in tables
        )
        return bool(self.client.query(sql, parameters={"p": provider_id}).result_rows)

    def capacity(self, tz: str, month: str, provider_id: str) -> list[CapacityRow]:
        """(host_id, gpu_uuid, gpu_class, capacity, allocated, unattributed, idle, unread, unsampled)
        seconds of a provider's GPU windows (schema v4; first deliveries) dated in ``month``: where the
        capacity went, outages (unread: the driver did not answer) and time unobserved included."""
        where = f"provider_id = {{provider:String}} AND {MONTH} = {{month:String}}"
        rows = self.client.query(
            f"""
            SELECT host_id, gpu_uuid, any(gpu_class), sum({GPU_WINDOW_SECONDS}),
                   sum(allocated_seconds), sum(unattributed_seconds), sum(idle_seconds), sum(unread_seconds),
                   sum(unsampled_seconds)
            FROM ({first_gpu_windows_sql(self.db, where)})
            GROUP BY host_id, gpu_uuid ORDER BY host_id, gpu_uuid
            """,
            parameters={"tz": tz, "month": month, "provider": provider_id},
        ).result_rows
        return [(str(r[0]), str(r[1]), str(r[2]), *(int(x) for x in r[3:])) for r in rows]  # type: ignore[misc]

    def coverage(self, start: datetime, end: datetime) -> list[tuple[Any, ...]]:
        """Per GPU, its GPU windows starting in [start, end) (first deliveries) against its usage windows
        (first deliveries, ``first_delivery_sql``): (provider_id, host_id, gpu_uuid, gpu_class, GPU
        windows, window seconds, allocated, unattributed, idle, unread, unsampled, windows whose usage
        windows do not add up to what the GPU window says, seconds between the start of its first GPU
        window and the end of its last that no GPU window covers: negative when windows overlap, which
        one agent's never do). Usage windows of a host with no GPU windows (an agent before 0.3.0) are
        not judged here."""
        keys = [("host_id", "host_id"), ("gpu_uuid", "gpu_uuid"), ("window_start", "window_start")]
        usage = first_delivery_sql(self.db, keys, IN_SPAN)  # what billing reads, imports included
        seconds = GPU_WINDOW_SECONDS.replace("window_", "gw.window_")
        rows = self.client.query(
            f"""
            WITH gw AS ({first_gpu_windows_sql(self.db, IN_SPAN)}), uw AS ({usage})
            SELECT gw.provider_id, gw.host_id, gw.gpu_uuid, any(gw.gpu_class), count(), sum({seconds}),
                   sum(gw.allocated_seconds), sum(gw.unattributed_seconds), sum(gw.idle_seconds),
                   sum(gw.unread_seconds), sum(gw.unsampled_seconds),
                   countIf(gw.allocated_seconds + gw.unattributed_seconds != uw.seconds
                           OR gw.usage_windows != uw.records),
                   intDiv(toUnixTimestamp64Milli(max(gw.window_end)) - toUnixTimestamp64Milli(min(gw.window_start)),
                          1000) - sum({seconds})
            FROM gw LEFT JOIN uw ON gw.host_id = uw.host_id AND gw.gpu_uuid = uw.gpu_uuid
                                AND gw.window_start = uw.window_start
            GROUP BY gw.provider_id, gw.host_id, gw.gpu_uuid
            ORDER BY gw.provider_id, gw.host_id, gw.gpu_uuid
            SETTINGS join_use_nulls = 0
            """,
            parameters=_span_params(start, end),
            settings=READ_SETTINGS,
        ).result_rows
        return [tuple(r) for r in rows]

    def uncovered(self, start: datetime, end: datetime) -> list[tuple[str, str, int, int]]:
        """(host_id, gpu_uuid, usage windows, allocated seconds) per GPU that has GPU windows: its usage
        windows in [start, end) (first deliveries), from its first GPU window on (before it, its agent
        was older than 0.3.0), that no GPU window accounts for."""
        keys = [("host_id", "host_id"), ("gpu_uuid", "gpu_uuid"), ("window_start", "window_start")]
        usage = first_delivery_sql(self.db, keys, IN_SPAN)  # what billing reads, imports included
        rows = self.client.query(
            f"""
            SELECT u.host_id, u.gpu_uuid, sum(u.records), sum(u.seconds) FROM ({usage}) AS u
            INNER JOIN (SELECT host_id, gpu_uuid, min(window_start) AS since FROM {self.db}.gpu_windows
                        GROUP BY host_id, gpu_uuid) AS f ON u.host_id = f.host_id AND u.gpu_uuid = f.gpu_uuid
            LEFT ANTI JOIN (SELECT DISTINCT host_id, gpu_uuid, window_start FROM {self.db}.gpu_windows) AS g
                ON u.host_id = g.host_id AND u.gpu_uuid = g.gpu_uuid AND u.window_start = g.window_start
            WHERE u.window_start >= f.since
            GROUP BY u.host_id, u.gpu_uuid ORDER BY u.host_id, u.gpu_uuid
            """,
            parameters=_span_params(start, end),
            settings=READ_SETTINGS,
        ).result_rows
        return [(str(r[0]), str(r[1]), int(r[2]), int(r[3])) for r in rows]

    def gpu_states(
        self, tz: str, month: str, provider_id: str, cutoff: datetime | None, store_id: str, settled_seq: int
    ) -> list[tuple[str, str, int, int, int, int]]:
        """(host_id, gpu_uuid, seconds billed, held, excluded, pending) of a provider's usage dated in
        ``month``, by what the store's settlements up to ``settled_seq`` (cutoff ``cutoff``) did with each
        record: pending arrived after the cutoff; billed is the rest, neither held nor excluded."""
        where = f"provider_id = {{provider:String}} AND {MONTH} = {{month:String}}"
        params: dict[str, Any] = {"tz": tz, "month": month, "provider": provider_id, "settled_seq": settled_seq}
        arrived = "0"
        if cutoff is not None:
            arrived, params["cutoff"] = "ingested_at <= {cutoff:DateTime64(6, 'UTC')}", _naive_utc(cutoff)
        keys = [("host_id", "host_id"), ("gpu_uuid", "gpu_uuid"), (arrived, "arrived"), ("hold_state", "hold_state")]
        checks = state_only(cutoff, store_id)
        out: dict[tuple[str, str], list[int]] = {}
        for host, gpu, came, code, seconds, *_ in self.totals(keys, where, params, checks=checks)[0]:
            sums = out.setdefault((str(host), str(gpu)), [0, 0, 0, 0])
            column = 3 if not came else {"held": 1, "excluded": 2}.get(HOLD_STATES[code], 0)
            sums[column] += int(seconds)
        return [(host, gpu, *sums) for (host, gpu), sums in sorted(out.items())]  # type: ignore[misc]

    def gpu_seconds_by_day(
        self, tz: str, first_day: date | None = None, last_day: date | None = None
    ) -> list[tuple[str, date, str, str, int, int]]:
        """(firm_id, day, provider_id, gpu_class, allocated_seconds, records), every first delivery
        dated from ``first_day`` to ``last_day`` (inclusive, either may be open), sorted."""
        where = ["1"]
        params: dict[str, Any] = {"tz": tz}
        if first_day is not None:
            where.append(f"{DAY} >= {{first:Date}}")
            params["first"] = first_day
        if last_day is not None:
            where.append(f"{DAY} <= {{last:Date}}")
            params["last"] = last_day
        rows = self.totals(DAY_KEYS, " AND ".join(where), params, (0, 1, 2, 3))[0]
        return [(str(r[0]), r[1], str(r[2]), str(r[3]), int(r[4]), int(r[5])) for r in rows]

    # ------------------------------------------------------------ the hourly rollup

    def refresh_rollups(self, ingested_since: datetime) -> int:
        """Recompute ``usage_hourly`` for every hour that received a delivery since ``ingested_since``,
        from first deliveries, so replays and re-sent windows cannot inflate it; read it with FINAL.
        Returns the hours recomputed."""
        hours = [
            r[0]
            for r in self.client.query(
                f"SELECT DISTINCT {HOUR} FROM {self.db}.usage_raw WHERE ingested_at >= {{since:DateTime64(6, 'UTC')}}",
                parameters={"since": _naive_utc(ingested_since)},
            ).result_rows
        ]
        if not hours:
            return 0
        keys = [(HOUR, "hour"), ("provider_id", "provider_id"), ("gpu_class", "gpu_class"), ("firm_id", "firm_id")]
        rows, _ = self.totals(keys, f"{HOUR} IN {{hours:Array(DateTime('UTC'))}}", {"hours": hours})
        refreshed = datetime.now(UTC)  # aware: a naive value would be stored as the process's local time
        clickhouse.insert_hourly(self.client, self.db, [(r[0], r[1], r[2], r[3], r[4], r[5], refreshed) for r in rows])
        return len(hours)

    # ------------------------------------------------------------ CSV import

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

    def rejected(self, windows: Sequence[ImportWindow], now: datetime) -> list[tuple[int, str]]:
        """(line, reason) of every window the Kafka loader would quarantine: ``schema.WINDOW_CHECKS``,
        the same SQL, run over the rows in a scratch table that is dropped afterwards. The import's
        clock is the loader's clock; no signer applies."""
        table = f"{self.db}.usage_import_{uuid.uuid4().hex[:16]}"
        columns = ", ".join(f"{name} {ch}" for name, ch in WINDOW_CHECK_COLUMNS)
        self.client.command(f"CREATE TABLE {table} (line Int64, {columns}) ENGINE = Memory")
        try:
            for i in range(0, len(windows), IMPORT_ROWS_PER_INSERT):
                chunk = [_check_row(w) for w in windows[i : i + IMPORT_ROWS_PER_INSERT]]
                self.client.insert(table, chunk, column_names=CHECK_COLUMNS)
            names = ", ".join(name for name, _ in WINDOW_CHECK_COLUMNS)
            window = f"CAST(tuple({names}), 'Tuple({columns})')"
            batch = (
                "CAST(tuple(host_id, '', '', {now_us:Int64}), "
                "'Tuple(host_id String, gm_signer_host String, gm_signer_provider String, gm_ingested_at_us Int64)')"
            )
            result = self.client.query(
                f"""SELECT line, reason FROM (
                    SELECT line, {reject_reason_sql(names.split(", "))} AS reason
                    FROM (SELECT line, {window} AS w, {batch} AS b FROM {table})
                ) WHERE reason != '' ORDER BY line""",
                parameters={"now_us": int(now.timestamp() * 1_000_000)},
            )
            return [(int(r[0]), str(r[1])) for r in result.result_rows]
        finally:
            self.client.command(f"DROP TABLE IF EXISTS {table}")

    def import_windows(self, windows: Sequence[ImportWindow], source: str, token: str, now: datetime) -> None:
        """Insert checked CSV windows as deliveries: the line number is the offset, so an earlier line is
        an earlier delivery. The caller runs ``rejected`` first; ``token`` makes a repeat a no-op."""
        # aware datetimes: clickhouse-connect stores a naive one as the process's local time
        ingested = now.astimezone(UTC)
        data = [
            (
                w.record_id, 0, w.provider_id, w.host_id, w.gpu_uuid, w.gpu_class, w.firm_id,
                w.window_start.astimezone(UTC), w.window_end.astimezone(UTC), w.allocated_seconds, w.busy_seconds,
                w.energy_joules, "import", source, -1, w.line, ingested,
            )
            for w in windows
        ]  # fmt: skip
        for i in range(0, len(data), IMPORT_ROWS_PER_INSERT):
            clickhouse.insert_raw(self.client, self.db, data[i : i + IMPORT_ROWS_PER_INSERT], f"{token}:{i}")


def _span_params(start: datetime, end: datetime) -> dict[str, Any]:
    return {"s": _naive_utc(start), "e": _naive_utc(end)}
