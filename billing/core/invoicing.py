"""Invoices of one settled month (docs/billing-rules.md section 4) and their export (docs/billing-rules.md 4.7)."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import date, timedelta
from decimal import Decimal
from fractions import Fraction
from typing import Any

from billing.core.model import (
    DEFAULT_PAYMENT_TERMS_DAYS,
    ChargeItem,
    Credit,
    Firm,
    InvalidBillingDataError,
    ItemKey,
    first_day_of_next_month,
    month_of,
    parse_month,
)
from billing.core.money import SECONDS_PER_HOUR, ZERO, exact_decimal, format_decimal, format_gpu_hours, format_money

DEFAULT_CURRENCY = "CNY"


@dataclass(frozen=True, slots=True)
class InvoiceLine:
    provider_id: str
    gpu_class: str
    unit_price: Decimal
    gpu_hours: Fraction  # exact sum of the items' hours
    amount: Decimal  # sum of the items' (already rounded) amounts
    adjustment_for: str | None  # "YYYY-MM" for late usage of a closed month
    allocated_seconds: int
    record_count: int
    busy_seconds: int
    energy_joules: int
    item_count: int

    @property
    def sort_key(self) -> tuple[int, str, str, str, Decimal]:
        """Own lines first, then adjustment lines by month; then provider, class, price."""
        late = self.adjustment_for is not None
        return (int(late), self.adjustment_for or "", self.provider_id, self.gpu_class, self.unit_price)


@dataclass(frozen=True, slots=True)
class InvoiceCredit:
    voucher_id: str
    program_id: str
    amount: Decimal


@dataclass(frozen=True, slots=True)
class Invoice:
    invoice_id: str
    firm_id: str
    month: str
    issue_date: date
    due_date: date
    currency: str
    lines: tuple[InvoiceLine, ...]
    credits: tuple[InvoiceCredit, ...]
    gross: Decimal
    credit_total: Decimal
    amount_due: Decimal


def invoice_id_for(month: str, firm_id: str) -> str:
    return f"INV-{month}-{firm_id}"


def _check_belongs(month: str, item: ChargeItem) -> None:
    item_month = month_of(item.day)
    if item.adjustment_for is None and item_month != month:
        raise InvalidBillingDataError(
            f"item {item.key} is dated {item_month} but not marked as an adjustment of {month}"
        )
    if item.adjustment_for is not None and not item.adjustment_for < month:
        raise InvalidBillingDataError(f"adjustment item {item.key} must belong to a month before {month}")


def _lines(items: list[ChargeItem]) -> tuple[InvoiceLine, ...]:
    # (provider, class, price, adjustment_for) -> [amount, allocated, records, busy, energy, items]
    groups: dict[tuple[str, str, Decimal, str | None], list[Any]] = {}
    for item in items:
        key = (item.provider_id, item.gpu_class, item.unit_price, item.adjustment_for)
        sums = groups.get(key)
        if sums is None:
            groups[key] = [item.amount, item.allocated_seconds, item.record_count, item.busy_seconds,
                           item.energy_joules, 1]  # fmt: skip
        else:
            sums[0] += item.amount
            sums[1] += item.allocated_seconds
            sums[2] += item.record_count
            sums[3] += item.busy_seconds
            sums[4] += item.energy_joules
            sums[5] += 1
    lines = [
        InvoiceLine(
            provider_id=provider_id,
            gpu_class=gpu_class,
            unit_price=unit_price,
            gpu_hours=Fraction(allocated, SECONDS_PER_HOUR),
            amount=amount,
            adjustment_for=adjustment_for,
            allocated_seconds=allocated,
            record_count=records,
            busy_seconds=busy,
            energy_joules=energy,
            item_count=count,
        )
        for (provider_id, gpu_class, unit_price, adjustment_for), (
            amount,
            allocated,
            records,
            busy,
            energy,
            count,
        ) in groups.items()
    ]
    return tuple(sorted(lines, key=lambda line: line.sort_key))


def _credits(credits: list[Credit]) -> tuple[InvoiceCredit, ...]:
    by_voucher: dict[tuple[str, str], Decimal] = defaultdict(lambda: ZERO)
    for credit in credits:
        by_voucher[(credit.voucher_id, credit.program_id)] += credit.amount
    return tuple(
        InvoiceCredit(voucher_id, program_id, amount) for (voucher_id, program_id), amount in sorted(by_voucher.items())
    )


@exact_decimal
def build_invoices(
    month: str,
    items: Iterable[ChargeItem],
    credits: Iterable[Credit],
    firms: Iterable[Firm] | Mapping[str, Firm],
    *,
    currency: str = DEFAULT_CURRENCY,
) -> tuple[Invoice, ...]:
    """One invoice per firm with items in this settlement of ``month``, sorted by firm_id.

    ``items`` are the month's own items plus late items of closed months
    (``adjustment_for`` set); ``credits`` are the netting credits on those items.
    A firm missing from ``firms`` gets DEFAULT_PAYMENT_TERMS_DAYS (30).
    """
    parse_month(month)
    firm_by_id = dict(firms) if isinstance(firms, Mapping) else {f.firm_id: f for f in firms}
    items_by_key: dict[ItemKey, ChargeItem] = {}
    for item in items:  # the order does not matter: invoices and their lines are sorted, sums are exact
        _check_belongs(month, item)
        key = item.key
        if key in items_by_key:
            raise InvalidBillingDataError(f"two charge items share the key {key}")
        items_by_key[key] = item

    credited: dict[ItemKey, Decimal] = defaultdict(lambda: ZERO)
    credits_by_firm: dict[str, list[Credit]] = defaultdict(list)
    for credit in credits:
        credited_item = items_by_key.get(credit.item)
        if credited_item is None:
            raise InvalidBillingDataError(f"credit from {credit.voucher_id} on unknown item {credit.item}")
        credited[credit.item] += credit.amount
        if credited[credit.item] > credited_item.amount:
            raise InvalidBillingDataError(f"credits on item {credit.item} exceed its amount")
        credits_by_firm[credit.firm_id].append(credit)

    items_by_firm: dict[str, list[ChargeItem]] = defaultdict(list)
    for item in items_by_key.values():
        items_by_firm[item.firm_id].append(item)

    issue_date = first_day_of_next_month(month)
    invoices: list[Invoice] = []
    for firm_id in sorted(items_by_firm):
        firm = firm_by_id.get(firm_id)
        terms_days = firm.payment_terms_days if firm else DEFAULT_PAYMENT_TERMS_DAYS
        lines = _lines(items_by_firm[firm_id])
        invoice_credits = _credits(credits_by_firm[firm_id])
        gross = sum((line.amount for line in lines), ZERO)
        credit_total = sum((c.amount for c in invoice_credits), ZERO)
        invoices.append(
            Invoice(
                invoice_id=invoice_id_for(month, firm_id),
                firm_id=firm_id,
                month=month,
                issue_date=issue_date,
                due_date=issue_date + timedelta(days=terms_days),
                currency=currency,
                lines=lines,
                credits=invoice_credits,
                gross=gross,
                credit_total=credit_total,
                amount_due=gross - credit_total,
            )
        )
    return tuple(invoices)


@exact_decimal
def to_export_dict(invoice: Invoice) -> dict[str, Any]:
    """One invoice in the JSON shape of the export (docs/billing-rules.md 4.7, docs/file-formats.md)."""
    return {
        "invoice_id": invoice.invoice_id,
        "firm_id": invoice.firm_id,
        "month": invoice.month,
        "issue_date": invoice.issue_date.isoformat(),
        "due_date": invoice.due_date.isoformat(),
        "currency": invoice.currency,
        "lines": [
            {
                "provider_id": line.provider_id,
                "gpu_class": line.gpu_class,
                "unit_price": format_decimal(line.unit_price),
                "gpu_hours": format_gpu_hours(line.gpu_hours),
                "amount": format_money(line.amount),
                "adjustment_for": line.adjustment_for,
            }
            for line in invoice.lines
        ],
        "credits": [
            {
                "voucher_id": credit.voucher_id,
                "program_id": credit.program_id,
                "amount": format_money(credit.amount),
            }
            for credit in invoice.credits
        ],
        "gross": format_money(invoice.gross),
        "credit_total": format_money(invoice.credit_total),
        "amount_due": format_money(invoice.amount_due),
    }


@exact_decimal
def export_document(month: str, invoices: Iterable[Invoice]) -> dict[str, Any]:
    """``{"month": ..., "invoices": [...]}`` with invoices sorted by firm_id."""
    parse_month(month)
    chosen = sorted(invoices, key=lambda inv: (inv.firm_id, inv.invoice_id))
    for invoice in chosen:
        if invoice.month != month:
            raise InvalidBillingDataError(f"invoice {invoice.invoice_id} is not of month {month}")
    return {"month": month, "invoices": [to_export_dict(invoice) for invoice in chosen]}
