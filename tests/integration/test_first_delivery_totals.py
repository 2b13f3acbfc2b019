"""Every reader of usage against a plain Python definition of "first delivery", on random re-deliveries.

The usage store (``pipeline.usage_store``, behind billing's ``ClickHouseUsage`` port) finds each
record's first delivery in one pass over the table's order: per (GPU, window), each record's
deliveries by (ingested_at, kafka_partition, kafka_offset).

Here random raw rows - records delivered up to four times, later deliveries sometimes with
other content (provider, class, seconds, busy, energy; NULL, 0 and -0.0 among them: what a
record_id does not fix), with ingestion times either shared (so partition and offset decide)
or all distinct - go into real ClickHouse, and every read is compared with the definition
computed in Python: per record_id, the delivery with the least (ingested_at,
kafka_partition, kafka_offset), filtered by the settlement window.
"""

from __future__ import annotations

import hashlib
import random
from collections import defaultdict
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import pytest
from billing_helpers import hourly_rollup

from billing.adapters import state
from billing.adapters.clickhouse_usage import ClickHouseUsage
from billing.adapters.store import Store
from billing.app.load import load_files
from billing.app.ports import SettlementSpan as Window
from billing.app.ports import SpanUsage
from billing.app.reconcile import reconcile
from billing.app.settle import settle_month
from billing.core.model import UsageAggregate, first_day_of_next_month
from gpumeter.fleet import OPEN_END, FleetDevice
from pipeline import clickhouse, fleet_store
from pipeline.usage_store import READ_SETTINGS, UsageStore, first_delivery_sql

pytestmark = pytest.mark.integration

TZ = "Asia/Shanghai"
T0 = datetime(2026, 3, 1, tzinfo=UTC)
REGISTERED = ("H100", "A800")  # the class of GPU g<n> is REGISTERED[n % 2]
INGESTED = [datetime(2026, 4, 1, tzinfo=UTC) + timedelta(days=d) for d in (0, 0, 1, 3, 5, 40)]


def _deliveries(seed: int, shared_instants: bool) -> list[tuple[Any, ...]]:
    rng = random.Random(seed)
    rows: list[tuple[Any, ...]] = []
    offset = 0
    for n in range(400):
        rng.random()
        # March and April, one minute per record: no GPU's minute is claimed twice (the usage checks hold that)
        start = T0 + timedelta(minutes=(n * 223 + seed) % (62 * 24 * 60))
        # hex digests like the agent's, plus ids an import may carry (outside the hex ranges)
        rid = hashlib.md5(f"{seed}-{n}".encode()).hexdigest() if n % 10 else f"{'RZr'[n % 3]}-{seed}-{n}"
        # at most 15 s: a record's versions (up to 4) fit its minute together, as the usage checks count
        # every version's claim on the GPU's window (docs/usage-checks.md)
        seconds = rng.randrange(1, 16)
        busy = None if rng.random() < 0.1 else seconds * 0.4567
        energy = None if rng.random() < 0.1 else seconds * 123.4567
        # the record_id fixes host, GPU, firm and window start (checked on the way in): only the rest varies
        firm, begin = f"F{rng.randrange(5)}", start
        content = ["H100" if rng.random() < 0.5 else "A800", seconds, busy, energy]
        for _ in range(rng.choice((1, 1, 1, 2, 2, 3, 4))):
            if rng.random() < 0.3:  # a re-delivery with other content: one field, NULL, 0 and -0.0 included
                field = rng.randrange(4)
                content[field] = (
                    "L40S",
                    rng.randrange(1, 16),
                    rng.choice((None, 0.0, -0.0, 1.5, 29.25)),
                    rng.choice((None, 0.0, -0.0, 7.5, 9000.125)),
                )[field]
            cls, seconds, busy, energy = content
            offset += 1
            rows.append((
                rid, offset, f"P{n % 4 % 3}", f"h{n % 4}", f"g{n % 8}", cls, firm,
                begin.replace(tzinfo=None), (begin + timedelta(seconds=60)).replace(tzinfo=None), seconds,
                busy, energy, "test", "kafka", rng.randrange(3), offset,
                (rng.choice(INGESTED) + timedelta(microseconds=0 if shared_instants else offset)).replace(tzinfo=None),
            ))  # fmt: skip
    rng.shuffle(rows)
    return rows


def _first(rows: list[tuple[Any, ...]]) -> dict[str, tuple[Any, ...]]:
    by_id: dict[str, list[tuple[Any, ...]]] = defaultdict(list)
    for r in rows:
        by_id[r[0]].append(r)
    return {rid: min(ds, key=lambda r: (r[16], r[14], r[15])) for rid, ds in by_id.items()}


def _day(r: tuple[Any, ...]) -> date:
    start: datetime = r[7]
    return start.replace(tzinfo=UTC).astimezone(ZoneInfo(TZ)).date()


def _in(window: Window, r: tuple[Any, ...]) -> bool:
    day, ingested = _day(r), r[16].replace(tzinfo=UTC)
    inside = day <= window.last_day and ingested <= window.cutoff
    if window.prev_last_day is not None and window.prev_cutoff is not None:
        inside = inside and not (day <= window.prev_last_day and ingested <= window.prev_cutoff)
    return inside


def _expected_groups(rows: list[tuple[Any, ...]], window: Window) -> list[UsageAggregate]:
    sums: dict[tuple[str, date, str, str], list[int]] = defaultdict(lambda: [0, 0, 0, 0])
    for r in _first(rows).values():
        if _in(window, r):
            s = sums[(r[6], _day(r), r[2], r[5])]
            s[0] += r[9]
            s[1] += 1
            s[2] += round((r[10] or 0) * 1000)  # busy and energy: summed in thousandths, then half-up to whole
            s[3] += round((r[11] or 0) * 1000)
    return [
        UsageAggregate(k[0], k[1], k[2], k[3], v[0], v[1], (v[2] + 500) // 1000, (v[3] + 500) // 1000)
        for k, v in sorted(sums.items(), key=lambda kv: (kv[0][1], kv[0][0], kv[0][2], kv[0][3]))
    ]


WINDOWS = [
    Window(date(2026, 3, 31), INGESTED[2]),
    Window(date(2026, 4, 30), INGESTED[4], date(2026, 3, 31), INGESTED[2]),
    Window(date(2026, 5, 31), INGESTED[5], date(2026, 4, 30), INGESTED[4]),
]


@pytest.mark.parametrize(("seed", "shared_instants"), [(1, True), (2, True), (3, False), (4, False)])
def test_reads_equal_the_first_delivery_definition(ch: tuple[Any, str], seed: int, shared_instants: bool) -> None:
    client, db = ch
    rows = _deliveries(seed, shared_instants)
    assert len(rows) > len(_first(rows)) + 100  # plenty of re-deliveries
    for part in range(3):  # several parts: the ordered read merges them
        clickhouse.insert_raw(client, db, rows[part::3], None)
    first = _first(rows)
    lines: list[str] = []
    usage = ClickHouseUsage(client, db, progress=lines.append)
    for window in WINDOWS:
        assert usage.usage(TZ, window) == SpanUsage(_expected_groups(rows, window)), window  # no unattributed here
        # conflicts: more than one content, latest delivery inside (prev cutoff, cutoff]
        contents: dict[str, set[tuple[Any, ...]]] = defaultdict(set)
        latest: dict[str, datetime] = {}
        for r in rows:
            contents[r[0]].add((r[2], r[3], r[4], r[5], r[6], r[7], r[8], r[9], r[10], r[11]))
            latest[r[0]] = max(latest.get(r[0], r[16]), r[16])
        expected = sorted(
            rid
            for rid, c in contents.items()
            if len(c) > 1
            and latest[rid].replace(tzinfo=UTC) <= window.cutoff
            and (window.prev_cutoff is None or latest[rid].replace(tzinfo=UTC) > window.prev_cutoff)
        )
        assert expected  # every window has some to report
        assert usage.conflicting_records(window, limit=1000) == (len(expected), expected)  # from groups' pass
        fresh = ClickHouseUsage(client, db)
        assert fresh.conflicting_records(window, limit=3) == (len(expected), expected[:3])  # a pass of its own
    assert len(lines) == len(WINDOWS)  # one pass per span: its conflicts came from the same pass
    for cutoff in (INGESTED[2], None):
        by_month: dict[tuple[str, str], list[int]] = defaultdict(lambda: [0, 0])
        for r in first.values():
            m = by_month[(_day(r).strftime("%Y-%m"), r[6])]
            m[0] += r[9]
            m[1] += r[9] if cutoff and r[16].replace(tzinfo=UTC) <= cutoff else 0
        assert usage.seconds_by_month(TZ, cutoff) == {k: (*v, 0, 0) for k, v in by_month.items()}  # none held
    hosts: dict[tuple[str, str], list[int]] = defaultdict(lambda: [0, 0])
    for r in first.values():
        if r[2] == "P1" and _day(r).strftime("%Y-%m") == "2026-04":
            h = hosts[(r[5], r[3])]
            h[0] += r[9]
            h[1] += 1
    assert usage.hours_by_host(TZ, "2026-04", "P1") == [(k[0], k[1], *v) for k, v in sorted(hosts.items())]
    early = sorted({_day(r).strftime("%Y-%m") for r in first.values() if _day(r) < date(2026, 4, 1)})
    assert usage.months_before(TZ, date(2026, 4, 1), INGESTED[5]) == early


def test_null_zero_and_negative_zero_in_conflicts(ch: tuple[Any, str]) -> None:
    """NULL busy seconds differ from 0 (a conflict); -0.0 is 0.0 (not one)."""
    client, db = ch
    at = datetime(2026, 3, 2)
    rows = []
    for n, (first, again) in enumerate(((None, 0.0), (0.0, -0.0), (1.5, 1.5), (0.0, 2.0))):
        for offset, busy in ((1, first), (2, again)):
            rows.append((
                f"rec{n}", offset, "P1", "h1", "g1", "H100", "F1", at, at + timedelta(seconds=60), 60,
                busy, 10.0, "test", "kafka", 0, 10 * n + offset, INGESTED[0].replace(tzinfo=None),
            ))  # fmt: skip
    clickhouse.insert_raw(client, db, rows, None)
    usage = ClickHouseUsage(client, db)
    assert usage.conflicting_records(WINDOWS[0]) == (2, ["rec0", "rec3"])


def test_the_pass_reads_in_table_order_without_sorting(ch: tuple[Any, str]) -> None:
    """The one pass is fast because it reads rows in the table's order (schema.RAW_ORDER); a plan
    that sorts every row instead took 147 s and 16 GB at 100M windows (29-36 s and 1.4 GB in order)."""
    client, db = ch
    for part in range(2):  # parts to read (an empty table plans no read at all)
        clickhouse.insert_raw(client, db, _deliveries(part, shared_instants=False), None)
    keys = [("firm_id", "firm_id")]

    def plan(sql: str, **params: Any) -> list[str]:
        return [
            str(r[0])
            for r in client.query(f"EXPLAIN PIPELINE {sql}", parameters=params, settings=READ_SETTINGS).result_rows
        ]

    one_pass = plan(first_delivery_sql(db, keys, "1"))
    assert any("InOrder" in line for line in one_pass), one_pass
    assert not any("MergeSortingTransform" in line or "PartialSorting" in line for line in one_pass), one_pass


RATES_TOML = """currency = "CNY"
timezone = "Asia/Shanghai"
""" + "".join(
    f'\n[[rate]]\ngpu_class = "{cls}"\nprovider = "*"\nprice_per_gpu_hour = "{price}"\neffective_from = 2025-01-01\n'
    for cls, price in (("H100", "21.50"), ("A800", "12.80"), ("L40S", "6.40"))
)


def test_the_pass_in_gpu_ranges_agrees_with_one_branch_and_sorts_nothing(ch: tuple[Any, str]) -> None:
    """A large store's pass runs as one branch per range of gpu_uuid (UsageStore.split_points), each
    read in order with its own window, side by side: the same totals and conflicts as one branch."""
    client, db = ch
    for part in range(2):
        clickhouse.insert_raw(client, db, _deliveries(part, shared_instants=False), None)
    keys = [("firm_id", "firm_id"), ("gpu_uuid", "gpu")]

    def run(sql: str, **params: Any) -> list[tuple[Any, ...]]:
        rows = client.query(f"{sql} ORDER BY firm_id, gpu", parameters=params, settings=READ_SETTINGS).result_rows
        return [(*r[:6], sorted(r[6])) for r in rows]

    one = run(first_delivery_sql(db, keys, "1", conflicts_in="1"))
    assert len({r[1] for r in one}) == 8 and any(r[6] for r in one)  # every GPU, and conflicts to find
    split = first_delivery_sql(db, keys, "1", conflicts_in="1", splits=2)
    assert run(split, split_1="g3", split_2="g6") == one
    plan = [str(r[0]) for r in client.query(f"EXPLAIN PIPELINE {split}", parameters={"split_1": "g3", "split_2": "g6"},
                                             settings=READ_SETTINGS).result_rows]  # fmt: skip
    reads = [line for line in plan if "MergeTreeSelect" in line]
    assert sum("(ReadFromMergeTree)" in line for line in plan) == 3 and all("InOrder" in r for r in reads), plan
    assert not any("MergeSortingTransform" in line or "PartialSorting" in line for line in plan), plan


@pytest.mark.parametrize(("seed", "shared_instants"), [(5, True), (6, False)])
def test_every_reader_agrees_with_the_one_definition(
    ch: tuple[Any, str], tmp_path: Path, seed: int, shared_instants: bool
) -> None:
    """Invoices (settled items and lines), ``usage summary``, the hourly rollup and ``billing reconcile``
    all count exactly the first delivery of each record_id, on the same random re-deliveries."""
    client, db = ch
    rows = _deliveries(seed, shared_instants)
    for part in range(3):
        clickhouse.insert_raw(client, db, rows[part::3], None)
    first = list(_first(rows).values())
    by_day: dict[tuple[str, date, str, str], list[int]] = defaultdict(lambda: [0, 0])
    by_hour: dict[tuple[datetime, str, str, str], list[int]] = defaultdict(lambda: [0, 0])
    by_month: dict[tuple[str, str], int] = defaultdict(int)
    for r in first:
        for sums, key in (
            (by_day, (r[6], _day(r), r[2], r[5])),
            (by_hour, (r[7].replace(minute=0, second=0, microsecond=0), r[2], r[5], r[6])),
        ):
            sums[key][0] += r[9]
            sums[key][1] += 1
        by_month[(_day(r).strftime("%Y-%m"), r[6])] += r[9]
    store = UsageStore(client, db)

    # usage summary (and the demo's ground-truth check): every first delivery, by firm, day, provider, class
    assert store.gpu_seconds_by_day(TZ) == [(*k, *v) for k, v in sorted(by_day.items())]

    # the hourly rollup, recomputed from first deliveries
    delivered_hours = {r[7].replace(minute=0, second=0, microsecond=0) for r in rows}  # any delivery's hour
    assert store.refresh_rollups(datetime(2000, 1, 1)) == len(delivered_hours)
    assert [(h.replace(tzinfo=None), p, c, f, s, n) for h, p, c, f, s, n in hourly_rollup(client, db)] == [
        (*k, *v) for k, v in sorted(by_hour.items())
    ]

    # invoices: settle every month in order, after everything arrived, with the fleet and firms registered
    # (each GPU in the class the registry says, whatever its records claim)
    fleet = [FleetDevice(g, f"P{g % 4 % 3}", f"h{g % 4}", f"g{g}", REGISTERED[g % 2], 60, T0 - timedelta(days=60),
                         OPEN_END, "") for g in range(8)]  # fmt: skip
    fleet_store.load_fleet(client, db, fleet, "test")
    billed: dict[tuple[str, date, str, str], list[int]] = defaultdict(lambda: [0, 0])
    for r in first:
        sums = billed[(r[6], _day(r), r[2], REGISTERED[int(r[4][1:]) % 2])]
        sums[0] += r[9]
        sums[1] += 1
    billing = Store(f"sqlite:///{tmp_path / 'billing.sqlite3'}")
    rates = tmp_path / "rates.toml"
    rates.write_text(RATES_TOML)
    firms = tmp_path / "firms.csv"
    firms.write_text("firm_id,name,payment_terms_days\n" + "".join(f"F{n},Firm {n},30\n" for n in range(5)))
    load_files(billing, datetime.now(UTC), ratecard=rates, firms=firms)
    usage = ClickHouseUsage(client, db)
    months = sorted({m for m, _ in by_month})
    # after every record arrived, and after the last month ended (a month settles once it has ended)
    last_end = datetime.combine(first_day_of_next_month(months[-1]), datetime.min.time(), UTC)
    after_all = max(INGESTED[-1], last_end) + timedelta(days=1)
    for month in months:
        settle_month(billing, usage, month, clock=lambda: after_all)
    with billing.transaction() as tx:
        items = tx.query("SELECT firm_id, day, provider_id, gpu_class, allocated_seconds, record_count FROM items")
        invoices = state.invoices(tx)
    assert sorted((f, date.fromisoformat(d), p, c, s, n) for f, d, p, c, s, n in items) == [
        (*k, *v) for k, v in sorted(billed.items())
    ]
    invoiced: dict[tuple[str, str], int] = defaultdict(int)
    for inv in invoices:
        for line in inv.lines:
            invoiced[(inv.month, inv.firm_id)] += line.allocated_seconds
    assert invoiced == by_month

    # reconcile: usage in ClickHouse per firm equals what was invoiced, for every month
    for month in months:
        check = reconcile(billing, usage, month)
        assert check.problems == []
        assert {f: u for f, u, *_ in check.rows} == {f: s for (m, f), s in by_month.items() if m == month}
