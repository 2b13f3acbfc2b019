"""Recording payments and reading receivables (docs/billing-rules.md section 4)."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import date, datetime
from decimal import Decimal
from zoneinfo import ZoneInfo

from billing.adapters import state
from billing.adapters.store import Store
from billing.core.invoicing import Invoice
from billing.core.ledger import AgingReport, Allocation, LedgerResult, Payment, aging, apply_payments
from billing.core.model import BillingError
from billing.core.money import ZERO


@dataclass(frozen=True, slots=True)
class PaymentRecorded:
    payment: Payment
    already_recorded: bool  # the same payment was recorded before: nothing changed
    allocations: tuple[Allocation, ...]  # what this payment paid, invoice by invoice
    credit_balance: Decimal  # the firm's money waiting for its next invoices


def record_payment(store: Store, payment: Payment, now: datetime) -> PaymentRecorded:
    """Record ``payment`` unless the same one is recorded already, then replay the firm's ledger.

    Refused: an unknown firm; a date after today (in the billing time zone); a reference already
    recorded for the firm with another amount or date (a reference is unique per firm). The ledger
    is replayed as of today, so the answer shows where this payment went.
    """
    with store.transaction() as tx:
        known = state.firms(tx).keys() | {i.firm_id for i in state.invoices(tx)}
        if payment.firm_id not in known:
            raise BillingError(f"unknown firm {payment.firm_id!r}: load it with 'gpumeter billing load --firms'")
        today = now.astimezone(ZoneInfo(state.get_meta(tx, "timezone", state.DEFAULT_TIMEZONE))).date()
        if payment.paid_on > today:
            raise BillingError(
                f"payment date {payment.paid_on} is after today ({today} in the billing time zone): record a "
                "payment on or after the day the money arrived, with the day it arrived"
            )
        existing = {(p.firm_id, p.reference): p for p in state.payments(tx)}
        old = existing.get((payment.firm_id, payment.reference))
        if old is not None and old != payment:
            raise BillingError(
                f"reference {payment.reference!r} is already recorded for {payment.firm_id} with amount "
                f"{old.amount} on {old.paid_on}; use a new reference for a new payment"
            )
        if old is None:
            state.put_payment(tx, payment, now)
        ledger = apply_payments(
            state.invoices(tx, firm_id=payment.firm_id), state.payments(tx), max(payment.paid_on, today)
        )
    mine = tuple(a for a in ledger.allocations if a.reference == payment.reference and a.firm_id == payment.firm_id)
    return PaymentRecorded(payment, old is not None, mine, ledger.credit_balances.get(payment.firm_id, ZERO))


def receivables(store: Store, as_of: date) -> tuple[list[Invoice], LedgerResult]:
    """Every invoice, and the ledger of every payment applied as of ``as_of``."""
    with store.transaction() as tx:
        invoices = state.invoices(tx)
        return invoices, apply_payments(invoices, state.payments(tx), as_of)


def aging_report(store: Store, as_of: date) -> AgingReport:
    """What each firm owes by days past due, as of ``as_of``."""
    return aging(receivables(store, as_of)[1])
