"""Payments, statuses and aging (docs/billing-rules.md 4.9-4.14)."""

from __future__ import annotations

import random
from collections import defaultdict
from dataclasses import dataclass
from datetime import date, timedelta
from decimal import Decimal

import pytest
from hypothesis import given
from hypothesis import strategies as st

from billing.core.ledger import (
    AGING_BUCKETS,
    LedgerResult,
    Payment,
    aging,
    apply_payments,
    bucket_of,
)
from billing.core.model import InvalidBillingDataError

D = Decimal


@dataclass(frozen=True)
class Inv:
    """A stand-in receivable: the ledger needs only these five fields."""

    invoice_id: str
    firm_id: str
    issue_date: date
    due_date: date
    amount_due: Decimal


def inv(invoice_id: str, issue: date, amount: str, firm: str = "F1", terms_days: int = 30) -> Inv:
    return Inv(invoice_id, firm, issue, issue + timedelta(days=terms_days), D(amount))


def pay(amount: str, on: date, reference: str, firm: str = "F1") -> Payment:
    return Payment(firm, D(amount), on, reference)


def summary(result: LedgerResult) -> list[tuple[str, str, Decimal, str]]:
    return [(s.invoice_id, s.firm_id, s.outstanding, s.status) for s in result.statuses]


APR1, MAY1 = date(2025, 4, 1), date(2025, 5, 1)
A = inv("INV-2025-03-F1", APR1, "100.00")  # due 05-01
B = inv("INV-2025-04-F1", MAY1, "50.00")  # due 05-31


def test_payment_settles_oldest_invoice_first() -> None:
    # 120.00 on 05-10: A (older) takes 100.00, B the remaining 20.00.
    result = apply_payments([B, A], [pay("120.00", date(2025, 5, 10), "R1")], date(2025, 5, 10))
    assert summary(result) == [
        ("INV-2025-03-F1", "F1", D("0.00"), "paid"),
        ("INV-2025-04-F1", "F1", D("30.00"), "partially_paid"),
    ]
    assert [(a.invoice_id, a.amount) for a in result.allocations] == [
        ("INV-2025-03-F1", D("100.00")),
        ("INV-2025-04-F1", D("20.00")),
    ]


def test_leftover_is_credit_balance_used_by_the_next_invoice() -> None:
    # 130.00 on 04-20 pays A and leaves 30.00; B, issued 05-01, takes it at once.
    payments = [pay("130.00", date(2025, 4, 20), "R1")]
    before_b = apply_payments([A, B], payments, date(2025, 4, 30))
    assert before_b.credit_balances == {"F1": D("30.00")}
    assert summary(before_b)[1] == ("INV-2025-04-F1", "F1", D("50.00"), "open")  # not issued yet
    after_b = apply_payments([A, B], payments, MAY1)
    assert after_b.credit_balances == {}
    assert summary(after_b)[1] == ("INV-2025-04-F1", "F1", D("20.00"), "partially_paid")
    assert after_b.allocations[-1].reference == "R1" and after_b.allocations[-1].applied_on == MAY1
    assert after_b.statuses[1].amount_due == D("50.00")  # amount_due never changes


def test_payment_before_any_invoice_waits_as_credit() -> None:
    result = apply_payments([A], [pay("30.00", date(2025, 3, 20), "R0")], date(2025, 4, 2))
    assert summary(result) == [("INV-2025-03-F1", "F1", D("70.00"), "partially_paid")]
    assert [(a.reference, a.applied_on) for a in result.allocations] == [("R0", APR1)]


def test_same_day_payments_apply_in_reference_order() -> None:
    payments = [pay("60.00", date(2025, 4, 5), "R2"), pay("60.00", date(2025, 4, 5), "R1")]
    result = apply_payments([A, B], payments, date(2025, 5, 2))
    assert [(a.reference, a.invoice_id, a.amount) for a in result.allocations] == [
        ("R1", "INV-2025-03-F1", D("60.00")),
        ("R2", "INV-2025-03-F1", D("40.00")),
        ("R2", "INV-2025-04-F1", D("20.00")),
    ]


def test_payments_after_as_of_are_ignored_and_firms_are_separate() -> None:
    other = inv("INV-2025-03-F2", APR1, "10.00", firm="F2")
    payments = [pay("100.00", date(2025, 4, 3), "R1"), pay("10.00", date(2025, 4, 9), "R1", firm="F2")]
    result = apply_payments([A, other], payments, date(2025, 4, 8))
    assert summary(result) == [
        ("INV-2025-03-F1", "F1", D("0.00"), "paid"),
        ("INV-2025-03-F2", "F2", D("10.00"), "open"),
    ]


@pytest.mark.parametrize(
    ("paid", "as_of", "expected"),
    [
        (None, date(2025, 4, 15), "open"),
        (None, MAY1, "open"),  # on the due date: not yet past it
        (None, date(2025, 5, 2), "overdue"),
        ("40.00", date(2025, 4, 15), "partially_paid"),
        ("40.00", date(2025, 5, 2), "overdue"),
        ("100.00", date(2025, 9, 1), "paid"),
    ],
    ids=["open", "due-today", "day-after-due", "partial", "partial-and-late", "paid-late-check"],
)
def test_status(paid: str | None, as_of: date, expected: str) -> None:
    payments = [pay(paid, date(2025, 4, 10), "R1")] if paid else []
    assert apply_payments([A], payments, as_of).statuses[0].status == expected


def test_zero_invoice_is_paid() -> None:
    result = apply_payments([inv("INV-Z", APR1, "0.00")], [], date(2025, 6, 1))
    assert summary(result) == [("INV-Z", "F1", D("0.00"), "paid")]


@pytest.mark.parametrize(
    ("days_past_due", "bucket"),
    [
        (-1, "not_due"),
        (0, "0-30"),
        (30, "0-30"),
        (31, "31-60"),
        (60, "31-60"),
        (61, "61-90"),
        (90, "61-90"),
        (91, "90+"),
        (400, "90+"),
    ],
    ids=["not-yet-due", "due-today", "30", "31", "60", "61", "90", "91", "400"],
)
def test_bucket_boundaries(days_past_due: int, bucket: str) -> None:
    assert bucket_of(days_past_due) == bucket


def test_aging_report() -> None:
    # as of 2025-07-15: A due 05-01 (75 days), B due 05-31 (45 days), C due 07-31 (not due),
    # F2's invoice due 06-20 (25 days). 20.00 paid on A.
    c = inv("INV-2025-06-F1", date(2025, 7, 1), "7.00")
    f2 = inv("INV-2025-04-F2", date(2025, 5, 21), "3.00", firm="F2")
    result = apply_payments([A, B, c, f2], [pay("20.00", date(2025, 6, 1), "R1")], date(2025, 7, 15))
    report = aging(result)
    assert report.by_firm == {
        "F1": {
            "not_due": D("7.00"),
            "0-30": D("0.00"),
            "31-60": D("50.00"),
            "61-90": D("80.00"),
            "90+": D("0.00"),
        },
        "F2": {
            "not_due": D("0.00"),
            "0-30": D("3.00"),
            "31-60": D("0.00"),
            "61-90": D("0.00"),
            "90+": D("0.00"),
        },
    }
    assert report.totals == {
        "not_due": D("7.00"),
        "0-30": D("3.00"),
        "31-60": D("50.00"),
        "61-90": D("80.00"),
        "90+": D("0.00"),
    }


@pytest.mark.parametrize(
    ("invoices", "payments"),
    [
        ([A, A], []),
        ([A], [pay("1.00", APR1, "R1"), pay("2.00", MAY1, "R1")]),
        ([Inv("X", "F1", APR1, MAY1, D("1.005"))], []),
    ],
    ids=["duplicate-invoice", "duplicate-payment-reference", "amount-due-three-places"],
)
def test_ledger_refuses_inconsistent_inputs(invoices: list[Inv], payments: list[Payment]) -> None:
    with pytest.raises(InvalidBillingDataError):
        apply_payments(invoices, payments, MAY1)


@pytest.mark.parametrize("amount", [D("0"), D("-5.00"), D("1.001"), 5.0], ids=["zero", "negative", "3-places", "float"])
def test_payment_amount_must_be_positive_money(amount: object) -> None:
    with pytest.raises(InvalidBillingDataError):
        Payment("F1", amount, APR1, "R1")  # type: ignore[arg-type]


# ----------------------------------------------------------------- properties

FIRMS = ["F1", "F2"]
cents = st.integers(0, 30_000).map(lambda c: Decimal(c).scaleb(-2))
ledger_days = st.dates(date(2025, 1, 1), date(2025, 12, 31))


@st.composite
def ledger_case(draw: st.DrawFn) -> tuple[list[Inv], list[Payment], date]:
    invoices = [
        inv(
            f"INV-{n:02d}",
            draw(ledger_days),
            str(draw(cents)),
            draw(st.sampled_from(FIRMS)),
            draw(st.sampled_from([0, 15, 30])),
        )
        for n in range(draw(st.integers(0, 6)))
    ]
    payments = [
        Payment(draw(st.sampled_from(FIRMS)), draw(cents.filter(lambda d: d > 0)), draw(ledger_days), f"R{n}")
        for n in range(draw(st.integers(0, 6)))
    ]
    return invoices, payments, draw(ledger_days)


@given(ledger_case())
def test_ledger_conserves_money_and_pays_oldest_first(case: tuple[list[Inv], list[Payment], date]) -> None:
    invoices, payments, as_of = case
    result = apply_payments(invoices, payments, as_of)
    received = sum((p.amount for p in payments if p.paid_on <= as_of), D(0))
    allocated = sum((a.amount for a in result.allocations), D(0))
    assert received == allocated + sum(result.credit_balances.values(), D(0))
    by_firm = defaultdict(list)
    for status in result.statuses:
        assert D(0) <= status.outstanding <= status.amount_due
        assert status.paid + status.outstanding == status.amount_due
        if status.issue_date > as_of:
            assert status.paid == 0
        else:
            by_firm[status.firm_id].append(status)
    for firm_id, issued in by_firm.items():
        issued.sort(key=lambda s: (s.issue_date, s.invoice_id))
        owing = [s.outstanding > 0 for s in issued]
        if firm_id in result.credit_balances:
            assert not any(owing)  # credit is kept only when nothing issued is owed
        if any(owing):  # nothing newer than the oldest owing invoice has been paid
            assert all(s.paid == 0 for s in issued[owing.index(True) + 1 :])
    report = aging(result)
    assert sum(report.totals.values(), D(0)) == sum((s.outstanding for s in result.statuses), D(0))
    assert list(report.totals) == list(AGING_BUCKETS)


@given(ledger_case(), st.randoms(use_true_random=False))
def test_ledger_ignores_input_order(case: tuple[list[Inv], list[Payment], date], rnd: random.Random) -> None:
    invoices, payments, as_of = case
    expected = apply_payments(invoices, payments, as_of)
    rnd.shuffle(invoices)
    rnd.shuffle(payments)
    assert apply_payments(invoices, payments, as_of) == expected
