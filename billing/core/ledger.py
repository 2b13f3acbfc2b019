"""Receivables: payments against invoices, statuses and aging as of a given date.

Events are replayed in date order up to ``as_of``: on each day, invoices issued that
day are booked first (a firm's credit balance pays them down at once, oldest first),
then that day's payments in (paid_on, reference, firm_id) order. A payment settles
the firm's open invoices oldest first by (issue_date, invoice_id); the leftover is the
firm's credit balance. An invoice's ``amount_due`` never changes; what is still owed is
``outstanding``.
"""

from __future__ import annotations

from collections import defaultdict, deque
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import date
from decimal import Decimal
from typing import Protocol

from billing.core.model import InvalidBillingDataError, is_whole_cents
from billing.core.money import ZERO, exact_decimal

OPEN, PARTIALLY_PAID, PAID, OVERDUE = "open", "partially_paid", "paid", "overdue"
NOT_DUE = "not_due"
AGING_BUCKETS = (NOT_DUE, "0-30", "31-60", "61-90", "90+")


class Receivable(Protocol):
    """What the ledger needs of an invoice (billing.core.invoicing.Invoice fits)."""

    @property
    def invoice_id(self) -> str: ...
    @property
    def firm_id(self) -> str: ...
    @property
    def issue_date(self) -> date: ...
    @property
    def due_date(self) -> date: ...
    @property
    def amount_due(self) -> Decimal: ...


def _check_amount(amount: object, what: str, *, positive: bool) -> None:
    if not isinstance(amount, Decimal) or not amount.is_finite() or not is_whole_cents(amount):
        raise InvalidBillingDataError(f"{what} must be a Decimal with at most 2 places, got {amount!r}")
    if amount < 0 or (positive and amount == 0):
        raise InvalidBillingDataError(f"{what} must be {'> 0' if positive else '>= 0'}, got {amount}")


@dataclass(frozen=True, slots=True)
class Payment:
    firm_id: str
    amount: Decimal
    paid_on: date
    reference: str  # unique per firm

    def __post_init__(self) -> None:
        _check_amount(self.amount, f"payment {self.reference} amount", positive=True)


@dataclass(frozen=True, slots=True)
class Allocation:
    """``amount`` of payment ``reference`` applied to ``invoice_id`` on ``applied_on``.

    ``applied_on`` is later than the payment's date when the money waited as credit
    balance for an invoice issued after it.
    """

    firm_id: str
    reference: str
    invoice_id: str
    amount: Decimal
    applied_on: date


@dataclass(slots=True)
class _Leftover:
    """Unspent part of a payment, waiting as credit balance (mutable, private)."""

    reference: str
    amount: Decimal


@dataclass(frozen=True, slots=True)
class InvoiceStatus:
    invoice_id: str
    firm_id: str
    issue_date: date
    due_date: date
    amount_due: Decimal
    paid: Decimal
    outstanding: Decimal
    status: str  # open | partially_paid | paid | overdue
    days_past_due: int  # (as_of - due_date).days; negative while not yet due


@dataclass(frozen=True, slots=True)
class LedgerResult:
    as_of: date
    statuses: tuple[InvoiceStatus, ...]  # sorted by (firm_id, issue_date, invoice_id)
    allocations: tuple[Allocation, ...]  # in the order they happened
    credit_balances: dict[str, Decimal] = field(default_factory=dict)  # firms with > 0 only


@dataclass(frozen=True, slots=True)
class AgingReport:
    """Outstanding money by days past due. ``not_due``: not yet due (days_past_due < 0);
    ``0-30`` includes the due date itself (day 0); ``90+`` means 91 days or more."""

    as_of: date
    by_firm: dict[str, dict[str, Decimal]]
    totals: dict[str, Decimal]


def status_of(outstanding: Decimal, paid: Decimal, due_date: date, as_of: date) -> str:
    """Overdue means as_of is strictly after due_date with something still owed."""
    if outstanding == 0:
        return PAID
    if as_of > due_date:
        return OVERDUE
    return PARTIALLY_PAID if paid > 0 else OPEN


def bucket_of(days_past_due: int) -> str:
    if days_past_due < 0:
        return NOT_DUE
    if days_past_due <= 30:
        return "0-30"
    if days_past_due <= 60:
        return "31-60"
    if days_past_due <= 90:
        return "61-90"
    return "90+"


def _check_inputs(invoices: list[Receivable], payments: list[Payment]) -> None:
    seen_invoices: set[str] = set()
    for invoice in invoices:
        if invoice.invoice_id in seen_invoices:
            raise InvalidBillingDataError(f"invoice {invoice.invoice_id} appears twice")
        seen_invoices.add(invoice.invoice_id)
        _check_amount(invoice.amount_due, f"invoice {invoice.invoice_id} amount_due", positive=False)
    seen_payments: set[tuple[str, str]] = set()
    for payment in payments:
        key = (payment.firm_id, payment.reference)
        if key in seen_payments:
            raise InvalidBillingDataError(
                f"payment reference {payment.reference} of firm {payment.firm_id} appears twice"
            )
        seen_payments.add(key)


@exact_decimal
def apply_payments(invoices: Iterable[Receivable], payments: Iterable[Payment], as_of: date) -> LedgerResult:
    """Replay invoices and payments dated on or before ``as_of``.

    Invoices issued after ``as_of`` are listed as ``open`` with nothing paid (not yet
    issued, so no credit balance has touched them); payments after ``as_of`` are ignored.
    """
    invoice_list = list(invoices)
    payment_list = list(payments)
    _check_inputs(invoice_list, payment_list)

    outstanding: dict[str, Decimal] = {inv.invoice_id: inv.amount_due for inv in invoice_list}
    open_by_firm: dict[str, list[Receivable]] = defaultdict(list)  # issued, oldest first
    balance_by_firm: dict[str, deque[_Leftover]] = defaultdict(deque)  # oldest payment first
    allocations: list[Allocation] = []

    def allocate(firm_id: str, reference: str, invoice: Receivable, amount: Decimal, on: date) -> None:
        outstanding[invoice.invoice_id] -= amount
        allocations.append(Allocation(firm_id, reference, invoice.invoice_id, amount, on))

    # (day, 0 = invoice issued / 1 = payment, tiebreak ids) - a total order
    events: list[tuple[date, int, str, str, Receivable | Payment]] = []
    for inv in invoice_list:
        if inv.issue_date <= as_of:
            events.append((inv.issue_date, 0, inv.invoice_id, inv.firm_id, inv))
    for pay in payment_list:
        if pay.paid_on <= as_of:
            events.append((pay.paid_on, 1, pay.reference, pay.firm_id, pay))
    events.sort(key=lambda event: event[:4])

    for day, _, _, firm_id, event in events:
        if isinstance(event, Payment):
            left = event.amount
            for invoice in open_by_firm[firm_id]:
                take = min(left, outstanding[invoice.invoice_id])
                if take > 0:
                    allocate(firm_id, event.reference, invoice, take, day)
                    left -= take
            if left > 0:
                balance_by_firm[firm_id].append(_Leftover(event.reference, left))
        else:
            open_by_firm[firm_id].append(event)
            open_by_firm[firm_id].sort(key=lambda inv: (inv.issue_date, inv.invoice_id))
            fifo = balance_by_firm[firm_id]
            while fifo and outstanding[event.invoice_id] > 0:
                leftover = fifo[0]
                take = min(leftover.amount, outstanding[event.invoice_id])
                allocate(firm_id, leftover.reference, event, take, day)
                leftover.amount -= take
                if leftover.amount == 0:
                    fifo.popleft()
        open_by_firm[firm_id] = [i for i in open_by_firm[firm_id] if outstanding[i.invoice_id] > 0]

    statuses = tuple(
        InvoiceStatus(
            invoice_id=inv.invoice_id,
            firm_id=inv.firm_id,
            issue_date=inv.issue_date,
            due_date=inv.due_date,
            amount_due=inv.amount_due,
            paid=inv.amount_due - outstanding[inv.invoice_id],
            outstanding=outstanding[inv.invoice_id],
            status=status_of(
                outstanding[inv.invoice_id],
                inv.amount_due - outstanding[inv.invoice_id],
                inv.due_date,
                as_of,
            ),
            days_past_due=(as_of - inv.due_date).days,
        )
        for inv in sorted(invoice_list, key=lambda i: (i.firm_id, i.issue_date, i.invoice_id))
    )
    credit_balances: dict[str, Decimal] = {}
    for firm_id in sorted(balance_by_firm):
        total = sum((leftover.amount for leftover in balance_by_firm[firm_id]), ZERO)
        if total > 0:
            credit_balances[firm_id] = total
    return LedgerResult(as_of, statuses, tuple(allocations), credit_balances)


@exact_decimal
def aging(ledger: LedgerResult) -> AgingReport:
    """Bucket what is still owed (outstanding > 0) by days past due at ``ledger.as_of``."""
    by_firm: dict[str, dict[str, Decimal]] = {}
    totals = {bucket: ZERO for bucket in AGING_BUCKETS}
    for status in ledger.statuses:
        if status.outstanding <= 0:
            continue
        row = by_firm.setdefault(status.firm_id, {bucket: ZERO for bucket in AGING_BUCKETS})
        bucket = bucket_of(status.days_past_due)
        row[bucket] += status.outstanding
        totals[bucket] += status.outstanding
    return AgingReport(ledger.as_of, dict(sorted(by_firm.items())), totals)
