"""What billing needs from the usage store, as a port: a protocol and the plain types it speaks.

Billing never writes usage and never reads it any other way. The one implementation over
ClickHouse is ``billing.adapters.clickhouse_usage``, which asks the pipeline's usage store
(each record's first delivery, defined once there); tests pass fakes.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
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
class CheckContext:
    """What the usage checks need from billing (docs/usage-checks.md): the firms it has loaded, its
    store's identity (whose hold records and decisions apply) and the last settlement's number."""

    firms: tuple[str, ...]
    store_id: str
    settled_seq: int
    horizon_days: int


@dataclass(frozen=True, slots=True)
class HeldTotal:
    """Held usage of one (reason, firm, day, provider, class): never billed while held."""

    reason: str  # a code of docs/usage-checks.md
    firm_id: str
    day: date
    provider_id: str
    gpu_class: str
    allocated_seconds: int
    records: int
    carried: bool  # held by an earlier settlement and still held


@dataclass(frozen=True, slots=True)
class SpanUsage:
    """The deduplicated usage of one span: what firms used, and what no firm could be named for."""

    aggregates: list[UsageAggregate]  # per (firm, day, provider, class), adjustment_for None, in that order
    unattributed_seconds: int = 0  # recorded and shown, never invoiced (docs/billing-rules.md 5.6)
    unattributed_records: int = 0
    held: list[HeldTotal] = field(default_factory=list)  # checked reads only
    released_records: int = 0  # records earlier settlements held that bill now
    fleet_version: int = 0  # the registry version the checks used (0: none loaded)


class UsageReader(Protocol):
    def checked_usage(self, tz: str, span: SettlementSpan, context: CheckContext) -> SpanUsage:
        """``usage`` judged by the usage checks, with the records earlier settlements held and that
        now bill (as the span's own, ``adjustment_for`` None); what is held comes in ``held``. What
        it decided is kept until ``record_holds`` writes it."""
        ...

    def record_holds(self, store_id: str, seq: int, month: str) -> None:
        """Write what the last ``checked_usage`` decided, as settlement ``seq`` of ``month``."""
        ...

    def discard_holds_after(self, store_id: str, settled_seq: int) -> None:
        """Forget what settlements after ``settled_seq`` wrote (an attempt that did not commit)."""
        ...

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

    def months_before(
        self, tz: str, first_day: date, cutoff: datetime, context: CheckContext | None = None
    ) -> list[str]:
        """Months before ``first_day`` with usage ingested up to ``cutoff`` (with ``context``: usage
        that would bill, not held)."""
        ...


# (host_id, gpu_uuid, gpu_class, capacity, allocated, unattributed, idle, unread, unsampled) seconds
CapacityRow = tuple[str, str, str, int, int, int, int, int, int]


class UsageTotals(Protocol):
    """The reads of reconciliation and provider statements (besides settlement's)."""

    def seconds_by_month(
        self, tz: str, cutoff: datetime | None, store_id: str = "", settled_seq: int = 0
    ) -> dict[tuple[str, str], tuple[int, int, int, int]]:
        """(month, firm_id) -> allocated seconds of (every record, those ingested up to ``cutoff``, of
        those the ones the store's settlements up to ``settled_seq`` hold, and the ones they excluded)."""
        ...

    def gpu_states(
        self, tz: str, month: str, provider_id: str, cutoff: datetime | None, store_id: str, settled_seq: int
    ) -> list[tuple[str, str, int, int, int, int]]:
        """(host_id, gpu_uuid, seconds billed, held, excluded, pending) of a provider's usage of ``month``."""
        ...

    def hours_by_host(self, tz: str, month: str, provider_id: str) -> list[tuple[str, str, int, int]]:
        """(gpu_class, host_id, allocated_seconds, records) of a provider's usage dated in ``month``."""
        ...

    def capacity(self, tz: str, month: str, provider_id: str) -> list[CapacityRow]:
        """(host_id, gpu_uuid, gpu_class, capacity, allocated, unattributed, idle, unread, unsampled)
        seconds of a provider's GPU windows dated in ``month`` (agents from 0.3.0 on)."""
        ...

    def knows_provider(self, provider_id: str) -> bool:
        """Whether the provider is in the fleet registry or sent any usage, ever."""
        ...


@dataclass(frozen=True, slots=True)
class HeldRecord:
    """One record a settlement holds (docs/usage-checks.md)."""

    record_id: str
    state: str
    reason: str
    firm_id: str
    provider_id: str
    host_id: str
    gpu_uuid: str
    gpu_class: str
    window_start: datetime
    allocated_seconds: int


class UsageHolds(Protocol):
    """Held records and staff's decisions on them, kept beside the usage."""

    def open_holds(
        self,
        store_id: str,
        settled_seq: int,
        reasons: Sequence[str] = (),
        record_ids: Sequence[str] = (),
        provider_id: str = "",
    ) -> list[HeldRecord]: ...

    def decisions_after(self, store_id: str, after: datetime | None) -> dict[str, tuple[str, str, datetime, str]]: ...

    def decide(
        self, store_id: str, record_ids: Sequence[str], decision: str, by: str, why: str, at: datetime
    ) -> None: ...
