"""Settling a month (billing-rules.md section 5) around the pure core.

One transaction per settlement, holding the store's write lock from the first
read to the last write:

1. if the month is already settled: report the stored result, change nothing;
2. check the month order (calendar order, the month right after the last one;
   the first settlement refuses while earlier months have usage);
3. read the usage this settlement bills from ClickHouse (see clickhouse_usage);
4. price, net, build invoices (pure functions; an unpriced item stops here);
5. write the settlement, items, credits, auto-granted vouchers and invoices.
"""

from __future__ import annotations

import gc
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from typing import Protocol

from billing import state
from billing.clickhouse_usage import UNATTRIBUTED, UsageGroup, Window
from billing.invoicing import DEFAULT_CURRENCY, Invoice, build_invoices
from billing.model import (
    BillingError,
    ChargeItem,
    UsageAggregate,
    first_day_of_month,
    first_day_of_next_month,
    month_of,
    parse_month,
)
from billing.netting import net_items
from billing.pricing import RateCard, price_items
from billing.store import Store


class MonthOrderError(BillingError):
    code = "month_order"


class UsageReader(Protocol):
    def groups(self, tz: str, window: Window) -> list[UsageGroup]: ...

    def months_before(self, tz: str, first_day: date, cutoff: datetime) -> list[str]: ...

    def conflicting_records(self, window: Window, limit: int = 20) -> tuple[int, list[str]]: ...


@dataclass(frozen=True, slots=True)
class SettlementResult:
    month: str
    already_settled: bool
    invoices: tuple[Invoice, ...]
    settlement: state.SettlementRow | None  # None: a month before the first settlement (closed, empty)
    auto_granted: tuple[str, ...] = ()
    conflicting_examples: tuple[str, ...] = ()


def last_day_of_month(month: str) -> date:
    return first_day_of_next_month(month) - timedelta(days=1)


def next_month(month: str) -> str:
    return month_of(first_day_of_next_month(month))


@contextmanager
def _without_cyclic_gc() -> Iterator[None]:
    """Pause Python's cyclic garbage collector: a large settlement builds millions of acyclic objects,
    and the collector's passes over them cost about 30 % of the pure core's time. Reference counting
    still frees everything; the collector runs again afterwards."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


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

    with store.transaction() as tx, _without_cyclic_gc():
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
        tz = state.get_meta(tx, "timezone", state.DEFAULT_TIMEZONE)
        currency = state.get_meta(tx, "currency", DEFAULT_CURRENCY)
        cutoff = clock()
        if last is None:
            earlier = usage.months_before(tz, first_day_of_month(month), cutoff)
            if earlier:
                raise MonthOrderError(
                    f"cannot settle {month}: earlier month(s) never settled still have unbilled usage: "
                    f"{', '.join(earlier)}; settle {earlier[0]} first"
                )
        window = Window(
            last_day=last_day_of_month(month),
            cutoff=cutoff,
            prev_last_day=last_day_of_month(last.month) if last else None,
            prev_cutoff=last.usage_cutoff if last else None,
        )
        step("reading usage from ClickHouse (each record once, first delivery) ...")
        groups = usage.groups(tz, window)
        step(f"read {len(groups)} (firm, day, provider, class) groups")
        billable = [g for g in groups if g.firm_id != UNATTRIBUTED]
        unattributed = [g for g in groups if g.firm_id == UNATTRIBUTED]
        aggregates = [
            UsageAggregate(
                firm_id=g.firm_id, day=g.day, provider_id=g.provider_id, gpu_class=g.gpu_class,
                allocated_seconds=g.allocated_seconds, record_count=g.records, busy_seconds=g.busy_seconds,
                energy_joules=g.energy_joules, adjustment_for=None if month_of(g.day) == month else month_of(g.day),
            )
            for g in billable
        ]  # fmt: skip
        rate_card = RateCard(state.rates(tx))
        items: list[ChargeItem] = price_items(aggregates, rate_card)
        step(f"priced {len(items)} items")
        netting = net_items(
            items, state.programs(tx).values(), state.vouchers(tx).values(), state.drawn_state(tx), explain=False
        )
        step(f"netted vouchers: {len(netting.credits)} credits, {len(netting.auto_granted)} automatic grants")
        invoices = build_invoices(month, items, netting.credits, state.firms(tx), currency=currency)
        step(f"built {len(invoices)} invoices")
        conflicts, examples = usage.conflicting_records(window)
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
            records=sum(g.records for g in billable),
            unattributed_seconds=sum(g.allocated_seconds for g in unattributed),
            unattributed_records=sum(g.records for g in unattributed),
            conflicting_records=conflicts,
        )
        state.write_settlement(tx, row, items, netting.credits, netting.auto_granted, invoices, rate_card)
        step("written; committing")
        return SettlementResult(
            month, False, invoices, row, tuple(v.voucher_id for v in netting.auto_granted), tuple(examples)
        )
