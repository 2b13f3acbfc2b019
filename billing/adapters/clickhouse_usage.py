"""Billing's usage port over the pipeline's usage store in ClickHouse (``pipeline.usage_store``).

The store defines which delivery of a record counts (its first) and sums busy seconds and
energy in exact thousandths; here each sum is rounded half-up to a whole unit
(docs/billing-rules.md 2.5) and the rows become the core's ``UsageAggregate``.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import date, datetime
from typing import Any

from billing.app.ports import SettlementSpan, SpanUsage
from billing.core.model import UNATTRIBUTED, UsageAggregate
from billing.core.money import half_up
from pipeline.usage_store import Span, UsageStore


def _span(span: SettlementSpan) -> Span:
    return Span(span.last_day, span.cutoff, span.prev_last_day, span.prev_cutoff)


class ClickHouseUsage:
    """``UsageReader`` and ``UsageTotals`` over one ClickHouse database."""

    def __init__(self, client: Any, database: str, progress: Callable[[str], None] = lambda _: None) -> None:
        self.store = UsageStore(client, database, progress)

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

    def months_before(self, tz: str, first_day: date, cutoff: datetime) -> list[str]:
        return self.store.months_before(tz, first_day, cutoff)

    def seconds_by_month(self, tz: str, cutoff: datetime | None) -> dict[tuple[str, str], tuple[int, int]]:
        return self.store.seconds_by_month(tz, cutoff)

    def hours_by_host(self, tz: str, month: str, provider_id: str) -> list[tuple[str, str, int, int]]:
        return self.store.by_host(tz, month, provider_id)
