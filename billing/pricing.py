"""Charge items: one per (firm, day, provider, gpu_class[, adjustment month]), priced exactly.

Rate selection (billing-rules.md section 2): among the rates of the item's gpu_class
with ``effective_from <= day``, the provider's own rates are used if there are any,
else the ``*`` rates; of the used ones the latest ``effective_from`` wins.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import date
from decimal import Decimal

from billing.model import (
    ANY_PROVIDER,
    BillingError,
    ChargeItem,
    InvalidBillingDataError,
    ItemKey,
    Rate,
    UsageAggregate,
)
from billing.money import charge_amount, exact_decimal, gpu_hours_of


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


def _merge(aggregates: Iterable[UsageAggregate]) -> dict[ItemKey, list[int]]:
    """Sum aggregates sharing an item key: [allocated, records, busy, energy]."""
    totals: dict[ItemKey, list[int]] = {}
    for agg in aggregates:
        key = ItemKey(agg.day, agg.firm_id, agg.provider_id, agg.gpu_class, agg.adjustment_for)
        sums = totals.setdefault(key, [0, 0, 0, 0])
        sums[0] += agg.allocated_seconds
        sums[1] += agg.record_count
        sums[2] += agg.busy_seconds
        sums[3] += agg.energy_joules
    return totals


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
    totals = _merge(aggregates)
    for key in sorted(totals, key=lambda k: k.netting_order):
        allocated_seconds, record_count, busy_seconds, energy_joules = totals[key]
        rate = card.rate_for(key.provider_id, key.gpu_class, key.day)
        if rate is None:
            unpriced.append(UnpricedUsage(key.provider_id, key.gpu_class, key.day))
            continue
        price: Decimal = rate.price_per_gpu_hour
        items.append(
            ChargeItem(
                firm_id=key.firm_id,
                day=key.day,
                provider_id=key.provider_id,
                gpu_class=key.gpu_class,
                allocated_seconds=allocated_seconds,
                gpu_hours=gpu_hours_of(allocated_seconds),
                unit_price=price,
                amount=charge_amount(allocated_seconds, price),
                record_count=record_count,
                busy_seconds=busy_seconds,
                energy_joules=energy_joules,
                adjustment_for=key.adjustment_for,
            )
        )
    if unpriced:
        raise UnpricedUsageError(unpriced)
    return items
