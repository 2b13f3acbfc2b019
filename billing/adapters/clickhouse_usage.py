"""Billing's usage port over the pipeline's usage store in ClickHouse (``pipeline.usage_store``).

The store defines which delivery of a record counts (its first) and sums busy seconds and
energy in exact thousandths; here each sum is rounded half-up to a whole unit
(docs/billing-rules.md 2.5) and the rows become the core's ``UsageAggregate``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from datetime import UTC, date, datetime, time, timedelta
from typing import Any

from billing.app.ports import CapacityRow, CheckContext, HeldRecord, HeldTotal, SettlementSpan, SpanUsage
from billing.core.model import UNATTRIBUTED, UsageAggregate
from billing.core.money import half_up
from gpumeter.fleet import FleetDevice
from pipeline import fleet_store
from pipeline.usage_checks import Checks
from pipeline.usage_store import CheckedDay, HoldRow, Span, UsageStore


def _hold_rows(t: CheckedDay, state: str) -> list[HoldRow]:
    return [
        HoldRow(rid, state, t.hold or "released", t.firm_id, t.provider_id, host, gpu, t.gpu_class, start, seconds)
        for rid, host, gpu, start, seconds in t.collected
    ]


def _span(span: SettlementSpan) -> Span:
    return Span(span.last_day, span.cutoff, span.prev_last_day, span.prev_cutoff)


class ClickHouseUsage:
    """``UsageReader`` and ``UsageTotals`` over one ClickHouse database."""

    def __init__(self, client: Any, database: str, progress: Callable[[str], None] = lambda _: None) -> None:
        self.store = UsageStore(client, database, progress)
        self._pending: list[HoldRow] = []  # what the last checked read decided, until record_holds
        # (version, digest, devices) last read: the registry is read once per loaded version
        self._fleet: tuple[int, str, tuple[FleetDevice, ...]] = (0, "", ())

    def _checks(self, context: CheckContext, cutoff: datetime, month_start: date) -> tuple[Checks, int]:
        version = fleet_store.current_version(self.store.client, self.store.db)
        number, digest = (version.version, version.digest) if version else (0, "")
        if (number, digest) != self._fleet[:2]:  # the digest too: a store made again reuses version numbers
            self._fleet = (number, digest, tuple(fleet_store.devices(self.store.client, self.store.db, number)))
        devices = self._fleet[2]
        oldest = datetime.combine(month_start - timedelta(days=context.horizon_days), time(), UTC)
        checks = Checks(devices, context.firms, cutoff, context.store_id, oldest)
        return checks, number

    def checked_usage(self, tz: str, span: SettlementSpan, context: CheckContext) -> SpanUsage:
        checks, fleet_version = self._checks(context, span.cutoff, span.last_day.replace(day=1))
        sums: dict[tuple[str, date, str, str], list[int]] = {}
        held: list[HeldTotal] = []
        pending: list[HoldRow] = []
        unattributed = [0, 0]
        released = 0
        reasons: dict[str, str] | None = None  # record_id -> reason of the open holds, read when needed
        for t in self.store.checked_by_day(tz, _span(span), checks, context.settled_seq):
            if t.hold == "":
                if t.firm_id == UNATTRIBUTED:
                    unattributed[0] += t.allocated_seconds
                    unattributed[1] += t.records
                else:
                    s = sums.setdefault((t.firm_id, t.day, t.provider_id, t.gpu_class), [0, 0, 0, 0])
                    s[0] += t.allocated_seconds
                    s[1] += t.records
                    s[2] += t.busy_ms
                    s[3] += t.energy_mj
                if t.hold_state == "held":  # held before, bills now (docs/usage-checks.md)
                    released += t.records
                    pending += _hold_rows(t, "billed")
                continue
            held.append(HeldTotal(t.hold, t.firm_id, t.day, t.provider_id, t.gpu_class, t.allocated_seconds,
                                  t.records, t.hold_state == "held"))  # fmt: skip
            if t.hold == "excluded" or t.hold_state == "":
                pending += _hold_rows(t, "excluded" if t.hold == "excluded" else "held")
            else:  # held before and still held: a new row only where the reason changed
                if reasons is None:
                    open_now = self.store.open_holds(context.store_id, context.settled_seq)
                    reasons = {h.record_id: h.reason for h in open_now}
                pending += [h for h in _hold_rows(t, "held") if reasons.get(h.record_id) != t.hold]
        aggregates = [
            UsageAggregate(firm, day, provider, cls, s[0], s[1], half_up(s[2], 1000), half_up(s[3], 1000))
            for (firm, day, provider, cls), s in sorted(sums.items(), key=lambda kv: (kv[0][1], kv[0][0], *kv[0][2:]))
        ]
        self._pending = pending
        return SpanUsage(aggregates, unattributed[0], unattributed[1], held, released, fleet_version)

    def record_holds(self, store_id: str, seq: int, month: str) -> None:
        self.store.record_holds(store_id, seq, month, self._pending)
        self._pending = []

    def discard_holds_after(self, store_id: str, settled_seq: int) -> None:
        self.store.discard_holds_after(store_id, settled_seq)

    def open_holds(
        self,
        store_id: str,
        settled_seq: int,
        reasons: Sequence[str] = (),
        record_ids: Sequence[str] = (),
        provider_id: str = "",
    ) -> list[HeldRecord]:
        found = self.store.open_holds(store_id, settled_seq, reasons, record_ids, provider_id)
        return [HeldRecord(*dataclasses.astuple(h)) for h in found]

    def decisions_after(self, store_id: str, after: datetime | None) -> dict[str, tuple[str, str, datetime, str]]:
        return self.store.decisions_after(store_id, after)

    def decide(self, store_id: str, record_ids: Sequence[str], decision: str, by: str, why: str, at: datetime) -> None:
        self.store.decide(store_id, record_ids, decision, by, why, at)

    def usage(self, tz: str, span: SettlementSpan) -> SpanUsage:
        totals = self.store.by_day(tz, _span(span))
        aggregates = [
            UsageAggregate(t.firm_id, t.day, t.provider_id, t.gpu_class, t.allocated_seconds, t.records,
                           half_up(t.busy_ms, 1000), half_up(t.energy_mj, 1000))
            for t in totals
            if t.firm_id != UNATTRIBUTED
        ]  # fmt: skip
        unattributed = [t for t in totals if t.firm_id == UNATTRIBUTED]
        return SpanUsage(
            aggregates, sum(t.allocated_seconds for t in unattributed), sum(t.records for t in unattributed)
        )

    def conflicting_records(self, span: SettlementSpan, limit: int = 20) -> tuple[int, list[str]]:
        found = self.store.conflicting_records(_span(span))
        return len(found), found[:limit]

    def months_before(
        self, tz: str, first_day: date, cutoff: datetime, context: CheckContext | None = None
    ) -> list[str]:
        checks = self._checks(context, cutoff, first_day)[0] if context is not None else None
        return self.store.months_before(tz, first_day, cutoff, checks, context.settled_seq if context else 0)

    def seconds_by_month(
        self, tz: str, cutoff: datetime | None, store_id: str = "", settled_seq: int = 0
    ) -> dict[tuple[str, str], tuple[int, int, int, int]]:
        return self.store.seconds_by_month(tz, cutoff, store_id, settled_seq)

    def gpu_states(
        self, tz: str, month: str, provider_id: str, cutoff: datetime | None, store_id: str, settled_seq: int
    ) -> list[tuple[str, str, int, int, int, int]]:
        return self.store.gpu_states(tz, month, provider_id, cutoff, store_id, settled_seq)

    def hours_by_host(self, tz: str, month: str, provider_id: str) -> list[tuple[str, str, int, int]]:
        return self.store.by_host(tz, month, provider_id)

    def capacity(self, tz: str, month: str, provider_id: str) -> list[CapacityRow]:
        return self.store.capacity(tz, month, provider_id)

    def knows_provider(self, provider_id: str) -> bool:
        return self.store.knows_provider(provider_id)
