"""What staff, administrators and providers read about a month: export, summary, provider statement."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import date, datetime
from decimal import Decimal
from typing import Any
from zoneinfo import ZoneInfo

from billing.adapters import state
from billing.adapters.store import Store
from billing.app.ports import UsageHolds, UsageTotals
from billing.core.invoicing import Invoice, export_document
from billing.core.model import BillingError, month_of
from billing.core.money import ZERO


def settled_invoices(store: Store, month: str) -> list[Invoice]:
    """The invoices of a closed month. A month before the first settled one is closed and has none
    (docs/billing-rules.md 5.1); any other month must be settled first."""
    with store.transaction() as tx:
        settled = sorted(r.month for r in state.settlements(tx))
        if month not in settled and not (settled and month < settled[0]):
            raise BillingError(f"{month} is not settled: run 'gpumeter billing settle --month {month}' first")
        return state.invoices(tx, month=month)


def export_month(store: Store, month: str) -> dict[str, Any]:
    """A closed month's invoices as the JSON export document (docs/file-formats.md)."""
    return export_document(month, settled_invoices(store, month))


@dataclass(frozen=True, slots=True)
class ProgramLine:
    program_id: str
    year: int
    credits_this_month: Decimal
    budget: Decimal
    drawn_to_date: Decimal

    @property
    def left(self) -> Decimal:
        return max(self.budget - self.drawn_to_date, ZERO)


@dataclass(frozen=True, slots=True)
class MonthSummary:
    month: str
    currency: str
    firms_invoiced: int
    gross: Decimal
    credits: Decimal
    amount_due: Decimal
    programs: tuple[ProgramLine, ...]


def month_summary(store: Store, month: str) -> MonthSummary:
    """A settled month at a glance: totals, and per program the credits this month's invoices carry
    and what every settlement so far drew from its budget."""
    with store.transaction() as tx:
        rows = {r.month: r for r in state.settlements(tx)}
        if month not in rows:
            raise BillingError(f"{month} is not settled")
        invoices = state.invoices(tx, month=month)
        programs = state.programs(tx)
        drawn = state.drawn_state(tx).drawn_by_program
    by_program: dict[str, Decimal] = {}
    for inv in invoices:
        for c in inv.credits:
            by_program[c.program_id] = by_program.get(c.program_id, ZERO) + c.amount
    return MonthSummary(
        month=month,
        currency=rows[month].currency,
        firms_invoiced=len(invoices),
        gross=sum((i.gross for i in invoices), ZERO),
        credits=sum((i.credit_total for i in invoices), ZERO),
        amount_due=sum((i.amount_due for i in invoices), ZERO),
        programs=tuple(
            ProgramLine(pid, p.year, by_program.get(pid, ZERO), p.budget, drawn.get(pid, ZERO))
            for pid, p in sorted(programs.items())
        ),
    )


@dataclass(frozen=True, slots=True)
class ProviderStatement:
    provider_id: str
    month: str
    delivered: tuple[tuple[str, str, int, int], ...]  # (gpu_class, host_id, allocated_seconds, records)
    billed: tuple[tuple[str, int, Decimal], ...]  # (gpu_class, allocated_seconds, amount), by class
    # (host_id, gpu_uuid, seconds billed, held, excluded, pending, held seconds by reason)
    gpus: tuple[tuple[str, str, int, int, int, int, dict[str, int]], ...] = ()
    # (host_id, gpu_uuid, gpu_class, capacity, sold, unattributed, idle, unread, unsampled) seconds, from
    # the GPU windows of agents from 0.3.0 on (empty before)
    capacity: tuple[tuple[str, str, str, int, int, int, int, int, int], ...] = ()

    @property
    def billed_seconds(self) -> int:
        return sum(seconds for _, seconds, _ in self.billed)

    @property
    def billed_amount(self) -> Decimal:
        return sum((amount for _, _, amount in self.billed), ZERO)


def provider_statement(
    store: Store, usage: UsageTotals, holds: UsageHolds, provider_id: str, month: str
) -> ProviderStatement:
    """What a provider's GPUs delivered in ``month`` (each record once, by class and host) and what
    was billed on that capacity: items dated in the month, late usage on adjustment lines included."""
    with store.transaction() as tx:
        tz = state.get_meta(tx, "timezone", state.DEFAULT_TIMEZONE)
        billed = state.billed_by_class(tx, provider_id, month)
        done = state.settlements(tx)
        store_id = state.store_id(tx)
    if not billed and not usage.knows_provider(provider_id):
        raise BillingError(
            f"unknown provider {provider_id!r}: it is not in the fleet registry, sent no usage and was never "
            "billed (a provider id is the agents' provider_id, e.g. P01)"
        )
    delivered = usage.hours_by_host(tz, month, provider_id)
    capacity = tuple(usage.capacity(tz, month, provider_id))
    seq, cutoff = (done[-1].seq, done[-1].usage_cutoff) if done else (0, None)
    reasons: dict[tuple[str, str], dict[str, int]] = {}
    for h in holds.open_holds(store_id, seq, provider_id=provider_id):
        if month_of(_local_day(h.window_start, tz)) == month:
            by_reason = reasons.setdefault((h.host_id, h.gpu_uuid), {})
            by_reason[h.reason] = by_reason.get(h.reason, 0) + h.allocated_seconds
    gpus = tuple(
        (host, gpu, b, held, excl, pend, reasons.get((host, gpu), {}))
        for host, gpu, b, held, excl, pend in usage.gpu_states(tz, month, provider_id, cutoff, store_id, seq)
    )
    return ProviderStatement(
        provider_id,
        month,
        tuple(delivered),
        tuple((cls, seconds, amount) for cls, (seconds, amount) in sorted(billed.items())),
        gpus,
        capacity,
    )


def _local_day(t: datetime, tz: str) -> date:
    return t.astimezone(ZoneInfo(tz)).date()
