"""Charge items: one per (firm, day, provider, gpu_class[, adjustment month]), priced exactly.

Rate selection (docs/billing-rules.md 2.2): among the rates of the item's gpu_class
with ``effective_from <= day``, the provider's own rates are used if there are any,
else the ``*`` rates; of the used ones the latest ``effective_from`` wins.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import date
from decimal import Decimal

from billing.core.model import (
    ANY_PROVIDER,
    BillingError,
    ChargeItem,
    InvalidBillingDataError,
    Rate,
    UsageAggregate,
)
from billing.core.money import charge_amount, exact_decimal


@dataclass(frozen=True, slots=True, order=True)
class UnpricedUsage:
    provider_id: str
    gpu_class: str
    day: date


class UnpricedUsageError(BillingError):
    """Some usage has no rate: the settlement must stop and write nothing."""

    code = "unpriced_usage"

    def __init__(self, unpriced: Iterable[UnpricedUsage]) -> None:
        self.unpriced: tuple[UnpricedUsage, ...] = tuple(sorted(set(unpriced)))
        listing = ", ".join(
            f"(provider={u.provider_id}, gpu_class={u.gpu_class}, day={u.day.isoformat()})" for u in self.unpriced
        )
        super().__init__(f"no price for {len(self.unpriced)} usage key(s): {listing}")


class RateCardConflictError(InvalidBillingDataError):
    code = "rate_card_conflict"


class RateCard:
    """Rates indexed for lookup. Two rows with the same (gpu_class, provider,
    effective_from) but different prices are a conflict and are refused."""

    __slots__ = ("_by_class", "_memo")

    def __init__(self, rates: Iterable[Rate]) -> None:
        unique: dict[tuple[str, str, date], Rate] = {}
        for rate in rates:
            key = (rate.gpu_class, rate.provider, rate.effective_from)
            seen = unique.get(key)
            if seen is not None and seen.price_per_gpu_hour != rate.price_per_gpu_hour:
                raise RateCardConflictError(
                    f"two prices for gpu_class={key[0]} provider={key[1]} "
                    f"effective_from={key[2].isoformat()}: "
                    f"{seen.price_per_gpu_hour} and {rate.price_per_gpu_hour}"
                )
            unique[key] = rate
        by_class: dict[str, list[Rate]] = defaultdict(list)
        for key in sorted(unique):
            by_class[key[0]].append(unique[key])
        self._by_class: dict[str, tuple[Rate, ...]] = {k: tuple(v) for k, v in by_class.items()}
        self._memo: dict[tuple[str, str, date], Rate | None] = {}

    def rate_for(self, provider_id: str, gpu_class: str, day: date) -> Rate | None:
        """The rate in effect, or None when the usage is unpriced (memoised: the card is immutable)."""
        key = (provider_id, gpu_class, day)
        if key not in self._memo:
            self._memo[key] = self._select(provider_id, gpu_class, day)
        return self._memo[key]

    def _select(self, provider_id: str, gpu_class: str, day: date) -> Rate | None:
        in_effect = [r for r in self._by_class.get(gpu_class, ()) if r.effective_from <= day]
        own = [r for r in in_effect if r.provider == provider_id]
        used = own or [r for r in in_effect if r.provider == ANY_PROVIDER]
        if not used:
            return None
        return max(used, key=lambda r: r.effective_from)


_Key = tuple[date, str, str, str, str]  # ItemKey.netting_order


def _merge(aggregates: Iterable[UsageAggregate]) -> tuple[dict[_Key, UsageAggregate], dict[_Key, list[int]]]:
    """Sum aggregates sharing an item key: (one aggregate of each key, [allocated, records, busy, energy])."""
    usage: dict[_Key, UsageAggregate] = {}
    totals: dict[_Key, list[int]] = {}
    for agg in aggregates:
        key = (agg.day, agg.firm_id, agg.provider_id, agg.gpu_class, agg.adjustment_for or "")
        sums = totals.get(key)
        if sums is None:
            usage[key] = agg
            totals[key] = [agg.allocated_seconds, agg.record_count, agg.busy_seconds, agg.energy_joules]
        else:
            sums[0] += agg.allocated_seconds
            sums[1] += agg.record_count
            sums[2] += agg.busy_seconds
            sums[3] += agg.energy_joules
    return usage, totals


@exact_decimal
def price_items(aggregates: Iterable[UsageAggregate], rates: Iterable[Rate] | RateCard) -> list[ChargeItem]:
    """Price usage into charge items, sorted in netting order.

    Aggregates with the same (firm, day, provider, gpu_class, adjustment_for) are summed
    into one item before pricing (partial sums of the same records' windows).
    Raises UnpricedUsageError listing every unpriced (provider, gpu_class, day), sorted.
    """
    card = rates if isinstance(rates, RateCard) else RateCard(rates)
    items: list[ChargeItem] = []
    unpriced: list[UnpricedUsage] = []
    usage_of, totals = _merge(aggregates)
    for key in sorted(totals):
        usage = usage_of[key]
        allocated_seconds, record_count, busy_seconds, energy_joules = totals[key]
        rate = card.rate_for(usage.provider_id, usage.gpu_class, usage.day)
        if rate is None:
            unpriced.append(UnpricedUsage(usage.provider_id, usage.gpu_class, usage.day))
            continue
        price: Decimal = rate.price_per_gpu_hour
        amount = charge_amount(allocated_seconds, price)
        items.append(
            ChargeItem.priced(usage, allocated_seconds, record_count, busy_seconds, energy_joules, price, amount)
        )
    if unpriced:
        raise UnpricedUsageError(unpriced)
    return items
