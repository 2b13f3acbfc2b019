"""What billing needs from the usage store, as a port: a protocol and the plain types it speaks.

Billing never writes usage and never reads it any other way. The one implementation over
ClickHouse is ``billing.adapters.clickhouse_usage``, which asks the pipeline's usage store
(each record's first delivery, defined once there); tests pass fakes.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import date, datetime
from typing import Protocol

from billing.core.model import UsageAggregate


@dataclass(frozen=True, slots=True)
class SettlementSpan:
    """The usage one settlement bills (docs/billing-rules.md 5.3): records dated on or before
    ``last_day`` (billing time zone) and ingested at or before ``cutoff``, minus what the previous
    settlement billed (dated on or before ``prev_last_day``, ingested at or before ``prev_cutoff``)."""

    last_day: date
    cutoff: datetime
    prev_last_day: date | None = None
    prev_cutoff: datetime | None = None


@dataclass(frozen=True, slots=True)
class SpanUsage:
    """The deduplicated usage of one span: what firms used, and what no firm could be named for."""

    aggregates: list[UsageAggregate]  # per (firm, day, provider, class), adjustment_for None, in that order
    unattributed_seconds: int = 0  # recorded and shown, never invoiced (docs/billing-rules.md 5.6)
    unattributed_records: int = 0


class UsageReader(Protocol):
    def usage(self, tz: str, span: SettlementSpan) -> SpanUsage:
        """Deduplicated usage in ``span``: the firms' per (firm, day, provider, class), all with
        ``adjustment_for=None`` (settlement decides which is late), in (day, firm, provider, class)
        order, and the unattributed totals (never built into aggregates, so never validated as a
        firm's usage: a malformed unattributed window cannot stop a settlement)."""
        ...

    def conflicting_records(self, span: SettlementSpan, limit: int = 20) -> tuple[int, list[str]]:
        """(how many, the first ``limit``) record_ids delivered again with different content whose
        latest delivery arrived in the span's (previous cutoff, cutoff]."""
        ...

    def months_before(self, tz: str, first_day: date, cutoff: datetime) -> list[str]:
        """Months before ``first_day`` with usage ingested up to ``cutoff``."""
        ...


class UsageTotals(Protocol):
    """The reads of reconciliation and provider statements (besides settlement's)."""

    def seconds_by_month(self, tz: str, cutoff: datetime | None) -> dict[tuple[str, str], tuple[int, int]]:
        """(month, firm_id) -> (allocated seconds of every record, of those ingested up to ``cutoff``)."""
        ...

    def hours_by_host(self, tz: str, month: str, provider_id: str) -> list[tuple[str, str, int, int]]:
        """(gpu_class, host_id, allocated_seconds, records) of a provider's usage dated in ``month``."""
        ...
