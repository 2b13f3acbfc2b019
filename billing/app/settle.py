"""Settling a month (docs/billing-rules.md section 5) around the pure core.

One transaction per settlement, holding the store's write lock from the first
read to the last write:

1. if the month is already settled: report the stored result, change nothing;
2. check the month can be settled: a rate card is loaded, the month has ended in the
   billing time zone, months in calendar order (the month right after the last one;
   the first settlement refuses while earlier months have usage);
3. read the usage this settlement bills through the usage port (``ports.UsageReader``);
4. price, net, build invoices (pure functions; an unpriced item stops here);
5. write the settlement, items, credits, auto-granted vouchers and invoices.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from datetime import time as dt_time
from zoneinfo import ZoneInfo

from billing.adapters import state
from billing.adapters.store import Store
from billing.app.ports import CheckContext, HeldTotal, SettlementSpan, UsageReader
from billing.core.fastpath import paused_cyclic_gc
from billing.core.invoicing import DEFAULT_CURRENCY, Invoice, build_invoices
from billing.core.model import (
    BillingError,
    ChargeItem,
    first_day_of_month,
    first_day_of_next_month,
    month_of,
    parse_month,
)
from billing.core.netting import net_items
from billing.core.pricing import RateCard, price_items

# usage dated more than this many days before the settled month's first day is held (docs/usage-checks.md
# 3.2); the rate card's usage_horizon_days sets another
DEFAULT_HORIZON_DAYS = 92


class MonthOrderError(BillingError):
    code = "month_order"


class NotReadyError(BillingError):
    """A settlement asked for too early: the month has not ended, or there is no rate card."""

    code = "not_ready"


@dataclass(frozen=True, slots=True)
class SettlementResult:
    month: str
    already_settled: bool
    invoices: tuple[Invoice, ...]
    settlement: state.SettlementRow | None  # None: a month before the first settlement (closed, empty)
    auto_granted: tuple[str, ...] = ()
    conflicting_examples: tuple[str, ...] = ()
    held: tuple[HeldTotal, ...] = ()  # what this settlement holds (docs/usage-checks.md)
    released_records: int = 0  # records earlier settlements held that this one bills
    fleet_version: int = 0


def last_day_of_month(month: str) -> date:
    return first_day_of_next_month(month) - timedelta(days=1)


def next_month(month: str) -> str:
    return month_of(first_day_of_next_month(month))


def settle_month(
    store: Store,
    usage: UsageReader,
    month: str,
    clock: Callable[[], datetime] = lambda: datetime.now(UTC),
    progress: Callable[[str], None] = lambda _: None,
) -> SettlementResult:
    """Settle ``month`` (see the module docstring); ``progress`` hears one line per step with its time."""
    parse_month(month)
    started = time.perf_counter()

    def step(text: str) -> None:
        progress(f"[{time.perf_counter() - started:7.1f}s] {text}")

    with store.transaction() as tx, paused_cyclic_gc():
        tx.lock_for_settlement()
        done = state.settlements(tx)
        by_month = {s.month: s for s in done}
        if month in by_month:
            return SettlementResult(month, True, tuple(state.invoices(tx, month=month)), by_month[month])
        if done and month < done[0].month:
            return SettlementResult(month, True, (), None)
        last = done[-1] if done else None
        if last is not None and month != next_month(last.month):
            raise MonthOrderError(
                f"months settle in calendar order: the last settled month is {last.month}, "
                f"so the next one to settle is {next_month(last.month)}, not {month}"
            )
        if not state.rates(tx):
            raise NotReadyError(
                f"cannot settle {month}: no rate card is loaded, so nothing has a price and the billing time "
                "zone is not set; load one first: gpumeter billing load --ratecard FILE"
            )
        tz = state.get_meta(tx, "timezone", state.DEFAULT_TIMEZONE)
        currency = state.get_meta(tx, "currency", DEFAULT_CURRENCY)
        cutoff = clock()
        ends = datetime.combine(first_day_of_next_month(month), dt_time(0), ZoneInfo(tz))
        if cutoff < ends:
            raise NotReadyError(
                f"cannot settle {month}: it has not ended yet (it ends at {ends.isoformat()}, {tz}); settling "
                "closes it for good, so settle it after it ends"
            )
        firms = state.firms(tx)
        context = CheckContext(
            firms=tuple(sorted(firms)),
            store_id=state.store_id(tx),
            settled_seq=last.seq if last else 0,
            horizon_days=int(state.get_meta(tx, "usage_horizon_days", str(DEFAULT_HORIZON_DAYS))),
        )
        usage.discard_holds_after(context.store_id, context.settled_seq)  # a failed attempt's, if any
        if last is None:
            earlier = usage.months_before(tz, first_day_of_month(month), cutoff, context)
            if earlier:
                raise MonthOrderError(
                    f"cannot settle {month}: earlier month(s) never settled still have unbilled usage: "
                    f"{', '.join(earlier)}; settle {earlier[0]} first"
                )
        span = SettlementSpan(
            last_day=last_day_of_month(month),
            cutoff=cutoff,
            prev_last_day=last_day_of_month(last.month) if last else None,
            prev_cutoff=last.usage_cutoff if last else None,
        )
        step("reading usage from ClickHouse (each record once, first delivery, checked) ...")
        read = usage.checked_usage(tz, span, context)
        held_records = sum(h.records for h in read.held)
        step(
            f"read {len(read.aggregates)} (firm, day, provider, class) groups; held {held_records} record(s), "
            f"{read.released_records} held before bill now (fleet registry version {read.fleet_version or 'none'})"
        )
        aggregates = [  # late usage of a closed month: adjustment lines (docs/billing-rules.md 5.4)
            g if month_of(g.day) == month else dataclasses.replace(g, adjustment_for=month_of(g.day))
            for g in read.aggregates
        ]
        rate_card = RateCard(state.rates(tx))
        items: list[ChargeItem] = price_items(aggregates, rate_card)
        step(f"priced {len(items)} items")
        netting = net_items(
            items, state.programs(tx).values(), state.vouchers(tx).values(), state.drawn_state(tx), explain=False
        )
        step(f"netted vouchers: {len(netting.credits)} credits, {len(netting.auto_granted)} automatic grants")
        invoices = build_invoices(month, items, netting.credits, firms, currency=currency)
        step(f"built {len(invoices)} invoices")
        conflicts, examples = usage.conflicting_records(span)
        step(f"checked re-deliveries: {conflicts} with different content")
        row = state.SettlementRow(
            month=month,
            seq=(last.seq + 1) if last else 1,
            usage_cutoff=cutoff,
            settled_at=cutoff,
            timezone=tz,
            currency=currency,
            items=len(items),
            invoices=len(invoices),
            records=sum(g.record_count for g in aggregates),
            unattributed_seconds=read.unattributed_seconds,  # never invoiced (docs/billing-rules.md 5.6)
            unattributed_records=read.unattributed_records,
            conflicting_records=conflicts,
        )
        usage.record_holds(context.store_id, row.seq, month)  # before the commit: a failed one is discarded
        state.write_settlement(tx, row, items, netting.credits, netting.auto_granted, invoices, rate_card)
        state.write_settlement_holds(tx, month, read.fleet_version, read.held, read.released_records)
        step("written; committing")
        return SettlementResult(
            month, False, invoices, row, tuple(v.voucher_id for v in netting.auto_granted), tuple(examples),
            tuple(read.held), read.released_records, read.fleet_version,
        )  # fmt: skip
