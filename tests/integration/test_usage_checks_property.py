"""Random fleets and random dishonest records, judged by the usage checks in real ClickHouse:
no GPU's window is ever billed for more seconds than it has, and honest usage is never held."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gpumeter.fleet import OPEN_END, FleetDevice
from pipeline import clickhouse
from pipeline.usage_checks import Checks
from pipeline.usage_store import UsageStore

pytestmark = pytest.mark.integration

T0 = datetime(2026, 3, 1, tzinfo=UTC)
EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
FIRMS = ("F1", "F2", "F3")


@st.composite
def fleets(draw: Any) -> list[FleetDevice]:
    """Hosts of 1-3 GPUs; a GPU may move to another host (and window length) after some hours, its
    registration then two periods, or three when it comes back."""
    hosts = range(draw(st.integers(1, 3)))
    windows = {h: draw(st.sampled_from((60, 300))) for h in hosts}
    devices = []
    for h in hosts:
        for g in range(draw(st.integers(1, 3))):
            stops = sorted(draw(st.sets(st.integers(1, 3), max_size=2)))
            edges = [T0, *(T0 + timedelta(hours=n) for n in stops), OPEN_END]
            at = [h, *(draw(st.sampled_from(hosts)) for _ in stops)]
            for i, host in enumerate(at):
                devices.append(FleetDevice(0, f"P{host % 2}", f"H{host}", f"G{h}-{g}", "H100", windows[host],
                                           edges[i], edges[i + 1], ""))  # fmt: skip
    return devices


@st.composite
def usage(draw: Any) -> tuple[list[FleetDevice], list[tuple[Any, ...]], set[str]]:
    """(fleet, raw rows, record_ids of honest records that must bill). A registered host's extra claim
    on its own GPU's window ("extra", or one for a firm nobody loaded) makes the window's records
    ambiguous: they need not bill."""
    fleet = draw(fleets())
    rows: list[tuple[Any, ...]] = []
    honest: set[str] = set()
    contested: set[tuple[str, datetime]] = set()
    n = 0

    def add(host: str, gpu: str, firm: str, start: datetime, length: int, seconds: int, provider: str) -> str:
        nonlocal n
        n += 1
        rid = f"r{n}"
        ingested = T0 + timedelta(days=5, seconds=draw(st.integers(0, 100)))
        for _ in range(draw(st.integers(1, 2))):  # sometimes delivered twice
            rows.append((rid, n, provider, host, gpu, "H100", firm, start, start + timedelta(seconds=length), seconds,
                         None, None, "t", "kafka", 0, len(rows), ingested))  # fmt: skip
        return rid

    for d in fleet:  # honest: each window's seconds shared among firms, at most its length in all
        for w in draw(st.sets(st.integers(0, 20), max_size=4)):
            start = d.valid_from + timedelta(seconds=w * d.window_seconds)
            if start + timedelta(seconds=d.window_seconds) > d.valid_to:
                continue
            left = d.window_seconds
            for firm in draw(st.lists(st.sampled_from(FIRMS), min_size=1, max_size=3, unique=True)):
                seconds = draw(st.integers(0, left))
                left -= seconds
                honest.add(add(d.host_id, d.gpu_uuid, firm, start, d.window_seconds, seconds, d.provider_id))
    for _ in range(draw(st.integers(0, 12))):  # dishonest: another host, no registration, off the grid, no firm
        d = draw(st.sampled_from(fleet))
        kind = draw(st.sampled_from(("other_host", "unregistered", "misaligned", "long", "unknown_firm", "extra",
                                     "resent")))  # fmt: skip
        if kind == "resent" and rows:  # a record sent again, later, with other seconds: both versions claim
            old = draw(st.sampled_from(rows))
            rows.append((*old[:9], old[9] + draw(st.integers(1, 60)), *old[10:15], len(rows),
                         old[16] + timedelta(seconds=1)))  # fmt: skip
            contested.add((old[4], old[7]))
            continue
        host, gpu, firm, length = d.host_id, d.gpu_uuid, draw(st.sampled_from(FIRMS)), d.window_seconds
        start = d.valid_from + timedelta(seconds=draw(st.integers(0, 20)) * d.window_seconds)
        if start + timedelta(seconds=2 * d.window_seconds) > d.valid_to:  # inside its period, even when "long"
            continue
        if kind == "other_host":
            host = "H-liar"
        elif kind == "unregistered":
            gpu = f"G-ghost-{draw(st.integers(0, 2))}"
        elif kind == "misaligned":
            start += timedelta(seconds=draw(st.integers(1, d.window_seconds - 1)))
        elif kind == "long":
            length = d.window_seconds * 2
        elif kind == "unknown_firm":  # its seconds still occupy the GPU: the window is contested too
            firm = "F-nobody"
            contested.add((gpu, start))
        else:  # the registered host claims more of its GPU's window: nobody can tell which claim is true
            firm = f"F-extra-{len(rows)}"
            contested.add((gpu, start))
        add(host, gpu, firm, start, length, draw(st.integers(0, length)), d.provider_id)
    ambiguous = {r[0] for r in rows if (r[4], r[7]) in contested}
    return fleet, rows, honest - ambiguous


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(case=usage())
def test_billed_seconds_never_exceed_a_gpu_window_and_honest_usage_bills(
    ch: tuple[Any, str], case: tuple[list[FleetDevice], list[tuple[Any, ...]], set[str]]
) -> None:
    client, db = ch
    fleet, rows, honest = case
    client.command(f"TRUNCATE TABLE {db}.usage_raw")
    clickhouse.insert_raw(client, db, rows, None)
    firms = (*FIRMS, *{r[6] for r in rows if r[6].startswith("F-extra")})
    checks = Checks(tuple(fleet), firms, T0 + timedelta(days=30), "S", T0 - timedelta(days=92))
    keys = [("record_id", "r"), ("gpu_uuid", "g"), ("window_start", "ws"), ("hold", "hold")]
    judged = UsageStore(client, db).totals(keys, "1", {"tz": "UTC"}, checks=checks)[0]

    def length(gpu: str, start: datetime) -> int:  # the window length of the GPU's period at start, 0 if none
        at = start.replace(tzinfo=UTC) if start.tzinfo is None else start
        return next((d.window_seconds for d in fleet if d.gpu_uuid == gpu and d.valid_from <= at < d.valid_to), 0)

    billed: dict[tuple[str, datetime], int] = {}
    for rid, gpu, start, hold, seconds, *_ in judged:
        if hold == 0:  # the hold as a number in SQL (usage_checks.hold_name)
            billed[(gpu, start)] = billed.get((gpu, start), 0) + seconds
        else:
            assert rid not in honest, (rid, hold)
    for (gpu, start), seconds in billed.items():
        assert seconds <= length(gpu, start), (gpu, start)
    assert {r[0] for r in judged if r[3] == 0} >= honest  # every honest record bills, once
    assert len(judged) == len({r[0] for r in rows})  # every record judged once, re-deliveries or not
